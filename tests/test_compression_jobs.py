"""The compression and analysis jobs end to end on a tiny model and tiny data written here, with a real MLflow server:
head analysis and pruning, the variant comparison table, Pre-LN vs Post-LN, and distillation (in process).

One test needs Ray (it uses the `ray_session` fixture): test_distill_on_ray_train_matches_the_in_process_loop.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from cluster.eval.compression import validation_tokens
from gpt2 import GPT, preset
from gpt2.early_exit import EarlyExitGPT, save_early_exit
from gpt2.perplexity import evaluate_perplexity
from gpt2.prune import prune_heads
from tests.job_loader import ROOT, load_job
from tests.pretrain_fixtures import write_python_docs_shards
from tests.test_hellaswag import EXAMPLES, write_jsonl

CPU = torch.device("cpu")
TINY_HEADS = 8  # 2 layers × 4 heads


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Shards of the built-in corpus, a random tiny checkpoint (64-token context) and a HellaSwag file."""
    root = tmp_path_factory.mktemp("compression")
    write_python_docs_shards(root / "shards", n_docs=60, val_tokens=3_000)
    torch.manual_seed(0)
    GPT(preset("tiny", n_head=4, block_size=64)).save_pretrained(str(root / "tiny"))
    write_jsonl(root / "hellaswag.jsonl", EXAMPLES)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def error_of(job, argv: list[str], capsys) -> str:
    """The message a job stops with: argparse's usage error on stderr, or the `error: ...` line of sys.exit."""
    with pytest.raises(SystemExit) as stopped:
        job.main(argv)
    return stopped.value.code if isinstance(stopped.value.code, str) else capsys.readouterr().err


def mlflow_run(uri: str, experiment: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


def artifact_names(client, run) -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id)}


# ------------------------------------------------------------------------------------------------ analyze_heads


ANALYSIS = ["--analysis-batches", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "400"]


def test_head_analysis_and_pruning_curve(data, mlflow_server, tmp_path, capsys):
    out = tmp_path / "heads"
    argv = ["--model", str(data / "tiny"), "--shards", str(data / "shards"), *ANALYSIS, "--fractions", "0.25", "0.5",
            "--save", "0.25", "--hellaswag", str(data / "hellaswag.jsonl"), "--output", str(out),
            "--tracking-uri", mlflow_server, "--name", "heads-test"]
    assert load_job("analyze_heads").main(argv) == 0
    printed = capsys.readouterr().out

    similarity = read_csv(out / "similarity.csv")
    assert [int(r["layer"]) for r in similarity] == [0, 1] and {r["heads"] for r in similarity} == {"4"}
    assert all(-1 - 1e-6 <= float(r[key]) <= 1 + 1e-6 for r in similarity for key in ("patterns_max", "outputs_max"))
    assert all((out / f"similarity_layer{layer}.png").stat().st_size > 0 for layer in (0, 1))
    redundant = read_csv(out / "redundant_heads.csv")
    assert len(redundant) == TINY_HEADS - 2  # every head but one per layer, most redundant first
    assert len({(r["layer"], r["head"]) for r in redundant}) == len(redundant)

    # The curve starts at 0% with the unpruned model's perplexity on the tokens after the analysed ones.
    model = GPT.from_pretrained(str(data / "tiny"))
    analysed = 2 * 2 * 33
    tokens = validation_tokens(data / "shards", analysed + 400)[analysed:]
    unpruned = evaluate_perplexity(model, tokens).perplexity
    curve = read_csv(out / "pruning_curve.csv")
    for method in ("redundancy", "importance"):
        points = [r for r in curve if r["method"] == method]
        assert [int(r["heads_pruned"]) for r in points] == [0, 2, 4]
        assert float(points[0]["perplexity"]) == pytest.approx(unpruned, rel=1e-6)
        assert float(points[0]["perplexity_increase_pct"]) == 0
        assert all(0 <= float(r["hellaswag_acc_norm"]) <= 1 for r in points)

        # The saved pruned model loads like any checkpoint, generates, and scores what the curve says.
        saved = next(r for r in points if r["checkpoint"])
        pruned = GPT.from_pretrained(saved["checkpoint"])
        assert Path(saved["checkpoint"]) == out / "pruned" / f"{method}-25pct"
        assert sum(pruned.config.n_head_per_layer) == TINY_HEADS - 2
        assert len(pruned.generate([[464, 3290]], 5, temperature=0, stop_at_eot=False)[0]) == 5
        assert evaluate_perplexity(pruned, tokens).perplexity == pytest.approx(float(saved["perplexity"]), rel=1e-6)
        assert "head-pruned" in (Path(saved["checkpoint"]) / "README.md").read_text()

    assert "verdict" in printed and "only 8 heads" in printed and "untrained" in printed
    assert "## Verdict" in (out / "report.md").read_text()
    client, run = mlflow_run(mlflow_server, "head-analysis", "heads-test")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "importance/perplexity")] == [0, 2, 4]
    assert {"similarity.csv", "pruning_curve.png", "report.md", "similarity_layer1.png"} <= artifact_names(client, run)


