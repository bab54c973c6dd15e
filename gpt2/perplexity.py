"""Perplexity of a long token stream with a sliding window (the WikiText-2 recipe), every token counted exactly once.

A model with a context of L tokens cannot read a long text at once. Windows of up to L input tokens start every
`stride` tokens; each window scores only the tokens that no earlier window scored, so after the first window every
prediction has at least L - stride tokens of context. stride = L gives disjoint chunks (fastest, least context);
a smaller stride costs L / stride times more compute and approaches the model's full-context perplexity.

Token accounting: the stream starts with <|endoftext|>, which every document follows in the training shards too.
It is only context, so a text of N tokens yields exactly N predictions. Totals are the exact sum of per-token
negative log-likelihoods divided by the exact count (not an average of per-window averages), and the sum is taken
with math.fsum, so it does not depend on how windows were batched or in which order workers returned them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import tiktoken

from gpt2.config import EOT_TOKEN
from gpt2.loglikelihood import row_logprobs
from gpt2.protocols import LanguageModel
from gpt2.tokenizer import get_tokenizer


@dataclass(frozen=True)
class Window:
    """Input positions [begin, end) of the stream; it scores the targets at positions first_scored..end."""

    begin: int
    end: int
    first_scored: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first_scored + 1


def text_tokens(text: str, tokenizer: tiktoken.Encoding | None = None) -> list[int]:
    """The stream for a text: <|endoftext|> then its tokens (the text is never parsed for special tokens)."""
    return [EOT_TOKEN, *(tokenizer or get_tokenizer()).encode_ordinary(text)]


def plan_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """Windows over a stream of `num_tokens` tokens in which positions 1..num_tokens-1 are each scored once."""
    if num_tokens < 2:
        raise ValueError(f"a stream of {num_tokens} token(s) has nothing to predict")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    last_input = num_tokens - 1  # the final token is only ever a target
    windows = []
    begin, first_scored = 0, 1
    while True:
        end = min(begin + context_length, last_input)
        windows.append(Window(begin, end, first_scored))
        if end == last_input:
            return windows
        first_scored = end + 1
        begin += stride


def window_nll(model: LanguageModel, tokens: Sequence[int], windows: Sequence[Window]) -> list[float]:
    """Summed negative log-likelihood of each window's scored tokens, all windows in one forward pass."""
    rows = [list(tokens[w.begin : w.end + 1]) for w in windows]
    logprobs = row_logprobs(model, rows, [w.first_scored - w.begin for w in windows])
    return [-lp for lp in logprobs]


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float
    n_tokens: int
    n_windows: int

    @classmethod
    def merge(cls, windows: Sequence[Window], nll_sums: Sequence[float]) -> "PerplexityResult":
        if len(windows) != len(nll_sums):
            raise ValueError(f"{len(windows)} windows but {len(nll_sums)} scores")
        return cls(math.fsum(nll_sums), sum(w.n_scored for w in windows), len(windows))

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (nats)."""
        return self.nll_sum / self.n_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/perplexity": self.perplexity, f"{prefix}/tokens": self.n_tokens}


def resolve_window(model: LanguageModel, context_length: int | None, stride: int | None) -> tuple[int, int]:
    """Defaults: the model's whole context, and half of it as the stride (as in the usual WikiText-2 runs)."""
    context_length = context_length or model.config.block_size
    if context_length > model.config.block_size:
        raise ValueError(f"context_length {context_length} exceeds the model's block_size {model.config.block_size}")
    stride = stride or max(1, context_length // 2)
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    return context_length, stride


def evaluate_perplexity(
    model: LanguageModel,
    tokens: Sequence[int],
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `tokens` (see text_tokens) in this process, `batch_size` windows per pass.

    `on_progress(n)` is called after each batch with the number of tokens it scored.
    """
    windows = plan_windows(len(tokens), *resolve_window(model, context_length, stride))
    nll: list[float] = []
    was_training = model.training
    model.eval()  # dropout would make the scores random
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            nll.extend(window_nll(model, tokens, batch))
            if on_progress is not None:
                on_progress(sum(w.n_scored for w in batch))
    finally:
        model.train(was_training)
    return PerplexityResult.merge(windows, nll)
