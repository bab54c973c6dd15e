"""The in-process half of benchmarks/bench_serve.py (the model in one batch, the engine's closed loop) on a tiny model:
what it counts, and that it leaves no decoding thread behind. Timings are printed by the benchmark, never asserted."""

from __future__ import annotations

import threading
import time

import torch

from benchmarks.bench_serve import in_process
from benchmarks.engine_load import closed_loop
from gpt2 import GPT, preset
from serving.engine import DecodeEngine


def test_closed_loop_keeps_its_requests_in_flight_and_counts_every_token(tiny_model):
    engine = DecodeEngine(tiny_model, max_batch=3, max_pending=3)
    try:
        load = closed_loop(engine, [[1, 2, 3], [4, 5]], concurrency=3, requests=7, tokens=5)
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["requests_finished"] == 7 and stats["finished_by_reason"]["length"] == 7
    assert stats["tokens_generated"] == 7 * 5  # end-of-text ignored: every request makes all its tokens
    assert stats["mean_batch"] > 1  # the requests shared decoding steps
    assert load.tokens_per_s > 0 and load.ttft_p50_s > 0


def test_in_process_measures_every_level_and_ends_its_decoding_thread(tmp_path):
    torch.manual_seed(0)
    GPT(preset("tiny")).save_pretrained(str(tmp_path / "tiny"))
    measured = in_process(tmp_path / "tiny", "fp32", "none", tokens=4, threads=1, repeats=1, levels=[1, 3],
                          requests_per_level=2, max_batch=3)
    assert [x.concurrency for x in measured.levels] == [1, 3]
    assert measured.batch1_tokens_per_s > 0
    for level in measured.levels:
        assert level.batch_tokens_per_s > 0 and level.engine_tokens_per_s > 0 and level.engine_ttft_p50_s > 0
    # Its decoding thread was private to the engine: closing the engine ends it (and its OpenMP team) at once.
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.name == "bench-in-process"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t for t in threading.enumerate() if t.name == "bench-in-process"]
