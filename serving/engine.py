"""Continuous batching: concurrent requests to one model decoded together over one KV cache.

Decoding a 124M model at batch 1 is bound by memory bandwidth (every token reads all the weights), so one forward
pass over 16 rows costs little more than over 1. The engine keeps a fixed set of cache rows; each step it
1. admits waiting requests into free rows,
2. prefills prompts: every prompt that is waiting goes into one left-padded pass (gpt2.kv_cache's ragged passes), and
   a long prompt is cut into chunks so that no pass holds more than `prefill_tokens` token slots: decoding rows wait
   for one chunk, never for a whole long prompt,
3. decodes one token for every row whose prompt is in, in one pass, including the rows whose prompt just finished.
Rows are kept packed: decoding rows first, then the rows being prefilled, so each pass runs on a contiguous block of
cache rows with no idle rows in it; a finishing row's place is taken by the last row of its block (its cache row is
copied, a few hundred kB).

Prompts are kept after they are computed (serving.prefix_cache, up to a byte budget): a request whose prompt begins
with one of them starts from a copy of that part of the cache and computes only the rest.

Sampling is batched (gpt2.sampling): each request has its own seeded generator, so a seeded request produces the
same tokens whether it runs alone or shares its steps with others. A request may ask for log-probabilities of its
tokens and of its prompt's tokens (the prompt's come from the same prefill pass, in the model's dtype's logits).

The engine runs on a decoding thread (`DecodingThread`); callers submit from any thread and receive events through a
callback that is invoked on that thread (keep it cheap: hand the event to a queue). Several engines (the variants of
a model replica) share one decoding thread and take turns, a step each: see `DecodingThread` for why.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch

from gpt2.config import EOT_TOKEN
from gpt2.generate import check_prompt
from gpt2.protocols import ExitingModel, LanguageModel
from gpt2.sampling import MAX_TOP_LOGPROBS, SamplingParams, SequenceSampling, TokenLogprobs, choose
from serving.prefix_cache import PrefixCache

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Token:
    id: int
    exited: bool | None = None  # early-exit models: whether this token left the model at the exit block
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    stop: bool = False  # a stop token that ends the request: counted and scored, but not part of the text


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's tokens, each given the tokens before it (None for the first token)."""

    logprobs: list[float | None]
    top: list[tuple[tuple[int, float], ...] | None]


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (a stop token), "length" (max_tokens), "cancelled", or "error"
    error: str | None = None
    stop_token: int | None = None  # the stop_token_ids entry that ended it (None for end-of-text)
    unavailable: bool = False  # an error of the engine, not of the request (its thread died): a retry may succeed


Event = Token | PromptLogprobs | Finished


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed: int) -> None:
    """A seed torch can take; others would fail the request only once it reaches the decoding thread."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed!r}")


class EngineOverloaded(RuntimeError):
    """More requests are waiting for a row than the engine accepts; the caller should answer 503."""


class EngineUnavailable(RuntimeError):
    """The engine takes no more requests: it was closed (its variant unloaded) or its decoding died. The
    caller should answer 503: a retry reaches a reloaded variant or a replacement replica."""


class FaultDrill(BaseException):
    """Raised in the decoding thread by `DecodeEngine.crash_for_drill` (fault drills only). A BaseException, so that
    the per-step error handling does not catch it and the thread dies as it would of an unexpected fatal error."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    seed: int | None = None
    exit_threshold: float | None = None  # early-exit models: None is the model's, read when the request is admitted
    logprobs: int | None = None  # per generated token: the chosen token's logprob and this many alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens
    id: int = 0
    exited: int = 0
    prefilled: int = 0  # prompt tokens already in the cache
    row: int = -1
    next_token: int | None = None
    cancelled: bool = False
    sampling: SequenceSampling | None = field(default=None, repr=False)
    # Requests with the same prompt (the other choices of an n > 1 completion) that take a copy of this one's cache
    # row and last logits once its prompt is in, rather than prefilling it again; open until then.
    followers: list["Request"] = field(default_factory=list, repr=False)
    takes_followers: bool = True
    _prompt_lp: list = field(default_factory=list, repr=False)
    _prompt_top: list = field(default_factory=list, repr=False)

    @property
    def generated(self) -> int:
        return self.sampling.generated if self.sampling else 0


