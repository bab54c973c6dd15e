"""The single-machine services `make demo` needs: a Ray head and an MLflow server, both on loopback.

  python -m cluster.runtime.local_services up      # start what is not running, print the URLs
  python -m cluster.runtime.local_services status
  python -m cluster.runtime.local_services down    # stop what `up` started

The Ray head runs with token authentication (Ray 2.5x+): the token lives in ~/.ray/auth_token, and every client the
project starts sets RAY_AUTH_MODE=token. Dashboard and MLflow bind 127.0.0.1, so nothing is reachable from outside.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.runtime.mlflow_connection import DEFAULT_TRACKING_URI, server_is_up
from cluster.runtime.ray_env import PROJECT_ROOT
from gpt2.durable import write_file_atomically

DASHBOARD_URL = "http://127.0.0.1:8265"
STATE_DIR = PROJECT_ROOT / "runs" / ".services"
MLFLOW_DIR = PROJECT_ROOT / "runs" / "mlflow"


def start_local_server(
    store_dir: str | Path, uri: str = DEFAULT_TRACKING_URI, wait: float = 240.0
) -> subprocess.Popen | None:
    """Start `mlflow server` (SQLite backend, artifacts under `store_dir`, bound to loopback) unless one answers.
    (It answers within seconds on an idle machine, but has taken 80-100 s on a loaded 2-core one: hence `wait`.)

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
    write_file_atomically(store / "server.pid", str(proc.pid).encode())
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


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def client_env() -> dict[str, str]:
    """Environment for Ray clients (job submit, drivers) talking to the local head."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": DASHBOARD_URL}


def ray_head_is_up() -> bool:
    """Whether a head's dashboard answers on this machine. With token authentication on (as this project starts it)
    an unauthenticated request is refused with 401: that is an answer too."""
    try:
        with urllib.request.urlopen(f"{DASHBOARD_URL}/api/version", timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)
    except OSError:
        return False


def start_ray_head() -> bool:
    """Start `ray start --head` on loopback with token auth unless a head answers; True when started here."""
    if ray_head_is_up():
        return False
    env = client_env()
    # Jobs submitted with `-- python ...` run with the head's PATH: put this virtualenv first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([_bin("ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    started = subprocess.run(
        [_bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         "--dashboard-port=8265", "--disable-usage-stats"],
        env=env, capture_output=True, text=True,
    )
    if started.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed:\n{(started.stdout + started.stderr).strip()[-2000:]}")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / "ray_started").write_text("1")
    return True


def up() -> None:
    # Side by side: each start is mostly a wait on its own processes (about 12 and 9 s on an idle 2-core machine).
    with ThreadPoolExecutor(max_workers=2) as pool:
        ray_head = pool.submit(start_ray_head)
        mlflow_server = pool.submit(start_local_server, MLFLOW_DIR, DEFAULT_TRACKING_URI)
        started_ray, started_mlflow = ray_head.result(), mlflow_server.result() is not None
    if started_mlflow:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / "mlflow_started").write_text("1")
    print(f"Ray dashboard: {DASHBOARD_URL} ({'started' if started_ray else 'already running'})")
    print(f"MLflow UI:     {DEFAULT_TRACKING_URI} ({'started' if started_mlflow else 'already running'})")


def down() -> None:
    if (STATE_DIR / "mlflow_started").exists():
        pid_file = MLFLOW_DIR / "server.pid"
        if pid_file.exists():
            stop_server(int(pid_file.read_text()))
            pid_file.unlink()
        (STATE_DIR / "mlflow_started").unlink()
        print("stopped the MLflow server")
    if (STATE_DIR / "ray_started").exists():
        subprocess.run([_bin("ray"), "stop"], env=client_env(), capture_output=True)
        (STATE_DIR / "ray_started").unlink()
        print("stopped the Ray head")


def status() -> None:
    print(f"Ray head ({DASHBOARD_URL}): {'up' if ray_head_is_up() else 'down'}")
    print(f"MLflow ({DEFAULT_TRACKING_URI}): {'up' if server_is_up(DEFAULT_TRACKING_URI) else 'down'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status"])
    {"up": up, "down": down, "status": status}[p.parse_args().action]()


if __name__ == "__main__":
    main()
