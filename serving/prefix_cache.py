"""Prompts computed before, kept for the requests that begin the same way (a cross-request prefix cache).

Requests to one server often share the beginning of their prompt: a system prompt or few-shot examples before each
question, a conversation that grows by a turn, a retried or repeated request, an evaluation's context scored with
each of its endings. The engine keeps copies of the key/value cache rows of the prompts it has computed, up to a
byte budget (the least recently used go first); a request whose prompt begins with one of them starts from a copy
of that part and computes only the rest.

Of a shared beginning of k tokens, all k positions are lent, but at least one position is left to compute: the last
one's logits, which predict the first new token, are not kept (a prompt given again in full computes its last
position). A request that scores its prompt (prompt_logprobs) also takes the kept scores, each token's given the ones
before it: the score of token k needs the logits of position k - 1 as the new prompt has it, so such a request
borrows k - 1 positions; and only from a prompt that was scored with at least as many alternatives per token.

Each kept prompt is a copy of its own: prompts that share a long beginning (one system prompt, many questions) each
hold a copy of it. A tree of shared segments (a radix tree, as SGLang keeps) would hold it once.

Everything here runs on the engine's decoding thread.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import torch

from gpt2.kv_cache import KVCache

# Prompts shorter than this are not kept, and fewer positions than this are not lent: their computation costs less
# than keeping them in order. Prompts are filed by their first MIN_TOKENS tokens, so a lookup only compares the
# prompts that can lend that many.
MIN_TOKENS = 16
# The most prompts kept (beyond the byte budget): a lookup compares every prompt filed with the same beginning, on
# the decoding thread, so their number stays small (~2 ms for all of them at 1,000 tokens each).
MAX_PROMPTS = 256
# Host memory of a kept score, in bytes (Python floats and tuples): a logprob, and each of its alternatives.
SCORE_BYTES, ALTERNATIVE_BYTES = 32, 130


@dataclass(eq=False)
class StoredPrompt:
    tokens: np.ndarray  # (L,) int64
    filed_as: tuple  # (exit threshold, first MIN_TOKENS tokens)
    kv: list[torch.Tensor] = field(repr=False)  # KVCache.copy_prefix of its L positions
    nbytes: int
    scored_with: int | None = None  # the prompt_logprobs it was computed with (None: not scored)
    logprobs: tuple = field(default=(), repr=False)  # per token, as DecodeEngine's PromptLogprobs
    top: tuple = field(default=(), repr=False)


@dataclass(frozen=True)
class Borrowed:
    """What a request takes from a stored prompt: `length` positions, and their scores when it asked for them."""

    length: int
    logprobs: list[float | None] | None = None  # scores of the first length + 1 tokens
    top: list | None = None


def _rank(scored_with: int | None) -> int:
    return -1 if scored_with is None else scored_with


def _shared(tokens: np.ndarray, stored: StoredPrompt) -> int:
    """How many first tokens `tokens` and a stored prompt have in common."""
    n = min(len(tokens), len(stored.tokens))
    differ = np.flatnonzero(tokens[:n] != stored.tokens[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """Computed prompts of one engine: `lend` to a request that begins like one, `keep` a prompt once it is in.

    budget_bytes: the most the copies take together (0: keep nothing). Prompts computed with different early-exit
    thresholds are different computations: `exit_threshold` (the request's, or None) keeps them apart.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._lru: collections.OrderedDict[StoredPrompt, None] = collections.OrderedDict()  # oldest first
        self._filed: dict[tuple, list[StoredPrompt]] = collections.defaultdict(list)  # by StoredPrompt.filed_as
        self.lent = 0  # requests that borrowed
        self.lent_tokens = 0  # positions they did not compute

    def stats(self) -> dict:
        return {"prompts": len(self._lru), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "requests_lent": self.lent, "tokens_lent": self.lent_tokens}

    def lend(self, cache: KVCache, row: int, prompt: list[int], exit_threshold: float | None,
             prompt_logprobs: int | None) -> Borrowed | None:
        """Put the longest stored beginning of `prompt` into cache row `row` (an empty row), or return None."""
        if len(prompt) <= MIN_TOKENS:
            return None
        filed = self._filed.get((exit_threshold, tuple(prompt[:MIN_TOKENS])))
        if not filed:
            return None
        tokens = np.asarray(prompt, dtype=np.int64)
        scoring = prompt_logprobs is not None
        best, best_length = None, MIN_TOKENS - 1
        for stored in filed:
            if _rank(stored.scored_with) < _rank(prompt_logprobs):
                continue
            length = min(_shared(tokens, stored) - scoring, len(tokens) - 1)  # see the module docstring
            if length > best_length:
                best, best_length = stored, length
                if length == len(tokens) - 1:  # nothing lends more
                    break
        if best is None:
            return None
        self._lru.move_to_end(best)
        cache.load_prefix(row, best.kv, best_length)
        self.lent += 1
        self.lent_tokens += best_length
        if prompt_logprobs is None:
            return Borrowed(best_length)
        top = [t if t is None else t[:prompt_logprobs] for t in best.top[: best_length + 1]]
        return Borrowed(best_length, list(best.logprobs[: best_length + 1]), top)

    def keep(self, cache: KVCache, row: int, prompt: list[int], exit_threshold: float | None,
             prompt_logprobs: int | None = None, logprobs: list | None = None, top: list | None = None) -> None:
        """Keep a copy of cache row `row`, which holds exactly `prompt` (with its scores when it was scored)."""
        if len(prompt) <= MIN_TOKENS:
            return
        nbytes = sum(t[row, :, : len(prompt)].nbytes for t in (*cache.k, *cache.v))
        if prompt_logprobs is not None:
            nbytes += len(prompt) * (SCORE_BYTES + prompt_logprobs * ALTERNATIVE_BYTES)
        if nbytes > self.budget_bytes:
            return
        tokens = np.asarray(prompt, dtype=np.int64)
        filed_as = (exit_threshold, tuple(prompt[:MIN_TOKENS]))
        for stored in list(self._filed.get(filed_as, ())):
            if _shared(tokens, stored) < min(len(tokens), len(stored.tokens)):
                continue
            if len(stored.tokens) >= len(tokens) and _rank(stored.scored_with) >= _rank(prompt_logprobs):
                self._lru.move_to_end(stored)  # it lends all that this one would
                return
            if len(stored.tokens) <= len(tokens) and _rank(stored.scored_with) <= _rank(prompt_logprobs):
                self._drop(stored)  # this one lends all that it would
        while self._lru and (self.nbytes + nbytes > self.budget_bytes or len(self._lru) >= MAX_PROMPTS):
            self._drop(next(iter(self._lru)))
        stored = StoredPrompt(tokens, filed_as, cache.copy_prefix(row, len(prompt)), nbytes, prompt_logprobs,
                              tuple(logprobs or ()), tuple(top or ()))
        self._lru[stored] = None
        self._filed[filed_as].append(stored)
        self.nbytes += nbytes

    def clear(self) -> None:
        for stored in list(self._lru):
            self._drop(stored)

    def _drop(self, stored: StoredPrompt) -> None:
        del self._lru[stored]
        filed = self._filed[stored.filed_as]
        filed.remove(stored)
        if not filed:
            del self._filed[stored.filed_as]
        self.nbytes -= stored.nbytes
