"""The documentation's commands against the code: every script, module, flag, make target and repository file a
documented command names exists (a renamed flag fails here, not on a user's machine), and the commands that a new
user runs first run as written, as subprocesses, in a fresh directory with no Ray head and no MLflow server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pytest

from tests.doc_commands import ROOT, Command, documented_commands, script_help, script_invocation
from tests.multinode import user_env

COMMANDS = documented_commands()
# Files of this repository that documented commands name (other paths are the user's: runs/..., data/..., DIR).
REPO_PATH = re.compile(r"^(?:configs|serving|workflow|cluster|benchmarks|jobs|docs|tests)/[\w./-]+\.(?:yaml|py|md|json)$")


@lru_cache(maxsize=1)
def _helps() -> dict[str, str]:
    """The --help text of every documented script or module (see script_help), two subprocesses at a time."""
    scripts = sorted({inv[0] for c in COMMANDS if (inv := script_invocation(c))})
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(scripts, pool.map(script_help, scripts)))


def test_the_documents_hold_the_commands_users_copy():
    scripts = {inv[0] for c in COMMANDS if (inv := script_invocation(c))}
    # The reader finds what the README teaches: a regression in the reader would make every check below vacuous.
    assert {"jobs/pretrain.py", "jobs/evaluate.py", "jobs/serve.py", "benchmarks.bench_serve"} <= scripts
    assert any(c.text.startswith("make demo") for c in COMMANDS) and len(COMMANDS) > 40


@pytest.mark.parametrize("command", [c for c in COMMANDS if script_invocation(c)], ids=lambda c: c.where)
def test_documented_script_and_its_flags_exist(command: Command):
    script, args = script_invocation(command)
    path = ROOT / script if script.endswith(".py") else ROOT / (script.replace(".", "/") + ".py")
    assert path.is_file(), f"{command.where}: {script} does not exist"
    help_text = _helps()[script]
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"{command.where}: {script} has no option {flag} (see `{script} --help`)"
            )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_documented_repository_files_and_make_targets_exist(command: Command):
    try:
        words = command.words()
    except ValueError:
        words = command.text.split()
    for word in words:
        for piece in word.split("="):
            if REPO_PATH.match(piece):
                assert (ROOT / piece).exists(), f"{command.where}: {piece} is not in the repository"
    if words[:1] == ["make"]:
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):  # not VAR=x or -j2
            assert target in targets, f"{command.where}: the Makefile has no target {target!r}"


def test_readme_evaluation_command_runs_with_no_ray_head(tiny_model, tmp_path):
    """README's evaluation command, as written but without the hub model (no network here) and with a --limit, in
    a directory holding the files it names. No Ray head is running, so the job starts a local Ray instance for its
    scoring actors and must be able to use it (it once failed: its own Ray refused it for want of a token)."""
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    [command] = [c for c in COMMANDS if c.document == "README.md" and c.text.startswith("python jobs/evaluate.py")
                 and "--hellaswag" in c.text]
    words = command.words()
    at = words.index("gpt2")
    assert words[at - 1] == "--model"
    del words[at - 1 : at + 1]
    work = tmp_path / "user"
    tiny_model.save_pretrained(work / "runs/pretrain/local/final")
    write_jsonl(work / "hellaswag_val.jsonl", EXAMPLES)
    (work / "notes.txt").write_text("The lighthouse keeper wrote down the weather every evening.\n" * 20)
    argv = [sys.executable, str(ROOT / words[1]), *words[2:], "--limit", "4", "--no-progress"]
    out = subprocess.run(argv, cwd=work, env=user_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "notes.txt" in out.stdout and "hellaswag" in out.stdout.lower()


# --- every documented command: run by a test here, marked as not runnable offline in its document, or still owed ---

# The test that runs each command (found by its document and the start of its text). A command is run as written,
# in a user's directory holding the files it names (user_dir), with options appended where the documented run would
# be long (a smaller --max-tokens, --limit, ...): options given later win.
RUN_BY = {
    ("README.md", "python jobs/evaluate.py --model runs/pretrain/local/final --model gpt2"):
        "test_readme_evaluation_command_runs_with_no_ray_head",
    ("README.md", ".venv/bin/python jobs/generate.py --model runs/pretrain/local/final"): "test_quick_commands_run",
    ("README.md", "python jobs/pretrain.py --config configs/local.yaml --print-config"): "test_quick_commands_run",
    ("README.md", "python jobs/analyze_tokenizer.py --source files"): "test_quick_commands_run",
    ("README.md", "python jobs/prepare_data.py --source files"): "test_data_preparation_commands_run",
    ("docs/data.md", ".venv/bin/python jobs/prepare_data.py --source files"): "test_data_preparation_commands_run",
    ("docs/evaluation.md", ".venv/bin/python jobs/evaluate.py --model runs/pretrain/local/checkpoint --hellaswag"):
        "test_quick_commands_run",
    ("docs/gpu.md", ".venv/bin/python benchmarks/gpu_check.py --help"): "test_documented_script_and_its_flags_exist",
    ("cluster/README.md", ".venv/bin/python -m tests.test_cluster_configs"): "test_quick_commands_run",
    ("README.md", "python jobs/analyze_heads.py"): "test_quick_commands_run",
    ("README.md", "python jobs/compare_norms.py"): "test_quick_commands_run",
    ("README.md", "python jobs/export.py"): "test_quick_commands_run",
    ("README.md", "python jobs/evaluate.py --model runs/pretrain/local/final --no-hellaswag"):
        "test_quick_commands_run",
    ("README.md", "python jobs/finetune.py"): "test_finetune_commands_run",
    ("README.md", "python jobs/analyze_tokenizer.py   "): "test_quick_commands_run",
    ("README.md", "python jobs/pretrain.py --config configs/local.yaml   "): "test_pretrain_commands_run",
    ("README.md", "python jobs/pretrain.py --config configs/local.yaml train.max_steps=50"): "test_pretrain_commands_run",
    ("docs/serving.md", ".venv/bin/python jobs/serve.py --only --variant mine=DIR"): "test_the_server_answers_the_documented_curls",
    ("README.md", "python jobs/serve.py   "): "test_the_servers_of_serving_config_yaml_answer",
    ("README.md", "python jobs/prepare_data.py   "): "test_the_built_in_corpus_commands_run",
    ("docs/data.md", ".venv/bin/python jobs/prepare_data.py "): "test_the_built_in_corpus_commands_run",
    ("docs/evaluation.md", ".venv/bin/python jobs/evaluate.py --model runs/pretrain/local/checkpoint --model"):
        "test_the_evaluation_of_a_checkpoint_beside_a_hugging_face_model_runs",
    ("README.md", "python jobs/train_early_exit.py"): "test_early_exit_commands_run",
    ("README.md", "python jobs/profile_early_exit.py"): "test_early_exit_commands_run",
    ("README.md", "python jobs/distill.py"): "test_compression_commands_run",
    ("README.md", "python jobs/compare.py"): "test_compression_commands_run",
    ("docs/serving.md", ".venv/bin/python jobs/serve.py   "): "test_the_servers_of_serving_config_yaml_answer",
    ("docs/serving.md", "curl"): "test_the_server_answers_the_documented_curls",
    ("docs/serving.md", ".venv/bin/python -c"): "test_the_recipe_for_a_checkpoint_both_servers_can_load",
    ("docs/serving.md", "DIR="): "test_the_recipe_for_a_checkpoint_both_servers_can_load",
    ("docs/serving.md", "DATA="): "test_the_recipe_for_a_checkpoint_both_servers_can_load",
    ("docs/serving.md", "cp "): "test_the_recipe_for_a_checkpoint_both_servers_can_load",
    ("docs/serving.md", "cat > "): "test_the_recipe_for_a_checkpoint_both_servers_can_load",
    ("README.md", "python jobs/serve.py --variant"): "test_the_server_takes_a_checkpoint_and_a_registered_model",
    ("README.md", "export MLFLOW_TRACKING_URI"): "test_the_model_registry_block_runs",
    ("README.md", "python - <<'EOF'"): "test_the_model_registry_block_runs",
    ("README.md", "mlflow models serve"): "test_the_model_registry_block_runs",
    ("README.md", "curl -s 127.0.0.1:5001/invocations"): "test_the_model_registry_block_runs",
    ("README.md", "python jobs/generate.py --model models:/"): "test_the_model_registry_block_runs",
    ("README.md", "serve run serving/config.yaml"): "test_serve_run_serves_serving_config_yaml",
    ("docs/serving.md", ".venv/bin/serve run"): "test_serve_run_serves_serving_config_yaml",
    ("README.md", "python jobs/pipeline.py"): "test_the_pipeline_commands_run",
}
# Runnable offline, not run by a test yet: each one that gets a test moves to RUN_BY.
NOT_YET_RUN: list[tuple[str, str]] = []


def _entry_for(command: Command) -> tuple[str, str] | None:
    """The RUN_BY or NOT_YET_RUN entry for a command: the one with the longest matching start."""
    matches = [(doc, start) for doc, start in [*RUN_BY, *NOT_YET_RUN]
               if doc == command.document and (command.text + " ").startswith(start)]
    return max(matches, key=lambda m: len(m[1]), default=None)


def test_every_documented_command_is_run_or_marked_as_not_runnable_offline():
    unaccounted = [c.where + ": " + c.text[:80] for c in COMMANDS if not c.not_run and _entry_for(c) is None]
    assert not unaccounted, ("documented commands that no test runs and that are not marked `<!-- not run by the"
                             " tests: REASON -->` in their document:\n" + "\n".join(unaccounted))
    used = {_entry_for(c) for c in COMMANDS if not c.not_run}
    stale = [e for e in [*RUN_BY, *NOT_YET_RUN] if e not in used]
    assert not stale, f"entries that match no unmarked command (the document changed): {stale}"
    missing = {name for name in RUN_BY.values() if name not in globals()}
    assert not missing, f"RUN_BY names tests that do not exist: {missing}"
    owed = sum(1 for c in COMMANDS if not c.not_run and _entry_for(c) in NOT_YET_RUN)
    print(f"{len(COMMANDS)} documented commands: {sum(1 for c in COMMANDS if c.not_run)} not runnable offline,"
          f" {sum(1 for c in COMMANDS if not c.not_run and _entry_for(c) in RUN_BY)} run by tests, {owed} not run yet")


def _commands_run_by(test_name: str) -> list[Command]:
    return [c for c in COMMANDS if not c.not_run and RUN_BY.get(_entry_for(c) or ("", "")) == test_name]


def _link_checkout(work: Path) -> Path:
    """A user's working directory holding the checkout's scripts, configs and virtualenv (links) and nothing else."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("jobs", "configs", "serving", "benchmarks", "cluster", "gpt2", "workflow", "tests", ".venv",
                 "runtime_env.yaml"):
        (work / name).symlink_to(ROOT / name)
    return work


