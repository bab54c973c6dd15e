"""The shell commands the documentation shows, read out of the ```bash blocks of README.md, docs/*.md and
cluster/README.md, so tests can check them against the code and run them as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
             "cluster/README.md"]

PROJECT_PACKAGES = {"benchmarks", "cluster", "gpt2", "jobs", "serving", "tests", "workflow"}


@dataclass(frozen=True)
class Command:
    document: str
    line: int  # where the command starts in the document
    text: str  # as written, continuation lines joined
    # Why the tests do not run it (it needs a cloud account, the network, a GPU, ...), from a marker above its block
    # (NOT_RUN); None for a command that a test runs.
    not_run: str | None = None

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"

    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)


# Above a ```bash block: `<!-- not run by the tests: REASON -->` for the whole block, or
# `<!-- not run by the tests (TEXT): REASON -->` for its commands that contain TEXT; several such lines may stand there.
NOT_RUN = re.compile(r"<!--\s*not run by the tests(?: \((.+?)\))?:\s*(.+?)\s*-->")


def _bash_blocks(text: str):
    """(first line number, lines, the not-run markers above it as (selector or None, reason)) of each ```bash
    fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            markers, j = [], i - 1
            while j >= 0 and (m := NOT_RUN.fullmatch(lines[j].strip())):
                markers.append((m[1], m[2]))
                j -= 1
            start = i + 2  # 1-based number of the block's first line
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            yield start, body, markers
        i += 1


def _not_run(text: str, markers: list[tuple[str | None, str]]) -> str | None:
    return next((reason for selector, reason in markers if selector is None or selector in text), None)


def documented_commands(documents: list[str] = DOCUMENTS) -> list[Command]:
    """Every command of every ```bash block, in document order. A heredoc's body belongs to its command."""
    commands = []
    for document in documents:
        text = (ROOT / document).read_text()
        for start, body, markers in _bash_blocks(text):
            i = 0
            while i < len(body):
                line_no, line = start + i, body[i]
                i += 1
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                while line.rstrip().endswith("\\") and i < len(body):  # continuation lines
                    line = line.rstrip()[:-1] + " " + body[i].strip()
                    i += 1
                heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
                if heredoc:  # the heredoc's lines up to its delimiter are data, not commands
                    while i < len(body) and body[i].strip() != heredoc.group(1):
                        i += 1
                    i += 1
                commands.append(Command(document, line_no, line.strip(), _not_run(line, markers)))
    return commands


def script_invocation(command: Command) -> tuple[str, list[str]] | None:
    """(script or module, its arguments) for a command that runs a project script (`python jobs/x.py ...`,
    `python -m benchmarks.x ...`, also behind `ray job submit ... --`), else None."""
    try:
        words = command.words()
    except ValueError:  # shell syntax shlex cannot split (e.g. $(...) with quotes): not a script invocation
        return None
    for i, word in enumerate(words):
        if re.fullmatch(r"(\S*/)?python3?", word) and i + 1 < len(words):
            rest = words[i + 1 :]
            if rest[0] == "-m" and len(rest) > 1:  # a module of this project (not pip, venv, ...)
                if rest[1].split(".")[0] in PROJECT_PACKAGES:
                    return rest[1], rest[2:]
                return None
            if rest[0].endswith(".py"):
                return rest[0], rest[1:]
    return None


@lru_cache(maxsize=None)
def script_help(script: str) -> str:
    """The --help text of a project script (`jobs/x.py`) or module (`benchmarks.x`), from a subprocess in the
    repository root, as a user would see it; fails unless it exits 0. Kept for the session: the documentation, device
    and evaluation tests read the same texts, and each subprocess takes seconds (it imports torch)."""
    target = ["-m", script] if not script.endswith(".py") else [str(ROOT / script)]
    out = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"`{script} --help` failed:\n{out.stderr[-2000:]}"
    return out.stdout
