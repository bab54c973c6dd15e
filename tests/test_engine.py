"""The continuous-batching engine and the protocol helpers, without Ray: the model-level guarantees the server relies on."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from gpt2 import EOT_TOKEN, GPT, preset
from gpt2.generate import SamplingParams, generate
from gpt2.tokenizer import get_tokenizer
from serving.engine import (
    DecodeEngine,
    DecodingThread,
    EngineOverloaded,
    EngineUnavailable,
    Finished,
    PromptLogprobs,
    Token,
)
from serving.protocol import APIError, CompletionRequest, Limits, StopMatcher, StopText, check_request


class Collector:
    """Gathers one request's events and lets the test wait for its end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.prompt: PromptLogprobs | None = None
        self.stop_token: Token | None = None  # the token that ended the request, when one did
        self.finished: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Token) and event.stop:
            self.stop_token = event
        elif isinstance(event, Token):
            self.tokens.append(event.id)
            self.logprobs.append(event.logprobs)
        elif isinstance(event, PromptLogprobs):
            self.prompt = event
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


def test_an_early_exit_models_concurrent_requests_each_equal_their_own_generation(model):
    """An early-exit model's rows leave at different layers: with newcomers prefilled while others decode, every
    request still equals its solo generation, exits included."""
    from gpt2.early_exit import EarlyExitGPT

    torch.manual_seed(1)
    exiting = EarlyExitGPT(model, exit_layer=1, threshold=0.5).eval()
    e = DecodeEngine(exiting, max_batch=3, max_pending=16)
    try:
        collectors = []
        for i, prompt in enumerate(PROMPTS + PROMPTS[:2]):
            c = Collector()
            e.submit(prompt, 12 + i, SamplingParams(temperature=0), c)
            collectors.append((prompt, 12 + i, c))
        for prompt, n, c in collectors:
            assert c.wait().tokens == exiting.generate([prompt], n, temperature=0)[0]
        assert e.stats()["mean_batch"] > 1, e.stats()
    finally:
        e.close()


def test_choices_of_one_prompt_share_its_prefill_and_each_equals_its_own_generation(model):
    """n choices of one prompt: the prompt is computed once and each follower starts from a copy of the leader's
    cache row and last logits, sampling with its own seed exactly as it would alone. Followers that find no free
    row once the prompt is in, and the followers of a leader cancelled before its prompt is in, prefill the prompt
    themselves; none is lost."""
    prompt = [40, 588, 257, 1310, 286, 3290, 13, 50, 51, 52]
    sampling = SamplingParams(temperature=0.9, top_k=40)

    def alone(seed: int, n: int = 12) -> list[int]:
        return generate(model, prompt, n, temperature=0.9, top_k=40, seed=seed)[0]

    for max_batch, choices in ((8, 4), (2, 4)):  # every choice seated; then only one follower finds a free row
        e = DecodeEngine(model, max_batch=max_batch, max_pending=16)
        try:
            collectors, leader = [], None
            with e.submitting():  # queued together, before the first one's prompt is in
                for i in range(choices):
                    c = Collector()
                    handle = e.submit(prompt, 12, sampling, c, seed=7 + i, same_prompt_as=leader)
                    leader = leader or handle
                    collectors.append(c)
            assert [c.wait().tokens for c in collectors] == [alone(7 + i) for i in range(choices)]
            prefilled = e.stats()["prompt_tokens"]
            assert prefilled == (len(prompt) if max_batch >= choices else (choices - 1) * len(prompt)), prefilled
            assert e.stats()["active"] == e.stats()["pending"] == 0
        finally:
            e.close()

    e = DecodeEngine(model, max_batch=4, max_pending=16, prefill_tokens=4)  # the prompt takes three passes
    try:
        first = Collector()
        followers = [Collector() for _ in range(2)]
        with e.submitting():
            leader = e.submit(prompt, 12, sampling, first, seed=1)
            for i, c in enumerate(followers):
                e.submit(prompt, 12, sampling, c, seed=2 + i, same_prompt_as=leader)
            e.cancel(leader)
        assert first.wait().finished.reason == "cancelled"
        assert [c.wait().tokens for c in followers] == [alone(2), alone(3)]
        assert e.stats()["finished_by_reason"]["cancelled"] == 1
    finally:
        e.close()

    e = DecodeEngine(model, max_batch=1, max_pending=16)
    try:  # closed while followers wait for a leader still in the queue: each is told, none hangs
        busy = Collector()
        e.submit([1, 2], 120, SamplingParams(temperature=0, ignore_eos=True), busy)
        deadline = time.monotonic() + 30
        while e.stats()["active"] == 0:  # the one row taken
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = [Collector() for _ in range(3)]
        with e.submitting():
            leader = e.submit(prompt, 12, sampling, waiting[0], seed=1)
            for c in waiting[1:]:
                e.submit(prompt, 12, sampling, c, seed=1, same_prompt_as=leader)
            assert e.stats()["pending"] == 3
        e.close()  # the one row stays busy meanwhile: the leader is still waiting
        assert {c.wait().finished.reason for c in [busy, *waiting]} <= {"cancelled", "length"}
        assert all(c.finished.reason == "cancelled" for c in waiting)
    finally:
        e.close()


