"""A checkpoint directory as an MLflow model: a pyfunc that generates text, with the directory as its artifact.

The checkpoint stays in this project's HF-compatible format under the model's `artifacts/checkpoint/`, so
`models:/NAME@ALIAS` resolves to a directory that this project, the server and `transformers` all load. The model
carries the `gpt2` and `cluster` packages (code_paths) and the pinned requirements, so `mlflow.pyfunc.load_model` and
`mlflow models serve` need neither this checkout nor the project installed. Registration: cluster/runtime/registry.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from cluster.runtime.models import CHECKPOINT_ARTIFACT, load_model

CODE_PACKAGES = ("gpt2", "cluster")  # what unpickling the model and loading a checkpoint import

# The sampling options of gpt2.generate, with its meaning of None (top_k, top_p: off; seed: unseeded). Without a
# params schema MLflow drops every params= entry with a warning.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),  # unnamed: a list of prompts or any one-column DataFrame
    outputs=Schema([ColSpec("string")]),  # the continuation of each prompt, without the prompt
    params=ParamSchema([
        ParamSpec("max_tokens", "long", 64),
        ParamSpec("temperature", "double", 0.0),  # 0: greedy
        ParamSpec("top_k", "long", None),
        ParamSpec("top_p", "double", None),
        ParamSpec("seed", "long", None),  # prompt i samples with seed + i
    ]),
)
INPUT_EXAMPLE = (["Once upon a time"], {"max_tokens": 8})


class GPT2TextModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts in, their continuations out; sampling as SIGNATURE's params say."""

    def load_context(self, context) -> None:
        from gpt2 import get_tokenizer
        from gpt2.device import choose

        device, dtype = choose(None, "float32")
        # An early-exit checkpoint loads as an EarlyExitGPT and generates with its exits.
        self.model = load_model(context.artifacts[CHECKPOINT_ARTIFACT], device=device, dtype=dtype)
        self.enc = get_tokenizer()

    # pd.DataFrame is the one input hint MLflow takes without inferring a signature of its own (SIGNATURE is the
    # contract) or converting the input; an unannotated predict draws a warning at every import.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from gpt2.config import EOT_TOKEN
        from gpt2.generate import generate

        options = {spec.name: spec.default for spec in SIGNATURE.params.params} | dict(params or {})
        # An empty prompt starts from end-of-text, as a new document does (generation needs one token to start).
        rows = [self.enc.encode_ordinary(str(p)) or [EOT_TOKEN] for p in model_input.iloc[:, 0]]
        new = generate(
            self.model, rows, int(options["max_tokens"]), temperature=float(options["temperature"]),
            top_k=options["top_k"] or None, top_p=options["top_p"], seed=options["seed"],
            crop_prompt=True,  # a prompt too long for the context keeps its last tokens
        )
        return [self.enc.decode(tokens) for tokens in new]


def _requirements(project_root: Path) -> list[str]:
    """The project's pinned runtime requirements: given explicitly, MLflow skips its slow requirement inference."""
    lines = (project_root / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def log_checkpoint_model(
    uri: str,
    run_id: str,
    model_dir: str | Path,
    registered_name: str,
    *,
    kind: str,
    note: str | None = None,
    tags: Mapping[str, object] | None = None,
) -> str:
    """Log `model_dir` into run `run_id` as model "model" and register it as a new version of `registered_name`
    (see cluster.runtime.registry.register for kind, note and tags). Returns models:/NAME/VERSION."""
    # Not at the top: what loading the model imports stays small (no Ray, no tracking settings).
    from cluster.runtime.ray_env import PROJECT_ROOT
    from cluster.runtime.registry import register

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=GPT2TextModel(),
            artifacts={CHECKPOINT_ARTIFACT: str(model_dir)},
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,  # MLflow also checks it: it loads the logged model and predicts once
            code_paths=[str(PROJECT_ROOT / package) for package in CODE_PACKAGES],
            pip_requirements=_requirements(PROJECT_ROOT),
        )
    version = register(
        mlflow.MlflowClient(uri), info.model_uri, run_id, registered_name, kind=kind,
        model_dir=model_dir, note=note, tags=tags,
    )
    return f"models:/{registered_name}/{version.version}"
