"""Plots written next to a run's outputs and logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on workers and servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cluster.runtime.tracking import read_metrics  # noqa: E402


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


def _save(fig, out_png: str | Path) -> Path:
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def plot_head_similarity(patterns, outputs, layer: int, out_png: str | Path) -> Path:
    """One layer's (nh, nh) cosine similarities between heads, of attention patterns and of head outputs, as two
    heatmaps on the same -1..1 scale with the values written in the cells when there are few heads."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, matrix, what in ((axes[0], patterns, "attention patterns"), (axes[1], outputs, "head outputs")):
        values = matrix.detach().cpu().float().numpy()
        image = ax.imshow(values, vmin=-1, vmax=1, cmap="RdBu_r")
        n = values.shape[0]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if n <= 16:  # beyond that the numbers are unreadable; the colours still are
            for i in range(n):
                for j in range(n):
                    ink = "white" if abs(values[i, j]) > 0.6 else "black"
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=ink)
        ax.set_title(f"layer {layer}: {what}")
        ax.set_xlabel("head")
        ax.set_ylabel("head")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return _save(fig, out_png)


def plot_pruning_curve(rows: list[dict], out_png: str | Path, title: str = "") -> Path:
    """Perplexity increase (and HellaSwag acc_norm when measured) against the share of heads pruned, one line per
    pruning method, with the "~15% of heads for < 5% perplexity" claim drawn as guides."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    with_hellaswag = any(r.get("hellaswag_acc_norm") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_hellaswag else 1, figsize=(12 if with_hellaswag else 6.5, 4.4), squeeze=False)
    left = axes[0][0]
    for method in methods:
        points = [r for r in rows if r["method"] == method]
        left.plot([r["heads_pruned_pct"] for r in points], [r["perplexity_increase_pct"] for r in points],
                  marker="o", label=method)
    left.axhline(5, ls="--", color="gray", label="+5% perplexity")
    left.axvline(15, ls=":", color="gray", label="15% of heads")
    left.set_xlabel("heads pruned (%)")
    left.set_ylabel("perplexity increase (%)")
    left.set_title(title or "structured head pruning")
    left.legend()
    left.grid(alpha=0.3)
    if with_hellaswag:
        right = axes[0][1]
        for method in methods:
            points = [r for r in rows if r["method"] == method and r.get("hellaswag_acc_norm") is not None]
            right.plot([r["heads_pruned_pct"] for r in points], [100 * r["hellaswag_acc_norm"] for r in points],
                       marker="o", label=method)
        right.set_xlabel("heads pruned (%)")
        right.set_ylabel("HellaSwag acc_norm (%)")
        right.legend()
        right.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_norm_comparison(histories: dict[str, list[dict]], out_png: str | Path, title: str = "") -> Path:
    """Training runs side by side (e.g. Pre-LN and Post-LN): loss by step with validation points, and the global
    gradient norm before clipping on a log scale (its spikes are where the instability shows first)."""
    fig, (loss_ax, grad_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    for (label, rows), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        trained = [r for r in rows if "loss" in r]
        loss_ax.plot([r["step"] for r in trained], [r["loss"] for r in trained], color=colour, label=f"{label} train")
        validated = [r for r in rows if "val_loss" in r]
        loss_ax.plot([r["step"] for r in validated], [r["val_loss"] for r in validated], color=colour, ls="--",
                     marker="o", markersize=3, label=f"{label} validation")
        grad_ax.plot([r["step"] for r in trained], [r["grad_norm"] for r in trained], color=colour, label=label)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("cross-entropy (nats/token)")
    loss_ax.set_title(title or "loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    grad_ax.set_yscale("log")
    grad_ax.set_xlabel("step")
    grad_ax.set_ylabel("gradient norm (before clipping)")
    grad_ax.set_title("gradient norm")
    grad_ax.legend()
    grad_ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_exit_calibration(rows: list[dict], out_png: str | Path, *, chosen_tau: float, target: float,
                          title: str = "") -> Path:
    """An early-exit tau sweep (gpt2.early_exit.calibrate rows): exit rate and next-token agreement against tau,
    with the agreement target and the chosen tau as guides; perplexity against exit rate beside it, the full
    model's perplexity dashed."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    taus = [r["tau"] for r in rows]
    left.plot(taus, [100 * r["exit_rate"] for r in rows], marker="o", label="exit rate")
    left.plot(taus, [100 * r["agreement"] for r in rows], marker="o", label="next-token agreement")
    left.axhline(100 * target, ls="--", color="gray", label=f"target agreement {100 * target:g}%")
    left.axvline(chosen_tau, ls=":", color="black", label=f"chosen tau = {chosen_tau:g}")
    left.set_xlabel("threshold tau")
    left.set_ylabel("% of validation positions")
    left.set_title(title or "early-exit calibration")
    left.legend()
    left.grid(alpha=0.3)
    right.plot([100 * r["exit_rate"] for r in rows], [r["perplexity"] for r in rows], marker="o", label="early exit")
    for r in rows:
        right.annotate(f"{r['tau']:g}", (100 * r["exit_rate"], r["perplexity"]), fontsize=7,
                       textcoords="offset points", xytext=(3, 3))
    right.axhline(rows[0]["perplexity_full"], ls="--", color="gray", label="full model")
    right.set_xlabel("exit rate (%)")
    right.set_ylabel("validation perplexity")
    right.set_title("quality against exit rate (points labelled with tau)")
    right.legend()
    right.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_layer_profiles(profiles: dict, out_png: str | Path, title: str = "") -> Path:
    """Where a forward spends its time and memory, component by component (gpt2.profile_layers.LayerProfile per
    model name): milliseconds per forward on the top row and activation megabytes per forward below, prefill and
    decode side by side, models as grouped bars. A component one model lacks (the exit classifier) stays empty."""
    phases = ("prefill", "decode")
    fig, axes = plt.subplots(2, 2, figsize=(15, 8), squeeze=False)
    names = list(profiles)
    width = 0.8 / len(names)
    for col, phase in enumerate(phases):
        # In forward order: the model with the most components (the early-exit one) goes first.
        richest_first = sorted(profiles.values(), key=lambda p: -len(p.rows))
        components = list(dict.fromkeys(r.component for p in richest_first for r in p.phase_rows(phase)))
        for i, name in enumerate(names):
            by_component = {r.component: r for r in profiles[name].phase_rows(phase)}
            positions = [c + (i - (len(names) - 1) / 2) * width for c in range(len(components))]
            for row, value_of in ((0, lambda r: 1000 * r.seconds), (1, lambda r: r.activation_bytes / 1e6)):
                values = [value_of(by_component[c]) if c in by_component else 0.0 for c in components]
                axes[row][col].bar(positions, values, width, label=name)
        for row, ylabel in ((0, "ms per forward"), (1, "activations (MB per forward)")):
            ax = axes[row][col]
            ax.set_xticks(range(len(components)), components, rotation=90, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, axis="y")
            ax.legend()
        first = next(iter(profiles.values()))
        axes[0][col].set_title(f"{title + ': ' if title else ''}{phase} (batch {first.batch_size},"
                               f" prompt {first.prompt_len}, {first.device})")
    return _save(fig, out_png)
