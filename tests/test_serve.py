"""The Serve application on a real local Ray instance, over real HTTP (httpx and the official openai client)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch

from cluster.runtime.ray_env import PROJECT_ROOT
from gpt2 import GPT, GPTConfig, preset
from serving.deploy import deploy
from tests.browser import chromium

pytestmark = pytest.mark.usefixtures("ray_session")


def _save(directory, config: GPTConfig, seed: int) -> str:
    torch.manual_seed(seed)
    GPT(config).save_pretrained(directory)
    return str(directory)


def _early_exit_copy(checkpoint: str, directory) -> str:
    """The pretrained checkpoint plus an (untrained) exit classifier after block 1, default threshold 0.5."""
    import shutil

    from gpt2.early_exit import EarlyExitGPT, save_early_exit

    shutil.copytree(checkpoint, directory)
    torch.manual_seed(3)
    save_early_exit(EarlyExitGPT(GPT.from_pretrained(str(directory)), exit_layer=1, threshold=0.5), directory)
    return str(directory)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve as ray_serve

    from cluster.runtime.local_services import free_port

    root = tmp_path_factory.mktemp("serve")
    tiny = preset("tiny")
    variants = {
        "pretrained": _save(root / "pretrained", tiny, 0),
        "finetuned": _save(root / "finetuned", tiny, 1),
        # A wider context and a bigger model, so a long generation can be interrupted mid-way: the tiny model makes
        # its 1,000 tokens in about a second on a fast machine, which a disconnect's cancellation did not beat.
        "long": _save(root / "long", preset("small").replace(block_size=1024), 2),
    }
    variants["int8"] = {"source": variants["pretrained"], "quantize": "int8"}
    variants["nf4"] = {"source": variants["pretrained"], "quantize": "nf4"}
    variants["early-exit"] = _early_exit_copy(variants["pretrained"], root / "early-exit")
    settings = {"variants": variants, "max_batch": 4, "max_pending": 32, "torch_threads": 1,
                "model_replica_cpus": 0.5, "limits": {"max_n": 8, "max_body_bytes": 1_000_000}}
    base = deploy(settings, port=free_port(), name="gpt2-test", timeout=120)
    yield {"base": base, "variants": variants, "root": root, "port": int(base.rsplit(":", 1)[1])}
    ray_serve.shutdown()


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(f"{server['base']}/v1/completions", json=body, timeout=120, **kw)


def model_replicas(app: str) -> list:
    """The live ModelServer replica actors of an application, from this session's Ray instance: without its address
    the state API looks for an instance and refuses when it finds several (other test sessions on the machine)."""
    import ray
    from ray.util.state import list_actors

    return [a for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
            if f"ServeReplica:{app}:ModelServer" in (a.class_name or "")]


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_health_and_page(server):
    models = httpx.get(f"{server['base']}/v1/models").json()
    assert {m["id"] for m in models["data"]} == set(server["variants"])
    assert httpx.get(f"{server['base']}/healthz").json()["status"] == "ok"
    page = httpx.get(f"{server['base']}/")
    assert page.status_code == 200 and "/v1/completions" in page.text


def test_completion_and_stream_agree(server):
    body = {"model": "pretrained", "prompt": "Hello world", "max_tokens": 12, "temperature": 0}
    r = post(server, body)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["object"] == "text_completion" and full["model"] == "pretrained"
    assert full["usage"]["prompt_tokens"] == 2 and full["usage"]["completion_tokens"] <= 12
    with httpx.stream("POST", f"{server['base']}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == full["usage"]


def test_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == set(server["variants"])
    out = client.completions.create(model="finetuned", prompt=["One", "Two"], max_tokens=8, n=2, seed=3,
                                    temperature=0.8)
    assert len(out.choices) == 4 and [c.index for c in out.choices] == [0, 1, 2, 3]
    streamed = {}
    for piece in client.completions.create(model="finetuned", prompt=["One", "Two"], max_tokens=8, n=2, seed=3,
                                           temperature=0.8, stream=True):
        for c in piece.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed.get(i, "") for i in range(4)] == [c.text for c in out.choices]
    for quantized in ("int8", "nf4"):
        out = client.completions.create(model=quantized, prompt="One", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens <= 5 and out.model == quantized


def test_openai_client_logprobs_echo_and_prompt_scoring(server):
    from openai import OpenAI

    from gpt2.tokenizer import get_tokenizer

    client = OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0)
    prompt = "The quick brown fox"
    n_prompt = len(get_tokenizer().encode(prompt))
    out = client.completions.create(model="pretrained", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                    logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and out.usage.completion_tokens == 3
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == choice.text and all(x <= 0 for x in lp.token_logprobs[1:])
    for token, value, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:]):
        assert value == max(top.values()) and top[token] == value  # greedy: the chosen token is the best
        assert 2 <= len(top) <= 3

    # max_tokens 0 with echo scores the prompt alone, with the same numbers as the prompt part above.
    scored = client.completions.create(model="pretrained", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt], abs=1e-5)
    assert scored.choices[0].finish_reason == "length"
    # n choices share the prompt's one scoring pass; without logprobs the echo alone answers max_tokens 0.
    two = client.completions.create(model="pretrained", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                    logprobs=1, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 4
    for c in two.choices:
        assert c.text == choice.text[: len(c.text)] and len(c.logprobs.tokens) == n_prompt + 2
        assert c.logprobs.token_logprobs[:n_prompt] == pytest.approx(lp.token_logprobs[:n_prompt], abs=1e-5,
                                                                      nan_ok=True)
    bare = client.completions.create(model="pretrained", prompt=prompt, max_tokens=0, echo=True, n=2)
    assert [c.text for c in bare.choices] == [prompt, prompt] and bare.usage.completion_tokens == 0

    # Streamed: every chunk that carries text carries the logprobs of its tokens; together they equal the above.
    streamed = client.completions.create(model="pretrained", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                         logprobs=2, stream=True, extra_body={"ignore_eos": True})
    values = [x for piece in streamed for c in piece.choices if c.logprobs for x in c.logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs, abs=1e-5, nan_ok=True)


def test_sampling_controls_through_the_openai_client(server):
    from openai import OpenAI

    from gpt2.tokenizer import get_tokenizer

    enc = get_tokenizer()
    client = OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0)
    forced = client.completions.create(model="pretrained", prompt="Hello", max_tokens=4, temperature=1.0, seed=1,
                                       logit_bias={"1000": 100})
    assert forced.choices[0].text == enc.decode([1000] * 4)  # +100 forces that token even when sampling
    # vLLM's extra fields, with neutral and real values, as clients written for vLLM send them.
    neutral = dict(repetition_penalty=1.0, ignore_eos=False, min_tokens=0, stop_token_ids=[], top_k=-1)
    base = client.completions.create(model="pretrained", prompt="Hello", max_tokens=8, temperature=0)
    same = client.completions.create(model="pretrained", prompt="Hello", max_tokens=8, temperature=0, best_of=1,
                                     presence_penalty=0, frequency_penalty=0, extra_body=neutral)
    assert same.choices[0].text == base.choices[0].text
    penalised = client.completions.create(model="pretrained", prompt="Hello", max_tokens=8, temperature=0,
                                          presence_penalty=2, frequency_penalty=2,
                                          extra_body={"repetition_penalty": 1.5, "min_tokens": 8, "ignore_eos": True})
    assert penalised.usage.completion_tokens == 8
    tokens = enc.encode(base.choices[0].text)
    if len(tokens) >= 3 and tokens[2] not in tokens[:2]:  # a token that first appears third ends it there
        stopped = client.completions.create(model="pretrained", prompt="Hello", max_tokens=8, temperature=0,
                                            extra_body={"stop_token_ids": [tokens[2]]})
        assert stopped.choices[0].text == enc.decode(tokens[:2]) and stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].model_extra["stop_reason"] == tokens[2]


def test_stop_reason_and_stop_string_in_output(server):
    free = post(server, {"model": "pretrained", "prompt": "a", "max_tokens": 30, "temperature": 0,
                         "ignore_eos": True}).json()
    text = free["choices"][0]["text"]
    stop = text[3:5]
    body = {"model": "pretrained", "prompt": "a", "max_tokens": 30, "temperature": 0, "stop": [stop],
            "ignore_eos": True}
    cut = post(server, body).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["stop_reason"] == stop and cut["finish_reason"] == "stop"
    kept = post(server, {**body, "include_stop_str_in_output": True}).json()["choices"][0]
    assert kept["text"] == text[: text.index(stop) + len(stop)]
    assert free["choices"][0]["stop_reason"] is None and free["choices"][0]["finish_reason"] == "length"


def test_unknown_fields_are_ignored_and_named_in_a_header(server):
    r = post(server, {"model": "pretrained", "prompt": "Hi", "max_tokens": 2, "min_p": 0.0, "guided_json": None,
                      "frobnicate": 3})
    assert r.status_code == 200, r.text
    assert r.headers["X-Ignored-Fields"] == "frobnicate, guided_json, min_p"
    assert "X-Ignored-Fields" not in post(server, {"model": "pretrained", "prompt": "Hi", "max_tokens": 2}).headers


def test_long_stop_strings_do_not_stall_the_server(server):
    """Four 120,000-character stop strings (a 480 kB body), n=8, 32 tokens: matching them used to cost the square of
    their length per token and held the replica for over a minute; an unrelated short request must not wait."""
    stops = ["the" * 40_000, " a" * 60_000, "\n" * 120_000, "xyz" * 40_000]
    heavy = {"model": "pretrained", "prompt": "Once upon a time", "max_tokens": 32, "n": 8, "stop": stops,
             "temperature": 1.0, "seed": 0}
    short = {"model": "finetuned", "prompt": "Hi", "max_tokens": 8, "temperature": 0}

    async def both():
        async with httpx.AsyncClient(timeout=120) as client:
            t0 = time.perf_counter()
            heavy_task = asyncio.create_task(client.post(f"{server['base']}/v1/completions", json=heavy))
            await asyncio.sleep(0.3)  # the heavy request is in
            t1 = time.perf_counter()
            r_short = await client.post(f"{server['base']}/v1/completions", json=short)
            short_s = time.perf_counter() - t1
            r_heavy = await heavy_task
            return r_heavy, time.perf_counter() - t0, r_short, short_s

    r_heavy, heavy_s, r_short, short_s = asyncio.run(both())
    assert r_heavy.status_code == 200 and r_short.status_code == 200, (r_heavy.text[:500], r_short.text[:500])
    assert len(r_heavy.json()["choices"]) == 8
    print(f"long stop strings: heavy request {heavy_s:.2f} s, concurrent short request {short_s:.2f} s")
    assert heavy_s < 30 and short_s < 5  # generous bounds; before the fix both took 66-72 s


def test_early_exit_variant_reports_exits(server):
    body = {"prompt": "The cat sat", "max_tokens": 10, "temperature": 0}
    base = post(server, {**body, "model": "pretrained"}).json()
    never = post(server, {**body, "model": "early-exit", "early_exit_threshold": 2.0}).json()
    assert never["choices"][0]["text"] == base["choices"][0]["text"]  # never exiting is the standard model
    assert never["early_exit"]["exit_rate"] == 0.0 and never["early_exit"]["exit_layer"] == 1
    always = post(server, {**body, "model": "early-exit", "early_exit_threshold": 0}).json()
    assert always["early_exit"]["exit_rate"] == 1.0
    assert always["early_exit"]["exited"] == always["usage"]["completion_tokens"]
    assert "early_exit" not in base


def test_stop_strings_and_usage(server):
    free = post(server, {"model": "pretrained", "prompt": "a", "max_tokens": 30, "temperature": 0}).json()
    text = free["choices"][0]["text"]
    if len(text) < 6:
        pytest.skip("the random model stopped too early to pick a stop string")
    stop = text[3:5]
    cut = post(server, {"model": "pretrained", "prompt": "a", "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ({"model": "pretrained", "prompt": "x", "max_tokens": "3"}, 422, "max_tokens"),
        ({"model": "pretrained", "prompt": 7}, 422, "prompt"),
        ({"model": "pretrained", "prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
        ({"model": "pretrained", "prompt": "x", "max_tokens": 500}, 400, "context"),
        ({"model": "pretrained", "prompt": "word " * 200, "max_tokens": 5}, 400, "context"),
        ({"model": "pretrained", "prompt": ""}, 400, "empty"),
        ({"model": "pretrained", "prompt": "x", "n": 9}, 400, "limit"),
        ({"model": "pretrained", "prompt": "x", "stop": ["y" * 600_000]}, 400, "stop"),
        ({"model": "pretrained", "prompt": "x", "suffix": "y"}, 400, "not supported"),
        ({"model": "pretrained", "prompt": "x", "logprobs": 6}, 422, "logprobs"),
        ({"model": "pretrained", "prompt": "x", "logprobs": -1}, 422, "logprobs"),
        ({"model": "pretrained", "prompt": "x", "echo": "yes"}, 422, "echo"),
        ({"model": "pretrained", "prompt": "x", "max_tokens": 0}, 400, "echo"),
        ({"model": "pretrained", "prompt": "x", "presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"model": "pretrained", "prompt": "x", "frequency_penalty": "1"}, 422, "frequency_penalty"),
        ({"model": "pretrained", "prompt": "x", "repetition_penalty": 0}, 422, "repetition_penalty"),
        ({"model": "pretrained", "prompt": "x", "logit_bias": {"x1": 5}}, 400, "logit_bias"),
        ({"model": "pretrained", "prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
        ({"model": "pretrained", "prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
        ({"model": "pretrained", "prompt": "x", "ignore_eos": "true"}, 422, "ignore_eos"),
        ({"model": "pretrained", "prompt": "x", "stop_token_ids": [99999]}, 400, "stop_token_ids"),
        ({"model": "pretrained", "prompt": "x", "stop_token_ids": "5"}, 422, "stop_token_ids"),
        ({"model": "pretrained", "prompt": "x", "include_stop_str_in_output": 1}, 422, "include_stop_str_in_output"),
        ({"model": "pretrained", "prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"model": "pretrained", "prompt": "x", "top_k": -2}, 422, "top_k"),
        ({"model": "pretrained", "prompt": "x" * 1_100_000}, 413, "exceeds"),
    ],
)
def test_bad_requests_get_clear_errors(server, body, status, fragment):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(server):
    ids = [1000 + i for i in range(200)]  # beyond the tiny model's 128-token context
    r = post(server, {"model": "pretrained", "prompt": ids, "max_tokens": 4})
    message = r.json()["error"]["message"]  # in the API's own terms: max_tokens, the field that truncates
    assert r.status_code == 400 and "max_tokens (4)" in message and "truncate_prompt_tokens" in message, r.text
    greedy = {"model": "pretrained", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 0}
    cut = post(server, {**greedy, "prompt": ids, "truncate_prompt_tokens": 100}).json()
    alone = post(server, {**greedy, "prompt": ids[-100:]}).json()
    assert cut["choices"] == alone["choices"] and cut["usage"] == alone["usage"]
    assert cut["usage"]["prompt_tokens"] == 100
    scored = post(server, {**greedy, "prompt": ids, "max_tokens": 0, "truncate_prompt_tokens": -1}).json()
    assert len(scored["choices"][0]["logprobs"]["tokens"]) == 128  # -1: as much as the context holds
    text = post(server, {**greedy, "prompt": "one two three four", "truncate_prompt_tokens": 2}).json()
    assert text["choices"][0]["text"].startswith(" three four")  # the echo is the prompt the model read
    for keep, fragment in ((129, "above the model's context of 128"), (0, "keep no prompt")):
        r = post(server, {**greedy, "prompt": ids, "truncate_prompt_tokens": keep})
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "truncate_prompt_tokens"
    r = post(server, {**greedy, "prompt": ids, "truncate_prompt_tokens": 126})
    assert r.status_code == 400 and "lower max_tokens" in r.json()["error"]["message"], r.text


def test_malformed_json_and_server_still_up(server):
    r = httpx.post(f"{server['base']}/v1/completions", content=b'{"model": "pretrained", "prompt": ',
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert post(server, {"model": "pretrained", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_seeded_request_same_alone_and_in_a_batch(server):
    body = {"model": "finetuned", "prompt": "The cat", "max_tokens": 16, "temperature": 1.0, "top_k": 50, "seed": 42}
    alone = post(server, body).json()["choices"][0]["text"]

    async def crowd():
        async with httpx.AsyncClient(timeout=120) as client:
            others = [{**body, "seed": s, "prompt": f"Other prompt {s}"} for s in range(6)]
            tasks = [client.post(f"{server['base']}/v1/completions", json=b) for b in others[:3]]
            tasks.append(client.post(f"{server['base']}/v1/completions", json=body))
            tasks += [client.post(f"{server['base']}/v1/completions", json=b) for b in others[3:]]
            return await asyncio.gather(*tasks)

    responses = asyncio.run(crowd())
    assert all(r.status_code == 200 for r in responses)
    assert responses[3].json()["choices"][0]["text"] == alone


def test_the_choices_of_one_prompt_compute_it_once_and_each_is_its_seeds_own(server):
    """n = 3 and a prompt given twice: the prompt is prefilled once per distinct prompt (the stats count its tokens
    once), and choice i of a seeded request is the text a request with seed + i gets alone."""
    def stats() -> dict:
        return httpx.get(f"{server['base']}/v1/stats").json().get("pretrained", {})

    ids = [21000 + i for i in range(40)]  # no other test's prompt begins so: nothing lent to the first request
    body = {"model": "pretrained", "max_tokens": 8, "temperature": 1.0, "seed": 5}
    before = stats().get("prompt_tokens", 0)
    many = post(server, {**body, "prompt": [ids, ids], "n": 2}).json()
    assert stats()["prompt_tokens"] - before == len(ids)
    assert many["usage"]["prompt_tokens"] == 2 * len(ids)  # what the client sent, as OpenAI counts it
    texts = [c["text"] for c in sorted(many["choices"], key=lambda c: c["index"])]
    before = stats()
    alone = [post(server, {**body, "prompt": ids, "seed": 5 + i}).json()["choices"][0]["text"] for i in range(2)]
    assert texts == alone + alone  # each prompt's choice i has seed 5 + i
    # Sent again, the prompt was kept (the prefix cache): all but its last position is lent to each request.
    after = stats()
    assert after["prompt_tokens"] - before["prompt_tokens"] == 2
    assert after["prefix_cache"]["tokens_lent"] - before["prefix_cache"]["tokens_lent"] == 2 * (len(ids) - 1)
    # Scoring a prompt given twice (as lm-eval's batches may): each copy is scored, none waits for the other's scores.
    url = f"{server['base']}/v1/completions"  # a short timeout: a choice left waiting would hold the answer back
    scored = httpx.post(url, json={**body, "prompt": [ids, ids], "max_tokens": 0, "echo": True, "logprobs": 0},
                        timeout=30)
    assert scored.status_code == 200, scored.text
    first, second = (c["logprobs"]["token_logprobs"] for c in scored.json()["choices"])
    assert first == second and len(first) == len(ids)
    scored = httpx.post(url, json={**body, "prompt": [ids, ids], "max_tokens": 1, "echo": True, "logprobs": 1, "n": 2},
                        timeout=30)
    assert scored.status_code == 200 and len(scored.json()["choices"]) == 4, scored.text


def test_client_disconnect_cancels_generation(server):
    def cancelled() -> int:
        stats = httpx.get(f"{server['base']}/v1/stats").json()
        return stats.get("long", {}).get("finished_by_reason", {}).get("cancelled", 0)

    before = cancelled()
    body = {"model": "long", "prompt": "x", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server['base']}/v1/completions", json=body, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break  # one chunk received, then the client goes away
    deadline = time.monotonic() + 30
    while cancelled() == before:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.2)
    assert httpx.get(f"{server['base']}/v1/stats").json()["long"]["active"] == 0


def test_bounded_load(server):
    """200 requests at concurrency 8: no 5xx, every response a valid completion."""

    async def load():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                async with sem:
                    body = {"model": ["pretrained", "finetuned"][i % 2], "prompt": f"Request {i}", "max_tokens": 8,
                            "temperature": 0.7, "seed": i}
                    return await client.post(f"{server['base']}/v1/completions", json=body)

            return await asyncio.gather(*(one(i) for i in range(200)))

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * 200
    for r in responses:
        body = r.json()
        assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] <= 8


def test_overload_answers_503(server):
    """A deliberately tight application: one decoding row and no waiting room; the engine answers the rest at once."""
    tight = {"variants": {"pretrained": server["variants"]["long"]}, "max_batch": 1, "max_pending": 0,
             "torch_threads": 1, "model_replica_cpus": 0.5}
    url = deploy(tight, port=server["port"], name="gpt2-tight", route_prefix="/tight", timeout=120) + "/v1/completions"

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "pretrained", "prompt": "x", "max_tokens": 200, "temperature": 0}
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(8)))

    try:
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert "busy" in r.json()["error"]["message"], r.text
    finally:
        from ray import serve as ray_serve

        ray_serve.delete("gpt2-tight")


def test_web_page_compares_two_variants(server):
    """Headless Chromium loads the page, runs one prompt on two variants, and both columns fill with text."""
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server["base"] + "/")
        page.wait_for_selector("input[name=variant]")
        for box in page.query_selector_all("input[name=variant]"):
            box.set_checked(box.get_attribute("value") in ("pretrained", "finetuned"))
        page.fill("#prompt", "The history of")
        page.fill("#max_tokens", "12")
        page.click("#go")
        page.wait_for_function(
            "document.querySelectorAll('.column[data-done]').length === 2", timeout=60_000
        )
        columns = page.query_selector_all(".column")
        assert sorted(c.get_attribute("data-variant") for c in columns) == ["finetuned", "pretrained"]
        for column in columns:
            assert column.get_attribute("data-done") == "true", column.inner_text()
            assert column.query_selector(".text").inner_text().strip()
            assert "tokens/s" in column.query_selector(".stats").inner_text()
        # An error reaches the user: a prompt too long for the tiny models' context.
        page.fill("#prompt", "word " * 300)
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('.column[data-done=error]').length === 2", timeout=60_000)
        assert "context" in page.query_selector(".column .error").inner_text()


def test_serve_job_deploys_variants_relative_to_a_root(ray_session, server, tmp_path):
    """`python jobs/serve.py` (a process of its own, as a user runs it) onto the running instance: relative sources
    resolve against --root, the application stays up after the command returns. A variant whose checkpoint does not
    exist is named when the job starts, and its requests answer 503 with the path while the others are served."""
    import subprocess
    import sys

    import yaml
    from ray import serve as ray_serve

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "gpt2-job", "route_prefix": "/job", "import_path": "serving.app:build_app",
        "args": {"variants": {"mine": "pretrained", "ghost": "runs/not-trained-yet/final"}, "torch_threads": 1,
                 "model_replica_cpus": 0.5}}]}))
    ghost = PROJECT_ROOT / "runs/not-trained-yet/final"  # where relative paths resolve when not under --root
    assert not ghost.exists()
    try:
        done = subprocess.run(
            [sys.executable, "jobs/serve.py", "--config", str(config), "--root", str(server["root"]),
             "--port", str(server["port"]), "--address", ray_session.get_runtime_context().gcs_address],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "web page:" in done.stdout
        assert f"not found:  'ghost': {ghost} does not exist" in done.stdout, done.stdout
        assert "'mine'" not in done.stdout.split("not found:", 1)[1], done.stdout
        r = post({"base": server["base"] + "/job"}, {"model": "mine", "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        r = post({"base": server["base"] + "/job"}, {"model": "ghost", "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 503 and str(ghost) in r.json()["error"]["message"], r.text
    finally:
        ray_serve.delete("gpt2-job")


def test_serve_job_refuses_bad_settings_before_ray_starts(tmp_path, monkeypatch, capsys):
    """A mistake in the Serve config or the port ends the job with the fields named and no cluster touched (a port
    of 0 crashed Ray's core, one beyond 65535 had Serve's proxy retry forever, max_batch: 0 deployed a server whose
    every request failed)."""
    import yaml

    from tests.job_loader import load_job

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "serving.app:build_app",
                                                         "args": {"variants": {"a": "somewhere"}, "max_batch": 0,
                                                                  "bogus": 1}}]}))
    job = load_job("serve")
    monkeypatch.setattr(job, "init_ray", lambda *a, **k: pytest.fail("Ray was started for a config it refuses"))
    for args, message in (
        (["--config", str(config)], "error: serve config: max_batch: Input should be greater than or equal to 1;"
                                    " bogus: Extra inputs are not permitted"),
        (["--port", "0"], "error: --port must be a TCP port number in 1-65535, got 0"),
        (["--port", "70000"], "error: --port must be a TCP port number in 1-65535, got 70000"),
        (["--variant", "a b=/tmp"], "error: serve config: variant name 'a b' must be"),
    ):
        with pytest.raises(SystemExit, match=message):
            job.main(args)


def test_serve_job_names_a_port_another_program_holds(tmp_path):
    """Serve's proxy cannot bind a port in use: the job ends with that one line, where it printed the proxy actor's
    remote traceback."""
    import socket
    import subprocess
    import sys

    torch.manual_seed(0)
    GPT(preset("tiny")).save_pretrained(tmp_path / "model")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "jobs/serve.py", "--address", "local", "--port", str(port), "--only",
             "--variant", f"m={tmp_path / 'model'}"], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: Serve's HTTP proxy cannot listen on 127.0.0.1:{port}: another program may hold the"
                      " port (or it needs privileges), or 127.0.0.1 is not an address of this machine; choose another"
                      " port or host"], \
        done.stderr[-3000:]


def test_killed_model_replica_is_replaced_and_answers_are_always_well_formed(server):
    """Kill the model replica: Serve starts a new one, requests succeed again within a bounded time, and every
    answer meanwhile is either a valid completion or an OpenAI-style JSON error."""
    import ray

    replicas = model_replicas("gpt2-test")
    assert replicas, "no model replica found"
    body = {"model": "pretrained", "prompt": "Hello", "max_tokens": 4}
    assert post(server, body).status_code == 200
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)
    codes = []
    while True:
        r = post(server, body)
        codes.append(r.status_code)
        payload = r.json()  # always JSON, never a bare "Internal Server Error"
        if r.status_code == 200:
            assert payload["choices"] and payload["usage"]["completion_tokens"] <= 4
            break
        assert "error" in payload and r.status_code in (500, 503), (r.status_code, payload)
        assert time.monotonic() - killed_at < 120, f"no successful answer within 120 s of the kill: {codes}"
        time.sleep(0.5)
    print(f"replica replaced: first success {time.monotonic() - killed_at:.1f} s after the kill; codes {codes}")
