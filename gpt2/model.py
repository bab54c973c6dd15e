"""The GPT-2 model: the whole architecture in one file.

Parameter names follow the OpenAI / Hugging Face checkpoints (wte, wpe, h.N.attn.c_attn, ...), so loading their
weights is a short mapping (see checkpoint.py). Shapes: B batch, T time, C n_embd, nh heads, hs head size, V vocab.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2.config import IGNORE_INDEX, GPTConfig
from gpt2.kv_cache import KVCache
from gpt2.lm_head_loss import lm_head_loss

# Decoding with a KV cache meets a new shape at almost every step (the cache grows by one, batches change). On CUDA,
# SDPA's cuDNN kernel plans each new shape afresh: on an H100 that took 5 ms per call, so batch-1 generation of
# unseen lengths ran at a fraction of its speed. The memory-efficient kernel takes the cache's mask with no planning.
_CACHED_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def _cached_attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    return sdpa_kernel(_CACHED_KERNELS) if device.type == "cuda" else contextlib.nullcontext()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        # Pruning (gpt2.prune) removes whole heads, so a layer may have fewer than n_head heads of the usual size.
        self.n_head = config.heads_in_layer(layer)
        self.head_dim = config.head_dim
        width = self.n_head * self.head_dim  # n_embd unless heads were pruned
        self.c_attn = nn.Linear(config.n_embd, 3 * width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.c_proj.residual_init = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        width = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(width, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k, v, mask = cache.update(layer, k, v)  # (B, nh, L, hs), mask (B, 1, T, L)
            with _cached_attention_kernels(q.device):
                y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, width)  # (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.pre_norm:  # GPT-2: normalise each sub-layer's input, keep the residual stream un-normalised
            x = x + self.attn(self.ln_1(x), cache, layer)
            return x + self.mlp(self.ln_2(x))
        # Post-LN (the original Transformer): normalise after each residual addition.
        x = self.ln_1(x + self.attn(x, cache, layer))
        return self.ln_2(x + self.mlp(x))


def check_logits_at(
    logits_at: torch.Tensor | None, idx: torch.Tensor, last_only: bool, targets: torch.Tensor | None
) -> None:
    """Refuse a `logits_at` mask a forward pass cannot honour, naming what is wrong."""
    if logits_at is None:
        return
    if logits_at.dtype != torch.bool or logits_at.shape != idx.shape:
        raise ValueError(
            f"logits_at must be a bool mask shaped like idx {tuple(idx.shape)}, "
            f"got {logits_at.dtype} {tuple(logits_at.shape)}"
        )
    if last_only or targets is not None:
        raise ValueError("logits_at selects the positions to score; it cannot be combined with last_only or targets")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 initialisation: N(0, 0.02), with the projections that write into the residual stream scaled by
        # 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth (two such writes per block).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_init", False):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_logits: bool = True,
    ):
        """Logits (B, T, vocab_size) and the mean cross-entropy loss (None without targets).

        kv_cache: append these tokens after each row's cached ones (incremental decoding).
        last_only: compute logits for the last position only (B, 1, V), as generation needs.
        logits_at: a (B, T) bool mask; logits only for its True positions, (N, V) in row-major order, as scoring
        needs (gpt2.loglikelihood). Where the head dominates the cost (small models) this skips most of it.
        output_hidden_states: also return the residual stream after the embeddings and after every block,
        a list of n_layer + 1 tensors (B, T, C), as Hugging Face does.
        Targets equal to -100 are ignored by the loss.
        return_logits=False (with targets): logits may be returned as None, the loss then computed chunk by chunk
        without ever holding every position's logits (gpt2.lm_head_loss): what training and validation loss use.
        """
        B, T = idx.shape
        check_logits_at(logits_at, idx, last_only, targets)
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context of {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            pos = kv_cache.begin(T)  # (B, T): each row continues from its own length
            if int(pos.max()) >= self.config.block_size:
                raise ValueError(f"position {int(pos.max())} is beyond the context of {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        hidden = [x] if output_hidden_states else None
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
            if hidden is not None:
                hidden.append(x)
        if kv_cache is not None:
            kv_cache.end(T)
        x = self.transformer.ln_f(x)
        # A plain head only: a quantized or adapted one (gpt2.quantize, gpt2.lora) goes through its own module.
        if targets is not None and not return_logits and type(self.lm_head) is nn.Linear:
            loss = lm_head_loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.config.vocab_size)
            return (None, loss, hidden) if output_hidden_states else (None, loss)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        elif logits_at is not None:
            x = x[logits_at]  # (N, C)
        # Padded vocabulary rows are cut off here, so they are never sampled and never enter the softmax.
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        if output_hidden_states:
            return logits, loss, hidden
        return logits, loss

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache sized for this model, in the dtype and on the device of its weights."""
        c = self.config
        weight = self.transformer.wte.weight
        heads = c.n_head_per_layer or c.n_head
        return KVCache(
            c.n_layer, batch_size, heads, max_len or c.block_size, c.head_dim, dtype=weight.dtype, device=weight.device
        )

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings, as the GPT-2 paper counts (124M).

        Tied weights count once. The token embedding stays in because it is also the output layer.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6 per parameter plus attention's 12·L·C·T (PaLM, app. B).

        Forward alone is a third of this. Used for MFU = flops_per_token × tokens/s ÷ peak FLOP/s.
        With pruned heads L·C becomes the summed attention width of the layers (their heads × head_dim).
        """
        c = self.config
        T = seq_len or c.block_size
        attention_width = sum(c.heads_in_layer(layer) for layer in range(c.n_layer)) * c.head_dim  # L·C unpruned
        return 6 * self.num_params() + 12 * attention_width * T

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "GPT":
        """Load this project's checkpoint directory, a Hugging Face GPT-2 directory, or a hub name such as "gpt2"."""
        from gpt2.checkpoint import load_pretrained

        return load_pretrained(name_or_path, **kwargs)

    def save_pretrained(self, path: str, **kwargs) -> None:
        """Write a directory that is both this project's checkpoint and a Hugging Face GPT-2 model (atomically)."""
        from gpt2.checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    def generate(self, idx, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """New token ids for each prompt row (KV-cached); see gpt2.generate.generate for the options."""
        from gpt2.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def generate_stream(self, idx, max_new_tokens: int, **kwargs):
        """Yield tokens as they are produced; see gpt2.generate.stream."""
        from gpt2.generate import stream

        return stream(self, idx, max_new_tokens, **kwargs)
