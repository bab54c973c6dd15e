"""From model events to OpenAI responses: running one completion request on a decoding engine, and turning its events
into a JSON response or server-sent events.

Events are plain dicts: {"event": "start" | "text" | "finish" | "error" | "end"}. They come in batches (lists): what
a streamed batch becomes is one message from the replica to Serve's HTTP proxy, which costs far more than the
events in it, so a stream's events go together when they come close in time (`run_completion`'s `batch_s`); the
first batch holds only the 'start' or 'error' event, and the first token is never held back.
A "text" event may carry "logprobs" (OpenAI's completions logprobs object for the tokens it covers); a "finish" event
carries "reason" (stop | length) and "stop_reason" (the stop string or stop token id that ended it, else None).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import weakref

from fastapi.responses import JSONResponse

from gpt2.protocols import ExitingModel
from serving.protocol import (
    APIError,
    CompletionRequest,
    Limits,
    StopMatcher,
    StopText,
    chunk,
    fit_prompt,
    logprobs_block,
    merge_logprobs,
    response,
)

log = logging.getLogger("ray.serve")


class _Pump:
    """Hands engine events to the event loop with at most one wake-up of the loop per batch of events.

    The decoding thread produces one event per request per decoding step; waking the loop for each of them costs a
    system call and a context switch apiece, which on a 2-core machine is taken from decoding."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a wake-up is already on its way
                return
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_pumps: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pump]" = weakref.WeakKeyDictionary()


def _pump() -> _Pump:
    loop = asyncio.get_running_loop()
    pump = _pumps.get(loop)
    if pump is None:
        pump = _pumps[loop] = _Pump(loop)
    return pump


class _Choice:
    """One completion of a request: its text so far (after stop strings), its logprobs offset, its engine handle."""

    def __init__(self, index: int, prompt: list[int], prompt_text: str, matcher: StopMatcher, req: CompletionRequest):
        self.index, self.prompt, self.prompt_text = index, prompt, prompt_text
        self.text = StopText(matcher, req.include_stop_str_in_output)
        self.offset = len(prompt_text) if req.echo else 0  # text_offset of the next token
        self.handle = None
        self.finished = False
        self.tokens = 0
        self.exits = 0
        self.echoed = False  # with echo + logprobs: whether the prompt and its scores have been sent
        self.held: list = []  # this choice's events that arrived before its prompt's scores


def _generation_failed(finished) -> dict:
    if finished.unavailable:  # the engine went away (its decoding died), not this request's fault: retry
        return {"event": "error", "status": 503, "code": "unavailable",
                "message": f"generation failed: {finished.error}; retry shortly"}
    return {"event": "error", "status": 500, "message": f"generation failed: {finished.error}"}


def submit_choices(engine, choices: list[_Choice], req: CompletionRequest, params, listener) -> None:
    """Every choice that generates or scores to the engine, in OpenAI's order (all n of prompt 0, then prompt 1, ...);
    the later choices of a prompt share the first one's prefill."""
    wants_prompt_lp = req.echo and req.logprobs is not None
    first_with: dict[tuple, object] = {}  # prompt → its first choice's handle
    for c in choices:
        i = c.index % req.n
        if req.max_tokens == 0 and not (wants_prompt_lp and i == 0):
            continue  # nothing to generate: the echo (with the prompt's one scoring pass) is the whole answer
        c.handle = engine.submit(
            c.prompt, req.max_tokens, params, listener(c.index),
            seed=None if req.seed is None else req.seed + i,
            exit_threshold=None if req.early_exit_threshold is None else float(req.early_exit_threshold),
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if wants_prompt_lp and i == 0 else None,  # scored once per prompt
            same_prompt_as=first_with.get(tuple(c.prompt)),
        )
        first_with.setdefault(tuple(c.prompt), c.handle)


