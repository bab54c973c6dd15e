"""Profile an early-exit model against its own backbone: layer-wise time and memory, decode speed and quality.

  python jobs/profile_early_exit.py --model runs/early-exit/local/model --shards data/pydocs
  python jobs/profile_early_exit.py --model models:/gpt2-local-early-exit@champion --shards data/pydocs \
      --hellaswag hellaswag_val.jsonl --limit 500

The standard model is the early-exit model's backbone (the same weights, every block for every token), so the two
differ only by early exit, at the saved threshold unless --threshold is given. Written to --output:

- layers_standard.csv, layers_early-exit.csv: one row per component (embedding, each block's attention and MLP, the
  exit classifier and deeper K/V projection, ln_f+head) per phase (prefill of a random prompt, then one-token decode
  steps), with time per forward, its share, parameter and activation bytes (gpt2/profile_layers.py); layers.png.
- summary.csv, also printed: per model, greedy decode tokens/s and per-token latency p50/p95 over several decodes of
  prompts from the validation shards (the models take turns token by token), and the exit rate in those decodes;
  exit rate, next-token agreement with the standard model and perplexity on the validation shards; HellaSwag with
  --hellaswag (scored by cluster.eval.evaluation, as jobs/evaluate.py does); the measured forward time per phase.

Everything is logged to MLflow (experiment "profile"; --no-mlflow to skip). No Ray is needed.

(Not named jobs/profile.py: a script's folder comes first on sys.path, for Ray's workers too, so that name would
replace the standard library's `profile` module, which torch imports through cProfile, for every job in jobs/.)
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from cluster.config import check_counts, output_folder
from cluster.runtime.mlflow_connection import check_tracking_uri
from cluster.runtime.models import local_model_dir
from cluster.train.early_exit import EARLY_EXIT, STANDARD, time_decoding, token_batches, validation_quality
from gpt2.device import choose, describe
from gpt2.early_exit import EXIT_CONFIG_FILE, load_early_exit
from gpt2.hellaswag import load_hellaswag
from gpt2.profile_layers import profile_layers, write_csv

SUMMARY_COLUMNS = (
    "model", "tokens_per_s", "latency_p50_ms", "latency_p95_ms", "decode_exit_rate", "exit_rate", "agreement",
    "perplexity", "prefill_ms", "decode_ms",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="an early-exit model: a directory holding early_exit.json (jobs/train_early_exit.py writes one)"
                        " or an MLflow model URI")
    p.add_argument("--shards", required=True, type=Path,
                   help="token shards with manifest.json; the validation split gives prompts, agreement and perplexity")
    p.add_argument("--hellaswag", type=Path, help="a HellaSwag jsonl file to score both models on (optional)")
    p.add_argument("--limit", type=int, help="only the first N HellaSwag examples")
    p.add_argument("--threshold", type=float, help="the exit threshold tau (default: the one saved with the model)")
    layers = p.add_argument_group("layer profile")
    layers.add_argument("--batch-size", type=int, default=1, help="rows per forward (default 1)")
    layers.add_argument("--prompt-len", type=int, default=64, help="prefill length (default 64)")
    layers.add_argument("--decode-steps", type=int, default=32, help="decode steps after each prefill (default 32)")
    layers.add_argument("--repeats", type=int, default=3,
                        help="measured prefills, each with its decode steps (default 3)")
    decode = p.add_argument_group("decode speed")
    decode.add_argument("--decodes", type=int, default=5, help="prompts decoded by each model (default 5)")
    decode.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per decode (default 64)")
    quality = p.add_argument_group("quality on the validation shards")
    quality.add_argument("--seq-len", type=int, help="tokens per validation row (default: min(256, the context))")
    quality.add_argument("--val-batches", type=int, default=8, help="validation batches (default 8; 0: all)")
    quality.add_argument("--val-batch-size", type=int, default=4, help="rows per validation batch (default 4)")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (default: bf16 where native)")
    p.add_argument("--output", type=output_folder, help="output directory (default runs/profile/<UTC time>)")
    p.add_argument("--experiment", default="profile", help="MLflow experiment (default profile)")
    p.add_argument("--run-name", help="MLflow run name (default: the model directory's parent's name)")
    p.add_argument("--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI, else the local server)")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = p.parse_args(argv)
    check_counts(p, args, "batch_size", "prompt_len", "decode_steps", "repeats", "decodes", "val_batch_size", "limit",
                 "seq_len")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (latency is measured between tokens)")
    if args.val_batches < 0:
        p.error("--val-batches must be >= 0")
    if not (args.shards / "manifest.json").is_file():
        p.error(f"--shards {args.shards}: no manifest.json there (python jobs/prepare_data.py writes shards)")
    if args.hellaswag and not args.hellaswag.is_file():
        p.error(f"--hellaswag {args.hellaswag}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.no_mlflow:
            check_tracking_uri(args.tracking_uri)
        directory = Path(local_model_dir(args.model))
        if not (directory / EXIT_CONFIG_FILE).is_file():
            raise ValueError(
                f"{directory}: no {EXIT_CONFIG_FILE}; train an exit classifier with jobs/train_early_exit.py"
            )
        # Read before the minutes of profiling, so that a malformed file is named at once.
        examples = load_hellaswag(args.hellaswag, limit=args.limit) if args.hellaswag else None
        device, dtype = choose(args.device, args.dtype)
        print(describe(device, dtype))
        early_exit = load_early_exit(directory, device=device, dtype=dtype)
        return profile(args, early_exit, directory, examples)
    except (ValueError, FileNotFoundError) as e:  # bad model, device, HellaSwag file, lengths, empty shards
        sys.exit(f"error: {e}")


def profile(args: argparse.Namespace, early_exit, directory: Path, examples: list | None = None) -> int:
    from cluster.eval.plots import plot_layer_profiles

    standard = early_exit.base
    tau = early_exit.threshold if args.threshold is None else args.threshold
    early_exit.threshold = tau
    context = standard.config.block_size
    if args.prompt_len + args.new_tokens > context:
        raise ValueError(
            f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds the context of {context}"
        )
    seq_len = args.seq_len or min(256, context)
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} exceeds the context of {context}")
    output = args.output or Path("runs/profile") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output.mkdir(parents=True, exist_ok=True)
    models = {STANDARD: standard, EARLY_EXIT: early_exit}
    print(f"{EARLY_EXIT}: exit after block {early_exit.exit_layer} of {standard.config.n_layer}, tau {tau:g}")

    options = dict(batch_size=args.batch_size, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                   repeats=args.repeats)
    profiles = {
        STANDARD: profile_layers(standard, **options),
        EARLY_EXIT: profile_layers(early_exit, **options, forward_kwargs={"threshold": tau}),
    }
    early_exit.reset_stats()  # the profile's random tokens are not part of any reported exit rate
    files = [write_csv(profiles[name].rows, output / f"layers_{name}.csv") for name in models]
    files.append(plot_layer_profiles(profiles, output / "layers.png", title=directory.parent.name or directory.name))

    prompts = [x[0].tolist() for x, _ in token_batches(args.shards, 1, args.prompt_len, "val", args.decodes)]
    timings = time_decoding(models, prompts, args.new_tokens)
    val = token_batches(args.shards, args.val_batch_size, seq_len, "val", args.val_batches)
    quality = validation_quality(early_exit, val, tau)
    hellaswag = _hellaswag(models, examples) if examples else {name: {} for name in models}

    rows = []
    for name in models:
        timing, forward = timings[name], profiles[name].forward_seconds
        rows.append({
            "model": name, "tokens_per_s": timing.tokens_per_s, "latency_p50_ms": timing.latency_ms(50),
            "latency_p95_ms": timing.latency_ms(95), "decode_exit_rate": timing.exit_rate, **quality[name],
            "prefill_ms": 1000 * forward["prefill"], "decode_ms": 1000 * forward["decode"], **hellaswag[name],
        })
    files.append(_write_summary(rows, output / "summary.csv"))
    speedup = timings[EARLY_EXIT].tokens_per_s / timings[STANDARD].tokens_per_s
    print(_table(rows))
    print(f"decode speedup of {EARLY_EXIT} over {STANDARD}: {speedup:.2f}x ({len(prompts)} prompts of"
          f" {args.prompt_len} tokens, {args.new_tokens} new tokens each)")
    if not args.no_mlflow:
        _log(args, directory, tau, rows, speedup, files, output)
    print(f"results: {output}")
    return 0


def _hellaswag(models: dict, examples: list) -> dict[str, dict[str, float]]:
    from cluster.eval.evaluation import EvalSettings, compute_metrics

    settings = EvalSettings(pool=None, progress=False)  # scored in this process, on the models' device
    return {name: compute_metrics(model, settings, hellaswag=examples) for name, model in models.items()}


def _write_summary(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)
    return path


def _table(rows: list[dict]) -> str:
    extra = [key for key in rows[0] if key.startswith("hellaswag/") and key.endswith("acc_norm")]
    columns = [*SUMMARY_COLUMNS, *extra]
    width = max(len(c) for c in columns) + 2
    lines = ["".join(f"{c:>{width}}" for c in columns)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], str) else "-" if row[c] is None else f"{row[c]:.4g}" for c in columns]
        lines.append("".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def _log(args, directory: Path, tau: float, rows: list[dict], speedup: float, files: list[Path], output: Path) -> None:
    from cluster.runtime.tracking import fresh_run_logger

    params = {k: v for k, v in vars(args).items() if k not in ("no_mlflow", "tracking_uri")}
    logger = fresh_run_logger(
        output, experiment=args.experiment, run_name=args.run_name or directory.parent.name or directory.name,
        uri=args.tracking_uri, params={**params, "threshold_used": tau, "torch_threads": torch.get_num_threads()},
        tags={"kind": "profile"},
    )
    metrics = {"speedup": speedup}
    for row in rows:
        metrics.update({f"{row['model']}/{k}": v for k, v in row.items() if k != "model" and v is not None})
    logger.log_metrics(metrics, step=0)
    for path in files:
        logger.log_artifact(path)
    logger.close()


if __name__ == "__main__":
    sys.exit(main())
