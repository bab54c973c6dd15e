"""Faults of the Serve application, each injected for real on a local Ray instance and watched over real HTTP.

- a model replica's process killed (SIGKILL) while completions stream from it,
- a variant's decoding thread dying inside a running replica (through the fault-drill hook, which is off unless
  ServerSettings.fault_drills is set; the application of this module sets it),
- variants whose files are broken (a corrupt model.safetensors, a config.json that is not an object),
- a request whose seed the engine cannot take (it used to fail the other requests decoding beside it).

One small application for the module (tiny models, half a CPU, one torch thread, health checks every second), and
helpers shared with tests/test_serve.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
import torch

from gpt2 import GPT, preset
from gpt2.sampling import SamplingParams
from serving.deploy import deploy
from serving.engine import DecodeEngine, EngineUnavailable, Finished, Token
from tests.test_serve import _save, model_replicas, post

pytestmark = pytest.mark.usefixtures("ray_session")

NAME = "gpt2-faults"
PREFIX = "/faults"
# A long stream: 4000 tokens of a tiny model with a 4096-token context run for seconds, so it is still running
# when the fault is injected after its first chunk.
LONG = {"model": "good", "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
SHORT = {"model": "good", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
REPLACED_WITHIN_S = 120  # a generous bound on Serve replacing a replica on a busy 2-core machine


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    from ray import serve as ray_serve

    from cluster.runtime.local_services import free_port

    root = tmp_path_factory.mktemp("serve-faults")
    good = _save(root / "good", preset("tiny", block_size=4096), 0)
    broken = root / "broken"  # its weights file cut short, as by a copy that died half-way
    shutil.copytree(good, broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    bad_config = root / "bad-config"  # valid JSON, but not a config: this used to stop the whole application
    shutil.copytree(good, bad_config)
    (bad_config / "config.json").write_text("[]")
    settings = {"variants": {"good": good, "broken": str(broken), "bad-config": str(bad_config)},
                "max_batch": 4, "torch_threads": 1, "model_replica_cpus": 0.5,
                "health_check_period_s": 1, "load_retry_s": 2, "fault_drills": True}
    port = free_port()
    base = deploy(settings, port=port, name=NAME, route_prefix=PREFIX, timeout=120)
    yield {"base": base, "root": root, "good": good, "broken": broken}
    ray_serve.delete(NAME)
    if not ray_serve.status().applications:
        ray_serve.shutdown()  # so the next module's deploy starts Serve's proxy on the port it asks for


def model_replica():
    """The live ModelServer replica actor of this module's application (one: max_model_replicas 1)."""
    replicas = model_replicas(NAME)
    assert len(replicas) == 1, replicas
    return replicas[0]


def actor_state(actor_id: str) -> str:
    import ray
    from ray.util.state import get_actor

    return get_actor(actor_id, address=ray.get_runtime_context().gcs_address).state


def answered_again(faults, since: float) -> list[int]:
    """Polls a short completion until it succeeds (within REPLACED_WITHIN_S of `since`); every answer meanwhile must
    be an OpenAI error object with 503. Returns the status codes seen."""
    codes = []
    while True:
        r = post(faults, SHORT)
        codes.append(r.status_code)
        payload = r.json()  # always JSON, never a bare "Internal Server Error"
        if r.status_code == 200:
            assert payload["choices"] and payload["usage"]["completion_tokens"] <= 4
            return codes
        assert r.status_code == 503 and payload["error"]["message"], (r.status_code, payload)
        assert time.monotonic() - since < REPLACED_WITHIN_S, f"no answer within {REPLACED_WITHIN_S} s: {codes}"
        time.sleep(0.5)


def stream_until_first_chunk(faults, body: dict):
    """Opens a streamed completion and reads up to its first text chunk; returns (response, line iterator, chunk)."""
    cm = httpx.stream("POST", f"{faults['base']}/v1/completions", json={**body, "stream": True}, timeout=60)
    response = cm.__enter__()
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            return cm, lines, json.loads(line[len("data: "):])
    raise AssertionError("the stream ended before its first chunk")


def rest_of_stream(cm, lines) -> list:
    """The remaining SSE data of a stream, read to its end: httpx raises if the server cuts the body short."""
    events = []
    try:
        for line in lines:
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    finally:
        cm.__exit__(None, None, None)
    return events


