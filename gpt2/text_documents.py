"""Cutting a text file into documents: one document per file, documents between separators, or between tags.

A delimiter is written the same way everywhere (`prepare_data --txt-delimiter`, fine-tuning configs):
None — the whole file is one document; "SEP" — documents are separated by SEP; "START...END" — each document is
the text between START and END (e.g. "<LOC>...</LOC>"), and anything else outside the tags is a problem.

No torch import here: the Ray Data read tasks in cluster/data/sources.py use this module, and importing torch would cost
each of their worker processes seconds for nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

TAG_SEPARATOR = "..."


class DocumentFormatError(ValueError):
    """Text that cannot be cut into documents as asked; the message names the source (file) and line."""


def parse_delimiter(delimiter: str | None) -> str | tuple[str, str] | None:
    """None, a separator string, or the (start, end) tags of "START...END"; ValueError for "" or a missing tag."""
    if delimiter is None:
        return None
    if delimiter == "":
        raise ValueError("the delimiter must be non-empty (or None for one document per file)")
    if TAG_SEPARATOR not in delimiter:
        return delimiter
    start, _, end = delimiter.partition(TAG_SEPARATOR)
    if not start or not end:
        raise ValueError(f"delimiter {delimiter!r}: give both tags, as in '<LOC>...</LOC>'")
    return start, end


def split_txt(data: bytes, delimiter: str | None) -> Iterator[tuple[bytes, int, str | None]]:
    """(document bytes, 1-based line where it starts, problem or None) for one file's bytes.

    Works on bytes so that a file with one badly encoded document loses only that document. Problems are
    "text outside START...END" (non-blank text between tagged documents) and "START without END" (the rest of
    the file after an unclosed tag). Pieces may be empty or blank; the caller decides what that means.
    """
    parsed = parse_delimiter(delimiter)
    if parsed is None:
        yield data, 1, None
        return
    if isinstance(parsed, str):
        separator = parsed.encode("utf-8")
        line = 1
        for piece in data.split(separator):
            yield piece, line, None
            line += piece.count(b"\n") + separator.count(b"\n")
        return
    start_tag, end_tag = (t.encode("utf-8") for t in parsed)
    lines = _LineCounter(data)
    position = 0
    while True:
        start = data.find(start_tag, position)
        outside = data[position : start if start >= 0 else len(data)]
        if outside.strip():
            first_visible = position + len(outside) - len(outside.lstrip())
            yield b"", lines.at(first_visible), f"text outside {delimiter}"
        if start < 0:
            return
        end = data.find(end_tag, start + len(start_tag))
        if end < 0:
            yield b"", lines.at(start), f"{start_tag.decode()} without {end_tag.decode()}"
            return
        yield data[start + len(start_tag) : end], lines.at(start), None
        position = end + len(end_tag)


class _LineCounter:
    """Line numbers of increasing byte offsets, counting each newline once (not O(n) per lookup)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._offset, self._line = data, 0, 1

    def at(self, offset: int) -> int:
        self._line += self._data.count(b"\n", self._offset, offset)
        self._offset = offset
        return self._line


def split_on_delimiters(text: str, delimiter: str | None, *, source: str = "<text>") -> list[str]:
    """The documents of `text`, verbatim (not stripped), strictly: any problem raises DocumentFormatError.

    Errors name `source` (pass the file path): empty text, a delimiter that never occurs (a wrong delimiter would
    otherwise silently make the whole file one document), text outside the tags, an unclosed tag. Blank pieces —
    after a trailing separator, or an empty `<LOC></LOC>` — hold nothing to learn and are skipped.
    """
    if not text.strip():
        raise DocumentFormatError(f"{source}: empty, no documents in it")
    try:
        parsed = parse_delimiter(delimiter)
    except ValueError as e:
        raise DocumentFormatError(f"{source}: {e}") from e
    if parsed is None:
        return [text]
    marker = parsed if isinstance(parsed, str) else parsed[0]
    if marker not in text:
        raise DocumentFormatError(f"{source}: no {marker!r} in the text, so no documents delimited by {delimiter!r}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a JSON escape
        raise DocumentFormatError(f"{source}: not encodable as UTF-8 at character {e.start}") from e
    documents = []
    for piece, line, problem in split_txt(data, delimiter):
        if problem:
            raise DocumentFormatError(f"{source}:{line}: {problem}")
        document = piece.decode("utf-8")  # UTF-8 cut at a UTF-8 delimiter stays valid UTF-8
        if document.strip():
            documents.append(document)
    if not documents:
        raise DocumentFormatError(f"{source}: every document delimited by {delimiter!r} is empty")
    return documents


def read_text_documents(path: str | os.PathLike, delimiter: str | None) -> list[str]:
    """The documents of one UTF-8 text file (see split_on_delimiters); errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DocumentFormatError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentFormatError(f"{path}: not UTF-8 (byte {e.start})") from e
    return split_on_delimiters(text, delimiter, source=str(path))
