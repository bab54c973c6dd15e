"""A checkpoint directory as an MLflow model: a pyfunc that generates text, with the directory as its artifact.

The checkpoint stays in this project's HF-compatible format under the model's `artifacts/checkpoint/`, so
`models:/NAME/VERSION` resolves to a directory that this project, the server and `transformers` all load.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc

CHECKPOINT_ARTIFACT = "checkpoint"


class GPT2TextModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame/list of prompts in, generated continuations out (greedy, 64 tokens)."""

    def load_context(self, context) -> None:
        from gpt2 import GPT, get_tokenizer

        self.model = GPT.from_pretrained(context.artifacts[CHECKPOINT_ARTIFACT])
        self.enc = get_tokenizer()

    def predict(self, context, model_input, params=None):
        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        max_tokens = int((params or {}).get("max_tokens", 64))
        rows = [self.enc.encode_ordinary(str(p)) for p in prompts]
        return [self.enc.decode(t) for t in self.model.generate(rows, max_tokens, temperature=0)]


def _requirements() -> list[str]:
    """The project's pinned runtime requirements: given explicitly, MLflow skips its slow requirement inference."""
    from cluster.ray_env import PROJECT_ROOT

    lines = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def log_checkpoint_model(uri: str, run_id: str, model_dir: str | Path, registered_name: str | None) -> str:
    """Log `model_dir` into run `run_id` as model "model"; register it under `registered_name` when given."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=GPT2TextModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(model_dir)},
            registered_model_name=registered_name,
            pip_requirements=_requirements(),
        )
    return info.model_uri if registered_name is None else f"models:/{registered_name}/{info.registered_model_version}"


def checkpoint_dir_of(downloaded: str | Path) -> Path:
    """The checkpoint directory inside a downloaded MLflow model, or the directory itself for a plain checkpoint.

    MLflow copies an artifact directory under its own base name (artifacts/final for a run's final/), so the
    path is read from the MLmodel file rather than assumed.
    """
    import yaml

    downloaded = Path(downloaded)
    mlmodel = downloaded / "MLmodel"
    if not mlmodel.exists():
        return downloaded
    artifacts = yaml.safe_load(mlmodel.read_text()).get("flavors", {}).get("python_function", {}).get("artifacts", {})
    relative = artifacts.get(CHECKPOINT_ARTIFACT, {}).get("path")
    if relative is None:
        raise ValueError(f"{mlmodel}: not a model logged by this project (no '{CHECKPOINT_ARTIFACT}' artifact)")
    return downloaded / relative
