"""The gateway's API around the completions: the API key, vLLM's tokenizer endpoints (as lm-eval's remote tokenizer
uses them), Prometheus metrics and request-body limits. One key-protected application for the whole module, on a
real local Ray instance, over real HTTP (httpx, the official openai client, a raw socket, headless Chromium)."""

from __future__ import annotations

import json
import secrets
import socket
import time

import httpx
import pytest
import torch

from gpt2 import GPT, preset
from serving.deploy import deploy
from tests.browser import chromium

pytestmark = pytest.mark.usefixtures("ray_session")

KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "gpt2-api-test"
PREFIX = "/secured"
BODY_LIMIT = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve as ray_serve

    from cluster.runtime.local_services import free_port

    root = tmp_path_factory.mktemp("serve-api")
    torch.manual_seed(0)
    GPT(preset("tiny")).save_pretrained(root / "pretrained")
    torch.manual_seed(1)
    GPT(preset("tiny", block_size=256)).save_pretrained(root / "wide")  # never loaded: only its context is read
    settings = {"variants": {"pretrained": str(root / "pretrained"),
                             "wide": {"source": str(root / "wide"), "description": "a longer context"}},
                "max_batch": 4, "torch_threads": 1, "model_replica_cpus": 0.5, "api_key": KEY,
                "limits": {"max_body_bytes": BODY_LIMIT}}
    port = free_port()
    base = deploy(settings, port=port, name=NAME, route_prefix=PREFIX, timeout=120)
    yield {"base": base, "root": root, "port": port}
    ray_serve.delete(NAME)
    if not ray_serve.status().applications:
        ray_serve.shutdown()  # so the next module's deploy starts Serve's proxy on the port it asks for


def complete(server, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server['base']}/v1/completions", json=body, headers=AUTH, timeout=120, **kw)


