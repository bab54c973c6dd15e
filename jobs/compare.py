"""One table of model variants side by side: parameters, size on disk and in memory, perplexity (and its change
against the first model), HellaSwag, greedy decode tokens/s and first-token latency.

    python jobs/compare.py --shards data/pydocs --model base=runs/pretrain/local/final \\
        --model pruned-15=runs/head-analysis/NAME/pruned/importance-15pct \\
        --model distilled=runs/distill/distill-local/final \\
        --model lora=runs/finetune/finetune-local/best_adapters \\
        --model early-exit=runs/early-exit/NAME/model

--model NAME=SPEC (repeatable; NAME defaults to the directory's name) is a checkpoint directory, a Hugging Face
GPT-2 directory or hub name, or an MLflow model URI. What a directory holds decides how it is loaded:
  adapter_config.json    LoRA adapters, merged into the base model they record
  early_exit.json        an early-exit model (jobs/train_early_exit.py's output); its exit rate is reported
  anything else          a plain checkpoint (head-pruned, distilled, fine-tuned, Post-LN: the kind column says which)
The first model is the base: perplexity changes are relative to it, and --quantize derives int8 (dynamic
quantization, CPU), bf16-weight and NF4 (bitsandbytes, on CUDA or CPU) variants of it; by default int8 and bf16, and
NF4 where it can run. Every figure is measured in this process on --device (int8 always on the CPU), one variant
after another. Writes comparison.csv and comparison.md under --output and logs them, with every figure as a metric,
to MLflow (experiment "compare").
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from cluster.config import add_output_options, check_counts, default_output
from cluster.eval.compression import (
    VariantRow,
    files_bytes,
    markdown_table,
    measure_variant,
    relative_to_first,
    serialized_bytes,
    source_directory,
    table_rows,
    validation_tokens,
    variant_metrics,
    write_csv,
)
from cluster.runtime.mlflow_connection import check_tracking_uri
from cluster.runtime.models import load_model, local_model_dir
from cluster.runtime.tracking import fresh_run_logger
from gpt2 import GPT
from gpt2.device import pick_device
from gpt2.early_exit import EarlyExitGPT
from gpt2.hellaswag import load_hellaswag
from gpt2.lora import ADAPTER_CONFIG_FILE, load_adapters, merge_lora, read_adapter_config
from gpt2.quantize import quantize_int8, quantize_nf4, to_bf16

EXPERIMENT = "compare"
QUANTIZATIONS = ("int8", "bf16", "nf4")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # usable in MLflow metric names and file names


def parse_model_option(text: str) -> tuple[str, str]:
    """NAME=SPEC, or SPEC alone (named after its last path component). An "=" after a "/" belongs to a path."""
    name, sep, spec = text.partition("=")
    if not sep or "/" in name:
        name, spec = Path(text.rstrip("/")).name, text
    if not NAME.match(name):
        raise ValueError(f"--model {text}: give it a name of letters, digits, '.', '_' or '-' (NAME=SPEC)")
    return name, spec


def nf4_runs_on(device: torch.device) -> bool:
    """bitsandbytes' 4-bit layers run on CUDA and on CPU (not on MPS), and bitsandbytes is optional."""
    return device.type in ("cuda", "cpu") and importlib.util.find_spec("bitsandbytes") is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=SPEC",
                   help="a variant to compare; repeat; the first is the base")
    p.add_argument("--quantize", nargs="+", choices=QUANTIZATIONS, metavar="KIND",
                   help=f"derive these variants of the first model, from {list(QUANTIZATIONS)} (default: int8 and"
                        " bf16, and nf4 where bitsandbytes is installed and the device is CUDA or CPU)")
    p.add_argument("--no-quantize", action="store_true", help="no derived variants")
    data = p.add_argument_group("data")
    data.add_argument("--shards", required=True, metavar="DIR",
                      help="token shards with manifest.json; the val split is scored")
    data.add_argument("--eval-tokens", type=int, default=32_768, metavar="N", help="validation tokens (default 32768)")
    data.add_argument("--hellaswag", type=Path, metavar="FILE", help="HellaSwag jsonl: add acc_norm (completion scoring)")
    data.add_argument("--hellaswag-limit", type=int, metavar="N", help="only the first N HellaSwag examples")
    data.add_argument("--decode-tokens", type=int, default=64, metavar="N",
                      help="greedy tokens decoded per speed run (default 64; fewer if the context is shorter)")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available); int8 runs on the CPU")
    add_output_options(p, EXPERIMENT, "compare-<UTC time>")
    args = p.parse_args(argv)
    check_counts(p, args, "eval_tokens", "hellaswag_limit", "decode_tokens")
    try:
        args.models = [parse_model_option(text) for text in args.model]
    except ValueError as e:
        p.error(str(e))
    if args.no_quantize and args.quantize:
        p.error("--quantize and --no-quantize contradict each other")
    if args.no_quantize:
        args.quantize = []
    # Left None without --quantize: main picks the default once it knows the device (NF4 does not run on MPS).
    derived = QUANTIZATIONS if args.quantize is None else args.quantize
    names = [name for name, _ in args.models] + [f"{args.models[0][0]}-{kind}" for kind in derived]
    if len(set(names)) != len(names):
        p.error(f"variant names must be distinct: {names}")
    if args.hellaswag and not args.hellaswag.is_file():
        p.error(f"--hellaswag {args.hellaswag}: no such file")
    if args.hellaswag_limit and not args.hellaswag:
        p.error("--hellaswag-limit needs --hellaswag")
    default_output(args, EXPERIMENT, "compare")
    return args


