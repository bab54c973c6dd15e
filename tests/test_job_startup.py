"""Jobs start the same way whatever Ray a user has: a head with token authentication (as `make demo` starts it),
reached through RAY_ADDRESS or found on this machine, from a shell where RAY_AUTH_MODE is not set, whatever the order
in which a job imports ray and this project. (No head at all: tests/test_docs.py runs the README's evaluation command
that way.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.doc_commands import ROOT
from tests.test_docs import _user_env

RAY = str(Path(sys.executable).parent / "ray")
# ray imported first: Ray reads its authentication mode at import, before the project could set it.
DRIVER = """
import ray
from cluster.runtime.ray_env import init_ray
how = init_ray()
print(how, ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    address: str
    tmpdir: str  # the RAY_TMPDIR it was started with


@pytest.fixture(scope="module")
def token_head():
    """A Ray head of its own (ports, temp dir, process group), with token authentication on, like the one
    `make demo` starts; stopped by signalling its process group (`ray stop` would stop every Ray on the machine)."""
    port, dashboard, client, agent = (_free_port() for _ in range(4))
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths live under it
    # RAY_TMPDIR instead of --temp-dir: Ray then also keeps the head's address (ray_current_cluster) under it, where a
    # driver with the same RAY_TMPDIR finds it with address="auto", unaffected by any other head on the machine.
    env = {**_user_env(), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": temp}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _answers(port):
            assert head.poll() is None and time.monotonic() < deadline, (
                f"the test's Ray head did not start:\n{(Path(temp) / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        time.sleep(3)  # the GCS answers before the raylet has registered
        yield Head(f"127.0.0.1:{port}", temp)
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_group(leader: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the leader's whole process group, then SIGKILL to what is left after `timeout`; returns when
    none is left (the leader is reaped here, or its zombie would keep the group alive)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(leader.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader.poll()
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _run(code: str, env: dict[str, str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_driver_reaches_a_token_head_through_ray_address(token_head, tmp_path):
    env = {**_user_env(), "RAY_ADDRESS": token_head.address}
    out = _run(DRIVER, env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["cluster", "42"]


def test_a_driver_finds_the_head_started_on_this_machine(token_head, tmp_path):
    """No RAY_ADDRESS, as in a shell after `make demo`: the job finds the newest head on this machine (Ray's
    address="auto") and authenticates with its token, instead of starting a Ray of its own."""
    env = {**_user_env(), "RAY_TMPDIR": token_head.tmpdir}  # where this test's head keeps its address
    out = _run(DRIVER + "print(ray.get_runtime_context().gcs_address)\n", env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    *_, reached, address = out.stdout.strip().splitlines()
    port = token_head.address.rsplit(":", 1)[1]  # Ray reports the GCS at the machine's address, not 127.0.0.1
    assert reached.split() == ["cluster", "42"] and address.endswith(f":{port}")


def test_the_evaluation_job_runs_on_a_token_head(token_head, tiny_model, tmp_path):
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    tiny_model.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES)
    env = {**_user_env(), "RAY_ADDRESS": token_head.address}
    argv = [sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "model", "--hellaswag", "hellaswag.jsonl",
            "--limit", "4", "--actors", "1", "--no-progress"]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "hellaswag" in out.stdout.lower()
