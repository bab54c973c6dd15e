"""Early exit: stop a token after block k when a small classifier says the deeper blocks would not change it.

The design, in the order a forward pass meets it:

- Exit head. Block k's output h_k goes through the model's own final LayerNorm (ln_f) and tied LM head; no new head
  weights. Its argmax is the exit prediction; a token that exits gets these logits.
- Classifier (`ExitClassifier`): a two-layer MLP whose sigmoid score estimates P(exit argmax == full-model argmax).
  Features: h_k standardised per token (LayerNorm without affine, n_embd values) and, optionally, three numbers from the
  exit head's softmax: max probability, entropy / ln(V), and the top-1 minus top-2 probability margin. A position exits
  when score >= tau, tau per row of the batch: tau = 0 exits everything, tau > 1 nothing (sigmoid <= 1).
  Cost: the head features need the exit head on every token, and a vocabulary projection costs several blocks (GPT-2
  124M: 38.6M multiply-adds against 7.1M per block), so a token that does not exit pays for one head more than the
  standard model. Without head features the head runs once per token as usual, on h_k or on the last block's output.
- Deeper keys/values of exited tokens (CALM's state propagation). A later token still attends at layers k+1..L to the
  positions that exited, so those need keys and values there. An exited position's hidden state is copied unchanged to
  every deeper layer: layer j's keys/values for it are the K/V part of c_attn applied to ln_1_j(h_k) (h_k itself for
  Post-LN). In decoding only that projection runs for an exited row (c_attn, a quarter of a block's weights)
  instead of the whole block; the alternative of running the deeper blocks anyway would save nothing.
- Rows decide independently. In a batched pass the deeper blocks run only on the rows that have a position that did not
  exit (gathered by index; their cache rows are updated through `KVCache.update_rows`); fully exited rows only get
  their deeper keys/values stored.
- One semantics for every pass: decisions are made per position, in prefill too, and an exited position's state is
  held at h_k in every deeper layer. So a full forward without a cache gives exactly what token-by-token decoding with
  a cache gives (up to float rounding), which is what calibration measures and the tests check. In a pass of several
  positions, a row with any non-exited position runs the deeper blocks for all its positions (exited ones are reset to
  h_k after each block), so prefill saves no compute; the savings are in decoding. Positions are still counted as
  exited in the statistics.

Training data for the classifier (`exit_features_and_labels`) comes from the unmodified model, whose deeper layers see
the real states of earlier tokens; at inference they see held states. That approximation is the standard one (CALM),
and `calibrate` measures the resulting agreement with the full model directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import CheckpointError, atomic_directory, load_directory, read_config
from gpt2.config import IGNORE_INDEX, GPTConfig
from gpt2.kv_cache import KVCache
from gpt2.model import GPT

EXIT_WEIGHTS_FILE = "early_exit.safetensors"
EXIT_CONFIG_FILE = "early_exit.json"
EXIT_FORMAT_VERSION = 1
HEAD_FEATURES = ("max_prob", "entropy", "top2_margin")
DEFAULT_THRESHOLD = 0.9


def default_exit_layer(n_layer: int) -> int:
    """Three quarters of the depth (9 of 12 for GPT-2 124M), at least 1 and below n_layer."""
    return min(max(1, 3 * n_layer // 4), n_layer - 1)


def check_exit_layer(exit_layer: int, n_layer: int) -> None:
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < n_layer:
        raise ValueError(
            f"exit_layer={exit_layer!r} is out of range: it counts the blocks run before the exit and must be an"
            f" integer in [1, {n_layer - 1}] for a model with n_layer={n_layer}"
        )


@dataclass(frozen=True)
class DecodeMacs:
    """Multiply-adds per decoded token: the standard model, a token that exits (exit_layer blocks, the head, the
    classifier and the deeper layers' key/value projections), a token that does not (every block, the classifier,
    and with head features one head more)."""

    standard: int
    exited: int
    not_exited: int
    head: int

    @property
    def every_token_exits(self) -> float:
        """The speed-up if every token exited: the most any classifier can give at this exit layer."""
        return self.standard / self.exited

    @property
    def head_share(self) -> float:
        return self.head / self.standard


# ---------------------------------------------------------------------------------------------------- features


def exit_head(base: GPT, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exit prediction for block k's output h (B, T, C): ln_f(h) and the tied head's logits (B, T, V)."""
    normed = base.transformer.ln_f(h)
    return normed, base.lm_head(normed)[..., : base.config.vocab_size]


