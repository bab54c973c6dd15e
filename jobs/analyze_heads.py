"""Attention-head redundancy and structured pruning: which heads of a layer do the same thing, which heads the loss
depends on, and how perplexity (and HellaSwag) change as heads are removed.

    python jobs/analyze_heads.py --model runs/pretrain/local/final --shards data/pydocs
    python jobs/analyze_heads.py --model gpt2 --shards data/fineweb-edu --hellaswag hellaswag_val.jsonl \\
        --methods importance --fractions 0 0.05 0.1 0.15 0.2 0.3 0.4 0.5 --save 0.15 0.3

Text: the first --analysis-batches x --batch-size windows of --seq-len tokens of the shards' validation split are
analysed; the pruning curve's perplexity is measured on up to --eval-tokens validation tokens after them, so the
heads are never chosen on the text that scores the pruned model.
Similarity: per layer, the cosine similarity between every two heads' attention patterns and between their outputs
(what each head writes into the residual stream), over all analysed tokens.
Pruning removes the heads' weights (gpt2.prune.prune_heads; every layer keeps at least one head):
  redundancy  greedy: of the most similar pair of heads left (by --similarity), drop the one more similar to
              the rest of its layer
  importance  the heads with the smallest |d loss / d gate| on their output (Michel et al. 2019), over all layers
Writes similarity.csv (one row per layer), similarity_layer<L>.png, redundant_heads.csv, pruning_curve.csv and .png,
report.md, and the pruned models of --save as checkpoints (pruned/<method>-<percent>pct/) under --output; logs the
figures and files to MLflow (experiment "head-analysis"). The report says whether "~15% of heads can go for < 5%
perplexity" holds on the measured curve.
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

from cluster.compression import fresh_run_logger, markdown_table, validation_tokens, write_csv
from cluster.models import load_model
from gpt2 import GPT, preset
from gpt2.config import PRESETS
from gpt2.device import pick_device
from gpt2.hellaswag import evaluate_hellaswag, load_hellaswag
from gpt2.model_card import write_model_card
from gpt2.perplexity import evaluate_perplexity
from gpt2.prune import (
    Batch,
    HeadSimilarity,
    Plan,
    RedundantHead,
    group_by_layer,
    head_importance,
    head_similarity,
    plan_pruning,
    prune_heads,
    redundant_heads,
)

EXPERIMENT = "head-analysis"
METHODS = ("redundancy", "importance")
DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
CLAIM_FRACTION, CLAIM_INCREASE_PCT = 0.15, 5.0  # "up to ~15% of heads pruned for < 5% perplexity increase"
FEW_HEADS = 20  # below this one head is more than 5% of all heads: too coarse to resolve the claim's 15%


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="SPEC",
                        help="a checkpoint directory, a Hugging Face GPT-2 directory or hub name, or an MLflow model URI")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a fresh random model of this shape (for trying the job)")
    p.add_argument("--shards", required=True, metavar="DIR", help="token shards with manifest.json; the val split is used")
    analysis = p.add_argument_group("analysis")
    analysis.add_argument("--analysis-batches", type=int, default=8, metavar="N", help="batches analysed (default 8)")
    analysis.add_argument("--batch-size", type=int, default=4, metavar="B", help="windows per batch (default 4)")
    analysis.add_argument("--seq-len", type=int, metavar="T", help="tokens per window (default: min(256, context))")
    analysis.add_argument("--similarity", choices=("outputs", "patterns"), default="outputs",
                          help="which similarity ranks heads for redundancy pruning (default outputs: what the rest"
                               " of the model receives from a head; equal patterns can still carry different values)")
    pruning = p.add_argument_group("pruning curve")
    pruning.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="default: both")
    pruning.add_argument("--fractions", nargs="+", type=float, default=list(DEFAULT_FRACTIONS), metavar="F",
                         help="shares of all heads to prune (0 is always measured; default 0 .05 .1 .15 .2 .3 .4 .5)")
    pruning.add_argument("--save", nargs="*", type=float, default=[CLAIM_FRACTION], metavar="F",
                         help="fractions whose pruned models are saved as checkpoints, per method (default 0.15)")
    pruning.add_argument("--eval-tokens", type=int, default=32_768, metavar="N",
                         help="validation tokens for perplexity (default 32768)")
    pruning.add_argument("--hellaswag", type=Path, metavar="FILE", help="HellaSwag jsonl: add acc_norm to the curve")
    pruning.add_argument("--hellaswag-limit", type=int, metavar="N", help="only the first N HellaSwag examples")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available); the analysis runs in float32")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of --preset (default 0)")
    out = p.add_argument_group("output")
    out.add_argument("--name", help="run name (default: heads-<UTC time>)")
    out.add_argument("--output", type=Path, metavar="DIR", help=f"default runs/{EXPERIMENT}/<name>")
    out.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local server)")
    out.add_argument("--no-mlflow", action="store_true", help="only write the files")
    args = p.parse_args(argv)
    for option in ("analysis_batches", "batch_size", "seq_len", "eval_tokens", "hellaswag_limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    bad = [f for f in [*args.fractions, *args.save] if not 0 <= f < 1]
    if bad:
        p.error(f"--fractions and --save take shares of the heads in [0, 1), got {bad}")
    if len(set(args.methods)) != len(args.methods):
        p.error(f"--methods lists one twice: {args.methods}")
    if args.hellaswag and not args.hellaswag.is_file():
        p.error(f"--hellaswag {args.hellaswag}: no such file")
    if args.hellaswag_limit and not args.hellaswag:
        p.error("--hellaswag-limit needs --hellaswag")
    args.fractions = sorted({0.0, *args.fractions, *args.save})
    args.name = args.name or f"heads-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    args.output = args.output or Path("runs") / EXPERIMENT / args.name
    return args


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
    from cluster.plots import plot_head_similarity

    files = [write_csv(similarity_rows(similarity), out / "similarity.csv")]
    for layer, (patterns, outputs) in enumerate(zip(similarity.patterns, similarity.outputs)):
        files.append(plot_head_similarity(patterns, outputs, layer, out / f"similarity_layer{layer}.png"))
    return files


# ------------------------------------------------------------------------------------------------ pruning curve


class CurvePoint(NamedTuple):  # not a dataclass: those need their module in sys.modules, and tests load jobs by path
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


def report(args: argparse.Namespace, source: str, total: int, sim_rows: list[dict], ranked: list[RedundantHead],
           points: list[CurvePoint], verdict_lines: list[str], eval_tokens: int) -> str:
    shown = [{"rank": i + 1, **r._asdict()} for i, r in enumerate(ranked[:10])]
    return "\n".join([
        f"# Attention heads of {source}", "",
        f"{total} heads; analysed on {args.analysis_batches} x {args.batch_size} windows of {args.seq_len} validation"
        f" tokens of {args.shards}; perplexity on the {eval_tokens:,} validation tokens after them.", "",
        "## Verdict: up to ~15% of heads pruned for < 5% perplexity increase?", "",
        *[f"- {line}" for line in verdict_lines], "",
        "## Similarity between the heads of each layer (cosine)", "", markdown_table(sim_rows),
        f"## Most redundant heads (by {args.similarity} similarity; `twin` is the head it duplicates)", "",
        markdown_table(shown) if shown else "No layer has two heads.\n",
        "## Pruning curve", "", markdown_table([p._asdict() for p in points]),
    ])


def log_to_mlflow(args: argparse.Namespace, source: str, total: int, points: list[CurvePoint], files: list[Path],
                  checkpoints: list[Path]) -> None:
    params = {"model": source, "shards": args.shards, "methods": ",".join(args.methods), "similarity": args.similarity,
              "fractions": ",".join(f"{f:g}" for f in args.fractions), "analysis_batches": args.analysis_batches,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_tokens": args.eval_tokens,
              "hellaswag": str(args.hellaswag or ""), "total_heads": total}
    logger = fresh_run_logger(args.output, experiment=EXPERIMENT, run_name=args.name, uri=args.tracking_uri,
                              params=params)
    for p in points:
        metrics = {f"{p.method}/perplexity": p.perplexity, f"{p.method}/perplexity_increase_pct": p.perplexity_increase_pct}
        if p.hellaswag_acc_norm is not None:
            metrics[f"{p.method}/hellaswag_acc_norm"] = p.hellaswag_acc_norm
        logger.log_metrics(metrics, step=p.heads_pruned)  # step: heads pruned, so the MLflow chart is the curve
    for path in files:
        logger.log_artifact(path)
    logger.set_tags({"pruned_checkpoints": ", ".join(str(c.resolve()) for c in checkpoints)})
    logger.close()


# ------------------------------------------------------------------------------------------------------ main


def load(args: argparse.Namespace, device: torch.device) -> tuple[GPT, str]:
    if args.preset:
        torch.manual_seed(args.seed)
        return GPT(preset(args.preset)).to(device).eval(), f"random {args.preset} (seed {args.seed})"
    model = load_model(args.model, device=device, dtype=torch.float32)
    if not isinstance(model, GPT):  # pruning would leave its exit classifier calibrated for other heads
        raise ValueError(f"{args.model} is an early-exit model; analyse the plain checkpoint it was trained on")
    return model, args.model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, source = load(args, device)
        args.seq_len = args.seq_len or min(256, model.config.block_size)
        if args.seq_len > model.config.block_size:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {model.config.block_size}")
        need = args.analysis_batches * args.batch_size * (args.seq_len + 1)
        tokens = validation_tokens(args.shards, need + args.eval_tokens)
        batches, eval_tokens = split_validation(tokens, args.analysis_batches, args.batch_size, args.seq_len)
        examples = load_hellaswag(args.hellaswag, limit=args.hellaswag_limit) if args.hellaswag else []
    except (OSError, ValueError) as e:  # a missing or corrupt model, shards or HellaSwag file; a bad option
        sys.exit(f"error: {e}")
    config = model.config
    total = sum(config.heads_in_layer(layer) for layer in range(config.n_layer))
    prunable = total - config.n_layer
    too_many = [f for f in args.fractions if heads_for(f, total) > prunable]
    if too_many:
        sys.exit(f"error: fractions {too_many} ask for more than the {prunable} of {total} heads that can go while"
                 " every layer keeps one head")
    print(f"{source}: {config.n_layer} layers, {total} heads; {len(batches)} analysis batches, {len(eval_tokens):,}"
          f" perplexity tokens, on {device}")

    args.output.mkdir(parents=True, exist_ok=True)
    similarity = head_similarity(model, batches)
    ranked = redundant_heads(getattr(similarity, args.similarity), prunable)
    importance = head_importance(model, batches) if "importance" in args.methods else None
    files = write_similarity(similarity, args.output)
    files.append(write_csv([r._asdict() for r in ranked], args.output / "redundant_heads.csv", RedundantHead._fields))

    scorer = Scorer(eval_tokens, examples)
    unpruned, _ = scorer(model, {})
    points, checkpoints = [], []
    for method in args.methods:
        plans = plans_by_fraction(method, args.fractions, importance=importance, ranked=ranked, total=total)
        for fraction, plan in plans.items():
            perplexity, acc = scorer(model, plan)
            pruned = sum(len(heads) for heads in plan.values())
            point = CurvePoint(method, fraction, pruned, 100 * pruned / total, perplexity,
                               100 * (perplexity / unpruned - 1), acc, describe_plan(plan), None)
            if fraction in args.save and plan:
                saved = save_pruned(model, plan, point, args.output, source, len(eval_tokens), args.shards)
                point = point._replace(checkpoint=str(saved))
                checkpoints.append(saved)
            elif fraction in args.save and fraction > 0:
                print(f"note: {fraction:.0%} of {total} heads is less than one head; nothing to save for it")
            points.append(point)
            hellaswag = f", HellaSwag acc_norm {acc:.4f}" if acc is not None else ""
            print(f"{method:>10} {fraction:5.0%}: {pruned:3d} heads pruned, perplexity {perplexity:10.3f}"
                  f" ({point.perplexity_increase_pct:+.2f}%){hellaswag}")

    from cluster.plots import plot_pruning_curve

    lines = verdict(points, total, config.vocab_size, random_weights=bool(args.preset))
    files.append(write_csv([p._asdict() for p in points], args.output / "pruning_curve.csv"))
    files.append(plot_pruning_curve([p._asdict() for p in points], args.output / "pruning_curve.png", title=source))
    sim_rows = similarity_rows(similarity)
    (args.output / "report.md").write_text(report(args, source, total, sim_rows, ranked, points, lines, len(eval_tokens)))
    files.append(args.output / "report.md")
    if not args.no_mlflow:
        log_to_mlflow(args, source, total, points, files, checkpoints)

    print("\nmost redundant heads (layer, head, twin, similarity):")
    for r in ranked[:5]:
        print(f"  layer {r.layer} head {r.head} ~ head {r.twin}: {r.similarity:.3f}")
    print("\nverdict: up to ~15% of heads pruned for < 5% perplexity increase?")
    for line in lines:
        print(f"  {line}")
    for checkpoint in checkpoints:
        print(f"pruned checkpoint: {checkpoint}")
    print(f"report: {args.output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
