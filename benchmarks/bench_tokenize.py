"""Tokenizing a corpus into shards: the Ray Data job vs a single-process loop vs a multiprocessing.Pool, side by side,
and the machine's limit.

The corpus is the python-docs text repeated into .jsonl files, at two sizes. All three methods read those files,
tokenize with the same GPT-2 encoding and write shards through the same ShardWriter; the benchmark checks that every
run wrote identical bytes. Each run is a fresh subprocess, so its peak memory is its own. Each method runs `--repeats`
times, in turn with the others; the table shows its fastest time (the machine may be doing other work) and its
highest memory:
- "writer" is the process that writes the shards (the Ray driver, the Pool's parent, the single process);
- "workers" is the largest sum of the helper processes' RSS seen while it ran (Pool children; Ray's worker
  processes — tokenizer actors, read tasks and idle workers — but not Ray's own daemons);
- "CPU s" is the CPU time of the measured work in this process and every process under it (for Ray, its daemons
  too): on a busy machine the wall-clock figures swing with the other work, tokens per CPU-second much less.
  Below each table the CPU time is split by process: the writer, the Pool's workers, Ray's tokenizer actors, its
  read tasks, Ray Data's helper actors and agents, and Ray's daemons (raylet, GCS, dashboard);
- "N processes, read+tokenize" is the machine's limit for any method: N processes that each read and tokenize their
  share of the files and keep only a count, writing nothing and sending nothing between them. Against it the goal
  (0.8 × cores × single) can be judged: no method that also orders the stream and writes shards can pass it.
Peak memory should not grow with the corpus. Every time is the whole job, start to last shard; for Ray that includes
starting its worker processes and actors, shown separately as "first tokens after" (the other methods start in
about a second), which is why Ray needs a large corpus to pay off; "once running" is Ray's rate from its first to its
last written block. Ray starts its workers at nice 15 by default, behind every ordinary process; here they run at
nice 0 (RAY_worker_niceness=0) so that on a machine doing other work the three methods compete on equal terms.

    .venv/bin/python -m benchmarks.bench_tokenize [--copies 64 256] [--repeats 2] [--workers N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

SHARD_TOKENS = 2_000_000
VAL_TOKENS = 100_000
DOCS_PER_BATCH = 256
MIN_RUNNING_S = 2.0


def write_corpus(directory: Path, copies: int) -> int:
    """`copies` .jsonl files, each the whole python-docs corpus; returns the total bytes."""
    from gpt2.corpus import python_docs_documents

    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": doc.text}) + "\n" for doc in python_docs_documents())
    for i in range(copies):
        (directory / f"part_{i:04d}.jsonl").write_text(lines)
    return len(lines.encode()) * copies


def _texts_of(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def iter_texts(directory: Path) -> Iterator[str]:
    for path in sorted(directory.glob("*.jsonl")):
        yield from _texts_of(path)


def encode(text: str) -> np.ndarray:
    """EOT + the document's ids, exactly as the pipeline's tokenizer actors produce them."""
    from gpt2.config import EOT_TOKEN
    from gpt2.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.concatenate(([EOT_TOKEN], ids)).astype(np.uint16)


def write_batches(writer, encoded: Iterator[np.ndarray]) -> None:
    batch: list[np.ndarray] = []
    for doc in encoded:
        batch.append(doc)
        if len(batch) == DOCS_PER_BATCH:
            writer.add_documents(np.concatenate(batch), np.array([len(d) for d in batch]))
            batch = []
    if batch:
        writer.add_documents(np.concatenate(batch), np.array([len(d) for d in batch]))


def run_single(corpus: Path, out: Path, workers: int, start_clock: Callable[[], float]) -> dict:
    from gpt2.shards import ShardWriter

    started = start_clock()
    with ShardWriter(out, "bench", shard_tokens=SHARD_TOKENS, val_tokens=VAL_TOKENS) as writer:
        write_batches(writer, (encode(t) for t in iter_texts(corpus)))
        writer.close()
    return {"seconds": time.perf_counter() - started, "tokens": writer.tokens}


def run_pool(corpus: Path, out: Path, workers: int, start_clock: Callable[[], float]) -> dict:
    from gpt2.shards import ShardWriter

    started = start_clock()
    with (
        multiprocessing.get_context("fork").Pool(workers) as pool,
        ShardWriter(out, "bench", shard_tokens=SHARD_TOKENS, val_tokens=VAL_TOKENS) as writer,
    ):
        write_batches(writer, pool.imap(encode, iter_texts(corpus), chunksize=16))  # imap keeps the order
        writer.close()
    return {"seconds": time.perf_counter() - started, "tokens": writer.tokens}


def _count_tokens(files: list[Path]) -> int:
    return sum(len(encode(text)) for path in files for text in _texts_of(path))


def run_limit(corpus: Path, out: Path, workers: int, start_clock: Callable[[], float]) -> dict:
    """The machine's limit for any method: `workers` processes that each read and tokenize their share of the
    files and keep only a count, with no writing, no ordering and nothing sent between them."""
    files = sorted(corpus.glob("*.jsonl"))
    started = start_clock()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        tokens = sum(pool.map(_count_tokens, [files[i::workers] for i in range(workers)]))
    return {"seconds": time.perf_counter() - started, "tokens": tokens}


def run_ray(corpus: Path, out: Path, workers: int, start_clock: Callable[[], float]) -> dict:
    from cluster.data.prepare import PrepareConfig, prepare_data
    from cluster.data.sources import SourceSpec
    from cluster.runtime.ray_env import init_ray

    init_ray("local", num_cpus=workers)
    config = PrepareConfig(
        SourceSpec("files", (str(corpus),)),
        str(out),
        "bench",
        shard_tokens=SHARD_TOKENS,
        val_tokens=VAL_TOKENS,
        tokenizers=workers,
    )
    reports = []  # (time, tokens written) after every block
    started = start_clock()  # after init_ray: on a cluster Ray is already running
    summary = prepare_data(
        config, on_progress=lambda p: reports.append((time.perf_counter(), p.tokens)), progress_interval_s=0
    )
    seconds = time.perf_counter() - started
    (first_at, first_tokens), (last_at, last_tokens) = reports[0], reports[-1]
    result = {"seconds": seconds, "tokens": summary.tokens, "first_tokens_s": first_at - started}
    if last_at - first_at >= MIN_RUNNING_S:  # else the blocks all arrived together and a rate means nothing
        result["running"] = (last_tokens - first_tokens) / (last_at - first_at)
    return result


METHODS = {"single": run_single, "pool": run_pool, "ray": run_ray, "limit": run_limit}
WRITES_NOTHING = {"limit"}


ROLES = ("this process", "Pool workers", "tokenizer actors", "read tasks", "Ray Data helpers", "Ray daemons")


def process_role(cmdline: list[str], my_cmdline: list[str]) -> str:
    """Which part of a method a process is, from its command line (Ray titles its workers `ray::<what runs>`)."""
    if cmdline == my_cmdline:
        return "Pool workers"  # forks carry the parent's command line
    title = cmdline[0] if cmdline else ""
    if "MapWorker" in title:
        return "tokenizer actors"
    if title.startswith(("ray::IDLE", "ray::Read")):
        return "read tasks"  # Ray Data's read tasks run in pooled workers, `ray::IDLE` between tasks
    if title.startswith("ray::"):
        return "Ray Data helpers"  # the stats, autoscaling and location-tracking actors, Ray's agents
    return "Ray daemons"  # raylet, GCS, dashboard


class ProcessSampler:
    """Every 50 ms: the summed RSS of the helper processes (peak kept) and the CPU time of every process started
    under this one (helpers, and for Ray also its daemons: they are part of the cost of the method), by role."""

    def __init__(self) -> None:
        self.helpers_peak_rss = 0
        self._me = psutil.Process()
        self._my_cmdline = self._me.cmdline()
        self._cpu_by_pid: dict[int, float] = {}
        # A Ray worker process changes jobs (idle, a read task, an actor), so each sample's CPU time goes to the role
        # the process had at that sample.
        self._cpu_by_role: dict[str, float] = {}
        self._own_cpu_at_start = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start_clock(self) -> float:
        """Mark the start of the measured work (after imports and Ray's start-up); returns perf_counter()."""
        with self._lock:
            self._sample()
            self._cpu_by_role = {}
            self._own_cpu_at_start = self._own_cpu()
        return time.perf_counter()

    def cpu_since_start(self) -> dict[str, float]:
        """CPU seconds since start_clock, by role (ROLES); roles that used none are left out."""
        with self._lock:
            self._sample()
            by_role = {**self._cpu_by_role, "this process": self._own_cpu() - self._own_cpu_at_start}
        return {role: by_role[role] for role in ROLES if by_role.get(role, 0.0) > 0.05}

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _own_cpu(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                self._sample()

    def _sample(self) -> None:
        rss = 0
        for child in self._me.children(recursive=True):
            try:
                times = child.cpu_times()
                role = process_role(child.cmdline(), self._my_cmdline)
                if role != "Ray daemons":
                    rss += child.memory_info().rss
            except psutil.Error:
                continue
            cpu = times.user + times.system
            self._cpu_by_role[role] = self._cpu_by_role.get(role, 0.0) + cpu - self._cpu_by_pid.get(child.pid, 0.0)
            self._cpu_by_pid[child.pid] = cpu
        self.helpers_peak_rss = max(self.helpers_peak_rss, rss)


def measure(method: str, corpus: Path, out: Path, workers: int) -> dict:
    """Runs inside a fresh subprocess (see main)."""
    import cluster.data.prepare  # noqa: F401  imported before the clock starts, for every method alike

    with ProcessSampler() as sampler:
        result = METHODS[method](corpus, out, workers, sampler.start_clock)
        result["cpu_by_role"] = sampler.cpu_since_start()
        result["cpu_s"] = sum(result["cpu_by_role"].values())
    result["writer_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["workers_peak_mb"] = sampler.helpers_peak_rss / 2**20
    if method not in WRITES_NOTHING:
        result["sha256"] = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("*.bin")))).hexdigest()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--copies",
        type=int,
        nargs=2,
        default=[64, 256],
        help="two corpus sizes, in copies of the python-docs corpus (~0.52M tokens each)",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="Pool processes and Ray tokenizers")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each method, taken in turn; the fastest counts (noise)"
    )
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, corpus, out = args.one
        print(json.dumps(measure(method, Path(corpus), Path(out), args.workers)))
        return

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; workers={args.workers}")
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        for copies in args.copies:
            corpus = Path(tmp) / f"corpus_{copies}"
            size = write_corpus(corpus, copies)
            runs: dict[str, list[dict]] = {method: [] for method in METHODS}
            for repeat in range(args.repeats):  # in turn, so a burst of load elsewhere hits every method alike
                for method in METHODS:
                    out = Path(tmp) / f"out_{copies}_{method}_{repeat}"
                    out.mkdir()
                    runs[method].append(run_method(method, corpus, out, args.workers))
            if len({r["sha256"] for method_runs in runs.values() for r in method_runs if "sha256" in r}) != 1:
                raise SystemExit(f"the runs wrote different shards for {copies} copies: {runs}")
            results = {
                method: {
                    **min(method_runs, key=lambda r: r["seconds"]),
                    "writer_peak_mb": max(r["writer_peak_mb"] for r in method_runs),
                    "workers_peak_mb": max(r["workers_peak_mb"] for r in method_runs),
                }
                for method, method_runs in runs.items()
            }
            print_table(size, results, args.workers)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; every run wrote byte-identical shards")


