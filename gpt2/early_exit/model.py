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

This module holds the model (`EarlyExitGPT`) with what it is configured and measured by: the exit layer, the running
exit statistics and the per-token cost. The rest of the package: the classifier and its features
(gpt2.early_exit.classifier), its training (gpt2.early_exit.training), the tau sweep (gpt2.early_exit.calibration)
and the files (gpt2.early_exit.files).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.config import IGNORE_INDEX, GPTConfig
from gpt2.early_exit.classifier import ExitClassifier, exit_features, exit_head
from gpt2.kv_cache import KVCache
from gpt2.model import GPT, check_logits_at

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
        logits_at: torch.Tensor | None = None,
        threshold: float | Sequence[float] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V), (B, 1, V) with last_only or (N, V) with logits_at, and the mean cross-entropy (None
        without targets), as GPT."""
        if targets is not None:  # forward_with_exits checks logits_at itself, but it never sees the targets
            check_logits_at(logits_at, idx, last_only, targets)
        logits, _ = self.forward_with_exits(
            idx, kv_cache=kv_cache, last_only=last_only, logits_at=logits_at, threshold=threshold
        )
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
        logits_at: torch.Tensor | None = None,
        threshold: float | Sequence[float] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits as `forward`, and `exited` (B, T) bool: which positions stopped after block exit_layer.

        threshold: None uses self.threshold; a float applies to every row; a (B,) tensor or sequence gives each row
        its own (a serving batch mixes requests). kv_cache: as for GPT.forward, each row continues from its own length.
        """
        B, T = idx.shape
        check_logits_at(logits_at, idx, last_only, None)
        h = self._lower(idx, kv_cache)  # (B, T, C)
        tau = self._row_thresholds(threshold, B, h.device)  # (B,)
        normed, exit_logits, score = self._exit_scores(h)
        exited = score >= tau[:, None]  # (B, T)
        logits = self._upper(h, normed, exit_logits, exited, kv_cache, last_only, logits_at)
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
        return normed, exit_logits, self.exit_probability(features)

    def exit_probability(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier's score in [0, 1] (float32) for `exit_features` (…, F): a position exits when it reaches tau."""
        return torch.sigmoid(self.classifier(features).float())

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
        logits_at: torch.Tensor | None,
    ) -> torch.Tensor:
        """Blocks exit_layer.. on the rows that need them, the exited rows' deeper K/V, and the logits (B, T', V),
        or (N, V) for the positions of `logits_at`."""
        B = h.shape[0]
        t = self.base.transformer
        out_exited = exited[:, -1:] if last_only else exited  # (B, T')
        running = (~exited).any(dim=1).nonzero().squeeze(1)  # rows with a position that goes deeper
        everyone = running.numel() == B  # no gathering then, so never-exit computes exactly what GPT does
        deep = None  # the last block's output for the running rows (R, T, C)
        if running.numel():
            x = h if everyone else h.index_select(0, running)  # (R, T, C)
            held = exited if everyone else exited.index_select(0, running)  # (R, T)
            cache = kv_cache if kv_cache is None or everyone else _RowSubsetCache(kv_cache, running)
            deep = self._deeper(x, held, cache)
        if kv_cache is not None and not everyone:
            stopped = exited.all(dim=1).nonzero().squeeze(1)
            held_state = h if running.numel() == 0 else h.index_select(0, stopped)  # (R', T, C)
            self.exited_kv(t.h, self.exit_layer, held_state, stopped, kv_cache)

        final = None if deep is None else t.ln_f(deep[:, -1:] if last_only else deep)  # (R, T', C)
        vocab = self.config.vocab_size
        if logits_at is not None:
            # Every position's logits are the head on ln_f of its last state (the exit head is that same head on the
            # exit layer's state), so one head call on the selected positions serves exited and deep ones alike.
            states = normed if final is None else self._merge(normed, final, running, everyone, out_exited)
            return self.base.lm_head(states[logits_at])[..., :vocab]  # (N, V)
        if exit_logits is not None:  # the exit head already ran on every position: compute the last head only deeper
            base_out = exit_logits[:, -1:] if last_only else exit_logits
            if final is None:
                return base_out
            return self._merge(base_out, self.base.lm_head(final)[..., :vocab], running, everyone, out_exited)
        base_out = normed[:, -1:] if last_only else normed
        if final is not None:
            base_out = self._merge(base_out, final, running, everyone, out_exited)
        return self.base.lm_head(base_out)[..., :vocab]

    def _deeper(self, x: torch.Tensor, held: torch.Tensor, cache) -> torch.Tensor:
        """Blocks exit_layer.. on x (R, T, C) = h_k; the `held` (R, T) positions keep h_k at every depth (they exited:
        deeper layers attend to their held state). The last block's output (R, T, C)."""
        t = self.base.transformer
        hold = bool(held.any())
        start = x
        for layer in range(self.exit_layer, self.config.n_layer):
            x = t.h[layer](x, cache, layer)
            if hold:
                x = torch.where(held[..., None], start, x)
        return x

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
