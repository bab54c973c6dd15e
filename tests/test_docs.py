"""The documentation's commands against the code: every script, module, flag, make target and repository file a
documented command names exists (a renamed flag fails here, not on a user's machine), and the commands that a new
user runs first run as written, as subprocesses, in a fresh directory with no Ray head and no MLflow server."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import pytest

from tests.doc_commands import ROOT, Command, documented_commands, script_help, script_invocation
from tests.multinode import user_env

COMMANDS = documented_commands()
# Files of this repository that documented commands name (other paths are the user's: runs/..., data/..., DIR).
REPO_PATH = re.compile(r"^(?:configs|serve|cluster|benchmarks|jobs|docs|tests)/[\w./-]+\.(?:yaml|py|md|json)$")


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
