"""Writers SIGKILLed mid-write, and writes that fill the disk: afterwards only complete files are visible, and the
next run continues from them.

Every fault is real: a child process is SIGKILLed by this test at a random moment, or SIGKILLs itself at an exact
moment of the write (between the two renames of a swap), or runs under RLIMIT_FSIZE so that its writes fail with
EFBIG as they would on a full disk. The children are forked from the test process, so a kill costs milliseconds
rather than a fresh interpreter importing torch; only the data preparation job runs as its own Ray driver process.
"""

from __future__ import annotations

import errno
import itertools
import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2.checkpoint as checkpoint
from gpt2 import GPT, preset
from gpt2.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_pretrained
from gpt2.config import EOT_TOKEN
from gpt2.durable import PARTIAL_SUFFIX, write_file_atomically
from gpt2.shards import (
    MANIFEST_NAME,
    ShardInfo,
    ShardWriter,
    find_damaged_shards,
    resolve_shard_paths,
)
from gpt2.train_checkpoint import TRAINER_STATE, save_state

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FORK = multiprocessing.get_context("fork")
VERSIONS = 3  # the checkpoint writer cycles through these, so any mix of two saves would show
KILLS = 5


def version(v: int) -> GPT:
    """Checkpoint version `v`: a one-layer model with a small vocabulary, so a save is mostly its fsyncs."""
    torch.manual_seed(v)
    return GPT(preset("tiny", n_layer=1, vocab_size=512))


def save_version(model: GPT, v: int, target: Path, state: dict | None = None) -> None:
    save_pretrained(model, target, extra=lambda d: save_state({"version": v, **(state or {})}, d / TRAINER_STATE))


def loaded_version(target: Path) -> int:
    """The version a checkpoint holds, after checking that its weights and trainer state are that same version."""
    loaded = GPT.from_pretrained(str(target)).state_dict()  # first: loading repairs what a killed writer left
    v = torch.load(target / TRAINER_STATE, weights_only=True)["version"]
    expected = version(v).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"{target}: weights are not version {v}'s"
    return v


def write_all_shards(directory: Path) -> list[ShardInfo]:
    """Shards of a fixed stream of documents, arriving in batches as from Ray Data."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=600)
    tokens = rng.integers(0, EOT_TOKEN, size=int(lengths.sum()), dtype=np.uint16)
    ends = np.cumsum(lengths)
    tokens[ends - lengths] = EOT_TOKEN
    with ShardWriter(directory, "kill", shard_tokens=1000, val_tokens=3000) as writer:
        for docs in np.array_split(np.arange(len(lengths)), 20):
            writer.add_documents(tokens[ends[docs[0]] - lengths[docs[0]] : ends[docs[-1]]], lengths[docs])
        return writer.close()


def manifest_bytes(v: int) -> bytes:
    return json.dumps({"version": v, "shards": [{"file": f"x_{i}.bin", "tokens": i} for i in range(2000)]}).encode()


# ---------------------------------------------------------------------------------------------------- the children


def start(function: Callable[..., None], *args) -> multiprocessing.Process:
    def run() -> None:
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork(); stay on this thread
        function(*args)

    child = FORK.Process(target=run, daemon=True)
    child.start()
    return child


def kill_at_random_moment(rng: random.Random, max_delay_s: float, function: Callable[..., None], *args) -> None:
    """Fork a child that writes in a loop, and SIGKILL it at a random moment."""
    child = start(function, *args)
    time.sleep(rng.uniform(0, max_delay_s))
    assert child.is_alive(), f"the writer ended by itself (exit code {child.exitcode}) before it was killed"
    os.kill(child.pid, signal.SIGKILL)
    child.join()


def save_forever(target: Path, models: list[GPT], swap: str) -> None:
    """Save versions 1, 2, 0, 1, ... over `target` until killed; `swap="rename-aside"` takes the path of systems
    without an atomic exchange."""
    if swap == "rename-aside":
        checkpoint._exchange = lambda a, b: False
    for i in itertools.count(1):
        save_version(models[i % VERSIONS], i % VERSIONS, target)


def save_and_die_mid_swap(target: Path, moment: str) -> None:
    """Save version 1 over `target` and SIGKILL this process at `moment` of the swap: "between-renames" (the old
    version renamed aside, the new one not yet in place) or "after-exchange" (swapped, the old one not yet deleted)."""
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if moment == "between-renames":
        rename = os.rename
        checkpoint._exchange = lambda a, b: False

        def rename_then_die_after_moving_aside(src: str | os.PathLike, dst: str | os.PathLike) -> None:
            rename(src, dst)
            if Path(src) == target:
                die()

        os.rename = rename_then_die_after_moving_aside
    else:
        exchange = checkpoint._exchange
        checkpoint._exchange = lambda a, b: exchange(a, b) and die()
    save_version(version(1), 1, target)


def write_shards_forever(directory: Path) -> None:
    while True:
        write_all_shards(directory)


def write_manifest_forever(path: Path) -> None:
    for i in itertools.count():
        write_file_atomically(path, manifest_bytes(i % 2))


def under_file_size_limit(limit: int, errors: Connection, write: Callable[..., None], *args) -> None:
    """Call `write(*args)` with each file limited to `limit` bytes, as on a nearly full disk: a write past it fails
    with EFBIG (SIGXFSZ, which would kill the process instead, is ignored). Sends the OSError's errno and message."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        write(*args)
    except OSError as e:
        errors.send((e.errno, str(e)))
        raise SystemExit(3) from e


