"""Token shards in the llm.c format: writing, reading, checking and finding them.

A shard is a header of 256 little-endian int32 — ``[20240520 (magic), 1 (version), n_tokens, 0, ...]`` — followed by
``n_tokens`` little-endian uint16 token ids, each document preceded by the end-of-text token. llm.c and modded-nanogpt
read these files unchanged. Pure numpy, no torch: the Ray Data workers that write shards import this module, and
each would otherwise pay about a second of CPU and 150 MB for importing torch. The loader that feeds shards to
training is gpt2.data; the Ray pipeline that produces them lives in ``cluster/``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2.config import EOT_TOKEN
from gpt2.durable import PARTIAL_SUFFIX, fsync_directory, naming_path

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INT32S = 256
HEADER_BYTES = HEADER_INT32S * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = np.iinfo(TOKEN_DTYPE).max
MANIFEST_NAME = "manifest.json"
SPLITS = ("val", "train")
SHARD_FILE = re.compile(r"^.+_(val|train)_\d{6}\.bin$")  # any dataset name, as llm.c names shards


class ShardFormatError(ValueError):
    """A file that is not a well-formed llm.c token shard."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in manifest.json (`file` is relative to the manifest's directory)."""

    file: str
    split: str
    tokens: int
    sha256: str


def shard_file_name(name: str, split: str, index: int) -> str:
    """`{name}_{split}_{index:06d}.bin`, the naming llm.c's data scripts use."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{name}_{split}_{index:06d}.bin"


def shard_header(n_tokens: int) -> bytes:
    if not 0 <= n_tokens <= np.iinfo(np.int32).max:
        raise ValueError(f"a shard holds at most {np.iinfo(np.int32).max} tokens (int32 header), got {n_tokens}")
    header = np.zeros(HEADER_INT32S, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, n_tokens)
    return header.tobytes()


def read_shard_header(path: str | os.PathLike) -> int:
    """The token count of a shard, after checking its magic, version and that the file size matches the header."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    magic, version, n_tokens = np.frombuffer(raw, dtype="<i4", count=3).tolist()
    if magic != SHARD_MAGIC:
        raise ShardFormatError(f"{path}: magic number {magic}, expected {SHARD_MAGIC}: not an llm.c token shard")
    if version != SHARD_VERSION:
        raise ShardFormatError(f"{path}: shard version {version}, expected {SHARD_VERSION} (uint16 tokens)")
    expected_size = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    actual_size = path.stat().st_size
    if actual_size != expected_size:
        raise ShardFormatError(
            f"{path}: header says {n_tokens} tokens ({expected_size} bytes) but the file has {actual_size} bytes"
            " (truncated or corrupt)"
        )
    return n_tokens


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a validated shard as a read-only memory map (nothing is read into memory up front)."""
    n_tokens = read_shard_header(path)
    if n_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _as_token_array(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.dtype == TOKEN_DTYPE:
        return tokens
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError(f"token ids must fit uint16 (0..{MAX_TOKEN_ID}); got range {tokens.min()}..{tokens.max()}")
    return tokens.astype(TOKEN_DTYPE)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, split: str = "train") -> ShardInfo:
    """Write one whole shard (temp name, then rename, so a crash never leaves a complete-looking partial file)."""
    path = Path(path)
    tokens = _as_token_array(tokens)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with naming_path(partial), open(partial, "wb") as f:
        f.write(shard_header(len(tokens)))
        f.write(tokens.tobytes())
        f.flush()
        os.fsync(f.fileno())  # before the rename, or a power loss could leave the final name on missing bytes
    sha = file_sha256(partial)
    os.replace(partial, path)
    fsync_directory(path.parent)
    return ShardInfo(file=path.name, split=split, tokens=len(tokens), sha256=sha)


class ShardWriter:
    """Streams a tokenized document stream into shards without holding more than one batch in memory.

    The first shard is the validation shard: it takes whole documents until it holds at least `val_tokens`, so no
    document is split between validation and training. Train shards then hold exactly `shard_tokens` each (the last
    one fewer); as in llm.c, a document may continue from one train shard into the next.
    Each shard is written under a temporary name and renamed once complete; `close()` returns what was written.
    """

    def __init__(self, directory: str | os.PathLike, name: str, *, shard_tokens: int, val_tokens: int) -> None:
        if shard_tokens <= 0 or val_tokens <= 0:
            raise ValueError(f"shard_tokens and val_tokens must be positive, got {shard_tokens} and {val_tokens}")
        if max(shard_tokens, val_tokens) > np.iinfo(np.int32).max:
            raise ValueError("shard_tokens and val_tokens must fit the int32 shard header")
        self.directory = Path(directory)
        self.name = name
        self.shard_tokens = shard_tokens
        self.val_tokens = val_tokens
        self.shards: list[ShardInfo] = []
        self.documents = 0
        self.tokens = 0
        self._split = "val"
        self._train_index = 0
        self._file = None
        self._file_path: Path | None = None
        self._file_tokens = 0

    def add_documents(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents given as one concatenated array (each document starting with EOT) and their lengths."""
        tokens = _as_token_array(tokens)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        if doc_lengths.sum() != len(tokens):
            raise ValueError(f"document lengths sum to {doc_lengths.sum()} but {len(tokens)} tokens were given")
        if len(doc_lengths) == 0:
            return
        starts = np.concatenate(([0], np.cumsum(doc_lengths)[:-1]))
        if (doc_lengths <= 0).any() or (tokens[starts] != EOT_TOKEN).any():
            raise ValueError(f"every document must be non-empty and start with the end-of-text token {EOT_TOKEN}")
        self.documents += len(doc_lengths)
        self.tokens += len(tokens)
        if self._split == "val":
            needed = self.val_tokens - self._file_tokens
            ends = np.cumsum(doc_lengths)
            last_val_doc = int(np.searchsorted(ends, needed))  # first document whose end reaches val_tokens
            if last_val_doc >= len(ends):
                self._write(tokens)
                return
            cut = int(ends[last_val_doc])
            self._write(tokens[:cut])
            self._finish_file()
            self._split = "train"
            tokens = tokens[cut:]
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self._file_tokens)
            self._write(tokens[:take])
            tokens = tokens[take:]
            if self._file_tokens == self.shard_tokens:
                self._finish_file()

    def close(self) -> list[ShardInfo]:
        """Complete the last shard; the stream must have reached the train split."""
        if self._file is not None:
            self._finish_file()
        if not any(s.split == "train" for s in self.shards):
            raise ValueError(
                f"the whole corpus ({self.tokens} tokens in {self.documents} documents) fits in the validation shard"
                f" (val_tokens={self.val_tokens}), leaving nothing to train on: lower val_tokens"
            )
        return list(self.shards)

    def abort(self) -> None:
        """Remove the shard being written; completed shards stay (they are whole and valid)."""
        if self._file is not None:
            # After a failed write (disk full) closing flushes the buffered rest and fails the same way; the error
            # is already on its way to the caller, and close() releases the descriptor all the same.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            self._partial_path().unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _write(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        if self._file is None:
            index = 0 if self._split == "val" else self._train_index
            self._file_path = self.directory / shard_file_name(self.name, self._split, index)
            self._file = open(self._partial_path(), "wb")
            self._file_tokens = 0
        with naming_path(self._partial_path()):
            if self._file_tokens == 0:
                self._file.write(shard_header(0))  # rewritten with the real count once the shard is complete
            self._file.write(tokens.tobytes())
        self._file_tokens += len(tokens)

    def _partial_path(self) -> Path:
        return self._file_path.with_name(self._file_path.name + PARTIAL_SUFFIX)

    def _finish_file(self) -> None:
        partial = self._partial_path()
        with naming_path(partial):
            self._file.seek(0)
            self._file.write(shard_header(self._file_tokens))
            self._file.flush()
            os.fsync(self._file.fileno())  # the bytes reach the disk before the rename makes them visible
            self._file.close()
        self._file = None
        sha = file_sha256(partial)
        os.replace(partial, self._file_path)
        fsync_directory(self.directory)
        self.shards.append(ShardInfo(self._file_path.name, self._split, self._file_tokens, sha))
        if self._split == "train":
            self._train_index += 1
        self._file_tokens = 0


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"] = [ShardInfo(**s) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardFormatError(f"{path}: not a readable shard manifest ({e})") from e
    return manifest


