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
import sys
from pathlib import Path

import torch

from cluster.config import add_output_options, check_counts, default_output
from cluster.eval.compression import markdown_table, validation_tokens, write_csv
from cluster.eval.head_analysis import (
    CLAIM_FRACTION,
    CurvePoint,
    Scorer,
    describe_plan,
    heads_for,
    plans_by_fraction,
    save_pruned,
    similarity_rows,
    split_validation,
    verdict,
    write_similarity,
)
from cluster.runtime.mlflow_connection import check_tracking_uri
from cluster.runtime.models import load_model
from cluster.runtime.tracking import fresh_run_logger
from gpt2 import GPT, preset
from gpt2.config import PRESETS
from gpt2.device import pick_device
from gpt2.hellaswag import load_hellaswag
from gpt2.prune import RedundantHead, head_importance, head_similarity, redundant_heads

EXPERIMENT = "head-analysis"
METHODS = ("redundancy", "importance")
DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)


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
    add_output_options(p, EXPERIMENT, "heads-<UTC time>")
    args = p.parse_args(argv)
    check_counts(p, args, "analysis_batches", "batch_size", "seq_len", "eval_tokens", "hellaswag_limit")
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
    default_output(args, EXPERIMENT, "heads")
    return args


# ------------------------------------------------------------------------------------------------- outputs


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
        if not args.no_mlflow:
            check_tracking_uri(args.tracking_uri)
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

    from cluster.eval.plots import plot_pruning_curve

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
