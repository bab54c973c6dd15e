"""Jobs start the same way whatever Ray a user has: a head with token authentication (as `make demo` starts it)
reached through RAY_ADDRESS from a shell where RAY_AUTH_MODE is not set, whatever the order in which a job imports
ray and this project. (No head at all: tests/test_docs.py runs the README's evaluation command that way.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.doc_commands import ROOT
from tests.test_docs import _user_env

RAY = str(Path(sys.executable).parent / "ray")
# ray imported first: Ray reads its authentication mode at import, before the project could set it.
DRIVER = """
import ray
from cluster.ray_env import init_ray
how = init_ray()
print(how, ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_head():
    """A Ray head of its own (port, temp dir, process group), with token authentication on, like the one
    `make demo` starts; stopped by signalling its process group (`ray stop` would stop every Ray on the machine)."""
    port, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**_user_env(), "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert head.poll() is None, "the test's Ray head exited while starting"
        time.sleep(1)
    time.sleep(3)  # the GCS answers before the raylet has registered
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def _run(code: str, env: dict[str, str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_driver_reaches_a_token_head_through_ray_address(token_head, tmp_path):
    env = {**_user_env(), "RAY_ADDRESS": token_head}
    out = _run(DRIVER, env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["cluster", "42"]


def test_the_evaluation_job_runs_on_a_token_head(token_head, tiny_model, tmp_path):
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    tiny_model.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES)
    env = {**_user_env(), "RAY_ADDRESS": token_head}
    argv = [sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "model", "--hellaswag", "hellaswag.jsonl",
            "--limit", "4", "--actors", "1", "--no-progress"]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "hellaswag" in out.stdout.lower()
