"""Serving throughput and latency of this project's Ray Serve endpoint, optionally side by side with a peer
OpenAI-compatible server (vLLM, ...) measured by the same closed-loop client in the same run.

Both servers serve the same checkpoint (`--model-dir`; by default a GPT-2 124M-shaped checkpoint with random
weights, seed 0, in a temporary directory: speed does not depend on what the weights learned) in the same dtype
(bf16 by default). Every request is a greedy (temperature 0) streamed completion of `--tokens` tokens (`ignore_eos`,
so no request ends early at <|endoftext|>), so throughput, latency and time to first token come from the same
requests. Completion tokens are read from the final usage chunk (`stream_options.include_usage`), or counted from the
text chunks when a server sends no usage.

For each concurrency level C the client keeps C requests in flight (closed loop: each of C workers sends its next
request when the previous one has finished) until `--requests-per-level` × C requests are done, on our server and
then on the peer, and prints one table per level. Before the servers, the same variant is measured in this process,
with no HTTP and no Ray: each level's prompts generated in one batch (`gpt2.generate`: the model on this machine)
and the engine's closed loop with the level's requests (`serving.engine`). So each level also shows what the engine
costs against one batch and what HTTP and Ray Serve cost against the engine. Also printed: `gpt2.generate` at batch 1
and the served engine's mean decoding batch.

Then one long prompt with several choices (`--shared-prompt-tokens`, `--choices`): a request for n sampled
completions of a prompt of random token ids, timed against the same request for one, on each server. How much
more n cost shows whether the prompt is computed once for all n. Every request has a prompt of its own, so a
server's cache of earlier prompts (vLLM's prefix cache) does not count there. That cache is measured next: two
requests whose prompts share that many tokens and end differently, the second timed against the first.

  python -m benchmarks.bench_serve                                   # this project's server only
  python -m benchmarks.bench_serve --model-dir DIR --peer-url http://127.0.0.1:8100   # DIR: what the peer serves
  python -m benchmarks.bench_serve --levels 1,2 --requests-per-level 1 --tokens 16    # a quick check

See docs/serving.md for starting vLLM's CPU build as the peer and for what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch

from benchmarks.engine_load import closed_loop as closed_loop_in_process
from cluster.runtime.ray_env import init_ray
from gpt2 import GPT, preset
from gpt2.generate import generate
from gpt2.tokenizer import get_tokenizer

PROMPTS = [
    "The history of the city begins",
    "In computer science, a hash table",
    "The recipe calls for two cups of",
    "Once upon a time, in a small village",
]
OURS = "gpt2-124m"  # the variant name of our server's main row
OURS_INT8 = "gpt2-124m-int8"


# ---------------------------------------------------------------- the closed-loop streaming client


@dataclass
class Outcome:
    """One request: ok, or the reason it failed."""

    ok: bool
    latency: float = 0.0  # send to [DONE]
    ttft: float | None = None  # send to the first chunk that carries a choice
    tokens: int = 0
    error: str = ""


@dataclass
class LevelResult:
    server: str
    concurrency: int
    requests: int
    elapsed_s: float
    tokens: int
    tokens_per_s: float
    p50_s: float | None
    p99_s: float | None
    ttft_p50_s: float | None
    errors: int
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    """POST a streamed completion and read its server-sent events to the end. Never raises: any non-200 answer,
    transport failure or malformed stream is an Outcome with ok=False."""
    t0 = time.perf_counter()
    ttft, chunks, usage_tokens, done = None, 0, None, False
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                return Outcome(False, error=f"HTTP {r.status_code}: {_short(text)}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments and other SSE fields
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    return Outcome(False, error=f"malformed stream: not JSON: {_short(data)}")
                if not isinstance(obj, dict):
                    return Outcome(False, error=f"malformed stream: not an object: {_short(data)}")
                if "error" in obj:
                    return Outcome(False, error=f"error in stream: {_short(json.dumps(obj['error']))}")
                choices = obj.get("choices") or []
                if choices:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    chunks += sum(1 for c in choices if isinstance(c, dict) and c.get("text"))
                usage = obj.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
    except httpx.HTTPError as e:
        return Outcome(False, error=f"{type(e).__name__}: {_short(str(e)) or 'no message'}")
    latency = time.perf_counter() - t0
    if not done:
        return Outcome(False, error="malformed stream: it ended without data: [DONE]")
    if ttft is None:
        return Outcome(False, error="malformed stream: no completion chunk")
    return Outcome(True, latency, ttft, usage_tokens if usage_tokens is not None else chunks)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def request_body(model: str, i: int, tokens: int) -> dict:
    return {
        "model": model,
        "prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM's field, which this server implements too: every request makes `tokens` tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def auth_headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def closed_loop(
    base: str, model: str, server: str, concurrency: int, requests: int, tokens: int, headers: dict | None = None
) -> LevelResult:
    """`concurrency` workers, each sending its next request when its previous one has finished, `requests` in all."""
    url = f"{base}/v1/completions"
    outcomes: list[Outcome] = []
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(600, connect=10)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers or {}) as client:
        async def worker() -> None:
            for i in next_index:  # the iterator is shared: each index goes to exactly one worker
                outcomes.append(await one_request(client, url, request_body(model, i, tokens)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    good = [o for o in outcomes if o.ok]
    produced = sum(o.tokens for o in good)
    errors = [o.error for o in outcomes if not o.ok]
    return LevelResult(
        server=server, concurrency=concurrency, requests=requests, elapsed_s=elapsed, tokens=produced,
        tokens_per_s=produced / elapsed if elapsed > 0 else 0.0,
        p50_s=percentile([o.latency for o in good], 0.5), p99_s=percentile([o.latency for o in good], 0.99),
        ttft_p50_s=percentile([o.ttft for o in good], 0.5), errors=len(errors),
        error_samples=sorted(set(errors))[:3],
    )


@dataclass
class SharedPromptResult:
    server: str
    one_choice_s: float | None  # median seconds of a request for one completion
    n_choices_s: float | None  # ... and for `choices` completions of the same prompt
    errors: list[str] = field(default_factory=list)


def shared_prompt(base: str, model: str, server: str, headers: dict, prompt_tokens: int, choices: int,
                  repeats: int, seed: int) -> SharedPromptResult:
    """Median seconds of a non-streamed request for 1 and for `choices` sampled completions of 16 tokens, each with
    a new prompt of `prompt_tokens` random token ids (the same prompts on every server: the same `seed`)."""
    import random

    rng = random.Random(seed)
    times: dict[int, list[float]] = {1: [], choices: []}
    errors = []
    with httpx.Client(timeout=600, headers=headers) as client:
        for _ in range(repeats):
            for n in times:
                body = {"model": model, "prompt": [rng.randrange(50000) for _ in range(prompt_tokens)], "n": n,
                        "max_tokens": 16, "temperature": 1.0, "seed": 1, "ignore_eos": True}
                t0 = time.perf_counter()
                r = client.post(f"{base}/v1/completions", json=body)
                if r.status_code == 200 and len(r.json().get("choices", [])) == n:
                    times[n].append(time.perf_counter() - t0)
                else:
                    errors.append(f"n={n}: HTTP {r.status_code}: {_short(r.text)}")
    return SharedPromptResult(server, percentile(times[1], 0.5), percentile(times[choices], 0.5), errors)


def print_shared_prompt(rows: list[SharedPromptResult], prompt_tokens: int, choices: int) -> None:
    print(f"\none prompt of {prompt_tokens} tokens, 16 new tokens a choice: median seconds of a request for 1 and for"
          f" {choices} choices (n={choices} costs n times 1 when every choice computes the prompt again)")
    peer = next((r for r in rows if r.server == "peer"), None)
    print(f"  {'server':<22} {'n=1 s':>7} {f'n={choices} s':>7} {'n/1':>6}" + (f" {'ours/peer':>10}" if peer else ""))
    for r in rows:
        line = f"  {r.server:<22} {_f(r.one_choice_s, '7.2f'):>7} {_f(r.n_choices_s, '7.2f'):>7} " \
               f"{_ratio(r.n_choices_s, r.one_choice_s):>6}"
        if peer is not None and r is not peer:  # time ratio: below 1 is faster than the peer
            line += f" {_ratio(r.n_choices_s, peer.n_choices_s):>10}"
        print(line)
        for e in r.errors[:3]:
            print(f"  ! {r.server}: {e}")


@dataclass
class SharedBeginningResult:
    server: str
    first_s: float | None  # median seconds of the first request with a new beginning
    again_s: float | None  # ... and of the next one with the same beginning and another ending
    tokens_lent: int | None = None  # prompt tokens our server's prefix cache lent meanwhile (its /v1/stats)
    errors: list[str] = field(default_factory=list)


def shared_beginning(base: str, model: str, server: str, headers: dict, prompt_tokens: int, repeats: int,
                     seed: int) -> SharedBeginningResult:
    """Median seconds of two greedy one-token requests (so the time is the prompt's) whose prompts share their first
    `prompt_tokens` random token ids (a system prompt, few-shot examples) and end with 16 different ones: the first
    computes the shared part; a server that keeps computed prompts lends it to the second. A new beginning on every
    repeat."""
    import random

    def lent(client: httpx.Client) -> int | None:  # our server's count; other servers have no /v1/stats
        try:
            return int(client.get(f"{base}/v1/stats").json()[model]["prefix_cache"]["tokens_lent"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    rng = random.Random(seed)
    first, again, errors = [], [], []
    with httpx.Client(timeout=600, headers=headers) as client:
        lent_before = lent(client)
        for _ in range(repeats):
            beginning = [rng.randrange(50000) for _ in range(prompt_tokens)]
            for times in (first, again):
                body = {"model": model, "prompt": beginning + [rng.randrange(50000) for _ in range(16)],
                        "max_tokens": 1, "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = client.post(f"{base}/v1/completions", json=body)
                if r.status_code == 200:
                    times.append(time.perf_counter() - t0)
                else:
                    errors.append(f"HTTP {r.status_code}: {_short(r.text)}")
        lent_after = lent(client)
    tokens_lent = lent_after - lent_before if lent_before is not None and lent_after is not None else None
    return SharedBeginningResult(server, percentile(first, 0.5), percentile(again, 0.5), tokens_lent, errors)


def print_shared_beginning(rows: list[SharedBeginningResult], prompt_tokens: int) -> None:
    print(f"\ntwo prompts sharing their first {prompt_tokens} tokens, each ending with 16 of its own, one new token:"
          " median seconds of the first and of the second (lower when the server kept the first's computation)")
    peer = next((r for r in rows if r.server == "peer"), None)
    print(f"  {'server':<22} {'first s':>7} {'second s':>8} {'1st/2nd':>7}" + (f" {'ours/peer':>10}" if peer else ""))
    for r in rows:
        line = f"  {r.server:<22} {_f(r.first_s, '7.2f'):>7} {_f(r.again_s, '8.2f'):>8} " \
               f"{_ratio(r.first_s, r.again_s):>7}"
        if peer is not None and r is not peer:  # time ratio of the second request: below 1 is faster than the peer
            line += f" {_ratio(r.again_s, peer.again_s):>10}"
        if r.tokens_lent is not None:
            line += f"   (prompt tokens lent by the prefix cache: {r.tokens_lent})"
        print(line)
        for e in r.errors[:3]:
            print(f"  ! {r.server}: {e}")


def peer_info(base: str, model: str | None, headers: dict) -> tuple[str, dict]:
    """The peer's model name (given, or the first id of GET /v1/models) and what /v1/models and /version say.
    Exits with one line when the peer does not answer."""
    try:
        r = httpx.get(f"{base}/v1/models", timeout=10, headers=headers)
        r.raise_for_status()
        listed = r.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        sys.exit(f"bench_serve: the peer at {base} does not answer GET /v1/models ({type(e).__name__}: "
                 f"{_short(str(e), 120) or 'no message'}); start it first (docs/serving.md) or drop --peer-url")
    info = {"models": [m.get("id") for m in listed if isinstance(m, dict)]}
    entry = next((m for m in listed if isinstance(m, dict) and (model is None or m.get("id") == model)), None)
    if model is None:
        if entry is None or not entry.get("id"):
            sys.exit(f"bench_serve: the peer at {base} lists no model in GET /v1/models; give --peer-model")
        model = entry["id"]
    info["root"] = (entry or {}).get("root")
    try:  # vLLM (and some others) report their version here; optional
        v = httpx.get(f"{base}/version", timeout=5, headers=headers)
        if v.status_code == 200 and isinstance(v.json(), dict):
            info["version"] = v.json().get("version")
    except (httpx.HTTPError, ValueError):
        pass
    return model, info


# ---------------------------------------------------------------- this machine, the in-process reference


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": simd, "torch": torch.__version__,
            "python": platform.python_version()}


@dataclass
class InProcessLevel:
    """One concurrency level of the variant our server loads, measured in this process (no HTTP, no Ray)."""

    concurrency: int
    batch_tokens_per_s: float  # gpt2.generate with C prompts in one batch: what the model gives on this machine
    engine_tokens_per_s: float  # serving.engine, a closed loop of C requests: continuous batching alone
    engine_ttft_p50_s: float


@dataclass
class InProcess:
    batch1_tokens_per_s: float  # gpt2.generate, one prompt at a time, `repeats` of them
    levels: list[InProcessLevel]


def in_process(
    model_dir: Path, dtype: str, quantize: str, *, tokens: int, threads: int, repeats: int, levels: list[int],
    requests_per_level: int, max_batch: int,
) -> InProcess:
    """The variant our server loads, in this process: per level, the level's prompts generated in one batch and the
    engine's closed loop with the same requests as the served level. Served ÷ engine is what HTTP and Ray Serve
    cost; engine ÷ one batch is what continuous batching costs (requests that come and go, prefills between
    decoding steps)."""
    from serving.engine import DecodeEngine, DecodingThread
    from serving.variants import VariantSpec, load_variant

    spec = VariantSpec("reference", str(model_dir), dtype=dtype, quantize=quantize)
    # Everything computes on the engine's thread, as in the server's replica: a second thread that ran parallel work
    # would keep an OpenMP team of its own and slow every step (serving.engine.DecodingThread says why).
    thread = DecodingThread(threads, name="bench-in-process", private=True)
    model = thread.call(lambda: load_variant(spec, torch.device("cpu"), max_batch=max_batch))
    enc = get_tokenizer()
    prompts = [enc.encode(request_body("", i, tokens)["prompt"]) for i in range(max(levels))]

    def generated_per_s(batch: list[list[int]], times: int) -> float:
        start, produced = time.perf_counter(), 0
        for _ in range(times):
            produced += sum(map(len, generate(model, batch, tokens, temperature=0, stop_at_eot=False)))
        return produced / (time.perf_counter() - start)

    thread.call(lambda: generate(model, prompts[:1], 4, temperature=0))  # warm-up
    batch1 = thread.call(lambda: generated_per_s(prompts[:1], repeats))
    batches = {c: thread.call(lambda c=c: generated_per_s(prompts[:c], 1)) for c in levels}
    engine = DecodeEngine(model, max_batch=max_batch, max_pending=max(levels), name="in-process", thread=thread)
    try:
        closed_loop_in_process(engine, prompts, 1, 1, min(tokens, 8))  # warm-up
        loads = {c: closed_loop_in_process(engine, prompts, c, requests_per_level * c, tokens) for c in levels}
    finally:
        engine.close()  # its thread, private to it, ends too, and with it the thread's OpenMP team
    return InProcess(batch1, [InProcessLevel(c, batches[c], loads[c].tokens_per_s, loads[c].ttft_p50_s)
                              for c in levels])


# ---------------------------------------------------------------- report


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def print_level(rows: list[LevelResult], tokens: int, peer: LevelResult | None) -> None:
    first = rows[0]
    print(f"\nconcurrency {first.concurrency}: {first.requests} requests per server, at most {tokens} tokens each")
    head = f"  {'server':<22} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'TTFT p50 s':>10} {'errors':>6} {'tokens':>7}"
    if peer is not None:
        head += f" {'tok/s ours/peer':>15} {'TTFT ours/peer':>14}"
    print(head)
    for r in rows:
        line = (f"  {r.server:<22} {r.tokens_per_s:>9.1f} {_f(r.p50_s, '7.2f'):>7} {_f(r.p99_s, '7.2f'):>7} "
                f"{_f(r.ttft_p50_s, '10.3f'):>10} {r.errors:>6} {r.tokens:>7}")
        if peer is not None and r is not peer:
            line += f" {_ratio(r.tokens_per_s, peer.tokens_per_s):>15} {_ratio(r.ttft_p50_s, peer.ttft_p50_s):>14}"
        print(line)
    for r in rows:
        for e in r.error_samples:
            print(f"  ! {r.server}: {e}")


def _local_level(local: dict[str, InProcess], row: LevelResult) -> InProcessLevel | None:
    """The in-process figures of a served row's variant at its level (None for the peer's rows)."""
    measured = local.get(row.server)
    return next((x for x in measured.levels if x.concurrency == row.concurrency), None) if measured else None


def print_breakdown(local: dict[str, InProcess], results: list[LevelResult]) -> None:
    """Where the time goes, per variant and level: the model in one batch and the engine (both in this process, no
    HTTP, no Ray), then the server; TTFT p50 of the engine and of the server."""
    print("\nwhere the time goes, tokens/s (in this process: the level's prompts in one batch, the engine; then served):"
          "\nengine/batch is what continuous batching costs, served/engine what HTTP and Ray Serve cost")
    print(f"  {'server':<22} {'C':>3} {'one batch':>10} {'engine':>8} {'served':>8} {'engine/batch':>13} "
          f"{'served/engine':>14} {'TTFT engine s':>14} {'TTFT served s':>14}")
    for r in results:
        here = _local_level(local, r)
        if here is not None:
            print(f"  {r.server:<22} {r.concurrency:>3} {here.batch_tokens_per_s:>10.1f} "
                  f"{here.engine_tokens_per_s:>8.1f} {r.tokens_per_s:>8.1f} "
                  f"{_ratio(here.engine_tokens_per_s, here.batch_tokens_per_s):>13} "
                  f"{_ratio(r.tokens_per_s, here.engine_tokens_per_s):>14} {here.engine_ttft_p50_s:>14.3f} "
                  f"{_f(r.ttft_p50_s, '14.3f'):>14}")


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help="checkpoint to serve (default: a 124M random-weight one, seed 0, "
                   "in a temporary directory); with --peer-url, the directory the peer serves")
    p.add_argument("--peer-url", help="base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8100")
    p.add_argument("--peer-model", help="model name the peer expects (default: the first id of its GET /v1/models)")
    p.add_argument("--peer-api-key", help="API key of the peer, sent as a Bearer token (our server gets $GPT2_API_KEY "
                   "when that is set, as the server itself reads it)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of our served variant")
    p.add_argument("--int8", action="store_true", help="also measure an int8-quantized variant of the checkpoint")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of every completion")
    p.add_argument("--levels", default="1,8,16", help="concurrency levels, comma-separated")
    p.add_argument("--requests-per-level", type=int, default=4, help="requests per level and server = this × level")
    p.add_argument("--max-batch", type=int,
                   help="our engine's decoding rows (default: the highest level, or --choices if that is more)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, in our replica and in-process alike")
    p.add_argument("--stream-batch-ms", type=float, help="our server's stream_batch_ms: how long a streamed token may "
                   "wait to share its message with the next ones (default: the server's, serving/app.py)")
    p.add_argument("--reference-repeats", type=int, default=3, help="in-process batch-1 generations to time")
    p.add_argument("--shared-prompt-tokens", type=int, default=512,
                   help="prompt length of the several-choices request, and the length of the beginning "
                   "that two requests share (default 512; 0: skip both)")
    p.add_argument("--choices", type=int, default=4, help="n of the several-choices request (default 4)")
    p.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    args = p.parse_args()
    try:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error(f"--levels {args.levels!r}: give comma-separated integers, e.g. 1,8,16")
    if not levels or min(levels) < 1 or args.tokens < 1 or args.requests_per_level < 1 or args.choices < 2:
        p.error("--levels, --tokens and --requests-per-level must be positive, --choices at least 2")
    if args.shared_prompt_tokens < 0:
        p.error("--shared-prompt-tokens must be >= 0")
    if args.peer_url and args.model_dir is None:
        p.error("--peer-url needs --model-dir: the directory the peer serves, so that both serve the same checkpoint")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir}: no config.json there; give a checkpoint directory")

    peer_url = args.peer_url.rstrip("/") if args.peer_url else None
    peer_model, peer = peer_info(peer_url, args.peer_model, auth_headers(args.peer_api_key)) if peer_url else (None, {})
    if peer_url and peer.get("root") and os.path.isabs(peer["root"]):
        if Path(peer["root"]).resolve() != args.model_dir.resolve():
            print(f"warning: the peer serves {peer['root']}, not --model-dir {args.model_dir}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            model_dir = Path(tmp) / "gpt2-124m"
            from serving.model_pool import in_new_thread

            # On a thread that ends with it, as the server loads models: its OpenMP team ends too.
            asyncio.run(in_new_thread(random_checkpoint, model_dir))
        else:
            model_dir = args.model_dir.resolve()
        report = run(args, levels, model_dir, peer_url, peer_model, peer)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.out}")


def random_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    GPT(preset("gpt2")).save_pretrained(str(path))


def run(args, levels: list[int], model_dir: Path, peer_url: str | None, peer_model: str | None, peer: dict) -> dict:
    from ray import serve as ray_serve

    from cluster.runtime.local_services import free_port
    from serving.app import build_app

    info = machine()
    ours_label = f"ours {args.dtype}"
    print(f"machine: {info['cpu']}, {info['cores']} cores ({', '.join(info['simd']) or 'no AVX2/AVX-512'}); "
          f"torch {info['torch']}; Python {info['python']}")
    print(f"checkpoint: {model_dir}")
    if peer_url:
        version = f", version {peer['version']}" if peer.get("version") else ""
        print(f"peer: {peer_url}, model id {peer_model!r}{version}")
    max_batch = args.max_batch or max(*levels, args.choices if args.shared_prompt_tokens else 1)
    from serving.settings import ServerSettings

    stream_batch_ms = ServerSettings(variants={}).stream_batch_ms if args.stream_batch_ms is None \
        else args.stream_batch_ms
    print(f"greedy streamed completions, at most {args.tokens} tokens; our server: {args.threads} torch threads, "
          f"max_batch {max_batch}, stream_batch_ms {stream_batch_ms:g}; figures depend on what else runs on the "
          "machine", flush=True)

    print("measuring in this process first (no HTTP, no Ray): each level's prompts in one batch, then the engine",
          flush=True)
    same = {"tokens": args.tokens, "threads": args.threads, "repeats": args.reference_repeats, "levels": levels,
            "requests_per_level": args.requests_per_level, "max_batch": max_batch}
    local = {ours_label: in_process(model_dir, args.dtype, "none", **same)}
    if args.int8:
        local["ours int8"] = in_process(model_dir, "fp32", "int8", **same)

    variants = {OURS: {"source": str(model_dir), "dtype": args.dtype}}
    if args.int8:  # int8 dynamic quantization computes from fp32 weights
        variants[OURS_INT8] = {"source": str(model_dir), "dtype": "fp32", "quantize": "int8"}
    ours_headers = auth_headers(os.environ.get("GPT2_API_KEY"))  # the server requires it when it is set
    servers = [(ours_label, None, OURS, ours_headers)]
    if args.int8:
        servers.append(("ours int8", None, OURS_INT8, ours_headers))
    if peer_url:
        servers.append(("peer", peer_url, peer_model, auth_headers(args.peer_api_key)))

    init_ray("local", num_cpus=2)
    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: list[LevelResult] = []
    shared: list[SharedPromptResult] = []
    beginnings: list[SharedBeginningResult] = []
    stats = None
    try:
        settings = {"variants": variants, "max_batch": max_batch, "max_pending": 64,
                    "torch_threads": args.threads, "model_replica_cpus": 1}
        if args.stream_batch_ms is not None:
            settings["stream_batch_ms"] = args.stream_batch_ms
        ray_serve.run(build_app(settings), name="bench", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        servers = [(label, url or base, model, headers) for label, url, model, headers in servers]
        for label, url, model, headers in servers:  # warm-up: loads the variant, opens the path
            warm = asyncio.run(closed_loop(url, model, label, 1, 1, min(args.tokens, 8), headers))
            if warm.errors:
                print(f"warm-up of {label} failed: {warm.error_samples[0]}", flush=True)
        for c in levels:  # per level, every server one after the other, so they meet the same machine state
            rows = [asyncio.run(closed_loop(url, model, label, c, args.requests_per_level * c, args.tokens, headers))
                    for label, url, model, headers in servers]
            results.extend(rows)
            print_level(rows, args.tokens, rows[-1] if peer_url else None)
            sys.stdout.flush()
        if args.shared_prompt_tokens:
            shared = [shared_prompt(url, model, label, headers, args.shared_prompt_tokens, args.choices,
                                    args.reference_repeats, seed=0) for label, url, model, headers in servers]
            print_shared_prompt(shared, args.shared_prompt_tokens, args.choices)
            beginnings = [shared_beginning(url, model, label, headers, args.shared_prompt_tokens,
                                           args.reference_repeats, seed=1) for label, url, model, headers in servers]
            print_shared_beginning(beginnings, args.shared_prompt_tokens)
        try:
            stats = httpx.get(f"{base}/v1/stats", timeout=30, headers=ours_headers).json()
        except (httpx.HTTPError, ValueError):
            stats = None
    finally:
        ray_serve.shutdown()

    print_breakdown(local, results)
    print()
    for label, measured in local.items():
        print(f"in-process gpt2.generate.generate, batch 1, {label.removeprefix('ours ')}: "
              f"{measured.batch1_tokens_per_s:.1f} tokens/s")
    single = next((r for r in results if r.server == ours_label and r.concurrency == 1 and r.tokens), None)
    if single:
        eight = next((r for r in results if r.server == ours_label and r.concurrency == 8), None)
        if eight:
            print(f"batched decoding, concurrency 8 vs 1 ({ours_label}): "
                  f"{eight.tokens_per_s / single.tokens_per_s:.2f}x (goal >= 3x)")
    if isinstance(stats, dict) and isinstance(stats.get(OURS), dict) and "mean_batch" in stats[OURS]:
        s = stats[OURS]
        print(f"engine ({ours_label}): mean batch {s['mean_batch']:.2f} over {s.get('decode_steps')} decoding steps")
    errors = sum(r.errors for r in results)
    if errors:
        print(f"{errors} request(s) failed; see the lines marked ! above")

    return {
        "machine": info,
        "checkpoint": str(model_dir),
        "settings": {"dtype": args.dtype, "int8": args.int8, "tokens": args.tokens, "levels": levels,
                     "requests_per_level": args.requests_per_level, "max_batch": max_batch,
                     "threads": args.threads, "stream_batch_ms": stream_batch_ms, "temperature": 0, "stream": True},
        "peer": {"url": peer_url, "model": peer_model, **peer} if peer_url else None,
        "in_process": {label: asdict(measured) for label, measured in local.items()},
        "levels": [asdict(r) for r in results],
        "shared_prompt": {"prompt_tokens": args.shared_prompt_tokens, "choices": args.choices,
                          "servers": [asdict(r) for r in shared]},
        "shared_beginning": {"prompt_tokens": args.shared_prompt_tokens, "servers": [asdict(r) for r in beginnings]},
        "ratios_ours_over_peer": [
            {"concurrency": r.concurrency, "server": r.server,
             "tokens_per_s": r.tokens_per_s / p.tokens_per_s if p.tokens_per_s else None,
             "ttft_p50": r.ttft_p50_s / p.ttft_p50_s if r.ttft_p50_s and p.ttft_p50_s else None}
            for r in results if r.server != "peer"
            for p in results if p.server == "peer" and p.concurrency == r.concurrency
        ],
        "engine_stats": stats,
    }


if __name__ == "__main__":
    main()