def find_damaged_shards(directory: str | os.PathLike, shards: list[ShardInfo]) -> list[str]:
    """Describe every listed shard that is missing or whose bytes differ from its recorded size/sha256."""
    problems = []
    for shard in shards:
        path = Path(directory) / shard.file
        try:
            n_tokens = read_shard_header(path)
        except (OSError, ShardFormatError) as e:
            problems.append(str(e))
            continue
        if n_tokens != shard.tokens:
            problems.append(f"{path}: {n_tokens} tokens, manifest says {shard.tokens}")
        elif file_sha256(path) != shard.sha256:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def _is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def resolve_shard_paths(pattern_or_manifest: str | os.PathLike, split: str) -> list[Path]:
    """Shard files of one split, in stream order, from a manifest.json, a directory holding one, or a glob pattern.

    With a glob pattern the split is picked by the file name (`_val_` / `_train_`, as llm.c names its shards).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    location = str(pattern_or_manifest)
    if _is_remote(location):
        raise ValueError(
            f"{location}: the loader reads local files only (it memory-maps them). Copy the shards to local disk"
            " first, e.g. with cluster.runtime.storage.copy_shards_to_local(uri, local_dir), then pass the local path"
        )
    location = location.removeprefix("file://")
    path = Path(location)
    if path.is_dir():
        path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} has no {MANIFEST_NAME}; pass a manifest or a glob pattern instead")
    if path.is_file() and path.suffix == ".json":
        files = [path.parent / s.file for s in read_manifest(path)["shards"] if s.split == split]
        if not files:
            raise FileNotFoundError(f"{path} lists no {split} shards")
        return files
    split_in_name = re.compile(rf"_{split}(_\d+)?\.bin$")
    files = [Path(p) for p in sorted(glob.glob(location)) if split_in_name.search(Path(p).name)]
    if not files:
        raise FileNotFoundError(f"no {split} shards (names containing _{split}_) match {location!r}")
    return files


def split_tokens(pattern_or_manifest: str | os.PathLike, split: str = "val") -> np.ndarray:
    """Every token of one split, shard after shard, as one array (for evaluation: val sets are small)."""
    arrays = [open_shard(p) for p in resolve_shard_paths(pattern_or_manifest, split)]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=TOKEN_DTYPE)