def test_a_computed_prompt_is_lent_to_later_requests_that_begin_with_it(model):
    """Cross-request prefix cache: a later request whose prompt begins with an earlier one's computes only the rest,
    and still equals its own generation, greedy or seeded. Prompts kept stay within the byte budget, the least
    recently used out first; a budget of 0 keeps none."""
    system = (PROMPTS[2] * 6)[:40]
    question = [1212, 318, 257, 1332, 30, 198]
    sampling = SamplingParams(temperature=0.9, top_k=40)
    e = DecodeEngine(model, max_batch=2, max_pending=16)
    try:
        def run(prompt, seed=None):
            c = Collector()
            e.submit(prompt, 10, sampling if seed is not None else SamplingParams(temperature=0), c, seed=seed)
            return c.wait().tokens

        assert run(system) == generate(model, system, 10, temperature=0)[0]
        computed = e.stats()["prompt_tokens"]
        assert computed == len(system)
        extended = system + question
        assert run(extended, seed=3) == generate(model, extended, 10, temperature=0.9, top_k=40, seed=3)[0]
        stats = e.stats()
        assert stats["prompt_tokens"] - computed == len(question)
        assert stats["prefix_cache"]["tokens_lent"] == len(system)
        # The same prompt again: everything but its last position is lent (its logits give the first token).
        assert run(extended) == generate(model, extended, 10, temperature=0)[0]
        assert e.stats()["prompt_tokens"] - stats["prompt_tokens"] == 1
        # A prompt that parts from it early borrows nothing: too little in common to be worth a copy.
        other = system[:10] + question * 3
        assert run(other) == generate(model, other, 10, temperature=0)[0]
        assert e.stats()["prefix_cache"]["requests_lent"] == 2
        per_token = e.stats()["prefix_cache"]["bytes"] / (len(extended) + len(other))
    finally:
        e.close()

    budget = int(per_token * 100)  # room for two of three 40-token prompts
    e = DecodeEngine(model, max_batch=2, max_pending=16, prefix_cache_bytes=budget)
    try:
        def lent_to(prompt) -> bool:
            before = e.stats()["prefix_cache"]["requests_lent"]
            c = Collector()
            e.submit(prompt, 2, SamplingParams(temperature=0), c)
            c.wait()
            return e.stats()["prefix_cache"]["requests_lent"] > before

        a, b, c = ((p * 20)[:40] for p in PROMPTS[1:])
        assert [lent_to(p) for p in (a, b, a, c)] == [False, False, True, False]
        assert [lent_to(p) for p in (a, b)] == [True, False]  # c's copy pushed b out, the least recently used
        kept = e.stats()["prefix_cache"]
        assert kept["prompts"] == 2 and 0 < kept["bytes"] <= budget, kept
    finally:
        e.close()
    e = DecodeEngine(model, max_batch=2, max_pending=16, prefix_cache_bytes=0)
    try:
        for _ in range(2):
            c = Collector()
            e.submit(system, 2, SamplingParams(temperature=0), c)
            c.wait()
        assert e.stats()["prompt_tokens"] == 2 * len(system) and e.stats()["prefix_cache"]["prompts"] == 0
    finally:
        e.close()


