"""Key/value cache for incremental decoding.

Every row of the batch keeps its own length, so rows can sit at different positions: a prompt can be prefilled
into one row while the others are mid-decode, and rows of a batch can start and finish at different times
(the serving layer's continuous batching relies on this). New keys/values are written at each row's own
positions and attention is masked per row, so a row never sees another row's state or stale slots.
"""

from __future__ import annotations

from typing import Sequence

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int | Sequence[int],
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        # One head count for every layer, or one per layer (a model with pruned heads).
        heads = [n_head] * n_layer if isinstance(n_head, int) else list(n_head)
        if len(heads) != n_layer:
            raise ValueError(f"n_head has {len(heads)} per-layer entries for {n_layer} layers")
        shapes = [(batch_size, h, max_len, head_dim) for h in heads]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._used = 0

    @classmethod
    def _view(cls, k: list, v: list, lengths: torch.Tensor, max_len: int) -> "KVCache":
        view = cls.__new__(cls)
        view.k, view.v, view.lengths, view.max_len = k, v, lengths, max_len
        view._positions, view._mask, view._used = None, None, 0
        return view

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def rows(self, start: int, stop: int | None = None) -> "KVCache":
        """A cache over rows [start, stop) that shares storage with this one (writes go through)."""
        stop = start + 1 if stop is None else stop
        return KVCache._view(
            [t[start:stop] for t in self.k], [t[start:stop] for t in self.v], self.lengths[start:stop], self.max_len
        )

    def reset_rows(self, start: int, stop: int | None = None) -> None:
        """Forget rows [start, stop) so new sequences can use them; stale keys beyond a row's length are masked."""
        stop = start + 1 if stop is None else stop
        self.lengths[start:stop] = 0

    def begin(self, T: int) -> torch.Tensor:
        """Prepare a forward pass of T new tokens per row; returns their positions (B, T)."""
        if int(self.lengths.max()) + T > self.max_len:
            raise ValueError(
                f"KV cache is full: rows hold up to {int(self.lengths.max())} tokens, {T} more do not fit in {self.max_len}"
            )
        positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        self._used = int(positions.max()) + 1
        keys = torch.arange(self._used, device=self.lengths.device)
        # A query at position p sees cached keys at positions <= p of its own row: causal and per-row at once.
        self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, used)
        self._positions = positions
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, nh, T, hs); return all keys, values (B, nh, used, hs) and the mask."""
        B, nh, T, hs = k.shape
        index = self._positions[:, None, :, None].expand(B, nh, T, hs)
        self.k[layer].scatter_(2, index, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, index, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, : self._used], self.v[layer][:, :, : self._used], self._mask

    def store_rows(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Like `update`, for the subset `rows` (1-D index into the batch) only: store their new k, v (R, nh, T, hs).

        For layers that some rows of a pass skip (early exit): the other rows' slots at this layer are left alone.
        """
        positions = self._positions[rows]  # (R, T)
        # Advanced indices around a slice put the indexed dims first: the target is (R, T, nh, hs).
        self.k[layer][rows[:, None], :, positions] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows[:, None], :, positions] = v.transpose(1, 2).to(self.v[layer].dtype)

    def update_rows(
        self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`store_rows`, then those rows' keys, values (R, nh, used, hs) and mask (R, 1, T, used), as `update` returns."""
        self.store_rows(layer, rows, k, v)
        keys = self.k[layer][:, :, : self._used].index_select(0, rows)
        values = self.v[layer][:, :, : self._used].index_select(0, rows)
        return keys, values, self._mask.index_select(0, rows)

    def end(self, T: int) -> None:
        self.lengths += T
        self._positions, self._mask = None, None
