"""Jobs start the same way whatever Ray a user has: a head with token authentication (as `make demo` starts it),
reached through RAY_ADDRESS or found on this machine, from a shell where RAY_AUTH_MODE is not set, whatever the order
in which a job imports ray and this project. (No head at all: tests/test_docs.py runs the README's evaluation command
that way.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_commands import ROOT
from tests.multinode import LocalCluster, user_env

# ray imported first: Ray reads its authentication mode at import, before the project could set it.
DRIVER = """
import ray
from cluster.runtime.ray_env import init_ray
how = init_ray()
print(how, ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


@pytest.fixture(scope="module")
def token_head():
    """A Ray head of its own (ports, temp dir, process group), with token authentication on, like the one
    `make demo` starts; `tmpdir` is its RAY_TMPDIR, where a driver finds it with address="auto"."""
    with LocalCluster(head_cpus=2) as head:
        yield head


def _run(code: str, env: dict[str, str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_driver_reaches_a_token_head_through_ray_address(token_head, tmp_path):
    env = {**user_env(), "RAY_ADDRESS": token_head.address}
    out = _run(DRIVER, env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["cluster", "42"]


def test_a_driver_finds_the_head_started_on_this_machine(token_head, tmp_path):
    """No RAY_ADDRESS, as in a shell after `make demo`: the job finds the newest head on this machine (Ray's
    address="auto") and authenticates with its token, instead of starting a Ray of its own."""
    env = {**user_env(), "RAY_TMPDIR": token_head.tmpdir}  # where this test's head keeps its address
    out = _run(DRIVER + "print(ray.get_runtime_context().gcs_address)\n", env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    *_, reached, address = out.stdout.strip().splitlines()
    port = token_head.address.rsplit(":", 1)[1]  # Ray reports the GCS at the machine's address, not 127.0.0.1
    assert reached.split() == ["cluster", "42"] and address.endswith(f":{port}")


def test_the_evaluation_job_runs_on_a_token_head(token_head, tiny_model, tmp_path):
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    tiny_model.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES)
    env = {**user_env(), "RAY_ADDRESS": token_head.address}
    argv = [sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "model", "--hellaswag", "hellaswag.jsonl",
            "--limit", "4", "--actors", "1", "--no-progress"]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "hellaswag" in out.stdout.lower()
