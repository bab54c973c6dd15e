"""Text sources as Ray Datasets of documents, for pretraining shards now and fine-tuning data later.

Every source becomes rows `{text, problem, where}`, in a fixed order (files sorted by path, rows in file order):
a good document has `text` and null `problem`/`where`; a bad one (not UTF-8, empty, too long, ...) has null `text`,
a short `problem` category and a `where` naming the file and line/row, so the pipeline can count, report or refuse
it — nothing is dropped silently. Problems with a whole source (nothing to read, a parquet file without the text
column) raise `BadSourceError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from cluster.runtime.storage import resolve_filesystem
from gpt2.text_documents import parse_delimiter, split_txt

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

SOURCE_KINDS = ("python-docs", "fineweb-edu", "files")
FINEWEB_EDU_REPO = "hf://datasets/HuggingFaceFW/fineweb-edu"
DOCUMENT_SCHEMA = pa.schema([("text", pa.string()), ("problem", pa.string()), ("where", pa.string())])
# Compressed .jsonl/.txt are read through Ray's decompressing streams; the format is the suffix before these.
COMPRESSION_SUFFIXES = (".gz", ".zst", ".bz2", ".lz4")
FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".txt": "txt"}
# Read tasks mostly wait on storage and parse JSON/parquet: a quarter CPU each, so that with one tokenizer actor per
# core (which reserve the other three quarters, see cluster.data.prepare) reading never starves.
READ_TASK_CPUS = 0.25
ROWS_PER_BLOCK = 256  # documents per Ray block: ~1 MB of FineWeb text, ~0.1 s of tokenizing


class BadSourceError(ValueError):
    """A source that cannot be read as documents at all (the message names the file)."""


@dataclass(frozen=True)
class SourceSpec:
    """What to read. `inputs` are files, folders or s3://, gs://, hf:// URIs; for `fineweb-edu` they are an
    optional copy of its parquet files (default: the `fineweb_name` subset on the Hugging Face hub)."""

    kind: str = "python-docs"
    inputs: tuple[str, ...] = ()
    fineweb_name: str = "sample-10BT"
    text_field: str = "text"  # the document column/key in .parquet and .jsonl files
    # None: each .txt file is one document. "SEP": documents are separated by SEP. "START...END": each document
    # is the text between START and END (e.g. "<LOC>...</LOC>"); anything else outside the tags is reported.
    txt_delimiter: str | None = None
    max_doc_chars: int = 10_000_000  # longer documents are reported and skipped, not tokenized

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source {self.kind!r}; choose one of {SOURCE_KINDS}")
        if self.kind == "files" and not self.inputs:
            raise ValueError("the 'files' source needs at least one input file or folder")
        if self.kind == "python-docs" and self.inputs:
            raise ValueError("the 'python-docs' source is built in and takes no inputs")
        if self.max_doc_chars <= 0:
            raise ValueError(f"max_doc_chars must be positive, got {self.max_doc_chars}")
        try:
            parse_delimiter(self.txt_delimiter)
        except ValueError as e:
            raise ValueError(f"txt_delimiter: {e}") from e


@dataclass(frozen=True)
class ResolvedSource:
    """A source with its files listed: what `read_documents` reads and what the manifest fingerprints."""

    spec: SourceSpec
    filesystem: pafs.FileSystem | None = None
    files: tuple[tuple[str, int, int | None], ...] = ()  # (path, size, mtime in ns if the filesystem has one)
    ignored: tuple[str, ...] = ()  # files in input folders that are not a readable format
    description: dict = field(default_factory=dict)

    def fingerprint(self) -> dict:
        """Everything about the input that decides the output bytes (paths, sizes, mtimes; corpus hash)."""
        return {"spec": asdict(self.spec), "files": [list(f) for f in self.files], **self.description}


def fineweb_edu_location(name: str) -> str:
    """The hub folder of a FineWeb-Edu subset, named as the dataset's configurations on the hub:
    `sample-10BT` → sample/10BT, `CC-MAIN-2024-10` → data/CC-MAIN-2024-10, `default` → data."""
    if name.startswith("sample-"):
        return f"{FINEWEB_EDU_REPO}/sample/{name.removeprefix('sample-')}"
    if name.startswith("CC-MAIN-"):
        return f"{FINEWEB_EDU_REPO}/data/{name}"
    if name == "default":
        return f"{FINEWEB_EDU_REPO}/data"
    raise ValueError(
        f"unknown FineWeb-Edu subset {name!r}: use sample-10BT, sample-100BT, sample-350BT, CC-MAIN-<dump> or default"
    )


def file_format(path: str) -> str | None:
    """The document format a file name says: parquet, jsonl or txt (jsonl/txt may be compressed), else None."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix) and not name.endswith(".parquet" + suffix):
            name = name.removesuffix(suffix)
            break
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def resolve_source(spec: SourceSpec, hf_filesystem: AbstractFileSystem | None = None) -> ResolvedSource:
    """List the source's files (sorted, so the document order is fixed) or, for python-docs, fingerprint the text."""
    if spec.kind == "python-docs":
        digest = hashlib.sha256()
        for doc in _python_docs_documents():
            digest.update(f"{doc.source}\0{doc.text}\0".encode("utf-8", "surrogatepass"))
        return ResolvedSource(spec, description={"python": sys.version, "corpus_sha256": digest.hexdigest()})
    locations = spec.inputs or (fineweb_edu_location(spec.fineweb_name),)
    allowed = ("parquet",) if spec.kind == "fineweb-edu" else tuple(FORMATS.values())
    resolved = [resolve_filesystem(loc, hf_filesystem) for loc in locations]
    filesystem = resolved[0][0]
    if any(fs.type_name != filesystem.type_name for fs, _ in resolved):
        raise BadSourceError(f"inputs {list(locations)} are on different filesystems; copy them to one place")
    files, ignored = {}, []
    for location, (_, path) in zip(locations, resolved, strict=True):
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise BadSourceError(f"{location}: no such file or folder")
        if info.type == pafs.FileType.File:
            if file_format(path) not in allowed:
                raise BadSourceError(f"{location}: not a {'/'.join('.' + f for f in allowed)} file")
            files[path] = info
            continue
        for entry in filesystem.get_file_info(pafs.FileSelector(path, recursive=True)):
            hidden = any(p.startswith((".", "_")) for p in entry.path[len(path) :].split("/"))
            if entry.type != pafs.FileType.File or hidden:  # dot/underscore names are metadata (_SUCCESS, .cache)
                continue
            if file_format(entry.path) in allowed:
                files[entry.path] = entry
            else:
                ignored.append(entry.path)
    if not files:
        raise BadSourceError(f"no {'/'.join('.' + f for f in allowed)} files in {list(locations)}")
    listing = tuple((p, files[p].size, files[p].mtime_ns) for p in sorted(files))
    return ResolvedSource(spec, filesystem, listing, tuple(sorted(ignored)))