def exit_features(h: torch.Tensor, exit_logits: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Classifier input (…, F) from block k's output h (…, C) and, when given, the exit head's logits (…, V).

    F = C standardised hidden values, then max_prob, entropy / ln(V), top2_margin when logits are given (float32).
    """
    standardized = F.layer_norm(h.float(), (h.size(-1),), eps=eps)  # (…, C)
    if exit_logits is None:
        return standardized
    logp = F.log_softmax(exit_logits.float(), dim=-1)  # (…, V)
    probs = logp.exp()
    top2 = probs.topk(2, dim=-1).values  # (…, 2)
    entropy = -(probs * logp).sum(-1) / math.log(exit_logits.size(-1))  # in [0, 1]
    head = torch.stack([top2[..., 0], entropy, top2[..., 0] - top2[..., 1]], dim=-1)  # (…, 3)
    return torch.cat([standardized, head], dim=-1)


class ExitClassifier(nn.Module):
    """A two-layer MLP on `exit_features`: one logit per position; sigmoid(logit) estimates P(exit is safe)."""

    def __init__(self, n_embd: int, hidden_dim: int = 128, head_features: bool = True) -> None:
        super().__init__()
        if n_embd < 1 or hidden_dim < 1:
            raise ValueError(f"n_embd and hidden_dim must be >= 1, got {n_embd} and {hidden_dim}")
        self.n_embd = n_embd
        self.hidden_dim = hidden_dim
        self.head_features = head_features
        self.net = nn.Sequential(nn.Linear(self.input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))

    @property
    def input_dim(self) -> int:
        return self.n_embd + (len(HEAD_FEATURES) if self.head_features else 0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (…,) for features (…, input_dim)."""
        return self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)

    def spec(self) -> dict:
        """What `early_exit.json` records about the classifier and its input."""
        return {
            "features": {
                "hidden": f"block exit_layer's output standardised per token (LayerNorm without affine),"
                f" {self.n_embd} values",
                "head": list(HEAD_FEATURES) if self.head_features else [],
            },
            "classifier": {"input_dim": self.input_dim, "hidden_dim": self.hidden_dim, "n_embd": self.n_embd},
        }


# ---------------------------------------------------------------------------------------------------- the model


@dataclass
class ExitStats:
    """Running totals over the positions a model has processed (prompt positions included)."""

    tokens: int = 0
    exited: int = 0
    blocks_run: int = 0  # exit_layer per exited position, n_layer per other position

    @property
    def exit_rate(self) -> float:
        return self.exited / self.tokens if self.tokens else 0.0

    @property
    def mean_blocks(self) -> float:
        return self.blocks_run / self.tokens if self.tokens else 0.0


class _RowSubsetCache:
    """What the attention layers need of a KVCache (`update`), restricted to some of its rows for one pass."""

    def __init__(self, cache: KVCache, rows: torch.Tensor) -> None:
        self.cache, self.rows = cache, rows

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return self.cache.update_rows(layer, self.rows, k, v)


