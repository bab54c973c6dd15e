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
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.config import load
from cluster.config.distill import DistillConfig
from cluster.config.early_exit import EarlyExitConfig
from cluster.config.finetune import FinetuneConfig
from cluster.config.pretrain import PretrainConfig
from tests import golden_losses
from tests.golden_losses import OFFLINE_TRACKING, read_golden
from tests.multinode import ROOT, LocalCluster, free_port
from tests.pretrain_fixtures import PACED, registered_checkpoints
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


def _run_losing_its_node(cluster: LocalCluster, job: str, args: list[str], log: Path, when,
                         finished=lambda: False) -> str:
    """Run `job` on a worker node of its own (1 CPU), lose that node once `when(node)` holds (while `finished()` says
    the job is not done) and let a replacement node join at once; the driver's output once it has exited
    successfully."""
    node = cluster.add_node(num_cpus=1)
    driver = _driver(cluster, job, args, log)
    deadline = time.monotonic() + 300
    while not when(node):
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)
    cluster.lose(node)
    lost_at = time.monotonic()
    assert not finished(), "the job finished before its node was lost"
    cluster.add_node(num_cpus=1)
    try:
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    print(f"{job}: the job finished {time.monotonic() - lost_at:.1f}s after its node was lost")
    return log.read_text()


def _lose_its_node_midway(cluster: LocalCluster, job: str, args: list[str], log: Path, when) -> None:
    """A Ray Train job run by _run_losing_its_node; the loss must have cost it its workers: Ray Train's failure
    policy reports a retry (a loss after the work was done would prove nothing)."""
    output = _run_losing_its_node(cluster, job, args, log, when)
    assert "[FailurePolicy] RETRY" in output, "the node was lost after the job's workers had finished"


def _golden_job(tmp_path: Path, overrides: list[str]) -> list[str]:
    """A golden job's overrides (tests/golden_losses.py) with restarts allowed and tracking to where nothing listens."""
    return [*overrides, "run.max_failures=2", f"run.tracking_uri={OFFLINE_TRACKING}", f"run.root={tmp_path / 'runs'}"]


def test_pretraining_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden pretraining run (8 steps), checkpointed every step: once a checkpoint is registered its worker's
    node is lost; Ray Train restarts the worker group on the replacement node from that checkpoint and the run ends
    with the losses of the uninterrupted run."""
    shards = golden_losses._python_docs_shards(tmp_path)
    args = _golden_job(tmp_path, [*golden_losses.PRETRAIN, f"data.shards={shards}", PACED])
    run_dir = load(PretrainConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "pretrain.py", args, tmp_path / "driver.log",
                          lambda node: bool(registered_checkpoints(run_dir)))
    assert_matches_golden("pretrain", golden_losses._from_metrics(run_dir, ("val_loss", "loss")), read_golden())


def test_finetuning_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden full fine-tune (3 epochs, a checkpoint per epoch): the node is lost once the first epoch's
    checkpoint is registered, and the run ends with the uninterrupted run's losses."""
    base, corpus = golden_losses._tiny_gpt2(tmp_path / "base"), golden_losses._domain_corpus(tmp_path / "domain.txt")
    args = _golden_job(tmp_path, [*golden_losses.FINETUNE, "run.name=golden-full",
                                                    f"model.source={base}", f"data.inputs=[{corpus}]"])
    run_dir = load(FinetuneConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "finetune.py", args, tmp_path / "driver.log",
                          lambda node: bool(registered_checkpoints(run_dir)))
    assert_matches_golden("finetune_full", golden_losses._from_metrics(run_dir, ("train_loss", "val_loss")),
                          read_golden())


