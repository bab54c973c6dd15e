"""A closed-loop load on `serving.engine.DecodeEngine` in this process: continuous batching measured without HTTP,
Ray Serve or a client process. Shared by bench_serve (the in-process rows of each level) and gpu_check (the
engine's speed on a GPU); neither needs Ray for it.
"""

from __future__ import annotations

import itertools
import queue
import statistics
import time
from dataclasses import dataclass

from gpt2.sampling import SamplingParams
from serving.engine import DecodeEngine, Finished, Token


@dataclass(frozen=True)
class EngineLoad:
    tokens_per_s: float  # generated tokens over the whole run
    ttft_p50_s: float  # submit to the first token, median over the requests


def closed_loop(
    engine: DecodeEngine, prompts: list[list[int]], concurrency: int, requests: int, tokens: int
) -> EngineLoad:
    """Greedy requests of `tokens` tokens each (end-of-text ignored), `concurrency` of them always in flight (each
    finished one replaced by the next prompt, cycling through `prompts`) until `requests` have finished."""
    finished: queue.Queue[Finished] = queue.Queue()
    counted = itertools.count()  # advanced on the engine thread only
    ttfts: list[float] = []
    params = SamplingParams(temperature=0, ignore_eos=True)
    sent = 0

    def submit() -> None:
        nonlocal sent
        sent_at, first = time.perf_counter(), [True]

        def on_event(event: object) -> None:  # called on the decoding thread
            if isinstance(event, Token):
                next(counted)
                if first[0]:
                    first[0] = False
                    ttfts.append(time.perf_counter() - sent_at)
            elif isinstance(event, Finished):
                finished.put(event)

        engine.submit(prompts[sent % len(prompts)], tokens, params, on_event)
        sent += 1

    start = time.perf_counter()
    for _ in range(min(concurrency, requests)):
        submit()
    for _ in range(requests):
        event = finished.get(timeout=300)
        if event.reason != "length":
            raise RuntimeError(f"an engine request ended with {event.reason}: {event.error}")
        if sent < requests:
            submit()
    elapsed = time.perf_counter() - start
    return EngineLoad(next(counted) / elapsed, statistics.median(ttfts))

