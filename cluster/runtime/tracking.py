"""MLflow tracking that never stops a training run.

Every metric is appended to `<run_dir>/metrics.jsonl` first, then sent to MLflow. When the tracking server is
unreachable the run goes on: one warning, and the batches not yet sent are retried every RETRY_SECONDS and uploaded
when the server is back. The MLflow run id is kept in `<run_dir>/mlflow_run_id`, so a resumed job continues the same
MLflow run, and `<run_dir>/mlflow_uploaded.jsonl` records how much of metrics.jsonl that run has received, so what a
process held back and never sent (it was killed, or exited while the server was down) is sent by the next RunLogger
on the directory. Only rank 0 creates a RunLogger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from cluster.runtime.mlflow_connection import fail_fast, tracking_uri
from cluster.runtime.provenance import git_commit
from gpt2.durable import write_file_atomically

RETRY_SECONDS = 30.0
UPLOADED_FILE = "mlflow_uploaded.jsonl"  # one mark per upload: {"run_id", "bytes" of metrics.jsonl it has received}
log = logging.getLogger(__name__)


class RunLogger:
    """Metrics, params and artifacts of one run, to MLflow and to `run_dir/metrics.jsonl`.

    A run directory that already holds `mlflow_run_id` resumes that run; otherwise a run `run_name` is created in
    `experiment` (which may then be omitted only if the run exists)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        experiment: str | None = None,
        run_name: str | None = None,
        uri: str | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        fail_fast()
        self.run_dir = Path(run_dir)
        if experiment is None and not self._id_file().is_file():
            raise ValueError(f"{self._id_file()} does not exist: name the experiment to start a new run in")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.uploaded = self.run_dir / UPLOADED_FILE
        self.uri = tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment, self.run_name = experiment, run_name
        self._params, self._tags = dict(params or {}), dict(tags or {})
        # The records of metrics.jsonl that MLflow has not received, and where the file ends (the mark to write
        # once they are sent).
        self._pending, self._end = self._resume_metrics()
        self._next_try = 0.0
        self._warned = False
        self.run_id: str | None = None
        self._connect()
        self.flush()  # what an earlier process held back goes now, if the server answers

    # -- connection ---------------------------------------------------------------------------------------------

    def _id_file(self) -> Path:
        return self.run_dir / "mlflow_run_id"

    def _resume_metrics(self) -> tuple[list[dict], int]:
        """The records of metrics.jsonl that the run in mlflow_run_id has not received, and the file's length.

        The last mark in mlflow_uploaded.jsonl says how many bytes of metrics.jsonl the run has received. Without a
        mark for this run everything is sent: to a new run, the whole history; to a run whose directory has no marks
        (written before they were kept, or pulled from another node without them), records it already holds, which
        MLflow's SQL store ignores (a metric with the same key, step, timestamp and value is stored once). A mark
        beyond the end of metrics.jsonl means the file was replaced by an older copy (a mirror pulled again from
        the bucket): nothing in it is new."""
        marks, _ = _resume_jsonl(self.uploaded)
        run_id = self._id_file().read_text().strip() if self._id_file().is_file() else None
        sent = marks[-1]["bytes"] if marks and marks[-1]["run_id"] == run_id else 0
        records, end = _resume_jsonl(self.jsonl, start=sent)
        if records:  # held back while the server was unreachable, or sent just before the process ended
            print(f"{self.jsonl}: {len(records)} steps not known to have reached MLflow run"
                  f" {run_id or '(not created yet)'}; they are sent when the server answers", file=sys.stderr)
        return records, end

    def _connect(self, force: bool = False) -> bool:
        """Create or resume the MLflow run; False (and a single warning) while the server is unreachable.
        After a failure the next attempt waits RETRY_SECONDS unless `force`d."""
        if self.run_id is not None:
            return True
        if self._backing_off(force):
            return False
        try:
            if self._id_file().exists():
                self.run_id = self._id_file().read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
                run = self.client.create_run(exp_id, run_name=self.run_name or self.run_dir.name, tags=self._tags)
                self.run_id = run.info.run_id
                write_file_atomically(self._id_file(), self.run_id.encode())
                self._log_params(self._params)
            return True
        except Exception as e:  # MLflow raises many types for connectivity; all mean "not now"
            self.run_id = None
            self._offline(e)
            return False

    def _offline(self, error: Exception) -> None:
        self._next_try = time.monotonic() + RETRY_SECONDS
        if not self._warned:
            self._warned = True
            print(
                f"WARNING: MLflow at {self.uri} is unreachable ({type(error).__name__}); the job continues and metrics"
                f" are kept in {self.jsonl} (uploaded when the server is back)",
                file=sys.stderr,
            )

    @property
    def online(self) -> bool:
        return self.run_id is not None and not self._pending

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    # -- logging ------------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": int(time.time() * 1000), **metrics}
        with open(self.jsonl, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())
            self._end = f.tell()
        self._pending.append(record)
        self.flush()

    def _backing_off(self, force: bool) -> bool:
        """True while the server failed less than RETRY_SECONDS ago, whether it was never reached or went away after
        the run was created: an outage costs one failed request per RETRY_SECONDS, not one per step."""
        return not force and time.monotonic() < self._next_try

    def flush(self, force: bool = False) -> None:
        if not self._pending or self._backing_off(force) or not self._connect(force):
            return
        from mlflow.entities import Metric

        try:
            batch = [Metric(k, float(v), r["time"], r["step"]) for r in self._pending for k, v in r.items()
                     if k not in ("step", "time")]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        except Exception as e:
            self._offline(e)
            return
        # The mark is written only after the server has the records, so a crash at any point loses nothing; a
        # crash between the two sends them again, which the server ignores (see _resume_metrics). Marks are appended
        # rather than a small file rewritten: that costs no rename and no fsync at every step.
        with open(self.uploaded, "a") as f:
            f.write(json.dumps({"run_id": self.run_id, "bytes": self._end}) + "\n")
        if self._warned:
            print(f"MLflow at {self.uri} is reachable again: uploaded {len(self._pending)} held-back steps", file=sys.stderr)
            self._warned = False  # a later outage is reported again
        self._pending.clear()

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self.run_dir / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, text.encode())
        self._try(lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._try(lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._try(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._try(lambda k=k, v=v: self.client.set_tag(self.run_id, k, v))

    def log_model(
        self,
        model_dir: str | Path,
        kind: str,
        *,
        registered_name: str | None = None,
        note: str | None = None,
        tags: Mapping[str, object] | None = None,
    ) -> str | None:
        """Log a checkpoint directory as an MLflow model (name "model") and register it as a new version of
        `registered_name`, by default gpt2-<run name>-<kind> (see cluster/runtime/registry.py for kind, note and tags).
        Returns models:/NAME/VERSION, or None while the server is unreachable."""
        if not self._connect():
            return None
        try:
            from cluster.runtime.mlflow_model import log_checkpoint_model
            from cluster.runtime.registry import default_name

            run_name = self.run_name or self.client.get_run(self.run_id).info.run_name  # a resumed run has no name
            name = registered_name or default_name(run_name, kind)
            return log_checkpoint_model(self.uri, self.run_id, model_dir, name, kind=kind, note=note, tags=tags)
        except Exception as e:
            # Not retried later (unlike metrics): say that the model is unregistered, and why, whatever the cause.
            print(f"WARNING: the model in {model_dir} was not logged or registered in MLflow at {self.uri}:"
                  f" {type(e).__name__}: {e}", file=sys.stderr)
            return None

    def tag_model_versions(self, metrics: Mapping[str, float], model_uri: str | None = None) -> None:
        """Add the registry's figures among `metrics` (an evaluation measured after registration) to the versions
        registered from this run, or to the version that the MLflow URI `model_uri` names."""
        from cluster.runtime.registry import tag_versions_named_by, tag_versions_of_run

        if model_uri:
            self._try(lambda: tag_versions_named_by(self.client, model_uri, metrics))
        else:
            self._try(lambda: tag_versions_of_run(self.client, self.run_id, metrics))

    def _try(self, fn) -> None:
        if not self._backing_off(force=False) and self._connect():
            try:
                fn()
            except Exception as e:
                self._offline(e)

    def close(self, status: str = "FINISHED") -> None:
        self._next_try = 0.0  # one last attempt to deliver everything, whatever the retry timer says
        self.flush(force=True)
        if self._connect(force=True):
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as e:
                self._offline(e)


def fresh_run_logger(run_dir: str | Path, **kwargs: Any) -> RunLogger:
    """A RunLogger that starts a new MLflow run, for the one-shot jobs (analyses, comparisons, profiles) that do not
    resume: a previous run's id and metrics in `run_dir` are dropped, as the job's other files there are replaced,
    rather than continued (which kept the old run's params and added the new figures to its metrics)."""
    run_dir = Path(run_dir)
    for name in ("mlflow_run_id", "metrics.jsonl", UPLOADED_FILE):
        (run_dir / name).unlink(missing_ok=True)
    return RunLogger(run_dir, **kwargs)


def run_tags(run_name: str, num_workers: int, use_gpu: bool) -> dict[str, str]:
    """Tags every training run carries: the code version, the Ray job, the hardware."""
    import platform

    import ray

    return {
        "git_commit": git_commit(),
        "ray_job_id": ray.get_runtime_context().get_job_id() if ray.is_initialized() else "",
        "run_name": run_name,
        "hardware": f"{num_workers}x {'GPU' if use_gpu else 'CPU'} ({platform.machine()})",
    }


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics.jsonl (without a torn last line, see _read_jsonl); a step logged again after a resume
    replaces the earlier record of that step."""
    rows: dict[tuple, dict] = {}
    for rec in _read_jsonl(Path(run_dir) / "metrics.jsonl")[0]:
        rows[(rec["step"], tuple(sorted(k for k in rec if k not in ("step", "time"))))] = rec
    return sorted(rows.values(), key=lambda r: r["step"])


def _read_jsonl(path: Path, start: int = 0) -> tuple[list[dict], int]:
    """The records of the append-only JSON-lines file `path` from byte `start` on, and the length of its complete
    lines in bytes (no file: no records).

    Each record is appended as one line ending in a newline, so bytes after the last newline are a record whose
    append was cut short (its writer was killed, or is writing it right now): not a record yet, left out. Any
    earlier line was complete when written, so one that does not parse means the file was damaged: an error
    naming the file and line."""
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1
    start = min(start, end)
    records = []
    for number, line in enumerate(data[start:end].split(b"\n")[:-1], start=data.count(b"\n", 0, start) + 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:  # also bytes that are not UTF-8
            raise ValueError(
                f"{path}, line {number}: not a complete JSON record ({e}). Only the last line of this append-only"
                " file can be torn by a kill; a torn line with records after it means the file was appended to"
                " without cutting the torn end off first, or was damaged otherwise"
            ) from e
    return records, end


def _resume_jsonl(path: Path, start: int = 0) -> tuple[list[dict], int]:
    """_read_jsonl for a writer that is about to append to `path`: a torn last line is cut off first, so the next
    record starts a line of its own instead of being glued to the torn one."""
    records, end = _read_jsonl(path, start)
    torn = path.stat().st_size - end if path.exists() else 0
    if torn:
        log.warning("%s: dropped its last %d bytes, a record whose append was cut short (the process writing it was"
                    " killed)", path, torn)
        os.truncate(path, end)
    return records, end

