"""Connecting to Ray: the running cluster when there is one, else a local instance on this machine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # cluster/runtime/ray_env.py -> the checkout
log = logging.getLogger(__name__)


def use_token_auth() -> None:
    """Token authentication for every Ray connection this process makes, as the heads this project starts use it
    (cluster/runtime/local_services.py), unless RAY_AUTH_MODE says otherwise.

    Ray reads RAY_AUTH_MODE once, when it is imported. A driver that imported ray before the variable was set would
    start a local instance whose processes (which read the variable when they start) demand a token the driver never
    sends, so Ray's configuration is read again here when it disagrees: the order of imports no longer matters.
    """
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    wanted = os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not ray.is_initialized() and (get_authentication_mode() == AuthenticationMode.TOKEN) != (wanted == "token"):
        Config.initialize("")


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Connect once per process and return how: "existing", "cluster" or "local".

    Order: an already initialised Ray (e.g. inside `ray job submit`, where RAY_ADDRESS is set and the job's working
    directory is shipped to every worker); an explicit `address` or RAY_ADDRESS; a head started on this machine with
    `ray start --head`; otherwise a fresh local instance that lives as long as this process.
    address="local" always starts a fresh local instance (tests use it so they never touch a user's cluster).
    """
    if ray.is_initialized():
        return "existing"
    use_token_auth()
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    if address != "local":
        try:
            ray.init(address="auto", log_to_driver=True)
            return "cluster"
        except ConnectionError:
            pass
    # Local workers run this same virtualenv, where `make setup` installed the project in editable mode; the
    # PYTHONPATH covers a checkout that was not installed that way.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    # The dashboard (on 127.0.0.1) also serves the state API that Ray Train uses to watch its own actors.
    # address="local": a new instance even when a head runs on this machine (ray.init() with no address would join
    # it, and refuse num_cpus there), so tests never run on a user's `make demo` head.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, runtime_env={"env_vars": env},
             log_to_driver=True)
    log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))
    return "local"


def quiet_train_reports() -> None:
    """Ray Train logs every `ray.train.report` call of every rank at INFO, with the whole metrics dict: two long
    lines per step on two workers. The worker loops print their own one-line progress instead, so that logger is
    raised to WARNING in the calling worker (nothing happens if Ray moves it)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
