"""Pretraining throughput through Ray Train vs a plain loop, measured side by side in one run.

1. Ray Train overhead: the same config (the `small` model, `--micro-batch` × 256-token micro-batches, 8 by default)
   through Ray Train with one worker vs a plain in-process loop calling the same `gpt2.train.train_step`, both on
   2 threads. Goal ≤ 5%.
2. CPU data parallelism: 2 workers × 1 thread vs 1 worker × 2 threads (both through Ray Train).
3. The loader's share of step time (goal < 2%).

Tokens/s are wall-clock figures over the steps after the first `--warmup` (from the time each step's metrics were
logged, so whatever holds a worker between its steps counts), next to the median step's own time, which leaves
that out. Small micro-batches make short steps, where a per-step cost of the Ray path shows most.

  python -m benchmarks.bench_pretrain [--steps 20] [--micro-batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from cluster.runtime.ray_env import PROJECT_ROOT, init_ray
from cluster.runtime.tracking import read_metrics
from cluster.train.pretrain import run_pretraining
from gpt2 import GPT
from gpt2.data import ShardedTokenLoader
from gpt2.train import make_optimizer, seed_everything, train_step

DATA = PROJECT_ROOT / "data" / "pydocs"


def ensure_data() -> None:
    if (DATA / "manifest.json").exists():
        return
    from cluster.data.prepare import PYTHON_DOCS_VAL_TOKENS, PrepareConfig, prepare_data
    from cluster.data.sources import SourceSpec

    prepare_data(PrepareConfig(SourceSpec(), str(DATA), "pydocs", val_tokens=PYTHON_DOCS_VAL_TOKENS))


def config(root: Path, name: str, steps: int, workers: int, threads: int, micro: int) -> PretrainConfig:
    T = 256
    return load(
        PretrainConfig,
        None,
        [
            "model.preset=small", f"data.shards={DATA}", f"train.seq_len={T}", f"train.micro_batch={micro}",
            f"train.total_batch_tokens={2 * micro * T}", f"train.max_steps={steps}", "train.autocast=fp32",
            "eval.val_every=0", "eval.sample_every=0", "checkpoint.every=0", f"scaling.num_workers={workers}",
            "scaling.use_gpu=false", f"scaling.cpus_per_worker={threads}", f"scaling.threads_per_worker={threads}",
            f"run.root={root}", f"run.name={name}",
        ],
    )


def steady(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:])


def step_ends(rows: list[dict]) -> list[float]:
    """When each training step of a run ended (its metrics record's time, in seconds)."""
    return [r["time"] / 1000 for r in rows if "loss" in r]


def wall_clock(ends: list[float], tokens_per_step: int, warmup: int) -> float:
    """Tokens/s between the end of step `warmup` and the end of the last step (`ends` in seconds)."""
    return tokens_per_step * (len(ends) - 1 - warmup) / (ends[-1] - ends[warmup])


def plain_loop(cfg: PretrainConfig, warmup: int) -> tuple[float, float, float]:
    """(wall-clock tokens/s, median step's tokens/s, loader share) of the same steps in this process, no Ray."""
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model.build())
    opt = make_optimizer(model, cfg.train, "cpu")
    loader = ShardedTokenLoader(cfg.data.shards, cfg.train.micro_batch, cfg.train.seq_len, split="train", seed=cfg.train.seed)
    batches = iter(loader)
    accum = cfg.train.grad_accum_steps(1)
    stats, ends = [], []
    for s in range(cfg.train.max_steps):
        stats.append(train_step(model, opt, batches, s, cfg.train, accum, device=torch.device("cpu")))
        ends.append(time.time())
    return (wall_clock(ends, stats[0].tokens, warmup), steady([s.tokens / s.seconds for s in stats], warmup),
            steady([s.data_seconds / s.seconds for s in stats], warmup))


def through_ray(cfg: PretrainConfig, warmup: int, tracking: str) -> tuple[float, float, float]:
    result = run_pretraining(cfg, tracking)
    if result.error:
        raise RuntimeError(result.error)
    rows = [r for r in read_metrics(cfg.run_dir()) if "loss" in r]
    tokens = cfg.train.total_batch_tokens
    return (wall_clock(step_ends(rows), tokens, warmup), steady([r["tokens_per_s"] for r in rows], warmup),
            steady([r["data_share"] for r in rows], warmup))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences of 256 tokens per worker and step")
    args = p.parse_args()
    micro = args.micro_batch
    init_ray()
    ensure_data()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracking = f"sqlite:///{root / 'mlflow.db'}"
        plain, plain_step, plain_data = plain_loop(config(root, "plain", args.steps, 1, 2, micro), args.warmup)
        ray1, ray1_step, ray1_data = through_ray(config(root, "ray-1x2", args.steps, 1, 2, micro), args.warmup, tracking)
        ray2, ray2_step, ray2_data = through_ray(config(root, "ray-2x1", args.steps, 2, 1, micro), args.warmup, tracking)
    print(f"\n## Pretraining throughput, `small` model, {2 * micro} × 256 tokens per step, fp32, {args.steps} steps"
          f" (wall clock after step {args.warmup})")
    print("| setup | tokens/s | median step alone, tokens/s | loader share of step time |")
    print("|---|---|---|---|")
    print(f"| plain loop, 1 process × 2 threads | {plain:.0f} | {plain_step:.0f} | {plain_data:.2%} |")
    print(f"| Ray Train, 1 worker × 2 threads | {ray1:.0f} | {ray1_step:.0f} | {ray1_data:.2%} |")
    print(f"| Ray Train, 2 workers × 1 thread (DDP, gloo) | {ray2:.0f} | {ray2_step:.0f} | {ray2_data:.2%} |")
    print(f"\nRay Train overhead vs plain loop: {1 - ray1 / plain:+.1%} (goal ≤ 5%)")
    print(f"2 workers × 1 thread vs 1 worker × 2 threads: {ray2 / ray1:.2f}x")


if __name__ == "__main__":
    main()
