"""A worker node lost for real: Ray clusters of several nodes on this machine (tests/multinode.py), one of whose nodes
is SIGKILLed whole (raylet, object store, workers) while a job runs on it, and a replacement node joins, as an
autoscaler or a restarted machine would bring one. The jobs run as a user runs them, a driver process connected to
the cluster with --address; the head keeps no CPUs, so the work runs on the worker nodes only.

The cases share one cluster, and each adds the nodes it needs and loses them again: starting a cluster costs more
than what runs on it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.config import load
from cluster.config.distill import DistillConfig
from cluster.config.early_exit import EarlyExitConfig
from cluster.config.finetune import FinetuneConfig
from cluster.config.pretrain import PretrainConfig
from tests import golden_losses
from tests.golden_losses import OFFLINE_TRACKING, read_golden
from tests.multinode import ROOT, LocalCluster
from tests.test_golden_losses import assert_matches_golden


@pytest.fixture(scope="module")
def shared_cluster():
    with LocalCluster(head_cpus=0) as c:
        yield c


@pytest.fixture
def cluster(shared_cluster):
    """The module's cluster, left again with its head only: the worker nodes a case adds (its replacement node
    too) are stopped after it, so the next case's work lands on the node it means to lose."""
    yield shared_cluster
    shared_cluster.remove_worker_nodes()


def _driver(cluster: LocalCluster, job: str, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / job), "--address", cluster.address, *args],
                            cwd=log.parent, env=cluster.env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _registered_checkpoints(run_dir: str) -> list[str]:
    snapshot = Path(run_dir) / "train" / "checkpoint_manager_snapshot.json"
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []


def _lose_its_node_midway(cluster: LocalCluster, job: str, args: list[str], log: Path, when) -> None:
    """Run `job` on a worker node of its own (1 CPU), lose that node once `when(node)` holds and let a replacement
    node join at once; returns when the job's driver has exited successfully. The loss must have cost the job its
    workers: Ray Train's failure policy reports a retry (a loss after the work was done would prove nothing)."""
    node = cluster.add_node(num_cpus=1)
    driver = _driver(cluster, job, args, log)
    deadline = time.monotonic() + 300
    while not when(node):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    cluster.lose(node)
    lost_at = time.monotonic()
    cluster.add_node(num_cpus=1)
    try:
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    print(f"{job}: the job finished {time.monotonic() - lost_at:.1f}s after its node was lost")
    assert "[FailurePolicy] RETRY" in log.read_text(), "the node was lost after the job's workers had finished"


def _golden_job(tmp_path: Path, overrides: list[str]) -> list[str]:
    """A golden job's overrides (tests/golden_losses.py) with restarts allowed and tracking to where nothing listens."""
    return [*overrides, "run.max_failures=2", f"run.tracking_uri={OFFLINE_TRACKING}", f"run.root={tmp_path / 'runs'}"]


def test_pretraining_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden pretraining run (8 steps, checkpoint after 4): once the checkpoint is registered its worker's node
    is lost; Ray Train restarts the worker group on the replacement node from that checkpoint and the run ends with
    the losses of the uninterrupted run."""
    shards = golden_losses._python_docs_shards(tmp_path)
    args = _golden_job(tmp_path, [*golden_losses.PRETRAIN, f"data.shards={shards}"])
    run_dir = load(PretrainConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "pretrain.py", args, tmp_path / "driver.log",
                          lambda node: bool(_registered_checkpoints(run_dir)))
    assert_matches_golden("pretrain", golden_losses._from_metrics(run_dir, ("val_loss", "loss")), read_golden())


def test_finetuning_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden full fine-tune (3 epochs, a checkpoint per epoch): the node is lost once the first epoch's
    checkpoint is registered, and the run ends with the uninterrupted run's losses."""
    base, corpus = golden_losses._tiny_gpt2(tmp_path / "base"), golden_losses._domain_corpus(tmp_path / "domain.txt")
    args = _golden_job(tmp_path, [*golden_losses.FINETUNE, "run.name=golden-full",
                                                    f"model.source={base}", f"data.inputs=[{corpus}]"])
    run_dir = load(FinetuneConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "finetune.py", args, tmp_path / "driver.log",
                          lambda node: bool(_registered_checkpoints(run_dir)))
    assert_matches_golden("finetune_full", golden_losses._from_metrics(run_dir, ("train_loss", "val_loss")),
                          read_golden())


