"""Continuous batching: concurrent requests to one model decoded together over one KV cache.

Decoding a 124M model at batch 1 is bound by memory bandwidth (every token reads all ~500 MB of weights), so one
forward pass over 8 rows costs little more than over 1. The engine keeps a fixed set of cache rows ("slots"); a
request joins at a token boundary by prefilling its prompt into a free slot, then advances one token per decoding
step together with every other active request, and leaves (its slot freed) when it finishes or is cancelled.

Each request samples with its own seeded generator (gpt2.generate.sample_token), so a seeded request produces the
same tokens whether it runs alone or shares its steps with others.

The engine runs in one background thread; callers submit from any thread and receive events through a callback
that is invoked on the engine thread (keep it cheap: hand the event to a queue).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gpt2.config import EOT_TOKEN
from gpt2.generate import SamplingParams, check_prompt, make_generator, sample_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    id: int
    exited: bool | None = None  # early-exit models: whether this token left the model at the exit block


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of text), "length" (max_tokens), "cancelled", or "error"
    error: str | None = None


Event = Token | Finished


class EngineOverloaded(RuntimeError):
    """More requests are waiting for a slot than the engine accepts; the caller should answer 503."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    seed: int | None = None
    exit_threshold: float | None = None
    id: int = 0
    generated: int = 0
    exited: int = 0
    next_token: int | None = None
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)