def failed_write(limit: int, write: Callable[..., None], *args) -> tuple[int, str]:
    """The errno and message of the OSError that `write(*args)` raises in a child under `limit` bytes per file."""
    receive, send = FORK.Pipe(duplex=False)
    child = start(under_file_size_limit, limit, send, write, *args)
    child.join(timeout=120)
    assert child.exitcode == 3, f"the write did not fail with an OSError (exit code {child.exitcode})"
    return receive.recv()


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("swap", ["exchange", "rename-aside"])
def test_a_checkpoint_killed_mid_save_loads_as_one_whole_version(tmp_path, swap):
    target = tmp_path / "run" / "ckpt"
    models = [version(v) for v in range(VERSIONS)]
    save_version(models[0], 0, target)
    rng = random.Random(0)
    for _ in range(KILLS):
        kill_at_random_moment(rng, 1.0, save_forever, target, models, swap)
        loaded_version(target)  # loading also clears what the killed writer left beside it
        assert os.listdir(target.parent) == ["ckpt"]


def exchange_supported(directory: Path) -> bool:
    (directory / "a").mkdir()
    (directory / "b").mkdir()
    return checkpoint._exchange(directory / "a", directory / "b")


@pytest.mark.parametrize("moment", ["between-renames", "after-exchange"])
def test_a_writer_killed_inside_the_swap_leaves_a_checkpoint_that_the_next_run_uses(tmp_path, moment):
    if moment == "after-exchange" and not exchange_supported(tmp_path):
        pytest.skip("this filesystem has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    target = tmp_path / "run" / "ckpt"
    save_version(version(0), 0, target)
    child = start(save_and_die_mid_swap, target, moment)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    left = [n.split("-")[0] for n in sorted(os.listdir(target.parent))]
    if moment == "between-renames":
        # The old version is aside and nothing is at the path; the next read puts the old version back.
        assert left == [".ckpt.old", ".ckpt.tmp"]
        assert loaded_version(target) == 0
    else:
        # Swapped: the new version is in place, the old one waits under the temporary name, never to be read.
        assert left == [".ckpt.tmp", "ckpt"]
        assert loaded_version(target) == 1
    assert os.listdir(target.parent) == ["ckpt"]
    save_version(version(2), 2, target)
    assert loaded_version(target) == 2 and os.listdir(target.parent) == ["ckpt"]


# ---------------------------------------------------------------------------------------------------- shards


def test_a_shard_writer_killed_mid_write_leaves_only_complete_shards(tmp_path):
    reference_dir, out = tmp_path / "reference", tmp_path / "out"
    reference_dir.mkdir()
    out.mkdir()
    reference = {s.file: s for s in write_all_shards(reference_dir)}
    assert len(reference) > 20
    rng = random.Random(1)
    for _ in range(KILLS):
        kill_at_random_moment(rng, 0.5, write_shards_forever, out)
        # What a glob for shards (as llm.c's loaders take) finds is complete: the manifest entry of a finished run
        # matches every such file.
        visible = [p.name for p in out.glob("*.bin")]
        assert set(visible) <= reference.keys()
        assert find_damaged_shards(out, [reference[n] for n in visible]) == []

    assert {s.file: s for s in write_all_shards(out)} == reference  # the next run writes the same bytes
    assert sorted(os.listdir(out)) == sorted(reference)  # over every partial file the killed runs left


def test_a_manifest_killed_mid_write_is_the_old_or_the_new_one_whole(tmp_path):
    path = tmp_path / MANIFEST_NAME
    write_file_atomically(path, manifest_bytes(0))
    rng = random.Random(2)
    for _ in range(KILLS):
        kill_at_random_moment(rng, 0.3, write_manifest_forever, path)
        assert path.read_bytes() in (manifest_bytes(0), manifest_bytes(1))


def prepare_config(corpus: str, out: str):
    from cluster.data.prepare import PrepareConfig
    from cluster.data.sources import SourceSpec

    return PrepareConfig(SourceSpec("files", (corpus,)), out, "kill", shard_tokens=60, val_tokens=40, tokenizers=1)


def prepare_and_die_writing_the_manifest(address: str, corpus: str, out: str) -> None:
    """Run by a driver process of its own: the data preparation job on the test's Ray instance, SIGKILLed once the
    manifest's bytes are written to their temporary name, before they are flushed and renamed."""
    from cluster.data.prepare import prepare_data
    from cluster.runtime.ray_env import init_ray

    init_ray(address)
    fsync = os.fsync

    def die_at_the_manifest(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(MANIFEST_NAME + PARTIAL_SUFFIX):
            os.kill(os.getpid(), signal.SIGKILL)
        fsync(fd)

    os.fsync = die_at_the_manifest
    prepare_data(prepare_config(corpus, out))


@pytest.mark.slow
def test_data_preparation_killed_writing_its_manifest_is_rebuilt_by_the_next_run(ray_session, tmp_path):
    from cluster.data.prepare import MARKER_NAME, prepare_data

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc_{i:02d}.txt").write_text(f"Document {i} of the corpus: " + "words and more words " * i)
    args = (ray_session.get_runtime_context().gcs_address, str(corpus), str(out))
    code = f"from tests.test_kill_mid_write import prepare_and_die_writing_the_manifest as f; f(*{args!r})"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=log, stderr=log, timeout=300)
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]

    left = set(os.listdir(out))
    assert MANIFEST_NAME not in left and {MANIFEST_NAME + PARTIAL_SUFFIX, MARKER_NAME} <= left
    written = {n: (out / n).read_bytes() for n in left if n.endswith(".bin")}
    assert len(written) > 3
    with pytest.raises(FileNotFoundError, match=f"no {MANIFEST_NAME}"):
        resolve_shard_paths(out, "train")  # the loader does not take the unfinished output

    summary = prepare_data(prepare_config(str(corpus), str(out)))  # the same command again
    assert not summary.up_to_date
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, *written])
    assert {n: (out / n).read_bytes() for n in written} == written
    assert find_damaged_shards(out, summary.shards) == [] and {s.file for s in summary.shards} == written.keys()
    assert prepare_data(prepare_config(str(corpus), str(out))).up_to_date


