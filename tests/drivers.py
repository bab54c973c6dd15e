"""Killing a job's driver process for the fault-tolerance tests: run a job as a user would, wait for a moment in it,
SIGKILL its whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def kill_driver_when(command: list[str], log: Path, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Start `command` (output to `log`), wait until `ready()`, then SIGKILL it and its children. Fails if the job
    exits first or `what` does not happen within `timeout` seconds."""
    with open(log, "w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what} did not happen"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