class DecodeEngine:
    """Continuous-batching decoder for a GPT (or a model with the same forward signature, such as EarlyExitGPT).

    max_batch: cache rows, i.e. requests decoded together; more requests wait (up to max_pending) for a free row.
    """

    def __init__(self, model, *, max_batch: int = 16, max_pending: int = 64, name: str = "model") -> None:
        if max_batch < 1 or max_pending < 0:
            raise ValueError(f"max_batch must be >= 1 and max_pending >= 0, got {max_batch} and {max_pending}")
        self.model = model.eval()
        self.config = model.config
        self.name = name
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._device = next(model.parameters()).device
        self._cache = model.new_kv_cache(max_batch)
        self._slots: list[Request | None] = [None] * max_batch
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._counters = collections.Counter()
        self._started = time.monotonic()
        # OpenMP thread counts are per thread: a new thread starts from OMP_NUM_THREADS (which Ray sets to the
        # replica's CPU count, often 1), not from the torch.set_num_threads of the thread that created it.
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self._thread.start()

    # ---- caller side (any thread) ----

    def submit(
        self,
        prompt: list[int],
        max_tokens: int,
        params: SamplingParams,
        on_event: Callable[[Event], None],
        *,
        seed: int | None = None,
        exit_threshold: float | None = None,
    ) -> Request:
        """Queue a request; raises ValueError for a bad prompt and EngineOverloaded when the queue is full."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        prompt = check_prompt(prompt, self.config, max_tokens)
        request = Request(prompt, max_tokens, params, on_event, seed, exit_threshold, id=next(self._ids))
        with self._wake:
            if self._closed:
                raise RuntimeError(f"engine {self.name} is closed")
            active = sum(r is not None for r in self._slots)
            if active + len(self._pending) >= self.max_batch + self.max_pending:
                raise EngineOverloaded(
                    f"model {self.name!r} is busy: {active} requests decoding and {len(self._pending)} waiting"
                    f" (limits {self.max_batch} and {self.max_pending}); try again later"
                )
            self._pending.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request at the next token boundary (its slot is freed; it gets Finished('cancelled'))."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        """The decoding thread died without being closed (a replica health check reports this)."""
        return not self._closed and not self._thread.is_alive()

    def stats(self) -> dict:
        with self._wake:
            active = sum(s is not None for s in self._slots)
            pending = len(self._pending)
        c = self._counters
        return {
            "active": active,
            "pending": pending,
            "max_batch": self.max_batch,
            "requests_finished": c["finished"],
            "finished_by_reason": {r: c[f"finished_{r}"] for r in ("stop", "length", "cancelled", "error")},
            "tokens_generated": c["tokens"],
            "decode_steps": c["steps"],
            "mean_batch": c["step_rows"] / c["steps"] if c["steps"] else 0.0,
            "uptime_s": time.monotonic() - self._started,
        }

    def close(self) -> None:
        """Stop the decoding thread; running and waiting requests finish as cancelled. Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- engine thread ----

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._pending and not any(self._slots):
                        self._wake.wait()
                    if self._closed:
                        break
                    admitted = []
                    while self._pending and len(admitted) < self._slots.count(None):
                        admitted.append(self._pending.popleft())
                try:
                    for request in admitted:
                        self._admit(request)
                    self._drop_cancelled()
                    if any(self._slots):
                        self._decode_step()
                except Exception as e:  # a failed pass must not leave callers waiting forever
                    log.exception("decoding step of %s failed", self.name)
                    for slot, request in enumerate(self._slots):
                        if request is not None:
                            self._finish(slot, Finished("error", f"{type(e).__name__}: {e}"))
        for slot, request in enumerate(self._slots):
            if request is not None:
                self._finish(slot, Finished("cancelled", "the engine was closed"))
        for request in self._pending:
            self._emit(request, Finished("cancelled", "the engine was closed"))

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            self._count_finished(Finished("cancelled"))
            self._emit(request, Finished("cancelled"))
            return
        slot = self._slots.index(None)  # lowest free row keeps active rows packed at the front of the cache
        self._slots[slot] = request
        request.generator = make_generator(request.seed)
        self._cache.reset_rows(slot)
        prompt = torch.tensor([request.prompt], device=self._device)  # (1, T)
        logits, exited = self._forward(prompt, self._cache.rows(slot), [request])
        self._accept(slot, logits[0, -1], exited[0] if exited is not None else None)

    def _drop_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self._finish(slot, Finished("cancelled"))

    def _decode_step(self) -> None:
        # Rows [0, hi) go through the model together; free rows inside that range decode a dummy token from a
        # reset (empty) row, which is cheaper than compacting the cache and never visible to anyone.
        hi = max(slot for slot, r in enumerate(self._slots) if r is not None) + 1
        rows = self._slots[:hi]
        for slot, request in enumerate(rows):
            if request is None:
                self._cache.reset_rows(slot)
        feed = torch.tensor([[r.next_token if r else EOT_TOKEN] for r in rows], device=self._device)  # (hi, 1)
        logits, exited = self._forward(feed, self._cache.rows(0, hi), rows)
        self._counters["steps"] += 1
        self._counters["step_rows"] += sum(r is not None for r in rows)
        for slot, request in enumerate(rows):
            if request is not None:
                self._accept(slot, logits[slot, -1], exited[slot] if exited is not None else None)

    def _forward(self, idx: torch.Tensor, cache, rows: list[Request | None]):
        """Logits (B, 1, V) of the last position, and per-row exit flags for early-exit models (else None)."""
        if hasattr(self.model, "forward_with_exits"):
            # Per-row thresholds; free rows never exit early (their output is discarded anyway).
            default = float(getattr(self.model, "threshold", 1.0))
            thresholds = torch.tensor(
                [default if r is None or r.exit_threshold is None else r.exit_threshold for r in rows],
                device=self._device,
            )
            logits, exited = self.model.forward_with_exits(idx, kv_cache=cache, last_only=True, threshold=thresholds)
            return logits, exited[:, -1].tolist()  # decision for the position whose token we sample
        logits, _ = self.model(idx, kv_cache=cache, last_only=True)
        return logits, None

    def _accept(self, slot: int, logits: torch.Tensor, exited: bool | None) -> None:
        request = self._slots[slot]
        token = sample_token(logits, request.params, request.generator)
        if token == EOT_TOKEN:
            self._finish(slot, Finished("stop"))
            return
        request.generated += 1
        request.exited += bool(exited)
        request.next_token = token
        self._counters["tokens"] += 1
        self._emit(request, Token(token, exited))
        if request.generated >= request.max_tokens:
            self._finish(slot, Finished("length"))

    def _finish(self, slot: int, event: Finished) -> None:
        request = self._slots[slot]
        self._slots[slot] = None
        self._count_finished(event)
        self._emit(request, event)

    def _count_finished(self, event: Finished) -> None:
        self._counters["finished"] += 1
        self._counters[f"finished_{event.reason}"] += 1

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a broken listener (e.g. its event loop closed) only loses its own request
            log.exception("event listener of request %d failed", request.id)
            request.cancelled = True
