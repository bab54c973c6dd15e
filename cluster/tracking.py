"""MLflow tracking that never stops a training run.

Every metric is appended to `<run_dir>/metrics.jsonl` first, then sent to MLflow. When the tracking server is
unreachable the run goes on: one warning, and the batches not yet sent are retried every RETRY_SECONDS and uploaded
when the server is back. The MLflow run id is kept in `<run_dir>/mlflow_run_id`, so a resumed job continues the same
MLflow run. Only rank 0 creates a RunLogger.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
RETRY_SECONDS = 30.0
log = logging.getLogger(__name__)

# Fail fast instead of MLflow's default minutes of retries, so an unreachable server costs seconds once.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def server_is_up(uri: str, timeout: float = 2.0) -> bool:
    if not uri.startswith("http"):
        return True  # a database or file URI needs no server
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def start_local_server(store_dir: str | Path, uri: str = DEFAULT_TRACKING_URI, wait: float = 60.0) -> subprocess.Popen | None:
    """Start `mlflow server` (SQLite backend, artifacts under `store_dir`, bound to loopback) unless one answers.

    The server is detached from this process so it outlives the job; its pid is written to store_dir/server.pid.
    """
    if server_is_up(uri):
        return None
    parsed = urllib.parse.urlparse(uri)
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
        "--host", parsed.hostname or "127.0.0.1", "--port", str(parsed.port or 5000), "--workers", "1",
    ]
    # The server's background job runner (for MLflow's GenAI evaluation jobs) is half a dozen extra processes that
    # tracking training runs never uses; on a small machine they compete with training for the CPUs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(store / "server.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    (store / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if server_is_up(uri):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {store / 'server.log'}")
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mlflow server did not answer at {uri} within {wait:.0f}s; see {store / 'server.log'}")


def stop_server(pid: int, timeout: float = 30.0) -> None:
    """Stop a server started by start_local_server: its whole process group (mlflow runs worker processes)."""
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.killpg(pid, 0)  # raises once every process of the group is gone
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

        self.run_dir = Path(run_dir)
        if experiment is None and not self._id_file().is_file():
            raise ValueError(f"{self._id_file()} does not exist: name the experiment to start a new run in")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.uri = tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment, self.run_name = experiment, run_name
        self._params, self._tags = dict(params or {}), dict(tags or {})
        self._pending: list[tuple[dict[str, float], int, int]] = []
        self._next_try = 0.0
        self._warned = False
        self.run_id: str | None = None
        self._connect()

    # -- connection ---------------------------------------------------------------------------------------------

    def _id_file(self) -> Path:
        return self.run_dir / "mlflow_run_id"

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
                self._id_file().write_text(self.run_id)
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
                f"WARNING: MLflow at {self.uri} is unreachable ({type(error).__name__}); training continues and metrics"
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
        timestamp = int(time.time() * 1000)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, "time": timestamp, **metrics}) + "\n")
        self._pending.append((metrics, step, timestamp))
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
            batch = [Metric(k, float(v), ts, step) for m, step, ts in self._pending for k, v in m.items()]
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        except Exception as e:
            self._offline(e)
            return
        if self._warned:
            print(f"MLflow at {self.uri} is reachable again: uploaded {len(self._pending)} held-back steps", file=sys.stderr)
            self._warned = False  # a later outage is reported again
        self._pending.clear()

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self.run_dir / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
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
        `registered_name`, by default gpt2-<run name>-<kind> (see cluster/registry.py for kind, note and tags).
        Returns models:/NAME/VERSION, or None while the server is unreachable."""
        if not self._connect():
            return None
        try:
            from cluster.mlflow_model import log_checkpoint_model
            from cluster.registry import default_name

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
        from cluster.registry import tag_versions_named_by, tag_versions_of_run

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


def git_commit() -> str:
    """The commit of this checkout, or "" where it is not a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics.jsonl; a step logged again after a resume replaces the earlier record of that step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            rows[(rec["step"], tuple(sorted(k for k in rec if k not in ("step", "time"))))] = rec
    return sorted(rows.values(), key=lambda r: r["step"])