class DecodingThread:
    """The thread that runs the models of a process: every engine given to it decodes on it, one step per turn.

    Why one thread for all of them: OpenMP, PyTorch's CPU threading, keeps a team of worker threads for every thread
    that runs parallel work, and once a process holds more of those workers than it has cores, libgomp stops letting
    them spin between parallel regions. Each of the few hundred small operations of a decoding step then waits for
    its workers to be woken. Measured on the 2-core development machine (124M bf16, 2 torch threads): an engine
    thread decoding while another thread of the process held a team made 42 tokens/s at batch 1 and 428 at 16
    rows; alone, 59 and 587. So a process that serves models keeps its parallel work on this one thread: the
    engines' steps and the allocation of their caches (`call`). Loading a model belongs on a short-lived thread,
    whose team ends with it.

    An engine made without one gets its own, which ends when the engine is closed.
    """

    def __init__(self, threads: int | None = None, *, name: str = "decode", private: bool = False) -> None:
        self.lock = threading.Condition()
        self.threads = threads or torch.get_num_threads()  # OpenMP threads of this thread's parallel work
        self._engines: list[DecodeEngine] = []
        self._calls: list[_Call] = []
        self._private = private  # the thread of one engine: it ends with that engine
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def add(self, engine: "DecodeEngine") -> None:
        with self.lock:
            if not self._thread.is_alive():
                raise EngineUnavailable("the decoding thread is not running")
            self._engines.append(engine)
            self.lock.notify_all()

    def call(self, fn: Callable[[], T]) -> T:
        """fn() run on this thread between two turns; its result, or its exception raised here."""
        if self.is_current():
            return fn()
        call = _Call(fn)
        with self.lock:
            if not self._thread.is_alive():
                raise EngineUnavailable("the decoding thread is not running")
            self._calls.append(call)
            self.lock.notify_all()
        return call.result()

    def _run(self) -> None:
        # OpenMP thread counts are per thread: a new thread starts from OMP_NUM_THREADS (which Ray sets to the
        # replica's CPU count, often 1), not from the torch.set_num_threads of the thread that created it.
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                while True:
                    with self.lock:
                        while True:
                            calls, self._calls = self._calls, []
                            ready = [e for e in self._engines if e._has_work()]
                            if calls or ready:
                                break
                            self.lock.wait()
                    for call in calls:
                        call.run()
                    for engine in ready:  # a step each, so no variant waits for another's whole request
                        engine._turn()
                    with self.lock:
                        had = len(self._engines)
                        self._engines = [e for e in self._engines if not e._ended.is_set()]
                        if self._private and had and not self._engines and not self._calls:
                            return
        except BaseException as e:  # a fault of this loop itself, not of one engine's step: every engine fails
            with self.lock:
                engines, self._engines = list(self._engines), []
                calls, self._calls = self._calls, []
            for engine in engines:
                engine._die(e)
            for call in calls:
                call.fail(EngineUnavailable(f"the decoding thread died ({type(e).__name__}: {e})"))


