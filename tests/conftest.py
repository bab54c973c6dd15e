"""Shared fixtures. One local Ray instance serves the whole test session (starting one takes ~10 s)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance for the session, shut down at the end. 4 logical CPUs on 2 cores lets a 2-worker
    Train run and a Data actor pool coexist; tests never assert timings."""
    import ray

    from cluster.ray_env import init_ray

    init_ray("local", num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_model():
    from gpt2 import GPT, preset

    torch.manual_seed(0)
    return GPT(preset("tiny")).eval()
