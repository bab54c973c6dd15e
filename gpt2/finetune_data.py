"""Fine-tuning data: documents → a train/val split by document → packed fixed-length sequences; and the
best-epoch / early-stopping tracker of the fine-tuning loop.

Cutting text files into documents lives in gpt2.text_documents (torch-free, shared with the Ray Data readers).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpt2.config import EOT_TOKEN, IGNORE_INDEX
from gpt2.tokenizer import get_tokenizer

DEFAULT_SEQ_LEN = 512
DEFAULT_VAL_FRACTION = 0.1


def encode_documents(documents: Sequence[str]) -> list[list[int]]:
    """GPT-2 token ids of each document. Text that spells "<|endoftext|>" is encoded as ordinary text, so the only
    end-of-text tokens in the data are the separators that pack_documents puts between documents."""
    return get_tokenizer().encode_ordinary_batch(list(documents))


def _document_position(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's text and the seed alone."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    documents: Sequence[str], val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, val) documents, each list in input order.

    A document goes to val when the hash of (seed, its text) falls below `val_fraction`. So its side does not
    depend on the order of the documents or on which other documents exist (adding data never moves an old
    document across), and identical duplicates always land on the same side, so none leaks from train into val.
    The val share is therefore `val_fraction` only on average. When the hash leaves val empty although
    val_fraction > 0, the document with the smallest hash moves to val, so there is always something to validate on.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not documents:
        raise ValueError("no documents to split")
    positions = [_document_position(text, seed) for text in documents]
    is_val = [p < val_fraction for p in positions]
    if val_fraction > 0 and not any(is_val):
        is_val[int(np.argmin(positions))] = True
    train = [d for d, v in zip(documents, is_val, strict=True) if not v]
    val = [d for d, v in zip(documents, is_val, strict=True) if v]
    if not train:
        raise ValueError(f"all {len(documents)} document(s) went to validation; add documents or lower val_fraction")
    return train, val


@dataclass(frozen=True)
class PackedSequences:
    """Rows of `seq_len` input tokens and their next-token targets.

    Row i holds stream[i·T : i·T+T] as inputs and stream[i·T+1 : i·T+T+1] as targets, so every token of the stream
    after the first is a target exactly once. The last row's missing positions have EOT inputs and IGNORE_INDEX
    targets, which the loss skips.
    """

    inputs: torch.Tensor  # (N, T) int64
    targets: torch.Tensor  # (N, T) int64

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_targets(self) -> int:
        """Tokens the loss is computed on (all targets but the padding)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over every row as (x, y) batches of up to `batch_size` rows (the last may be smaller).

        With shuffle the row order comes from `seed`; pass seed + epoch for a new order each epoch.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            rows = order[start : start + batch_size]
            yield self.inputs[rows], self.targets[rows]  # (b, T) each


def pack_documents(
    docs_tokens: Sequence[Sequence[int]], seq_len: int = DEFAULT_SEQ_LEN, eot: int = EOT_TOKEN
) -> PackedSequences:
    """Concatenate documents into one stream `eot d1 eot d2 ... eot dn eot` and cut it into rows (PackedSequences).

    The end-of-text token before each document is the pretraining shards' convention (gpt2.data); the one after
    the last makes every document, the last included, end with a target of eot, so the model learns where domain
    documents stop. Rows may span document boundaries, as in pretraining.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not docs_tokens:
        raise ValueError("no documents to pack")
    empty = [i for i, tokens in enumerate(docs_tokens) if len(tokens) == 0]
    if empty:
        raise ValueError(f"document(s) {empty[:5]} have no tokens; drop empty documents before packing")
    pieces = []
    for tokens in docs_tokens:
        pieces += [np.array([eot], dtype=np.int64), np.asarray(tokens, dtype=np.int64)]
    pieces.append(np.array([eot], dtype=np.int64))
    stream = np.concatenate(pieces)  # (L,)
    n_rows = math.ceil((len(stream) - 1) / seq_len)
    padded = np.full(n_rows * seq_len + 1, eot, dtype=np.int64)
    padded[: len(stream)] = stream
    rows = np.lib.stride_tricks.sliding_window_view(padded, seq_len + 1)[::seq_len]  # (N, T+1)
    inputs = torch.from_numpy(rows[:, :-1].copy())  # (N, T)
    targets = torch.from_numpy(rows[:, 1:].copy())  # (N, T)
    targets.view(-1)[len(stream) - 1 :] = IGNORE_INDEX  # positions past the stream's last token are padding
    return PackedSequences(inputs, targets)


@dataclass(frozen=True)
class EpochVerdict:
    is_best: bool  # this epoch's loss is the best so far (by more than min_delta): keep its checkpoint
    should_stop: bool  # `patience` epochs in a row without a new best: stop training
    epochs_since_best: int  # 0 on a best epoch; > 0 means validation loss stopped improving (over-fitting)


class EarlyStopping:
    """Tracks validation loss per epoch: which epoch is best, and when to stop.

    An epoch is a new best when its loss is lower than the best so far by more than `min_delta` (the first finite
    loss always is). A NaN or infinite loss never is. With patience=None training never stops early, but the best
    epoch is still tracked so its checkpoint can be kept.
    """

    def __init__(self, patience: int | None = 3, min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be at least 1 (or None for no early stopping), got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta}")
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self.epochs_since_best = 0

    def update(self, epoch: int, val_loss: float) -> EpochVerdict:
        is_best = math.isfinite(val_loss) and (self.best_epoch is None or val_loss < self.best_loss - self.min_delta)
        if is_best:
            self.best_loss, self.best_epoch, self.epochs_since_best = val_loss, epoch, 0
        else:
            self.epochs_since_best += 1
        should_stop = self.patience is not None and self.epochs_since_best >= self.patience
        return EpochVerdict(is_best, should_stop, self.epochs_since_best)

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "epochs_since_best": self.epochs_since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss = state["best_loss"]
        self.best_epoch = state["best_epoch"]
        self.epochs_since_best = state["epochs_since_best"]