def test_a_lent_prompt_keeps_its_scores_and_an_early_exit_threshold_its_own_cache(model):
    """A request that scores its prompt borrows the scores of the lent part too, so they equal in-process scoring;
    it borrows only from a prompt scored with at least as many alternatives. An early-exit model's prompts computed
    with another threshold are not lent."""
    from gpt2.early_exit import EarlyExitGPT
    from gpt2.loglikelihood import row_logprobs

    context = (PROMPTS[2] * 5)[:30]
    endings = [[318, 257, 1310], [290, 788, 13, 198]]
    e = DecodeEngine(model, max_batch=2, max_pending=16)
    try:
        def score(prompt, k):
            c = Collector()
            e.submit(prompt, 0, SamplingParams(temperature=0), c, prompt_logprobs=k)
            return c.wait().prompt

        score(context, 3)
        for ending in endings:
            prompt = context + ending
            scored = score(prompt, 2)
            assert len(scored.logprobs) == len(prompt) and scored.logprobs[0] is None
            for k in (1, len(context) - 1, len(context), len(prompt) - 1):
                assert scored.logprobs[k] == pytest.approx(row_logprobs(model, [prompt[: k + 1]], [k])[0], abs=1e-4)
            assert all(len(top) == 2 for top in scored.top[1:])
        assert e.stats()["prefix_cache"]["requests_lent"] == 2
        score(context + endings[0], 5)  # more alternatives than were kept: computed in full
        assert e.stats()["prefix_cache"]["requests_lent"] == 2
        unscored = (PROMPTS[3] * 10)[:30]
        c = Collector()
        e.submit(unscored, 1, SamplingParams(temperature=0), c)
        c.wait()
        score(unscored, 0)  # kept without scores: it cannot lend them
        assert e.stats()["prefix_cache"]["requests_lent"] == 2
        c = Collector()
        e.submit(unscored + endings[0], 1, SamplingParams(temperature=0), c)  # kept with scores of 0 alternatives
        c.wait()
        assert e.stats()["prefix_cache"]["requests_lent"] == 3
    finally:
        e.close()

    torch.manual_seed(1)
    exiting = EarlyExitGPT(model, exit_layer=1, threshold=0.5).eval()
    e = DecodeEngine(exiting, max_batch=2, max_pending=16)
    try:  # thresholds: given, given, given again, the model's (0.9 now), the model's changed (0.5)
        for threshold, given, lent in ((0.5, True, 0), (0.9, True, 0), (0.9, True, 1), (0.9, False, 2),
                                       (0.5, False, 3)):
            exiting.threshold = threshold
            c = Collector()
            e.submit(context, 8, SamplingParams(temperature=0), c, exit_threshold=threshold if given else None)
            assert c.wait().tokens == exiting.generate([context], 8, temperature=0)[0]
            assert e.stats()["prefix_cache"]["requests_lent"] == lent
    finally:
        e.close()


def test_engines_of_several_variants_decode_on_one_thread(model):
    """A model replica's variants share one decoding thread (OpenMP keeps a team per thread that computes, and more
    teams than cores slow every step): each engine's requests still equal their solo generation, everything an
    engine computes, its cache included, happens on that thread, and one engine's fatal failure leaves the other
    decoding."""
    other = GPT(preset("tiny")).eval()
    shared = DecodingThread(name="decode-shared-test")
    where = []
    allocate = other.new_kv_cache
    other.new_kv_cache = lambda *a, **k: where.append(threading.current_thread().name) or allocate(*a, **k)
    a = DecodeEngine(model, max_batch=2, thread=shared, name="a")
    b = DecodeEngine(other, max_batch=2, thread=shared, name="b")
    try:
        assert where == ["decode-shared-test"]
        where.clear()
        assert [t.name for t in threading.enumerate()].count("decode-shared-test") == 1
        runs = []
        for engine, m in ((a, model), (b, other), (a, model), (b, other)):
            for prompt in PROMPTS[:2]:
                c = Collector()
                engine.submit(prompt, 12, SamplingParams(temperature=0), c)
                runs.append((m, prompt, c))
        for m, prompt, c in runs:
            assert c.wait().tokens == generate(m, prompt, 12, temperature=0)[0]

        class Slow(Collector):  # keeps the request running well past the drill
            def __call__(self, event) -> None:
                time.sleep(0.01)
                super().__call__(event)

        long = Slow()
        a.submit(PROMPTS[0], 120, SamplingParams(temperature=0, ignore_eos=True), long)
        a.crash_for_drill("drill on a")
        assert long.wait().finished.reason == "error" and "drill on a" in long.finished.error
        assert a.failed and not b.failed and shared.alive
        with pytest.raises(EngineUnavailable):
            a.submit(PROMPTS[1], 3, SamplingParams(temperature=0), Collector())
        c = Collector()
        b.submit(PROMPTS[2], 10, SamplingParams(temperature=0), c)
        assert c.wait().tokens == generate(other, PROMPTS[2], 10, temperature=0)[0]
    finally:
        a.close()
        b.close()
    assert shared.alive  # a shared thread outlives its engines; an engine's own thread does not


