"""Deploying the application onto the connected Ray cluster (used by jobs/serve.py and the pipeline job)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request


def deploy(settings: dict, *, host: str = "127.0.0.1", port: int = 8000, name: str = "gpt2", route_prefix: str = "/",
           timeout: float = 180.0) -> str:
    """Start Serve's HTTP proxy on host:port (if Serve is not running yet), deploy the application built from
    `settings` (serving.app.ServerSettings), wait until it answers /healthz, and return its base URL.

    Serve keeps the application running after this process exits (its controller is detached)."""
    from ray import serve as ray_serve

    from serving.app import build_app

    check_port(port)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        ray_serve.run(build_app(settings), name=name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:  # Serve's proxy reports a failed bind as the remote error of its actor, traceback and all
        if "Failed to bind" in str(e):
            raise RuntimeError(f"Serve's HTTP proxy cannot listen on {host}:{port}: another program may hold the port"
                               f" (or it needs privileges), or {host} is not an address of this machine; choose"
                               " another port or host") from None
        raise
    base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    wait_healthy(f"{base}/healthz", timeout)
    return base


def check_port(port: object, setting: str = "port") -> None:
    """Serve's proxy with port 0 or one beyond 65535 crashes Ray's core or retries forever: refused here, naming
    the `setting` that gave it."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{setting} must be a TCP port number in 1-65535, got {port!r}")


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the application did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)
