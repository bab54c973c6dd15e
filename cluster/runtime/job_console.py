"""What a person watching a submitted job sees: the job's own lines, not Ray's internals.

`ray job submit` streams everything the job's processes print: Ray's and Tune's log records, actor warnings, Ray
Data's execution plans, MLflow's download bars, next to the lines the project prints for people (stage headers, a
line per training step or epoch, summaries, the results table, errors). `JobConsole` writes every line to a log
file and shows only the second kind, so `make demo` reads as a list of stages with their progress; the full output
stays in the file (and in the Ray dashboard's Jobs view).

Shown: the pipeline's `[stage] ...` lines and the driver's own prints (summaries, tables); each training step or
epoch as one line with an ETA; Ray Data's and Tune's progress when it moves; everything after
`=== pipeline results ===`; `error:`/`WARNING:` lines and Python tracebacks in full. Hidden: Ray log records
(timestamped INFO/WARNING/ERROR lines), Tune's trial tables and reports, progress bars, what actors print besides
steps, errors and tracebacks, and the copy of a line Ray sometimes delivers twice (even with another actor's line
between). When the job fails, the last lines of its output are shown whatever they are.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Callable, TextIO

RESULTS_MARKER = "=== pipeline results ==="
FAILURE_TAIL = 60  # lines of the log shown when the job fails
# Ray's log monitor can deliver an actor's line twice, and another actor's line can come in between (a checkpoint
# report beside a step line): a line from an actor is a copy when it is among the last few seen.
RECENT_ACTOR_LINES = 8

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SOURCE = re.compile(r"^\((?P<source>[^)]*pid=\d+[^)]*)\)\s?")  # "(RayTrainWorker pid=29493) " or ", ip=..."
RAY_RECORD = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|WARN|ERROR|DEBUG|SUCC)\b"  # Python logging, Ray's format
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"  # Ray's C++ core
    r"|(DEBUG|INFO|WARNING|ERROR) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )"  # Ray Serve's
)
STAGE = re.compile(r"^\[(prepare|pretrain|evaluate|finetune|early_exit|serve)\] ")
STEP = re.compile(r"^(step|epoch) (?P<step>\d+)/(?P<total>\d+) \|")  # pretraining's steps, fine-tuning's epochs
STEP_MS = re.compile(r"\| (?P<ms>\d+) ms \|")  # the duration a step line reports
JOB_ID = re.compile(r"Job '(?P<id>raysubmit_\w+)' submitted successfully")
# Tune's console reporter: status headers, its box-drawn tables, per-trial result blocks.
TUNE_STATUS = re.compile(r"^Trial status: (?P<status>.+)$")
TUNE = re.compile(r"^(Trial |View detailed results here|To visualize your results|Current (time|best trial)"
                  r"|Logical resource usage|Wrapping provided|Training (started|finished|errored)"
                  r"|[╭╰│├─┌└┃━]|\+[-+]+\+$|\|)")
JOB_MANAGER = re.compile(r"^Running entrypoint for job ")
# MLflow's log records and the notes its client prints when a run ends or a model is registered.
MLFLOW = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) |🏃 View run |🧪 View experiment "
                    r"|Registered model '|Created version '|Successfully registered model ')")
PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|")  # tqdm's bars (MLflow's "Downloading artifacts")
DATA_PROGRESS = re.compile(r"logging_progress\.py:\d+ -- Total Progress: (?P<done>\d+)/(?P<total>\d+)$")  # Ray Data


def eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class JobConsole:
    """Feed it the job's output line by line; `show` receives what a person should see."""

    def __init__(self, log: TextIO, show: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.show, self.clock = log, show, clock
        self.job_id: str | None = None
        self._previous: str | None = None
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_ACTOR_LINES)
        self._results = False  # past RESULTS_MARKER: the driver's lines are the summary
        self._traceback = False
        self._step_started: tuple[float, int] | None = None  # (time, step) of the first step line of a run
        self._step_ms: list[int] | None = None  # the reported durations of this run's steps after its first
        self._last_step = 0
        self._tune_status: str | None = None
        self._data_tenth: int | None = None  # the tenth of Ray Data's work last shown
        self._tail: collections.deque[str] = collections.deque(maxlen=FAILURE_TAIL)

    def feed(self, raw: str) -> None:
        line = ANSI.sub("", raw.rstrip("\n"))
        self.log.write(line + "\n")
        match = SOURCE.match(line)
        if line == self._previous or (match and line in self._recent):  # a copy Ray delivered again
            return
        self._previous = line
        if match:
            self._recent.append(line)
        self._tail.append(line)
        source, text = (match["source"], line[match.end():]) if match else (None, line)
        if job := JOB_ID.search(text):
            self.job_id = job["id"]
        if self._shows_traceback(text):
            self.show(text)
        elif progress := DATA_PROGRESS.search(text):
            self._data_progress(int(progress["done"]), int(progress["total"]))
        elif not RAY_RECORD.match(text) and (shown := self._shown(source, text)) is not None:
            self.show(shown)

    def failed(self, log_path: str) -> None:
        """The job failed: show the end of its output, whatever it is, and where the rest is."""
        self.show(f"--- the job failed; the last {len(self._tail)} lines of its output (all of it: {log_path}):")
        for line in self._tail:
            self.show(line)

    def _shows_traceback(self, text: str) -> bool:
        """A traceback is shown in full: from its header to the exception line (the first unindented line after)."""
        if text.startswith("Traceback (most recent call last)"):
            self._traceback = True
            return True
        if self._traceback:
            if text and not text[0].isspace() and not text.startswith(("During handling", "The above exception")):
                self._traceback = False
            return True
        return False

    def _shown(self, source: str | None, text: str) -> str | None:
        if STAGE.match(text):  # a new stage: its counts start afresh
            self._step_started, self._step_ms, self._last_step, self._data_tenth = None, None, 0, None
            return text
        if text.startswith(("error:", "WARNING:")):
            return text
        if step := STEP.match(text):
            return self._step_line(text, int(step["step"]), int(step["total"]))
        if (status := TUNE_STATUS.match(text)) and source is None:
            changed, self._tune_status = status["status"] != self._tune_status, status["status"]
            return f"  trials: {self._tune_status}" if changed else None
        if source is not None or not text.strip():
            return None  # actors' other prints: in the log file
        if text.startswith(RESULTS_MARKER):
            self._results = True
            return "\n" + text
        if self._results or not any(p.match(text) for p in (TUNE, JOB_MANAGER, MLFLOW, PROGRESS_BAR)):
            return "  " + text if not self._results else text
        return None

    def _step_line(self, text: str, step: int, total: int) -> str:
        """The step line, cut to what matters, with the time left."""
        fields = [f for f in text.split(" | ") if not f.startswith(("lr ", "grad norm", "MFU"))]
        duration = STEP_MS.search(text)
        left = self._time_left(step, total) if duration is None else self._steps_left(step, total, int(duration["ms"]))
        if left:
            fields.append(f"ETA {left}")
        return "  " + " | ".join(fields)

    def _steps_left(self, done: int, total: int, ms: int) -> str | None:
        """From the durations the step lines report: Ray delivers a job's output in bursts, so the time the lines
        arrive says little about the pace. A run's first step (start-up included) is left out; a count that goes
        back starts a new run (a resume)."""
        if self._step_ms is None or done <= self._last_step:
            self._step_ms = []
        else:
            self._step_ms.append(ms)
        self._last_step = done
        if not self._step_ms:
            return None
        return eta(sum(self._step_ms) / len(self._step_ms) / 1000 * (total - done))

    def _data_progress(self, done: int, total: int) -> None:
        """Ray Data logs its progress every few seconds: shown as one line per tenth of the work done (Ray Data
        revises its total as it goes)."""
        if total and done > self._last_step:
            left, tenth = self._time_left(done, total), 10 * done // total
            if self._data_tenth is None or tenth > self._data_tenth or done == total:
                self.show(f"  {done}/{total} blocks ({done / total:.0%})" + (f" | ETA {left}" if left else ""))
                self._data_tenth = tenth

    def _time_left(self, done: int, total: int) -> str | None:
        """At the pace since the first count of this run (a count that goes back starts a new run: a resume)."""
        now = self.clock()
        if self._step_started is None or done <= self._last_step:
            self._step_started = (now, done)
        self._last_step = done
        started, first = self._step_started
        return eta((now - started) / (done - first) * (total - done)) if done > first else None
