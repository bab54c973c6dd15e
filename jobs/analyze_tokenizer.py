"""Tokenizer efficiency on a corpus: tokens per word and per character, pieces per word, the most fragmented words,
for GPT-2's encoding and for OpenAI's cl100k_base and o200k_base on the same text (all offline).

Examples:
    python jobs/analyze_tokenizer.py                                        # the built-in python-docs corpus
    python jobs/analyze_tokenizer.py --source files --input notes/ --txt-delimiter '<LOC>...</LOC>'
    python jobs/analyze_tokenizer.py --source fineweb-edu --max-documents 20000   # the first 20,000 documents

Sources are read as jobs/prepare_data.py reads them (cluster.data.sources), in this process without Ray. Writes
report.md, summary.csv, words.csv and pieces_per_word.png to --output (default runs/tokenizer-analysis/<name>/)
and logs the figures and files to MLflow (experiment "tokenizer-analysis"; the tracking URI is --tracking-uri,
else $MLFLOW_TRACKING_URI, else the local server).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Iterator

from cluster.config import add_output_options, check_counts, default_output
from cluster.data.sources import SOURCE_KINDS, BadSourceError, SourceSpec, iter_documents, resolve_source
from cluster.runtime.mlflow_connection import check_tracking_uri
from cluster.runtime.tracking import fresh_run_logger
from gpt2.tokenizer_stats import (
    ENCODINGS,
    EncodingStats,
    analyze,
    get_encoding,
    markdown_report,
    summary_csv,
    words_csv,
)

EXPERIMENT = "tokenizer-analysis"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (as in jobs/prepare_data.py)")
    src.add_argument("--source", choices=SOURCE_KINDS, default="python-docs",
                     help="python-docs: the built-in corpus (default); fineweb-edu: its parquet files; files: "
                          ".parquet, .jsonl, .txt files or folders")
    src.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files/folders/URIs to read")
    src.add_argument("--fineweb-name", default="sample-10BT", help="FineWeb-Edu subset on the hub (default sample-10BT)")
    src.add_argument("--text-field", default="text", help="column (.parquet) or key (.jsonl) holding the document")
    src.add_argument("--txt-delimiter", default=None,
                     help="split .txt files on this string, or 'START...END' for the text between tags")
    src.add_argument("--max-documents", type=int, metavar="N", help="analyze only the first N good documents")
    analysis = p.add_argument_group("analysis")
    analysis.add_argument("--encodings", nargs="+", choices=ENCODINGS, default=list(ENCODINGS),
                          help="encodings to compare; the first one ranks the most fragmented words (default: all)")
    analysis.add_argument("--top-words", type=int, default=30, metavar="N", help="most fragmented words listed (30)")
    add_output_options(p, EXPERIMENT, "<source>-<UTC time>")
    args = p.parse_args(argv)
    check_counts(p, args, "max_documents", "top_words")
    if len(set(args.encodings)) != len(args.encodings):
        p.error(f"--encodings lists one twice: {args.encodings}")
    try:
        args.spec = SourceSpec(kind=args.source, inputs=tuple(args.input), fineweb_name=args.fineweb_name,
                               text_field=args.text_field, txt_delimiter=args.txt_delimiter)
    except ValueError as e:
        p.error(str(e))
    default_output(args, EXPERIMENT, args.source)
    return args


class DocumentTexts:
    """The good documents' texts; bad ones (not UTF-8, empty, ...) are counted by problem, as prepare_data does."""

    def __init__(self, spec: SourceSpec) -> None:
        self.source = resolve_source(spec)
        self.problems: dict[str, int] = {}

    def __iter__(self) -> Iterator[str]:
        for table in iter_documents(self.source):
            for text, problem in zip(table.column("text").to_pylist(), table.column("problem").to_pylist()):
                if problem is None:
                    yield text
                else:
                    self.problems[problem] = self.problems.get(problem, 0) + 1


def write_outputs(stats: list[EncodingStats], directory: Path, corpus: str, top_words: int) -> list[Path]:
    from cluster.eval.plots import plot_pieces_per_word

    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "report.md": markdown_report(stats, corpus=corpus, top_words=top_words),
        "summary.csv": summary_csv(stats),
        "words.csv": words_csv(stats, top_words),
    }
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    png = plot_pieces_per_word(stats, directory / "pieces_per_word.png", title=corpus)
    return [directory / name for name in files] + [png]


def log_to_mlflow(args: argparse.Namespace, stats: list[EncodingStats], files: list[Path]) -> None:
    params = {"source": args.source, "inputs": ",".join(args.input), "encodings": ",".join(args.encodings),
              "max_documents": args.max_documents, "documents": stats[0].documents}
    logger = fresh_run_logger(args.output, experiment=EXPERIMENT, run_name=args.name, uri=args.tracking_uri,
                              params=params)
    numeric = ("tokens", "tokens_per_word", "tokens_per_character", "characters_per_token", "mean_pieces_per_word",
               "share_words_split")
    metrics = {f"{s.name}/{key}": float(s.summary()[key]) for s in stats for key in numeric}
    logger.log_metrics(metrics, step=0)
    for path in files:
        logger.log_artifact(path)
    logger.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not args.no_mlflow:
            check_tracking_uri(args.tracking_uri)
        documents = DocumentTexts(args.spec)
        encodings = [get_encoding(name) for name in args.encodings]
        stats = analyze(itertools.islice(documents, args.max_documents), encodings)
    except (BadSourceError, RuntimeError, ValueError) as e:  # an unreadable source, a missing BPE file, MLflow's URI
        sys.exit(f"error: {e}")
    if not stats[0].documents:
        sys.exit(f"error: no readable documents in the {args.source} source (problems: {documents.problems})")
    corpus = args.source + (f" ({', '.join(args.input)})" if args.input else "")
    if args.max_documents and stats[0].documents == args.max_documents:
        corpus += f", first {args.max_documents:,} documents"
    files = write_outputs(stats, args.output, corpus, args.top_words)
    if not args.no_mlflow:
        log_to_mlflow(args, stats, files)

    for s in stats:
        row = s.summary()
        print(f"{s.name:<12} {row['tokens']:>12,} tokens  {row['tokens_per_word']:.3f} tokens/word"
              f"  {row['characters_per_token']:.3f} chars/token  {row['mean_pieces_per_word']:.3f} pieces/word")
    if documents.problems:
        print(f"skipped documents: {documents.problems}")
    print(f"report: {args.output / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
