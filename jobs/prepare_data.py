"""Tokenize a text source into llm.c-format GPT-2 token shards with Ray Data.

Examples:
    python jobs/prepare_data.py                                   # built-in python-docs corpus → data/pydocs
    python jobs/prepare_data.py --source fineweb-edu --output /shared/fineweb_edu_10B   # sample-10BT from the hub
    python jobs/prepare_data.py --source fineweb-edu --input s3://bucket/fineweb-edu/sample/10BT/ --output ...
    python jobs/prepare_data.py --source files --input notes/ --txt-delimiter '<LOC>...</LOC>' --name notes
    ray job submit --working-dir . -- python jobs/prepare_data.py --source fineweb-edu --output /shared/fw

On a cluster the shards are written by the job's driver, so --output must be a path every training node can read
(a shared filesystem), or copy the folder to object storage afterwards; the loader copies s3://, gs:// back to local
disk with cluster.runtime.storage.copy_shards_to_local.
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import check_counts
from cluster.data.prepare import PYTHON_DOCS_VAL_TOKENS, PrepareConfig, existing_output, prepare_data
from cluster.data.sources import SOURCE_KINDS, SourceSpec
from cluster.runtime.ray_env import init_ray

DEFAULT_NAMES = {"python-docs": "pydocs", "fineweb-edu": "fineweb-edu", "files": "corpus"}
# The python-docs corpus has ~0.5M tokens, so its val shard is small; elsewhere llm.c's 1e8-token val shard.
DEFAULT_VAL_TOKENS = {"python-docs": PYTHON_DOCS_VAL_TOKENS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument(
        "--source",
        choices=SOURCE_KINDS,
        default="python-docs",
        help="python-docs: built-in offline corpus (default); fineweb-edu: HuggingFaceFW/fineweb-edu "
        "parquet; files: local or s3:// / gs:// .parquet, .jsonl, .txt files or folders",
    )
    src.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help="files/folders/URIs to read (for fineweb-edu: a copy of its parquet files, instead of the hub)",
    )
    src.add_argument(
        "--fineweb-name",
        default="sample-10BT",
        help="FineWeb-Edu subset on the hub: sample-10BT (default), sample-100BT, CC-MAIN-2024-10, ...",
    )
    src.add_argument("--text-field", default="text", help="column (.parquet) or key (.jsonl) holding the document")
    src.add_argument(
        "--txt-delimiter",
        default=None,
        help="split .txt files on this string, or 'START...END' to take the text between tags "
        "(e.g. '<LOC>...</LOC>'); default: one document per .txt file",
    )
    src.add_argument(
        "--max-doc-chars",
        type=int,
        default=10_000_000,
        help="longer documents are skipped and reported (default 10,000,000)",
    )
    src.add_argument(
        "--on-bad-document",
        choices=("skip", "error"),
        default="skip",
        help="skip (default): count bad documents (not UTF-8, empty, too long, invalid JSON, ...) and "
        "list them in the summary and manifest; error: stop at the first one",
    )
    out = p.add_argument_group("output")
    out.add_argument("--output", default=None, help="output folder (default: data/<name>)")
    out.add_argument("--name", default=None, help="shard file prefix (default: pydocs, fineweb-edu or corpus)")
    out.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per train shard (default 1e8)")
    out.add_argument(
        "--val-tokens",
        type=int,
        default=None,
        help="the first shard is the val shard: whole documents until it holds at least this many "
        "tokens (default 100,000,000; 32,768 for python-docs)",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the manifest and shard files in --output and rebuild (needed when they came from "
        "another source or settings; an identical earlier run is reused without it)",
    )
    run = p.add_argument_group("execution")
    run.add_argument("--tokenizers", type=int, default=None, help="tokenizer actors (default: one per cluster CPU)")
    run.add_argument("--batch-size", type=int, default=256, help="documents per block and tokenizer call")
    run.add_argument(
        "--address",
        default=None,
        help="Ray address (default: RAY_ADDRESS, a local `ray start` head, else a new local instance)",
    )
    run.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS", help="progress line interval")
    args = p.parse_args(argv)
    check_counts(p, args, "max_doc_chars", "shard_tokens", "val_tokens", "tokenizers", "batch_size")
    return args


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    spec = SourceSpec(
        kind=args.source,
        inputs=tuple(args.input),
        fineweb_name=args.fineweb_name,
        text_field=args.text_field,
        txt_delimiter=args.txt_delimiter,
        max_doc_chars=args.max_doc_chars,
    )
    name = args.name or DEFAULT_NAMES[args.source]
    if args.output and "://" in args.output:
        raise ValueError(
            f"--output {args.output}: shards are written to a folder (on a cluster, shared storage such as"
            " /mnt/shared); copy them to object storage afterwards, and pretraining reads them from there"
        )
    return PrepareConfig(
        source=spec,
        output_dir=args.output or f"data/{name}",
        name=name,
        shard_tokens=args.shard_tokens,
        val_tokens=args.val_tokens or DEFAULT_VAL_TOKENS.get(args.source, 100_000_000),
        tokenizers=args.tokenizers,
        batch_size=args.batch_size,
        on_bad_document=args.on_bad_document,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = None if args.overwrite else existing_output(config)
        if summary is None:  # Ray is started only when there is work to do
            print(f"Ray: {init_ray(args.address)}; preparing {config.source.kind} → {config.output_dir}", flush=True)
            summary = prepare_data(
                config,
                overwrite=args.overwrite,
                on_progress=lambda p: print(p.format(), flush=True),
                progress_interval_s=args.progress_every,
            )
    except (ValueError, FileExistsError) as e:  # bad input or settings (BadSourceError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
