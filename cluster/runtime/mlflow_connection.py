"""Which MLflow server a process talks to, whether it answers, and how long the client waits for it."""

from __future__ import annotations

import os
import urllib.request

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


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
