"""The early-exit jobs: training the exit classifier (its worker body in this process, and the Ray Train job),
calibration outputs, the saved variant, MLflow; the profile job; bad options.

Only test_ray_train_job_two_workers_registers_an_early_exit_variant starts Ray."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.config import load
from cluster.config.early_exit import EarlyExitConfig
from cluster.runtime.models import load_model
from cluster.train.early_exit import choose_tau, train_and_calibrate
from gpt2 import GPT, GPTConfig, preset
from gpt2.early_exit import EarlyExitGPT, ExitClassifier, load_early_exit, save_early_exit
from gpt2.generate import generate
from gpt2.shards import write_shard
from tests.job_loader import load_job
from tests.pretrain_fixtures import write_python_docs_shards
from tests.test_hellaswag import EXAMPLES, write_jsonl

V, T = 64, 16  # the learnable stream's vocabulary and row length
EPOCHS = 15


def _pair_tokens(n_pairs: int, generator: torch.Generator, successor: torch.Tensor) -> torch.Tensor:
    """Pairs of a random token in [0, 32) and its fixed successor in [32, 64): after a low token the next one is
    certain, after a high one it is uniform, so any prediction there is a guess."""
    low = torch.randint(0, V // 2, (n_pairs,), generator=generator)
    return torch.stack([low, successor[low]], dim=-1).flatten()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    """Shards of the pair stream and a small model briefly trained on it whose deeper blocks are then perturbed (as
    in tests/test_early_exit.py): where the model is sure the exit and full predictions still agree, where it guesses
    they mostly do not, so the labels are mixed and learnable from the exit head's confidence."""
    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(V // 2, generator=g) + V // 2
    shards = root / "shards"
    shards.mkdir()
    written = [
        write_shard(shards / "pairs_val_000000.bin", _pair_tokens(2_000, g, successor).numpy(), "val"),
        write_shard(shards / "pairs_train_000000.bin", _pair_tokens(10_000, g, successor).numpy(), "train"),
    ]
    (shards / "manifest.json").write_text(json.dumps({"shards": [dataclasses.asdict(s) for s in written]}))
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=4, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-2)
    for _ in range(40):
        rows = _pair_tokens(16 * 9, g, successor).view(16, 18)[:, : T + 1]
        _, loss = base(rows[:, :-1], rows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for block in base.transformer.h[2:]:
            block.mlp.c_proj.weight.add_(0.5 * torch.randn_like(block.mlp.c_proj.weight))
    base.save_pretrained(str(root / "base"))
    return root


def config(data: Path, run_root: Path, *overrides: str) -> EarlyExitConfig:
    return load(EarlyExitConfig, None, [
        f"model.source={data / 'base'}", "model.exit_layer=2", f"data.shards={data / 'shards'}", f"data.seq_len={T}",
        "data.micro_batch=16", "data.train_batches=8", "data.val_batches=8", "classifier.hidden_dim=32",
        "calibration.taus=[0.3, 0.5, 0.7, 0.9, 0.95, 0.99]",
        f"classifier.epochs={EPOCHS}", "classifier.batch_size=64", "classifier.lr=3e-3", f"run.root={run_root}",
        *overrides,
    ])


def test_training_body_saves_a_calibrated_early_exit_model(pair_data, mlflow_server, tmp_path):
    cfg = config(pair_data, tmp_path, f"run.tracking_uri={mlflow_server}", "run.name=body", "run.register_model=false")
    cfg.validate()
    summary = train_and_calibrate(cfg, pair_data / "base")

    # The classifier learned: at most half the majority-class guess's mistakes on the held-out split.
    baseline, accuracy = summary["majority_baseline"], summary["classifier_val_accuracy"]
    assert baseline < 0.85, f"labels should be mixed for this test to mean anything (baseline {baseline})"
    assert 1 - accuracy < (1 - baseline) / 2, summary

    with open(summary["calibration_csv"]) as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    assert [r["tau"] for r in rows] == list(cfg.calibration.taus)
    assert [r["tau"] for r in rows if r["chosen"]] == [summary["tau"]]
    rates = [r["exit_rate"] for r in rows]
    assert rates == sorted(rates, reverse=True) and 0 < rates[0] < 1
    good = [r for r in rows if r["agreement"] >= 0.97]
    assert good and summary["target_reached"] == 1.0
    assert summary["tau"] == max(good, key=lambda r: r["exit_rate"])["tau"]
    assert Path(summary["calibration_png"]).read_bytes().startswith(b"\x89PNG")

    # The saved directory is an early-exit variant of the unchanged base, at the chosen tau.
    model = load_early_exit(summary["model_dir"])
    assert (model.exit_layer, model.threshold) == (2, summary["tau"])
    base = GPT.from_pretrained(str(pair_data / "base"))
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base.state_dict().items())
    assert isinstance(load_model(summary["model_dir"]), EarlyExitGPT)  # as the server loads a variant
    new_tokens = generate(model, [[3, 40, 7], [5]], 6, temperature=0, stop_at_eot=False)
    assert [len(t) for t in new_tokens] == [6, 6] and model.stats.tokens > 0

    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    for key in ("classifier_loss", "classifier_accuracy", "classifier_val_accuracy", "precision_at_tau", "tau",
                "exit_rate", "agreement", "perplexity", "perplexity_full", "majority_baseline"):
        assert key in run.data.metrics, key
    assert run.data.metrics["precision_at_tau"] == pytest.approx(summary["precision_at_tau"])
    assert len(client.get_metric_history(run.info.run_id, "classifier_loss")) == EPOCHS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"calibration.csv", "calibration.png", "early_exit.json"} <= artifacts
    assert run.data.tags["target_reached"] == "true"