async def run_completion(engine, req: CompletionRequest, limits: Limits, batch_s: float = 0.0):
    """Batches (lists) of events for one request (see ModelPool.complete): submits every choice to the engine,
    applies stop strings, and frees the decoding rows when the consumer goes away or the request's deadline passes.

    batch_s: how long an event may wait for later ones to share its batch. The first batch is the 'start' (or
    'error') event alone, the first token goes out at once, and the events that are ready together always share a
    batch; 0 sends each batch as soon as it is ready."""
    from gpt2.generate import check_prompt
    from gpt2.tokenizer import get_tokenizer
    from serving.engine import EngineOverloaded, EngineUnavailable, Finished, PromptLogprobs, Token

    enc = get_tokenizer()
    given = [p if isinstance(p, list) else enc.encode(p, allowed_special={"<|endoftext|>"}) for p in req.prompts()]
    prompts = []
    try:
        for i, p in enumerate(given):
            prompts.append(fit_prompt(p, req, engine.config.block_size))
            check_prompt(prompts[-1], engine.config, req.max_tokens)  # the token ids
    except (APIError, ValueError) as e:
        where = f"prompt {i}: " if len(given) > 1 else ""
        param = e.param if isinstance(e, APIError) else "prompt"
        yield [{"event": "error", "status": 400, "message": where + str(e), "param": param}]
        return
    deadline = time.monotonic() + limits.request_timeout_s
    params = req.sampling_params()
    # A long stop string's table is built off the event loop: other requests' events keep flowing meanwhile.
    stops = req.stops()
    matcher = await asyncio.to_thread(StopMatcher, stops) if sum(map(len, stops)) > 10_000 else StopMatcher(stops)
    texts = [p if isinstance(p, str) and len(fit) == len(whole) else enc.decode(fit, errors="replace")
             for p, whole, fit in zip(req.prompts(), given, prompts)]
    choices = [_Choice(j * req.n + i, p, texts[j], matcher, req) for j, p in enumerate(prompts) for i in range(req.n)]
    pump = _pump()
    events: asyncio.Queue = asyncio.Queue()

    def listener(index: int):
        return lambda event: pump.put(events, (index, event))

    wants_prompt_lp = req.echo and req.logprobs is not None
    try:
        with engine.submitting():
            submit_choices(engine, choices, req, params, listener)
    except (EngineOverloaded, EngineUnavailable, ValueError) as e:
        for c in choices:
            if c.handle is not None:
                engine.cancel(c.handle)
        if isinstance(e, ValueError):  # a setting the engine refuses (the request checks let it through)
            yield [{"event": "error", "status": 400, "message": str(e)}]
        else:
            code = "overloaded" if isinstance(e, EngineOverloaded) else "unavailable"
            yield [{"event": "error", "status": 503, "message": str(e), "code": code}]
        return
    yield [{"event": "start", "prompt_tokens": sum(len(p) for p in prompts), "choices": len(choices)}]
    batch: list[dict] = []  # events not sent yet
    if req.echo and not wants_prompt_lp:
        for c in choices:
            batch.append({"event": "text", "index": c.index, "text": c.prompt_text})
            if c.handle is None:  # max_tokens 0: the echoed prompt is all there is
                c.finished = True
                batch.append({"event": "finish", "index": c.index, "reason": "length", "stop_reason": None})
    started = time.perf_counter()

    def on_event(c: _Choice, event) -> list[dict]:
        """What one engine event of choice c sends to the client."""
        if isinstance(event, PromptLogprobs):  # the prompt's scores, computed once and echoed by all n choices
            block, _ = logprobs_block(c.prompt, event.logprobs, event.top, 0)
            group = choices[c.index - c.index % req.n: c.index - c.index % req.n + req.n]
            out = []
            for other in group:
                other.echoed = True
                out.append({"event": "text", "index": other.index, "text": other.prompt_text, "logprobs": block})
                for held in other.held:
                    out.extend(on_event(other, held))
                other.held.clear()
                if other.handle is None:  # a scoring-only choice that the first one answered
                    other.finished = True
                    out.append({"event": "finish", "index": other.index, "reason": "length", "stop_reason": None})
            return out
        if wants_prompt_lp and not c.echoed:  # this choice's echo comes with its prompt's scores: wait for them
            if isinstance(event, Finished) and event.reason in ("error", "cancelled"):
                # Ended before its prompt was scored (a failed pass, or the model unloaded): no scores will come.
                c.finished = True
                if event.reason == "error":
                    return [_generation_failed(event)]
                return [{"event": "error", "status": 503, "code": "unavailable",
                         "message": "the model was unloaded before the prompt was scored; try again"}]
            c.held.append(event)
            return []
        if c.finished:
            return []
        if isinstance(event, Token):
            c.tokens += 1
            c.exits += bool(event.exited)
            piece = "" if event.stop else c.text.push(event.id)
            out = {"event": "text", "index": c.index, "text": piece}
            if event.logprobs is not None:
                lp = event.logprobs
                out["logprobs"], c.offset = logprobs_block([event.id], [lp.logprob], [lp.top], c.offset)
            sent = [out] if piece or "logprobs" in out else []
            if c.text.stopped is not None:  # a stop string ended this choice; free its decoding row now
                engine.cancel(c.handle)
                c.finished = True
                sent.append({"event": "finish", "index": c.index, "reason": "stop", "stop_reason": c.text.stopped})
            return sent
        if isinstance(event, Finished):
            c.finished = True
            if event.reason == "error":
                return [_generation_failed(event)]
            tail = c.text.flush()
            sent = [{"event": "text", "index": c.index, "text": tail}] if tail else []
            reason = "stop" if event.reason == "stop" else "length"
            return sent + [{"event": "finish", "index": c.index, "reason": reason, "stop_reason": event.stop_token}]
        return []

    first_token = True  # the first generated text goes out at once: it is the time to first token
    send_at = None  # when the held events must go
    try:
        while not all(c.finished for c in choices):
            now = time.monotonic()
            if batch and (send_at is None or now >= send_at):
                yield batch
                batch, send_at = [], None
                continue
            wait = deadline - now if send_at is None else min(deadline, send_at) - now
            try:
                ready = [await asyncio.wait_for(events.get(), timeout=max(0.0, wait))]
            except asyncio.TimeoutError:
                if time.monotonic() < deadline:
                    continue  # time to send the held events
                # The request ran out of time: what it has is its answer.
                for c in choices:
                    if not c.finished:
                        if c.handle is not None:
                            engine.cancel(c.handle)
                        c.finished = True
                        tail = c.text.flush()
                        if tail:
                            batch.append({"event": "text", "index": c.index, "text": tail})
                        batch.append({"event": "finish", "index": c.index, "reason": "length", "stop_reason": None})
                break
            while not events.empty():  # every event that is already here joins this batch
                ready.append(events.get_nowait())
            for index, event in ready:
                for out in on_event(choices[index], event):
                    batch.append(out)
                    if out["event"] == "error":
                        yield batch
                        return
            if batch and send_at is None:
                generated = any(e["event"] == "text" and e["text"] for e in batch)
                send_at = time.monotonic() + (0.0 if first_token and generated else batch_s)
                first_token = first_token and not generated
    finally:  # also on cancellation (the client went away): free every row this request still holds
        for c in choices:
            if not c.finished and c.handle is not None:
                engine.cancel(c.handle)
    elapsed = time.perf_counter() - started
    generated = sum(c.tokens for c in choices)
    prompt_tokens = sum(len(p) for p in prompts)
    end = {
        "event": "end",
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                  "total_tokens": prompt_tokens + generated},
        "tokens_per_s": generated / elapsed if elapsed > 0 else None,
    }
    if isinstance(engine.model, ExitingModel):  # checks only that exit_layer, threshold, forward_with_exits exist
        exited = sum(c.exits for c in choices)
        end["early_exit"] = {
            "exit_layer": engine.model.exit_layer,
            "threshold": req.early_exit_threshold if req.early_exit_threshold is not None else engine.model.threshold,
            "tokens": generated,
            "exited": exited,
            "exit_rate": exited / generated if generated else 0.0,
        }
    yield batch + [end]