def assert_ends_with_an_error_event(events: list, fragment: str) -> dict:
    """The stream was cut by the fault (no finish_reason), then an OpenAI error object and [DONE]."""
    assert len(events) >= 2 and events[-1] == "[DONE]", events[-3:]
    error = events[-2].get("error")
    assert error, f"no error event before [DONE]: {events[-3:]}"
    assert error["code"] == "unavailable" and fragment in error["message"] and error["type"], error
    chunks = events[:-2]
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks), \
        "the stream finished before the fault was injected"
    return error


# ---- without Ray: the engine's part ----


@pytest.fixture(scope="module")
def long_model():
    torch.manual_seed(0)
    return GPT(preset("tiny", block_size=2048)).eval()


class Events:
    def __init__(self) -> None:
        self.tokens = 0
        self.finished: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Token):
            self.tokens += 1
        elif isinstance(event, Finished):
            self.finished = event
            self.done.set()


def test_a_seed_torch_cannot_take_fails_only_its_own_request(long_model, faults):
    """A seed past 64 bits used to reach the decoding thread, fail every request decoding beside it ("generation
    failed: ValueError: Overflow when unpacking long long") and leave itself and the requests admitted with it
    waiting for the 600 s deadline. Now the API refuses it (422), and the engine refuses it at submit."""
    engine = DecodeEngine(long_model, max_batch=4, max_pending=4)
    try:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        running = Events()
        engine.submit([464, 1893], 400, greedy, running)
        with pytest.raises(ValueError, match="seed"):
            engine.submit([40, 588], 5, greedy, Events(), seed=2**64)
        after = Events()
        engine.submit([50, 51], 5, greedy, after, seed=2**64 - 1)  # the largest seed torch takes
        assert running.done.wait(60) and after.done.wait(60)
        assert (running.finished.reason, running.tokens) == ("length", 400)
        assert (after.finished.reason, after.tokens) == ("length", 5)
    finally:
        engine.close()

    # Over HTTP, beside a stream on the same variant: 422 for the bad seed, the stream unaffected.
    cm, lines, _ = stream_until_first_chunk(faults, {**LONG, "max_tokens": 300})
    r = post(faults, {**SHORT, "seed": 2**64})
    assert r.status_code == 422 and r.json()["error"]["param"] == "seed", r.text
    events = rest_of_stream(cm, lines)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-3:]
    assert post(faults, {**SHORT, "seed": -(2**63)}).status_code == 200


def test_a_dead_decoding_thread_ends_its_requests_and_refuses_new_ones(long_model):
    """The engine alone: when its thread dies (here by the fault-drill hook), the requests it held end at once with
    an error a client may retry, new requests are refused, and `failed` tells the health check."""
    engine = DecodeEngine(long_model, max_batch=1, max_pending=4)
    try:
        greedy = SamplingParams(temperature=0, ignore_eos=True)
        decoding, waiting = Events(), Events()
        engine.submit([464, 1893], 2000, greedy, decoding)
        engine.submit([40, 588], 5, greedy, waiting)  # no free row: it waits
        deadline = time.monotonic() + 30
        while decoding.tokens == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.crash_for_drill()
        assert decoding.done.wait(30) and waiting.done.wait(30)
        for events in (decoding, waiting):
            assert events.finished.reason == "error" and events.finished.unavailable
            assert "decoding of model" in events.finished.error and "died" in events.finished.error
        assert engine.failed and not engine.closed
        with pytest.raises(EngineUnavailable, match="died"):
            engine.submit([1, 2], 3, greedy, Events())
    finally:
        engine.close()
    assert not engine.failed  # closed: an unloaded variant is not a failure


def test_fault_drills_are_off_unless_asked_for():
    """The hook that kills a decoding thread exists for drills only: off by default and in serving/config.yaml."""
    import yaml

    from serving.settings import ServerSettings

    assert ServerSettings(variants={"x": "y"}).fault_drills is False
    config = yaml.safe_load(open("serving/config.yaml", encoding="utf-8"))
    assert all(ServerSettings(**app["args"]).fault_drills is False for app in config["applications"])


# ---- the Serve application ----