def test_head_analysis_rejects_bad_options(data, tmp_path, capsys):
    job = load_job("analyze_heads")
    base = ["--model", str(data / "tiny"), "--shards", str(data / "shards"), *ANALYSIS, "--no-mlflow",
            "--output", str(tmp_path / "out")]
    (tmp_path / "no-shards").mkdir()
    cases = [
        (["--fractions", "1.2"], "in [0, 1)"),
        (["--fractions", "0.9"], "every layer keeps one head"),
        (["--model", str(tmp_path / "missing")], "does not exist"),
        (["--shards", str(tmp_path / "no-shards")], "manifest.json"),
        (["--seq-len", "100"], "exceeds the model's context of 64"),
        (["--eval-tokens", "0"], "--eval-tokens must be >= 1"),
        (["--analysis-batches", "50"], "lower --analysis-batches"),
    ]
    for extra, message in cases:
        assert message in error_of(job, base + extra, capsys), extra


# ------------------------------------------------------------------------------------------------------ compare


def test_comparison_table_of_every_variant(data, mlflow_server, tmp_path):
    from gpt2.lora import LoRAConfig, apply_lora, lora_modules, save_adapters

    base = GPT.from_pretrained(str(data / "tiny"))
    prune_heads(base, {0: [1], 1: [0, 2]}).save_pretrained(str(tmp_path / "pruned"))
    lora = apply_lora(GPT.from_pretrained(str(data / "tiny")), LoRAConfig(rank=2))
    with torch.no_grad():  # lora_B starts at zero; a trained adapter would not be
        for module in lora_modules(lora).values():
            module.lora_B.normal_(std=0.02)
    save_adapters(lora, tmp_path / "adapters", base_model=str(data / "tiny"))
    shutil.copytree(data / "tiny", tmp_path / "early")
    save_early_exit(EarlyExitGPT(GPT.from_pretrained(str(data / "tiny")), exit_layer=1, threshold=0.5), tmp_path / "early")
    variants = ["--model", f"base={data / 'tiny'}", "--model", str(tmp_path / "pruned"),
                "--model", f"lora={tmp_path / 'adapters'}", "--model", f"early-exit={tmp_path / 'early'}"]
    expected = ["base", "base-int8", "base-bf16", "base-nf4", "pruned", "lora", "early-exit"]  # NF4 on CPU too
    out = tmp_path / "table"
    argv = [*variants, "--shards", str(data / "shards"), "--eval-tokens", "300", "--decode-tokens", "8",
            "--hellaswag", str(data / "hellaswag.jsonl"), "--output", str(out), "--tracking-uri", mlflow_server,
            "--name", "compare-test"]
    assert load_job("compare").main(argv) == 0

    rows = {r["variant"]: r for r in read_csv(out / "comparison.csv")}
    assert list(rows) == expected
    numeric = ("parameters", "disk_mb", "weights_mb", "perplexity", "perplexity_change_pct", "hellaswag_acc_norm",
               "decode_tokens_per_s", "first_token_ms")
    assert all(math.isfinite(float(row[key])) for row in rows.values() for key in numeric)
    assert float(rows["base"]["perplexity_change_pct"]) == 0
    assert rows["base-int8"]["parameters"] == rows["base-bf16"]["parameters"] == rows["base"]["parameters"]
    assert float(rows["base-bf16"]["weights_mb"]) == pytest.approx(float(rows["base"]["weights_mb"]) / 2, rel=0.01)
    assert float(rows["base-nf4"]["weights_mb"]) < float(rows["base-bf16"]["weights_mb"])
    assert int(rows["pruned"]["parameters"]) < int(rows["base"]["parameters"])
    assert rows["pruned"]["kind"] == "head-pruned (5/8 heads)" and rows["lora"]["kind"].startswith("LoRA merged")
    assert float(rows["lora"]["perplexity"]) != float(rows["base"]["perplexity"])  # the adapters were merged in
    assert 0 <= float(rows["early-exit"]["exit_rate"]) <= 1 and rows["early-exit"]["kind"].startswith("early exit")
    markdown = (out / "comparison.md").read_text()
    assert all(f"| {name} |" in markdown for name in expected)
    client, run = mlflow_run(mlflow_server, "compare", "compare-test")
    assert {f"{name}/perplexity" for name in expected} <= set(run.data.metrics)
    assert {"comparison.csv", "comparison.md"} <= artifact_names(client, run)


