"""The small files a run keeps beside its checkpoints survive real kills: a torn last line of metrics.jsonl, metrics
held back while MLflow was down by a process that was then killed, an upload to a run directory in storage killed
midway, and the pipeline's stage records rewritten while the process dies."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from mlflow.tracking import MlflowClient

from cluster.runtime import storage
from cluster.runtime.local_services import free_port
from cluster.runtime.tracking import RunLogger, read_metrics
from gpt2.durable import PARTIAL_SUFFIX
from tests.drivers import kill_driver_when
from workflow.pipeline import Pipeline, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}"


def wait_for(condition: Callable[[], bool], child: subprocess.Popen, log: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not happen; child log:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def python(code: str, *args: str | Path) -> list[str]:
    """A command running `code` with this checkout importable, whatever the working directory."""
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}", *map(str, args)]


# ---- metrics.jsonl: a torn last line ----------------------------------------------------------------------------


def test_a_torn_last_line_is_left_out_by_readers_and_cut_off_by_the_next_logger(tmp_path, caplog):
    complete = '{"step": 0, "time": 1, "loss": 2.0}\n{"step": 1, "time": 2, "loss": 1.5}\n'
    torn = '{"step": 2, "time": 3, "lo'
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text(complete + torn)

    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert jsonl.read_text() == complete + torn  # a reader changes nothing: the writer may be mid-append

    with caplog.at_level(logging.WARNING, logger="cluster.runtime.tracking"):
        logger = RunLogger(tmp_path, experiment="torn", run_name="r", uri=unreachable())
    assert f"{jsonl}: dropped its last {len(torn)} bytes" in caplog.text
    assert jsonl.read_text() == complete
    logger.log_metrics({"loss": 1.0}, 2)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 2.0), (1, 1.5), (2, 1.0)]


def test_a_torn_line_with_records_after_it_is_an_error_naming_the_file_and_line(tmp_path):
    # What the logger wrote before torn ends were cut off: the next record glued to the torn one.
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "time": 1, "loss": 2.0}\n{"step": 1, "time": 2, "lo{"step": 1, "time": 3, "loss": 1.5}\n'
        '{"step": 2, "time": 4, "loss": 1.0}\n'
    )
    where = re.escape(f"{tmp_path / 'metrics.jsonl'}, line 2: not a complete JSON record")
    with pytest.raises(ValueError, match=where):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match=where):
        RunLogger(tmp_path, experiment="torn", run_name="r", uri=unreachable())


APPEND_FOREVER = """
import resource, signal, sys
from cluster.runtime.tracking import RunLogger, read_metrics
logger = RunLogger(sys.argv[1], experiment="kill", run_name="r", uri=sys.argv[2])
if len(sys.argv) > 3:  # the kernel kills the process (SIGXFSZ; Python ignores it) in the write crossing this size
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a death by SIGXFSZ dumps core where that is enabled
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]),) * 2)
metrics = {f"m{i}": float(i) for i in range(5000)}  # lines of ~80 KB
step = len(read_metrics(sys.argv[1]))
while True:
    logger.log_metrics(metrics, step)
    step += 1
"""


def test_writers_killed_while_appending_leave_a_file_the_next_logger_continues(tmp_path):
    """Two real deaths mid-append. The kernel kills the first writer inside a write (at the file size limit), which
    tears the record it was writing; a SIGKILL of the second lands inside a write or between two. Each time the
    next logger continues the file with whole records and no gap."""
    run_dir, jsonl = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.run(python(APPEND_FOREVER, run_dir, unreachable(), 200_000), stdout=out,
                               stderr=subprocess.STDOUT, timeout=300)
    assert first.returncode == -signal.SIGXFSZ, (tmp_path / "first.log").read_text()[-3000:]
    assert jsonl.stat().st_size == 200_000 and not jsonl.read_bytes().endswith(b"\n")  # a torn last record

    second = tmp_path / "second.log"
    kill_driver_when(python(APPEND_FOREVER, run_dir, unreachable()), second,
                     lambda: jsonl.stat().st_size > 2 << 20, "appending 2 MB of metrics")
    assert f"{jsonl}: dropped its last" in second.read_text()
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(len(steps))) and len(steps) >= 20

    logger = RunLogger(run_dir, uri=unreachable(), experiment="kill")
    logger.log_metrics({"loss": 1.0}, len(steps))
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(len(steps) + 1))
    assert jsonl.read_bytes().endswith(b'"loss": 1.0}\n')


# ---- metrics held back while MLflow is down --------------------------------------------------------------------


LOG_OFFLINE_THEN_WAIT = """
import sys, time
from cluster.runtime.tracking import RunLogger
logger = RunLogger(sys.argv[1], uri=sys.argv[2])  # resumes the run named in the directory's mlflow_run_id
for step in range(2, 5):
    logger.log_metrics({"loss": 1.0 / (step + 1)}, step)
