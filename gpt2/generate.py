"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling, batched and streamed.

Every row samples with its own torch.Generator (gpt2.sampling, the same sampler the serving engine uses), so a seeded
row produces the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from gpt2.config import EOT_TOKEN, GPTConfig
from gpt2.protocols import LanguageModel
from gpt2.sampling import SamplingParams, SequenceSampling, choose


def check_prompt(tokens: Sequence[int], config: GPTConfig, max_new_tokens: int, crop: bool = False) -> list[int]:
    """Validate a prompt against the model; returns it (cropped to its last tokens when `crop` asks for that)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("the prompt is empty: give at least one token")
    for i, t in enumerate(tokens):
        if not 0 <= t < config.vocab_size:
            raise ValueError(f"token id {t} at prompt position {i} is outside the vocabulary [0, {config.vocab_size})")
    room = config.block_size - max_new_tokens
    if len(tokens) > room:
        if not crop or room < 1:
            raise ValueError(
                f"the prompt ({len(tokens)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's context"
                f" of {config.block_size} tokens; shorten the prompt, lower max_new_tokens, or ask for cropping"
                " (crop_prompt=True keeps the prompt's last tokens)"
            )
        tokens = tokens[-room:]
    return tokens


def _as_rows(idx) -> list[list[int]]:
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 1:
            idx = idx[None]
        if idx.dim() != 2:
            raise ValueError(f"prompt tensor must be (T,) or (B, T), got shape {tuple(idx.shape)}")
        return idx.tolist()
    if len(idx) > 0 and all(isinstance(t, int) for t in idx):
        return [list(idx)]
    if len(idx) == 0:
        raise ValueError("no prompts given")
    return [list(row) for row in idx]


def _seeds(seed: int | Sequence[int] | None, n: int) -> list[int | None]:
    if seed is None or isinstance(seed, int):
        return [None if seed is None else seed + i for i in range(n)]
    if len(seed) != n:
        raise ValueError(f"got {len(seed)} seeds for {n} prompts")
    return list(seed)


@torch.inference_mode()
def stream(
    model: LanguageModel,
    idx,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    stop_at_eot: bool = True,
    crop_prompt: bool = False,
) -> Iterator[list[int | None]]:
    """Yield one list per decoding step: the new token of every prompt row, or None for a row that has finished.

    idx: a (B, T) or (T,) tensor, a list of token ids, or a list of such lists (prompts may differ in length).
    seed: an int seeds row i with seed + i; a list gives each row its own seed; None uses torch's global RNG.
    stop_at_eot: a row finishes when it samples <|endoftext|>, which is not emitted.
    """
    params = SamplingParams(temperature, top_k, top_p, ignore_eos=not stop_at_eot)
    rows = [check_prompt(r, model.config, max_new_tokens, crop_prompt) for r in _as_rows(idx)]
    sequences = [SequenceSampling(params, r, seed=s) for r, s in zip(rows, _seeds(seed, len(rows)))]
    if max_new_tokens == 0:
        return
    was_training = model.training
    model.eval()  # no dropout while sampling, even when called from inside a training loop
    try:
        device = model.transformer.wte.weight.device
        cache = model.new_kv_cache(len(rows), max(len(r) for r in rows) + max_new_tokens)
        # Prefill each prompt alone into its own cache row: no padding, and only the last position's logits.
        last = torch.cat([
            model(torch.tensor([r], device=device), kv_cache=cache.rows(b), last_only=True)[0][:, -1]
            for b, r in enumerate(rows)
        ])  # (B, V)
        done = [False] * len(rows)
        for step in range(max_new_tokens):
            chosen, _ = choose(last, sequences)
            tokens: list[int | None] = []
            for b, t in enumerate(chosen):
                if done[b] or t in sequences[b].params.stop_tokens:
                    done[b], t = True, None
                else:
                    sequences[b].record(t)
                tokens.append(t)
            if all(done):
                return
            yield tokens
            if step == max_new_tokens - 1:
                return
            feed = torch.tensor([[EOT_TOKEN if t is None else t] for t in tokens], device=device)  # (B, 1)
            logits, _ = model(feed, kv_cache=cache, last_only=True)  # (B, 1, V); finished rows are ignored
            last = logits[:, -1]
    finally:
        model.train(was_training)


def generate(model: LanguageModel, idx, max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new token ids of every prompt row (without the prompt); options as for `stream`."""
    out: list[list[int]] | None = None
    for tokens in stream(model, idx, max_new_tokens, **kwargs):
        out = out or [[] for _ in tokens]
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out if out is not None else [[] for _ in _as_rows(idx)]
