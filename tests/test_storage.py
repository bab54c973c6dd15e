"""Run directories and shard folders behind URIs (file:// goes through the same pyarrow code as s3:// and gs://)."""

from __future__ import annotations

import pytest

from cluster.config import load
from cluster.config.finetune import FinetuneConfig
from cluster.config.pretrain import PretrainConfig
from cluster.runtime import storage


def test_a_remote_run_directory_is_mirrored_and_synced(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    bucket = tmp_path / "bucket"
    run = storage.RunDir(f"file://{bucket}/runs/pretrain/a/")
    assert run.remote and run.local.is_relative_to(tmp_path / "cache") and str(run) == f"file://{bucket}/runs/pretrain/a"
    (run.local / "best").mkdir(parents=True)
    (run.local / "best" / "model.safetensors").write_bytes(b"w" * 100)
    (run.local / "best" / "config.json").write_text("{}")
    (run.local / "metrics.jsonl").write_text('{"step": 0}\n')
    run.push("best", "metrics.jsonl", "not-written-yet")
    assert (bucket / "runs/pretrain/a/best/model.safetensors").read_bytes() == b"w" * 100
    assert (bucket / "runs/pretrain/a/metrics.jsonl").read_text() == '{"step": 0}\n'

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "other-node"))
    elsewhere = storage.RunDir(run.location)  # another node: the same location, an empty mirror
    elsewhere.pull("metrics.jsonl", "best", "mlflow_run_id")
    assert (elsewhere.local / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert (elsewhere.local / "best" / "config.json").read_text() == "{}"
    assert not (elsewhere.local / "mlflow_run_id").exists()


def test_a_local_run_directory_is_used_in_place(tmp_path):
    run = storage.RunDir(str(tmp_path / "runs"))
    assert not run.remote and run.local == tmp_path / "runs"
    run.push("anything")  # nothing to do
    assert storage.absolute("runs") != "runs" and storage.absolute("s3://b/runs") == "s3://b/runs"


def test_remote_shards_are_checked_before_training_and_unreadable_uris_are_named(tmp_path):
    cfg = load(PretrainConfig, None, [f"data.shards=file://{tmp_path}/nothing", "run.root=s3://bucket/runs"])
    with pytest.raises(ValueError, match=f"data.shards=file://{tmp_path}/nothing: no manifest.json"):
        cfg.validate()
    with pytest.raises(ValueError, match="nosuchscheme://x: cannot open this storage URI"):
        storage.exists("nosuchscheme://x")


def test_jobs_whose_run_directory_must_be_a_folder_refuse_a_uri():
    cfg = load(FinetuneConfig, None, ["run.root=s3://bucket/runs"])
    with pytest.raises(ValueError, match="run.root=s3://bucket/runs: fine-tuning writes its run directory on a filesystem"):
        cfg.validate()