async def collect_response(batches, cid: str, model: str, n_choices: int, logprobs: bool = False) -> JSONResponse:
    """A whole (non-streamed) OpenAI completion response from the model's event batches."""
    texts: list[list[str]] = [[] for _ in range(n_choices)]
    blocks: list[list[dict]] = [[] for _ in range(n_choices)]
    finish = [{"finish_reason": "length", "stop_reason": None} for _ in range(n_choices)]
    async with contextlib.aclosing(batches):  # also when the client goes away: the request's rows are freed
        async for event in _events_of(_guarded(batches)):
            kind = event["event"]
            if kind == "text":
                texts[event["index"]].append(event["text"])
                if "logprobs" in event:
                    blocks[event["index"]].append(event["logprobs"])
            elif kind == "finish":
                finish[event["index"]] = {"finish_reason": event["reason"], "stop_reason": event.get("stop_reason")}
            elif kind == "error":
                error = APIError(event["status"], event["message"], code=event.get("code"))
                return JSONResponse(error.body(), status_code=event["status"])
            elif kind == "end":
                choices = [
                    {"text": "".join(t), "logprobs": merge_logprobs(b) if logprobs else None, **f}
                    for t, b, f in zip(texts, blocks, finish)
                ]
                extra = {k: event[k] for k in ("early_exit",) if k in event}
                return JSONResponse(response(cid, model, choices, event["usage"], extra))
    return JSONResponse(APIError(500, "the model stream ended early").body(), status_code=500)