# ------------------------------------------------------------------------------------------------------ variants


class Variant(NamedTuple):  # not a dataclass: those need their module in sys.modules, and tests load jobs by path
    name: str
    kind: str
    model: nn.Module
    parameters: int
    disk_bytes: int


def checkpoint_kind(model: GPT) -> str:
    config = model.config
    kinds = []
    if config.n_head_per_layer is not None:
        heads = sum(config.n_head_per_layer)
        kinds.append(f"head-pruned ({heads}/{config.n_layer * config.n_head} heads)")
    if config.norm == "post":
        kinds.append("Post-LN")
    return ", ".join(kinds) or "checkpoint"


def load_variant(name: str, spec: str, device: torch.device) -> Variant:
    """The model SPEC names, loaded as its directory says (see the module docstring)."""
    directory = Path(local_model_dir(spec))
    if (directory / ADAPTER_CONFIG_FILE).is_file():
        info = read_adapter_config(directory)
        if not info.base_model:
            raise ValueError(f"{directory / ADAPTER_CONFIG_FILE}: records no base_model to merge the adapters into")
        model = merge_lora(load_adapters(load_model(info.base_model, device=device, dtype=torch.float32), directory))
        kind = f"LoRA merged (rank {info.lora.rank}, adapters {files_bytes(directory) / 1e6:.2f} MB)"
        return Variant(name, kind, model.eval(), model.num_params(), serialized_bytes(model))
    model = load_model(str(directory), device=device, dtype=torch.float32)  # early-exit directories included
    disk_bytes = files_bytes(source_directory(spec))
    if isinstance(model, EarlyExitGPT):
        parameters = model.base.num_params() + sum(p.numel() for p in model.classifier.parameters())
        kind = f"early exit (after block {model.exit_layer} of {model.config.n_layer}, threshold {model.threshold:g})"
        return Variant(name, kind, model, parameters, disk_bytes)
    return Variant(name, checkpoint_kind(model), model, model.num_params(), disk_bytes)