class ExitedKeyValues(nn.Module):
    """Deeper layers' keys/values for rows that exited: each deeper block's c_attn applied to the held state (after
    ln_1 in Pre-LN), of which K and V are kept. c_attn is called as a module rather than sliced by weight rows, so
    wrapped or quantized layers (LoRA, int8) give their own result; the unused Q third costs 1/12 of a block.
    No parameters of its own; a module so that forward hooks (profilers) see it."""

    def forward(
        self, blocks: Sequence[nn.Module], first_layer: int, h: torch.Tensor, rows: torch.Tensor, kv_cache: KVCache
    ) -> None:
        R, T, _ = h.shape  # the held state of the rows `rows`
        for layer in range(first_layer, len(blocks)):
            block = blocks[layer]
            n_head = block.attn.n_head
            qkv = block.attn.c_attn(block.ln_1(h) if block.pre_norm else h)  # (R, T, 3 * nh * hs)
            width = qkv.size(-1) // 3  # nh * hs: n_embd, or less where heads were pruned
            _, k, v = qkv.split(width, dim=2)
            k = k.view(R, T, n_head, width // n_head).transpose(1, 2)  # (R, nh, T, hs)
            v = v.view(R, T, n_head, width // n_head).transpose(1, 2)  # (R, nh, T, hs)
            kv_cache.store_rows(layer, rows, k, v)


class EarlyExitGPT(nn.Module):
    """A GPT (`self.base`) that can stop a token after block `exit_layer`; see the module docstring.

    Drop-in for GPT where generation is concerned: `forward(idx, targets, kv_cache=, last_only=)` returns
    (logits, loss), and `config`, `transformer`, `lm_head`, `new_kv_cache` are the base model's, so
    gpt2.generate.generate/stream work unchanged (with the default `threshold`).
    """

    def __init__(
        self,
        base: GPT,
        exit_layer: int | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        classifier: ExitClassifier | None = None,
    ) -> None:
        super().__init__()
        n_layer = base.config.n_layer
        exit_layer = default_exit_layer(n_layer) if exit_layer is None else exit_layer
        check_exit_layer(exit_layer, n_layer)
        classifier = classifier if classifier is not None else ExitClassifier(base.config.n_embd)
        if classifier.n_embd != base.config.n_embd:
            raise ValueError(f"the classifier expects n_embd={classifier.n_embd}, the model has {base.config.n_embd}")
        self.base = base
        self.classifier = classifier.to(base.transformer.wte.weight.device)
        self.exited_kv = ExitedKeyValues()
        self.exit_layer = exit_layer
        self.threshold = float(threshold)
        self.stats = ExitStats()
        self.last_exited: torch.Tensor | None = None  # (B, T) decisions of the latest forward

    # The attributes generation code reads off a GPT.
    @property
    def config(self) -> GPTConfig:
        return self.base.config

    @property
    def transformer(self) -> nn.ModuleDict:
        return self.base.transformer

    @property
    def lm_head(self) -> nn.Linear:
        return self.base.lm_head

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.base.new_kv_cache(batch_size, max_len)

    def reset_stats(self) -> ExitStats:
        """Return the totals so far and start new ones."""
        stats, self.stats = self.stats, ExitStats()
        return stats

    def decode_macs(self) -> DecodeMacs:
        """Multiply-adds of the weights one decoded token goes through (batch-1 decoding reads each weight once per
        token, so these ratios bound the speed-up), counted from the model's own layers (pruned heads included)."""

        def macs(module: nn.Module) -> int:
            return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

        blocks = [macs(block) for block in self.transformer.h]
        head, classifier = self.lm_head.weight.numel(), macs(self.classifier)
        # All of c_attn runs for the held state (see ExitedKeyValues), though only its K and V are kept.
        deeper_kv = sum(block.attn.c_attn.weight.numel() for block in self.transformer.h[self.exit_layer:])
        extra_head = head if self.classifier.head_features else 0
        return DecodeMacs(
            standard=sum(blocks) + head,
            exited=sum(blocks[: self.exit_layer]) + head + classifier + deeper_kv,
            not_exited=sum(blocks) + head + classifier + extra_head,
            head=head,
        )

    def blocks_per_token(self, exited: torch.Tensor) -> torch.Tensor:
        """Blocks run for each position of a forward's `exited` (B, T): exit_layer if it exited, else n_layer."""
        return torch.where(exited, self.exit_layer, self.config.n_layer)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        threshold: float | Sequence[float] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) or (B, 1, V) with last_only, and the mean cross-entropy (None without targets), as GPT."""
        logits, _ = self.forward_with_exits(idx, kv_cache=kv_cache, last_only=last_only, threshold=threshold)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    def forward_with_exits(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        threshold: float | Sequence[float] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits as `forward`, and `exited` (B, T) bool: which positions stopped after block exit_layer.

        threshold: None uses self.threshold; a float applies to every row; a (B,) tensor or sequence gives each row
        its own (a serving batch mixes requests). kv_cache: as for GPT.forward, each row continues from its own length.
        """
        B, T = idx.shape
        h = self._lower(idx, kv_cache)  # (B, T, C)
        tau = self._row_thresholds(threshold, B, h.device)  # (B,)
        normed, exit_logits, score = self._exit_scores(h)
        exited = score >= tau[:, None]  # (B, T)
        logits = self._upper(h, normed, exit_logits, exited, kv_cache, last_only)
        if kv_cache is not None:
            kv_cache.end(T)
        n_exited = int(exited.sum())
        self.stats.tokens += B * T
        self.stats.exited += n_exited
        self.stats.blocks_run += n_exited * self.exit_layer + (B * T - n_exited) * self.config.n_layer
        self.last_exited = exited
        return logits, exited

    def _lower(self, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Embeddings and blocks 0..exit_layer-1 (position handling as in GPT.forward)."""
        T = idx.shape[1]
        block_size = self.config.block_size
        if kv_cache is None:
            if T > block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context of {block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            pos = kv_cache.begin(T)  # (B, T)
            if int(pos.max()) >= block_size:
                raise ValueError(f"position {int(pos.max())} is beyond the context of {block_size}")
        t = self.base.transformer
        x = t.drop(t.wte(idx) + t.wpe(pos))  # (B, T, C)
        for layer in range(self.exit_layer):
            x = t.h[layer](x, kv_cache, layer)
        return x

    def _exit_scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """ln_f(h) (B, T, C), the exit logits (B, T, V) when the classifier uses them (else None), scores (B, T)."""
        if self.classifier.head_features:
            normed, exit_logits = exit_head(self.base, h)
        else:
            normed, exit_logits = self.base.transformer.ln_f(h), None
        features = exit_features(h, exit_logits, self.config.layer_norm_epsilon)
        return normed, exit_logits, torch.sigmoid(self.classifier(features).float())

    def _row_thresholds(self, threshold, B: int, device: torch.device) -> torch.Tensor:
        tau = torch.as_tensor(self.threshold if threshold is None else threshold, dtype=torch.float32, device=device)
        if tau.dim() == 0:
            return tau.expand(B)
        if tau.shape != (B,):
            raise ValueError(f"threshold must be a float or one value per row ({B} rows), got shape {tuple(tau.shape)}")
        return tau

    def _upper(
        self,
        h: torch.Tensor,
        normed: torch.Tensor,
        exit_logits: torch.Tensor | None,
        exited: torch.Tensor,
        kv_cache: KVCache | None,
        last_only: bool,
    ) -> torch.Tensor:
        """Blocks exit_layer.. on the rows that need them, the exited rows' deeper K/V, and the logits (B, T', V)."""
        B = h.shape[0]
        t = self.base.transformer
        out_exited = exited[:, -1:] if last_only else exited  # (B, T')
        running = (~exited).any(dim=1).nonzero().squeeze(1)  # rows with a position that goes deeper
        everyone = running.numel() == B  # no gathering then, so never-exit computes exactly what GPT does
        deep = None  # the last block's output for the running rows (R, T, C)
        if running.numel():
            x = h if everyone else h.index_select(0, running)  # (R, T, C)
            held = exited if everyone else exited.index_select(0, running)  # (R, T)
            hold = bool(held.any())
            start = x
            cache = kv_cache if kv_cache is None or everyone else _RowSubsetCache(kv_cache, running)
            for layer in range(self.exit_layer, self.config.n_layer):
                x = t.h[layer](x, cache, layer)
                if hold:  # exited positions keep h_k at every depth
                    x = torch.where(held[..., None], start, x)
            deep = x
        if kv_cache is not None and not everyone:
            stopped = exited.all(dim=1).nonzero().squeeze(1)
            held_state = h if running.numel() == 0 else h.index_select(0, stopped)  # (R', T, C)
            self.exited_kv(t.h, self.exit_layer, held_state, stopped, kv_cache)

        final = None if deep is None else t.ln_f(deep[:, -1:] if last_only else deep)  # (R, T', C)
        vocab = self.config.vocab_size
        if exit_logits is not None:  # the exit head already ran on every position: compute the last head only deeper
            base_out = exit_logits[:, -1:] if last_only else exit_logits
            if final is None:
                return base_out
            return self._merge(base_out, self.base.lm_head(final)[..., :vocab], running, everyone, out_exited)
        base_out = normed[:, -1:] if last_only else normed
        if final is not None:
            base_out = self._merge(base_out, final, running, everyone, out_exited)
        return self.base.lm_head(base_out)[..., :vocab]

    @staticmethod
    def _merge(
        exit_part: torch.Tensor,
        deep_part: torch.Tensor,
        running: torch.Tensor,
        everyone: bool,
        out_exited: torch.Tensor,
    ) -> torch.Tensor:
        """exit_part (B, T', X) with the running rows' non-exited positions taken from deep_part (R, T', X)."""
        if everyone:
            return torch.where(out_exited[..., None], exit_part, deep_part)
        keep = out_exited.index_select(0, running)[..., None]  # (R, T', 1)
        merged = torch.where(keep, exit_part.index_select(0, running), deep_part)
        return exit_part.index_copy(0, running, merged)

    @torch.no_grad()
    def exit_scores(self, idx: torch.Tensor) -> torch.Tensor:
        """The classifier's scores (B, T) for token rows, without a cache and without counting statistics."""
        return self._exit_scores(self._lower(idx, None))[2]

    def generate(self, idx, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """New token ids for each prompt row with early exit at self.threshold; see gpt2.generate.generate."""
        from gpt2.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)


# ---------------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd inside the block; the module's previous mode is restored afterwards."""
    was_training = module.training
    try:
        with torch.no_grad():
            yield module.eval()
    finally:
        module.train(was_training)


def exit_features_and_labels(
    base: GPT, idx: torch.Tensor, exit_layer: int, *, head_features: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier training data from token rows idx (B, T), with the backbone frozen (eval mode, no grad).

    Returns features (B*T, F) float32 as `exit_features` makes them, and labels (B*T,) float32: 1.0 where the exit
    head's argmax equals the full model's argmax at that position.
    """
    check_exit_layer(exit_layer, base.config.n_layer)
    with _frozen(base):
        logits, _, hidden = base(idx, output_hidden_states=True)
        h = hidden[exit_layer]  # (B, T, C)
        _, exit_logits = exit_head(base, h)
        labels = (exit_logits.argmax(-1) == logits.argmax(-1)).float()  # (B, T)
        features = exit_features(h, exit_logits if head_features else None, base.config.layer_norm_epsilon)
    return features.reshape(-1, features.size(-1)), labels.reshape(-1)


def _loss_and_accuracy(classifier: nn.Module, features, labels, loss_fn) -> tuple[float, float]:
    with torch.no_grad():
        logits = classifier(features)
        return float(loss_fn(logits, labels)), float(((logits > 0).float() == labels).float().mean())


def train_classifier(
    classifier: ExitClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    balance_classes: bool = False,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fit the classifier with AdamW on binary cross-entropy; one history entry per epoch.

    balance_classes weights the positive class by n_negative / n_positive (for rare agreement). Each entry has epoch,
    loss (mean over the epoch's minibatches), accuracy (on all training data after the epoch), and val_loss /
    val_accuracy when validation data is given. on_epoch receives each entry as soon as its epoch ends (progress).
    """
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(
            f"need as many labels as feature rows (> 0): {features.shape[0]} rows, {labels.shape[0]} labels"
        )
    device = next(classifier.parameters()).device
    features, labels = features.to(device), labels.to(device).float()
    pos_weight = None
    if balance_classes:
        n_pos = float(labels.sum())
        pos_weight = torch.tensor((len(labels) - n_pos) / max(n_pos, 1.0), device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(labels), generator=generator).to(device)
        losses = []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = loss_fn(classifier(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        classifier.eval()
        entry = {"epoch": epoch + 1, "loss": math.fsum(losses) / len(losses)}
        entry["accuracy"] = _loss_and_accuracy(classifier, features, labels, loss_fn)[1]
        if val_features is not None and val_labels is not None:
            val = _loss_and_accuracy(classifier, val_features.to(device), val_labels.to(device).float(), loss_fn)
            entry["val_loss"], entry["val_accuracy"] = val
        history.append(entry)
        if on_epoch:
            on_epoch(entry)
    return history


# ---------------------------------------------------------------------------------------------------- calibration


def _inputs_and_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"a token batch must be (B, T+1) with T >= 1, got shape {tuple(batch.shape)}")
        return batch[:, :-1], batch[:, 1:]
    x, y = batch
    return x, y


def calibrate(
    model: EarlyExitGPT,
    token_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    taus: Sequence[float],
) -> list[dict]:
    """Measure each threshold tau on the same data: one dict per tau, in the order given.

    token_batches: (B, T+1) token tensors (inputs and next-token targets from one row) or (x, y) pairs as the shard
    loader yields. Each row: tau, exit_rate, agreement (fraction of positions whose early-exit argmax equals the
    full model's), agreement_exited (the same over exited positions, None when none exited), perplexity of the
    early-exit predictions, perplexity_full (the full model's, the same for every tau), mean_blocks per token.
    Positions whose target is -100 are left out of every figure.
    The backbone and classifier run once per batch; only the deeper blocks run again per tau. Statistics counters
    are left alone.
    """
    taus = [float(t) for t in taus]
    totals = {tau: {"exited": 0, "agree": 0, "agree_exited": 0, "nll": []} for tau in taus}
    n_tokens, full_nll = 0, []
    device = model.transformer.wte.weight.device

    def nll(logits: torch.Tensor, y: torch.Tensor) -> float:
        return float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))

    with _frozen(model):
        for batch in token_batches:
            x, y = (t.to(device) for t in _inputs_and_targets(batch))
            valid = y != IGNORE_INDEX  # (B, T): masked targets (the shard loader's -100) count nowhere
            h = model._lower(x, None)
            normed, exit_logits, score = model._exit_scores(h)
            full = model._upper(h, normed, exit_logits, torch.zeros_like(valid), None, False)
            full_pred = full.argmax(-1)
            n_tokens += int(valid.sum())
            full_nll.append(nll(full, y))
            for tau in taus:
                exited = score >= tau
                logits = model._upper(h, normed, exit_logits, exited, None, False)
                agree = (logits.argmax(-1) == full_pred) & valid
                exited &= valid
                total = totals[tau]
                total["exited"] += int(exited.sum())
                total["agree"] += int(agree.sum())
                total["agree_exited"] += int((agree & exited).sum())
                total["nll"].append(nll(logits, y))
    if n_tokens == 0:
        raise ValueError("calibrate needs at least one token batch with a target that is not -100")
    rows = []
    for tau in taus:
        total = totals[tau]
        exited = total["exited"]
        rows.append(
            {
                "tau": tau,
                "exit_rate": exited / n_tokens,
                "agreement": total["agree"] / n_tokens,
                "agreement_exited": total["agree_exited"] / exited if exited else None,
                "perplexity": math.exp(math.fsum(total["nll"]) / n_tokens),
                "perplexity_full": math.exp(math.fsum(full_nll) / n_tokens),
                "mean_blocks": (exited * model.exit_layer + (n_tokens - exited) * model.config.n_layer) / n_tokens,
            }
        )
    return rows


def choose_threshold(rows: Sequence[dict], target_agreement: float = 0.97) -> float:
    """The tau of the `calibrate` row with the highest exit rate among those whose agreement reaches the target."""
    good = [r for r in rows if r["agreement"] >= target_agreement]
    if not good:
        best = max((r["agreement"] for r in rows), default=None)
        raise ValueError(
            f"no threshold reaches agreement {target_agreement} (best {best}); calibrate with higher taus"
            " (tau > 1 never exits and always agrees)"
        )
    return max(good, key=lambda r: (r["exit_rate"], r["agreement"], -r["tau"]))["tau"]


# ---------------------------------------------------------------------------------------------------- save / load


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the other checkpoint files are only referenced again, not copied
    except OSError:
        shutil.copy2(src, dst)


def save_early_exit(model: EarlyExitGPT, directory: str | os.PathLike) -> None:
    """Add the classifier (`early_exit.safetensors`, `early_exit.json`) to the model's checkpoint directory.

    Atomic as gpt2.checkpoint.save_pretrained: a sibling copy of the directory (hard links, so cheap) gets the new
    files and replaces the directory, so readers see the old or the new pair, never a mix. Saving the base model
    again with save_pretrained writes a new directory without these files.
    """
    directory = Path(directory)
    config = read_config(directory)
    arch = ("vocab_size", "n_layer", "n_head", "n_embd")
    if any(getattr(config, f) != getattr(model.config, f) for f in arch):
        raise CheckpointError(
            f"{directory}: holds a different model ({ {f: getattr(config, f) for f in arch} }) than the early-exit"
            f" model's base ({ {f: getattr(model.config, f) for f in arch} })"
        )
    spec = {
        "format_version": EXIT_FORMAT_VERSION,
        "exit_layer": model.exit_layer,
        "threshold": model.threshold,
        "n_layer": model.config.n_layer,
        **model.classifier.spec(),
    }
    with atomic_directory(directory, create=False) as tmp:
        # The old pair is left out rather than linked: writing through a link would change the live files.
        old_pair = shutil.ignore_patterns(EXIT_WEIGHTS_FILE, EXIT_CONFIG_FILE)
        shutil.copytree(directory, tmp, copy_function=_link_or_copy, ignore=old_pair)
        state = {k: v.detach().float().contiguous().cpu() for k, v in model.classifier.state_dict().items()}
        save_file(state, str(tmp / EXIT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / EXIT_CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; this checkpoint has no early-exit classifier (save_early_exit adds one)"
        )
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    try:
        if int(spec.get("format_version", EXIT_FORMAT_VERSION)) > EXIT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer version of this project ({spec['format_version']})")
        return {
            "exit_layer": spec["exit_layer"],
            "threshold": float(spec["threshold"]),
            "hidden_dim": int(spec["classifier"]["hidden_dim"]),
            "n_embd": int(spec["classifier"]["n_embd"]),
            "head_features": list(spec["features"]["head"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from e


def load_early_exit(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> EarlyExitGPT:
    """The early-exit model saved in a checkpoint directory: base weights via gpt2.checkpoint.load_directory, the
    classifier from early_exit.*. `dtype` applies to the backbone; the classifier stays float32 (it is tiny and
    its score is compared with a threshold). Returned in eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / EXIT_CONFIG_FILE, directory / EXIT_WEIGHTS_FILE
    spec = _read_spec(config_path)
    if spec["head_features"] not in ([], list(HEAD_FEATURES)):
        raise CheckpointError(
            f"{config_path}: unknown head features {spec['head_features']} (known: {list(HEAD_FEATURES)})"
        )
    base = load_directory(directory, device=device, dtype=dtype)
    try:
        check_exit_layer(spec["exit_layer"], base.config.n_layer)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; the early-exit classifier's weights are not in {directory}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{weights_path}: cannot read safetensors file ({e}); the file is corrupt or truncated"
        ) from e
    if spec["n_embd"] != base.config.n_embd:
        raise CheckpointError(
            f"{config_path}: classifier for n_embd={spec['n_embd']}, the model has {base.config.n_embd}"
        )
    classifier = ExitClassifier(spec["n_embd"], spec["hidden_dim"], head_features=bool(spec["head_features"]))
    try:
        classifier.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{weights_path}: does not match the classifier described in {EXIT_CONFIG_FILE} ({e})"
        ) from e
    return EarlyExitGPT(base, spec["exit_layer"], spec["threshold"], classifier.to(device)).eval()