def test_an_engine_of_its_own_ends_its_thread_when_closed(model):
    e = DecodeEngine(model, max_batch=2, name="own")
    thread = e._thread
    c = Collector()
    e.submit(PROMPTS[0], 5, SamplingParams(temperature=0), c)
    c.wait()
    e.close()
    deadline = time.monotonic() + 10
    while thread.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not thread.alive


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
        assert c.wait().tokens == [] and c.finished.reason == "stop" and c.stop_token.id == EOT_TOKEN
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


def test_a_request_that_arrives_during_a_prefill_is_prefilled_before_the_next_decoding_step(model):
    """Requests that arrive together (a closed loop's do) wait for two passes over the weights, not three: C, sent
    while B's prefill pass runs, gets its own prefill before the decoding rows' next step, and then A, B and C
    decode together. Only once in a row: the step after that decodes."""
    e = DecodeEngine(model, max_batch=4, max_pending=4)
    log: list[tuple[str, str]] = []
    greedy = SamplingParams(temperature=0, ignore_eos=True)

    def record(name: str, on_token=None):
        def on(event) -> None:
            log.append((name, type(event).__name__))
            if on_token is not None and isinstance(event, Token):
                on_token()
        return on

    try:
        a_decoding, c_sent, a_tokens = threading.Event(), [], []

        def a_token() -> None:  # A decodes on its own for a few steps before B comes
            a_tokens.append(1)
            if len(a_tokens) == 3:
                a_decoding.set()

        def send_c() -> None:  # on the decoding thread, right after B's prefill pass, before A's next step
            if not c_sent:
                c_sent.append(e.submit([3, 4], 4, greedy, record("C")))

        a = e.submit([1, 2], 120, greedy, record("A", a_token))
        assert a_decoding.wait(30)
        b = e.submit([5, 6], 4, greedy, record("B", send_c))
        deadline = time.monotonic() + 30
        while sum(1 for name, kind in log if name in "BC" and kind == "Finished") < 2:
            assert time.monotonic() < deadline, log[-10:]
            time.sleep(0.01)
        e.cancel(a)
        after_b = log[log.index(("B", "Token")) + 1:]
        tokens = [name for name, kind in after_b if kind == "Token"]
        assert tokens[0] == "C", after_b[:6]  # C's first token, from its prefill, before A's next
        assert sorted(tokens[1:4]) == ["A", "B", "C"], after_b[:8]  # then one step decodes all three
        assert b.generated == 4
    finally:
        e.close()


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
            e.submit([1], 0, SamplingParams(), lambda ev: None)  # 0 only scores a prompt
        with pytest.raises(ValueError, match="logprobs"):
            e.submit([1], 1, SamplingParams(), lambda ev: None, logprobs=21)
        with pytest.raises(ValueError, match="empty"):
            e.submit([], 3, SamplingParams(), lambda ev: None)
    finally:
        e.close()


def _stopped_text(text: str, stops: list[str], include: bool = False) -> tuple[str, str | None]:
    enc = get_tokenizer()
    stop = StopText(StopMatcher(stops), include)
    return "".join(stop.push(t) for t in enc.encode(text)) + stop.flush(), stop.stopped


