"""The whole pipeline on tiny settings, on real Ray, MLflow and Serve: every stage runs, a rerun skips them all
(content-cached), and `--from` reruns from the named stage."""

from __future__ import annotations

import json
import urllib.request

import pytest

from cluster.config import load
from workflow.pipeline import STAGES, PipelineConfig, run_pipeline, summary_table


def tiny_pipeline(tmp_path, port: int) -> PipelineConfig:
    """Tiny stages. The evaluate stage's perplexity pass over the validation split and the fine-tune stage's two
    search trials are the longest pieces of work, so they use both cores: two scoring actors (the default) and both
    trials at once (a trial's only epoch is done before ASHA could stop it, so the order of the trials changes
    nothing)."""
    return load(PipelineConfig, None, [
        f"root={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}", f"domain_dir={tmp_path / 'domain'}",
        "name=tiny", f"serve_port={port}", "cloze_examples=8", "eval_actors=2",
        "pretrain_overrides=[model.preset=tiny, train.seq_len=32, train.micro_batch=2,"
        " train.total_batch_tokens=64, train.max_steps=4, train.warmup_steps=1, train.autocast=fp32,"
        " eval.val_every=2, eval.val_batches=2, eval.sample_every=0, checkpoint.every=0, scaling.num_workers=1]",
        "finetune_overrides=[data.max_documents=12, data.seq_len=64, train.micro_batch=4, train.epochs=1,"
        " train.autocast=fp32, search.epochs=1, 'search.lrs=[1.0e-3, 1.0e-4]', search.max_concurrent=2,"
        " samples.max_tokens=8]",
        "early_exit_overrides=[model.exit_layer=1, data.seq_len=32, data.micro_batch=4, data.train_batches=4,"
        " data.val_batches=2, classifier.epochs=2, scaling.threads_per_worker=1]",
    ])


def assert_one_registered_model_per_kind(uri: str, early_exit_versions: int) -> None:
    """Each stage's model is a version of its own registered model, with its figures as tags and a champion."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for kind, versions in (("pretrained", 1), ("finetuned", 1), ("early-exit", early_exit_versions)):
        model = client.get_registered_model(f"gpt2-tiny-{kind}")
        assert model.aliases["champion"] in {str(v) for v in range(1, versions + 1)}
        version = client.get_model_version(model.name, str(versions))
        assert version.tags["kind"] == kind and float(version.tags["val_loss"]) > 0 and version.tags["git_commit"]
        assert version.description.startswith(f"A `{kind}` GPT-2 model from MLflow run")
    pretrained = client.get_model_version("gpt2-tiny-pretrained", "1")
    assert pretrained.tags["tokens_seen"] == "256" and "hellaswag_acc_norm" in pretrained.tags  # the evaluate stage's


def test_pipeline_runs_every_stage_then_reuses_them(ray_session, mlflow_server, tmp_path):
    from ray import serve as ray_serve

    from cluster.runtime.local_services import free_port

    cfg = tiny_pipeline(tmp_path, free_port())
    try:
        first = run_pipeline(cfg, tracking_uri=mlflow_server)
        assert list(first.results) == list(STAGES)
        assert not any(r.cached for r in first.results.values())
        served = first.results["serve"].outputs
        with urllib.request.urlopen(f"{served['url']}/v1/models", timeout=30) as r:
            assert {m["id"] for m in json.loads(r.read())["data"]} == {"pretrained", "finetuned", "early-exit"}
        assert served["sample"].startswith("The Python language reference")
        table = summary_table(first)
        assert "fine-tune learning rate" in table and "were every token to exit" in table  # the bound, beside it
        assert_one_registered_model_per_kind(mlflow_server, early_exit_versions=1)

        again = run_pipeline(cfg, tracking_uri=mlflow_server)
        assert [s for s, r in again.results.items() if not r.cached] == ["serve"]  # serving is always redeployed
        assert again.results["finetune"].outputs == first.results["finetune"].outputs

        later = run_pipeline(cfg, from_stage="early_exit", tracking_uri=mlflow_server)
        assert [s for s, r in later.results.items() if not r.cached] == ["early_exit", "serve"]
        assert_one_registered_model_per_kind(mlflow_server, early_exit_versions=2)
        with pytest.raises(ValueError, match="choose one of"):
            run_pipeline(cfg, from_stage="nope")
    finally:
        ray_serve.shutdown()