def test_unreachable_target_saves_the_most_accurate_tau_and_says_so(pair_data, mlflow_server, tmp_path, capfd):
    cfg = config(pair_data, tmp_path, "calibration.taus=[0.2, 0.5]", "calibration.target_agreement=1.0",
                 "classifier.epochs=3", f"run.tracking_uri={mlflow_server}", "run.name=unreachable",
                 "run.register_model=false")
    summary = train_and_calibrate(cfg, pair_data / "base")
    assert summary["target_reached"] == 0.0 and summary["agreement"] < 1.0
    assert "WARNING: no swept tau reaches next-token agreement 1.000" in capfd.readouterr().err
    assert load_early_exit(summary["model_dir"]).threshold == summary["tau"]
    assert MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).data.tags["target_reached"] == "false"

    rows = [{"tau": 0.5, "exit_rate": 0.6, "agreement": 0.9}, {"tau": 0.8, "exit_rate": 0.4, "agreement": 0.95},
            {"tau": 0.9, "exit_rate": 0.3, "agreement": 0.95}]
    assert choose_tau(rows, 0.97) == (0.8, False)  # the most accurate; of equals, the one that exits more
    assert choose_tau(rows, 0.95) == (0.8, True)
    assert choose_tau(rows, 0.5) == (0.5, True)


