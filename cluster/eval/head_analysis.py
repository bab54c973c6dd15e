"""Attention-head analysis for jobs/analyze_heads.py: the analysis text, per-layer similarity tables, pruning plans by
method, the pruning curve's scoring, the verdict on "~15% of heads pruned for < 5% perplexity", and pruned
checkpoints saved with their model cards.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

from cluster.eval.compression import write_csv
from gpt2 import GPT
from gpt2.hellaswag import evaluate_hellaswag
from gpt2.model_card import write_model_card
from gpt2.perplexity import evaluate_perplexity
from gpt2.prune import Batch, HeadSimilarity, Plan, RedundantHead, group_by_layer, plan_pruning, prune_heads

CLAIM_FRACTION, CLAIM_INCREASE_PCT = 0.15, 5.0  # "up to ~15% of heads pruned for < 5% perplexity increase"
FEW_HEADS = 20  # below this one head is more than 5% of all heads: too coarse to resolve the claim's 15%


# ------------------------------------------------------------------------------------------------------ data


def split_validation(tokens: list[int], n_batches: int, B: int, T: int) -> tuple[list[Batch], list[int]]:
    """(inputs, targets) analysis batches of B windows of T tokens from the start of `tokens`, and the rest."""
    need = n_batches * B * (T + 1)
    if len(tokens) < need + 2:
        raise ValueError(
            f"the validation split holds {len(tokens)} tokens; {n_batches} analysis batches of {B} x {T + 1} tokens"
            f" need {need}, plus some to measure perplexity on: lower --analysis-batches, --batch-size or --seq-len"
        )
    windows = torch.tensor(tokens[:need], dtype=torch.long).view(n_batches, B, T + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows], tokens[need:]


# ------------------------------------------------------------------------------------------------ similarity


def _off_diagonal(matrix: torch.Tensor) -> tuple[float | None, float | None, str | None]:
    """Mean and maximum similarity between different heads, and the most similar pair ("a-b")."""
    n = matrix.shape[0]
    if n < 2:
        return None, None, None
    values = matrix.double().masked_fill(torch.eye(n, dtype=torch.bool), float("nan"))
    a, b = divmod(int(values.nan_to_num(-math.inf).argmax()), n)
    return float(values.nanmean()), float(values[a, b]), f"{a}-{b}"


def similarity_rows(similarity: HeadSimilarity) -> list[dict]:
    rows = []
    for layer, (patterns, outputs) in enumerate(zip(similarity.patterns, similarity.outputs)):
        p_mean, p_max, p_pair = _off_diagonal(patterns)
        o_mean, o_max, o_pair = _off_diagonal(outputs)
        rows.append({"layer": layer, "heads": patterns.shape[0], "patterns_mean": p_mean, "patterns_max": p_max,
                     "patterns_most_similar": p_pair, "outputs_mean": o_mean, "outputs_max": o_max,
                     "outputs_most_similar": o_pair})
    return rows


def write_similarity(similarity: HeadSimilarity, out: Path) -> list[Path]:
    from cluster.eval.plots import plot_head_similarity

    files = [write_csv(similarity_rows(similarity), out / "similarity.csv")]
    for layer, (patterns, outputs) in enumerate(zip(similarity.patterns, similarity.outputs)):
        files.append(plot_head_similarity(patterns, outputs, layer, out / f"similarity_layer{layer}.png"))
    return files


# ------------------------------------------------------------------------------------------------ pruning curve


class CurvePoint(NamedTuple):
    method: str
    fraction: float  # as requested
    heads_pruned: int
    heads_pruned_pct: float  # the share actually pruned: a whole number of heads
    perplexity: float
    perplexity_increase_pct: float
    hellaswag_acc_norm: float | None
    pruned_heads: str  # "layer:head,head; ..."
    checkpoint: str | None


def heads_for(fraction: float, total: int) -> int:
    return math.floor(fraction * total + 1e-9)  # as gpt2.prune.plan_pruning counts them


def plans_by_fraction(method: str, fractions: list[float], *, importance: list[torch.Tensor] | None,
                      ranked: list[RedundantHead] | None, total: int) -> dict[float, Plan]:
    if method == "importance":
        return {f: plan_pruning(importance, f) for f in fractions}
    # The greedy choice of the (k+1)-th head depends only on the first k, so one ranking serves every fraction.
    return {f: group_by_layer(ranked[: heads_for(f, total)]) for f in fractions}


def describe_plan(plan: Plan) -> str:
    return "; ".join(f"{layer}:{','.join(map(str, heads))}" for layer, heads in plan.items())


class Scorer:
    """Perplexity (and HellaSwag) of a model on fixed data, remembered per pruning plan: fraction 0 and plans
    that two methods share are scored once."""

    def __init__(self, eval_tokens: list[int], hellaswag: list) -> None:
        self.eval_tokens, self.hellaswag = eval_tokens, hellaswag
        self.cache: dict[str, tuple[float, float | None]] = {}

    def __call__(self, model: GPT, plan: Plan) -> tuple[float, float | None]:
        key = describe_plan(plan)
        if key not in self.cache:
            pruned = prune_heads(model, plan) if plan else model
            perplexity = evaluate_perplexity(pruned, self.eval_tokens).perplexity
            acc = None
            if self.hellaswag:
                acc = evaluate_hellaswag(pruned, self.hellaswag, methods=("completion",))["completion"].acc_norm
            self.cache[key] = (perplexity, acc)
        return self.cache[key]


# ------------------------------------------------------------------------------------------------------ verdict


def verdict(points: list[CurvePoint], total: int, vocab_size: int, random_weights: bool) -> list[str]:
    """The claim checked against the measured curve, per method, with what makes the model unrepresentative."""
    lines = []
    for method in dict.fromkeys(p.method for p in points):
        curve = [p for p in points if p.method == method and p.heads_pruned > 0]
        near = [p for p in curve if p.heads_pruned <= CLAIM_FRACTION * total + 1e-9]
        within = [p for p in curve if p.perplexity_increase_pct < CLAIM_INCREASE_PCT]
        best = max(within, key=lambda p: p.heads_pruned, default=None)
        most = f"{best.heads_pruned_pct:.1f}% of heads ({best.heads_pruned})" if best else "not even one measured point"
        if not near:
            lines.append(f"{method}: no measured point prunes between one head and 15% of the {total} heads, so the"
                         f" claim cannot be checked; largest share pruned for < 5% perplexity: {most}")
            continue
        at = max(near, key=lambda p: p.heads_pruned)
        holds = "HOLDS" if at.perplexity_increase_pct < CLAIM_INCREASE_PCT else "DOES NOT HOLD"
        lines.append(f"{method}: pruning {at.heads_pruned} of {total} heads ({at.heads_pruned_pct:.1f}%) changes"
                     f" perplexity by {at.perplexity_increase_pct:+.2f}%, so the claim {holds} for this model;"
                     f" largest share pruned for < 5% perplexity: {most}")
    unpruned = points[0].perplexity
    if random_weights:
        lines.append("caveat: these are random weights (--preset); the curve says nothing about a trained GPT-2.")
    elif unpruned > vocab_size / 2:
        lines.append(f"caveat: the unpruned perplexity {unpruned:,.0f} is near uniform guessing over {vocab_size:,}"
                     " tokens: the model looks untrained, so the curve says nothing about a trained GPT-2.")
    if total < FEW_HEADS:
        lines.append(f"caveat: the model has only {total} heads; one head is {100 / total:.1f}% of them, too coarse"
                     " to resolve the claim's ~15% (GPT-2 124M has 144).")
    return lines


# ------------------------------------------------------------------------------------------------------ outputs


def save_pruned(model: GPT, plan: Plan, point: CurvePoint, out: Path, source: str, eval_tokens: int,
                shards: str) -> Path:
    pruned = prune_heads(model, plan)
    directory = out / "pruned" / f"{point.method}-{round(100 * point.fraction)}pct"
    evaluation = {"perplexity": point.perplexity, "perplexity_increase_pct": point.perplexity_increase_pct}
    methods = {
        "perplexity": f"sliding-window perplexity on {eval_tokens:,} validation tokens of {shards}",
        "perplexity_increase_pct": "relative to the unpruned model on the same tokens",
    }
    if point.hellaswag_acc_norm is not None:
        evaluation["hellaswag_acc_norm"] = point.hellaswag_acc_norm
    card = {
        "params": pruned.num_params(),
        "name": f"{source} without {point.heads_pruned} attention head{'s' * (point.heads_pruned != 1)} ({point.method})",
        "training": {"base_model": source, "pruned_heads": f"{point.pruned_heads} (layer:heads)",
                     "pruning": f"{point.heads_pruned} heads chosen by {point.method} (jobs/analyze_heads.py)"},
        "evaluation": evaluation,
        "methods": methods,
    }
    pruned.save_pretrained(str(directory), extra=lambda d: write_model_card(d, pruned.config, **card))
    return directory
