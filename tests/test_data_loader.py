"""Shard format, streaming shard writer, ShardedTokenLoader and the python-docs corpus (pure numpy/torch, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import EOT_TOKEN, IGNORE_INDEX
from gpt2.corpus import python_docs_documents, stdlib_documents
from gpt2.data import ShardedTokenLoader
from gpt2.shards import (
    HEADER_BYTES,
    MANIFEST_NAME,
    ShardFormatError,
    ShardWriter,
    find_damaged_shards,
    open_shard,
    read_shard_header,
    resolve_shard_paths,
    write_shard,
)


def make_shards(directory: Path, sizes: list[int], split: str = "train") -> list[Path]:
    """Shards whose token values are their global positions (mod 2**16), so a window identifies itself."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = directory / f"toy_{split}_{i:06d}.bin"
        write_shard(path, np.arange(start, start + n) % 65536, split=split)
        paths.append(path)
        start += n
    return paths


def window_ids(x: torch.Tensor) -> list[int]:
    """Global position of each row's first token (valid while totals stay below 65536)."""
    return x[:, 0].tolist()


# --- format -----------------------------------------------------------------------------------------------------


def test_shard_header_and_tokens_are_the_llm_c_layout(tmp_path):
    tokens = np.array([EOT_TOKEN, 15496, 995, EOT_TOKEN, 0, 65535], dtype=np.int64)
    info = write_shard(tmp_path / "x_train_000000.bin", tokens)
    raw = (tmp_path / "x_train_000000.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 6] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert len(raw) == HEADER_BYTES + 2 * len(tokens)
    assert info.tokens == 6 and len(info.sha256) == 64
    assert open_shard(tmp_path / "x_train_000000.bin").tolist() == tokens.tolist()


def test_token_ids_outside_uint16_are_refused(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "x_train_000000.bin", np.array([1, 70000]))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: np.int32(123).tobytes() + raw[4:], "magic number 123"),
        (lambda raw: raw[:4] + np.int32(7).tobytes() + raw[8:], "version 7"),
        (lambda raw: raw[:-2], "truncated or corrupt"),
        (lambda raw: raw[:100], "shorter than"),
    ],
)
def test_corrupt_shard_errors_name_the_file(tmp_path, damage, message):
    path = make_shards(tmp_path, [50])[0]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ShardFormatError, match=message) as excinfo:
        read_shard_header(path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(ShardFormatError, match=r"toy_train_000000\.bin"):
        ShardedTokenLoader(str(tmp_path / "*.bin"), B=1, T=4)


# --- streaming writer -------------------------------------------------------------------------------------------


def documents(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [np.concatenate(([EOT_TOKEN], rng.integers(0, 50000, n - 1))) for n in lengths]
    return np.concatenate(docs), np.array(lengths)


def test_writer_makes_a_document_aligned_val_shard_then_fixed_size_train_shards(tmp_path):
    lengths = [7, 5, 9, 30, 4, 11, 3, 8]
    tokens, doc_lengths = documents(lengths)
    with ShardWriter(tmp_path, "c", shard_tokens=20, val_tokens=10) as writer:
        writer.add_documents(tokens[:12], doc_lengths[:2])  # documents may arrive in any batching
        writer.add_documents(tokens[12:], doc_lengths[2:])
        shards = writer.close()
    assert [s.file for s in shards] == ["c_val_000000.bin"] + [f"c_train_{i:06d}.bin" for i in range(4)]
    assert shards[0].tokens == 12  # whole documents until ≥ 10 tokens: 7 + 5
    assert [s.tokens for s in shards[1:]] == [20, 20, 20, 77 - 12 - 60]  # documents continue across train shards
    written = np.concatenate([open_shard(tmp_path / s.file) for s in shards])
    assert written.tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.partial")) and find_damaged_shards(tmp_path, shards) == []


def test_writer_refuses_a_corpus_that_only_fills_the_val_shard(tmp_path):
    tokens, doc_lengths = documents([5, 5])
    writer = ShardWriter(tmp_path, "c", shard_tokens=100, val_tokens=100)
    writer.add_documents(tokens, doc_lengths)
    with pytest.raises(ValueError, match="lower val_tokens"):
        writer.close()


def test_writer_checks_document_boundaries(tmp_path):
    with ShardWriter(tmp_path, "c", shard_tokens=100, val_tokens=5) as writer:
        with pytest.raises(ValueError, match="start with the end-of-text token"):
            writer.add_documents(np.array([1, 2, 3]), np.array([3]))


def test_an_interrupted_writer_leaves_only_complete_shards(tmp_path):
    tokens, doc_lengths = documents([10] * 10)
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, "c", shard_tokens=40, val_tokens=10) as writer:
            writer.add_documents(tokens, doc_lengths)  # val (10), two full train shards (40 + 40), 10 tokens of a third
            raise KeyboardInterrupt
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["c_train_000000.bin", "c_train_000001.bin", "c_val_000000.bin"]
    for name in names:
        read_shard_header(tmp_path / name)  # each one complete and valid


# --- loader: train ----------------------------------------------------------------------------------------------


def test_ranks_get_disjoint_windows_that_together_cover_the_epoch(tmp_path):
    make_shards(tmp_path, [41, 90, 33, 57])
    B, T, world = 2, 8, 3
    pattern = str(tmp_path / "toy_train_*.bin")
    loaders = [ShardedTokenLoader(pattern, B, T, rank, world, seed=5) for rank in range(world)]
    steps = loaders[0].steps_per_epoch
    seen = {rank: [] for rank in range(world)}
    for rank, loader in enumerate(loaders):
        for _ in range(steps):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
            seen[rank] += window_ids(x)
    everything = [w for windows in seen.values() for w in windows]
    assert len(everything) == len(set(everything)) == steps * B * world  # disjoint across ranks and steps
    # all windows (each shard: (n-1)//T of them, starting every T tokens) except the < B·world dropped at epoch end
    starts, offset = set(), 0
    for n in [41, 90, 33, 57]:
        starts |= {offset + w * T for w in range((n - 1) // T)}
        offset += n
    assert set(everything) <= starts and len(starts) - len(everything) < B * world
    assert all(loader.epoch == 0 for loader in loaders)
    loaders[0].next_batch()
    assert loaders[0].epoch == 1 and loaders[0].position == B * world


def epoch_orders(pattern: str, seed: int, epochs: int = 2) -> list[list[int]]:
    """The window order of each of the first `epochs` epochs of a one-rank, one-window-per-step loader."""
    loader = ShardedTokenLoader(pattern, B=1, T=4, seed=seed)
    return [
        [w for _ in range(loader.steps_per_epoch) for w in window_ids(loader.next_batch()[0])] for _ in range(epochs)
    ]


def test_order_is_shuffled_per_epoch_and_reproducible_from_the_seed(tmp_path):
    make_shards(tmp_path, [200, 200, 200])
    pattern = str(tmp_path / "*.bin")
    first, second = epoch_orders(pattern, seed=1)
    assert sorted(first) == sorted(second) and first != second  # same windows, new order each epoch
    assert epoch_orders(pattern, seed=1) == [first, second]
    assert epoch_orders(pattern, seed=2)[0] != first
    assert first != sorted(first)  # not file order


def test_each_epoch_visits_the_shards_in_a_new_order(tmp_path):
    make_shards(tmp_path, [200, 200, 200, 200])
    visits = []
    for order in epoch_orders(str(tmp_path / "*.bin"), seed=1, epochs=4):
        shards = [w // 200 for w in order]
        visits.append(list(dict.fromkeys(shards)))
        assert shards == sorted(shards, key=visits[-1].index)  # a shard's windows come together
    assert len({tuple(v) for v in visits}) > 1 and any(v != sorted(v) for v in visits)


def test_each_epoch_reshuffles_the_windows_inside_a_shard(tmp_path):
    make_shards(tmp_path, [400])  # one shard: any change between epochs comes from the window order
    first, second = epoch_orders(str(tmp_path / "*.bin"), seed=1)
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("steps_before", [3, 17])  # within the first epoch, and across the epoch boundary
def test_resuming_from_state_dict_gives_the_same_next_batches(tmp_path, steps_before):
    make_shards(tmp_path, [150, 90, 77])
    pattern = str(tmp_path / "*.bin")
    original = ShardedTokenLoader(pattern, B=2, T=6, rank=1, world_size=2, seed=3)
    for _ in range(steps_before):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # it must survive a checkpoint round trip
    expected = [original.next_batch() for _ in range(12)]
    resumed = ShardedTokenLoader(pattern, B=2, T=6, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expected, (resumed.next_batch() for _ in range(12)), strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert resumed.epoch == original.epoch


def test_state_from_other_data_or_seed_is_refused(tmp_path):
    make_shards(tmp_path, [150, 90])
    loader = ShardedTokenLoader(str(tmp_path / "*.bin"), B=2, T=6, seed=3)
    with pytest.raises(ValueError, match="'seed'"):
        ShardedTokenLoader(str(tmp_path / "*.bin"), B=2, T=6, seed=4).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="'shards'"):
        one_shard = ShardedTokenLoader(str(tmp_path / "toy_train_000000.bin"), B=2, T=6, seed=3)
        one_shard.load_state_dict(loader.state_dict())


def test_too_little_data_for_one_step_is_an_error(tmp_path):
    make_shards(tmp_path, [20])
    with pytest.raises(ValueError, match="fewer than one step"):
        ShardedTokenLoader(str(tmp_path / "*.bin"), B=4, T=8)


# --- loader: validation -----------------------------------------------------------------------------------------


def test_validation_predicts_every_token_once_deterministically(tmp_path):
    make_shards(tmp_path, [45, 30], split="val")
    T, world = 8, 2

    def targets(rank: int) -> list[tuple[int, int]]:
        loader = ShardedTokenLoader(str(tmp_path / "*_val_*.bin"), B=3, T=T, rank=rank, world_size=world, split="val")
        pairs = []
        for x, y in loader:
            assert x.shape[1] == T and x.shape[0] <= 3
            for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
                pairs += [(xi, yi) for xi, yi in zip(row_x, row_y, strict=True) if yi != IGNORE_INDEX]
        return pairs

    pairs = targets(0) + targets(1)
    assert targets(0) == targets(0)  # a second pass is identical
    assert len(pairs) == len(set(pairs)) == 44 + 29  # each shard's n-1 next-token targets, exactly once
    assert all(y == x + 1 for x, y in pairs)  # targets are the next token within the same shard


def test_validation_shard_shorter_than_a_window_is_an_error(tmp_path):
    make_shards(tmp_path, [5], split="val")
    with pytest.raises(ValueError, match=r"T\+1=9"):
        ShardedTokenLoader(str(tmp_path / "*.bin"), B=1, T=8, split="val")


# --- locating shards --------------------------------------------------------------------------------------------


def test_shards_are_found_from_a_manifest_a_directory_or_a_pattern(tmp_path):
    val = make_shards(tmp_path, [40], split="val")
    train = make_shards(tmp_path, [50, 60])
    manifest = {
        "shards": [
            {"file": p.name, "split": s, "tokens": n, "sha256": ""}
            for p, s, n in zip(val + train, ["val", "train", "train"], [40, 50, 60], strict=True)
        ]
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert resolve_shard_paths(tmp_path, "train") == train
    assert resolve_shard_paths(tmp_path / MANIFEST_NAME, "val") == val
    assert resolve_shard_paths(str(tmp_path / "toy_*.bin"), "train") == train
    assert resolve_shard_paths(str(tmp_path / "toy_*.bin"), "val") == val
    with pytest.raises(ValueError, match="copy_shards_to_local"):
        resolve_shard_paths("s3://bucket/shards/*.bin", "train")
    with pytest.raises(FileNotFoundError, match="no train shards"):
        resolve_shard_paths(str(tmp_path / "other_*.bin"), "train")


def test_damaged_shards_are_detected_against_the_manifest(tmp_path):
    info = write_shard(tmp_path / "c_train_000000.bin", np.arange(100))
    assert find_damaged_shards(tmp_path, [info]) == []
    raw = bytearray((tmp_path / info.file).read_bytes())
    raw[-1] ^= 1
    (tmp_path / info.file).write_bytes(bytes(raw))
    assert "sha256" in find_damaged_shards(tmp_path, [info])[0]
    (tmp_path / info.file).unlink()
    assert info.file in find_damaged_shards(tmp_path, [info])[0]


# --- the built-in python-docs corpus ----------------------------------------------------------------------------


def test_python_docs_corpus_has_the_topics_then_the_stdlib_modules():
    docs = python_docs_documents()
    sources = [d.source for d in docs]
    topics = [s for s in sources if s.startswith("pydoc_data.topics")]
    modules = [s.removeprefix("stdlib ") for s in sources if s.startswith("stdlib ")]
    assert sources == topics + [f"stdlib {m}" for m in modules]  # topics first, then modules
    assert topics == sorted(topics) and modules == sorted(modules)
    assert "pydoc_data.topics['assert']" in topics and {"json", "collections", "pathlib"} <= set(modules)
    assert not any(part.startswith("_") or part in ("test", "idlelib") for m in modules for part in m.split("."))
    json_doc = docs[sources.index("stdlib json")].text
    assert json_doc.startswith("Module json\n\nJSON (JavaScript Object Notation)") and "json.dumps(obj, *," in json_doc
    assert sum(len(d.text) for d in docs) > 1_000_000


def test_stdlib_docstrings_are_read_from_sources_in_a_fixed_order(tmp_path):
    files = {  # written in an order unrelated to the expected one
        "zeta.py": '"""Zeta module."""\ndef public(a, b=2, *, c):\n    """Adds."""\n'
        'def _private():\n    """Hidden."""\n',
        "alpha/__init__.py": '"""Alpha package."""\nclass Thing:\n    """A thing."""\n'
        '    def run(self):\n        """Runs."""\n',
        "alpha/beta.py": "x = 1\n",  # no docstrings: no document
        "_private.py": '"""Private module."""\n',
        "test/test_zeta.py": '"""Tests."""\n',
        "broken.py": "def (:\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    docs = list(stdlib_documents(tmp_path))
    assert [d.source for d in docs] == ["stdlib alpha", "stdlib zeta"]
    assert (
        docs[0].text
        == "Module alpha\n\nAlpha package.\n\n\nclass alpha.Thing\n\nA thing.\n\n\nalpha.Thing.run(self)\n\nRuns."
    )
    assert docs[1].text == "Module zeta\n\nZeta module.\n\n\nzeta.public(a, b=2, *, c)\n\nAdds."
