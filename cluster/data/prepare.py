"""Text source → Ray Data (read → tiktoken actors → ordered shard writer) → llm.c shards + manifest.json.

Determinism: Ray Data keeps the source's order (`preserve_order` on the dataset the driver iterates), so the bytes
written do not depend on the number of tokenizer actors or on scheduling. Memory: the driver streams each tokenized
block straight into the open shard file, so neither it nor the actors ever hold more than a few blocks.
Re-running: the manifest records a fingerprint of the input and settings; the same fingerprint with intact shards
is a no-op, an interrupted run (no manifest, only its in-progress marker) is rebuilt, and anything else needs
`overwrite=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from cluster.data.sources import (
    BadSourceError,
    ResolvedSource,
    SourceSpec,
    read_documents,
    resolve_source,
)
from gpt2.config import EOT_TOKEN
from gpt2.durable import PARTIAL_SUFFIX, write_file_atomically
from gpt2.shards import (
    MANIFEST_NAME,
    MAX_TOKEN_ID,
    SHARD_FILE,
    ShardFormatError,
    ShardInfo,
    ShardWriter,
    find_damaged_shards,
    read_manifest,
)
from gpt2.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, get_tokenizer

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

PIPELINE_VERSION = 1  # part of the fingerprint: bump when the same input would produce different bytes
MARKER_NAME = ".prepare_data.in-progress.json"  # present while a run writes; names the fingerprint it works for
EXAMPLES_PER_PROBLEM = 5
# The python-docs corpus is small: its validation shard is 32,768 tokens. Every job that prepares it into data/pydocs
# (prepare_data.py, the pipeline, the benchmarks) uses this, so they find each other's shards reusable.
PYTHON_DOCS_VAL_TOKENS = 32_768
# A tokenizer keeps one core busy but reserves only three quarters of a CPU: an actor pool that reserved every CPU
# would leave none for the read tasks (READ_TASK_CPUS each) and the pipeline would stall.
TOKENIZER_CPUS = 0.75
# Reading and parsing a document costs a fraction of tokenizing it, so one read task keeps several tokenizers fed;
# capping them also avoids starting a worker process per fractional CPU.
TOKENIZERS_PER_READ = 4


@dataclass(frozen=True)
class PrepareConfig:
    source: SourceSpec
    output_dir: str
    name: str
    shard_tokens: int = 100_000_000
    val_tokens: int = 100_000_000  # llm.c's FineWeb scripts make the first 1e8-token shard the val shard
    tokenizers: int | None = None  # actors in the pool; None: one per cluster CPU
    batch_size: int = 256  # documents per block and per tokenizer call
    on_bad_document: str = "skip"  # "skip": count and report; "error": stop at the first one

    def __post_init__(self) -> None:
        if self.on_bad_document not in ("skip", "error"):
            raise ValueError(f"on_bad_document must be 'skip' or 'error', got {self.on_bad_document!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", self.name):
            raise ValueError(f"shard name {self.name!r}: use letters, digits, '.' and '-' (the name is a file prefix)")
        if self.tokenizers is not None and self.tokenizers < 1:
            raise ValueError(f"tokenizers must be at least 1, got {self.tokenizers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class Skipped:
    count: int = 0
    examples: list[str] = field(default_factory=list)  # where the first few were


@dataclass
class Progress:
    documents: int
    tokens: int
    skipped: int
    shards: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"{self.documents:,} documents | {self.tokens:,} tokens | {self.tokens_per_s:,.0f} tokens/s"
            f" | {self.shards} shards done | {self.skipped:,} skipped | {self.seconds:.0f} s"
        )


@dataclass
class PrepareSummary:
    output_dir: Path
    shards: list[ShardInfo]
    documents: int
    tokens: int
    skipped: dict[str, Skipped]
    ignored_files: list[str]
    seconds: float
    up_to_date: bool  # True when the output already matched and nothing was written

    def format(self) -> str:
        split_tokens = {s: sum(x.tokens for x in self.shards if x.split == s) for s in ("val", "train")}
        head = "already up to date" if self.up_to_date else f"wrote in {self.seconds:.1f} s"
        lines = [
            f"{self.output_dir}: {len(self.shards)} shards, {self.documents:,} documents, {self.tokens:,} tokens"
            f" (val {split_tokens['val']:,}, train {split_tokens['train']:,}) — {head}"
        ]
        if not self.up_to_date and self.seconds > 0:
            lines.append(f"throughput: {self.tokens / self.seconds:,.0f} tokens/s")
        total = sum(s.count for s in self.skipped.values())
        lines.append(f"skipped documents: {total:,}" if total else "skipped documents: none")
        for problem, s in sorted(self.skipped.items()):
            lines.append(f"  {s.count:,} × {problem}, e.g. {'; '.join(s.examples)}")
        if self.ignored_files:
            lines.append(f"ignored {len(self.ignored_files)} files of other formats, e.g. {self.ignored_files[:3]}")
        return "\n".join(lines)


class TokenizeDocuments:
    """Ray Data actor: `{text, problem, where}` rows → `tokens` (uint16 list: EOT then the document's GPT-2 ids).

    Rows that carry a problem pass through with no tokens, so the writer can count and report them in order.
    """

    def __init__(self) -> None:
        self._encoding = get_tokenizer()  # built once per actor; each call then only encodes

    def __call__(self, batch: pa.Table) -> pa.Table:
        eot = np.array([EOT_TOKEN], dtype=np.uint32)
        pieces, lengths = [], []
        for text in batch.column("text").to_pylist():
            if text is None:
                lengths.append(0)
                continue
            # encode_to_numpy with no special tokens allowed equals encode_ordinary: a literal "<|endoftext|>" in a
            # document is ordinary text, never a document boundary.
            ids = self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            pieces += [eot, ids]
            lengths.append(len(ids) + 1)
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
        if flat.size and flat.max() > MAX_TOKEN_ID:
            raise ValueError(f"token id {flat.max()} does not fit uint16; the shard format needs a vocabulary < 65536")
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.uint16)))
        return pa.table({"tokens": tokens, "problem": batch.column("problem"), "where": batch.column("where")})


def default_tokenizers() -> int:
    """One actor per CPU of the cluster (each reserves TOKENIZER_CPUS, leaving the rest to the read tasks)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def tokenize_documents(documents: ray.data.Dataset, *, tokenizers: int, batch_size: int = 256) -> ray.data.Dataset:
    """Documents → token rows on a fixed pool of `tokenizers` actors, in the documents' order."""
    tokenized = documents.map_batches(
        TokenizeDocuments,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=tokenizers),
        num_cpus=TOKENIZER_CPUS,
    )
    tokenized.context.execution_options.preserve_order = True  # shard bytes must not depend on scheduling
    tokenized.context.enable_progress_bars = False  # write_shards reports documents, tokens and tokens/s itself
    return tokenized


