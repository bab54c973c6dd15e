"""Tokenizer efficiency: offline encodings, the figures on a small corpus, and jobs/analyze_tokenizer.py with MLflow."""

from __future__ import annotations

import csv
import gzip
import json

import pytest
from mlflow.tracking import MlflowClient

import gpt2.tokenizer_stats as stats_module
from cluster.data.sources import iter_documents, resolve_source
from gpt2.tokenizer_stats import ENCODINGS, analyze, get_encoding, markdown_report
from tests.job_loader import load_job
from tests.test_prepare_data import EXPECTED_PROBLEMS, GOOD_DOCS, corpus_dir, files_spec  # noqa: F401 (a fixture)

DOCUMENTS = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk.",
    "He trimmed the wick, polished the great lens and wrote the weather in a leather book.",
    "Ships passing the rocks at night saw the beam sweep across the water every ten seconds.",
    "Naïve cafés don't serve smørrebrød — 灯台守 — 🌊🌊 in 2024!",
    "Antidisestablishmentarianism and floccinaucinihilipilification are long words.",
]


def test_encodings_are_built_offline_with_tiktokens_ids():
    assert get_encoding("gpt2").encode("Hello world") == [15496, 995]
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert get_encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert get_encoding("o200k_base").n_vocab == 200_019
    with pytest.raises(ValueError, match="unknown encoding 'p50k_base'"):
        get_encoding("p50k_base")


def test_a_packaged_file_with_another_hash_is_refused(monkeypatch):
    monkeypatch.setitem(stats_module.PACKAGED_BPE_SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(RuntimeError, match="cl100k_base.tiktoken.gz has sha256 223921b7"):
        stats_module._packaged_ranks("cl100k_base")


def test_counts_and_word_pieces():
    gpt2, o200k = analyze(DOCUMENTS, [get_encoding("gpt2"), get_encoding("o200k_base")])
    assert gpt2.documents == 5 and gpt2.characters == sum(len(d) for d in DOCUMENTS)
    assert gpt2.tokens == sum(len(get_encoding("gpt2").encode_ordinary(d)) for d in DOCUMENTS)
    assert gpt2.words == sum(len(d.split()) for d in DOCUMENTS)
    assert gpt2.tokens_per_word == pytest.approx(gpt2.tokens / gpt2.words)
    assert gpt2.word_counts["the"] == 7 and gpt2.word_counts["don't"] == 1 and gpt2.word_counts["灯台守"] == 1
    assert "2024" not in gpt2.word_counts  # numbers are not lexical words
    assert gpt2.pieces("the") == 1  # " the" is one GPT-2 token
    assert sum(gpt2.pieces_distribution().values()) == gpt2.word_occurrences
    word, pieces, count = gpt2.most_fragmented(1)[0]
    assert word == "floccinaucinihilipilification" and pieces == len(gpt2.split_pieces(word)) > 5 and count == 1
    assert "".join(gpt2.split_pieces(word)) == " " + word
    assert o200k.tokens < gpt2.tokens  # a 4x larger vocabulary needs fewer tokens for the same text
    report = markdown_report([gpt2, o200k], corpus="test", top_words=3)
    assert "| gpt2 | 50,257 |" in report and "| o200k_base | 200,019 |" in report
    assert "| floccinaucinihilipilification | 1 | " in report


def test_the_in_process_reader_yields_what_the_ray_reader_yields(corpus_dir):
    """The expectations of test_prepare_data's Ray Data reader test, met by iter_documents without Ray."""
    rows = [row for table in iter_documents(resolve_source(files_spec(corpus_dir)), rows_per_block=2)
            for row in table.to_pylist()]
    assert [r["text"] for r in rows if r["problem"] is None] == GOOD_DOCS
    problems = [(r["problem"], r["where"]) for r in rows if r["problem"] is not None]
    for (problem, where), (expected_problem, suffix) in zip(problems, EXPECTED_PROBLEMS, strict=True):
        assert problem == expected_problem and where.startswith(str(corpus_dir)) and suffix in where, where


def write_corpus(folder):
    """The DOCUMENTS as a .txt file with delimiters, a gzipped .jsonl (with one bad line) and a plain .jsonl."""
    folder.mkdir()
    (folder / "a.txt").write_text("<DOC>" + "</DOC>\n<DOC>".join(DOCUMENTS[:2]) + "</DOC>\n", encoding="utf-8")
    lines = [json.dumps({"text": DOCUMENTS[2]}), "{not json"]
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (folder / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[3:]), encoding="utf-8")