def read_documents(
    source: ResolvedSource, *, rows_per_block: int = ROWS_PER_BLOCK, concurrent_reads: int | None = None
) -> ray.data.Dataset:
    """A Ray Dataset of `{text, problem, where}` rows in the source's order (keep that order when consuming it:
    set `execution_options.preserve_order` on the dataset you iterate). `concurrent_reads` caps the read tasks
    running at once (default: as many as the CPUs allow)."""
    spec = source.spec
    if spec.kind == "python-docs":
        return ray.data.from_arrow(list(_python_docs_tables(spec, rows_per_block)))
    datasource = _DocumentFiles(
        [path for path, _, _ in source.files],
        filesystem=source.filesystem,
        spec=spec,
        rows_per_block=rows_per_block,
    )
    return ray.data.read_datasource(
        datasource, num_cpus=READ_TASK_CPUS, compute=ray.data.TaskPoolStrategy(size=concurrent_reads)
    )


def iter_documents(source: ResolvedSource, *, rows_per_block: int = ROWS_PER_BLOCK) -> Iterator[pa.Table]:
    """The same `{text, problem, where}` tables as `read_documents`, in the same order, read file after file in
    this process without Ray: for tools that look at a source (often only its first documents) instead of
    processing all of it."""
    spec = source.spec
    if spec.kind == "python-docs":
        yield from _python_docs_tables(spec, rows_per_block)
        return
    reader = _DocumentReader(spec, rows_per_block)
    for path, _, _ in source.files:
        if file_format(path) == "parquet":
            opened = source.filesystem.open_input_file(path)  # parquet needs random access to read its footer
        else:
            opened = source.filesystem.open_input_stream(path, compression="detect")  # by suffix, as Ray does
        with opened as f:
            yield from reader.read(f, path)


def _python_docs_tables(spec: SourceSpec, rows_per_block: int) -> Iterator[pa.Table]:
    rows = _DocumentRows(spec.max_doc_chars, rows_per_block)
    for doc in _python_docs_documents():
        yield from rows.add(doc.text, doc.source)
    yield from rows.flush()


def _python_docs_documents() -> tuple:
    # Imported on use: every read task unpickles this module, and importing the gpt2 package loads torch (seconds
    # per worker process) which reading files never needs.
    from gpt2.corpus import python_docs_documents

    return python_docs_documents()


