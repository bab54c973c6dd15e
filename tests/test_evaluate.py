"""Sliding-window perplexity, the Ray Data path against a single process, and jobs/evaluate.py end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cluster.eval.evaluation import ActorPool, EvalSettings, compute_metrics, evaluate
from gpt2.hellaswag import load_hellaswag
from gpt2.perplexity import evaluate_perplexity, plan_windows, text_tokens
from tests.doc_commands import script_help
from tests.test_hellaswag import EXAMPLES, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the great "
    "lens and wrote the weather in a leather book. Ships passing the rocks at night saw the beam sweep across the "
    "water every ten seconds, and the sailors knew where they were. In winter the storms were so strong that spray "
    "reached the lantern room, and the keeper listened to the glass hum in the wind until morning came."
)


@contextmanager
def torch_threads(n: int):
    """Float summation order inside a matmul depends on the thread count; actors use one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def brute_force_nll(model, tokens: list[int], context_length: int, stride: int) -> float:
    """Each target t alone, with the context the window plan promises: from the start of the first window that
    reaches t, i.e. window k = max(0, ceil((t - L) / S)) starting at k * S."""
    total = 0.0
    for t in range(1, len(tokens)):
        begin = max(0, math.ceil((t - context_length) / stride)) * stride
        x = torch.tensor(tokens[begin:t])[None]
        with torch.no_grad():
            logits = model(x)[0][0, -1].double()
        total -= torch.log_softmax(logits, dim=-1)[tokens[t]].item()
    return total


@pytest.mark.parametrize(
    "num_tokens, context_length, stride", [(2, 8, 4), (50, 8, 8), (50, 8, 3), (50, 8, 1), (9, 8, 5)]
)
def test_windows_score_every_token_exactly_once(num_tokens, context_length, stride):
    windows = plan_windows(num_tokens, context_length, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end + 1)]
    assert scored == list(range(1, num_tokens))
    for w in windows:
        assert w.end - w.begin <= context_length and w.begin <= w.first_scored - 1
        if w.first_scored > context_length:  # after the first window: at least L - S tokens of context
            assert w.first_scored - w.begin >= context_length - stride + 1


def test_perplexity_within_one_window_is_the_models_own_loss(tiny_model):
    tokens = text_tokens("A short sentence that fits in one window.")
    result = evaluate_perplexity(tiny_model, tokens)
    x, y = torch.tensor(tokens[:-1])[None], torch.tensor(tokens[1:])[None]
    with torch.no_grad():
        _, loss = tiny_model(x, y)
    assert result.n_tokens == len(tokens) - 1 and result.n_windows == 1
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-4)


@pytest.mark.parametrize("stride", [16, 5])
def test_sliding_window_equals_per_token_brute_force(tiny_model, stride):
    tokens = text_tokens(TEXT)[:40]
    result = evaluate_perplexity(tiny_model, tokens, context_length=16, stride=stride, batch_size=3)
    assert result.n_tokens == 39
    assert result.nll_sum == pytest.approx(brute_force_nll(tiny_model, tokens, 16, stride), rel=1e-5)


def test_text_tokens_prefix_end_of_text_and_count_every_text_token():
    tokens = text_tokens("Hello world <|endoftext|>")
    assert tokens[:3] == [50256, 15496, 995]
    assert 50256 not in tokens[1:]  # special-token text in a file is ordinary text


def test_ray_data_pool_equals_single_process(ray_session, tiny_model, tmp_path):
    path = tmp_path / "hellaswag.jsonl"
    write_jsonl(path, EXAMPLES)
    examples = load_hellaswag(path)
    texts = {"lighthouse": text_tokens(TEXT), "short": text_tokens("Rain fell on the harbour all afternoon.")}
    options = dict(hellaswag_batch_size=2, context_length=32, stride=12, window_batch_size=3, progress=False)
    with torch_threads(1):
        local = evaluate(tiny_model, EvalSettings(pool=None, **options), hellaswag=examples, texts=texts)
    distributed = evaluate(tiny_model, EvalSettings(pool=ActorPool(size=2), **options), hellaswag=examples, texts=texts)

    assert distributed == local  # every per-example score and every perplexity sum, bit for bit
    metrics = distributed.metrics()
    assert metrics["hellaswag/examples"] == len(EXAMPLES)
    assert metrics["text/lighthouse/tokens"] == len(texts["lighthouse"]) - 1
    assert set(metrics) == {
        *(f"hellaswag/{m}/{k}" for m in ("completion", "harness") for k in ("acc", "acc_norm")),
        "hellaswag/examples",
        *(f"text/{n}/{k}" for n in texts for k in ("loss", "perplexity", "tokens")),
    }