def _make_user_dir(work):
    """A user's working directory with what the documented commands name: the checkout's scripts, configs and
    virtualenv (links), a trained model at runs/pretrain/local/final and .../checkpoint, shards in data/pydocs, notes/
    and manuals.jsonl, domain data in data/domain, HellaSwag and WikiText-2 files. Commands run there with the virtualenv first on PATH, as after `source .venv/bin/activate`."""
    import torch

    from gpt2 import GPT, preset
    from tests.pretrain_fixtures import write_python_docs_shards
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    _link_checkout(work)
    torch.manual_seed(0)
    model = GPT(preset("tiny").replace(n_layer=4))  # four blocks, as the early-exit commands' exit layers need
    for name in ("final", "checkpoint"):
        model.save_pretrained(str(work / "runs/pretrain/local" / name))
    (work / "notes").mkdir()
    (work / "notes/harbor.txt").write_text("".join(
        f"<LOC>The harbor master logged ship {i} arriving with {i * 3} crates of tea.</LOC>\n" for i in range(40)))
    (work / "manuals.jsonl").write_text("".join(
        json.dumps({"text": f"Step {i}: tighten bolt {i} a quarter turn."}) + "\n" for i in range(30)))
    write_python_docs_shards(work / "data/pydocs", n_docs=40, val_tokens=2_000)  # as `jobs/prepare_data.py` leaves
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    (work / "data/domain").mkdir(parents=True)  # configs/finetune-local.yaml's domain data
    (work / "data/domain/notes.txt").write_text("".join(
        "<LOC>" + " ".join(words[(i + j) % len(words)] for j in range(30)) + "</LOC>\n" for i in range(24)))
    (work / "data/wikitext-2-raw").mkdir(parents=True)  # the layout of the original wikitext-2-raw release
    (work / "data/wikitext-2-raw/wiki.test.raw").write_text(" = Valkyria = \n\n The game began in 2010 . \n" * 30)
    for path in ("hellaswag_val.jsonl", "data/hellaswag_val.jsonl"):
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(work / path, EXAMPLES)
    return work


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    return _make_user_dir(tmp_path_factory.mktemp("user"))


