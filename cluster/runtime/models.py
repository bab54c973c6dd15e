"""Resolving a model source given on a command line or in a config into a loaded GPT."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from cluster.runtime.mlflow_connection import fail_fast
from gpt2 import GPT
from gpt2.early_exit import EXIT_CONFIG_FILE, load_early_exit

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# Where a model logged by cluster/runtime/mlflow_model.py keeps the checkpoint directory among its artifacts.
CHECKPOINT_ARTIFACT = "checkpoint"


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def local_model_dir(source: str) -> str:
    """A local directory for `source`: MLflow model URIs are downloaded (cached by MLflow), anything else as is."""
    if not is_mlflow_uri(source):
        return source
    import mlflow

    fail_fast()
    try:
        return str(checkpoint_dir_of(mlflow.artifacts.download_artifacts(artifact_uri=source)))
    except Exception as e:  # MLflow raises several types; the user needs the URI and the reason
        raise ValueError(f"cannot fetch model {source} from MLflow at {mlflow.get_tracking_uri()}: {e}") from e


def load_model(source: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A checkpoint directory of this project, a Hugging Face GPT-2 directory or hub name, or an MLflow model URI
    (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH). A directory holding an exit classifier
    (early_exit.json, written by jobs/train_early_exit.py) loads as an EarlyExitGPT, which generates like a GPT and
    counts its exits."""
    directory = local_model_dir(source)
    if (Path(directory) / EXIT_CONFIG_FILE).is_file():
        return load_early_exit(directory, device=device, dtype=dtype).eval()
    return GPT.from_pretrained(directory, device=device, dtype=dtype).eval()


def checkpoint_dir_of(downloaded: str | Path) -> Path:
    """The checkpoint directory inside a downloaded MLflow model, or the directory itself for a plain checkpoint.

    MLflow copies an artifact directory under its own base name (artifacts/final for a run's final/), so the
    path is read from the MLmodel file rather than assumed.
    """
    downloaded = Path(downloaded)
    mlmodel = downloaded / "MLmodel"
    if not mlmodel.exists():
        return downloaded
    artifacts = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {}).get("artifacts", {})
    relative = artifacts.get(CHECKPOINT_ARTIFACT, {}).get("path")
    if relative is None:
        raise ValueError(f"{mlmodel}: not a model logged by this project (no '{CHECKPOINT_ARTIFACT}' artifact)")
    return downloaded / relative