def test_comparison_rejects_bad_options(data, tmp_path, capsys, monkeypatch):
    job = load_job("compare")
    base = ["--shards", str(data / "shards"), "--no-mlflow", "--output", str(tmp_path / "out"), "--eval-tokens", "100"]
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapter_config.json").write_text(
        '{"lora": {"rank": 2}, "base_config": {"n_layer": 2, "n_head": 4, "n_embd": 64}}'
    )
    cases = [
        (["--model", f"a={data / 'tiny'}", "--model", f"a={data / 'tiny'}"], "names must be distinct"),
        (["--model", f"bad name={data / 'tiny'}"], "give it a name"),
        (["--model", f"gone={tmp_path / 'missing'}"], "does not exist"),
        (["--model", f"x={data / 'tiny'}", "--model", f"lora={tmp_path / 'adapters'}", "--no-quantize"],
         "records no base_model"),
    ]
    for extra, message in cases:
        assert message in error_of(job, base + extra, capsys), extra
    # Where NF4 cannot run (no bitsandbytes, or an MPS device) asking for it is an error, not a silent omission.
    monkeypatch.setattr(job, "nf4_runs_on", lambda device: False)
    assert "needs bitsandbytes" in error_of(job, [*base, "--model", str(data / "tiny"), "--quantize", "nf4"], capsys)


# ------------------------------------------------------------------------------------------------ compare_norms


def norms_overrides(data: Path, root: Path, *extra: str) -> list[str]:
    return [f"data.shards={data / 'shards'}", "model.preset=tiny", "model.block_size=64",
            "train.total_batch_tokens=128", "train.micro_batch=2", "train.seq_len=32", "train.max_steps=4",
            "train.warmup_steps=1", "train.autocast=fp32", "eval.val_every=2", "eval.val_batches=2", f"run.root={root}",
            *extra]


def test_pre_ln_and_post_ln_train_on_the_same_data_and_seed(data, mlflow_server, tmp_path):
    job = load_job("compare_norms")
    argv = ["--config", str(ROOT / "configs" / "norms-local.yaml"),
            *norms_overrides(data, tmp_path, f"run.tracking_uri={mlflow_server}", "run.name=norms-test")]
    assert job.main(argv) == 0

    run_dir = tmp_path / "norm-comparison" / "norms-test"
    assert (run_dir / "norms.png").stat().st_size > 0
    history = read_csv(run_dir / "history.csv")
    for norm in ("pre", "post"):
        trained = [r for r in history if r["norm"] == norm and r["loss"]]
        assert [int(r["step"]) for r in trained] == [0, 1, 2, 3]
        assert all(math.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in trained)
        assert [int(r["step"]) for r in history if r["norm"] == norm and r["val_loss"]] == [0, 2, 4]
    assert "Post-LN" in (run_dir / "summary.md").read_text()

    # Everything a run depends on comes from the seed: the same variant trained again repeats its losses exactly,
    # so the two variants differ only by where their LayerNorms sit.
    from cluster.config import load
    from cluster.config.pretrain import PretrainConfig

    cfg = load(PretrainConfig, ROOT / "configs" / "norms-local.yaml", norms_overrides(data, tmp_path))
    again = [r["loss"] for r in job.train_one(cfg, "post", CPU, lambda record: None) if "loss" in r]
    assert again == [float(r["loss"]) for r in history if r["norm"] == "post" and r["loss"]]

    client, run = mlflow_run(mlflow_server, "norm-comparison", "norms-test")
    for key in ("pre/loss", "post/loss", "pre/grad_norm", "post/grad_norm"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2, 3]
    assert {"norms.png", "history.csv", "summary.md"} <= artifact_names(client, run)


def test_norm_comparison_rejects_bad_configs(data, tmp_path, capsys):
    job = load_job("compare_norms")
    config = ["--config", str(ROOT / "configs" / "norms-local.yaml")]
    cases = [
        (["train.learning_rate=1"], "unknown config key(s) ['train.learning_rate']"),
        (["train.seq_len=100"], "exceeds the model's block_size=64"),
        ([f"data.shards={tmp_path}"], "no manifest.json"),
    ]
    for extra, message in cases:
        assert message in error_of(job, config + norms_overrides(data, tmp_path, *extra), capsys), extra


# ------------------------------------------------------------------------------------------------------ distill


def distill_overrides(data: Path, root: Path, *extra: str) -> list[str]:
    return [f"teacher.source={data / 'tiny'}", f"data.shards={data / 'shards'}", "student.preset=tiny",
            "student.n_layer=1", "train.total_batch_tokens=128", "train.micro_batch=2", "train.seq_len=32",
            "train.max_steps=6", "train.warmup_steps=1", "train.autocast=fp32", "eval.val_every=3",
            "eval.val_batches=2", "eval.report_tokens=300", "eval.decode_tokens=8", f"run.root={root}", *extra]