def test_without_the_key_the_api_answers_401(server):
    from openai import AuthenticationError, OpenAI

    base = server["base"]
    routes = [("POST", "/v1/completions", {"model": "pretrained", "prompt": "Hi"}), ("GET", "/v1/models", None),
              ("GET", "/v1/stats", None), ("POST", "/tokenize", {"prompt": "Hi"}),
              ("POST", "/detokenize", {"tokens": [1]}), ("GET", "/tokenizer_info", None), ("GET", "/metrics", None)]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        for method, path, body in routes:
            r = httpx.request(method, base + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", error
            assert KEY not in r.text
    assert httpx.get(base + "/healthz").status_code == 200
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "api_key" in page.text
    for key in ("wrong", KEY[:-1]):
        client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        with pytest.raises(AuthenticationError):
            client.completions.create(model="pretrained", prompt="Hi", max_tokens=2)
        with pytest.raises(AuthenticationError):
            client.models.list()


def test_the_key_comes_from_the_environment_and_never_shows(monkeypatch):
    from serving.auth import API_KEY_ENV, api_key_from_env
    from serving.settings import ServerSettings

    settings = ServerSettings(variants={"a": "somewhere"}, api_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings.model_dump()) and KEY not in settings.model_dump_json()
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    assert api_key_from_env(None).get_secret_value() == "from-the-environment"
    assert api_key_from_env(settings.api_key).get_secret_value() == KEY  # the settings' own key wins
    monkeypatch.setenv(API_KEY_ENV, "")
    assert api_key_from_env(None) is None


def test_openai_client_with_the_key(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {"pretrained", "wide"}
    out = client.completions.create(model="pretrained", prompt="Hello", max_tokens=4, temperature=0)
    assert out.model == "pretrained" and out.usage.completion_tokens <= 4


def test_models_say_what_a_client_needs_and_no_paths(server):
    before = time.time()
    r = httpx.get(f"{server['base']}/v1/models", headers=AUTH)
    models = {m["id"]: m for m in r.json()["data"]}
    assert {name: m["max_model_len"] for name, m in models.items()} == {"pretrained": 128, "wide": 256}
    for m in models.values():
        assert m["object"] == "model" and m["owned_by"] and 0 < m["created"] <= before
        assert {"dtype", "quantize", "description"} <= set(m) and "source" not in m
    assert models["wide"]["description"] == "a longer context"
    assert str(server["root"]) not in r.text and "/tmp" not in r.text


def test_openai_client_retrieves_a_model_and_reads_why_a_route_is_missing(server):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server['base']}/v1", api_key=KEY, max_retries=0)
    model = client.models.retrieve("wide")
    assert model.id == "wide" and model.object == "model" and model.model_extra["max_model_len"] == 256
    with pytest.raises(NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(NotFoundError) as chat:  # what a chat UI pointed at this server sends first
        client.chat.completions.create(model="pretrained", messages=[{"role": "user", "content": "Hi"}])
    assert "no chat template" in chat.value.message and "/v1/completions" in chat.value.message
    r = httpx.get(f"{server['base']}/v1/engines", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert f"{PREFIX}/v1/completions" in r.json()["error"]["message"]  # the routes there are, as a client calls them
    r = httpx.delete(f"{server['base']}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "DELETE" in r.json()["error"]["message"], r.text


def test_json_the_server_cannot_use_is_refused_cleanly(server):
    deep = b'{"model": "pretrained", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # 10 KB, within the limit
    for path in ("/v1/completions", "/tokenize", "/detokenize"):
        r = httpx.post(server["base"] + path, content=deep, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], (path, r.text)
    for value in ("NaN", "Infinity", "-Infinity"):  # Python's JSON reader takes them; they are no temperature
        r = httpx.post(server["base"] + "/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                       content=f'{{"model": "pretrained", "prompt": "Hi", "temperature": {value}}}'.encode())
        assert r.status_code == 422 and "finite number" in r.json()["error"]["message"], (value, r.text)
    assert complete(server, {"model": "pretrained", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_tokenize_and_detokenize(server):
    def post(path, body):
        return httpx.post(f"{server['base']}{path}", json=body, headers=AUTH)

    r = post("/tokenize", {"model": "pretrained", "prompt": "Hello world", "add_special_tokens": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 2, "max_model_len": 128, "tokens": [15496, 995], "token_strs": None}
    assert post("/tokenize", {"model": "wide", "prompt": "Hello world"}).json()["max_model_len"] == 256
    # Without a model (as lm-eval asks), the context every variant accepts.
    assert post("/tokenize", {"prompt": "Hello world"}).json()["max_model_len"] == 128
    assert post("/tokenize", {"prompt": "a<|endoftext|>"}).json()["tokens"] == [64, 50256]
    strs = post("/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()["token_strs"]
    assert strs == ["Hello", "Ġworld"]
    assert post("/detokenize", {"model": "pretrained", "tokens": [15496, 995]}).json() == {"prompt": "Hello world"}
    assert post("/detokenize", {"tokens": [64, 50256]}).json() == {"prompt": "a<|endoftext|>"}
    for tokens, position in (([15496, 50257], 1), ([-1, 995], 0)):
        r = post("/detokenize", {"tokens": tokens})
        assert r.status_code == 400, r.text
        assert f"tokens[{position}]" in r.json()["error"]["message"]
    for path, body in (("/tokenize", {"model": "nope", "prompt": "x"}),
                       ("/detokenize", {"model": "nope", "tokens": [1]})):
        r = post(path, body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = post("/tokenize", {"prompt": 5})
    assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]


def test_tokenizer_info(server):
    info = httpx.get(f"{server['base']}/tokenizer_info", headers=AUTH).json()
    assert info["tokenizer_class"] == "GPT2Tokenizer"
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["eos_token_id"] == info["bos_token_id"] == 50256
    assert info["vocab_size"] == 50257 and info["model_max_length"] == 128 and info["pad_token"] is None


def test_lm_eval_detects_and_uses_the_remote_tokenizer(server):
    """lm-eval's `local-completions` model finds the tokenizer endpoints by itself (tokenizer_backend=auto) and
    tokenizes through them, sending the key it is given as `auth_token`."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import check_remote_tokenizer_support

    url = f"{server['base']}/v1/completions"
    assert not check_remote_tokenizer_support(url, max_retries=1)  # no key: the endpoints answer 401
    lm = LocalCompletionsAPI(base_url=url, model="pretrained", auth_token=KEY)
    assert lm.tokenizer_backend == "remote"
    assert lm.tok_encode("Hello world") == [15496, 995]
    assert lm.eot_token_id == 50256 and lm.prefix_token_id == 50256
    assert lm.decode_batch([[15496, 995]]) == ["Hello world"]


def _scrape(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{server['base']}/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_requests_tokens_and_timings(server):
    before = _scrape(server)
    plain = complete(server, {"model": "pretrained", "prompt": "One", "max_tokens": 6, "temperature": 0})
    assert plain.status_code == 200, plain.text
    body = {"model": "pretrained", "prompt": "Two", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server['base']}/v1/completions", json=body, headers=AUTH, timeout=60) as s:
        assert s.status_code == 200
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed_tokens = chunks[-1]["usage"]["completion_tokens"]
    # A prompt sent twice: the second request computes only its last position (the prefix cache lends the rest).
    repeated = [complete(server, {"model": "pretrained", "prompt": list(range(7000, 7020)), "max_tokens": 1})
                for _ in range(2)]
    assert all(r.status_code == 200 for r in repeated)
    assert complete(server, {"model": "nope", "prompt": "x"}).status_code == 404
    keyless = httpx.post(f"{server['base']}/v1/completions", json={"model": "pretrained", "prompt": "x"})
    assert keyless.status_code == 401
    after = _scrape(server)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("gpt2_serve_requests_total", variant="pretrained", status="200") == 4
    assert delta("gpt2_serve_requests_total", variant="unknown", status="404") == 1
    assert delta("gpt2_serve_requests_total", variant="unknown", status="401") == 1
    assert delta("gpt2_serve_completion_tokens_total", variant="pretrained") == (
        sum(r.json()["usage"]["completion_tokens"] for r in (plain, *repeated)) + streamed_tokens)
    assert delta("gpt2_serve_prompt_tokens_lent_total", variant="pretrained") == 19
    prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in (plain, *repeated)) + chunks[-1]["usage"][
        "prompt_tokens"]
    assert delta("gpt2_serve_prompt_tokens_computed_total", variant="pretrained") == prompt_tokens - 19
    assert after[("gpt2_serve_prefix_cache_bytes", (("variant", "pretrained"),))] > 0
    assert delta("gpt2_serve_request_latency_seconds_count", variant="pretrained") == 4
    assert delta("gpt2_serve_time_to_first_token_seconds_count", variant="pretrained") == 1  # the streamed one
    assert delta("gpt2_serve_request_latency_seconds_sum", variant="pretrained") > 0
    for variant in ("pretrained", "wide"):
        assert after[("gpt2_serve_active_rows", (("variant", variant),))] == 0
        assert after[("gpt2_serve_queue_depth", (("variant", variant),))] == 0


def _chunks(total: int, size: int = 10_000):
    for start in range(0, total, size):
        yield b" " * min(size, total - start)


def test_chunked_bodies_within_the_limit_work_and_beyond_it_get_413(server):
    """httpx sends a generator with `Transfer-Encoding: chunked`: no Content-Length to check before reading."""
    def padded(body: dict, size: int):  # JSON with leading whitespace, as many chunks as it takes
        yield from _chunks(size)
        yield json.dumps(body).encode()

    ok = httpx.post(f"{server['base']}/tokenize", content=padded({"prompt": "Hello world"}, 15_000), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["tokens"] == [15496, 995], ok.text
    body = {"model": "pretrained", "prompt": "Hi", "max_tokens": 2}
    ok = httpx.post(f"{server['base']}/v1/completions", content=padded(body, 15_000), headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text
    for path in ("/v1/completions", "/tokenize", "/detokenize"):
        r = httpx.post(f"{server['base']}{path}", content=_chunks(50 * 10_000), headers=AUTH, timeout=60)
        assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"], (path, r.text)


def test_an_oversized_chunked_body_is_refused_before_it_ends(server):
    """50 chunks of 10 kB, sent slowly: the 413 arrives while most of the body is still unsent, so the server
    stopped reading at the limit instead of taking the whole body first."""
    host, port = "127.0.0.1", server["port"]
    head = (f"POST {PREFIX}/v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer, sent = b"", 0
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(head.encode())
        s.settimeout(0.2)
        for chunk in _chunks(50 * 10_000):
            try:
                s.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            except OSError:  # the server answered and closed the connection
                break
            sent += 1
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
            break
        if not answer:
            s.settimeout(30)
            answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert sent < 50, f"the answer came only after the whole body ({sent} chunks)"


def test_web_page_asks_for_the_key_then_completes(server):
    """The page's first API call meets a 401: it asks for the key (a wrong one is asked again), keeps it for the
    tab, and the comparison then runs as usual."""
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server["base"] + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#api_key", "not-the-key")
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#key-message').textContent.includes('not accepted')")
        page.fill("#api_key", KEY)
        page.click("#key-save")
        page.wait_for_selector("input[name=variant]")
        assert page.is_hidden("#key-form")
        assert page.evaluate("sessionStorage.getItem('gpt2-api-key')") == KEY
        for box in page.query_selector_all("input[name=variant]"):
            box.set_checked(box.get_attribute("value") == "pretrained")
        page.fill("#prompt", "The history of")
        page.fill("#max_tokens", "8")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('.column[data-done]').length === 1", timeout=60_000)
        column = page.query_selector(".column")
        assert column.get_attribute("data-done") == "true", column.inner_text()
        assert column.query_selector(".text").inner_text().strip()
        assert page.is_hidden("#key-form")  # the stored key served the completion: no second question