def _run_as_written(command: Command, cwd, *appended: str, timeout: int = 600,
                    extra_env: dict[str, str] | None = None) -> str:
    """The command through bash, as a user's shell runs it (comments dropped, `appended` options added, `extra_env`
    set in the shell); its output."""
    import shlex

    text = shlex.join([*command.words(), *appended])
    env = _shell_env(**(extra_env or {}))
    out = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{command.where}: {text}\n{out.stdout[-2000:]}{out.stderr[-4000:]}"
    return out.stdout + out.stderr


# Options appended to keep a documented command short (the text the command starts with → the options).
SHORTER = {
    ".venv/bin/python jobs/generate.py": ("--max-tokens", "8"),
    ".venv/bin/python jobs/evaluate.py": ("--limit", "4", "--no-progress"),
    "python jobs/evaluate.py": ("--no-progress",),
    "python jobs/analyze_heads.py": ("--analysis-batches", "2", "--eval-tokens", "500"),
    "python jobs/compare_norms.py": ("train.max_steps=3", "train.total_batch_tokens=512", "train.micro_batch=2",
                                     "eval.val_every=0"),
}


def test_quick_commands_run(user_dir):
    """Generation, the resolved config, the tokenizer report, a quick evaluation in process, the cluster configs'
    check, the head analysis, the Pre-LN/Post-LN comparison, the export for the Hub; and the WikiText-2 perplexity
    (its scoring starts a local Ray instance)."""
    commands = _commands_run_by("test_quick_commands_run")
    assert len(commands) == 10
    for command in commands:
        cwd = ROOT if command.document == "cluster/README.md" else user_dir  # run from the repository root, it says
        extra = next((v for k, v in SHORTER.items() if command.text.startswith(k)), ())
        output = _run_as_written(command, cwd, *extra)
        assert output.strip(), f"{command.where} printed nothing"


def test_pretrain_commands_run(user_dir):
    """configs/local.yaml as the README runs it, twice (the second with its own train.max_steps), on the tiny model
    for 2 steps, each under a run name of its own (runs/pretrain/local holds the model the other commands use)."""
    commands = _commands_run_by("test_pretrain_commands_run")
    assert len(commands) == 2
    for i, command in enumerate(commands):
        _run_as_written(command, user_dir, "model.preset=tiny", "train.max_steps=2", "train.seq_len=32",
                        "train.micro_batch=2", "train.total_batch_tokens=128", "eval.val_every=0",
                        "eval.sample_tokens=4", f"run.name=docs-{i}")
        assert (user_dir / f"runs/pretrain/docs-{i}/final/model.safetensors").is_file()