def test_bad_options_fail_before_any_worker_starts(pair_data, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"model.exit_layer: exit_layer=4 is out of range.*\[1, 3\]"):
        config(pair_data, tmp_path, "model.exit_layer=4").validate()
    with pytest.raises(ValueError, match=r"data.shards=.*missing: no manifest.json there"):
        config(pair_data, tmp_path, f"data.shards={tmp_path / 'missing'}").validate()
    with pytest.raises(ValueError, match="data.seq_len=64 exceeds the model's block_size=32"):
        config(pair_data, tmp_path, "data.seq_len=64").validate()
    with pytest.raises(ValueError, match="model.source: .*nowhere does not exist"):
        config(pair_data, tmp_path, f"model.source={tmp_path / 'nowhere'}").validate()
    with pytest.raises(ValueError, match="calibration.target_agreement must be in"):
        config(pair_data, tmp_path, "calibration.target_agreement=97").validate()
    with pytest.raises(ValueError, match=r"fewer than one step needs \(B×world_size = 1600\)"):
        config(pair_data, tmp_path, "data.micro_batch=800", "scaling.num_workers=2").validate()

    job = load_job("train_early_exit")  # the job validates before it connects to Ray or starts a worker
    with pytest.raises(SystemExit, match="error: model.exit_layer: exit_layer=0 is out of range"):
        job.main([f"model.source={pair_data / 'base'}", "model.exit_layer=0", f"data.shards={pair_data / 'shards'}",
                  f"data.seq_len={T}"])
    with pytest.raises(SystemExit, match=r"unknown config key\(s\) \['classifier.epoch'\]"):
        job.main(["classifier.epoch=3"])


@pytest.mark.slow
def test_ray_train_job_two_workers_registers_an_early_exit_variant(
    ray_session, mlflow_server, pair_data, tmp_path, monkeypatch
):
    """Needs Ray: the job as it runs on a cluster, two workers each extracting features from their own training
    windows and training the classifier under DDP; the model is registered and loads back from MLflow as early exit."""
    from cluster.train.early_exit import run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for resolving models:/ in this process
    cfg = config(pair_data, tmp_path, "scaling.num_workers=2", "scaling.threads_per_worker=1", "run.name=on-ray",
                 f"run.tracking_uri={mlflow_server}")
    summary = run(cfg)
    assert summary["train_positions"] == 8 * 16 * T  # rank 0's share; the other worker had as many
    assert 1 - summary["classifier_val_accuracy"] < (1 - summary["majority_baseline"]) / 2, summary
    assert summary["model_uri"] == "models:/gpt2-on-ray-early-exit/1"
    registered = load_model(summary["model_uri"])
    assert isinstance(registered, EarlyExitGPT) and registered.threshold == summary["tau"]
    run_data = MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).data
    assert {"classifier_loss", "classifier_accuracy", "precision_at_tau", "exit_rate"} <= set(run_data.metrics)
    assert run_data.tags["kind"] == "early-exit" and run_data.tags["hardware"].startswith("2x CPU")


# ------------------------------------------------------------------------------------------------ the profile job


@pytest.fixture(scope="module")
def profile_inputs(tmp_path_factory):
    """A tiny early-exit model (GPT-2 vocabulary, so HellaSwag text can be scored), python-docs shards and a
    two-example HellaSwag file."""
    root = tmp_path_factory.mktemp("profile")
    torch.manual_seed(0)
    base = GPT(preset("tiny"))
    model_dir = root / "ee-run" / "model"
    base.save_pretrained(str(model_dir))
    save_early_exit(EarlyExitGPT(base, 1, threshold=0.5, classifier=ExitClassifier(64, 16)), model_dir)
    write_jsonl(root / "hellaswag.jsonl", EXAMPLES[:2])
    return model_dir, write_python_docs_shards(root / "shards", n_docs=30, val_tokens=2_000), root / "hellaswag.jsonl"


