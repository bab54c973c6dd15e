"""Shared fixtures. One local Ray instance serves the whole test session (starting one takes ~10 s)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Tests that track runs start their own MLflow server (the mlflow_server fixture) and pass its URI; everything else
# must never reach a developer's real server, so the default points at a port where nothing listens.
os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance for the session, shut down at the end. 4 logical CPUs on 2 cores lets a 2-worker
    Train run and a Data actor pool coexist; tests never assert timings."""
    import ray

    from cluster.runtime.ray_env import init_ray
    from cluster.runtime.storage import CACHE_ENV

    # Node-local copies of remote runs and shards go to a temporary folder, not the user's cache; Ray's processes
    # inherit the variable from this one.
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("node-cache"))
    init_ray("local", num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite, artifacts in a temporary folder) on a free loopback port; yields its URI."""
    from cluster.runtime.local_services import free_port, start_local_server, stop_server

    uri = f"http://127.0.0.1:{free_port()}"
    proc = start_local_server(tmp_path_factory.mktemp("mlflow"), uri)
    yield uri
    # The server is this process's child: reap it as soon as it exits, or stop_server would see the zombie as a
    # live member of the group and wait its whole timeout.
    threading.Thread(target=proc.wait, daemon=True).start()
    stop_server(proc.pid)


@pytest.fixture
def tiny_model():
    from gpt2 import GPT, preset

    torch.manual_seed(0)
    return GPT(preset("tiny")).eval()