def test_stop_strings_split_across_tokens_are_found():
    text = "alpha beta\n\ngamma delta"
    assert _stopped_text(text, ["\n\ngam"]) == ("alpha beta", "\n\ngam")
    assert _stopped_text(text, ["\n\ngam"], include=True) == ("alpha beta\n\ngam", "\n\ngam")
    assert _stopped_text(text, ["zzz"]) == (text, None)
    # The first stop string to end wins; prefixes that repeat themselves (aab in aaab) are still found.
    assert _stopped_text("xx aaab yy", ["aab", "yy"]) == ("xx a", "aab")
    assert _stopped_text("one two three", ["three", "two"]) == ("one ", "two")


def test_stop_strings_are_matched_in_linear_time():
    """Four 120,000-character stop strings that the text keeps almost matching: the naive check re-searched the
    held text for every prefix of every stop string at every token (minutes); this takes well under a second."""
    import time

    stops = ["a" * 119_999 + c for c in "bcde"]
    t0 = time.perf_counter()
    out, stopped = _stopped_text("a" * 3000 + " tail", stops)
    assert out == "a" * 3000 + " tail" and stopped is None
    assert time.perf_counter() - t0 < 10  # a generous bound: the quadratic check took over a minute


def test_request_schema_and_limits():
    ok = CompletionRequest(model="m", prompt=["a", "b"], n=2, stop="x")
    assert ok.prompts() == ["a", "b"] and ok.stops() == ["x"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    for bad in ({"model": "m", "prompt": "a", "max_tokens": "5"}, {"model": "m", "prompt": "a", "max_tokens": -1},
                {"model": "m", "prompt": "a", "temperature": 3}, {"model": "m", "prompt": 5},
                {"model": "m", "prompt": "a", "logprobs": 6}, {"model": "m", "prompt": "a", "presence_penalty": 3},
                {"model": "m", "prompt": "a", "repetition_penalty": 0}, {"model": "m", "prompt": "a", "ignore_eos": 1},
                {"model": "m", "prompt": "a", "stop_token_ids": [-1]}, {"model": "m", "prompt": "a", "min_tokens": -1},
                {"model": "m", "prompt": "a", "logit_bias": {"5": "x"}}):
        with pytest.raises(ValueError):
            CompletionRequest(**bad)
    # Fields other servers define are accepted and reported as ignored; vLLM's neutral values are accepted.
    vllm = CompletionRequest(model="m", prompt="a", surprise=1, min_p=0.0, top_k=-1, best_of=1, repetition_penalty=1.0)
    assert vllm.ignored_fields() == ["min_p", "surprise"] and vllm.sampling_params().top_k is None
    limits = Limits(max_n=2, max_prompts=2, max_choices=3, max_stop_chars=10)
    for bad, param in ((dict(prompt="", n=1), "prompt"), (dict(prompt="a", n=3), "n"), (dict(prompt=["a", "b"], n=2), "n"),
                       (dict(prompt="a", suffix="b"), "suffix"), (dict(prompt=["a", "b", "c"]), "prompt"),
                       (dict(prompt="a", best_of=2), "best_of"), (dict(prompt="a", max_tokens=0), "max_tokens"),
                       (dict(prompt="a", max_tokens=3, min_tokens=4), "min_tokens"),
                       (dict(prompt="a", stop=["x" * 11]), "stop"), (dict(prompt="a", stop_token_ids=[50257]), "stop_token_ids"),
                       (dict(prompt="a", logit_bias={"abc": 1}), "logit_bias"),
                       (dict(prompt="a", logit_bias={"50257": 1}), "logit_bias"),
                       (dict(prompt="a", logit_bias={"5": 101}), "logit_bias")):
        with pytest.raises(APIError) as e:
            check_request(CompletionRequest(model="m", **bad), limits)
        assert e.value.status == 400 and e.value.param == param, (bad, e.value.message)


def test_prompt_logprobs_equal_in_process_scoring(model, engine):
    """Scoring a prompt (max_tokens 0) gives each token's log-probability given the ones before it, as
    gpt2.loglikelihood computes them, from the engine's prefill pass; with chunked prefill too."""
    from gpt2.loglikelihood import row_logprobs

    prompt = PROMPTS[2] * 3  # 21 tokens
    chunked = DecodeEngine(model, max_batch=2, prefill_tokens=8)
    try:
        for e in (engine, chunked):
            c = Collector()
            e.submit(prompt, 0, SamplingParams(temperature=0), c, prompt_logprobs=3)
            c.wait()
            assert c.tokens == [] and c.finished.reason == "length"
            lp = c.prompt.logprobs
            assert lp[0] is None and len(lp) == len(prompt)
            for k in (1, 7, len(prompt) - 1):  # each position's score, one row per prefix
                expected = row_logprobs(model, [prompt[: k + 1]], [k])[0]
                assert lp[k] == pytest.approx(expected, abs=1e-4)
            top = c.prompt.top[5]
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and top[0][1] >= lp[5]
    finally:
        chunked.close()


def test_generated_token_logprobs_are_the_models(model, engine):
    c = Collector()
    engine.submit(PROMPTS[0], 5, SamplingParams(temperature=0), c, logprobs=2)
    c.wait()
    with torch.no_grad():
        logits, _ = model(torch.tensor([PROMPTS[0]]))
    expected = torch.log_softmax(logits[0, -1].float(), dim=-1)
    first = c.logprobs[0]
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-5)  # greedy: the chosen token is the best
    assert [t for t, _ in first.top] == expected.topk(2).indices.tolist()


def test_long_prompts_are_prefilled_in_chunks_while_others_decode(model):
    """A prompt longer than the prefill budget goes in over several passes; every request still equals its own
    generation, and short requests keep decoding meanwhile."""
    e = DecodeEngine(model, max_batch=4, prefill_tokens=16)
    try:
        long_prompt = (PROMPTS[2] * 12)[:80]
        jobs = []
        for prompt in (PROMPTS[0], long_prompt, PROMPTS[1], long_prompt[:40]):
            c = Collector()
            e.submit(prompt, 12, SamplingParams(temperature=0), c)
            jobs.append((prompt, c))
        for prompt, c in jobs:
            assert c.wait().tokens == generate(model, prompt, 12, temperature=0)[0]
        assert e.stats()["prefill_passes"] >= 5  # the 80-token prompt alone needs 5 passes of 16
    finally:
        e.close()


def test_sampling_controls_in_the_batched_engine(model, engine):
    tok = 1000
    forced = Collector()  # a +100 bias makes a token certain, even when sampling
    engine.submit(PROMPTS[0], 6, SamplingParams(temperature=1.0, logit_bias=((tok, 100.0),)), forced, seed=1)
    plain = Collector()
    engine.submit(PROMPTS[0], 6, SamplingParams(temperature=0), plain)
    assert forced.wait().tokens == [tok] * 6 and plain.wait().tokens != [tok] * 6
    # A +3 bias makes greedy decoding repeat a token; presence and frequency penalties of 2 take 4 off it once it
    # was generated, so it comes only once; each penalty alone takes 2 off, which still leaves it first here.
    counts = []
    for presence, frequency in ((0, 0), (2.0, 2.0), (2.0, 0), (0, 2.0)):
        c = Collector()
        engine.submit(PROMPTS[0], 6, SamplingParams(temperature=0, logit_bias=((tok, 3.0),), presence_penalty=presence,
                                                     frequency_penalty=frequency), c)
        counts.append(c.wait().tokens.count(tok))
    assert counts[:2] == [6, 1] and counts[2] == 6 and counts[3] < 6  # frequency grows with each repeat
    rep = Collector()
    engine.submit(PROMPTS[0], 20, SamplingParams(temperature=0, repetition_penalty=1e6), rep)
    rep_tokens = rep.wait().tokens  # each token seen once is pushed far down: no repeats, nothing from the prompt
    assert len(set(rep_tokens)) == len(rep_tokens) and not set(rep_tokens) & set(PROMPTS[0])
    # stop_token_ids end a request (the token is not emitted); min_tokens bans them until enough were generated.
    # (The repetition-penalised greedy sequence above has no repeats, so its 4th token first appears at step 4.)
    first, params = rep_tokens[3], dict(temperature=0, repetition_penalty=1e6)
    stop = Collector()
    engine.submit(PROMPTS[0], 6, SamplingParams(**params, stop_token_ids=(first,)), stop)
    assert stop.wait().tokens == rep_tokens[:3] and stop.finished.stop_token == first
    late = Collector()
    engine.submit(PROMPTS[0], 6, SamplingParams(**params, stop_token_ids=(first,), min_tokens=6), late)
    assert len(late.wait().tokens) == 6 and first not in late.tokens


