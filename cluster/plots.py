"""Plots written next to a run's outputs and logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers and servers
import matplotlib.pyplot as plt  # noqa: E402

from cluster.tracking import read_metrics  # noqa: E402


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Training and validation loss by step, and HellaSwag accuracy on a second panel when it was measured."""
    rows = read_metrics(Path(metrics_jsonl).parent)
    series = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "val_loss", "hellaswag_acc_norm")}
    panels = 2 if series["hellaswag_acc_norm"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for key, label in (("loss", "train loss"), ("val_loss", "validation loss")):
        if series[key]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if panels == 2:
        steps, values = zip(*series["hellaswag_acc_norm"])
        axes[0][1].plot(steps, [100 * v for v in values], marker="o", color="tab:green", label="HellaSwag acc_norm")
        axes[0][1].axhline(29.55, ls="--", color="gray", label="OpenAI GPT-2 124M (29.55)")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("accuracy (%)")
        axes[0][1].legend()
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