def test_job_report_totals_equal_a_direct_count_and_go_to_mlflow(tmp_path, mlflow_server, capsys):
    write_corpus(tmp_path / "corpus")
    output = tmp_path / "report"
    args = ["--source", "files", "--input", str(tmp_path / "corpus"), "--txt-delimiter", "<DOC>...</DOC>",
            "--output", str(output), "--name", "tokenizer-test", "--tracking-uri", mlflow_server, "--top-words", "5"]
    assert load_job("analyze_tokenizer").main(args) == 0

    with open(output / "summary.csv", newline="") as f:
        rows = {row["encoding"]: row for row in csv.DictReader(f)}
    assert list(rows) == list(ENCODINGS)
    for name, row in rows.items():
        encoding = get_encoding(name)
        assert int(row["tokens"]) == sum(len(encoding.encode_ordinary(d)) for d in DOCUMENTS), name
        assert int(row["documents"]) == len(DOCUMENTS)
        assert int(row["words"]) == sum(len(d.split()) for d in DOCUMENTS)
        assert int(row["characters"]) == sum(len(d) for d in DOCUMENTS)
    with open(output / "words.csv", newline="") as f:
        words = list(csv.DictReader(f))
    assert len(words) == 5 and words[0]["word"] == "floccinaucinihilipilification"
    assert (output / "pieces_per_word.png").read_bytes().startswith(b"\x89PNG")
    report = (output / "report.md").read_text()
    assert report.startswith(f"# Tokenizer efficiency: files ({tmp_path / 'corpus'})")
    printed = capsys.readouterr().out
    assert "skipped documents: {'invalid JSON': 1}" in printed

    client = MlflowClient(mlflow_server)
    run = client.get_run((output / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "tokenizer-test"
    assert run.data.metrics["gpt2/tokens"] == int(rows["gpt2"]["tokens"])
    assert run.data.metrics["o200k_base/tokens_per_word"] == pytest.approx(float(rows["o200k_base"]["tokens_per_word"]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "summary.csv", "words.csv", "pieces_per_word.png"} <= artifacts

    # The same --output again, on other settings: a new MLflow run with its own params and only its own figures
    # (the earlier run was resumed, keeping its params and gaining a second value of each metric).
    assert load_job("analyze_tokenizer").main([*args, "--max-documents", "1"]) == 0
    again = client.get_run((output / "mlflow_run_id").read_text())
    assert again.info.run_id != run.info.run_id and again.data.params["max_documents"] == "1"
    history = client.get_metric_history(again.info.run_id, "gpt2/tokens")
    assert len(history) == 1 and history[0].value < run.data.metrics["gpt2/tokens"]
    assert client.get_run(run.info.run_id).data.params["max_documents"] == "None"


def test_job_refuses_bad_options_and_empty_sources(tmp_path, capsys):
    job = load_job("analyze_tokenizer")
    with pytest.raises(SystemExit) as exit_info:
        job.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--encodings" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        job.parse_args(["--source", "files"])
    assert "the 'files' source needs at least one input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.parse_args(["--max-documents", "0"])
    assert "--max-documents must be >= 1" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(SystemExit, match="no readable documents in the files source"):
        job.main(["--source", "files", "--input", str(tmp_path / "empty.txt"), "--no-mlflow",
                  "--output", str(tmp_path / "out")])
