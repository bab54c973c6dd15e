"""Ray clusters of their own for tests, on this machine: a head, and worker nodes that can be lost for real.

Each node is a `ray start --block` in a process group of its own, so losing a node is SIGKILL to that group: its
raylet, its object store, its agents and every worker process it started die at once, as when a machine goes away
(`ray stop` would stop every Ray on the machine, the test session's included). Every node shares the cluster's
RAY_TMPDIR, where Ray also keeps the head's address: a driver started with `env` finds this cluster with
address="auto", unaffected by any other Ray on the machine. Token authentication is on, as on the heads this project
starts (`make demo`, cluster/runtime/local_services.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.doc_commands import ROOT

RAY = str(Path(sys.executable).parent / "ray")


def user_env() -> dict[str, str]:
    """The environment of a user's shell: no Ray address, no auth mode, no MLflow URI of the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_group(leader: subprocess.Popen, timeout: float = 30, sigs=(signal.SIGTERM, signal.SIGKILL)) -> None:
    """Each signal in turn to the leader's whole process group, the next once `timeout` has passed; returns when
    none of the group is left (the leader is reaped here, or its zombie would keep the group alive)."""
    for sig in sigs:
        try:
            os.killpg(leader.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader.poll()
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


class LocalCluster:
    """A head (`head_cpus` CPUs; 0 keeps work off it, as on a real cluster's head) and the worker nodes added to it.

    Use as a context manager; `address` is the GCS address for RAY_ADDRESS or `--address`, `env` the environment
    a driver of this cluster runs with.
    """

    def __init__(self, head_cpus: int = 0):
        self.tmpdir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths live under it
        self.env = {**user_env(), "RAY_AUTH_MODE": "token", "RAY_TMPDIR": self.tmpdir}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self._logs: list = []
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        self.head = self._start("head", [
            "--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ])
        deadline = time.monotonic() + 120
        while not _answers(self.port):
            self._check_alive(self.head, "head", deadline)
            time.sleep(0.5)
        self._wait_started(self.head, "head")

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> subprocess.Popen:
        """A worker node joined to the head; returns once its raylet runs (Ray reports the node started)."""
        name = f"node{len(self.nodes) + 1}"
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        node = self._start(name, args)
        self._wait_started(node, name)
        self.nodes.append(node)
        return node

    def lose(self, node: subprocess.Popen) -> None:
        """The node is gone at once, as when its machine fails: SIGKILL to every process it runs."""
        _kill_node(node)
        self.nodes.remove(node)

    def remove_worker_nodes(self) -> None:
        for node in self.nodes:
            _kill_node(node)
        self.nodes.clear()

    def runs(self, node: subprocess.Popen, title: str) -> bool:
        """Whether a process of `node` has `title` in its command line (Ray names a worker process after the actor
        or task it runs, e.g. "ray::RayTrainWorker")."""
        import psutil

        with contextlib.suppress(psutil.Error):
            return any(title in " ".join(p.cmdline()) for p in psutil.Process(node.pid).children(recursive=True))
        return False

    def log(self, name: str) -> str:
        return (Path(self.tmpdir) / f"{name}.log").read_text(errors="replace")

    def shutdown(self) -> None:
        """Every node killed (a test cluster keeps nothing worth a graceful stop, which takes Ray half a minute)."""
        for node in [*self.nodes, self.head]:
            _kill_node(node)
        for f in self._logs:
            f.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(Path(self.tmpdir) / f"{name}.log", "w")
        self._logs.append(log)
        process = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        return process

    def _wait_started(self, process: subprocess.Popen, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log(name):
            self._check_alive(process, name, deadline)
            time.sleep(0.5)

    def _check_alive(self, process: subprocess.Popen, name: str, deadline: float) -> None:
        assert process.poll() is None and time.monotonic() < deadline, (
            f"the test cluster's {name} did not start:\n{self.log(name)[-3000:]}")


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL to a node's processes: its process group and its descendants (Ray starts its workers in process
    groups of their own)."""
    import psutil

    try:
        descendants = psutil.Process(node.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            process.kill()
    stop_group(node, sigs=(signal.SIGKILL,))
    psutil.wait_procs(descendants, timeout=30)
