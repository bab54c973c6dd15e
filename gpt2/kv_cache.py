"""Key/value cache for incremental decoding.

Every row of the batch keeps its own length, so rows can sit at different positions: a prompt can be prefilled
into one row while the others are mid-decode, and rows of a batch can start and finish at different times
(the serving layer's continuous batching relies on this). New keys/values are written at each row's own
positions and attention is masked per row, so a row never sees another row's state or stale slots.

A pass may also be ragged: rows that add different numbers of tokens (prompts of different lengths prefilled
together) are left-padded to a common width. Padding columns are written to one scratch slot past the end of every
row, which no query of a real token ever attends to, so padding changes nothing; with left padding the last column
is a real token in every row, which is what `last_only` logits need.
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
        # One slot more than max_len: the scratch slot where the padding of ragged passes is written.
        shapes = [(batch_size, h, max_len + 1, head_dim) for h in heads]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._new_tokens: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._used = 0

    @classmethod
    def _view(cls, k: list, v: list, lengths: torch.Tensor, max_len: int, new_tokens: torch.Tensor | None) -> "KVCache":
        view = cls.__new__(cls)
        view.k, view.v, view.lengths, view.max_len = k, v, lengths, max_len
        view._new_tokens, view._positions, view._mask, view._used = new_tokens, None, None, 0
        return view

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def rows(self, start: int, stop: int | None = None, *, new_tokens: torch.Tensor | None = None) -> "KVCache":
        """A cache over rows [start, stop) that shares storage with this one (writes go through).

        new_tokens (R,): the next pass is ragged: row r adds only its last new_tokens[r] columns, the columns before
        them being left padding that is neither stored nor seen (see the module docstring).
        """
        stop = start + 1 if stop is None else stop
        k, v = [t[start:stop] for t in self.k], [t[start:stop] for t in self.v]
        return KVCache._view(k, v, self.lengths[start:stop], self.max_len, new_tokens)

    def reset_rows(self, start: int, stop: int | None = None) -> None:
        """Forget rows [start, stop) so new sequences can use them; stale keys beyond a row's length are masked."""
        stop = start + 1 if stop is None else stop
        self.lengths[start:stop] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s sequence into row `dst` (which it replaces); `src` keeps its copy until reused."""
        n = int(self.lengths[src])
        for t in (*self.k, *self.v):
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def copy_prefix(self, row: int, length: int) -> list[torch.Tensor]:
        """Copies of row `row`'s keys and values at positions [0, length), one (nh, length, hs) tensor per layer, keys
        first: a computed prompt kept apart from the cache, which `load_prefix` puts into a row again."""
        if not 0 <= length <= int(self.lengths[row]):
            raise ValueError(f"row {row} holds {int(self.lengths[row])} positions, not {length}")
        return [t[row, :, :length].clone() for t in (*self.k, *self.v)]

    def load_prefix(self, row: int, prefix: list[torch.Tensor], length: int) -> None:
        """Row `row` becomes the first `length` positions of a `copy_prefix` copy (its sequence is replaced)."""
        if not 0 <= length <= prefix[0].shape[1]:
            raise ValueError(f"the copy holds {prefix[0].shape[1]} positions, not {length}")
        for t, saved in zip((*self.k, *self.v), prefix, strict=True):
            t[row, :, :length] = saved[:, :length]
        self.lengths[row] = length

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the sequences of rows `a` and `b`."""
        n = int(torch.maximum(self.lengths[a], self.lengths[b]))
        for t in (*self.k, *self.v):
            t[[a, b], :, :n] = t[[b, a], :, :n]
        self.lengths[[a, b]] = self.lengths[[b, a]]

    def begin(self, T: int) -> torch.Tensor:
        """Prepare a forward pass of T new tokens per row (T columns, padding included, in a ragged pass).

        Returns the positions (B, T) for the position embedding; padding columns get position 0 there.
        """
        arange = torch.arange(T, device=self.lengths.device)
        new = self._new_tokens
        end = self.lengths + (T if new is None else new)  # (B,) each row's length after this pass
        if int(end.max()) > self.max_len:
            raise ValueError(
                f"KV cache is full: rows hold up to {int(self.lengths.max())} tokens, {int((end - self.lengths).max())}"
                f" more do not fit in {self.max_len}"
            )
        if new is None:
            positions = self.lengths[:, None] + arange  # (B, T)
            embed = positions
        else:
            pad = (T - new)[:, None]  # (B, 1) padding columns before each row's tokens
            padding = arange[None, :] < pad  # (B, T)
            real = self.lengths[:, None] + arange - pad  # (B, T)
            positions = real.masked_fill(padding, self.max_len)  # padding goes to the scratch slot
            embed = real.masked_fill(padding, 0)
        self._used = max(int(end.max()), 1)
        keys = torch.arange(self._used, device=self.lengths.device)
        # A query at position p sees cached keys at positions <= p of its own row: causal and per-row at once.
        # (A padding query, at the scratch slot, sees every key; its output is never used.)
        self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, used)
        self._positions = positions
        return embed

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, nh, T, hs); return all keys, values (B, nh, used, hs) and the mask."""
        # An indexed write, not scatter_: on CPU, scatter_ into a bf16 cache costs ~40 ms per call at 16 rows × 1,024
        # positions (it works over the whole cache), the indexed write ~0.05 ms; a decoding step makes two per layer.
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        # Advanced indices around a slice put the indexed dims first: the target is (B, T, nh, hs).
        self.k[layer][rows, :, self._positions] = k.transpose(1, 2).to(self.k[layer].dtype)
        self.v[layer][rows, :, self._positions] = v.transpose(1, 2).to(self.v[layer].dtype)
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
        self.lengths += T if self._new_tokens is None else self._new_tokens
        self._positions, self._mask, self._new_tokens = None, None, None