def test_distillation_survives_losing_its_workers_node(cluster, tmp_path):
    """The golden distillation on Ray Train (6 steps), checkpointed every step."""
    cfg = golden_losses._distill_config(tmp_path, "golden-ray")
    args = _golden_job(tmp_path, [*golden_losses.DISTILL, "run.name=golden-ray",
                                  f"teacher.source={cfg.teacher.source}", f"data.shards={cfg.data.shards}", PACED])
    run_dir = load(DistillConfig, None, args).run_dir()
    _lose_its_node_midway(cluster, "distill.py", args, tmp_path / "driver.log",
                          lambda node: bool(registered_checkpoints(run_dir)))
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
    lost once the first trial has saved its first epoch's checkpoint. Tune starts that trial again (the search's
    FailureConfig) on the replacement node, from that checkpoint when it had registered it, and the search ends with
    both trials complete; the fine-tune at the best rate follows."""
    base, corpus = golden_losses._tiny_gpt2(tmp_path / "base"), golden_losses._domain_corpus(tmp_path / "domain.txt")
    args = [*golden_losses.FINETUNE, "run.name=search", f"model.source={base}", f"data.inputs=[{corpus}]",
            "search.lrs=[3e-3, 1e-3]", "search.epochs=2", "search.grace_period=2", "search.max_concurrent=1",
            "train.epochs=1", "run.max_failures=2", f"run.tracking_uri={OFFLINE_TRACKING}",
            f"run.root={tmp_path / 'runs'}"]
    search_dir = Path(load(FinetuneConfig, None, args).run_dir()) / "search"
    log = tmp_path / "driver.log"
    output = _run_losing_its_node(cluster, "finetune.py", ["--search", *args], log,
                                  lambda node: any((search_dir / "tune").glob("*/checkpoint_000000")))
    rows = list(csv.DictReader(open(search_dir / "results.csv")))
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 3e-3]
    assert all(r["status"] == "completed" and r["epochs_run"] == "2" for r in rows), rows
    assert "The trial terminated successfully after retrying" in output, "no trial was lost with the node"
    # The retried trial resumed from its epoch checkpoint ([1, 2]), or, when the node went before Tune had registered
    # that checkpoint, started again from the beginning ([1, 1, 2]); either way the epochs it reports are whole.
    histories = sorted([json.loads(line)["epoch"] for line in result.read_text().splitlines()]
                       for result in (search_dir / "tune").glob("*/result.json"))
    assert histories in ([[1, 2], [1, 2]], [[1, 1, 2], [1, 2]]), histories


def _stream(base: str, body: dict, under_way: "threading.Event") -> tuple[int, str]:
    """A streamed completion: (status, the whole body as received), whatever happens to the connection.
    `under_way` is set once its first chunk has arrived (or once it has failed before that)."""
    import httpx

    try:
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            received = []
            for piece in r.iter_text():
                received.append(piece)
                under_way.set()
            return r.status_code, "".join(received)
    except httpx.HTTPError as e:
        return -1, f"{type(e).__name__}: {e}"
    finally:
        under_way.set()


def _streams_during(base: str, body: dict, event) -> list[tuple[int, str]]:
    """Three streamed completions under way when `event()` runs (each has received its first chunk: a fixed wait
    let a fast machine finish them first); their (status, body) once they have ended."""
    streams: list[tuple[int, str]] = []
    started = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(target=lambda e=e: streams.append(_stream(base, body, e))) for e in started]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(timeout=120), "a stream got no first chunk within 120 s"
    event()
    for t in threads:
        t.join(timeout=180)
    return streams


def _serving_again(base: str, body: dict, since: float) -> list[int]:
    """Requests until one succeeds; every answer meanwhile must be an OpenAI-style JSON error. The codes seen."""
    import httpx

    codes = []
    while True:
        r = httpx.post(f"{base}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=120)
        codes.append(r.status_code)
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] is not None
            return codes
        assert "error" in r.json() and r.status_code in (500, 503), (r.status_code, r.text)
        assert time.monotonic() - since < 180, f"no successful answer within 180 s of the loss: {codes}"
        time.sleep(1)


def _assert_ended_well_or_cut(status: int, text: str) -> None:
    """A stream whose replica was lost: whole JSON events ending with an error event and [DONE], or a connection
    the server cut mid-body (the client sees the chunked body end early); never a body that looks complete."""
    if status == -1:
        assert "incomplete chunked read" in text, text
        return
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]", (status, text[-500:])
    assert all(e == "[DONE]" or json.loads(e) for e in events)  # every event is whole JSON
    assert "error" in json.loads(events[-2]), text[-500:]


def test_serving_recovers_when_the_node_of_its_replica_is_lost(cluster, tmp_path):
    """The Serve application's replica (the HTTP ingress and the models, a whole CPU) on a worker node, the head
    keeping the HTTP proxy. Streams are under way when that node is lost: the proxy cuts their connections (the
    client sees the chunked body end early, never a complete-looking wrong answer), or a stream ends with an error
    event and [DONE]. Requests succeed again once Serve has started the replica on a replacement node."""
    import torch

    from gpt2 import GPT, preset

    cluster.add_node(num_cpus=1)
    torch.manual_seed(0)
    GPT(preset("tiny").replace(block_size=1024)).save_pretrained(str(tmp_path / "model"))
    try:
        _serve_and_lose_the_node(cluster, tmp_path)
    finally:  # Serve would go on placing its replicas on the next case's nodes
        subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.shutdown()"],
                       env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True, timeout=120)


def _serve_and_lose_the_node(cluster: LocalCluster, tmp_path: Path) -> None:
    import httpx

    port = free_port()
    deployed = subprocess.run(
        [sys.executable, str(ROOT / "jobs/serve.py"), "--address", cluster.address, "--variant",
         f"tiny={tmp_path / 'model'}", "--only", "--port", str(port)],
        cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-4000:]
    base = f"http://127.0.0.1:{port}"
    # As long as the context allows (1 prompt token + 1,000): the streams must outlast the node's loss.
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 4}, timeout=120).status_code == 200
    [replica_node] = [n for n in cluster.nodes if cluster.runs(n, "ModelServer")]

    def lose(node):
        cluster.lose(node)
        cluster.add_node(num_cpus=1)

    streams = _streams_during(base, body, lambda: lose(replica_node))
    lost_at = time.monotonic()
    for status, text in streams:
        _assert_ended_well_or_cut(status, text)
    codes = _serving_again(base, body, lost_at)
    print(f"replica's node lost: serving again after {time.monotonic() - lost_at:.1f}s; answers: {codes};"
          f" streams: {[('error event' if s == 200 else 'cut') for s, _ in streams]}")


def test_tokenization_survives_losing_the_node_of_its_tokenizers(cluster, tmp_path):
    """jobs/prepare_data.py with its readers and tokenizer actor on one worker node, lost once the first shard is out:
    Ray Data starts the actor again on the replacement node, recomputes the lost blocks, and the shards hold exactly
    the documents' tokens in order (what a run without the loss writes)."""
    from gpt2.shards import open_shard
    from gpt2.tokenizer import EOT_TOKEN, get_tokenizer

    words = "river stone cloud lantern orbit meadow copper signal harbor violet".split()
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40 + i % 50)) for i in range(30_000)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "shards"
    # Lost once the first shard is written: the tokenizer actor is at work, and most of the corpus is still to come
    # (30,000 documents: with 6,000 a fast machine finished the whole job between the first shard and the loss).
    _run_losing_its_node(cluster, "prepare_data.py", [
        "--source", "files", "--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--name", "words",
        "--shard-tokens", "50000", "--val-tokens", "20000", "--tokenizers", "1", "--batch-size", "16"],
        tmp_path / "driver.log", lambda node: any(out.glob("*.bin")), finished=(out / "manifest.json").exists)
    manifest = json.loads((out / "manifest.json").read_text())
    written = np.concatenate([open_shard(out / s["file"]) for s in manifest["shards"]]).tolist()
    encoding = get_tokenizer()
    assert written == [t for d in docs for t in [EOT_TOKEN, *encoding.encode_ordinary(d)]]
