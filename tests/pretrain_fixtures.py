"""Small real shards and a real MLflow server for the pretraining tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from gpt2.corpus import python_docs_documents
from gpt2.shards import ShardWriter
from gpt2.tokenizer import get_tokenizer


def write_python_docs_shards(directory: Path, n_docs: int = 120, val_tokens: int = 4_000) -> Path:
    """The first `n_docs` documents of the built-in corpus as shards + manifest.json."""
    enc = get_tokenizer()
    docs = [[enc.eot_token] + enc.encode_ordinary(d.text) for d in python_docs_documents()[:n_docs]]
    directory.mkdir(parents=True, exist_ok=True)
    with ShardWriter(directory, "pydocs", shard_tokens=1_000_000, val_tokens=val_tokens) as writer:
        writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
        shards = writer.close()
    manifest = {"source": "python-docs (test subset)", "shards": [dataclasses.asdict(s) for s in shards]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory
