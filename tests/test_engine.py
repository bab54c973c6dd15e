"""The continuous-batching engine and the protocol helpers, without Ray: the model-level guarantees the server relies on."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from gpt2 import EOT_TOKEN, GPT, preset
from gpt2.generate import SamplingParams, generate
from gpt2.tokenizer import get_tokenizer
from serve.engine import DecodeEngine, EngineOverloaded, Finished, Token
from serve.protocol import APIError, CompletionRequest, Limits, StopText, check_request


class Collector:
    """Gathers one request's events and lets the test wait for its end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finished: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Token):
            self.tokens.append(event.id)
        else:
            self.finished = event
            self.done.set()

    def wait(self, timeout: float = 60) -> "Collector":
        assert self.done.wait(timeout), "request did not finish"
        return self


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(preset("tiny")).eval()


@pytest.fixture
def engine(model):
    e = DecodeEngine(model, max_batch=4, max_pending=16)
    yield e
    e.close()


PROMPTS = [[464, 1893, 318], [15496, 995], [40, 588, 257, 1310, 286, 3290, 13], [50, 51, 52, 53]]


def test_greedy_equals_generate(model, engine):
    c = Collector()
    engine.submit(PROMPTS[0], 20, SamplingParams(temperature=0), c)
    assert c.wait().tokens == generate(model, PROMPTS[0], 20, temperature=0)[0]
    assert c.finished.reason in ("length", "stop")


def test_concurrent_requests_each_equal_their_own_generation(model, engine):
    """More requests than rows, different prompt lengths and seeds: every one equals its solo generation."""
    collectors = []
    for i, prompt in enumerate(PROMPTS + PROMPTS[:3]):
        c = Collector()
        engine.submit(prompt, 15 + i, SamplingParams(temperature=0.9, top_k=40), c, seed=100 + i)
        collectors.append((prompt, 15 + i, 100 + i, c))
    for prompt, n, seed, c in collectors:
        expected = generate(model, prompt, n, temperature=0.9, top_k=40, seed=seed)[0]
        assert c.wait().tokens == expected
    stats = engine.stats()
    assert stats["active"] == 0 and stats["pending"] == 0
    assert stats["mean_batch"] > 1, "concurrent requests should have shared decoding steps"
    assert stats["requests_finished"] == len(collectors)


def test_end_of_text_finishes_with_stop(model):
    # A model that always predicts <|endoftext|>: ln_f outputs the EOT embedding, and the tied head scores it highest.
    m = GPT(preset("tiny")).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(m.transformer.wte.weight[EOT_TOKEN] * 10)
    assert int(m(torch.tensor([[1, 2]]))[0][0, -1].argmax()) == EOT_TOKEN
    e = DecodeEngine(m, max_batch=2)
    try:
        c = Collector()
        e.submit([1, 2], 10, SamplingParams(temperature=0), c)
        assert c.wait().tokens == [] and c.finished.reason == "stop"
    finally:
        e.close()


def test_cancel_frees_the_row(model, engine):
    started = queue.Queue()

    class Slow(Collector):
        def __call__(self, event) -> None:
            super().__call__(event)
            started.put(event)

    c = Slow()
    request = engine.submit([1, 2, 3], 120, SamplingParams(temperature=1.0), c, seed=1)
    started.get(timeout=30)
    engine.cancel(request)
    assert c.wait().finished.reason in ("cancelled", "stop", "length")
    stats = engine.stats()
    assert stats["active"] == 0
    if c.finished.reason == "cancelled":
        assert len(c.tokens) < 120 and stats["finished_by_reason"]["cancelled"] == 1


def test_overload_and_bad_requests(model):
    e = DecodeEngine(model, max_batch=1, max_pending=1)
    try:
        hold, busy = threading.Event(), threading.Event()

        def blocking(event) -> None:  # keeps the engine thread busy (inside the callback) so the queue fills up
            busy.set()
            hold.wait(30)

        first = e.submit([1], 5, SamplingParams(), blocking)
        assert busy.wait(30)
        e.submit([1], 5, SamplingParams(), lambda ev: None)  # the one waiting place
        with pytest.raises(EngineOverloaded, match="busy"):
            e.submit([1], 5, SamplingParams(), lambda ev: None)
        hold.set()
        e.cancel(first)
        with pytest.raises(ValueError, match="context"):
            e.submit([1] * 100, 50, SamplingParams(), lambda ev: None)
        with pytest.raises(ValueError, match="max_tokens"):
            e.submit([1], 0, SamplingParams(), lambda ev: None)
        with pytest.raises(ValueError, match="empty"):
            e.submit([], 3, SamplingParams(), lambda ev: None)
    finally:
        e.close()


def test_stop_strings_split_across_tokens_are_found():
    enc = get_tokenizer()
    text = "alpha beta\n\ngamma delta"
    stop = StopText(["\n\ngam"])
    out = "".join(stop.push(t) for t in enc.encode(text)) + stop.flush()
    assert out == "alpha beta" and stop.stopped
    plain = StopText(["zzz"])
    assert "".join(plain.push(t) for t in enc.encode(text)) + plain.flush() == text


def test_request_schema_and_limits():
    ok = CompletionRequest(model="m", prompt=["a", "b"], n=2, stop="x")
    assert ok.prompts() == ["a", "b"] and ok.stops() == ["x"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    for bad in ({"model": "m", "prompt": "a", "max_tokens": "5"}, {"model": "m", "prompt": "a", "max_tokens": 0},
                {"model": "m", "prompt": "a", "temperature": 3}, {"model": "m", "prompt": 5},
                {"model": "m", "prompt": "a", "surprise": 1}):
        with pytest.raises(ValueError):
            CompletionRequest(**bad)
    limits = Limits(max_n=2, max_prompts=2, max_choices=3)
    for bad, param in ((dict(prompt="", n=1), "prompt"), (dict(prompt="a", n=3), "n"), (dict(prompt=["a", "b"], n=2), "n"),
                       (dict(prompt="a", echo=True), "echo"), (dict(prompt=["a", "b", "c"]), "prompt")):
        with pytest.raises(APIError) as e:
            check_request(CompletionRequest(model="m", **bad), limits)
        assert e.value.status == 400 and e.value.param == param


def test_a_request_that_is_not_streamed_gets_each_choice_in_one_piece():
    import asyncio

    from serve.completions import held_until_finish

    async def events():
        for e in ({"event": "start", "choices": 2}, {"event": "text", "index": 0, "text": "He"},
                  {"event": "text", "index": 1, "text": "A"}, {"event": "text", "index": 0, "text": "llo"},
                  {"event": "finish", "index": 0, "reason": "length"}, {"event": "finish", "index": 1, "reason": "stop"},
                  {"event": "end", "usage": {}}):
            yield e

    async def collect():
        return [e async for e in held_until_finish(events())]

    assert asyncio.run(collect()) == [
        {"event": "start", "choices": 2},
        {"event": "text", "index": 0, "text": "Hello"}, {"event": "finish", "index": 0, "reason": "length"},
        {"event": "text", "index": 1, "text": "A"}, {"event": "finish", "index": 1, "reason": "stop"},
        {"event": "end", "usage": {}},
    ]
