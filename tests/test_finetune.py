"""Fine-tuning on real Ray (Tune trials and a Train run) with a real MLflow server, on a tiny model and corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cluster.config import load
from cluster.config.finetune import FinetuneConfig
from gpt2 import GPT, preset

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """A tiny pretrained model and a delimited domain corpus of repetitive, learnable documents."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    GPT(preset("tiny").replace(block_size=64)).save_pretrained(str(root / "base"))
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(30)) for i in range(40)]
    (root / "domain.txt").write_text("".join(f"<LOC>{d}</LOC>\n" for d in docs))
    return root


def config(domain: Path, run_root: Path, *overrides: str) -> FinetuneConfig:
    return load(FinetuneConfig, None, [
        f"model.source={domain / 'base'}", f"data.inputs=[{domain / 'domain.txt'}]", "data.txt_delimiter=<LOC>...</LOC>",
        "data.seq_len=32", "data.val_fraction=0.2", "train.epochs=2", "train.micro_batch=4", "train.autocast=fp32",
        "samples.prompts=[alpha]", "samples.max_tokens=8", f"run.root={run_root}", *overrides,
    ])


def test_lr_search_then_finetune(ray_session, mlflow_server, domain, tmp_path):
    from mlflow.tracking import MlflowClient

    from cluster.train.finetune import run

    # The good rate first: with one trial at a time, ASHA compares the later (much worse) one against it after its
    # first epoch and stops it. Two trials are all that takes; each one more costs a trial's start-up.
    cfg = config(domain, tmp_path, "search.lrs=[3e-3, 1e-6]", "search.epochs=3", "search.grace_period=1",
                 "search.reduction_factor=2", "search.max_concurrent=1", "run.name=searched",
                 f"run.tracking_uri={mlflow_server}")
    summary = run(cfg, search=True)  # the config's server, not the environment's (where nothing listens)
    rows = summary["search"].rows
    assert [r["lr"] for r in rows] == sorted([3e-3, 1e-6])
    assert summary["lr"] == 3e-3 == min(rows, key=lambda r: r["best_val_loss"])["lr"]
    assert any(r["status"] == "stopped by ASHA" for r in rows), rows
    assert (Path(summary["search"].csv_path)).read_text().startswith("trial,lr,best_val_loss,epochs_run,status")

    # The trials ran 3 epochs and the fine-tune runs 2: a different recipe, so the fine-tune is trained.
    assert summary["adopted_trial"] is None
    best = Path(summary["best_dir"])
    model = GPT.from_pretrained(str(best))
    assert math.isfinite(summary["metrics"]["best_val_loss"])
    assert "--- prompt: 'alpha'" in summary["samples"]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("finetune")
    runs = client.search_runs([exp.experiment_id])
    # This search's parent run: other tests' pipelines log searches of their own into the session's server.
    parent = [r for r in runs if r.data.tags.get("kind") == "lr-search" and r.info.run_name == "searched-lr-search"]
    assert len(parent) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(children) == 2 and all("val_loss" in c.data.metrics for c in children)
    final = client.get_run(summary["run_id"])
    assert final.data.params["lr"] == "0.003" and "val_loss" in final.data.metrics
    [version] = client.search_model_versions("name='gpt2-searched-finetuned'")  # the fine-tuned model is registered
    # The tokens the exported (best) epoch had trained on: every epoch trains on as many tokens as the last.
    m = summary["metrics"]
    assert int(version.tags["tokens_seen"]) == m["tokens_seen"] // m["epoch"] * m["best_epoch"] > 0
    assert model.config.n_layer == 2


def test_lora_finetune_keeps_the_base_and_merges(ray_session, mlflow_server, domain, tmp_path):
    from cluster.train.finetune import run

    cfg = config(domain, tmp_path, "train.mode=lora", "lora.rank=4", "train.lr=1e-2", "run.name=lora")
    summary = run(cfg, search=False, tracking_uri=mlflow_server)
    run_dir = Path(cfg.run_dir())
    assert (run_dir / "best_adapters" / "adapter_config.json").is_file()
    base = GPT.from_pretrained(str(domain / "base"))
    merged = GPT.from_pretrained(summary["best_dir"])
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("attn.c_attn" in n for n in changed)  # only the adapted projections moved