# ---------------------------------------------------------------------------------------------------- the job


def load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def job_inputs(tmp_path, tiny_model):
    checkpoint = tmp_path / "checkpoint"
    tiny_model.save_pretrained(checkpoint)
    hellaswag = tmp_path / "hellaswag.jsonl"
    write_jsonl(hellaswag, EXAMPLES)
    text = tmp_path / "lighthouse.txt"
    text.write_text(TEXT)
    return checkpoint, hellaswag, text


def test_job_end_to_end_on_ray(ray_session, tiny_model, job_inputs, tmp_path, capsys):
    checkpoint, hellaswag, text = job_inputs
    output = tmp_path / "results.json"
    args = ["--model", str(checkpoint), "--hellaswag", str(hellaswag), "--text", str(text),
            "--context-length", "32", "--actors", "2", "--batch-size", "2", "--output", str(output), "--no-progress",
            "--dtype", "float32"]  # the reference below is fp32; auto would pick bf16 on hardware that is fast at it
    assert load_job().main(args) == 0

    results = json.loads(output.read_text())
    [model] = results["models"]
    assert model["model"] == str(checkpoint)
    expected = compute_metrics(
        tiny_model,
        EvalSettings(context_length=32, pool=None, progress=False),
        hellaswag=load_hellaswag(hellaswag),
        texts={"lighthouse.txt": text_tokens(TEXT)},
    )
    assert model["metrics"].keys() == expected.keys()
    for key, value in expected.items():
        assert model["metrics"][key] == pytest.approx(value, rel=1e-6), key
    assert results["data"]["hellaswag"]["examples"] == len(EXAMPLES)
    assert results["settings"]["pool"]["size"] == 2

    printed = capsys.readouterr().out
    assert re.search(rf"{re.escape(str(checkpoint))}(\s+\d+\.\d\d){{4}}", printed)
    assert re.search(r"GPT-2 124M \(OpenAI weights\)\s+28\.59\s+29\.55\s+28\.92\s+31\.14", printed)
    assert "lighthouse.txt" in printed and str(output) in printed