def write_shards(
    tokenized: ray.data.Dataset,
    writer: ShardWriter,
    *,
    on_bad_document: str = "skip",
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 10.0,
) -> dict[str, Skipped]:
    """Stream token rows into `writer` in order; returns the skipped documents by problem.
    A stream without a single usable document is an error (an empty source, or one whose documents are all bad)."""
    skipped: dict[str, Skipped] = {}
    started = last_report = time.monotonic()
    reported_tokens = -1

    def progress() -> Progress:
        n_skipped = sum(s.count for s in skipped.values())
        return Progress(writer.documents, writer.tokens, n_skipped, len(writer.shards), time.monotonic() - started)

    for batch in tokenized.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        _record_problems(batch, skipped, on_bad_document)
        for chunk in batch.column("tokens").chunks:
            lengths = chunk.value_lengths().to_numpy(zero_copy_only=False)
            writer.add_documents(chunk.flatten().to_numpy(), lengths[lengths > 0])
        if on_progress and time.monotonic() - last_report >= progress_interval_s:
            on_progress(progress())
            last_report, reported_tokens = time.monotonic(), writer.tokens
    if on_progress and reported_tokens != writer.tokens:
        on_progress(progress())
    if writer.documents == 0:
        raise BadSourceError(f"the source yielded no usable documents: {_skipped_text(skipped)}")
    return skipped


def _record_problems(batch: pa.Table, skipped: dict[str, Skipped], on_bad_document: str) -> None:
    problems = batch.column("problem")
    if problems.null_count == len(problems):
        return
    for problem, where in zip(problems.to_pylist(), batch.column("where").to_pylist(), strict=True):
        if problem is None:
            continue
        if on_bad_document == "error":
            raise BadSourceError(f"{where}: {problem} (on_bad_document='skip' counts and skips such documents)")
        entry = skipped.setdefault(problem, Skipped())
        entry.count += 1
        if len(entry.examples) < EXAMPLES_PER_PROBLEM:
            entry.examples.append(where)


def prepare_data(
    config: PrepareConfig,
    *,
    overwrite: bool = False,
    hf_filesystem: AbstractFileSystem | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 10.0,
) -> PrepareSummary:
    """Build (or confirm) the shards and manifest for `config`. Ray must be initialised (cluster.runtime.ray_env.init_ray)."""
    started = time.monotonic()
    source = resolve_source(config.source, hf_filesystem)
    fingerprint = _fingerprint(config, source)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER_NAME
    if not overwrite and (existing := _reusable_output(out, fingerprint)) is not None:
        marker.unlink(missing_ok=True)  # left by a run killed after writing its manifest
        return existing
    _clear_output(out)
    _write_json(marker, {"fingerprint": fingerprint})

    tokenizers = config.tokenizers or default_tokenizers()
    documents = read_documents(
        source, rows_per_block=config.batch_size, concurrent_reads=math.ceil(tokenizers / TOKENIZERS_PER_READ)
    )
    tokenized = tokenize_documents(documents, tokenizers=tokenizers, batch_size=config.batch_size)
    with ShardWriter(out, config.name, shard_tokens=config.shard_tokens, val_tokens=config.val_tokens) as writer:
        try:
            skipped = write_shards(
                tokenized,
                writer,
                on_bad_document=config.on_bad_document,
                on_progress=on_progress,
                progress_interval_s=progress_interval_s,
            )
        except Exception as e:
            source_error = _source_error(e)
            if source_error is None:
                raise
            raise source_error from None  # the remote traceback adds nothing to "file X: what is wrong"
        shards = writer.close()

    summary = PrepareSummary(
        out, shards, writer.documents, writer.tokens, skipped, list(source.ignored), time.monotonic() - started, False
    )
    _write_json(out / MANIFEST_NAME, _manifest(config, source, fingerprint, summary))
    marker.unlink()
    return summary


