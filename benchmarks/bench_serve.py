"""Serving throughput and latency through Ray Serve + HTTP, side by side with in-process generation, in one run.

The 124M shape (random weights: speed does not depend on what the weights learned), 64-token completions:
1. Throughput and p50/p99 latency at concurrency 1, 4, 8, 16 over real HTTP (the server's continuous batching
   decodes concurrent requests together).
2. HTTP + Serve overhead: concurrency 1 through the server vs `gpt2.generate.generate` in this process on the same
   number of threads (goal ≤ 15%).
3. Batched decoding: throughput at concurrency 8 vs one request at a time (goal ≥ 3×; decoding is bound by memory
   bandwidth, so a batch reads the weights once for all its rows).

  python -m benchmarks.bench_serve [--tokens 64 --requests-per-level 2 --threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from cluster.ray_env import init_ray  # first: the cluster package sets Ray's auth mode before Ray is imported
from gpt2 import GPT, preset
from gpt2.generate import generate
from gpt2.tokenizer import get_tokenizer

PROMPTS = [
    "The history of the city begins",
    "In computer science, a hash table",
    "The recipe calls for two cups of",
    "Once upon a time, in a small village",
]


def in_process(model_dir: Path, tokens: int, threads: int, repeats: int) -> float:
    """Tokens/s of plain KV-cached generation, batch 1, in this process."""
    torch.set_num_threads(threads)
    model = GPT.from_pretrained(str(model_dir)).eval()
    enc = get_tokenizer()
    generate(model, enc.encode(PROMPTS[0]), 4, temperature=0)  # warm-up
    start, produced = time.perf_counter(), 0
    for i in range(repeats):
        produced += len(generate(model, enc.encode(PROMPTS[i % len(PROMPTS)]), tokens, temperature=0, stop_at_eot=False)[0])
    return produced / (time.perf_counter() - start)


async def load_level(base: str, concurrency: int, requests: int, tokens: int) -> dict:
    latencies, produced = [], 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            nonlocal produced
            body = {"model": "gpt2-124m", "prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})", "max_tokens": tokens,
                    "temperature": 0.8, "seed": i}
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(f"{base}/v1/completions", json=body)
                latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            produced += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": requests, "tokens_per_s": produced / elapsed,
        "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=2, help="requests per concurrency level = this × level")
    p.add_argument("--threads", type=int, default=2, help="torch threads, in the replica and in-process alike")
    p.add_argument("--levels", default="1,4,8,16")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from ray import serve as ray_serve

    from cluster.tracking import free_port
    from serve.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gpt2-124m"
        torch.manual_seed(0)
        GPT(preset("gpt2")).save_pretrained(str(model_dir))
        baseline = in_process(model_dir, args.tokens, args.threads, repeats=3)

        init_ray("local", num_cpus=2)
        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {"variants": {"gpt2-124m": {"source": str(model_dir), "dtype": "fp32"}}, "max_batch": max(levels),
                    "max_pending": 64, "torch_threads": args.threads, "model_replica_cpus": 1}
        ray_serve.run(build_app(settings), name="bench", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        asyncio.run(load_level(base, 1, 1, 4))  # loads the variant and warms the path up
        results = [asyncio.run(load_level(base, c, args.requests_per_level * c, args.tokens)) for c in levels]
        stats = httpx.get(f"{base}/v1/stats").json()["gpt2-124m"]
        ray_serve.shutdown()

    print(f"GPT-2 124M shape, fp32, {args.tokens}-token completions, {args.threads} torch threads")
    print(f"{'concurrency':>11} {'requests':>8} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['tokens_per_s']:>9.1f} {r['p50']:>7.2f} {r['p99']:>7.2f}")
    single = next(r for r in results if r["concurrency"] == 1)
    print(f"in-process generate, batch 1: {baseline:.1f} tokens/s")
    print(f"HTTP + Serve overhead at concurrency 1: {100 * (1 - single['tokens_per_s'] / baseline):.1f}% (goal <= 15%)")
    if any(r["concurrency"] == 8 for r in results):
        eight = next(r for r in results if r["concurrency"] == 8)
        print(f"batched decoding, concurrency 8 vs 1: {eight['tokens_per_s'] / single['tokens_per_s']:.2f}x (goal >= 3x)")
    print(f"engine: mean batch {stats['mean_batch']:.2f} over {stats['decode_steps']} decoding steps")


if __name__ == "__main__":
    main()