async def sse_stream(batches, cid: str, model: str, include_usage: bool):
    """Server-sent events in the OpenAI chunk format, ending with [DONE]: one chunk per token as always, and the
    chunks of one batch written together (one message on to the HTTP proxy instead of one per chunk)."""
    created = int(time.time())

    def line(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        async for batch in _guarded(batches):
            lines, failed = [], False
            for event in batch:
                kind = event["event"]
                if kind == "text":
                    lines.append(line(chunk(cid, created, model, event["index"], event["text"], None,
                                            event.get("logprobs"))))
                elif kind == "finish":
                    lines.append(line(chunk(cid, created, model, event["index"], "", event["reason"],
                                            stop_reason=event.get("stop_reason"))))
                elif kind == "error":  # after the 200 and the first chunks: an OpenAI error object, then [DONE]
                    lines.append(line(APIError(event["status"], event["message"], code=event.get("code")).body()))
                    failed = True
                    break
                elif kind == "end" and include_usage:
                    final = {"id": cid, "object": "text_completion", "created": created, "model": model,
                             "choices": []}
                    final["usage"] = event["usage"]
                    final.update({k: event[k] for k in ("early_exit", "tokens_per_s") if k in event})
                    lines.append(line(final))
            if lines:
                yield "".join(lines)
            if failed:
                break
        yield "data: [DONE]\n\n"
    finally:
        # The client disconnected (or we finished): closing the stream runs the request's cleanup, which frees its
        # decoding rows at the next token boundary.
        await batches.aclose()


async def _guarded(batches):
    """The model's event batches, with a failure of the serving code mid-stream turned into an error event, so the
    client always gets a well-formed answer."""
    try:
        async for batch in batches:
            yield batch
    except Exception as e:
        log.exception("completion stream failed")
        yield [{"event": "error", "status": 500, "code": "internal_error",
                "message": f"generation failed ({type(e).__name__}: {e})"}]


async def _events_of(batches):
    async for batch in batches:
        for event in batch:
            yield event