class _DocumentRows:
    """Collects documents into Arrow tables of `rows_per_block` rows, classifying the bad ones."""

    def __init__(self, max_doc_chars: int, rows_per_block: int) -> None:
        self.max_doc_chars = max_doc_chars
        self.rows_per_block = rows_per_block
        self._columns: tuple[list, list, list] = ([], [], [])

    def add(self, text: str, where: str) -> list[pa.Table]:
        if not text or text.isspace():
            return self.add_problem("empty", where)
        if len(text) > self.max_doc_chars:
            return self.add_problem(f"longer than {self.max_doc_chars} characters", where)
        return self._append(text, None, None)

    def add_problem(self, problem: str, where: str) -> list[pa.Table]:
        return self._append(None, problem, where)

    def flush(self) -> list[pa.Table]:
        if not self._columns[0]:
            return []
        table = pa.table(dict(zip(DOCUMENT_SCHEMA.names, self._columns, strict=True)), schema=DOCUMENT_SCHEMA)
        self._columns = ([], [], [])
        return [table]

    def _append(self, text: str | None, problem: str | None, where: str | None) -> list[pa.Table]:
        for column, value in zip(self._columns, (text, problem, where), strict=True):
            column.append(value)
        return self.flush() if len(self._columns[0]) >= self.rows_per_block else []


class _DocumentFiles(FileBasedDatasource):
    """Ray Data datasource for .parquet, .jsonl and .txt files: one read stream per file, rows in file order."""

    def __init__(self, paths: list[str], *, filesystem: pafs.FileSystem, spec: SourceSpec, rows_per_block: int):
        super().__init__(paths, filesystem=filesystem)
        self._reader = _DocumentReader(spec, rows_per_block)

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        if file_format(path) == "parquet":
            return filesystem.open_input_file(path)  # parquet needs random access to read its footer
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from self._reader.read(f, path)


class _DocumentReader:
    """One open .parquet, .jsonl or .txt file as document tables: shared by the Ray datasource and iter_documents."""

    def __init__(self, spec: SourceSpec, rows_per_block: int) -> None:
        self._spec = spec
        self._rows_per_block = rows_per_block

    def read(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = _DocumentRows(self._spec.max_doc_chars, self._rows_per_block)
        read = {"parquet": self._parquet, "jsonl": self._jsonl, "txt": self._txt}[file_format(path)]
        yield from read(f, path, rows)
        yield from rows.flush()

    def _parquet(self, f: pa.NativeFile, path: str, rows: _DocumentRows) -> Iterator[pa.Table]:
        name = self._spec.text_field
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowException as e:
            raise BadSourceError(f"{path}: not a readable parquet file ({e})") from e
        schema = parquet.schema_arrow
        if name not in schema.names:
            raise BadSourceError(f"{path}: no column {name!r} (columns: {schema.names}); set the text field")
        if not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
            raise BadSourceError(f"{path}: column {name!r} has type {schema.field(name).type}, expected strings")
        row = 0
        for batch in parquet.iter_batches(batch_size=self._rows_per_block, columns=[name]):
            for text in batch.column(0).to_pylist():
                where = f"{path} row {row}"
                row += 1
                if text is None:
                    yield from rows.add_problem(f"no {name!r} value", where)
                else:
                    yield from rows.add(text, where)

    def _jsonl(self, f: pa.NativeFile, path: str, rows: _DocumentRows) -> Iterator[pa.Table]:
        name = self._spec.text_field
        for line_number, line in _lines(f):
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield from rows.add_problem("not UTF-8", f"{where} (byte {e.start})")
                continue
            except ValueError as e:
                yield from rows.add_problem("invalid JSON", f"{where} ({e})")
                continue
            text = record.get(name) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield from rows.add_problem(f"no {name!r} string", where)
            elif not _encodes_as_utf8(text):  # JSON can escape lone surrogates, which no tokenizer accepts
                yield from rows.add_problem("not UTF-8", f"{where} (lone surrogate escape)")
            else:
                yield from rows.add(text, where)

    def _txt(self, f: pa.NativeFile, path: str, rows: _DocumentRows) -> Iterator[pa.Table]:
        data = f.readall()  # a .txt file is read whole; use .jsonl or .parquet for very large corpora
        for piece, line_number, problem in split_txt(data, self._spec.txt_delimiter):
            where = f"{path}:{line_number}"
            if problem:
                yield from rows.add_problem(problem, where)
                continue
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as e:
                yield from rows.add_problem("not UTF-8", f"{where} (byte {e.start} of the document)")
                continue
            yield from rows.add(text, where)


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lines(f: pa.NativeFile, chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without newline), streaming: memory is one chunk plus the longest line."""
    rest, line_number = b"", 0
    while chunk := f.read(chunk_bytes):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            line_number += 1
            yield line_number, line
    if rest:
        yield line_number + 1, rest
