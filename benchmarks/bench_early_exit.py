"""Early-exit decoding vs the standard model, side by side in one run, on the GPT-2 124M shape on CPU: greedy decode
tokens/s at the tau that keeps >= 97% next-token agreement on validation text, and the perplexity change.

Which model is measured, and what that means (printed at the start of every run):

- --model DIR holding early_exit.json (jobs/train_early_exit.py): its classifier as trained; tau is chosen here on
  the validation shards for --target.
- --model DIR without it (this project's or a Hugging Face GPT-2 checkpoint): a classifier trained here briefly
  (--train-batches micro-batches of the training shards, --epochs) on the frozen model, as the job does.
- no --model: the 124M shape with random weights and a classifier trained here the same way. Nothing is learned: a
  random network's deeper blocks barely move its residual stream, so the exit head agrees with the full model on
  almost every token and almost every token exits. The ratio then shows what the mechanism saves at that exit rate,
  not what a trained GPT-2 reaches.

Also measured: every token exiting (tau = 0), the most any classifier can save at this exit layer, since an exited
token still runs exit_layer blocks, the LM head and the deeper layers' key/value projections. Standard and
early-exit models decode the same prompts (from the validation shards) to the same number of tokens in lockstep, a
token each in turn. The headline speedup is the ratio of median per-token latencies, which other work on a busy
machine disturbs least; the throughput ratio (prefill and every step included) is printed beside it.

  python -m benchmarks.bench_early_exit [--model DIR] [--shards data/pydocs] [--exit-layer 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from cluster.train.early_exit import (
    EARLY_EXIT,
    STANDARD,
    choose_tau,
    features_and_labels,
    time_decoding,
    token_batches,
)
from gpt2 import GPT, preset
from gpt2.early_exit import (
    EXIT_CONFIG_FILE,
    EarlyExitGPT,
    ExitClassifier,
    calibrate,
    default_exit_layer,
    load_early_exit,
    train_classifier,
)

TAUS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
EVERY_TOKEN_EXITS = "every token exits (tau=0)"
GOAL = 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a checkpoint directory (with or without early_exit.json); default:"
                                             " the 124M shape with random weights")
    p.add_argument("--shards", type=Path, default=Path("data/pydocs"),
                   help="token shards with train and val splits (default data/pydocs: python jobs/prepare_data.py)")
    p.add_argument("--exit-layer", type=int, help="blocks before the exit when a classifier is trained here"
                                                  " (default: three quarters of the depth)")
    p.add_argument("--hidden-only", action="store_true",
                   help="classifier on the hidden state only (no exit-head features: non-exited tokens skip a head)")
    p.add_argument("--target", type=float, default=0.97, help="next-token agreement to keep (default 0.97)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training/validation row (default 256)")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per backbone pass (default 4)")
    p.add_argument("--train-batches", type=int, default=8, help="micro-batches of classifier training data (default 8)")
    p.add_argument("--val-batches", type=int, default=4, help="micro-batches of validation data (default 4)")
    p.add_argument("--epochs", type=int, default=10, help="classifier epochs (default 10)")
    p.add_argument("--prompts", type=int, default=4, help="prompts decoded by each model (default 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per decode (default 64)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, train) -> tuple[EarlyExitGPT, str]:
    """The early-exit model to measure and a sentence saying what it is."""
    if args.model and (args.model / EXIT_CONFIG_FILE).is_file():
        model = load_early_exit(args.model)
        return model, f"{args.model}: its saved classifier (exit after block {model.exit_layer})"
    if args.model:
        base, what = GPT.from_pretrained(str(args.model)), f"{args.model} with a classifier trained here"
    else:
        torch.manual_seed(0)
        base = GPT(preset("gpt2", vocab_pad_multiple=64)).eval()
        what = ("GPT-2 124M shape with RANDOM weights and a classifier trained here: nothing is learned, so the exit"
                " rate is not a trained model's; the ratio shows what early exit saves at the exit rate reached")
    exit_layer = args.exit_layer or default_exit_layer(base.config.n_layer)
    head_features = not args.hidden_only
    features, labels = features_and_labels(base, train, exit_layer, head_features)
    torch.manual_seed(0)
    classifier = ExitClassifier(base.config.n_embd, head_features=head_features)
    history = train_classifier(classifier, features, labels, epochs=args.epochs, batch_size=256, lr=1e-3)
    what += (f" (exit after block {exit_layer}; {len(labels):,} training positions, {labels.mean():.1%} safe to exit;"
             f" training accuracy {history[-1]['accuracy']:.3f})")
    return EarlyExitGPT(base, exit_layer, classifier=classifier.eval()).eval(), what


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.shards / "manifest.json").is_file():
        sys.exit(f"error: --shards {args.shards}: no manifest.json there; run python jobs/prepare_data.py first")
    B, T = args.micro_batch, args.seq_len
    train = token_batches(args.shards, B, T, "train", args.train_batches)
    val = token_batches(args.shards, B, T, "val", args.val_batches)
    model, what = build_model(args, train)
    print(f"# Early-exit decoding vs standard, {torch.get_num_threads()} threads, fp32, batch 1, greedy")
    print(f"model: {what}")

    rows = calibrate(model, val, TAUS)
    tau, reached = choose_tau(rows, args.target)
    chosen = next(r for r in rows if r["tau"] == tau)
    positions = sum(int((y >= 0).sum()) for _, y in val)
    print(f"\ncalibration on {positions:,} validation positions ({args.shards}):")
    print("| tau | exit rate | agreement | perplexity | mean blocks |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tau']:g} | {r['exit_rate']:.3f} | {r['agreement']:.4f} | {r['perplexity']:.3f} |"
              f" {r['mean_blocks']:.2f} |")
    if not reached:
        print(f"no tau reaches agreement {args.target}; using the most accurate, tau={tau:g}")

    model.threshold = tau
    every_token_exits = EarlyExitGPT(model.base, model.exit_layer, threshold=0.0, classifier=model.classifier).eval()
    models = {STANDARD: model.base, f"{EARLY_EXIT} (tau={tau:g})": model, EVERY_TOKEN_EXITS: every_token_exits}
    prompts = [x[0].tolist() for x, _ in token_batches(args.shards, 1, args.prompt_len, "val", args.prompts)]
    load = os.getloadavg()[0]
    timings = time_decoding(models, prompts, args.new_tokens)

    standard = timings[STANDARD]
    print(f"\ndecoding: {len(prompts)} prompts × {args.new_tokens} new tokens per model, a token each in turn"
          f" (load average {load:.1f} on {os.cpu_count()} cores at the start)")
    print("| model | tokens/s | p50 ms/token | p95 ms/token | exit rate in decoding | speedup (p50) |"
          " speedup (tokens/s) |\n|---|---|---|---|---|---|---|")
    for name, timing in timings.items():
        rate = "-" if timing.exit_rate is None else f"{timing.exit_rate:.3f}"
        print(f"| {name} | {timing.tokens_per_s:.1f} | {timing.latency_ms(50):.1f} | {timing.latency_ms(95):.1f} |"
              f" {rate} | {standard.latency_ms(50) / timing.latency_ms(50):.2f}x |"
              f" {timing.tokens_per_s / standard.tokens_per_s:.2f}x |")
    speedup = standard.latency_ms(50) / timings[f"{EARLY_EXIT} (tau={tau:g})"].latency_ms(50)
    change = chosen["perplexity"] / chosen["perplexity_full"] - 1
    print(f"\nat tau={tau:g} (agreement {chosen['agreement']:.4f}, target {args.target}"
          f" {'reached' if reached else 'NOT reached'}): decode speedup {speedup:.2f}x (median latency), perplexity"
          f" {chosen['perplexity_full']:.3f} -> {chosen['perplexity']:.3f} ({change:+.2%});"
          f" goal >= {GOAL}x {'met' if speedup >= GOAL else 'not met'}")


if __name__ == "__main__":
    main()
