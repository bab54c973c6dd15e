"""Pretraining through Ray Train on 2 CPU workers, tracked by a real MLflow server on loopback.

Every Ray Train run costs far more in start-up and export than in its few tiny steps, so a run feeds every test whose
scenario it is (module fixtures): the learning test's uninterrupted run is also the reference that interrupted and
accumulating runs must reproduce; the run whose worker is killed tracks to a port where no MLflow server listens, so it
is also the unreachable-server test's run; and the run whose MLflow server is stopped mid-run is one worker
accumulating micro-steps, so it is also the accumulation test's run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from cluster.runtime import storage
from cluster.runtime.local_services import free_port
from cluster.runtime.tracking import read_metrics
from cluster.train.pretrain import run_pretraining
from gpt2 import GPT
from gpt2.train import lr_at
from gpt2.train_checkpoint import TRAINER_STATE
from tests.drivers import kill_driver_when
from tests.pretrain_fixtures import PACED, registered_checkpoints, write_python_docs_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_python_docs_shards(tmp_path_factory.mktemp("shards"))


def tiny_overrides(shards: Path | str, root: Path | str, name: str, *overrides: str) -> list[str]:
    """8 steps of 128 tokens on 2 workers, validated and checkpointed every 4: the reference run's settings, which
    the interrupted runs share (their losses must equal its losses step for step)."""
    return [
        "model.preset=tiny", "model.block_size=64", f"data.shards={shards}", "train.seq_len=32",
        "train.micro_batch=2", "train.total_batch_tokens=128", "train.max_steps=8", "train.warmup_steps=2",
        "train.max_lr=1e-2", "train.autocast=fp32", "eval.val_every=4", "eval.val_batches=4", "eval.sample_every=0",
        "eval.sample_tokens=8", "checkpoint.every=4", "scaling.num_workers=2", "scaling.use_gpu=false",
        f"run.root={root}", f"run.name={name}", *overrides,
    ]


def tiny_config(shards: Path | str, root: Path | str, name: str, *overrides: str) -> PretrainConfig:
    return load(PretrainConfig, None, tiny_overrides(shards, root, name, *overrides))


def losses(cfg: PretrainConfig) -> list[float]:
    return [r["loss"] for r in read_metrics(cfg.run_dir()) if "loss" in r]


HELLASWAG_LINES = [
    {"ind": i, "activity_label": "Cooking", "ctx_a": "A man puts a pan on the stove.", "ctx_b": "he",
     "ctx": "A man puts a pan on the stove. he", "split": "val", "split_type": "indomain", "label": i % 4,
     "endings": ["pours oil into the pan.", "reads a book about boats.", "jumps over the fence.", "sings to a dog."],
     "source_id": f"test~{i}"}
    for i in range(6)
]


@pytest.fixture(scope="module")
def learn_run(ray_session, shards, mlflow_server, tmp_path_factory):
    """The module's uninterrupted run: 8 steps on 2 workers, validated, HellaSwag-scored and checkpointed every 4
    steps, tracked by the session's MLflow server. (config, Ray Train result)."""
    root = tmp_path_factory.mktemp("learn")
    hellaswag = root / "hellaswag.jsonl"
    hellaswag.write_text("".join(json.dumps(line) + "\n" for line in HELLASWAG_LINES))
    cfg = tiny_config(shards, root, "learn", "eval.hellaswag_every=4", f"eval.hellaswag_path={hellaswag}")
    return cfg, run_pretraining(cfg, mlflow_server)


