"""The loader that feeds llm.c-format token shards (gpt2.shards) to training: memory-mapped, disjoint across ranks,
reshuffled every epoch, resumable to the exact batch. Pure numpy/torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from gpt2.config import IGNORE_INDEX
from gpt2.shards import open_shard, resolve_shard_paths


class ShardedTokenLoader:
    """(x, y) int64 batches of shape (B, T) from memory-mapped shards, for one rank of `world_size`.

    Train split: an endless stream of epochs. Each shard is cut into windows of T+1 tokens starting every T tokens;
    every epoch visits the shards in a fresh order and each shard's windows in a fresh order, both drawn from `seed`
    and the epoch number, so the source's ordering (e.g. FineWeb's crawl order) does not show up as periodic loss.
    Step k of an epoch uses windows [k·B·W, (k+1)·B·W) of that order, rank r the B windows at offset r·B, so ranks
    are disjoint and together cover every window but the last < B·W of the epoch (dropped so all ranks step together).
    `state_dict()` is the epoch and the number of windows consumed; loading it resumes at exactly that batch.

    Val split: iterating yields one deterministic pass in file order that predicts every token once: windows start
    every T tokens, and a shard's last, shorter remainder comes as a window ending at the shard's end whose already
    covered targets are IGNORE_INDEX. Rank r takes windows r, r+W, ...; the last batch may have fewer than B rows,
    so sum losses over tokens across ranks rather than averaging per-batch means.
    """

    def __init__(
        self,
        pattern_or_manifest: str | os.PathLike,
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        seed: int = 0,
    ) -> None:
        if B <= 0 or T <= 0:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.B, self.T, self.rank, self.world_size, self.split, self.seed = B, T, rank, world_size, split, seed
        self.paths = resolve_shard_paths(pattern_or_manifest, split)
        self._shards = [open_shard(p) for p in self.paths]
        self.num_tokens = sum(len(s) for s in self._shards)
        # A window needs T+1 tokens (inputs plus the shifted targets); windows start every T tokens.
        self._windows_per_shard = np.array([max(len(s) - 1, 0) // T for s in self._shards], dtype=np.int64)
        self.windows_per_epoch = int(self._windows_per_shard.sum())
        if split == "train":
            self.steps_per_epoch = self.windows_per_epoch // (B * world_size)
            if self.steps_per_epoch == 0:
                raise ValueError(
                    f"{self.num_tokens} train tokens in {len(self.paths)} shard(s) hold {self.windows_per_epoch}"
                    f" windows of T+1={T + 1} tokens, fewer than one step needs (B×world_size = {B * world_size})"
                )
        elif any(len(s) < T + 1 for s in self._shards):
            short = next(p for p, s in zip(self.paths, self._shards, strict=True) if len(s) < T + 1)
            raise ValueError(f"{short}: a validation shard needs at least T+1={T + 1} tokens")
        self.epoch = 0
        self.position = 0  # windows of this epoch consumed by all ranks together
        # Shard order and window permutations of the epoch in use. The seed sequences [seed, epoch, 1] and
        # [seed, epoch, 2, shard] never coincide (numpy treats trailing zeros as absent, so tags go in the middle).
        self._order: tuple[int, np.ndarray, np.ndarray] = (-1, np.zeros(0, np.int64), np.zeros(0, np.int64))
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch of this rank; moves to the next epoch when the current one is used up."""
        if self.split != "train":
            raise RuntimeError("next_batch() is for the train split; iterate a val loader for one full pass")
        step_windows = self.B * self.world_size
        if self.position + step_windows > self.windows_per_epoch:
            self.epoch += 1
            self.position = 0
        first = self.position + self.rank * self.B
        starts = [self._window_start(self.epoch, i) for i in range(first, first + self.B)]
        self.position += step_windows
        return self._batch(starts, masked=[0] * self.B)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.split == "train":
            while True:
                yield self.next_batch()
        windows = self._val_windows()[self.rank :: self.world_size]
        for i in range(0, len(windows), self.B):
            chunk = windows[i : i + self.B]
            yield self._batch([(s, o) for s, o, _ in chunk], masked=[m for _, _, m in chunk])

    def state_dict(self) -> dict:
        if self.split != "train":
            raise RuntimeError("only the train loader has a position to save; validation always makes one full pass")
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "T": self.T,
            "shards": [[p.name, len(s)] for p, s in zip(self.paths, self._shards, strict=True)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position. The shards, T and seed must match the saved run: they define the order.
        B and world_size may differ (the position counts windows of all ranks); the same ones resume exactly."""
        mine = self.state_dict()
        theirs = {**state, "shards": [list(s) for s in state["shards"]]}
        for key in ("seed", "T", "shards"):
            if theirs[key] != mine[key]:
                raise ValueError(f"loader state was saved with a different {key!r}; the batch order would not match")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _window_start(self, epoch: int, index: int) -> tuple[int, int]:
        """(shard, token offset) of window `index` in the epoch's order."""
        if self._order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self._shards))
            self._order = (epoch, order, np.cumsum(self._windows_per_shard[order]))
        _, order, ends = self._order
        slot = int(np.searchsorted(ends, index, side="right"))
        shard = int(order[slot])
        within = index - (int(ends[slot - 1]) if slot else 0)
        return shard, int(self._permutation(epoch, shard)[within]) * self.T

    def _permutation(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._permutations:
            if len(self._permutations) >= 2:  # the current shard and the next suffice for a batch across a boundary
                self._permutations.pop(next(iter(self._permutations)))
            rng = np.random.default_rng([self.seed, epoch, 2, shard])
            self._permutations[key] = rng.permutation(int(self._windows_per_shard[shard]))
        return self._permutations[key]

    def _val_windows(self) -> list[tuple[int, int, int]]:
        """(shard, token offset, targets to ignore) for a pass that predicts every token of every val shard once."""
        windows = []
        for shard, tokens in enumerate(self._shards):
            full = int(self._windows_per_shard[shard])
            windows += [(shard, w * self.T, 0) for w in range(full)]
            covered = full * self.T  # targets 1..covered are predicted by the full windows
            if covered < len(tokens) - 1:
                start = len(tokens) - 1 - self.T
                windows.append((shard, start, covered - start))
        return windows

    def _batch(self, starts: list[tuple[int, int]], masked: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self._shards[s][o : o + self.T + 1] for s, o in starts]).astype(np.int64)  # (b, T+1)
        x = torch.from_numpy(rows[:, :-1].copy())  # (b, T)
        y = torch.from_numpy(rows[:, 1:].copy())  # (b, T)
        for row, n in enumerate(masked):
            y[row, :n] = IGNORE_INDEX
        return x, y