def test_finetune_commands_run(user_dir):
    """The full fine-tune, the learning-rate search then fine-tune, and LoRA, on configs/finetune-local.yaml with the
    tiny model, shorter sequences and one epoch; each under a run name of its own."""
    commands = _commands_run_by("test_finetune_commands_run")
    assert len(commands) == 3
    for i, command in enumerate(commands):
        output = _run_as_written(command, user_dir, "data.seq_len=32", "train.epochs=1", "train.micro_batch=4",
                                 "search.lrs=[1e-3, 3e-3]", "search.epochs=1", "samples.max_tokens=4",
                                 f"run.name=docs-{i}")
        assert "--- prompt: 'The data pipeline'" in output, output[-2000:]
        assert ("best learning rate" in output) == ("--search" in command.text)


def test_the_built_in_corpus_commands_run(tmp_path):
    """`jobs/prepare_data.py` with no options, as the README and docs/data.md give it: the whole built-in corpus
    (the Python installation's documentation) into data/pydocs, each in a user directory that has no data yet."""
    import shutil

    from gpt2.shards import read_manifest

    commands = _commands_run_by("test_the_built_in_corpus_commands_run")
    assert len(commands) == 2
    for i, command in enumerate(commands):
        work = _make_user_dir(tmp_path / str(i))
        shutil.rmtree(work / "data" / "pydocs")
        _run_as_written(command, work)
        manifest = read_manifest(work / "data" / "pydocs" / "manifest.json")
        assert manifest["documents"] > 100 and manifest["shards"], (command.where, manifest["documents"])