def test_a_lora_trial_is_adopted_with_its_adapters_and_a_trial_of_another_recipe_is_not(
    mlflow_server, domain, tmp_path
):
    """adopt_trial on a LoRA trial's export (no Ray needed: the trial directory is what a Tune trial leaves)."""
    from mlflow.tracking import MlflowClient

    from cluster.train.finetune import SearchResult, _export_best, adopt_trial
    from gpt2.lora import apply_lora

    cfg = config(domain, tmp_path, "train.mode=lora", "lora.rank=4", "search.epochs=2", "run.name=adopted-lora")
    model = apply_lora(GPT.from_pretrained(str(domain / "base")), cfg.lora.build())
    with torch.no_grad():  # adapters that change the merged weights
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    trial = tmp_path / "tune" / "trial_0"
    _export_best(model, cfg, trial / "best")
    history = [{"epoch": e, "train_loss": 4.0, "val_loss": 5.0 - e, "best_val_loss": 5.0 - e, "best_epoch": e,
                "epochs_since_best": 0, "stopped_early": 0.0, "tokens_seen": 128 * e} for e in (1, 2)]

    def searched(status: str) -> SearchResult:
        return SearchResult(1e-3, 3.0, [], tmp_path / "results.csv", trial, history, status)

    run_dir = Path(cfg.run_dir())
    assert adopt_trial(cfg, searched("stopped by ASHA"), mlflow_server) is None  # it did not run the whole recipe
    for other in ("search.epochs=3", "scaling.num_workers=2"):  # the fine-tune would train something else
        assert adopt_trial(config(domain, tmp_path, "train.mode=lora", "lora.rank=4", other), searched("completed"),
                           mlflow_server) is None
    assert not (run_dir / "best").exists()

    assert adopt_trial(cfg, searched("early-stopped (patience)"), mlflow_server) == history[-1]
    for folder, file in (("best", "model.safetensors"), ("best_adapters", "adapter_model.safetensors")):
        assert (run_dir / folder / file).read_bytes() == (trial / folder / file).read_bytes()
    client = MlflowClient(mlflow_server)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).data.tags["from_search_trial"] == "trial_0"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [(1, 4.0), (2, 3.0)]


def test_bad_finetune_configs_fail_before_any_worker(domain, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "plain.txt").write_text("no tags in here\n")
    with pytest.raises(ValueError, match="search space is empty"):
        config(domain, tmp_path, "search.lrs=[]").validate(search=True)
    with pytest.raises(ValueError, match="train.mode"):
        config(domain, tmp_path, "train.mode=half").validate()
    with pytest.raises(ValueError, match="does not exist"):
        config(domain, tmp_path, f"data.inputs=[{tmp_path / 'missing.txt'}]").validate()
    for override, message in [("train.lr=.nan", "train.lr must be a finite number > 0"),
                              ("train.autocast=fp8", "train.autocast must be auto, bf16 or fp32"),
                              ("train.grad_clip=-1", "train.grad_clip must be a finite number >= 0"),
                              ("scaling.num_workers=0", "scaling.num_workers must be >= 1"),
                              (f"model.source={tmp_path}", f"model.source: {tmp_path} is not a model directory")]:
        with pytest.raises(ValueError, match=message):
            config(domain, tmp_path, override).validate()
    config(domain, tmp_path, "model.source=gpt2").validate()  # a hub name, even beside a gpt2/ folder of code

    from cluster.train.finetune import load_documents

    with pytest.raises(ValueError, match="no documents"):
        load_documents(config(domain, tmp_path, f"data.inputs=[{tmp_path / 'empty.txt'}]"))
    with pytest.raises(ValueError, match="plain.txt:1: text outside"):
        load_documents(config(domain, tmp_path, f"data.inputs=[{tmp_path / 'plain.txt'}]"))


def test_wikitext2_is_domain_data_one_article_per_document(domain, tmp_path):
    """data.dataset=wikitext-2 reads the train split (here a local copy in the original release's layout) and makes
    each top-level article one document, sub-headings included."""
    from cluster.train.finetune import load_documents

    copy = tmp_path / "wikitext-2-raw"
    copy.mkdir()
    (copy / "wiki.train.raw").write_text(
        " \n = Alpha = \n \n Alpha is first . \n \n = = History = = \n \n It began early . \n"
        " \n = Beta = \n \n Beta comes second . \n"
    )
    cfg = config(domain, tmp_path, "data.dataset=wikitext-2", f"data.inputs=[{tmp_path}]", "data.txt_delimiter=null")
    cfg.validate()
    docs = load_documents(cfg)
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = History = =" in docs[0] and "It began early" in docs[0]
    assert docs[1].startswith("= Beta =") and "Beta comes second" in docs[1]


