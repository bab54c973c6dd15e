"""Jobs start the same way whatever Ray a user has: a head with token authentication (as `make demo` starts it),
reached through RAY_ADDRESS or found on this machine, from a shell where RAY_AUTH_MODE is not set, whatever the order
in which a job imports ray and this project.

Every job that starts or joins Ray runs here, in its smallest invocation, on such a head named by RAY_ADDRESS (the
pipeline job excepted: it is minutes of work, and tests/test_docs.py runs its three documented commands on a Ray of
their own, on a token head found on this machine and on one named by RAY_ADDRESS); the evaluation job also finds
the head on this machine by itself. With no head at all, tests/test_docs.py runs each of them as the README writes
it."""

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


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    from tests.test_docs import _make_user_dir

    return _make_user_dir(tmp_path_factory.mktemp("startup"))


SHORT_RUNS = {  # each job's smallest invocation in the user directory of tests/test_docs.py
    "prepare_data.py": ["--source", "files", "--input", "notes/", "--txt-delimiter", "<LOC>...</LOC>", "--name",
                        "startup", "--val-tokens", "200"],
    "pretrain.py": ["--config", "configs/local.yaml", "model.preset=tiny", "train.max_steps=2", "train.seq_len=32",
                    "train.micro_batch=2", "train.total_batch_tokens=128", "eval.val_every=0", "eval.sample_tokens=4",
                    "run.name=startup"],
    "finetune.py": ["--config", "configs/finetune-local.yaml", "data.seq_len=32", "train.epochs=1",
                    "train.micro_batch=4", "samples.max_tokens=4", "run.name=startup"],
    "train_early_exit.py": ["--config", "configs/early-exit-local.yaml", "data.seq_len=32", "data.micro_batch=4",
                            "data.train_batches=4", "data.val_batches=2", "classifier.epochs=2",
                            "scaling.threads_per_worker=1", "run.name=startup"],
    "distill.py": ["--config", "configs/distill-local.yaml", "train.max_steps=2", "train.seq_len=32",
                   "train.micro_batch=2", "train.total_batch_tokens=128", "train.warmup_steps=1", "eval.val_every=0",
                   "eval.report_tokens=512", "eval.decode_tokens=4", "checkpoint.every=0", "run.name=startup"],
    # With a head to deploy onto, the job deploys and returns; the application lives on in the head's Serve.
    "serve.py": ["--only", "--variant", "tiny=runs/pretrain/local/final", "--port", "{port}"],
}


def test_every_job_that_uses_ray_is_started_here():
    jobs = {p.name for p in (ROOT / "jobs").glob("*.py") if "init_ray" in p.read_text(encoding="utf-8")}
    assert jobs == {*SHORT_RUNS, "evaluate.py", "pipeline.py"}, jobs


@pytest.mark.parametrize("job", sorted(SHORT_RUNS))
def test_the_job_runs_on_a_token_head_named_by_ray_address(job, token_head, user_dir):
    from tests.multinode import free_port

    port = free_port()
    argv = [sys.executable, str(ROOT / "jobs" / job), *(a.format(port=port) for a in SHORT_RUNS[job])]
    env = {**user_env(), "RAY_ADDRESS": token_head.address}  # a user's shell: no RAY_AUTH_MODE
    out = subprocess.run(argv, cwd=user_dir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    if job == "serve.py":
        import httpx

        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()["variants"] == ["tiny"]


def _evaluate(tiny_model, tmp_path: Path, env: dict[str, str]) -> str:
    """jobs/evaluate.py's smallest HellaSwag run in `env`; its output."""
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    tiny_model.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES)
    argv = [sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", "model", "--hellaswag", "hellaswag.jsonl",
            "--limit", "4", "--actors", "1", "--no-progress"]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "hellaswag" in out.stdout.lower()
    return out.stdout + out.stderr


def test_the_evaluation_job_runs_on_a_token_head(token_head, tiny_model, tmp_path):
    _evaluate(tiny_model, tmp_path, {**user_env(), "RAY_ADDRESS": token_head.address})


def test_the_evaluation_job_finds_the_token_head_on_this_machine(token_head, tiny_model, tmp_path):
    """No RAY_ADDRESS, as in a shell after `make demo`: the job joins the head rather than starting a Ray of its own."""
    output = _evaluate(tiny_model, tmp_path, {**user_env(), "RAY_TMPDIR": token_head.tmpdir})  # where the head is
    assert "started a local ray instance" not in output.lower()  # what Ray prints when it starts one
