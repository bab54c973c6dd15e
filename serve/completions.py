"""From model events to OpenAI responses: running one completion request on a decoding engine (model replica side),
and turning its events into a JSON response or server-sent events (gateway side).

Events are plain dicts so they cross Ray process boundaries: {"event": "start" | "text" | "finish" | "error" | "end"}.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi.responses import JSONResponse

from serve.protocol import APIError, CompletionRequest, StopText, chunk, response


async def run_completion(engine, req: CompletionRequest):
    """Events for one request (see ModelServer.complete): submits every choice to the engine, applies stop strings,
    and frees the decoding rows when the consumer goes away."""
    from gpt2.generate import SamplingParams, check_prompt
    from gpt2.tokenizer import get_tokenizer
    from serve.engine import EngineOverloaded, Finished, Token

    enc = get_tokenizer()
    prompts = [p if isinstance(p, list) else enc.encode(p, allowed_special={"<|endoftext|>"}) for p in req.prompts()]
    try:
        for i, p in enumerate(prompts):
            check_prompt(p, engine.config, req.max_tokens)
    except ValueError as e:
        where = f"prompt {i}: " if len(prompts) > 1 else ""
        yield {"event": "error", "status": 400, "message": where + str(e), "param": "prompt"}
        return
    params = SamplingParams(float(req.temperature), req.top_k, float(req.top_p))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def listener(index: int):
        def on_event(event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))

        return on_event

    choices = [(p, i) for p in prompts for i in range(req.n)]  # OpenAI order: all n of prompt 0, then prompt 1, ...
    texts = [StopText(req.stops()) for _ in choices]
    handles, finished = [], [False] * len(choices)
    counts, exits = [0] * len(choices), [0] * len(choices)
    try:
        for index, (prompt, i) in enumerate(choices):
            seed = None if req.seed is None else req.seed + i
            threshold = None if req.early_exit_threshold is None else float(req.early_exit_threshold)
            handles.append(
                engine.submit(prompt, req.max_tokens, params, listener(index), seed=seed, exit_threshold=threshold)
            )
    except EngineOverloaded as e:
        for h in handles:
            engine.cancel(h)
        yield {"event": "error", "status": 503, "message": str(e)}
        return
    yield {"event": "start", "prompt_tokens": sum(len(p) for p in prompts), "choices": len(choices)}
    started = time.perf_counter()
    try:
        while not all(finished):
            index, event = await events.get()
            if finished[index]:
                continue
            if isinstance(event, Token):
                counts[index] += 1
                exits[index] += bool(event.exited)
                piece = texts[index].push(event.id)
                if piece:
                    yield {"event": "text", "index": index, "text": piece}
                if texts[index].stopped:  # a stop string ended this choice; free its decoding row now
                    engine.cancel(handles[index])
                    finished[index] = True
                    yield {"event": "finish", "index": index, "reason": "stop"}
            elif isinstance(event, Finished):
                finished[index] = True
                if event.reason == "error":
                    yield {"event": "error", "status": 500, "message": f"generation failed: {event.error}"}
                    return
                tail = texts[index].flush()
                if tail:
                    yield {"event": "text", "index": index, "text": tail}
                yield {"event": "finish", "index": index, "reason": "stop" if event.reason == "stop" else "length"}
    finally:  # also on cancellation (the client went away): free every row this request still holds
        for index, h in enumerate(handles):
            if not finished[index]:
                engine.cancel(h)
    elapsed = time.perf_counter() - started
    generated = sum(counts)
    end = {
        "event": "end",
        "usage": {
            "prompt_tokens": sum(len(p) for p in prompts),
            "completion_tokens": generated,
            "total_tokens": sum(len(p) for p in prompts) + generated,
        },
        "tokens_per_s": generated / elapsed if elapsed > 0 else None,
    }
    if hasattr(engine.model, "forward_with_exits"):
        end["early_exit"] = {
            "exit_layer": engine.model.exit_layer,
            "threshold": req.early_exit_threshold if req.early_exit_threshold is not None else engine.model.threshold,
            "tokens": generated,
            "exited": sum(exits),
            "exit_rate": sum(exits) / generated if generated else 0.0,
        }
    yield end


async def held_until_finish(events):
    """The events of a request that is not streamed, with each choice's text held on the model replica and sent in
    one piece just before its 'finish': the completion then crosses to the gateway in a handful of messages instead
    of one per token, which on a small machine leaves those cycles to decoding."""
    held: dict[int, list[str]] = {}
    async for event in events:
        if event["event"] == "text":
            held.setdefault(event["index"], []).append(event["text"])
            continue
        if event["event"] == "finish" and event["index"] in held:
            yield {"event": "text", "index": event["index"], "text": "".join(held.pop(event["index"]))}
        yield event


async def collect_response(events, cid: str, model: str, n_choices: int) -> JSONResponse:
    """A whole (non-streamed) OpenAI completion response from the model events."""
    texts, reasons = [""] * n_choices, ["length"] * n_choices
    async for event in _guarded(events):
        kind = event["event"]
        if kind == "text":
            texts[event["index"]] += event["text"]
        elif kind == "finish":
            reasons[event["index"]] = event["reason"]
        elif kind == "error":
            return JSONResponse(APIError(event["status"], event["message"]).body(), status_code=event["status"])
        elif kind == "end":
            extra = {k: event[k] for k in ("early_exit",) if k in event}
            return JSONResponse(response(cid, model, texts, reasons, event["usage"], extra))
    return JSONResponse(APIError(500, "the model stream ended early").body(), status_code=500)


async def sse_stream(events, cid: str, model: str, include_usage: bool):
    """Server-sent events in the OpenAI chunk format, ending with [DONE]."""
    created = int(time.time())

    def line(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        async for event in _guarded(events):
            kind = event["event"]
            if kind == "text":
                yield line(chunk(cid, created, model, event["index"], event["text"], None))
            elif kind == "finish":
                yield line(chunk(cid, created, model, event["index"], "", event["reason"]))
            elif kind == "error":
                yield line(APIError(event["status"], event["message"]).body())
                break
            elif kind == "end" and include_usage:
                final = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": []}
                final["usage"] = event["usage"]
                final.update({k: event[k] for k in ("early_exit", "tokens_per_s") if k in event})
                yield line(final)
        yield "data: [DONE]\n\n"
    finally:
        # The client disconnected (or we finished): cancelling the stream cancels the replica's generator, whose
        # cleanup frees the decoding rows at the next token boundary.
        events.cancel()


async def _guarded(events):
    """The model events, with a failure of the model replica mid-stream (it died, Serve is replacing it) turned
    into an error event, so the client always gets a well-formed answer."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # RayActorError and friends: all the client can do is retry
        yield {"event": "error", "status": 503,
               "message": f"the model replica failed during generation ({type(e).__name__}); retry"}