def test_a_search_whose_driver_was_killed_resumes_without_rerunning_finished_trials(
    ray_session, mlflow_server, domain, tmp_path, capsys
):
    import json
    import sys
    import time

    from ray.util.state import list_actors

    from cluster.train.finetune import run
    from tests.drivers import kill_driver_when

    # Two trials, one at a time: the driver is killed once the first has finished, so the resumed search must keep
    # that one and run (or finish) the second.
    overrides = ["search.lrs=[3e-3, 1e-3]", "search.epochs=2", "search.grace_period=2", "search.max_concurrent=1",
                 "run.name=resumed-search", f"run.tracking_uri={mlflow_server}"]
    cfg = config(domain, tmp_path, *overrides)
    command = [sys.executable, "jobs/finetune.py", "--search", "--address", ray_session.get_runtime_context().gcs_address,
               f"model.source={domain / 'base'}", f"data.inputs=[{domain / 'domain.txt'}]",
               "data.txt_delimiter=<LOC>...</LOC>", "data.seq_len=32", "data.val_fraction=0.2", "train.epochs=2",
               "train.micro_batch=4", "train.autocast=fp32", "samples.prompts=[alpha]", "samples.max_tokens=8",
               f"run.root={tmp_path}", *overrides]
    tune_dir = Path(cfg.run_dir()) / "search" / "tune"

    def finished_trials() -> list[Path]:
        return [p.parent for p in tune_dir.glob("*/result.json") if len(p.read_text().splitlines()) >= 2]

    kill_driver_when(command, tmp_path / "driver.log", lambda: bool(finished_trials()), "the end of a trial")
    done_before = finished_trials()
    assert len(done_before) < 2, "the search finished before its driver was killed"
    lines_before = {p.name: (p / "result.json").read_text() for p in done_before}
    gcs = ray_session.get_runtime_context().gcs_address
    while list_actors(address=gcs, filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")]):
        time.sleep(0.5)  # the dead driver's trial actors go with it

    summary = run(cfg, search=True, tracking_uri=mlflow_server)
    assert "resuming the learning-rate search" in capsys.readouterr().out
    rows = summary["search"].rows
    assert sorted(r["lr"] for r in rows) == [1e-3, 3e-3] and all(r["status"] == "completed" for r in rows), rows
    for name, text in lines_before.items():  # a trial finished before the kill is not run again
        assert (tune_dir / name / "result.json").read_text() == text
        assert [json.loads(line)["epoch"] for line in text.splitlines()] == [1, 2]
    # Each trial keeps only its newest epoch checkpoint, which is what makes Tune save the search's state with every
    # one (not every 10 s): without it, the end of the first trial reached the run directory up to 10 s late, and
    # the second could finish in between.
    assert [len(list((tune_dir / r["trial"]).glob("checkpoint_*"))) for r in rows] == [1, 1]

    # The trials ran the fine-tune's own recipe (2 epochs, one worker), so the best one's best epoch is the fine-tuned
    # model, byte for byte, with a fine-tune run of its own in MLflow holding the trial's epochs.
    from mlflow.tracking import MlflowClient

    best_trial = min(rows, key=lambda r: r["best_val_loss"])
    assert summary["adopted_trial"] == best_trial["trial"] and summary["lr"] == best_trial["lr"]
    exported = tune_dir / best_trial["trial"] / "best"
    for file in ("model.safetensors", "config.json"):
        assert (Path(summary["best_dir"]) / file).read_bytes() == (exported / file).read_bytes()
    assert summary["metrics"]["best_val_loss"] == best_trial["best_val_loss"]
    client = MlflowClient(mlflow_server)
    final = client.get_run(summary["run_id"])
    assert final.data.tags["from_search_trial"] == best_trial["trial"] and final.data.tags["kind"] == "finetune"
    assert final.data.params["lr"] == str(best_trial["lr"])
    assert [m.step for m in client.get_metric_history(summary["run_id"], "val_loss")] == [1, 2]
    [version] = client.search_model_versions("name='gpt2-resumed-search-finetuned'")
    assert int(version.tags["tokens_seen"]) > 0
