"""The MLflow model registry as this project fills it: one registered model per kind of model and run, so a version
number only ever means "the n-th registration of this model".

Names: `gpt2-<run name>-<kind>` (kind: pretrained, finetuned, early-exit, distilled), or the run config's
`run.registered_model`. Every version carries
- a description: one line saying what it is and which run made it, then the model card (the checkpoint's README.md,
  or for a checkpoint written without one, a card rendered from its config and the run's figures);
- tags: `kind`, `val_loss`, `hellaswag_acc_norm`/`hellaswag_acc`/`hellaswag_examples` once measured (also by a
  later evaluation of the run's checkpoint or of a models:/ URI), `tokens_seen` (the tokens the model was trained
  on by its job), `git_commit`, `source_run` (run id) and `source_run_name` (experiment/run name), plus what the
  job adds;
- the alias `champion`, moved on every registration to the version with the lowest `val_loss` (the newest while
  none has one), so `models:/NAME@champion` always names the one to use. The newest version is MLflow's own
  `models:/NAME/latest`: MLflow reserves `latest` as an alias name for that meaning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from cluster.runtime.provenance import git_commit

CHAMPION = "champion"
# model_versions.description is VARCHAR(5000) in MLflow's SQL schema: Postgres and MySQL refuse a longer one.
MAX_DESCRIPTION = 5000

# Where each figure may sit in a run's metrics, first match wins: a fine-tune exports its best epoch, whose loss it
# records as best_val_loss; the evaluate job logs eval/<its name>; pretraining measures HellaSwag in its loop.
METRIC_SOURCES = {
    "val_loss": ("best_val_loss", "val_loss"),
    "hellaswag_acc_norm": ("eval/hellaswag/completion/acc_norm", "hellaswag_acc_norm"),
    "hellaswag_acc": ("eval/hellaswag/completion/acc", "hellaswag_acc"),
    "hellaswag_examples": ("eval/hellaswag/examples",),
}


def default_name(run_name: str, kind: str) -> str:
    return f"gpt2-{run_name}-{kind}"


def figures(metrics: Mapping[str, float]) -> dict[str, float]:
    """The registry's figures (val_loss, hellaswag_*) among a run's metrics or an evaluation's results (the
    evaluate job's own names are its MLflow names without the eval/ prefix)."""
    found: dict[str, float] = {}
    for tag, sources in METRIC_SOURCES.items():
        values = [metrics.get(s, metrics.get(s.removeprefix("eval/"))) for s in sources]
        value = next((float(v) for v in values if v is not None and math.isfinite(v)), None)
        if value is not None:
            found[tag] = value
    return found


def register(
    client: MlflowClient,
    model_uri: str,
    run_id: str,
    name: str,
    *,
    kind: str,
    model_dir: str | Path,
    note: str | None = None,
    tags: Mapping[str, object] | None = None,
) -> ModelVersion:
    """A new version of `name` for the checkpoint `model_dir`, logged as the MLflow model `model_uri` by run
    `run_id`; described and tagged (see the module docstring), then `champion` is moved.

    note: a paragraph between the version's first line and the card, for what the card does not say.
    tags: the job's own figures (tokens_seen, ...); they override what the run's metrics give.
    """
    run = client.get_run(run_id)
    version_tags = _tags(client, run, kind, tags or {})
    description = _description(kind, version_tags, note, model_card(Path(model_dir), name, version_tags))
    _create_registered_model(client, name, kind)
    # mlflow.register_model, unlike the client's create_model_version, also links the version to the logged model
    # (the model page lists its versions); it works on the current tracking URI.
    mlflow.set_tracking_uri(client.tracking_uri)
    version = mlflow.register_model(model_uri, name, tags=version_tags)
    version = client.update_model_version(name, version.version, description=description)
    update_champion(client, name, version.version)
    return version


def model_card(model_dir: Path, title: str, tags: Mapping[str, str]) -> str:
    """The checkpoint's card; for one saved without a card (a fine-tune's best epoch), a card rendered from its
    config.json and the version's figures."""
    import torch

    from gpt2 import GPT
    from gpt2.checkpoint import read_config
    from gpt2.model_card import CARD_FILE, render_model_card, split_front_matter

    if (model_dir / CARD_FILE).is_file():  # without its YAML header, which is for the Hub, not for readers
        return split_front_matter((model_dir / CARD_FILE).read_text(encoding="utf-8"))[1].lstrip("\n")
    config = read_config(model_dir)
    with torch.device("meta"):  # the parameter count without allocating the weights
        params = GPT(config).num_params()
    training = {"run": f"{tags['source_run_name']} (MLflow experiment/run name)"}
    if "tokens_seen" in tags:
        training["tokens_seen"] = int(tags["tokens_seen"])
    evaluation = {k: float(tags[k]) for k in ("val_loss", "hellaswag_acc", "hellaswag_acc_norm") if k in tags}
    card = render_model_card(config, params=params, training=training, evaluation=evaluation, name=title)
    return split_front_matter(card)[1].lstrip("\n")