# ---------------------------------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("failing", [WEIGHTS_FILE, TRAINER_STATE])
def test_a_full_disk_fails_naming_the_checkpoint_and_keeps_the_last_good_one(tmp_path, failing):
    target = tmp_path / "ckpt"
    save_version(version(0), 0, target)
    sizes = {p.name: p.stat().st_size for p in target.iterdir()}
    # A limit that the failing file (made large for the trainer state) is the first to pass, in the order of writing.
    if failing == WEIGHTS_FILE:
        limit, state = sizes[WEIGHTS_FILE] // 2, {}
        assert sizes[CONFIG_FILE] < limit
    else:
        limit = max(sizes.values()) + 1
        state = {"optimizer": torch.zeros(limit)}
    code, message = failed_write(limit, save_version, version(1), 1, target, state)

    assert code == errno.EFBIG
    assert f"({target.parent}/.ckpt.tmp-" in message and f"/{failing}) while writing {target}" in message
    assert message.endswith(f"the previous {target} is unchanged")
    assert loaded_version(target) == 0
    assert os.listdir(tmp_path) == ["ckpt"]  # the partial checkpoint is removed


def test_a_full_disk_stops_the_shard_writer_naming_the_shard(tmp_path):
    code, message = failed_write(3000, write_all_shards, tmp_path)
    assert code == errno.EFBIG and f"{tmp_path / 'kill_val_000000.bin'}{PARTIAL_SUFFIX}" in message
    assert os.listdir(tmp_path) == []  # the partial shard is removed


def test_a_full_disk_stops_the_manifest_naming_it(tmp_path):
    path = tmp_path / MANIFEST_NAME
    write_file_atomically(path, manifest_bytes(0))
    code, message = failed_write(1000, write_file_atomically, path, manifest_bytes(1))
    assert code == errno.EFBIG and str(path) + PARTIAL_SUFFIX in message
    assert path.read_bytes() == manifest_bytes(0) and os.listdir(tmp_path) == [MANIFEST_NAME]
