"""Which MLflow server a process talks to, whether it answers, and how long the client waits for it."""

from __future__ import annotations

import os
import re
import urllib.parse
import urllib.request

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
# The stores MLflow 3 opens besides its deprecated file store: a tracking server and the databases of its SQL store
# (whose scheme may name a driver: postgresql+psycopg2://).
STORE_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking_uri(configured: str | None, setting: str = "--tracking-uri") -> str:
    """The tracking URI a job will use (`configured`, else $MLFLOW_TRACKING_URI, else the local server), refused
    with a ValueError naming where it came from when MLflow cannot open it: a folder or file: URI (MLflow 3 refuses
    its file store unless MLFLOW_ALLOW_FILE_STORE=true, and did so with a traceback when the job logged its first
    metric) or a scheme MLflow has no store for. `setting` names the job's own option, e.g. "--tracking-uri"."""
    uri = tracking_uri(configured)
    origin = setting if configured else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else None
    if origin is None:
        return uri
    if uri in ("databricks", "databricks-uc"):  # MLflow's names of a workspace's default profile
        return uri
    if re.fullmatch(r"[\w.-]+:\d+/?", uri):  # "localhost:5000" reads as a folder or an unknown scheme
        raise ValueError(f"{origin}={uri}: a tracking server is named with its scheme, e.g. http://{uri}")
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0].lower()
    if scheme in ("", "file") or len(scheme) == 1:  # a path (a drive letter on Windows) or file:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        if MLFLOW_ALLOW_FILE_STORE.get():
            return uri
        raise ValueError(
            f"{origin}={uri}: MLflow 3 no longer writes runs to a folder (its file store is refused unless"
            f" MLFLOW_ALLOW_FILE_STORE=true); give a tracking server ({DEFAULT_TRACKING_URI}, started by `make demo`"
            " or `python -m cluster.runtime.local_services up`) or a database (sqlite:////absolute/path/mlflow.db)")
    if scheme not in STORE_SCHEMES:
        raise ValueError(f"{origin}={uri}: MLflow has no store for '{scheme}:' URIs (it takes"
                         f" {', '.join(s + ':' for s in STORE_SCHEMES)})")
    return uri


def fail_fast() -> None:
    """Have MLflow's HTTP client give up after one 20-second try instead of retrying for minutes, so an unreachable
    server costs seconds once. Called where this project talks to MLflow, not at import; a value the user set wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def server_is_up(uri: str, timeout: float = 2.0) -> bool:
    if not uri.startswith("http"):
        return True  # a database or file URI needs no server
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False