def test_the_evaluation_of_a_checkpoint_beside_a_hugging_face_model_runs(user_dir, tmp_path):
    """docs/evaluation.md's offline comparison of a checkpoint with a Hugging Face GPT-2 directory, on HellaSwag and
    WikiText-2; /models/openai-gpt2 is filled in with a small directory that transformers wrote."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    [command] = _commands_run_by("test_the_evaluation_of_a_checkpoint_beside_a_hugging_face_model_runs")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)).eval()
    hf.save_pretrained(tmp_path / "openai-gpt2")
    filled = Command(command.document, command.line, command.text.replace("/models/openai-gpt2",
                                                                          str(tmp_path / "openai-gpt2")))
    _run_as_written(filled, user_dir, *SHORTER[".venv/bin/python jobs/evaluate.py"], "--stride", "64")
    results = json.loads((user_dir / "runs/evaluate/compare/results.json").read_text())
    models = {Path(m["model"]).name: m["metrics"] for m in results["models"]}
    assert set(models) == {"checkpoint", "openai-gpt2"}, results["models"]
    for metrics in models.values():  # both scored on the same examples and tokens
        assert metrics["hellaswag/examples"] == 4 and metrics["text/wiki.test.raw/tokens"] > 0, metrics


def test_early_exit_commands_run(user_dir):
    """The exit classifier for make demo's model (here the user directory's four-block one) on one worker, then at
    block 2 on two workers, on a few short batches; then the profile of the first against its backbone."""
    commands = _commands_run_by("test_early_exit_commands_run")
    assert [c.text.split()[1] for c in commands] == ["jobs/train_early_exit.py"] * 2 + ["jobs/profile_early_exit.py"]
    shorter = ("data.seq_len=32", "data.micro_batch=4", "data.train_batches=4", "data.val_batches=2",
               "classifier.epochs=2", "scaling.threads_per_worker=1")
    _run_as_written(commands[0], user_dir, *shorter)
    _run_as_written(commands[1], user_dir, *shorter, "run.name=docs-two-workers")
    for name in ("local", "docs-two-workers"):
        assert (user_dir / f"runs/early-exit/{name}/model/early_exit.json").is_file()
    output = _run_as_written(commands[2], user_dir, "--seq-len", "32", "--prompt-len", "8", "--decode-steps", "2",
                             "--repeats", "1", "--decodes", "1", "--new-tokens", "4", "--val-batches", "1")
    assert "exit" in output.lower(), output[-2000:]


def test_compression_commands_run(user_dir):
    """Distillation on Ray Train (2 workers, 2 short steps), then the comparison table of the base model, the
    distilled student and a pruned model (NAME: a head analysis run here first, as the README's command before)."""
    commands = _commands_run_by("test_compression_commands_run")
    assert [c.text.split()[1] for c in commands] == ["jobs/distill.py", "jobs/compare.py"]
    distill, compare = commands
    _run_as_written(distill, user_dir, "train.max_steps=2", "train.seq_len=32", "train.micro_batch=2",
                    "train.total_batch_tokens=128", "train.warmup_steps=1", "eval.val_every=0",
                    "eval.report_tokens=512", "eval.decode_tokens=4", "checkpoint.every=0")
    assert (user_dir / "runs/distill/distill-local/final/model.safetensors").is_file()
    [analyze] = [c for c in COMMANDS if c.document == "README.md" and c.text.startswith("python jobs/analyze_heads.py")]
    _run_as_written(analyze, user_dir, *SHORTER["python jobs/analyze_heads.py"], "--name", "docs")
    named = Command(compare.document, compare.line, compare.text.replace("/NAME/", "/docs/"))
    output = _run_as_written(named, user_dir, "--eval-tokens", "512", "--decode-tokens", "4")
    for name in ("base", "distilled", "pruned"):
        assert name in output, output[-2000:]


# The pipeline's own overrides that make every stage tiny (appended to a documented command: later ones win). The
# evaluation's perplexity pass and the search's two trials are the longest pieces of work, so they use both cores.
TINY_PIPELINE = (
    "cloze_examples=8", "eval_actors=2",
    "pretrain_overrides=[model.preset=tiny, train.seq_len=32, train.micro_batch=2, train.total_batch_tokens=64,"
    " train.max_steps=4, train.warmup_steps=1, train.autocast=fp32, eval.val_every=2, eval.val_batches=2,"
    " eval.sample_every=0, checkpoint.every=0, scaling.num_workers=1]",
    "finetune_overrides=[data.max_documents=12, data.seq_len=64, train.micro_batch=4, train.epochs=1,"
    " train.autocast=fp32, search.epochs=1, 'search.lrs=[1.0e-3, 1.0e-4]', search.max_concurrent=2,"
    " samples.max_tokens=8]",
    "early_exit_overrides=[model.exit_layer=1, data.seq_len=32, data.micro_batch=4, data.train_batches=4,"
    " data.val_batches=2, classifier.epochs=2, scaling.threads_per_worker=1]",
)


def _assert_one_registered_model_per_kind(uri: str, name: str, early_exit_versions: int) -> None:
    """Each stage's model is a version of its own registered model, with its figures as tags and a champion."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for kind, versions in (("pretrained", 1), ("finetuned", 1), ("early-exit", early_exit_versions)):
        model = client.get_registered_model(f"gpt2-{name}-{kind}")
        assert model.aliases["champion"] in {str(v) for v in range(1, versions + 1)}
        version = client.get_model_version(model.name, str(versions))
        assert version.tags["kind"] == kind and float(version.tags["val_loss"]) > 0 and version.tags["git_commit"]
        assert version.description.startswith(f"A `{kind}` GPT-2 model from MLflow run")
    pretrained = client.get_model_version(f"gpt2-{name}-pretrained", "1")
    assert pretrained.tags["tokens_seen"] == "256" and "hellaswag_acc_norm" in pretrained.tags  # the evaluate stage's


def test_the_pipeline_commands_run(tmp_path, mlflow_server):
    """The README's three pipeline commands in a directory of their own, on tiny settings, with MLflow's server in
    the shell's MLFLOW_TRACKING_URI (as `make demo` leaves one running), each in one of the situations a job starts
    in (tests/test_job_startup.py runs the other jobs in them).
    `name=exp2 ...` runs every stage on real Ray Train, Tune and Serve, on a Ray instance of its own (`--address
    local`: in the test session other Ray instances run, which the job would otherwise join), registers one model per
    kind and fetches a completion over HTTP. The plain command then runs under that name (appended) after a head
    with token authentication was started as `make demo` starts it, which it finds on this machine: every stage is
    done, so it only serves again, on that head. `--from early_exit` reruns that stage and serving on the same head,
    named by RAY_ADDRESS in a shell without RAY_AUTH_MODE, with the MLflow server named by the pipeline's
    tracking_uri rather than the shell."""
    from cluster.runtime.local_services import free_port
    from tests.multinode import LocalCluster

    commands = _commands_run_by("test_the_pipeline_commands_run")
    assert [c.words()[2:] for c in commands] == [[], ["--from", "early_exit"],
                                                 ["name=exp2", "pretrain_overrides=[train.max_steps=200]"]]
    plain, later, renamed = commands
    work = _link_checkout(tmp_path / "user")
    tracking = {"MLFLOW_TRACKING_URI": mlflow_server}
    tiny = (f"serve_port={free_port()}", *TINY_PIPELINE)

    # The documented pretrain_overrides gives way to the tiny one after it; the name stays the command's own.
    output = _run_as_written(renamed, work, "--address", "local", *tiny, extra_env=tracking)
    for stage in ("prepare", "pretrain", "evaluate", "finetune", "early_exit", "serve"):
        assert f"[{stage}] running" in output, output[-3000:]
    assert "unchanged since the last run" not in output
    assert "fine-tune learning rate" in output and "(Ray Tune search)" in output
    assert "were every token to exit" in output  # the early-exit bound, beside its measured ratio
    assert "over HTTP:\nThe Python language reference" in output, output[-3000:]
    assert "2-layer model pretrained on 256 tokens, validation perplexity" in output  # what to expect of the sample
    assert (work / "runs/pretrain/exp2/final/model.safetensors").is_file()
    _assert_one_registered_model_per_kind(mlflow_server, "exp2", early_exit_versions=1)

    with LocalCluster(head_cpus=2) as head:
        found = {**tracking, "RAY_TMPDIR": head.tmpdir}  # where the head keeps its address, as /tmp/ray does
        output = _run_as_written(plain, work, *tiny, "name=exp2", extra_env=found)
        for stage in ("prepare", "pretrain", "evaluate", "finetune", "early_exit"):
            assert f"[{stage}] unchanged since the last run: skipped" in output, output[-3000:]
        assert "[serve] running" in output and "=== pipeline results ===" in output
        assert "started a local ray instance" not in output.lower(), output[-3000:]  # Ray's words when it starts one
        assert head.runs(head.head, "ServeReplica"), "the variants are not served by the head"

        # The pipeline's own tracking_uri, while the shell's names a port where nothing listens: every stage that
        # runs logs and registers on the pipeline's server.
        named = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "RAY_ADDRESS": head.address}
        output = _run_as_written(later, work, *tiny, "name=exp2", f"tracking_uri={mlflow_server}", extra_env=named)
        for stage in ("prepare", "pretrain", "evaluate", "finetune"):
            assert f"[{stage}] unchanged since the last run: skipped" in output, output[-3000:]
        assert "[early_exit] running" in output and "[serve] running" in output
        assert "over HTTP:\nThe Python language reference" in output, output[-3000:]
    _assert_one_registered_model_per_kind(mlflow_server, "exp2", early_exit_versions=2)


def test_data_preparation_commands_run(tmp_path):
    """Each in a user directory of its own: both write data/notes, from different inputs."""
    from gpt2.shards import read_manifest

    commands = _commands_run_by("test_data_preparation_commands_run")
    assert len(commands) == 2
    for i, command in enumerate(commands):
        work = _make_user_dir(tmp_path / str(i))
        _run_as_written(command, work, "--val-tokens", "200")
        manifest = read_manifest(work / "data" / "notes" / "manifest.json")
        expected = 40 + (30 if "manuals.jsonl" in command.text else 0)
        assert manifest["documents"] == expected, (command.where, manifest["documents"])


@contextlib.contextmanager
def _in_the_foreground(words: list[str], cwd: Path, env: dict[str, str], ready):
    """A documented command left running in the foreground, as the documents say, in `cwd`: yields once
    `ready(output lines)` holds, then stops it with Ctrl-C (its whole process group, as a terminal would)."""
    import shlex
    import signal
    import threading
    import time

    from tests.multinode import stop_group

    server = subprocess.Popen(["bash", "-c", shlex.join(words)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not ready(lines):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.5)
        yield lines
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(server, timeout=5)


def _shell_env(**extra: str) -> dict[str, str]:
    """A user's shell with the virtualenv first on PATH, as after `source .venv/bin/activate`."""
    return {**user_env(), "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


@contextlib.contextmanager
def _server_in_the_foreground(words: list[str], cwd: Path, extra_env: dict[str, str] | None = None):
    """A documented `jobs/serve.py` command, with a free port and a Ray instance of its own appended (`--address
    local`: in the test session other Ray instances run, which the job would otherwise join); yields its base URL
    once it serves. Ctrl-C makes the job remove the application and stop its Ray."""
    from tests.multinode import free_port

    port = free_port()
    with _in_the_foreground([*words, "--port", str(port), "--address", "local"], cwd, _shell_env(**(extra_env or {})),
                            lambda lines: any("web page:" in line for line in lines)):
        yield f"http://127.0.0.1:{port}"


def test_the_server_answers_the_documented_curls(user_dir):
    """docs/serving.md's one-checkpoint server, with DIR filled in; then its two curl checks, aimed at its port."""
    import shlex

    [serve] = [c for c in _commands_run_by("test_the_server_answers_the_documented_curls") if "serve.py" in c.text]
    curls = [c for c in _commands_run_by("test_the_server_answers_the_documented_curls") if c.text.startswith("curl")]
    assert len(curls) == 2
    words = [w.replace("=DIR", "=runs/pretrain/local/final") for w in serve.words()]
    env = _shell_env()
    with _server_in_the_foreground(words, user_dir) as base:
        answers = []
        for curl in curls:
            text = shlex.join(curl.words()).replace("http://127.0.0.1:8000", base)
            out = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, f"{curl.where}: {out.stderr}"
            answers.append(out.stdout)
    plain, streamed = answers
    assert "usage" in json.loads(plain), plain
    events = [line[len("data: "):] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 20, streamed[-500:]


def test_the_servers_of_serving_config_yaml_answer(user_dir):
    """The README's and docs/serving.md's `jobs/serve.py` without options: serving/config.yaml's variants (make
    demo's model, and its int8 copy). Its relative paths are the project's; the user directory stands in for a
    checkout where make demo has run, through the job's own --root."""
    import httpx

    commands = _commands_run_by("test_the_servers_of_serving_config_yaml_answer")
    assert len(commands) == 2
    for command in commands:
        with _server_in_the_foreground([*command.words(), "--root", str(user_dir)], user_dir) as base:
            models = httpx.get(f"{base}/v1/models", timeout=60).json()
            assert [m["id"] for m in models["data"]] == ["pretrained", "int8"], (command.where, models)
            for name in ("pretrained", "int8"):
                r = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4},
                               timeout=120)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, (command.where, r.text)


def test_the_recipe_for_a_checkpoint_both_servers_can_load(tmp_path):
    """docs/serving.md: the command that writes a random-weight 124M checkpoint, as written; then the recipe that
    gives an older checkpoint the tokenizer files vLLM and transformers read, run as one shell script with DIR
    filled in, on that checkpoint with those files removed. The recipe must give back the files save_pretrained
    writes, and transformers' tokenizer must then encode as the project's does."""

    from transformers import AutoTokenizer

    from gpt2.tokenizer import get_tokenizer

    commands = _commands_run_by("test_the_recipe_for_a_checkpoint_both_servers_can_load")
    [create] = [c for c in commands if c.text.startswith(".venv/bin/python -c")]
    recipe = [c for c in commands if c is not create]
    assert [c.text.split()[0] for c in recipe] == ["DIR=/path/to/checkpoint", "DATA=$(.venv/bin/python", "cp", "cp",
                                                   "cat"]
    work = tmp_path / "user"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    _run_as_written(create, work, timeout=300)
    checkpoint = work / "ckpt-124m"
    names = ("vocab.json", "merges.txt", "tokenizer_config.json")
    written = {name: (checkpoint / name).read_bytes() for name in names}
    for name in names:
        (checkpoint / name).unlink()

    # The recipe's whole block (its heredoc included), as a script, with DIR set to the checkpoint.
    lines = (ROOT / recipe[0].document).read_text().splitlines()
    first, end = recipe[0].line - 1, recipe[-1].line
    while lines[end].strip() != "```":
        end += 1
    script = "\n".join(lines[first:end])
    script = re.sub(r"^DIR=\S+", f"DIR={checkpoint}", script, count=1)
    env = _shell_env()
    out = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

    for name in ("vocab.json", "merges.txt"):
        assert (checkpoint / name).read_bytes() == written[name], f"{name} differs from what save_pretrained writes"
    assert json.loads((checkpoint / "tokenizer_config.json").read_text()) == json.loads(written["tokenizer_config.json"])
    text = "Hello world! Tokenizers   split 'quotes', numbers 12345 and émigré text.\n\nNew paragraph."
    hf = AutoTokenizer.from_pretrained(str(checkpoint))
    assert hf.encode(text) == get_tokenizer().encode(text)
    assert hf.decode(hf.encode(text)) == text


@pytest.fixture(scope="module")
def local_registry(user_dir, tmp_path_factory):
    """The registry the README's model-registry block reads, filled the way `make demo`'s jobs fill it: a `mlflow
    server` of its own with gpt2-local-pretrained and gpt2-local-finetuned (their `champion` alias set at
    registration), from the user directory's model and a fine-tuned copy. Yields the server's URI and the
    fine-tuned model's directory."""
    import threading

    import torch
    from mlflow.tracking._tracking_service import utils as tracking_service

    from cluster.runtime.local_services import free_port, start_local_server, stop_server
    from cluster.runtime.tracking import RunLogger
    from gpt2 import GPT

    root = tmp_path_factory.mktemp("local-registry")
    uri = f"http://127.0.0.1:{free_port()}"
    server = start_local_server(root / "mlflow", uri)
    try:
        model = GPT.from_pretrained(str(user_dir / "runs/pretrain/local/final"))
        with torch.no_grad():  # a fine-tune: other weights, so the two registered models differ
            model.transformer.wte.weight.mul_(1.5)
        model.save_pretrained(str(root / "finetuned"))
        # Registering sets MLflow's process-wide tracking URI (and MLFLOW_TRACKING_URI) to this server, as a job's
        # process would: both go back to what they were, so later tests reach the session's server.
        with pytest.MonkeyPatch.context() as restore:
            restore.setattr(tracking_service, "_tracking_uri", tracking_service._tracking_uri)
            restore.setenv("MLFLOW_TRACKING_URI", uri)
            for kind, source in (("pretrained", user_dir / "runs/pretrain/local/final"),
                                 ("finetuned", root / "finetuned")):
                logger = RunLogger(root / kind, experiment="docs", run_name="local", uri=uri)
                logger.log_metrics({"val_loss": 3.0}, step=1)
                assert logger.log_model(source, kind) == f"models:/gpt2-local-{kind}/1"
                logger.close()
        yield {"uri": uri, "finetuned": root / "finetuned"}
    finally:
        # Reaped as soon as it exits: stop_server would otherwise wait its whole timeout for the zombie.
        threading.Thread(target=server.wait, daemon=True).start()
        stop_server(server.pid)


def _generated(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """The greedy continuation that the project's own generation gives: what every path to a model must give."""
    from gpt2 import GPT, get_tokenizer
    from gpt2.generate import generate

    enc = get_tokenizer()
    model = GPT.from_pretrained(str(model_dir)).eval()
    return enc.decode(generate(model, [enc.encode_ordinary(prompt)], max_tokens, temperature=0)[0])


def test_the_model_registry_block_runs(user_dir, local_registry):
    """The README's model-registry block, run as one shell script in the user directory, with the tracking URI
    and the ports filled in: the pyfunc load and predict, `mlflow models serve` (started in the background, as a
    second terminal would hold it) and the curl to it, and generation from the fine-tuned model's alias (greedy
    and shorter, through its own options, so that its text is known)."""

    from cluster.runtime.local_services import free_port

    commands = _commands_run_by("test_the_model_registry_block_runs")
    assert [c.text.split()[0] for c in commands] == ["export", "python", "mlflow", "curl", "python"]
    lines = (ROOT / "README.md").read_text().splitlines()
    first, end = commands[0].line - 1, commands[-1].line
    assert lines[end].strip() == "```", "the block goes on after its last command"
    port = str(free_port())
    script = [line.replace("http://127.0.0.1:5000", local_registry["uri"]).replace("5001", port)
              for line in lines[first:end]]
    serve = next(i for i, line in enumerate(script) if line.startswith("mlflow models serve"))
    # The server in the background, stopped when the script ends; the curl waits until it answers.
    script[serve] += (f" > {user_dir}/mlflow-models-serve.log 2>&1 &\nSERVER=$!\ntrap 'kill $SERVER' EXIT\n"
                      f"for i in $(seq 300); do curl -sf 127.0.0.1:{port}/ping >/dev/null && break; sleep 1; done")
    script[-1] += " --max-tokens 8 --temperature 0 --dtype float32"
    env = _shell_env()
    out = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=user_dir, env=env, capture_output=True,
                         text=True, timeout=600)
    log = user_dir / "mlflow-models-serve.log"
    assert out.returncode == 0, (out.stdout[-2000:] + out.stderr[-3000:]
                                 + (log.read_text()[-2000:] if log.exists() else ""))
    # 1. predict: a list of one continuation (sampled at temperature 0.8: only its shape is known)
    assert re.search(r"^\[(['\"]).*\1\]$", out.stdout, flags=re.M), out.stdout[-2000:]
    # 2. the curl (no newline after its JSON): mlflow models serve's greedy continuation, the project's own
    at = out.stdout.index('{"predictions"')
    invocations, _ = json.JSONDecoder().raw_decode(out.stdout, at)
    assert invocations == {"predictions": [_generated(user_dir / "runs/pretrain/local/final", "Once upon a time", 20)]}
    # 3. generate.py from the fine-tuned model's alias: that model's text, not the pretrained one's
    prompt = "The Python standard library"
    sample = out.stdout[out.stdout.index("--- sample 1"):]
    assert sample == f"--- sample 1\n{prompt}{_generated(local_registry['finetuned'], prompt, 8)}\n"


def test_the_server_takes_a_checkpoint_and_a_registered_model(user_dir, local_registry):
    """The README's `jobs/serve.py` with a checkpoint variant and a registry alias variant (runs/pretrain/x/final
    filled in with a copy of the model registered as gpt2-local-pretrained), MLFLOW_TRACKING_URI naming the
    registry: both variants are served beside serving/config.yaml's, and give the same greedy text."""
    import shutil

    import httpx

    [command] = _commands_run_by("test_the_server_takes_a_checkpoint_and_a_registered_model")
    mine = user_dir / "runs/pretrain/x/final"
    if not mine.exists():
        shutil.copytree(user_dir / "runs/pretrain/local/final", mine)
    registry = {"MLFLOW_TRACKING_URI": local_registry["uri"]}
    with _server_in_the_foreground(command.words(), user_dir, registry) as base:
        models = httpx.get(f"{base}/v1/models", timeout=60).json()
        # added to serving/config.yaml's variants (the user directory holds the model they name)
        assert sorted(m["id"] for m in models["data"]) == ["int8", "mine", "pretrained", "reg"], models
        texts = {}
        for name in ("mine", "reg"):
            r = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 6,
                                                              "temperature": 0}, timeout=120)
            assert r.status_code == 200, (name, r.text)
            texts[name] = r.json()["choices"][0]["text"]
    assert texts["mine"] == texts["reg"] and texts["mine"], texts


