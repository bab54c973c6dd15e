"""What a training job leaves behind when its last step is done (rank 0): the final model directory with its model
card, the loss curves, and the run's MLflow record (metrics file, card, registered model)."""

from __future__ import annotations

from pathlib import Path

from cluster.runtime.tracking import RunLogger
from gpt2 import GPT
from gpt2.model_card import render_model_card, write_model_card


def publish_final_model(
    model: GPT, run_dir: Path, logger: RunLogger, card: dict, *, kind: str, plot_title: str,
    registered_name: str | None, tags: dict,
) -> None:
    """<run_dir>/final (the model with its card, the card in the run's artifacts as README.md too), loss.png, and
    the model registered in MLflow as `kind`; the logger is closed afterwards."""
    from cluster.eval.plots import plot_training_curves

    final = run_dir / "final"
    model.save_pretrained(str(final), extra=lambda d: write_model_card(d, model.config, **card))
    logger.flush(force=True)  # deliver anything held back while the server was unreachable before the artifacts
    logger.log_artifact(plot_training_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", title=plot_title))
    logger.log_artifact(run_dir / "metrics.jsonl")
    logger.log_text(render_model_card(model.config, **card), "README.md")
    logger.log_model(final, kind, registered_name=registered_name, tags=tags)
    logger.close()
