"""The driver side of every Ray Train job: one place that builds the TorchTrainer from a job's scaling and run
settings, makes the paths that workers read absolute, and resolves the MLflow tracking URI, so that all training jobs
start, resume and fail over the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.config.sections import Run, Scaling
from cluster.runtime import storage
from cluster.runtime.mlflow_connection import tracking_uri


def absolute_paths(config: dict, fields: Sequence[tuple[str, str]]) -> dict:
    """A copy of a job's config dict with these (section, key) paths made absolute, for workers that start in
    another directory. URIs are kept as given; a model source is made absolute only where it is a local path (a hub
    name such as "gpt2" or an MLflow URI stays)."""
    resolved = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for section, key in fields:
        value = resolved[section][key]
        if isinstance(value, (list, tuple)):
            resolved[section][key] = [storage.absolute(v) for v in value]
        elif isinstance(value, str) and (storage.is_uri(value) or storage.exists(value) or key != "source"):
            resolved[section][key] = storage.absolute(value)
    return resolved


def trainer(
    loop: Callable[[dict], Any],
    loop_config: dict,
    *,
    scaling: Scaling,
    run: Run,
    run_dir: str,
    keep_checkpoints: int | None = None,
    tracking: str | None = None,
) -> TorchTrainer:
    """The TorchTrainer that runs `loop` on `scaling.num_workers` Ray Train workers.

    Checkpoints and Ray's own state go to <run_dir>/train, so the same run directory again resumes from its newest
    checkpoint, and a worker group that fails restarts from it up to `run.max_failures` times. The loop receives
    `loop_config` plus "tracking_uri": `tracking`, else run.tracking_uri, else the driver's MLFLOW_TRACKING_URI or the
    local server, resolved here once because workers do not see the driver's environment.
    """
    return TorchTrainer(
        loop,
        train_loop_config={**loop_config, "tracking_uri": tracking_uri(tracking or run.tracking_uri)},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=storage.absolute(run_dir),
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )


def launch(loop: Callable[[dict], Any], loop_config: dict, **settings: Any) -> ray.train.Result:
    """Train with `trainer(loop, loop_config, **settings)` and wait for the result (Result.error says how a run
    failed), after creating a local run directory."""
    if not storage.is_uri(settings["run_dir"]):
        Path(settings["run_dir"]).mkdir(parents=True, exist_ok=True)
    return trainer(loop, loop_config, **settings).fit()