def test_profile_job_writes_layers_and_a_summary_of_both_models(profile_inputs, mlflow_server, tmp_path, capsys):
    model_dir, shards, hellaswag = profile_inputs
    out = tmp_path / "profile"
    load_job("profile_early_exit").main([
        "--model", str(model_dir), "--shards", str(shards), "--hellaswag", str(hellaswag), "--prompt-len", "8",
        "--decode-steps", "4", "--repeats", "2", "--decodes", "2", "--new-tokens", "6", "--seq-len", "32",
        "--val-batches", "2", "--val-batch-size", "2", "--device", "cpu", "--dtype", "float32",
        "--tracking-uri", mlflow_server, "--run-name", "profile-test", "--output", str(out),
    ])
    printed = capsys.readouterr().out
    assert "device cpu" in printed and "decode speedup of early-exit over standard" in printed

    with open(out / "summary.csv") as f:
        summary = {row["model"]: row for row in csv.DictReader(f)}
    assert list(summary) == ["standard", "early-exit"]
    for name, row in summary.items():
        assert float(row["tokens_per_s"]) > 0 and 0 < float(row["latency_p50_ms"]) <= float(row["latency_p95_ms"])
        assert 0 <= float(row["exit_rate"]) <= 1 and float(row["perplexity"]) > 1
        assert 0 <= float(row["hellaswag/completion/acc_norm"]) <= 1 and row["hellaswag/examples"] == "2"
        assert name in printed
    assert summary["standard"]["agreement"] == "1.0" and summary["standard"]["decode_exit_rate"] == ""
    assert 0 <= float(summary["early-exit"]["decode_exit_rate"]) <= 1

    components = ["embedding", "block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp", "ln_f+head"]
    exit_components = ["embedding", "block.0.attn", "block.0.mlp", "exit.classifier", "block.1.attn", "block.1.mlp",
                       "exit.kv_projection", "ln_f+head"]
    base_bytes = sum(p.numel() * 4 for p in GPT.from_pretrained(str(model_dir)).parameters())
    classifier_bytes = sum(p.numel() * 4 for p in ExitClassifier(64, 16).parameters())
    model_bytes = {"standard": base_bytes, "early-exit": base_bytes + classifier_bytes}
    for name, expected in (("standard", components), ("early-exit", exit_components)):
        with open(out / f"layers_{name}.csv") as f:
            rows = list(csv.DictReader(f))
        for phase in ("prefill", "decode"):
            mine = [r for r in rows if r["phase"] == phase]
            assert [r["component"] for r in mine] == expected
            seconds = sum(float(r["seconds"]) for r in mine)
            forward = float(summary[name][f"{phase}_ms"]) / 1000  # measured around the whole forward
            assert 0.5 * forward < seconds <= forward, (name, phase, seconds, forward)
            assert sum(float(r["fraction"]) for r in mine) == pytest.approx(1.0)
            assert int(mine[0]["calls"]) == (2 if phase == "prefill" else 8)  # the embedding runs in every forward
            assert sum(int(r["param_bytes"]) for r in mine) == model_bytes[name]
    assert (out / "layers.png").read_bytes().startswith(b"\x89PNG")

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("profile").experiment_id],
                                "attributes.run_name = 'profile-test'")
    assert {"speedup", "standard/tokens_per_s", "early-exit/latency_p95_ms", "early-exit/agreement",
            "early-exit/hellaswag/completion/acc_norm"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.csv", "layers.png", "layers_standard.csv"} <= artifacts


def test_profile_job_errors_name_the_bad_input(profile_inputs, tmp_path, capsys):
    model_dir, shards, _ = profile_inputs
    job = load_job("profile_early_exit")
    plain = tmp_path / "plain"
    GPT(preset("tiny")).save_pretrained(str(plain))
    with pytest.raises(SystemExit, match="plain: no early_exit.json; train an exit classifier"):
        job.main(["--model", str(plain), "--shards", str(shards), "--no-mlflow"])
    with pytest.raises(SystemExit, match="exceeds the context of 128"):
        job.main(["--model", str(model_dir), "--shards", str(shards), "--prompt-len", "100", "--new-tokens", "40",
                  "--no-mlflow", "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        job.main(["--model", str(model_dir), "--shards", str(tmp_path / "none")])
    assert "no manifest.json there" in capsys.readouterr().err
    malformed = tmp_path / "hellaswag.jsonl"
    malformed.write_text('{"ctx": "no other field"}\n')
    output = tmp_path / "profile-out"
    with pytest.raises(SystemExit, match=f"{malformed}:1: missing field"):  # named before any profiling
        job.main(["--model", str(model_dir), "--shards", str(shards), "--hellaswag", str(malformed), "--no-mlflow",
                  "--output", str(output)])
    assert not output.exists()
