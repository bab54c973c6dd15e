"""What the compression and analysis jobs share: evaluation text from token shards, the measurements of one model
variant that their tables report (parameters, size, perplexity, HellaSwag, decode speed), and the tables themselves.

Every figure is measured in this process on one device, one variant after another, so numbers in one table are
comparable with each other; decode speed in particular depends on the machine and its thread count.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from cluster.runtime.models import local_model_dir
from gpt2.checkpoint import resolve_hub_name
from gpt2.generate import stream
from gpt2.hellaswag import HellaSwagExample, evaluate_hellaswag
from gpt2.perplexity import evaluate_perplexity
from gpt2.protocols import ExitingModel, LanguageModel
from gpt2.quantize import model_size_bytes
from gpt2.shards import open_shard, resolve_shard_paths
from gpt2.tokenizer import get_tokenizer

DECODE_PROMPT = "The Python standard library"
WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model.bin")  # what loading reads; not trainer or README files


# ------------------------------------------------------------------------------------------------------ data


def validation_tokens(shards: str | Path, max_tokens: int) -> list[int]:
    """Up to `max_tokens` tokens of the validation split of a shard folder (jobs/prepare_data.py's output), in
    file order. The split starts with <|endoftext|> (every document does), which gpt2.perplexity reads as context."""
    parts: list[np.ndarray] = []
    left = max_tokens
    for path in resolve_shard_paths(shards, "val"):
        if left <= 0:
            break
        part = np.asarray(open_shard(path)[:left], dtype=np.int64)
        parts.append(part)
        left -= len(part)
    tokens = np.concatenate(parts).tolist() if parts else []
    if len(tokens) < 2:
        raise ValueError(f"{shards}: the validation split holds {len(tokens)} token(s); perplexity needs at least 2")
    return tokens


# ------------------------------------------------------------------------------------------------ measurements


@dataclass(frozen=True)
class DecodeSpeed:
    tokens_per_s: float  # greedy batch-1 decoding after the first token: what streaming feels like
    first_token_ms: float  # prefill of the prompt plus the first token: how long a user waits for any text


def measure_decode(model: LanguageModel, prompt: Sequence[int], new_tokens: int, repeats: int = 3) -> DecodeSpeed:
    """Greedy decoding of `new_tokens` tokens (fewer if the context is shorter) after `prompt`, best of `repeats`
    runs after a warm-up; best rather than mean because slower runs measure other processes on the machine."""
    new_tokens = min(new_tokens, model.config.block_size - len(prompt))
    if new_tokens < 2:
        raise ValueError(
            f"the {len(prompt)}-token prompt leaves no room to decode in a {model.config.block_size}-token context"
        )
    rows = [list(prompt)]
    list(stream(model, rows, 2, temperature=0, stop_at_eot=False))  # first calls pay for allocation and lazy setup
    best_first, best_rate = math.inf, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        first = None
        for _ in stream(model, rows, new_tokens, temperature=0, stop_at_eot=False):
            first = first or time.perf_counter()  # each step samples on the CPU, so the device has finished
        end = time.perf_counter()
        best_first = min(best_first, first - start)
        best_rate = max(best_rate, (new_tokens - 1) / (end - first))
    return DecodeSpeed(tokens_per_s=best_rate, first_token_ms=1000 * best_first)


def files_bytes(directory: str | Path) -> int:
    """Bytes of the weight files in a model directory (the checkpoint, and an early-exit classifier beside it)."""
    directory = Path(directory)
    return sum(p.stat().st_size for pattern in WEIGHT_FILE_PATTERNS for p in directory.glob(pattern) if p.is_file())


def source_directory(spec: str) -> Path:
    """The local directory of a model source that loaded: MLflow URIs are downloaded (and cached) by MLflow, hub
    names are in the Hugging Face cache by then (a hub name may also be a folder here, as `gpt2` is in this repo)."""
    directory = Path(local_model_dir(spec))
    return directory if (directory / "config.json").is_file() else resolve_hub_name(spec)


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of torch.save(state_dict): the on-disk size of a variant that exists only in memory. int8 packed
    weights have no safetensors form; torch.save stores each of them, and tied weights, once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), path)
        return path.stat().st_size


@dataclass
class VariantRow:
    """One row of a comparison table. Optional figures are None when they were not measured for this variant."""

    variant: str
    kind: str
    parameters: int  # GPT.num_params(): position embeddings not counted; quantization does not change it
    disk_mb: float  # weight files on disk (serialized state dict for variants made in memory)
    weights_mb: float  # weights as held in memory (gpt2.quantize.model_size_bytes)
    perplexity: float
    perplexity_change_pct: float | None  # relative to the table's first row
    hellaswag_acc_norm: float | None
    decode_tokens_per_s: float
    first_token_ms: float
    exit_rate: float | None  # early-exit variants: share of positions that stopped early in the perplexity pass


def measure_variant(
    variant: str,
    kind: str,
    model: LanguageModel,
    *,
    parameters: int,
    disk_bytes: int,
    tokens: Sequence[int],
    hellaswag: Sequence[HellaSwagExample] = (),
    decode_tokens: int = 64,
) -> VariantRow:
    """Perplexity on `tokens` (sliding window, the model's full context), HellaSwag acc_norm (completion scoring)
    when examples are given, and decode speed on a fixed prompt."""
    model.eval()
    exits = isinstance(model, ExitingModel)  # early-exit models count exits; plain ones have nothing to count
    if exits:
        model.reset_stats()
    perplexity = evaluate_perplexity(model, tokens).perplexity
    exit_rate = model.reset_stats().exit_rate if exits else None
    acc_norm = evaluate_hellaswag(model, hellaswag, methods=("completion",))["completion"].acc_norm if hellaswag else None
    speed = measure_decode(model, get_tokenizer().encode_ordinary(DECODE_PROMPT), decode_tokens)
    return VariantRow(
        variant=variant,
        kind=kind,
        parameters=parameters,
        disk_mb=disk_bytes / 1e6,
        weights_mb=model_size_bytes(model) / 1e6,
        perplexity=perplexity,
        perplexity_change_pct=None,
        hellaswag_acc_norm=acc_norm,
        decode_tokens_per_s=speed.tokens_per_s,
        first_token_ms=speed.first_token_ms,
        exit_rate=exit_rate,
    )


def relative_to_first(rows: list[VariantRow]) -> list[VariantRow]:
    """Fill perplexity_change_pct against the first row (the base model)."""
    base = rows[0].perplexity
    for row in rows:
        row.perplexity_change_pct = 100 * (row.perplexity / base - 1)
    return rows


# ------------------------------------------------------------------------------------------------------ tracking


# ------------------------------------------------------------------------------------------------------ tables


def write_csv(rows: Sequence[dict], path: str | Path, fields: Sequence[str] | None = None) -> Path:
    """Rows of equal keys as CSV (`fields`: the header, needed when there may be no rows); None is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields or rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    return path


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def markdown_table(rows: Sequence[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_rows(rows: Sequence[VariantRow]) -> list[dict]:
    """The rows as dicts, without the columns that no variant measured (HellaSwag without a file, exit rate
    without an early-exit model)."""
    dicts = [asdict(row) for row in rows]
    empty = {key for key in dicts[0] if all(d[key] is None for d in dicts)}
    return [{k: v for k, v in d.items() if k not in empty} for d in dicts]


def variant_metrics(row: VariantRow) -> dict[str, float]:
    """A row's numbers as MLflow metrics named `<variant>/<figure>` (unmeasured ones left out)."""
    numbers = {k: v for k, v in asdict(row).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {f"{row.variant}/{key}": float(value) for key, value in numbers.items()}
