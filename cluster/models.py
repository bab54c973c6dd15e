"""Resolving a model source given on a command line or in a config into a loaded GPT."""

from __future__ import annotations

import torch

from gpt2 import GPT

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


def load_model(source: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A checkpoint directory of this project, a Hugging Face GPT-2 directory or hub name, or an MLflow model URI
    (models:/NAME/VERSION, runs:/RUN_ID/PATH)."""
    return GPT.from_pretrained(local_model_dir(source), device=device, dtype=dtype).eval()