def quantized(base: Variant, kind: str, device: torch.device) -> Variant:
    if kind == "int8":
        model, what = quantize_int8(base.model), "int8 dynamic quantization (CPU)"
    elif kind == "bf16":
        model, what = to_bf16(base.model).to(device), "bf16 weights"
    else:
        model, what = quantize_nf4(base.model, device=device), "NF4 weights (bitsandbytes)"
    return Variant(f"{base.name}-{kind}", f"{what} of {base.name}", model, base.parameters, serialized_bytes(model))


# ------------------------------------------------------------------------------------------------------ main


def log_to_mlflow(args: argparse.Namespace, rows: list[VariantRow], files: list[Path]) -> None:
    params = {"models": "; ".join(f"{name}={spec}" for name, spec in args.models), "quantize": ",".join(args.quantize),
              "shards": args.shards, "eval_tokens": args.eval_tokens, "hellaswag": str(args.hellaswag or ""),
              "hellaswag_limit": args.hellaswag_limit, "decode_tokens": args.decode_tokens,
              "torch_threads": torch.get_num_threads()}
    logger = fresh_run_logger(args.output, experiment=EXPERIMENT, run_name=args.name, uri=args.tracking_uri,
                              params=params)
    logger.log_metrics({k: v for row in rows for k, v in variant_metrics(row).items()}, step=0)
    for path in files:
        logger.log_artifact(path)
    logger.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.no_mlflow:
            check_tracking_uri(args.tracking_uri)
        device = pick_device(args.device)
        if args.quantize is None:
            args.quantize = ["int8", "bf16"] + (["nf4"] if nf4_runs_on(device) else [])
        elif "nf4" in args.quantize and not nf4_runs_on(device):
            raise ValueError(f"--quantize nf4 needs bitsandbytes (pip install bitsandbytes) and a CUDA or CPU device;"
                             f" the device is {device.type}")
        tokens = validation_tokens(args.shards, args.eval_tokens)
        examples = load_hellaswag(args.hellaswag, limit=args.hellaswag_limit) if args.hellaswag else []
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{len(args.models) + len(args.quantize)} variants; perplexity on {len(tokens) - 1:,} validation tokens of"
          f" {args.shards}; {torch.get_num_threads()} torch threads on {device}")

    rows: list[VariantRow] = []

    def measure(variant: Variant) -> None:
        row = measure_variant(variant.name, variant.kind, variant.model, parameters=variant.parameters,
                              disk_bytes=variant.disk_bytes, tokens=tokens, hellaswag=examples,
                              decode_tokens=args.decode_tokens)
        rows.append(row)
        print(f"{row.variant}: perplexity {row.perplexity:.3f}, {row.decode_tokens_per_s:.1f} tokens/s")

    for i, (name, spec) in enumerate(args.models):
        try:
            variant = load_variant(name, spec, device)
        except (OSError, ValueError) as e:  # a missing or corrupt model, adapters that do not fit their base
            sys.exit(f"error: --model {name}={spec}: {e}")
        if i == 0 and args.quantize and not isinstance(variant.model, GPT):
            sys.exit(f"error: --quantize derives variants of the first model, and {name} is not a plain model"
                     f" ({variant.kind}); put a plain checkpoint first")
        measure(variant)
        if i == 0:
            for kind in args.quantize:
                measure(quantized(variant, kind, device))
        del variant  # one model in memory at a time (the base until its derived variants are measured)
    table = table_rows(relative_to_first(rows))
    args.output.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(table)
    files = [write_csv(table, args.output / "comparison.csv"), args.output / "comparison.md"]
    (args.output / "comparison.md").write_text(
        f"# Model variants\n\nPerplexity on {len(tokens) - 1:,} validation tokens of {args.shards}; decode: greedy,"
        f" batch 1, {args.decode_tokens} tokens, {torch.get_num_threads()} threads on {device}; disk_mb of variants"
        f" made in memory is their torch.save size.\n\n{markdown}"
    )
    if not args.no_mlflow:
        log_to_mlflow(args, rows, files)
    print()
    print(markdown)
    print(f"table: {args.output / 'comparison.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
