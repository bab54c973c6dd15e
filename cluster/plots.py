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


def plot_pieces_per_word(stats: list, out_png: str | Path, title: str = "") -> Path:
    """Tokenizer efficiency (gpt2.tokenizer_stats.EncodingStats, one per encoding): the share of words cut into
    1, 2, ... pieces as grouped bars, and tokens per word beside it."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    bins = list(stats[0].pieces_distribution())
    width = 0.8 / len(stats)
    for i, s in enumerate(stats):
        distribution, total = s.pieces_distribution(), s.word_occurrences or 1
        positions = [b + (i - (len(stats) - 1) / 2) * width for b in range(len(bins))]
        left.bar(positions, [100 * distribution[b] / total for b in bins], width, label=s.name)
    left.set_xticks(range(len(bins)), bins)
    left.set_xlabel("tokens per word")
    left.set_ylabel("share of word occurrences (%)")
    left.set_yscale("log")  # the 1-piece bar dwarfs the tail, which is what differs between encodings
    left.set_title(f"pieces per word: {title}" if title else "pieces per word")
    left.legend()
    left.grid(alpha=0.3, axis="y")
    right.bar([s.name for s in stats], [s.tokens_per_word for s in stats], color="tab:gray")
    right.set_ylabel("tokens per whitespace word")
    right.tick_params(axis="x", rotation=30)
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
