"""WikiText-2 (raw, `wikitext-2-raw-v1`) from a local copy or the Hugging Face hub, for perplexity and fine-tuning.

The dataset's rows are the lines of the original `wiki.<split>.raw` files, each with its newline, and an empty
string for a blank line (the Hugging Face builder's rule, kept in the parquet files on the hub). Both layouts a
user may have are read into those same rows:

- the original release: a folder with `wiki.test.raw` (`wikitext-2-raw/` from wikitext-2-raw-v1.zip);
- the hub's files: a folder with `test-00000-of-00001.parquet`, or with `wikitext-2-raw-v1/` holding it, as
  `huggingface-cli download Salesforce/wikitext --repo-type dataset --include "wikitext-2-raw-v1/*" --local-dir D`
  writes it.

Without a local folder the hub's parquet files are taken from the Hugging Face cache (where `datasets.load_dataset`
also puts them), or downloaded when there is network. The evaluation text is `"\\n\\n".join(rows)`, the recipe of
the transformers perplexity guide, so figures are comparable with the ones computed that way.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HUB_REPO = "Salesforce/wikitext"
HUB_CONFIG = "wikitext-2-raw-v1"
RAW_FILE_NAMES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


class WikiTextError(ValueError):
    """WikiText-2 cannot be found or read; the message names the place and says how to provide it."""


def wikitext2_rows(split: str = "test", local: str | os.PathLike | None = None) -> list[str]:
    """The rows of a WikiText-2 raw split, from the folder `local` (either layout) or the Hugging Face hub/cache."""
    if split not in RAW_FILE_NAMES:
        raise WikiTextError(f"unknown WikiText-2 split {split!r}; choose one of {sorted(RAW_FILE_NAMES)}")
    if local is None:
        return _parquet_rows(_hub_split_files(split))
    directory = Path(local).expanduser()
    if not directory.is_dir():
        raise WikiTextError(f"WikiText-2 folder {directory} does not exist")
    for folder in (directory, directory / "wikitext-2-raw"):
        raw = folder / RAW_FILE_NAMES[split]
        if raw.is_file():
            return _raw_rows(raw)
    for folder in (directory, directory / HUB_CONFIG):
        parquet = sorted(folder.glob(f"{split}-*.parquet"))
        if parquet:
            return _parquet_rows(parquet)
    raise WikiTextError(
        f"{directory}: no WikiText-2 {split} split; expected {RAW_FILE_NAMES[split]} (the original release) or"
        f" {split}-*.parquet (the hub's files), directly in it or in wikitext-2-raw/ or {HUB_CONFIG}/"
    )


def wikitext2_text(split: str = "test", local: str | os.PathLike | None = None) -> str:
    """The split as one text for sliding-window perplexity: the rows joined by blank lines (see the module doc)."""
    return "\n\n".join(wikitext2_rows(split, local))


def _raw_rows(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:  # text mode: the builder read it so too (universal newlines)
            return [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as e:
        raise WikiTextError(f"{path}: not UTF-8 (byte {e.start}); is it the raw (not tokenized) release?") from e


def _parquet_rows(paths: list[Path]) -> list[str]:
    rows: list[str] = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise WikiTextError(f"{path}: not a readable parquet file ({e})") from e
        if "text" not in table.column_names:
            raise WikiTextError(f"{path}: no 'text' column (columns: {table.column_names})")
        texts = table.column("text").to_pylist()
        if any(not isinstance(t, str) for t in texts):
            raise WikiTextError(f"{path}: the 'text' column has null or non-string values")
        rows += texts
    return rows


def _hub_split_files(split: str) -> list[Path]:
    """The split's parquet files from the Hugging Face cache, else downloaded (a clear error without network)."""
    from huggingface_hub import snapshot_download  # imported on use: only the hub route needs it, and it loads slowly

    pattern = f"{HUB_CONFIG}/{split}-*.parquet"
    reason = "no parquet files for the split"
    for local_only in (True, False):  # the cache first: it answers at once, also offline
        try:
            folder = Path(snapshot_download(
                HUB_REPO, repo_type="dataset", allow_patterns=[pattern], local_files_only=local_only
            ))
        except Exception as e:  # huggingface_hub raises several types for "not cached" / "no network"
            reason = type(e).__name__
            continue
        files = sorted((folder / HUB_CONFIG).glob(f"{split}-*.parquet"))
        if files:
            return files
    raise WikiTextError(
        f"WikiText-2 ({HUB_REPO}, {HUB_CONFIG}) is neither in the Hugging Face cache nor downloadable here"
        f" ({reason}). On a machine with network run `huggingface-cli download {HUB_REPO}"
        f' --repo-type dataset --include "{HUB_CONFIG}/*" --local-dir DIR` (or unzip wikitext-2-raw-v1.zip into DIR),'
        " copy DIR here and pass it as the local WikiText-2 folder."
    )
