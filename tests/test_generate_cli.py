"""jobs/generate.py end to end, as a user runs it: a subprocess on a tiny checkpoint, a Hugging Face directory and
an MLflow model URI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2 import GPT, get_tokenizer, preset
from tests.job_loader import ROOT, load_job

PROMPT = "The lighthouse keeper"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("generate") / "tiny"
    GPT(preset("tiny")).save_pretrained(path)
    return path


def generate(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), "--device", "cpu", *args],
        input=stdin, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300,
    )


def samples(stdout: str) -> list[str]:
    """The sample texts printed after their '--- sample N' lines."""
    blocks = stdout.split("--- sample ")[1:]
    return [block.split("\n", 1)[1].removesuffix("\n") for block in blocks]


def library_samples(checkpoint, n: int, max_tokens: int, **sampling) -> list[str]:
    enc = get_tokenizer()
    rows = GPT.from_pretrained(checkpoint).generate([enc.encode_ordinary(PROMPT)] * n, max_tokens, **sampling)
    return [PROMPT + enc.decode(tokens) for tokens in rows]


def test_seeded_samples_are_reproducible_and_match_the_library(checkpoint):
    # fp32 as the library call below (auto would pick bf16 on a CPU that computes it natively)
    args = ("--model", str(checkpoint), "--prompt", PROMPT, "--max-tokens", "12", "--num-samples", "2",
            "--temperature", "0.9", "--top-k", "50", "--seed", "7", "--dtype", "float32")
    batched = generate(*args)
    assert batched.returncode == 0, batched.stderr
    assert "device cpu" in batched.stderr and "dtype float32" in batched.stderr  # the choice is printed
    expected = library_samples(checkpoint, 2, 12, temperature=0.9, top_k=50, seed=7)
    assert samples(batched.stdout) == expected
    assert expected != library_samples(checkpoint, 2, 12, temperature=0.9, top_k=50, seed=8)
    # A second process, streaming: sample i uses seed + i, which is what row i of the batch used.
    streamed = generate(*args, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert samples(streamed.stdout) == expected


def test_prompts_from_stdin(checkpoint):
    done = generate("--model", str(checkpoint), "--prompts-file", "-", "--max-tokens", "4", "--temperature", "0",
                    stdin="First prompt\n\nSecond prompt\n")
    assert done.returncode == 0, done.stderr
    texts = samples(done.stdout)
    assert len(texts) == 2 and texts[0].startswith("First prompt") and texts[1].startswith("Second prompt")


def test_hugging_face_directory_and_mlflow_uri_give_the_checkpoints_text(checkpoint, tmp_path, mlflow_server):
    import mlflow
    from transformers import GPT2LMHeadModel

    from cluster.runtime.mlflow_model import log_checkpoint_model

    greedy = ("--prompt", PROMPT, "--max-tokens", "10", "--temperature", "0")
    expected = library_samples(checkpoint, 1, 10, temperature=0)

    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel.from_pretrained(checkpoint).save_pretrained(hf_dir)
    from_hf = generate("--model", str(hf_dir), *greedy)
    assert from_hf.returncode == 0, from_hf.stderr
    assert samples(from_hf.stdout) == expected

    client = mlflow.MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("generate-cli-test"))
    uri = log_checkpoint_model(mlflow_server, run.info.run_id, checkpoint, "generate-cli-tiny", kind="pretrained")
    from_mlflow = generate("--model", uri, *greedy, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert from_mlflow.returncode == 0, from_mlflow.stderr
    assert samples(from_mlflow.stdout) == expected


def test_a_missing_model_is_named(tmp_path):
    done = generate("--model", str(tmp_path / "nope"), "--prompt", "x")
    assert done.returncode != 0
    assert f"error: model directory {tmp_path / 'nope'} does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "tiny"], "no prompt: give --prompt TEXT or --prompts-file FILE"),
        (["--preset", "tiny", "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["--preset", "tiny", "--prompt", "x", "--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--preset", "tiny", "--prompt", "x", "--max-tokens", "-1"], "--max-tokens must be >= 1, got -1"),
        (["--preset", "tiny", "--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0 (0 = off), got -1"),
        (["--preset", "huge", "--prompt", "x"], "argument --preset: invalid choice: 'huge'"),
        (["--preset", "tiny", "--prompts-file", "/no/such/prompts.txt"], "--prompts-file /no/such/prompts.txt"),
        (["--prompt", "x"], "one of the arguments --model --preset is required"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_job("generate").parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runtime_problems_exit_with_a_message():
    job = load_job("generate")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: --device cuda: CUDA is not available"):
            job.main(["--preset", "tiny", "--prompt", "x", "--device", "cuda"])
    with pytest.raises(SystemExit, match="error: .*exceeds the model's context of 128"):
        job.main(["--preset", "tiny", "--prompt", "word " * 100, "--max-tokens", "50", "--device", "cpu"])


def early_exit_copy(checkpoint, directory, threshold: float):
    """A copy of the checkpoint with an (untrained) exit classifier after block 1."""
    import shutil

    from gpt2.early_exit import EarlyExitGPT, save_early_exit

    shutil.copytree(checkpoint, directory)
    torch.manual_seed(0)
    save_early_exit(EarlyExitGPT(GPT.from_pretrained(directory), exit_layer=1, threshold=threshold), directory)
    return directory


def test_early_exit_model_prints_its_exit_rate(checkpoint, tmp_path):
    never = early_exit_copy(checkpoint, tmp_path / "never", threshold=2.0)  # scores are <= 1: never exits
    always = early_exit_copy(checkpoint, tmp_path / "always", threshold=0.0)
    args = ("--prompt", PROMPT, "--max-tokens", "10", "--temperature", "0")
    out = generate("--model", str(never), *args)
    assert out.returncode == 0, out.stderr
    assert samples(out.stdout) == library_samples(checkpoint, 1, 10, temperature=0)  # identical to the base model
    assert "exit rate 0.0%" in out.stderr
    out = generate("--model", str(always), *args)
    assert out.returncode == 0, out.stderr
    assert "early exit after block 1" in out.stderr and "exit rate 100.0%" in out.stderr