def _fingerprint(config: PrepareConfig, source: ResolvedSource) -> str:
    decisive = {
        "pipeline_version": PIPELINE_VERSION,
        "tokenizer": {"name": "gpt2", "vocab_bpe_sha256": VOCAB_BPE_SHA256, "encoder_json_sha256": ENCODER_JSON_SHA256},
        "name": config.name,
        "shard_tokens": config.shard_tokens,
        "val_tokens": config.val_tokens,
        "input": source.fingerprint(),
    }
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def existing_output(config: PrepareConfig, *, hf_filesystem: AbstractFileSystem | None = None) -> PrepareSummary | None:
    """The summary of an intact earlier run of exactly this configuration, found without Ray (so a job can skip
    starting it); None when the shards must be built. Raises FileExistsError like `prepare_data` without overwrite."""
    source = resolve_source(config.source, hf_filesystem)
    out = Path(config.output_dir)
    return _reusable_output(out, _fingerprint(config, source)) if out.is_dir() else None


def _reusable_output(out: Path, fingerprint: str) -> PrepareSummary | None:
    """The summary of a complete, intact earlier run with this fingerprint; None when (re)building is allowed.
    Raises FileExistsError rather than replace shards that this configuration did not write."""
    manifest_path, marker = out / MANIFEST_NAME, out / MARKER_NAME
    if manifest_path.exists():
        try:
            manifest = read_manifest(manifest_path)
        except ShardFormatError:
            manifest = {}
        if manifest.get("fingerprint") != fingerprint:
            raise FileExistsError(
                f"{out} already holds shards from another source or settings ({manifest_path} differs);"
                " pass overwrite=True (--overwrite) to replace them, or choose another output directory"
            )
        if not find_damaged_shards(out, manifest["shards"]):
            return PrepareSummary(
                out,
                manifest["shards"],
                manifest["documents"],
                manifest["tokens"],
                {k: Skipped(**v) for k, v in manifest["skipped"].items()},
                manifest["ignored_files"],
                0.0,
                True,
            )
        return None  # our own output, damaged since: rebuild it
    interrupted = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
    if not interrupted and any(SHARD_FILE.match(p.name) for p in out.iterdir()):
        raise FileExistsError(
            f"{out} holds shard files but no {MANIFEST_NAME} from this configuration; pass overwrite=True"
            " (--overwrite) to delete them and rebuild"
        )
    return None


def _clear_output(out: Path) -> None:
    """Delete the manifest and every shard-named file, so a glob over the folder finds only the new shards; with them
    the partial files a killed run left."""
    for path in out.iterdir():
        name = path.name.removesuffix(PARTIAL_SUFFIX)
        if name in (MANIFEST_NAME, MARKER_NAME) or SHARD_FILE.match(name):
            path.unlink()


def _manifest(config: PrepareConfig, source: ResolvedSource, fingerprint: str, summary: PrepareSummary) -> dict:
    return {
        "format": {
            "name": "llm.c token shards",
            "magic": 20240520,
            "version": 1,
            "header_int32s": 256,
            "token_dtype": "uint16 little-endian",
            "document_separator": EOT_TOKEN,
        },
        "tokenizer": {
            "name": "gpt2",
            "library": "tiktoken",
            "eot_token": EOT_TOKEN,
            "vocab_bpe_sha256": VOCAB_BPE_SHA256,
            "encoder_json_sha256": ENCODER_JSON_SHA256,
        },
        "name": config.name,
        "source": source.fingerprint(),
        "settings": {
            "shard_tokens": config.shard_tokens,
            "val_tokens": config.val_tokens,
            "pipeline_version": PIPELINE_VERSION,
        },
        "fingerprint": fingerprint,
        "shards": [asdict(s) for s in summary.shards],
        "documents": summary.documents,
        "tokens": summary.tokens,
        "skipped": {k: asdict(v) for k, v in summary.skipped.items()},
        "ignored_files": summary.ignored_files,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(summary.seconds, 3),
    }


def _write_json(path: Path, data: dict) -> None:
    write_file_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


def _source_error(error: BaseException | None) -> BadSourceError | None:
    """The BadSourceError that a Ray task raised, dug out of Ray's wrappers (their message is a remote traceback)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.RayTaskError):
            error = error.cause
        elif isinstance(error, BadSourceError):
            return BadSourceError(str(error).splitlines()[0])  # Ray appends retry notes on further lines
        else:
            error = error.__cause__ or error.__context__
    return None


def _skipped_text(skipped: dict[str, Skipped]) -> str:
    if not skipped:
        return "the source is empty"
    return "; ".join(f"{s.count} × {problem} (e.g. {s.examples[0]})" for problem, s in skipped.items())