def run_method(method: str, corpus: Path, out: Path, workers: int) -> dict:
    """One measurement in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, "-m", "benchmarks.bench_tokenize", "--workers", str(workers), "--one", method]
    env = {**os.environ, "RAY_worker_niceness": "0"}
    done = subprocess.run([*cmd, str(corpus), str(out)], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(corpus_bytes: int, results: dict[str, dict], workers: int) -> None:
    names = {
        "single": "single process",
        "pool": f"multiprocessing.Pool({workers})",
        "ray": f"Ray Data ({workers} actors)",
        "limit": f"{workers} processes, read+tokenize",
    }
    print(
        f"\n{'corpus':>22}  {'method':<30}{'seconds':>8}{'tokens/s':>12}{'× single':>10}{'CPU s':>8}"
        f"{'tok/CPU-s':>11}{'writer MB':>11}{'workers MB':>12}  first tokens after"
    )
    label = f"{results['single']['tokens'] / 1e6:.1f}M tok, {corpus_bytes / 1e6:.0f} MB"
    base = results["single"]["tokens"] / results["single"]["seconds"]
    for method, r in results.items():
        rate = r["tokens"] / r["seconds"]
        first = f"{r['first_tokens_s']:.1f} s" if "first_tokens_s" in r else ""
        memory = "" if method in WRITES_NOTHING else f"{r['writer_peak_mb']:>11.0f}{r['workers_peak_mb']:>12.0f}"
        print(
            f"{label:>22}  {names[method]:<30}{r['seconds']:>8.1f}{rate:>12,.0f}{rate / base:>10.2f}"
            f"{r['cpu_s']:>8.1f}{r['tokens'] / r['cpu_s']:>11,.0f}{memory}  {first}"
        )
        if "running" in r:
            print(f"{'':>22}  {'  once running':<30}{'':>8}{r['running']:>12,.0f}{r['running'] / base:>10.2f}")
        label = ""
    print(f"{'':>22}  goal: 0.8 × {workers} cores × single = {0.8 * workers * base:,.0f} tokens/s")
    print(f"{'':>22}  CPU seconds by process (the limit's are all reading and tokenizing):")
    for method in ("single", "pool", "ray"):
        parts = ", ".join(f"{role} {cpu:.1f}" for role, cpu in results[method]["cpu_by_role"].items())
        print(f"{'':>22}    {names[method]}: {parts}")


if __name__ == "__main__":
    main()