def test_ignore_eos_keeps_generating_through_end_of_text():
    m = GPT(preset("tiny")).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(m.transformer.wte.weight[EOT_TOKEN] * 10)
    e = DecodeEngine(m, max_batch=2)
    try:
        c = Collector()
        e.submit([1, 2], 4, SamplingParams(temperature=0, ignore_eos=True), c)
        assert c.wait().tokens == [EOT_TOKEN] * 4 and c.finished.reason == "length"
        c = Collector()
        e.submit([1, 2], 4, SamplingParams(temperature=0, min_tokens=2), c)
        assert len(c.wait().tokens) == 2 and EOT_TOKEN not in c.tokens and c.finished.reason == "stop"
    finally:
        e.close()


def test_a_request_that_is_not_streamed_gets_each_choice_in_one_piece_and_its_stream_closed():
    import asyncio
    import json

    from serving.completions import collect_response

    closed = []

    async def events():
        try:
            yield [{"event": "start", "choices": 2}]
            yield [{"event": "text", "index": 0, "text": "He"}, {"event": "text", "index": 1, "text": "A"}]
            yield [{"event": "text", "index": 0, "text": "llo"}, {"event": "finish", "index": 0, "reason": "length"}]
            yield [{"event": "finish", "index": 1, "reason": "stop", "stop_reason": "."},
                   {"event": "end", "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}}]
            yield [{"event": "text", "index": 0, "text": "never read"}]
        finally:
            closed.append(True)

    stream = events()

    async def collect():
        await stream.__anext__()  # the 'start' event, which the server reads before choosing the response's kind
        return await collect_response(stream, "cmpl-1", "m", 2)

    body = json.loads(asyncio.run(collect()).body)
    assert [(c["text"], c["finish_reason"], c["stop_reason"]) for c in body["choices"]] == [
        ("Hello", "length", None), ("A", "stop", ".")]
    assert body["usage"]["completion_tokens"] == 4 and closed == [True]


def test_a_request_past_its_deadline_ends_with_length_and_frees_its_rows(model):
    """request_timeout_s: what the request has when its time is up is its answer; its rows go back to the engine."""
    import asyncio

    from serving.completions import run_completion

    e = DecodeEngine(model, max_batch=2)
    try:
        slow = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=100, temperature=0, ignore_eos=True, n=2)

        async def run():
            events = []
            async for batch in run_completion(e, slow, Limits(request_timeout_s=0.0)):
                events.extend(batch)
            return events

        events = asyncio.run(run())
        finishes = [ev for ev in events if ev["event"] == "finish"]
        assert [f["reason"] for f in finishes] == ["length", "length"] and events[-1]["event"] == "end"
        assert events[-1]["usage"]["completion_tokens"] < 200
        deadline = time.monotonic() + 10
        while e.stats()["active"]:
            assert time.monotonic() < deadline, "the rows of the timed-out request were not freed"
            time.sleep(0.05)
    finally:
        e.close()


def test_streamed_tokens_travel_in_batches_but_the_first_goes_at_once(model, engine):
    """run_completion's batch_s: the first item is [start] alone, the first token is not held back, and later
    tokens that come within batch_s of each other share an item (one Ray message instead of one per token);
    the text is the same whatever the batching."""
    import asyncio

    from serving.completions import run_completion

    req = CompletionRequest(model="m", prompt=PROMPTS[0], max_tokens=30, temperature=0, ignore_eos=True, stream=True)

    async def run(batch_s: float):
        return [batch async for batch in run_completion(engine, req, Limits(), batch_s)]

    expected = get_tokenizer().decode(generate(model, PROMPTS[0], 30, temperature=0, stop_at_eot=False)[0])
    for batch_s, most in ((0.0, None), (10.0, 3)):
        batches = asyncio.run(run(batch_s))
        events = [e for b in batches for e in b]
        assert batches[0] == [events[0]] and events[0]["event"] == "start" and events[-1]["event"] == "end"
        assert "".join(e["text"] for e in events if e["event"] == "text") == expected
        texts = [b for b in batches if any(e["event"] == "text" for e in b)]
        assert len([e for e in texts[0] if e["event"] == "text"]) == 1, "the first token was held back"
        if most is not None:  # held for 10 s: everything after the first token comes in the last item or two
            assert len(batches) <= most, [len(b) for b in batches]