print("held back", flush=True)
time.sleep(600)
"""


def test_metrics_held_back_by_a_killed_process_are_uploaded_once_by_the_next_logger(tmp_path, mlflow_server, capsys):
    """Steps 0-1 reach the server; a process resuming the run while the server is unreachable logs steps 2-4 and is
    killed; the next RunLogger on the run directory sends exactly those three. (To the killed process the server is
    a port where nothing listens, which is what a stopped server is to a client; test_tracking stops and restarts a
    real one mid-run.)"""
    run_dir, log = tmp_path / "run", tmp_path / "child.log"
    first = RunLogger(run_dir, experiment="held-back", run_name="r", uri=mlflow_server)
    for step in range(2):
        first.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert first.online

    kill_driver_when(python(LOG_OFFLINE_THEN_WAIT, run_dir, unreachable()), log,
                     lambda: "held back" in log.read_text(), "three steps logged while the server is unreachable")
    assert "is unreachable" in log.read_text()

    capsys.readouterr()
    logger = RunLogger(run_dir, uri=mlflow_server)
    assert f"3 steps not known to have reached MLflow run {first.run_id}" in capsys.readouterr().err
    assert logger.online  # sent on connecting, before any new step
    logger.log_metrics({"loss": 1.0 / 6}, 5)
    logger.close()
    history = MlflowClient(mlflow_server).get_metric_history(first.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(step, 1.0 / (step + 1)) for step in range(6)]

    again = RunLogger(run_dir, uri=mlflow_server)  # e.g. an evaluation logging into the finished run
    assert again.online and "not known to have reached" not in capsys.readouterr().err
    again.close()


# ---- uploads to a run directory in storage ---------------------------------------------------------------------


UPLOAD_FROM_FIFO = """
import sys
from pathlib import Path
from cluster.runtime import storage
fs, root = storage._filesystem(sys.argv[1])
storage._upload_file(Path(sys.argv[2]), fs, root + "/best/model.safetensors")
"""


def open_fifo_for_writing(fifo: Path, child: subprocess.Popen, log: Path) -> int:
    """The write end of `fifo`, once the child has opened the read end (without hanging if the child died)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return fd


def test_an_upload_killed_midway_leaves_the_previous_file_for_readers(tmp_path, monkeypatch):
    """file:// shows a file while it is written: the upload goes to a temporary name. The source is a FIFO, so the
    test decides how far the upload gets (one 8 MB chunk) before the SIGKILL."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    bucket = tmp_path / "bucket"
    run = storage.RunDir(f"file://{bucket}/run")
    (run.local / "best").mkdir(parents=True)
    (run.local / "best" / "model.safetensors").write_bytes(b"old weights")
    (run.local / "best" / "config.json").write_text("{}")
    run.push("best")
    assert sorted(p.name for p in (bucket / "run" / "best").iterdir()) == ["config.json", "model.safetensors"]

    fifo, log = tmp_path / "new-weights", tmp_path / "child.log"
    os.mkfifo(fifo)
    with open(log, "w") as out:
        child = subprocess.Popen(python(UPLOAD_FROM_FIFO, run.location, fifo), stdout=out,
                                 stderr=subprocess.STDOUT)
    fd = open_fifo_for_writing(fifo, child, log)
    try:
        os.write(fd, b"n" * (9 << 20))  # one whole chunk and a part of the next, which the child waits to complete
        wait_for(lambda: any(p.name.endswith(PARTIAL_SUFFIX) and p.stat().st_size == 8 << 20
                             for p in (bucket / "run" / "best").iterdir()), child, log, "8 MB uploaded")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        os.close(fd)

    assert (bucket / "run" / "best" / "model.safetensors").read_bytes() == b"old weights"
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "other-node"))
    elsewhere = storage.RunDir(run.location)
    elsewhere.pull("best")
    assert sorted(p.name for p in (elsewhere.local / "best").iterdir()) == ["config.json", "model.safetensors"]
    assert (elsewhere.local / "best" / "model.safetensors").read_bytes() == b"old weights"

    (run.local / "best" / "model.safetensors").write_bytes(b"new weights")  # the next push completes
    run.push("best")
    assert (bucket / "run" / "best" / "model.safetensors").read_bytes() == b"new weights"


# ---- the pipeline's stage records --------------------------------------------------------------------------------


REWRITE_STAGES_FOREVER = """
import itertools, sys
from workflow.pipeline import Pipeline, PipelineConfig, StageResult
p = Pipeline(PipelineConfig(root=sys.argv[1]))
for i in itertools.count():
    p._save_record("pretrain", StageResult(key=str(i), outputs={"padding": "x" * (i % 7 * 10000)}, seconds=i))
"""


def test_stage_records_rewritten_by_a_killed_process_stay_whole(tmp_path):
    """The SIGKILL lands anywhere in a loop of rewrites (inside a write, before or after a rename): stages.json is
    always one whole version."""
    pipeline = Pipeline(PipelineConfig(root=str(tmp_path)))

    def rewritten_20_times() -> bool:
        return pipeline.record_file.exists() and int(pipeline._records()["pretrain"]["key"]) >= 20

    kill_driver_when(python(REWRITE_STAGES_FOREVER, tmp_path), tmp_path / "child.log", rewritten_20_times,
                     "20 rewrites of stages.json")
    record = pipeline._records()["pretrain"]
    assert record["outputs"]["padding"] == "x" * (int(record["key"]) % 7 * 10000)