def update_champion(client: MlflowClient, name: str, newest: str) -> str:
    """Point `champion` at the version with the lowest val_loss tag (of equal losses the newest; `newest` while no
    version has one). Returns the champion's version."""
    measured = [(loss, -int(v.version), v.version)
                for v in client.search_model_versions(f"name='{name}'")
                if (loss := _finite(v.tags.get("val_loss"))) is not None]  # a diverged or hand-edited tag never wins
    champion = min(measured)[2] if measured else newest
    client.set_registered_model_alias(name, CHAMPION, champion)
    return champion


def tag_versions_of_run(client: MlflowClient, run_id: str, metrics: Mapping[str, float]) -> list[ModelVersion]:
    """Add the figures found in `metrics` (an evaluation of the run's model, measured after it was registered) to
    every version registered from run `run_id`."""
    return _tag_versions(client, lambda: client.search_model_versions(f"run_id='{run_id}'"), metrics)


def tag_versions_named_by(client: MlflowClient, uri: str, metrics: Mapping[str, float]) -> list[ModelVersion]:
    """Add the figures found in `metrics` (an evaluation of the model `uri`) to the version that `uri` names:
    models:/NAME/VERSION, models:/NAME@ALIAS, models:/NAME/latest; for runs:/RUN_ID/PATH the versions registered
    from that run. Any other URI names no version."""
    return _tag_versions(client, lambda: versions_named_by(client, uri), metrics)


def versions_named_by(client: MlflowClient, uri: str) -> list[ModelVersion]:
    if uri.startswith("runs:/"):
        return client.search_model_versions(f"run_id='{uri.removeprefix('runs:/').split('/')[0]}'")
    if not uri.startswith("models:/"):
        return []
    path = uri.removeprefix("models:/").rstrip("/")
    if "@" in path:
        name, alias = path.rsplit("@", 1)
        return [client.get_model_version_by_alias(name, alias)]
    name, _, version = path.rpartition("/")
    if version == "latest":
        return [max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))]
    return [client.get_model_version(name, version)]


def _tag_versions(client: MlflowClient, versions, metrics: Mapping[str, float]) -> list[ModelVersion]:
    found = figures(metrics)
    tagged = versions() if found else []  # no registry query when there is nothing to tag
    for version in tagged:
        for key, value in found.items():
            client.set_model_version_tag(version.name, version.version, key, _tag_value(value))
    return tagged


def _tags(client: MlflowClient, run: Run, kind: str, given: Mapping[str, object]) -> dict[str, str]:
    tags: dict[str, object] = {
        "kind": kind,
        "source_run": run.info.run_id,
        "source_run_name": f"{client.get_experiment(run.info.experiment_id).name}/{run.info.run_name}",
        "git_commit": run.data.tags.get("git_commit") or git_commit(),
        **figures(run.data.metrics),
        **given,
    }
    return {key: _tag_value(value) for key, value in tags.items() if value is not None}


def _finite(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _tag_value(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _create_registered_model(client: MlflowClient, name: str, kind: str) -> None:
    description = (
        f"GPT-2 models of kind `{kind}` from one training run configuration, a version per registration. Each"
        " version's description holds its model card; its tags hold its figures, git commit and source run."
        f" `models:/{name}@{CHAMPION}` is the version with the lowest validation loss (tag `val_loss`),"
        f" `models:/{name}/latest` the newest. `mlflow.pyfunc.load_model` gives a text generator (prompts in;"
        " params max_tokens, temperature, top_k, top_p, seed); this project's jobs and server take the URIs."
    )
    try:
        client.create_registered_model(name, tags={"kind": kind}, description=description)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _description(kind: str, tags: Mapping[str, str], note: str | None, card: str | None) -> str:
    head = f"A `{kind}` GPT-2 model from MLflow run `{tags['source_run_name']}` (run id `{tags['source_run']}`)."
    text = "\n\n".join(part for part in (head, note, card) if part)
    if len(text) <= MAX_DESCRIPTION:
        return text
    tail = "\n\n… (cut at the registry's 5,000-character limit; README.md in the model's checkpoint has it all)"
    return text[: MAX_DESCRIPTION - len(tail)] + tail
