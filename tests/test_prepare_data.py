"""The Ray Data pipeline: sources → tokenizer actors → ordered llm.c shards + manifest (real Ray, real files).

Every full job run starts a pool of tokenizer actors, which takes seconds on two cores, so the runs are shared
through module-scoped fixtures and kept few; the checks that need no actors read or write directly.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from cluster.data.prepare import (
    MARKER_NAME,
    PrepareConfig,
    prepare_data,
    write_shards,
)
from cluster.data.sources import BadSourceError, SourceSpec, fineweb_edu_location, read_documents, resolve_source
from cluster.runtime.storage import copy_shards_to_local
from gpt2.config import EOT_TOKEN
from gpt2.corpus import python_docs_documents
from gpt2.data import ShardedTokenLoader
from gpt2.shards import MANIFEST_NAME, ShardWriter, file_sha256, open_shard, read_manifest, read_shard_header
from gpt2.tokenizer import get_tokenizer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def expected_stream(texts: list[str]) -> list[int]:
    """What the shards must hold: EOT before each document, then its ordinary GPT-2 encoding."""
    encoding = get_tokenizer()
    return [token for t in texts for token in [EOT_TOKEN, *encoding.encode_ordinary(t)]]


def written_stream(out: Path) -> list[int]:
    manifest = read_manifest(out / MANIFEST_NAME)
    return np.concatenate([open_shard(out / s.file) for s in manifest["shards"]]).tolist()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


# --- a small corpus in every supported format, with every kind of bad document -----------------------------------

FINEWEB_COLUMNS = {  # the FineWeb-Edu parquet schema: text plus crawl metadata and the educational score
    "text": pa.string(),
    "id": pa.string(),
    "dump": pa.string(),
    "url": pa.string(),
    "file_path": pa.string(),
    "language": pa.string(),
    "language_score": pa.float64(),
    "token_count": pa.int64(),
    "score": pa.float64(),
    "int_score": pa.int64(),
}


def write_fineweb_parquet(path: Path, texts: list[str | None]) -> None:
    n = len(texts)
    columns = {
        "text": texts,
        "id": [f"<urn:uuid:{i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.97] * n,
        "token_count": [len(t or "") // 4 for t in texts],
        "score": [3.2] * n,
        "int_score": [3] * n,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=pa.schema(FINEWEB_COLUMNS)), path, row_group_size=2)


GOOD_DOCS = [  # in the order the source must yield them (files sorted by path, rows in file order)
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Plate tectonics explains earthquakes, volcanoes and the shapes of continents.",
    "Les élèves apprennent la géométrie: π ≈ 3.14159 — naïve café.",
    "The mitochondrion is the powerhouse of the cell.",
    "First JSON document.",
    "A literal <|endoftext|> inside a document is ordinary text, not a boundary.",
    "Compressed JSON Lines are read too.",
    "Doc A between tags.",
    "Doc B\nover two lines.",
    "A document inside tags in a sub-folder.\n",
]
MAX_DOC_CHARS = 100
EXPECTED_PROBLEMS = [  # (problem, part of its `where`)
    ("no 'text' value", "a_fineweb_000.parquet row 2"),
    ("not UTF-8", "b_docs.jsonl:2 (byte 13)"),
    ("invalid JSON", "b_docs.jsonl:3 (Expecting property name"),
    ("no 'text' string", "b_docs.jsonl:4"),
    ("empty", "b_docs.jsonl:5"),
    (f"longer than {MAX_DOC_CHARS} characters", "b_docs.jsonl:6"),
    ("not UTF-8", "b_docs.jsonl:7 (lone surrogate escape)"),
    ("text outside <LOC>...</LOC>", "c_tags.txt:4"),
    ("<LOC> without </LOC>", "c_tags.txt:5"),
    ("not UTF-8", "d_latin1.txt:1 (byte 3 of the document)"),
]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_fineweb_parquet(root / "a_fineweb_000.parquet", [GOOD_DOCS[0], GOOD_DOCS[1], None])
    write_fineweb_parquet(root / "a_fineweb_001.parquet", [GOOD_DOCS[2], GOOD_DOCS[3]])
    jsonl_lines = [
        json.dumps({"text": GOOD_DOCS[4], "meta": 1}).encode(),
        b'{"text": "caf\xe9"}',  # Latin-1 byte where UTF-8 is required
        b"{not json",
        json.dumps({"body": "the text is under another key"}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "x" * (MAX_DOC_CHARS + 1)}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
        b"",  # blank lines are not records
        json.dumps({"text": GOOD_DOCS[5]}).encode(),
    ]
    (root / "b_docs.jsonl").write_bytes(b"\n".join(jsonl_lines) + b"\n")
    with gzip.open(root / "b_more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": GOOD_DOCS[6]}) + "\n")
    (root / "c_tags.txt").write_text(f"<LOC>{GOOD_DOCS[7]}</LOC>\n<LOC>{GOOD_DOCS[8]}</LOC>\nstray\n<LOC>unclosed")
    (root / "d_latin1.txt").write_bytes("<LOC>café</LOC>".encode("latin-1"))
    (root / "sub").mkdir()
    (root / "sub" / "e_tags.txt").write_text(f"<LOC>{GOOD_DOCS[9]}</LOC>\n")
    (root / "README.md").write_text("not a corpus file")
    (root / ".cache").mkdir()
    (root / ".cache" / "hidden.jsonl").write_text('{"text": "hidden files are metadata, not documents"}\n')
    return root


def files_spec(corpus: Path) -> SourceSpec:
    return SourceSpec("files", (str(corpus),), txt_delimiter="<LOC>...</LOC>", max_doc_chars=MAX_DOC_CHARS)


def test_readers_yield_every_document_in_order_and_report_bad_ones(ray_session, corpus_dir):
    source = resolve_source(files_spec(corpus_dir))
    assert [Path(p).name for p, _, _ in source.files] == [
        "a_fineweb_000.parquet",
        "a_fineweb_001.parquet",
        "b_docs.jsonl",
        "b_more.jsonl.gz",
        "c_tags.txt",
        "d_latin1.txt",
        "e_tags.txt",
    ]
    assert [Path(p).name for p in source.ignored] == ["README.md"]
    ds = read_documents(source, rows_per_block=2, concurrent_reads=1)
    ds.context.execution_options.preserve_order = True
    rows = ds.take_all()
    assert [r["text"] for r in rows if r["problem"] is None] == GOOD_DOCS
    problems = [(r["problem"], r["where"]) for r in rows if r["problem"] is not None]
    assert len(problems) == len(EXPECTED_PROBLEMS)
    for (problem, where), (expected_problem, suffix) in zip(problems, EXPECTED_PROBLEMS, strict=True):
        assert problem == expected_problem and where.startswith(str(corpus_dir)) and suffix in where, where


@pytest.mark.parametrize(
    "delimiter, expected",
    [
        (None, ["One file, one document.\n\nEven with blank lines.\n"]),
        ("\n\n", ["One file, one document.", "Even with blank lines.\n"]),
    ],
)
def test_txt_files_are_one_document_or_split_on_a_separator(ray_session, tmp_path, delimiter, expected):
    (tmp_path / "a.txt").write_text("One file, one document.\n\nEven with blank lines.\n")
    rows = read_documents(resolve_source(SourceSpec("files", (str(tmp_path),), txt_delimiter=delimiter))).take_all()
    assert [r["text"] for r in rows] == expected


def test_fineweb_edu_is_read_from_the_hub_layout(ray_session, tmp_path):
    # The hub is laid out as datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet; a local fsspec filesystem
    # with the same layout stands in for huggingface_hub.HfFileSystem (no network here).
    hub_dir = tmp_path / "datasets/HuggingFaceFW/fineweb-edu/sample/10BT"
    write_fineweb_parquet(hub_dir / "000_00000.parquet", GOOD_DOCS[:3])
    write_fineweb_parquet(hub_dir / "001_00000.parquet", GOOD_DOCS[3:5])
    fake_hub = DirFileSystem(path=str(tmp_path), fs=LocalFileSystem())
    assert fineweb_edu_location("sample-10BT") == "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT"
    source = resolve_source(SourceSpec("fineweb-edu"), hf_filesystem=fake_hub)
    assert [p for p, _, _ in source.files] == [
        "datasets/HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet",
        "datasets/HuggingFaceFW/fineweb-edu/sample/10BT/001_00000.parquet",
    ]
    ds = read_documents(source)
    ds.context.execution_options.preserve_order = True
    assert [r["text"] for r in ds.take_all()] == GOOD_DOCS[:5]


def test_unreadable_sources_fail_with_the_path(tmp_path):
    with pytest.raises(BadSourceError, match="missing: no such file or folder"):
        resolve_source(SourceSpec("files", (str(tmp_path / "missing"),)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadSourceError, match=r"no \.parquet/\.jsonl/\.txt files"):
        resolve_source(SourceSpec("files", (str(tmp_path / "empty"),)))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(BadSourceError, match=r"notes\.md: not a"):
        resolve_source(SourceSpec("files", (str(tmp_path / "notes.md"),)))
    with pytest.raises(BadSourceError, match=r"not a \.parquet file"):
        resolve_source(SourceSpec("fineweb-edu", (str(tmp_path / "notes.md"),)))


# --- the whole job -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python_docs_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("pydocs")
    reports = []
    config = PrepareConfig(
        SourceSpec("python-docs"),
        str(out),
        "pydocs",
        shard_tokens=150_000,
        val_tokens=20_000,
        tokenizers=2,
        batch_size=16,
    )
    summary = prepare_data(config, on_progress=reports.append, progress_interval_s=0)
    return config, summary, reports


@pytest.mark.slow
def test_python_docs_shards_hold_exactly_the_corpus(python_docs_run):
    config, summary, _ = python_docs_run
    out = Path(config.output_dir)
    docs = python_docs_documents()
    expected = expected_stream([d.text for d in docs])
    assert written_stream(out) == expected
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["documents"] == summary.documents == len(docs)
    assert manifest["tokens"] == summary.tokens == len(expected)
    assert [s["file"] for s in manifest["shards"]] == ["pydocs_val_000000.bin"] + [
        f"pydocs_train_{i:06d}.bin" for i in range(len(manifest["shards"]) - 1)
    ]
    for shard in manifest["shards"]:
        assert read_shard_header(out / shard["file"]) == shard["tokens"]
        assert file_sha256(out / shard["file"]) == shard["sha256"]
    assert sum(s["tokens"] for s in manifest["shards"]) == len(expected)
    val_tokens = manifest["shards"][0]["tokens"]
    assert val_tokens >= config.val_tokens and expected[val_tokens] == EOT_TOKEN  # val ends at a document boundary
    assert manifest["tokenizer"]["eot_token"] == EOT_TOKEN and manifest["source"]["spec"]["kind"] == "python-docs"
    assert not (out / MARKER_NAME).exists() and not list(out.glob("*.partial"))


def test_progress_is_reported_while_running(python_docs_run):
    _, summary, reports = python_docs_run
    assert len(reports) > 2
    assert [r.tokens for r in reports] == sorted(r.tokens for r in reports)
    assert (reports[-1].documents, reports[-1].tokens) == (summary.documents, summary.tokens)
    assert "tokens/s" in reports[-1].format() and "skipped documents: none" in summary.format()


def test_rerun_with_intact_output_is_a_no_op(python_docs_run):
    config, summary, _ = python_docs_run
    out = Path(config.output_dir)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_data(config)
    assert (
        again.up_to_date
        and again.tokens == summary.tokens
        and [s.sha256 for s in again.shards] == [s.sha256 for s in summary.shards]
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert "already up to date" in again.format()


def test_the_loader_reads_the_job_output(python_docs_run):
    out = Path(python_docs_run[0].output_dir)
    x, _ = ShardedTokenLoader(out, B=2, T=64, seed=0).next_batch()
    assert x.shape == (2, 64) and int(x.max()) < 50257
    assert sum(x.shape[0] for x, _ in ShardedTokenLoader(out / MANIFEST_NAME, B=8, T=256, split="val")) > 0


@pytest.fixture(scope="module")
def files_run_one_tokenizer(ray_session, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("files1")
    config = PrepareConfig(
        files_spec(corpus_dir), str(out), "mixed", shard_tokens=40, val_tokens=25, tokenizers=1, batch_size=2
    )
    return config, prepare_data(config)


@pytest.mark.slow
def test_bad_documents_are_counted_and_reported(files_run_one_tokenizer):
    config, summary = files_run_one_tokenizer
    assert summary.documents == len(GOOD_DOCS)
    counts = {problem: s.count for problem, s in summary.skipped.items()}
    assert counts["not UTF-8"] == 3 and sum(counts.values()) == len(EXPECTED_PROBLEMS)
    text = summary.format()
    assert f"skipped documents: {len(EXPECTED_PROBLEMS)}" in text and "b_docs.jsonl:3" in text
    assert "README.md" in text  # files of other formats are listed, not silently passed over
    manifest = json.loads((Path(config.output_dir) / MANIFEST_NAME).read_text())
    assert manifest["skipped"]["invalid JSON"]["count"] == 1


def token_rows(problems: list[tuple[str, str] | None]) -> pa.Table:
    """Tokenizer output as the writer receives it: a document per None, a reported problem per (problem, where)."""
    return pa.table(
        {
            "tokens": pa.array([[EOT_TOKEN, 1, 2] if p is None else [] for p in problems], type=pa.list_(pa.uint16())),
            "problem": [None if p is None else p[0] for p in problems],
            "where": [None if p is None else p[1] for p in problems],
        }
    )


def test_bad_documents_can_be_made_fatal(ray_session, tmp_path):
    rows = token_rows([None, ("not UTF-8", "corpus.jsonl:2 (byte 5)"), None])
    with ShardWriter(tmp_path, "x", shard_tokens=10, val_tokens=2) as writer:
        with pytest.raises(BadSourceError, match=r"corpus.jsonl:2 \(byte 5\): not UTF-8"):
            write_shards(ray_session.data.from_arrow(rows), writer, on_bad_document="error")


def test_a_source_without_one_good_document_is_an_error(ray_session, tmp_path):
    rows = token_rows([("empty", "a.jsonl:1"), ("empty", "a.jsonl:2"), ("invalid JSON", "a.jsonl:3")])
    with ShardWriter(tmp_path, "x", shard_tokens=10, val_tokens=2) as writer:
        with pytest.raises(BadSourceError, match=r"no usable documents: 2 × empty \(e.g. a.jsonl:1\); 1 × invalid"):
            write_shards(ray_session.data.from_arrow(rows), writer)


@pytest.mark.slow
def test_an_interrupted_run_recovers_and_two_tokenizers_write_the_same_bytes_as_one(files_run_one_tokenizer, tmp_path):
    config, _ = files_run_one_tokenizer
    reference = shard_bytes(Path(config.output_dir))
    two_tokenizers = dataclasses.replace(config, output_dir=str(tmp_path), tokenizers=2)

    class Interrupted(Exception):
        pass

    def interrupt_after_two_shards(progress):
        if progress.shards >= 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        prepare_data(two_tokenizers, on_progress=interrupt_after_two_shards, progress_interval_s=0)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert MANIFEST_NAME not in left and MARKER_NAME in left and not any(n.endswith(".partial") for n in left)
    left_shards = [n for n in left if n.endswith(".bin")]
    assert 2 <= len(left_shards) < len(reference)
    for name in left_shards:
        read_shard_header(tmp_path / name)  # whatever an interruption leaves is complete and valid

    recovered = prepare_data(two_tokenizers)  # the same command again; no --overwrite needed
    assert not recovered.up_to_date and len(reference) > 3
    assert shard_bytes(tmp_path) == reference  # byte-identical to the one-tokenizer run
    assert written_stream(tmp_path) == expected_stream(GOOD_DOCS)


@pytest.mark.slow
def test_other_settings_need_overwrite_which_removes_stale_shards(files_run_one_tokenizer, tmp_path):
    config, _ = files_run_one_tokenizer
    shutil.copytree(config.output_dir, tmp_path, dirs_exist_ok=True)
    bigger_shards = dataclasses.replace(config, output_dir=str(tmp_path), shard_tokens=1000)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data(bigger_shards)
    summary = prepare_data(bigger_shards, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["mixed_train_000000.bin", "mixed_val_000000.bin"]
    assert written_stream(tmp_path) == expected_stream(GOOD_DOCS) and len(summary.shards) == 2


def test_shard_files_without_a_manifest_are_not_overwritten_silently(ray_session, tmp_path):
    (tmp_path / "someone_train_000000.bin").write_bytes(b"")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data(PrepareConfig(SourceSpec("python-docs"), str(tmp_path), "pydocs", val_tokens=1000))


def test_a_parquet_file_without_the_text_column_fails_naming_it(ray_session, tmp_path):
    pq.write_table(pa.table({"content": ["a document under another column"]}), tmp_path / "data.parquet")
    spec = SourceSpec("fineweb-edu", (str(tmp_path / "data.parquet"),))
    with pytest.raises(BadSourceError, match=r"data\.parquet: no column 'text' \(columns: \['content'\]\)"):
        prepare_data(PrepareConfig(spec, str(tmp_path / "out"), "fw", val_tokens=5, tokenizers=1))
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_shards_are_copied_from_a_uri_to_local_disk(files_run_one_tokenizer, tmp_path):
    config, _ = files_run_one_tokenizer
    local = copy_shards_to_local(Path(config.output_dir).as_uri(), tmp_path / "local")
    assert shard_bytes(local) == shard_bytes(Path(config.output_dir))
    mtimes = {p.name: p.stat().st_mtime_ns for p in local.glob("*.bin")}
    copy_shards_to_local(Path(config.output_dir).as_uri(), local)  # already there: kept, not copied again
    assert {p.name: p.stat().st_mtime_ns for p in local.glob("*.bin")} == mtimes


def load_job():
    """jobs/prepare_data.py as a module (jobs/ holds scripts, not a package); run in-process it finds Ray running."""
    spec = importlib.util.spec_from_file_location("prepare_data_job", PROJECT_ROOT / "jobs" / "prepare_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.mark.slow
def test_the_job_rebuilds_a_damaged_output_from_the_command_line(
    ray_session, corpus_dir, files_run_one_tokenizer, tmp_path, capsys
):
    config, _ = files_run_one_tokenizer
    reference = shard_bytes(Path(config.output_dir))
    shutil.copytree(config.output_dir, tmp_path, dirs_exist_ok=True)
    first_train = tmp_path / "mixed_train_000000.bin"
    first_train.write_bytes(first_train.read_bytes()[:-2])  # the manifest still matches the settings

    job = load_job()
    with pytest.raises(SystemExit):
        job.main(["--help"])
    assert "--shard-tokens" in capsys.readouterr().out
    args = ["--source", "files", "--input", str(corpus_dir), "--txt-delimiter", "<LOC>...</LOC>",
            "--max-doc-chars", str(MAX_DOC_CHARS), "--output", str(tmp_path), "--name", "mixed",
            "--shard-tokens", "40", "--val-tokens", "25", "--tokenizers", "1", "--batch-size", "2"]  # fmt: skip
    assert job.main(args) == 0
    out = capsys.readouterr().out
    assert shard_bytes(tmp_path) == reference
    assert "skipped documents: 10" in out and "tokens/s" in out

    assert job.main(args) == 0
    out = capsys.readouterr().out
    assert "already up to date" in out and "Ray:" not in out  # nothing to do, so Ray was not even asked

    assert job.main([*args, "--shard-tokens", "50"]) == 1  # other settings, no --overwrite: refused, nothing touched
    assert "--overwrite" in capsys.readouterr().err and shard_bytes(tmp_path) == reference


def test_an_object_storage_output_is_refused_before_anything_runs(capsys):
    assert load_job().main(["--source", "python-docs", "--output", "s3://bucket/shards"]) == 2
    err = capsys.readouterr().err
    assert "--output s3://bucket/shards" in err and "copy them to object storage afterwards" in err


@pytest.mark.parametrize("option",
                         ["--batch-size", "--shard-tokens", "--val-tokens", "--tokenizers", "--max-doc-chars"])
def test_a_count_below_one_is_refused_naming_its_flag_before_ray_starts(option, capsys):
    """--batch-size 0 ended in Ray Data's "Batch size can't be negative or 0" after Ray had started."""
    with pytest.raises(SystemExit) as stop:
        load_job().main(["--source", "python-docs", option, "0"])
    assert stop.value.code == 2 and f"error: {option} must be >= 1, got 0" in capsys.readouterr().err


def test_the_tokenizer_workers_code_does_not_import_torch():
    # Every Ray Data worker of this job imports these modules; torch would cost each one about a second of CPU and
    # 150 MB before its first document.
    code = "import sys, cluster.data.prepare, gpt2.tokenizer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent).returncode == 0
