"""Evaluate one or several GPT-2 models: HellaSwag (both scoring methods) and sliding-window perplexity on text files.

    python jobs/evaluate.py --model runs/pretrain/local/checkpoint --model /models/openai-gpt2 \\
        --hellaswag data/hellaswag_val.jsonl --dataset wikitext-2 --output runs/evaluate/results.json

Scoring runs on a Ray Data actor pool (--actors, one model copy per actor, GPU actors when the cluster has GPUs),
or in this process with --actors 0 (on --device, default CUDA, then Apple MPS, then CPU). Writes a JSON results
file and prints a comparison table next to the published baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch

from cluster.config import check_counts, output_file
from cluster.eval.evaluation import ActorPool, EvalSettings, compute_metrics, log_evaluation
from cluster.runtime.mlflow_connection import check_tracking_uri
from cluster.runtime.models import load_model
from cluster.runtime.ray_env import init_ray
from gpt2.device import choose, describe, parse_dtype
from gpt2.hellaswag import (
    HELLASWAG_VAL_EXAMPLES,
    METHODS,
    PUBLISHED_BASELINES,
    HellaSwagDownloadError,
    HellaSwagFormatError,
    comparison_table,
    default_cache_dir,
    download_hellaswag,
    load_hellaswag,
)
from gpt2.perplexity import resolve_window, text_tokens
from gpt2.shards import file_sha256, split_tokens
from gpt2.wikitext import WikiTextError, wikitext2_text

DATASETS = ("wikitext-2",)

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="SPEC",
                        help="a checkpoint directory of this project, a Hugging Face GPT-2 directory or hub name, "
                             "or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS); repeat to compare"
                             " several models")
    data = parser.add_argument_group("data")
    data.add_argument("--hellaswag", metavar="PATH",
                      help="HellaSwag jsonl file; default: the official validation set, downloaded into --cache-dir "
                           "and checksum-verified")
    data.add_argument("--no-hellaswag", action="store_true", help="skip HellaSwag (e.g. only text perplexity)")
    data.add_argument("--cache-dir", type=Path, metavar="DIR", help=f"download cache (default {default_cache_dir()})")
    data.add_argument("--limit", type=int, metavar="N", help="only the first N HellaSwag examples")
    data.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="HellaSwag scoring methods")
    data.add_argument("--text", action="append", default=[], type=Path, metavar="FILE",
                      help="a UTF-8 text file to measure perplexity on; repeatable")
    data.add_argument("--dataset", action="append", default=[], choices=DATASETS,
                      help="a standard text to measure perplexity on: wikitext-2 is the wikitext-2-raw-v1 test split "
                           "(from --wikitext-dir, else the Hugging Face cache or hub)")
    data.add_argument("--wikitext-dir", type=Path, metavar="DIR",
                      help="a local WikiText-2 copy: a folder with wiki.test.raw (the original release) or the hub's "
                           "test-*.parquet (directly or in wikitext-2-raw-v1/)")
    data.add_argument("--shards", action="append", default=[], type=Path, metavar="DIR",
                      help="a shard set (directory with manifest.json): loss/perplexity on its val split; repeatable")
    data.add_argument("--context-length", type=int, metavar="N",
                      help="perplexity window in tokens (default: the model's context)")
    data.add_argument("--stride", type=int, metavar="N", help="perplexity window step (default: half the window)")
    compute = parser.add_argument_group("compute")
    compute.add_argument("--actors", type=int, default=2, metavar="N",
                         help="Ray Data actors per model (default 2); 0 scores in this process")
    compute.add_argument("--cpus-per-actor", type=int, default=1, metavar="N",
                         help="CPUs and torch threads per actor (default 1)")
    compute.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                         help="GPU actors (default: when the Ray cluster has GPUs)")
    compute.add_argument("--batch-size", type=int, default=8, metavar="N",
                         help="HellaSwag examples per forward pass (default 8)")
    compute.add_argument("--window-batch-size", type=int, default=4, metavar="N",
                         help="perplexity windows per forward pass (default 4)")
    compute.add_argument("--device", help="cuda, cuda:N, mps or cpu for --actors 0 (default: the best available)")
    compute.add_argument("--dtype", default="auto",
                         help="float32, bfloat16 or auto (default: bf16 where the scoring device computes it natively)")
    compute.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a local head, or a new local instance)")
    parser.add_argument("--output", type=output_file, metavar="PATH",
                        help="results JSON (default runs/evaluate/<UTC time>/results.json)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not log to MLflow (default: into the training run that wrote the checkpoint, "
                             "else a run of the 'evaluate' experiment)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.actors < 0:
        parser.error("--actors must be >= 0")
    check_counts(parser, args, "limit", "context_length", "stride", "cpus_per_actor", "batch_size", "window_batch_size")
    if args.no_hellaswag and not (args.text or args.dataset or args.shards):
        parser.error("nothing to evaluate: --no-hellaswag without --text, --dataset or --shards")
    if args.wikitext_dir and "wikitext-2" not in args.dataset:
        parser.error("--wikitext-dir is only read with --dataset wikitext-2")
    if args.device and args.actors:
        parser.error("--device chooses where --actors 0 scores; actors use --gpu/--no-gpu")
    names = [path.name for path in args.text] + args.dataset + [f"{d.name}-val" for d in args.shards]
    if len(set(names)) != len(names):
        parser.error(f"--text files and --dataset names must be distinct (their metrics are keyed by name): {names}")
    return args


def settings_from_args(args: argparse.Namespace, use_gpu: bool | None = None) -> EvalSettings:
    pool = ActorPool(args.actors, args.cpus_per_actor, use_gpu) if args.actors else None
    return EvalSettings(
        methods=tuple(args.methods),
        hellaswag_batch_size=args.batch_size,
        context_length=args.context_length,
        stride=args.stride,
        window_batch_size=args.window_batch_size,
        pool=pool,
        progress=not args.no_progress,
    )


def perplexity_table(models: list[dict], names: list[str]) -> str:
    width = max(len("perplexity"), *(len(m["model"]) for m in models))
    column = max(12, *(len(name) + 2 for name in names))
    lines = [f"{'perplexity':<{width}}" + "".join(f"{name:>{column}}" for name in names)]
    for m in models:
        values = (m["metrics"][f"text/{name}/perplexity"] for name in names)
        lines.append(f"{m['model']:<{width}}" + "".join(f"{value:>{column}.3f}" for value in values))
    return "\n".join(lines)


def scoring_place(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, bool | None]:
    """Where the model is loaded, its dtype, and whether pool actors use GPUs (None without a pool).

    With a pool the model is loaded on the CPU and shipped to the actors; --dtype auto follows the actors' device.
    """
    if not args.actors:
        device, dtype = choose(args.device, args.dtype)
        print(f"scoring in this process on {describe(device, dtype)}")
        return device, dtype, None
    init_ray(args.address)
    use_gpu = args.gpu if args.gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    dtype = parse_dtype(args.dtype, torch.device("cuda" if use_gpu else "cpu"))
    where = "GPU" if use_gpu else "CPU"
    print(f"scoring on {args.actors} Ray Data actors ({where}), dtype {str(dtype).removeprefix('torch.')}")
    return torch.device("cpu"), dtype, use_gpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = datetime.now(timezone.utc)
    output = args.output or Path("runs/evaluate") / started_at.strftime("%Y%m%d-%H%M%S") / "results.json"

    results: dict = {"created": started_at.isoformat(timespec="seconds"), "data": {}, "models": []}
    examples = []
    if not args.no_mlflow:
        try:
            check_tracking_uri(None)
        except ValueError as e:
            sys.exit(f"error: {e}")
    if not args.no_hellaswag:
        try:
            path = Path(args.hellaswag) if args.hellaswag else download_hellaswag(args.cache_dir)
            examples = load_hellaswag(path, limit=args.limit)
        except (OSError, HellaSwagFormatError, HellaSwagDownloadError) as e:  # missing, unreadable, malformed, offline
            sys.exit(f"error: HellaSwag: {e}")
        results["data"]["hellaswag"] = {"path": str(path), "sha256": file_sha256(path), "examples": len(examples)}
        if len(examples) != HELLASWAG_VAL_EXAMPLES:
            print(f"note: {len(examples)} HellaSwag examples; the published figures use all {HELLASWAG_VAL_EXAMPLES}")
    texts = {}
    for path in args.text:
        try:
            texts[path.name] = text_tokens(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"error: --text {path}: {e}")
        results["data"][f"text/{path.name}"] = {"path": str(path), "tokens": len(texts[path.name]) - 1}
    for directory in args.shards:
        try:
            texts[f"{directory.name}-val"] = split_tokens(directory, "val").tolist()
        except (FileNotFoundError, ValueError) as e:  # no manifest, no val shards, a damaged header
            sys.exit(f"error: --shards {directory}: {e}")
        results["data"][f"text/{directory.name}-val"] = {"path": str(directory), "split": "val",
                                                         "tokens": len(texts[f"{directory.name}-val"]) - 1}
    if "wikitext-2" in args.dataset:
        try:
            texts["wikitext-2"] = text_tokens(wikitext2_text("test", args.wikitext_dir))
        except WikiTextError as e:
            sys.exit(f"error: {e}")
        where = str(args.wikitext_dir) if args.wikitext_dir else "Hugging Face hub/cache"
        results["data"]["text/wikitext-2"] = {"path": where, "split": "test", "tokens": len(texts["wikitext-2"]) - 1}

    try:
        device, dtype, use_gpu = scoring_place(args)
    except ValueError as e:  # a device that is not here, an unknown dtype
        sys.exit(f"error: {e}")
    settings = settings_from_args(args, use_gpu)
    results["settings"] = {
        **dataclasses.asdict(settings),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }

    for spec in args.model:
        try:
            model = load_model(spec, device=device, dtype=dtype)
        except ValueError as e:  # a missing/corrupt directory, an unknown hub name, an unreachable MLflow model
            sys.exit(f"error: {e}")
        if texts:  # the perplexity window against this model's context, before any scoring
            try:
                resolve_window(model, settings.context_length, settings.stride)
            except ValueError as e:
                sys.exit(f"error: --context-length / --stride for {spec}: {e}")
        started = time.perf_counter()
        metrics = compute_metrics(model, settings, hellaswag=examples, texts=texts)
        seconds = time.perf_counter() - started
        results["models"].append(
            {"model": spec, "parameters": model.num_params(), "seconds": round(seconds, 3), "metrics": metrics}
        )
    results["baselines"] = [{"name": b.name, "percent": dict(b.percent)} for b in PUBLISHED_BASELINES]

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    if examples:
        print(comparison_table([(m["model"], m["metrics"]) for m in results["models"]]))
        print()
    if texts:
        print(perplexity_table(results["models"], list(texts)))
        print()
    if not args.no_mlflow:
        for entry in results["models"]:
            name = f"{Path(entry['model']).name or entry['model']}-{started_at.strftime('%Y%m%d-%H%M%S')}"
            where = log_evaluation(entry["model"], entry["metrics"], output, run_name=name,
                                   params={"model": entry["model"], "parameters": entry["parameters"]})
            print(f"MLflow: {entry['model']} -> {where}")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
