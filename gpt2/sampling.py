"""Choosing the next token of many sequences at once, each with its own settings and its own random generator.

One call handles a whole batch of logits (B, V): penalties, logit bias and the min-tokens ban where a row asks for
them, then greedy rows by argmax and sampled rows by temperature, top-k and top-p, all as batched tensor operations.
Sampled rows draw with the exponential race (argmax of p / E with E ~ Exp(1), which picks token i with probability
p_i); each seeded sequence draws its E from its own torch.Generator, one vocabulary-sized draw per token, so a seeded
sequence produces the same tokens whatever else is in the batch. Work is done in float32 on the logits' device.

Log-probabilities, when a sequence asks for them, are those of the model's own distribution (the raw logits' log-
softmax, before penalties, bias or temperature), as OpenAI's and vLLM's completions APIs report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from gpt2.config import EOT_TOKEN

MAX_TOP_LOGPROBS = 20  # the most alternatives per position the library reports (the engine's limit too)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p (nucleus sampling)
    presence_penalty: float = 0.0  # subtracted from every token already generated (OpenAI semantics)
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the generated tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or output (CTRL / transformers)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # the stop tokens are banned until this many tokens were generated
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence, besides end-of-text
    ignore_eos: bool = False  # end-of-text does not end the sequence (it is generated like any token)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def stop_tokens(self) -> frozenset[int]:
        """The token ids that end a sequence (and that min_tokens bans)."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else {EOT_TOKEN})

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class SequenceSampling:
    """One sequence's sampling state: its settings, its generator, and the token counts its penalties need."""

    def __init__(
        self, params: SamplingParams, prompt: Sequence[int] = (), seed: int | None = None, logprobs: int | None = None
    ) -> None:
        self.params = params
        self.generator = make_generator(seed)
        self.logprobs = logprobs  # top alternatives to report per token (0: the chosen token's only); None: none
        self.generated = 0
        self.counts: torch.Tensor | None = None  # (V,) occurrences in the output, for penalties
        self.in_prompt: torch.Tensor | None = None  # (V,) bool, for the repetition penalty
        self._prompt = list(prompt) if params.repetition_penalty != 1 else []

    def record(self, token: int) -> None:
        """Count a token that was chosen for this sequence."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1

    def _penalty_state(self, vocab: int, device: torch.device) -> None:
        if self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
            self.in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            if self._prompt:
                self.in_prompt[torch.tensor(self._prompt, device=device)] = True


@dataclass(frozen=True)
class TokenLogprobs:
    logprob: float  # of the chosen token
    top: tuple[tuple[int, float], ...]  # the most likely tokens and their log-probabilities, best first


def choose(
    logits: torch.Tensor, sequences: Sequence[SequenceSampling]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The next token of each row of `logits` (B, V), and its log-probabilities where the sequence asks for them.

    Does not record the tokens: the caller calls `record` once it has accepted them (a stop token may end the row).
    """
    x = logits.detach().to(torch.float32, copy=True)  # (B, V)
    B, V = x.shape
    want = [i for i, s in enumerate(sequences) if s.logprobs is not None]
    raw = torch.log_softmax(x[want], dim=-1) if want else None  # (W, V)
    _adjust(x, sequences)

    tokens = x.argmax(dim=-1)  # (B,) the greedy rows' choice, replaced below for sampled rows
    sampled = [i for i, s in enumerate(sequences) if s.params.temperature > 0]
    if sampled:
        tokens[sampled] = _sample(x[sampled], [sequences[i] for i in sampled])
    chosen = tokens.tolist()

    out: list[TokenLogprobs | None] = [None] * B
    if want:
        k = max(min(sequences[i].logprobs, MAX_TOP_LOGPROBS) for i in want)
        top_v, top_i = raw.topk(max(k, 1), dim=-1) if k else (None, None)
        picked = raw.gather(1, tokens[want][:, None]).squeeze(1).tolist()
        top_v = top_v.tolist() if k else None
        top_i = top_i.tolist() if k else None
        for j, i in enumerate(want):
            n = sequences[i].logprobs
            top = tuple(zip(top_i[j][:n], top_v[j][:n])) if n else ()
            out[i] = TokenLogprobs(picked[j], top)
    return chosen, out


def _adjust(x: torch.Tensor, sequences: Sequence[SequenceSampling]) -> None:
    """Penalties, logit bias and the min-tokens ban, in place, on the rows that ask for them."""
    B, V = x.shape
    for i, s in enumerate(sequences):
        p = s.params
        if p.penalised:
            s._penalty_state(V, x.device)
            row = x[i]
            if p.repetition_penalty != 1:
                seen = s.in_prompt | (s.counts > 0)
                scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row.copy_(torch.where(seen, scaled, row))
            if p.frequency_penalty:
                row.sub_(p.frequency_penalty * s.counts)
            if p.presence_penalty:
                row.sub_(p.presence_penalty * (s.counts > 0).float())
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=x.device)
            x[i].index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=x.device))
        if s.generated < p.min_tokens:
            banned = [t for t in p.stop_tokens if t < V]
            if banned:
                x[i, banned] = float("-inf")


def _sample(x: torch.Tensor, sequences: Sequence[SequenceSampling]) -> torch.Tensor:
    """Sampled tokens (S,) for the rows x (S, V): temperature, then top-k, then top-p, then the exponential race."""
    S, V = x.shape
    device = x.device
    x = x / torch.tensor([s.params.temperature for s in sequences], device=device)[:, None]
    top_k = [s.params.top_k if s.params.top_k is not None and s.params.top_k < V else V for s in sequences]
    top_p = [s.params.top_p if s.params.top_p is not None else 1.0 for s in sequences]
    if min(top_k) < V or min(top_p) < 1:
        values, order = x.sort(dim=-1, descending=True)  # (S, V)
        if min(top_k) < V:
            kth = values.gather(1, torch.tensor(top_k, device=device)[:, None] - 1)  # (S, 1)
            x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th token stay
            values = values.masked_fill(values < kth, float("-inf"))
        if min(top_p) < 1:
            probs = torch.softmax(values, dim=-1)  # (S, V) in descending order
            # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
            drop_sorted = torch.cumsum(probs, dim=-1) - probs >= torch.tensor(top_p, device=device)[:, None]
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(x, dim=-1)  # (S, V)
    race = torch.empty_like(probs)
    unseeded = [j for j, s in enumerate(sequences) if s.generator is None]
    if unseeded:
        race[unseeded] = torch.empty(len(unseeded), V, device=device).exponential_()
    for j, s in enumerate(sequences):
        if s.generator is not None:  # the sequence's own stream of random numbers, whatever its batch
            race[j] = torch.empty(V).exponential_(generator=s.generator).to(device)
    return (probs / race).argmax(dim=-1)