def test_two_workers_learn_checkpoint_and_track(learn_run, mlflow_server):
    cfg, result = learn_run
    assert result.error is None
    rows = read_metrics(cfg.run_dir())
    loss = [r["loss"] for r in rows if "loss" in r]
    assert len(loss) == 8 and loss[-1] < loss[0] - 0.5
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in rows if "loss" in r)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == [0, 4, 8]  # before any update, mid-run, and after the last update
    assert abs(val[0][1] - 10.83) < 0.3 and val[-1][1] < val[0][1] - 0.5
    # HellaSwag split over the two ranks and summed: 6 examples, so accuracies are multiples of 1/6.
    accs = [r["hellaswag_acc_norm"] for r in rows if "hellaswag_acc_norm" in r]
    assert len(accs) == 3 and all(abs(a * 6 - round(a * 6)) < 1e-9 for a in accs)
    # The checkpoint is a model directory (loads as a model) with the trainer and both workers' states.
    ckpt = Path(result.checkpoint.path)
    assert {"config.json", "model.safetensors", "trainer_state.pt", "worker_state_rank0.pt", "worker_state_rank1.pt"} <= {
        p.name for p in ckpt.iterdir()
    }
    GPT.from_pretrained(str(ckpt))
    final = GPT.from_pretrained(str(Path(cfg.run_dir()) / "final"))
    assert final.config.n_layer == 2
    assert (Path(cfg.run_dir()) / "best" / "model.safetensors").exists()
    # Both exports carry a model card with the figures the run recorded (8 steps x 128 tokens).
    final_card = (Path(cfg.run_dir()) / "final" / "README.md").read_text()
    assert "| tokens seen | 1,024 (1.0K) |" in final_card and f"| val_loss | {val[-1][1]:.4g} |" in final_card
    assert "| hellaswag_acc_norm |" in final_card and (Path(cfg.run_dir()) / "best" / "README.md").exists()

    client = MlflowClient(mlflow_server)
    run_id = (Path(cfg.run_dir()) / "mlflow_run_id").read_text()
    run = client.get_run(run_id)
    assert run.data.params["train.max_lr"] == "0.01" and run.data.params["model.preset"] == "tiny"
    assert run.info.status == "FINISHED"
    assert run.data.tags["git_commit"] is not None and "hardware" in run.data.tags
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(8))
    assert [m.value for m in history] == pytest.approx(loss)
    assert len(client.get_metric_history(run_id, "val_loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"loss.png", "metrics.jsonl", "README.md"} <= artifacts
    versions = client.search_model_versions(f"name='gpt2-{cfg.run.name}-pretrained'")
    assert len(versions) == 1


@pytest.fixture(scope="module")
def reference_losses(learn_run):
    """The loss sequence of the uninterrupted 8-step run (learn_run), to compare interrupted runs against. Runs that
    validate, score HellaSwag or checkpoint less often must match it exactly: evaluation and checkpoints read the
    model, they never change the training."""
    cfg, result = learn_run
    assert result.error is None, result.error
    ref = losses(cfg)
    assert len(ref) == 8
    return ref


def test_remote_run_root_and_shards_resume_on_a_node_that_never_saw_the_run(
    ray_session, shards, mlflow_server, reference_losses, tmp_path
):
    """run.root and data.shards as URIs. file:// goes through the same pyarrow filesystem code as s3:// and gs://:
    shards copied to a node-local cache, checkpoints written by Ray Train to the URI, the run directory mirrored."""
    bucket = tmp_path / "bucket"
    shutil.copytree(shards, bucket / "shards")
    remote = (f"file://{bucket}/shards", f"file://{bucket}/runs")
    part = tiny_config(remote[0], remote[1], "remote", "train.max_steps=3")
    assert run_pretraining(part, mlflow_server).error is None
    run_dir = bucket / "runs" / "pretrain" / "remote"
    first_run_id = (run_dir / "mlflow_run_id").read_text()
    assert len(read_metrics(run_dir)) > 0 and (run_dir / "best" / "model.safetensors").exists()
    # Resume as a different node would: no mirror of the run and no copy of the shards on this one.
    shutil.rmtree(storage.cache_root())
    resumed = tiny_config(remote[0], remote[1], "remote")
    assert run_pretraining(resumed, mlflow_server).error is None
    assert [r["loss"] for r in read_metrics(run_dir) if "loss" in r] == reference_losses
    assert (run_dir / "mlflow_run_id").read_text() == first_run_id
    assert sorted({m.step for m in MlflowClient(mlflow_server).get_metric_history(first_run_id, "loss")}) == list(range(8))
    GPT.from_pretrained(str(run_dir / "final"))
    assert any((run_dir / "train").glob("checkpoint_*/trainer_state.pt"))
    assert not list(Path.cwd().glob("file:*"))  # URIs are never taken for local relative paths


@pytest.fixture(scope="module")
def offline_killed_worker_run(ray_session, shards, tmp_path_factory):
    """A run of the reference's settings (no validation), tracking to a loopback port where no MLflow server
    listens, one of whose two workers is SIGKILLed once the checkpoint after 4 steps exists. It checkpoints every
    step (PACED), so it is still running when the kill lands. (config, result)."""
    cfg = tiny_config(shards, tmp_path_factory.mktemp("killed"), "killed", "eval.val_every=0", PACED)
    uri = f"http://127.0.0.1:{free_port()}"
    outcome = {}
    fit = threading.Thread(target=lambda: outcome.setdefault("result", run_pretraining(cfg, uri)))
    fit.start()
    deadline = time.monotonic() + 300
    while len(losses(cfg)) < 5:  # the checkpoint after 4 steps exists once step 5 is logged
        assert time.monotonic() < deadline and fit.is_alive(), "training did not reach step 5"
        time.sleep(0.2)
    workers = alive_train_workers(ray_session)
    killed_at = time.monotonic()
    os.kill(workers[-1].pid, signal.SIGKILL)
    fit.join(timeout=600)
    print(f"recovered and finished {time.monotonic() - killed_at:.1f}s after the kill")
    return cfg, outcome.get("result")


def test_killed_worker_restarts_from_checkpoint_bit_for_bit(offline_killed_worker_run, reference_losses):
    cfg, result = offline_killed_worker_run
    assert result.error is None
    assert losses(cfg) == reference_losses


def alive_train_workers(ray_session) -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=ray_session.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )


def test_killed_driver_resubmitted_resumes_the_same_mlflow_run(ray_session, shards, mlflow_server, reference_losses, tmp_path):
    """SIGKILL the job's driver process mid-run (Ray then ends the run's controller and workers), leave behind what a
    crash in the middle of persisting a checkpoint leaves (a newer checkpoint folder, half written), and submit the
    same run name again: it resumes from the last complete checkpoint, into the same MLflow run, with the losses of
    an uninterrupted run. A checkpoint every step (PACED) keeps the run going while the driver is killed."""
    overrides = tiny_overrides(shards, tmp_path, "driver", "eval.val_every=0", PACED,
                               f"run.tracking_uri={mlflow_server}")
    cfg = load(PretrainConfig, None, overrides)
    gcs = ray_session.get_runtime_context().gcs_address
    # A checkpoint counts once Ray Train's controller has registered it in the run's snapshot; one still only on
    # disk when the driver dies is ignored on resume, like a half-written one.
    kill_driver_when([sys.executable, "jobs/pretrain.py", "--address", gcs, *overrides], tmp_path / "driver.log",
                     lambda: bool(registered_checkpoints(cfg.run_dir())), "the registration of a checkpoint")
    killed_at = time.monotonic()
    assert len(losses(cfg)) < 8, "the run finished before the driver was killed"
    first_run_id = (Path(cfg.run_dir()) / "mlflow_run_id").read_text()
    while alive_train_workers(ray_session):  # Ray ends a dead driver's actors; the new run must not race them
        assert time.monotonic() < killed_at + 120, "the killed driver's workers were never stopped"
        time.sleep(0.5)

    train_dir = Path(cfg.run_dir()) / "train"
    complete = train_dir / registered_checkpoints(cfg.run_dir())[-1]
    resume_step = torch.load(complete / TRAINER_STATE, weights_only=True)["step"]
    torn = train_dir / "checkpoint_2099-12-31_23-59-59.999999"
    torn.mkdir()
    shutil.copy(complete / "config.json", torn)
    (torn / "model.safetensors").write_bytes((complete / "model.safetensors").read_bytes()[:1000])

    assert run_pretraining(cfg, mlflow_server).error is None
    print(f"resubmitted run finished {time.monotonic() - killed_at:.1f}s after the driver was killed")
    assert losses(cfg) == reference_losses
    assert (Path(cfg.run_dir()) / "mlflow_run_id").read_text() == first_run_id
    run = MlflowClient(mlflow_server).get_run(first_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(resume_step)
    history = MlflowClient(mlflow_server).get_metric_history(first_run_id, "loss")
    assert sorted({m.step for m in history}) == list(range(8))


def test_unreachable_mlflow_keeps_metrics_locally(offline_killed_worker_run):
    """No MLflow server answers (from the start, and for the worker group Ray Train restarts after the kill): the run
    completes, with every step in metrics.jsonl and the final model exported."""
    cfg, result = offline_killed_worker_run
    assert result.error is None
    assert len(losses(cfg)) == 8
    assert (Path(cfg.run_dir()) / "final" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def server_stopped_run(ray_session, shards, tmp_path_factory):
    """12 steps on 1 worker accumulating 2 micro-steps per step (the reference run's global batch), no validation,
    a checkpoint every step (PACED, so that it is still running when the server stops), tracked by an MLflow server
    of its own that is stopped once the run has logged 2 steps. (config, result, steps logged when the server was
    gone, the server's store URI)."""
    from cluster.runtime.local_services import start_local_server, stop_server

    root = tmp_path_factory.mktemp("outage")
    uri = f"http://127.0.0.1:{free_port()}"
    server = start_local_server(root / "mlflow", uri)
    threading.Thread(target=server.wait, daemon=True).start()
    cfg = tiny_config(shards, root, "outage", "scaling.num_workers=1", "eval.val_every=0", PACED,
                      "train.max_steps=12")
    outcome = {}
    fit = threading.Thread(target=lambda: outcome.setdefault("result", run_pretraining(cfg, uri)))
    fit.start()
    try:
        deadline = time.monotonic() + 300
        while len(losses(cfg)) < 2:
            assert time.monotonic() < deadline and fit.is_alive(), "training did not reach step 2"
            time.sleep(0.05)
    finally:
        stop_server(server.pid)
    stopped_after = len(losses(cfg))
    fit.join(timeout=600)
    return cfg, outcome.get("result"), stopped_after, f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


def test_mlflow_stopped_during_training_loses_nothing(server_stopped_run):
    """A tracking server of its own, stopped after the run has logged to it: training completes, every step stays
    in metrics.jsonl, and what reached the server before it went away is there (read from the server's own SQLite
    store with MLflow's client, rather than by starting the server again)."""
    cfg, result, stopped_after, store_uri = server_stopped_run
    assert result.error is None
    assert stopped_after < 12, "training finished before the server was stopped"
    assert [r["step"] for r in read_metrics(cfg.run_dir()) if "loss" in r] == list(range(12))
    assert (Path(cfg.run_dir()) / "final" / "model.safetensors").exists()
    run_id = (Path(cfg.run_dir()) / "mlflow_run_id").read_text()
    logged = [m.step for m in MlflowClient(store_uri).get_metric_history(run_id, "loss")]
    assert logged == list(range(len(logged))) and len(logged) >= 1


def test_bad_config_fails_before_any_worker_starts(tmp_path):
    job = [sys.executable, "jobs/pretrain.py"]
    out = subprocess.run(job + [f"data.shards={tmp_path}"], capture_output=True, text=True)
    assert out.returncode != 0 and "no manifest.json" in out.stderr
    out = subprocess.run(job + ["train.nope=1"], capture_output=True, text=True)
    assert out.returncode != 0 and "train.nope" in out.stderr


def test_one_worker_accumulating_equals_two_workers(server_stopped_run, learn_run, reference_losses):
    """The same global batch as 1 worker × 2 accumulation micro-steps (the server-outage run) and as 2 workers × 1
    (the reference run): same losses. The two runs' schedules differ in length (12 and 8 steps), which changes no
    learning rate before step 3 (warmup to the peak over steps 0-1, the peak at step 2, where the decay starts), so the
    losses of steps 0-3 must agree."""
    accumulating, result, _, _ = server_stopped_run
    parallel, _ = learn_run
    assert accumulating.scaling.num_workers == 1 and parallel.scaling.num_workers == 2
    assert accumulating.train.grad_accum_steps(1) == 2 and parallel.train.grad_accum_steps(2) == 1
    assert [lr_at(s, accumulating.train) for s in range(3)] == [lr_at(s, parallel.train) for s in range(3)]
    assert result.error is None
    assert len(losses(accumulating)) == 12
    assert losses(accumulating)[:4] == pytest.approx(reference_losses[:4], abs=1e-5)