class _Call:
    """A function to run on the decoding thread, and its outcome for the thread that waits for it."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.done = fn, threading.Event()
        self.value, self.error = None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # raised again in the caller's thread
            self.error = e
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def result(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class DecodeEngine:
    """Continuous-batching decoder for a language model (gpt2.protocols.LanguageModel: a GPT, its quantized or packed
    copies, an EarlyExitGPT); an early-exit one (ExitingModel) decodes with each request's exit threshold.

    max_batch: cache rows, i.e. requests decoded together; more requests wait (up to max_pending) for a free row.
    prefill_tokens: the most token slots (rows × padded width) one prefill pass takes.
    prefix_cache_bytes: how much memory copies of computed prompts may take, for later requests that begin with one
    (serving.prefix_cache; 0: none are kept).
    thread: the DecodingThread it decodes on, shared with other engines; by default a thread of its own.
    """

    def __init__(
        self,
        model: LanguageModel,
        *,
        max_batch: int = 16,
        max_pending: int = 64,
        prefill_tokens: int = 512,
        prefix_cache_bytes: int = 256 * 2**20,
        name: str = "model",
        thread: DecodingThread | None = None,
    ) -> None:
        if max_batch < 1 or max_pending < 0 or prefill_tokens < 1 or prefix_cache_bytes < 0:
            raise ValueError(
                f"max_batch and prefill_tokens must be >= 1, max_pending and prefix_cache_bytes >= 0, got {max_batch},"
                f" {prefill_tokens}, {max_pending} and {prefix_cache_bytes}"
            )
        self.model: LanguageModel = model.eval()
        self.config = model.config
        self.name = name
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.prefill_tokens = prefill_tokens
        self._device = next(model.parameters()).device
        # The same model seen as an early-exit one, or None. isinstance only sees that it has forward_with_exits,
        # exit_layer and threshold (a runtime_checkable protocol), which is all the engine uses.
        self._exiting: ExitingModel | None = model if isinstance(model, ExitingModel) else None
        self._decoding: list[Request] = []  # rows [0, len)
        self._prefilling: list[Request] = []  # the rows after them
        self._pending: collections.deque[Request] = collections.deque()
        self._thread = thread or DecodingThread(name=f"decode-{name}", private=True)
        self._wake = self._thread.lock  # one lock for the thread and every engine on it
        # Allocated (zero-filled: parallel work) on the decoding thread, like everything the engine computes.
        self._cache = self._thread.call(lambda: model.new_kv_cache(max_batch))
        self._prefixes = PrefixCache(prefix_cache_bytes)
        self._ended = threading.Event()  # closed or died: the decoding thread has let go of this engine
        self._ids = itertools.count(1)
        self._closed = False
        self._died: str | None = None  # why the decoding thread died, once it has
        self._drill: str | None = None  # a fault drill's message: the thread dies at its next turn
        self._decode_deferred = False  # the last turn prefilled newcomers in place of the decoding rows' step
        self._counters = collections.Counter()
        self._started = time.monotonic()
        self._thread.add(self)

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
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        same_prompt_as: Request | None = None,
    ) -> Request:
        """Queue a request; raises ValueError for a bad prompt or seed, EngineOverloaded when the queue is full, and
        EngineUnavailable when the engine was closed or its decoding died.

        max_tokens 0 scores the prompt without generating (it needs prompt_logprobs).
        same_prompt_as: an earlier request of this engine with the same prompt (another choice of the same
        completion). While its prompt is not yet in, this one waits for it and then starts from a copy of its cache
        row and its last logits, so the prompt is computed once; otherwise, and when this one scores its prompt
        (prompt_logprobs), it is queued as any request.
        """
        if max_tokens < 0 or (max_tokens == 0 and prompt_logprobs is None):
            raise ValueError(f"max_tokens must be >= 1 (0 only to score the prompt), got {max_tokens}")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
        prompt = check_prompt(prompt, self.config, max_tokens)
        if seed is not None:
            check_seed(seed)
        request = Request(
            prompt, max_tokens, params, on_event, seed, exit_threshold, logprobs, prompt_logprobs, id=next(self._ids)
        )
        with self._wake:
            if self._closed:
                raise EngineUnavailable(f"model {self.name!r} was unloaded; try again")
            if self._died is not None:
                raise EngineUnavailable(f"the decoding of model {self.name!r} died ({self._died}); the replica"
                                        " is being replaced, try again shortly")
            active = len(self._decoding) + len(self._prefilling)
            waiting = len(self._pending) + self._following()
            if active + waiting >= self.max_batch + self.max_pending:
                raise EngineOverloaded(
                    f"model {self.name!r} is busy: {active} requests decoding and {waiting} waiting"
                    f" (limits {self.max_batch} and {self.max_pending}); try again later"
                )
            leader = same_prompt_as
            # A request that scores its prompt computes it itself: its scores come from its own prefill pass. An
            # early-exit threshold of its own would change the prompt's pass.
            if (leader is not None and prompt_logprobs is None and leader.takes_followers and leader.prompt == prompt
                    and leader.exit_threshold == exit_threshold and not leader.cancelled):
                request.takes_followers = False  # one leader for all: followers are never led in turn
                leader.followers.append(request)
            else:
                self._pending.append(request)
            self._wake.notify()
        return request

    @contextlib.contextmanager
    def submitting(self) -> Iterator[None]:
        """Submits made inside are admitted together: the decoding thread starts no turn meanwhile, so the choices
        of one completion are queued before the first one's prompt is prefilled, and share it (same_prompt_as)."""
        with self._wake:
            yield

    def _following(self) -> int:
        """Requests waiting for another one's prompt (called with the lock held)."""
        return sum(len(r.followers) for r in (*self._pending, *self._prefilling))

    def cancel(self, request: Request) -> None:
        """Stop a request at the next token boundary (its row is freed; it gets Finished('cancelled'))."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        """Its decoding died without the engine being closed (a replica health check reports this)."""
        return not self._closed and (self._died is not None or not self._thread.alive)

    def crash_for_drill(self, message: str = "fault drill") -> None:
        """Fault drills only: make this engine's decoding die at its next turn, as an unexpected fatal error would (a
        BaseException outside the per-step error handling). Its requests end with an error; the engine is `failed`;
        other engines on the same decoding thread go on. The server reaches this only with `fault_drills` on
        (serving/app.py, off by default)."""
        with self._wake:
            self._drill = message
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            active = len(self._decoding) + len(self._prefilling)
            pending = len(self._pending) + self._following()
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
            "prefill_passes": c["prefill_passes"],
            "prompt_tokens": c["prompt_tokens"],  # computed, i.e. not lent by the prefix cache
            "prefix_cache": self._prefixes.stats(),
            "uptime_s": time.monotonic() - self._started,
        }

    def close(self) -> None:
        """Stop decoding; running and waiting requests finish as cancelled. Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if not self._thread.is_current():  # from a listener, the turn that follows does it
            self._ended.wait(timeout=30)

    # ---- engine thread ----

    def _has_work(self) -> bool:
        """Whether a turn has anything to do (called with the lock held)."""
        if self._ended.is_set():
            return False
        return bool(self._closed or self._drill is not None or self._pending or self._decoding or self._prefilling)

    def _turn(self) -> None:
        """One step: admit waiting requests, prefill, decode one token for every decoding row; or close."""
        try:
            with self._wake:
                closing = self._closed
                if self._drill is not None and not closing:
                    raise FaultDrill(self._drill)
                free = self.max_batch - len(self._decoding) - len(self._prefilling) - self._reserved_rows()
                admitted = []
                while not closing and free > 0 and self._pending:
                    admitted.append(self._pending.popleft())
                    free -= 1 + len(admitted[-1].followers)
            if closing:  # submit refuses from now on, so nothing joins the queue while it is emptied
                self._close_now()
                return
            for request in admitted:
                try:
                    self._admit(request)
                except Exception as e:  # this request's own fault (e.g. its settings): only it fails
                    log.exception("admitting request %d to %s failed", request.id, self.name)
                    if request in self._prefilling:
                        self._finish(request, Finished("error", f"{type(e).__name__}: {e}"))
                    else:
                        self._requeue_followers(request)
                        self._count_finished(Finished("error"))
                        self._emit(request, Finished("error", f"{type(e).__name__}: {e}"))
            try:
                self._drop_cancelled()
                if self._prefilling:
                    self._prefill_step()
                    if self._decoding and not self._decode_deferred and self._can_admit():
                        # Requests came during that pass: their prefill goes next, before the decoding rows' step
                        # (once in a row, so decoding never starves). Requests that arrive together, as a closed
                        # loop's do, then wait for two passes over the weights instead of three.
                        self._decode_deferred = True
                        return
                if self._decoding:
                    self._decode_deferred = False
                    self._decode_step()
            except Exception as e:  # a failed pass must not leave callers waiting forever
                log.exception("decoding step of %s failed", self.name)
                for request in [*self._decoding, *self._prefilling]:
                    self._finish(request, Finished("error", f"{type(e).__name__}: {e}"))
        except BaseException as e:  # this engine's decoding dies; its callers must not wait for events never coming
            self._die(e)

    def _reserved_rows(self) -> int:
        """Rows that the followers of prefilling requests will take: they count as taken (called with the lock held)."""
        return sum(len(r.followers) for r in self._prefilling)

    def _can_admit(self) -> bool:
        with self._wake:
            taken = len(self._decoding) + len(self._prefilling) + self._reserved_rows()
            return bool(self._pending) and taken < self.max_batch

    def _close_now(self) -> None:
        """Closed: running and waiting requests finish as cancelled, and the decoding thread lets go of it."""
        for request in [*self._decoding, *self._prefilling]:  # their followers join the waiting requests
            self._finish(request, Finished("cancelled", "the engine was closed"))
        for request in [*self._pending, *(f for r in self._pending for f in self._take_followers(r))]:
            self._emit(request, Finished("cancelled", "the engine was closed"))
        self._pending.clear()
        self._prefixes.clear()
        self._ended.set()

    def _die(self, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        log.critical("the decoding of %s died (%s)", self.name, reason, exc_info=error)
        with self._wake:  # from here on submit refuses: nothing can be queued after the queue is emptied below
            self._died = reason
            waiting = [*self._decoding, *self._prefilling, *self._pending]
            waiting += [f for r in waiting for f in r.followers]
            self._decoding, self._prefilling = [], []
            self._pending.clear()
        # The cache's state is unknown after a fatal error: the requests are told, their rows are not released.
        event = Finished("error", f"the decoding of model {self.name!r} died ({reason})", unavailable=True)
        for request in waiting:
            self._count_finished(event)
            self._emit(request, event)
        self._prefixes.clear()
        # `failed` is now true, the replica's health check fails, and Serve replaces the replica.
        self._ended.set()

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            self._requeue_followers(request)
            self._count_finished(Finished("cancelled"))
            self._emit(request, Finished("cancelled"))
            return
        request.sampling = SequenceSampling(request.params, request.prompt, request.seed, request.logprobs)
        if self._exiting is not None and request.exit_threshold is None:
            # Every pass of the request then exits alike, even if the model's default changes meanwhile; and its
            # kept prompt is filed under the threshold it was computed with.
            request.exit_threshold = float(self._exiting.threshold)
        request.row = len(self._decoding) + len(self._prefilling)
        self._cache.reset_rows(request.row)
        self._prefilling.append(request)
        self._borrow_prompt(request)

    def _borrow_prompt(self, request: Request) -> None:
        """Start from the longest kept beginning of the prompt (serving.prefix_cache), when there is one. The cache is
        an optimisation: if lending fails (e.g. out of memory), the request computes its whole prompt."""
        try:
            borrowed = self._prefixes.lend(self._cache, request.row, request.prompt, request.exit_threshold,
                                           request.prompt_logprobs)
        except Exception:
            log.exception("the prefix cache of %s failed to lend a prompt; it is emptied", self.name)
            self._prefixes.clear()
            self._cache.reset_rows(request.row)
            return
        if borrowed is not None:
            request.prefilled = borrowed.length
            if borrowed.logprobs is not None:
                request._prompt_lp, request._prompt_top = borrowed.logprobs, borrowed.top

    def _keep_prompt(self, request: Request) -> None:
        """Keep a copy of a prompt that is in, for later requests that begin with it; failing that (e.g. out of
        memory), go on without it."""
        try:
            self._prefixes.keep(self._cache, request.row, request.prompt, request.exit_threshold,
                                request.prompt_logprobs, request._prompt_lp, request._prompt_top)
        except Exception:
            log.exception("the prefix cache of %s failed to keep a prompt; it is emptied", self.name)
            self._prefixes.clear()

    def _drop_cancelled(self) -> None:
        for request in [r for r in (*self._decoding, *self._prefilling) if r.cancelled]:
            self._finish(request, Finished("cancelled"))

    def _prefill_step(self) -> None:
        """One left-padded pass over the next chunk of the first prefilling rows (at most prefill_tokens slots)."""
        # The pass is rows × width slots: the width is the longest remaining prompt (capped), and as many of the
        # first rows as fit take a chunk of up to that width. Rows must be the first ones: passes run on a
        # contiguous block of cache rows.
        remaining = [len(r.prompt) - r.prefilled for r in self._prefilling]
        cap = min(max(remaining), self.prefill_tokens)
        count = max(1, self.prefill_tokens // cap)
        batch = [(r, min(n, cap)) for r, n in zip(self._prefilling[:count], remaining)]
        width = max(n for _, n in batch)
        first = self._prefilling[0].row
        idx = torch.full((len(batch), width), EOT_TOKEN, dtype=torch.long)  # (R, W) left-padded
        for r, (request, n) in enumerate(batch):
            idx[r, width - n :] = torch.tensor(request.prompt[request.prefilled : request.prefilled + n])
        new = torch.tensor([n for _, n in batch], device=self._device)
        rows = [request for request, _ in batch]
        scoring = any(r.prompt_logprobs is not None for r in rows)
        cache = self._cache.rows(first, first + len(batch), new_tokens=new)
        logits, exited = self._forward(idx.to(self._device), cache, rows, last_only=not scoring)  # (R, W or 1, V)
        self._counters["prefill_passes"] += 1
        self._counters["prompt_tokens"] += int(new.sum())

        done = []
        for r, (request, n) in enumerate(batch):
            if request.prompt_logprobs is not None:
                self._score_prompt_chunk(request, logits[r, width - n :])
            request.prefilled += n
            if request.prefilled == len(request.prompt):
                done.append(r)
        if not done:
            return
        for r in done:
            request = rows[r]
            self._keep_prompt(request)
            if request.prompt_logprobs is not None:
                self._emit(request, PromptLogprobs(request._prompt_lp, request._prompt_top))
        # Each starting row with the pass row whose last logits it samples from: its own, or its leader's.
        starting = [(rows[r], r) for r in done if rows[r].max_tokens > 0]
        starting += [(follower, r) for r in done for follower in self._seat_followers(rows[r])]
        for r in done:
            if rows[r].max_tokens == 0:  # scored, nothing to generate
                self._finish(rows[r], Finished("length"))
        if starting:
            at = [r for _, r in starting]
            last = logits[at, -1]  # (S, V) the prompt's last position predicts the first new token
            flags = exited[at, -1].tolist() if exited is not None else [None] * len(starting)
            self._sample_and_accept([request for request, _ in starting], last, flags)
        for request, _ in starting:
            if request.row >= 0 and request in self._prefilling:
                self._promote(request)

    def _take_followers(self, leader: Request) -> list[Request]:
        with self._wake:
            leader.takes_followers = False
            followers, leader.followers = leader.followers, []
        return followers

    def _seat_followers(self, leader: Request) -> list[Request]:
        """The leader's prompt is in: each of its followers gets a row holding a copy of the leader's, the prompt
        then counting as prefilled. Followers that find no free row (rows taken since) wait at the front of the
        queue and will prefill the prompt themselves; cancelled ones end."""
        seated, back = [], []
        for follower in self._take_followers(leader):
            if follower.cancelled:
                self._count_finished(Finished("cancelled"))
                self._emit(follower, Finished("cancelled"))
            elif len(self._decoding) + len(self._prefilling) >= self.max_batch:
                back.append(follower)
            else:
                try:
                    follower.sampling = SequenceSampling(follower.params, follower.prompt, follower.seed,
                                                         follower.logprobs)
                except Exception as e:  # this request's own settings: only it fails
                    log.exception("admitting request %d to %s failed", follower.id, self.name)
                    self._count_finished(Finished("error"))
                    self._emit(follower, Finished("error", f"{type(e).__name__}: {e}"))
                    continue
                follower.row = len(self._decoding) + len(self._prefilling)
                follower.exit_threshold = leader.exit_threshold  # as resolved when the leader was admitted
                self._cache.move_row(leader.row, follower.row)
                follower.prefilled = len(follower.prompt)
                self._prefilling.append(follower)
                seated.append(follower)
        with self._wake:
            self._pending.extendleft(reversed(back))
        return seated

    def _requeue_followers(self, leader: Request) -> None:
        """A leader that ends before its prompt is in: its followers go to the front of the queue, to prefill the
        prompt themselves."""
        followers = self._take_followers(leader)
        with self._wake:
            self._pending.extendleft(reversed(followers))

    def _score_prompt_chunk(self, request: Request, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens that this chunk's positions (n, V) predict."""
        start = request.prefilled
        if start == 0:
            request._prompt_lp.append(None)  # nothing predicts the first token
            request._prompt_top.append(None)
        targets = request.prompt[start + 1 : start + 1 + logits.shape[0]]
        if not targets:
            return
        lp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)  # (n', V)
        target = torch.tensor(targets, device=lp.device)
        request._prompt_lp.extend(lp.gather(1, target[:, None]).squeeze(1).tolist())
        k = request.prompt_logprobs
        if k:
            values, ids = lp.topk(k, dim=-1)
            request._prompt_top.extend(tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist()))
        else:
            request._prompt_top.extend(() for _ in targets)

    def _decode_step(self) -> None:
        rows = list(self._decoding)
        feed = torch.tensor([[r.next_token] for r in rows], device=self._device)  # (B, 1)
        logits, exited = self._forward(feed, self._cache.rows(0, len(rows)), rows, last_only=True)  # (B, 1, V)
        self._counters["steps"] += 1
        self._counters["step_rows"] += len(rows)
        flags = exited[:, -1].tolist() if exited is not None else [None] * len(rows)
        self._sample_and_accept(rows, logits[:, -1], flags)

    def _forward(self, idx: torch.Tensor, cache, rows: list[Request], last_only: bool):
        """Logits (B, T', V), and the per-position exit decisions (B, T) of early-exit models (else None)."""
        if self._exiting is not None:  # every row's threshold was resolved when it was admitted (or seated)
            thresholds = torch.tensor([r.exit_threshold for r in rows], device=self._device)
            return self._exiting.forward_with_exits(idx, kv_cache=cache, last_only=last_only, threshold=thresholds)
        logits, _ = self.model(idx, kv_cache=cache, last_only=last_only)
        return logits, None

    def _sample_and_accept(self, rows: list[Request], logits: torch.Tensor, exited: list) -> None:
        tokens, logprobs = choose(logits, [r.sampling for r in rows])
        for request, token, lp, flag in zip(rows, tokens, logprobs, exited):
            if token in request.params.stop_tokens:
                self._counters["tokens"] += 1
                self._emit(request, Token(token, flag, lp, stop=True))
                self._finish(request, Finished("stop", stop_token=None if token == EOT_TOKEN else token))
                continue
            request.sampling.record(token)
            request.exited += bool(flag)
            request.next_token = token
            self._counters["tokens"] += 1
            self._emit(request, Token(token, flag, lp))
            if request.generated >= request.max_tokens:
                self._finish(request, Finished("length"))

    # ---- rows: decoding rows first, then prefilling rows, no gaps ----

    def _promote(self, request: Request) -> None:
        """A prefilling row whose prompt is in becomes the last decoding row."""
        head = self._prefilling[0]
        if head is not request:  # take the first prefilling row's place, which is right after the decoding rows
            self._cache.swap_rows(head.row, request.row)
            i = self._prefilling.index(request)
            head.row, request.row = request.row, head.row
            self._prefilling[0], self._prefilling[i] = request, head
        self._prefilling.pop(0)
        self._decoding.append(request)

    def _release(self, request: Request) -> None:
        """Free a request's row, moving the last row of its block into it so the blocks stay packed."""
        if request.row < 0:
            return
        block = self._decoding if request.row < len(self._decoding) else self._prefilling
        last = block.pop()
        if last is not request:
            self._cache.move_row(last.row, request.row)
            last.row = request.row
            block[block.index(request)] = last
        if block is self._decoding and self._prefilling:  # the prefilling block moves down by one row
            tail = self._prefilling.pop()
            if tail.row != len(self._decoding):
                self._cache.move_row(tail.row, len(self._decoding))
                tail.row = len(self._decoding)
            self._prefilling.insert(0, tail)
        request.row = -1

    def _finish(self, request: Request, event: Finished) -> None:
        self._requeue_followers(request)
        self._release(request)
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