def test_serve_run_serves_serving_config_yaml(tmp_path):
    """Ray's own `serve run serving/config.yaml`, as the README and docs/serving.md write it, in a checkout where
    make demo's model is in place: a copy of this one's code (the config's variant paths are relative to the
    checkout that holds serving/) with a model at runs/pretrain/local/final, and the config's port 8000 changed to a
    free one there, as a user whose port 8000 is taken would do. Ray's temp dir is the test's, so `serve run` starts
    a Ray of its own whatever else runs on the machine. Both variants answer; Ctrl-C removes the application."""
    import shutil
    import tempfile

    import httpx
    import torch

    from gpt2 import GPT, preset
    from tests.multinode import free_port

    commands = _commands_run_by("test_serve_run_serves_serving_config_yaml")
    assert [c.words() for c in commands] == [["serve", "run", "serving/config.yaml"],
                                             [".venv/bin/serve", "run", "serving/config.yaml"]]
    checkout = tmp_path / "checkout"
    for name in ("gpt2", "cluster", "serving", "configs"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    torch.manual_seed(0)
    GPT(preset("tiny")).save_pretrained(str(checkout / "runs/pretrain/local/final"))
    port = free_port()
    config = checkout / "serving/config.yaml"
    config.write_text(config.read_text().replace("port: 8000", f"port: {port}", 1))
    base = f"http://127.0.0.1:{port}"

    def serving(_lines) -> bool:
        try:
            return httpx.get(f"{base}/v1/models", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    for command in commands:
        ray_tmp = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's socket paths live under it
        env = _shell_env(PYTHONPATH=str(checkout), RAY_TMPDIR=ray_tmp)
        try:
            with _in_the_foreground(command.words(), checkout, env, serving) as lines:
                models = httpx.get(f"{base}/v1/models", timeout=30).json()
                assert [m["id"] for m in models["data"]] == ["pretrained", "int8"], (command.where, models)
                for name in ("pretrained", "int8"):
                    r = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4},
                                   timeout=120)
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, (command.where,
                                                                                                  r.text)
            assert not serving(lines), f"{command.where}: still serving after Ctrl-C"
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
