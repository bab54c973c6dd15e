"""What the tests of Ray Train runs share: small real shards, the pace that keeps a tiny run going while a test
interrupts it, and the checkpoints Ray Train has registered."""

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


# A checkpoint every step keeps a tiny run going while a test interrupts it: Ray takes a report (here, each step's
# checkpoint) from a worker once per poll, every 2 s (cluster.train.worker.Worker.report), where a tiny step takes
# 0.1 s. Checkpoints read the model and never change the training, so the losses stay an uninterrupted run's.
PACED = "checkpoint.every=1"


def registered_checkpoints(run_dir: str | Path) -> list[str]:
    """The checkpoint folders Ray Train's controller has registered in the run's snapshot, oldest first."""
    snapshot = Path(run_dir) / "train" / "checkpoint_manager_snapshot.json"
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