def test_distillation_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden distillation on Ray Train (6 steps, checkpoint after 3)."""
    cfg = golden_losses._distill_config(tmp_path, "golden-ray")
    args = _golden_job(tmp_path, [*golden_losses.DISTILL, "run.name=golden-ray",
                                                  f"teacher.source={cfg.teacher.source}", f"data.shards={cfg.data.shards}"])
    run_dir = load(DistillConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "distill.py", args, tmp_path / "driver.log",
                          lambda node: bool(_registered_checkpoints(run_dir)))
    assert_matches_golden("distill_ray", golden_losses._from_metrics(run_dir, golden_losses.DISTILL_KEYS),
                          read_golden())


def test_early_exit_training_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden exit-classifier training (5 epochs, no intermediate checkpoints: a restarted worker group trains
    again from the start) loses its node once its Train worker runs there, and ends with the uninterrupted run's
    losses."""
    shards, base = golden_losses._early_exit_inputs(tmp_path)
    args = _golden_job(tmp_path, [*golden_losses.EARLY_EXIT, f"model.source={base}",
                                                 f"data.shards={shards}"])
    run_dir = load(EarlyExitConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "train_early_exit.py", args, tmp_path / "driver.log",
                          lambda node: cluster.runs(node, "RayTrainWorker"))
    assert_matches_golden("early_exit", golden_losses._from_metrics(run_dir, ("classifier_loss", "classifier_val_loss")),
                          read_golden())


def test_a_search_trial_survives_losing_its_node(cluster, tmp_path):
    """A learning-rate search of two trials, one at a time, 2 epochs each with a checkpoint per epoch: the node is
    lost once the first trial has saved its first epoch's checkpoint. Tune starts that trial again from its checkpoint (the search's
    FailureConfig) on the replacement node, and the search ends with both trials complete; the fine-tune at the
    best rate follows."""
    base, corpus = golden_losses._tiny_gpt2(tmp_path / "base"), golden_losses._domain_corpus(tmp_path / "domain.txt")
    args = [*golden_losses.FINETUNE, "run.name=search", f"model.source={base}", f"data.inputs=[{corpus}]",
            "search.lrs=[3e-3, 1e-3]", "search.epochs=2", "search.grace_period=2", "search.max_concurrent=1",
            "train.epochs=1", "run.max_failures=2", f"run.tracking_uri={OFFLINE_TRACKING}",
            f"run.root={tmp_path / 'runs'}"]
    search_dir = Path(load(FinetuneConfig, None, args).run_dir()) / "search"
    node = cluster.add_node(num_cpus=1)
    log = tmp_path / "driver.log"
    driver = _driver(cluster, "finetune.py", ["--search", *args], log)
    deadline = time.monotonic() + 300
    while not any((search_dir / "tune").glob("*/checkpoint_000000")):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    cluster.lose(node)
    cluster.add_node(num_cpus=1)
    try:
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    rows = list(csv.DictReader(open(search_dir / "results.csv")))
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 3e-3]
    assert all(r["status"] == "completed" and r["epochs_run"] == "2" for r in rows), rows
    assert "The trial terminated successfully after retrying" in log.read_text(), "no trial was lost with the node"
    for result in (search_dir / "tune").glob("*/result.json"):  # resumed from its checkpoint: no epoch run twice
        assert [json.loads(line)["epoch"] for line in result.read_text().splitlines()] == [1, 2]