def test_job_compares_a_checkpoint_with_the_same_weights_saved_by_transformers(job_inputs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    checkpoint, hellaswag, text = job_inputs
    hf_dir = tmp_path / "hf-gpt2"
    transformers.GPT2LMHeadModel.from_pretrained(checkpoint).save_pretrained(hf_dir)
    output = tmp_path / "results.json"
    args = ["--model", str(checkpoint), "--model", str(hf_dir), "--hellaswag", str(hellaswag), "--limit", "3",
            "--text", str(text), "--actors", "0", "--output", str(output), "--no-progress"]
    assert load_job().main(args) == 0

    ours, hugging_face = json.loads(output.read_text())["models"]
    assert hugging_face["model"] == str(hf_dir)
    assert ours["metrics"]["hellaswag/examples"] == 3
    assert hugging_face["metrics"] == pytest.approx(ours["metrics"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "note: 3 HellaSwag examples" in printed and str(hf_dir) in printed


def test_job_names_an_unreachable_mlflow_model_and_conflicting_options(job_inputs, monkeypatch):
    from cluster.runtime.local_services import free_port

    checkpoint, hellaswag, text = job_inputs
    job = load_job()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit, match="cannot fetch model models:/gpt2-small/3 from MLflow"):
        job.main(["--model", "models:/gpt2-small/3", "--hellaswag", str(hellaswag), "--actors", "0", "--no-progress"])
    with pytest.raises(SystemExit):
        job.parse_args(["--model", str(checkpoint), "--no-hellaswag"])


def context_of(checkpoint) -> int:
    return json.loads((checkpoint / "config.json").read_text())["n_positions"]


def test_job_names_a_missing_or_malformed_data_file_before_scoring(job_inputs, tmp_path, monkeypatch):
    """Bad data ends the job with one line that names the file (and the line), never a traceback, before any model
    is loaded; so does a HellaSwag download that cannot reach its server."""
    import functools

    from cluster.runtime.local_services import free_port
    from gpt2.hellaswag import download_hellaswag

    checkpoint, hellaswag, text = job_inputs
    job = load_job()
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(hellaswag.read_text() + '{"ctx": "no other field"}\n')
    undecodable = tmp_path / "latin1.txt"
    undecodable.write_bytes("caf\xe9".encode("latin-1"))
    common = ["--model", str(checkpoint), "--actors", "0", "--no-progress"]
    cases = [
        (["--hellaswag", str(tmp_path / "absent.jsonl")], f"error: HellaSwag: .*No such file.*{tmp_path}/absent.jsonl"),
        (["--hellaswag", str(malformed)], f"error: HellaSwag: {malformed}:{len(EXAMPLES) + 1}: missing field"),
        (["--no-hellaswag", "--text", str(tmp_path / "absent.txt")], f"error: --text {tmp_path}/absent.txt: "),
        (["--no-hellaswag", "--text", str(undecodable)], f"error: --text {undecodable}: 'utf-8' codec"),
    ]
    for options, message in cases:
        with pytest.raises(SystemExit, match=message):
            job.main([*common, *options])
    block = context_of(checkpoint)
    windows = [
        (["--context-length", str(block + 1)], f"context_length {block + 1} exceeds the model's block_size {block}"),
        (["--context-length", "16", "--stride", "32"], "stride must be in \\[1, context_length=16\\]"),
    ]
    for options, message in windows:
        with pytest.raises(SystemExit, match=f"error: --context-length / --stride for {checkpoint}: {message}"):
            job.main([*common, "--no-hellaswag", "--text", str(text), *options])
    unreachable = f"http://127.0.0.1:{free_port()}/hellaswag_val.jsonl"
    monkeypatch.setattr(job, "download_hellaswag", functools.partial(download_hellaswag, url=unreachable, timeout=5))
    with pytest.raises(SystemExit, match=f"error: HellaSwag: cannot download {unreachable}"):
        job.main([*common, "--cache-dir", str(tmp_path / "cache")])


def test_job_help():
    help_text = script_help("jobs/evaluate.py")  # a `--help` subprocess; fails unless it exits 0
    for option in ("--model", "--hellaswag", "--text", "--stride", "--actors", "--output"):
        assert option in help_text


def test_job_scores_shards_and_logs_into_the_training_run(tiny_model, tmp_path, mlflow_server, monkeypatch, capsys):
    """A checkpoint inside a tracked run directory: its evaluation lands in that run; shard val loss is a metric."""
    from mlflow.tracking import MlflowClient

    from cluster.runtime.tracking import RunLogger
    from gpt2.perplexity import evaluate_perplexity
    from gpt2.shards import split_tokens
    from tests.pretrain_fixtures import write_python_docs_shards

    shards = write_python_docs_shards(tmp_path / "shards")
    run_dir = tmp_path / "runs" / "pretrain" / "tiny"
    training = RunLogger(run_dir, experiment="pretrain", run_name="tiny", uri=mlflow_server)
    training.close()
    tiny_model.save_pretrained(run_dir / "final")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    output = tmp_path / "results.json"
    args = ["--model", str(run_dir / "final"), "--no-hellaswag", "--shards", str(shards), "--actors", "0",
            "--dtype", "float32", "--no-progress", "--output", str(output)]  # auto is bf16 on CPUs that have it
    assert load_job().main(args) == 0
    name = f"{shards.name}-val"
    expected = evaluate_perplexity(tiny_model, split_tokens(shards, "val").tolist())
    metrics = json.loads(output.read_text())["models"][0]["metrics"]
    assert metrics[f"text/{name}/loss"] == pytest.approx(expected.loss)
    logged = MlflowClient(mlflow_server).get_run(training.run_id).data.metrics
    assert logged[f"eval/text/{name}/loss"] == pytest.approx(expected.loss)
    assert f"run {training.run_id}" in capsys.readouterr().out