@pytest.fixture(scope="module")
def in_process_distillation(data, mlflow_server, tmp_path_factory) -> tuple[int, Path]:
    """`jobs/distill.py --in-process` (one worker in this process, accumulating micro-batches to the configured batch)
    as a user runs it: (its exit code, its run directory). Its losses are also what the Ray Train run must match."""
    root = tmp_path_factory.mktemp("distill-in-process")
    argv = ["--config", str(ROOT / "configs" / "distill-local.yaml"), "--in-process", "--device", "cpu",
            *distill_overrides(data, root, f"run.tracking_uri={mlflow_server}", "run.name=distill-test")]
    return load_job("distill").main(argv), root / "distill" / "distill-test"


def test_distillation_in_process(in_process_distillation, mlflow_server):
    code, run_dir = in_process_distillation
    assert code == 0
    student = GPT.from_pretrained(str(run_dir / "final"))
    assert student.config.n_layer == 1
    assert len(student.generate([[464]], 4, temperature=0, stop_at_eot=False)[0]) == 4
    rows = {r["variant"]: r for r in read_csv(run_dir / "comparison.csv")}
    assert list(rows) == ["teacher", "student"]
    assert int(rows["student"]["parameters"]) < int(rows["teacher"]["parameters"])
    assert all(math.isfinite(float(r[key])) for r in rows.values()
               for key in ("perplexity", "disk_mb", "weights_mb", "decode_tokens_per_s", "first_token_ms"))

    client, run = mlflow_run(mlflow_server, "distill", "distill-test")
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(6))
    assert losses[-1].value < losses[0].value
    assert {"val_loss", "teacher_val_loss", "student/perplexity", "teacher/perplexity", "speedup"} <= set(run.data.metrics)
    assert {"loss.png", "comparison.md", "README.md"} <= artifact_names(client, run)
    assert client.search_model_versions("name='gpt2-distill-test-distilled'")


def test_distillation_rejects_bad_configs(data, tmp_path, capsys):
    job = load_job("distill")
    config = ["--config", str(ROOT / "configs" / "distill-local.yaml"), "--in-process"]
    cases = [
        (["distill.alpha=1.5"], "distill.alpha must be in [0, 1]"),
        (["distill.temperature=0"], "distill.temperature must be > 0"),
        (["distill.temp=2"], "unknown config key(s) ['distill.temp']"),
        ([f"teacher.source={tmp_path / 'missing'}"], "does not exist"),
        (["train.seq_len=100", "train.total_batch_tokens=200"], "exceeds the teacher's block_size=64"),
        (["train.total_batch_tokens=100"], "not divisible"),
    ]
    for extra, message in cases:
        assert message in error_of(job, config + distill_overrides(data, tmp_path, *extra), capsys), extra


# RAY: this test starts Ray (the ray_session fixture) and runs Ray Train with two workers.
@pytest.mark.slow
def test_distill_on_ray_train_matches_the_in_process_loop(ray_session, data, mlflow_server, in_process_distillation,
                                                         tmp_path):
    """Two DDP workers on Ray Train take the same steps as one worker in this process accumulating two micro-batches:
    the same windows per step, and DDP's gradient mean equals the accumulated mean. The in-process side is the run
    of test_distillation_in_process (the same settings: --in-process runs one worker, no intermediate checkpoints)."""
    from cluster.config import load
    from cluster.config.distill import DistillConfig
    from cluster.train.distill import compare_with_teacher, run_distillation

    def config(name: str, workers: int) -> DistillConfig:
        return load(DistillConfig, ROOT / "configs" / "distill-local.yaml", distill_overrides(
            data, tmp_path, f"run.name={name}", f"run.tracking_uri={mlflow_server}", f"scaling.num_workers={workers}",
            "scaling.threads_per_worker=1", "checkpoint.every=3"))

    on_ray = config("distill-ray", 2)
    result = run_distillation(on_ray, mlflow_server)
    assert result.error is None and result.checkpoint is not None
    code, in_process_dir = in_process_distillation
    assert code == 0

    from cluster.runtime.tracking import read_metrics

    ray_losses = [r["loss"] for r in read_metrics(on_ray.run_dir()) if "loss" in r]
    local_losses = [r["loss"] for r in read_metrics(in_process_dir) if "loss" in r]
    assert len(ray_losses) == 6 and ray_losses == pytest.approx(local_losses, rel=1e-4)
    teacher, student = compare_with_teacher(on_ray, CPU, mlflow_server)
    assert math.isfinite(student.perplexity) and student.parameters < teacher.parameters
    client, run = mlflow_run(mlflow_server, "distill", "distill-ray")
    assert run.data.tags["kind"] == "distill" and "student/perplexity" in run.data.metrics
    assert client.search_model_versions("name='gpt2-distill-ray-distilled'")