def test_variants_that_fail_to_load_answer_503_and_the_others_keep_answering(faults):
    """Two broken variants on the replica that serves the good one: each answers 503 with the reason (streamed or
    not), the good variant's stream running meanwhile completes, /healthz stays ok, and once the files are fixed
    the next request after load_retry_s loads the variant."""
    cm, lines, _ = stream_until_first_chunk(faults, {**LONG, "max_tokens": 300})
    reasons = {"broken": "model.safetensors", "bad-config": "not a JSON object"}
    for name, reason in reasons.items():
        for stream in (False, True):
            r = post(faults, {"model": name, "prompt": "Hi", "max_tokens": 3, "stream": stream})
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "unavailable" and f"model {name!r} could not be loaded" in error["message"]
            assert reason in error["message"], error
    events = rest_of_stream(cm, lines)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-3:]
    assert post(faults, SHORT).status_code == 200
    health = httpx.get(f"{faults['base']}/healthz").json()
    assert health["status"] == "ok" and health["variants"] == ["bad-config", "broken", "good"]
    models = httpx.get(f"{faults['base']}/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"good", "broken", "bad-config"}

    # The failure is not kept forever: fixed files load at the first request after load_retry_s (2 s here).
    shutil.copy(os.path.join(faults["good"], "model.safetensors"), faults["broken"] / "model.safetensors")
    fixed_at = time.monotonic()
    while True:
        r = post(faults, {**SHORT, "model": "broken"})
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() - fixed_at < 60, r.text
        time.sleep(0.5)
    assert r.json()["model"] == "broken"


def test_replica_killed_mid_stream_cuts_its_streams_then_is_replaced(faults):
    """SIGKILL of the replica's process while two completions stream from it, one read with httpx and one with the
    official openai client. The process that wrote their bodies is gone, so the HTTP proxy cuts both connections:
    httpx raises on the body cut short and the openai client raises APIConnectionError, rather than hanging or taking
    it for a whole answer. Serve starts a new replica, and requests succeed again (those sent meanwhile wait for it
    or get a 503 JSON error)."""
    import openai

    replica = model_replica()
    client = openai.OpenAI(base_url=f"{faults['base']}/v1", api_key="unused", max_retries=0, timeout=60)
    cm, lines, first = stream_until_first_chunk(faults, LONG)
    assert first["choices"][0]["text"] is not None
    oa_stream = client.completions.create(model="good", prompt="Twice upon a time", max_tokens=4000, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
    oa_chunks = iter(oa_stream)
    assert next(oa_chunks).choices[0].finish_reason is None

    os.kill(replica.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        rest_of_stream(cm, lines)
    with pytest.raises(openai.APIConnectionError):
        for piece in oa_chunks:
            assert piece.choices[0].finish_reason is None, "the openai stream finished before the kill"
    oa_stream.close()

    codes = answered_again(faults, killed_at)
    assert actor_state(replica.actor_id) == "DEAD" and model_replica().actor_id != replica.actor_id
    print(f"replica killed mid-stream: first success {time.monotonic() - killed_at:.1f} s after the kill;"
          f" codes {codes}")


def test_dead_decoding_thread_fails_the_health_check_and_serve_replaces_the_replica(faults):
    """The decoding thread of the running replica dies (fault drill: ModelServer.drill_crash_decoding_thread, reached
    through a Serve handle). Its stream ends with an error event at once, new requests get 503 rather than waiting
    on a dead engine, the health check (ModelServer.check_health) fails, and Serve replaces the replica."""
    from ray import serve as ray_serve

    assert post(faults, SHORT).status_code == 200  # "good" is loaded on the replica
    replica = model_replica()
    cm, lines, _ = stream_until_first_chunk(faults, LONG)
    handle = ray_serve.get_deployment_handle("ModelServer", app_name=NAME)
    handle.options(multiplexed_model_id="good").drill_crash_decoding_thread.remote("good").result(timeout_s=60)
    crashed_at = time.monotonic()
    error = assert_ends_with_an_error_event(rest_of_stream(cm, lines), "died (FaultDrill")
    assert "fault drill" in error["message"]

    codes = answered_again(faults, crashed_at)
    assert any(a.actor_id != replica.actor_id for a in model_replicas(NAME)), "no new replica answered"
    deadline = time.monotonic() + 60
    while actor_state(replica.actor_id) != "DEAD":  # Serve stops the unhealthy replica
        assert time.monotonic() < deadline, "the unhealthy replica was not stopped"
        time.sleep(0.5)
    print(f"decoding thread crashed: first success {time.monotonic() - crashed_at:.1f} s later; codes {codes}")
