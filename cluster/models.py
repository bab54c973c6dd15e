"""Resolving a model source given on a command line or in a config into a loaded GPT."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2 import GPT
from gpt2.early_exit import EXIT_CONFIG_FILE, load_early_exit

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_SCHEMES)


def local_model_dir(source: str) -> str:
    """A local directory for `source`: MLflow model URIs are downloaded (cached by MLflow), anything else as is."""
    if not is_mlflow_uri(source):
        return source
    import mlflow

    from cluster.mlflow_model import checkpoint_dir_of

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
