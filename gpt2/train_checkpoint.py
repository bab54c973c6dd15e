"""The training checkpoint: a model directory (gpt2.checkpoint's format, loadable by transformers) plus what resuming
needs — `trainer_state.pt` (step, optimizer, best validation loss; written by rank 0) and `worker_state_rank{r}.pt`
(the loader position and RNG states of each rank). Every rank writes its own folder; a distributed runner (Ray Train)
merges them into one checkpoint directory. Everything is loaded with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2.checkpoint import recover_directory
from gpt2.data import ShardedTokenLoader
from gpt2.durable import naming_path
from gpt2.model import GPT
from gpt2.train import rng_state, set_rng_state

TRAINER_STATE = "trainer_state.pt"


def worker_state_file(rank: int) -> str:
    return f"worker_state_rank{rank}.pt"


def save_training_checkpoint(
    model: GPT, optimizer: torch.optim.Optimizer, loader: ShardedTokenLoader, rank: int, trainer_state: dict, tmp: Path
) -> Path:
    """This rank's part of a checkpoint, written to `tmp/checkpoint`; returns that folder."""
    ckpt = tmp / "checkpoint"
    worker_state = {"loader": loader.state_dict(), "rng": rng_state()}
    if rank == 0:
        def extra(d: Path) -> None:
            save_state({**trainer_state, "optimizer": optimizer.state_dict()}, d / TRAINER_STATE)
            save_state(worker_state, d / worker_state_file(rank))

        model.save_pretrained(str(ckpt), extra=extra)
    else:
        ckpt.mkdir()
        save_state(worker_state, ckpt / worker_state_file(rank))
    return ckpt


def save_state(state: dict, path: Path) -> None:
    """torch.save through a Python file object, so that a write the operating system refuses (disk full, file too
    large) raises that OSError with the file's name; given a path, torch reports it as "unexpected pos 704 vs 598"."""
    try:
        with naming_path(path), open(path, "wb") as f:  # naming_path: a failure when close() flushes the rest
            torch.save(state, f)
    except RuntimeError as e:
        cause = e.__context__  # the OSError of the Python write that torch's writer called
        if not isinstance(cause, OSError) or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from e


def load_training_checkpoint(
    directory: Path, model: GPT, optimizer: torch.optim.Optimizer, loader: ShardedTokenLoader, rank: int
) -> dict:
    """Restore the model, optimizer, this rank's loader position and RNG; returns the trainer state (step, ...)."""
    recover_directory(directory)  # a save killed between its renames leaves the previous checkpoint aside
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    model.load_state_dict(GPT.from_pretrained(str(directory)).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    worker = torch.load(directory / worker_state_file(rank), map_location="cpu", weights_only=True)
    loader.load_state_dict(worker["loader"])
    set_rng_state(worker["rng"])
    return state


def is_due(step: int, every: int, last: bool) -> bool:
    """Whether something done every `every` steps (0: never, except after the last step) is due after `step`."""
    return last or (every > 0 and (step + 1) % every == 0)
