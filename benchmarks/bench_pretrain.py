"""Pretraining throughput through Ray Train vs a plain loop, measured side by side in one run.

1. Ray Train overhead: the same config (the `small` model, 8 × 256-token micro-batches) through Ray Train with one
   worker vs a plain in-process loop calling the same `gpt2.train.train_step`, both on 2 threads. Goal ≤ 5%.
2. CPU data parallelism: 2 workers × 1 thread vs 1 worker × 2 threads (both through Ray Train).
3. The loader's share of step time (goal < 2%).

Tokens/s are steady-state figures: the median step time after the first `--warmup` steps.

  python -m benchmarks.bench_pretrain [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
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


def config(root: Path, name: str, steps: int, workers: int, threads: int) -> PretrainConfig:
    micro, T = 8, 256
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


def plain_loop(cfg: PretrainConfig, warmup: int) -> tuple[float, float]:
    """(tokens/s, loader share) of the same steps in this process, no Ray."""
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model.build())
    opt = make_optimizer(model, cfg.train, "cpu")
    loader = ShardedTokenLoader(cfg.data.shards, cfg.train.micro_batch, cfg.train.seq_len, split="train", seed=cfg.train.seed)
    batches = iter(loader)
    accum = cfg.train.grad_accum_steps(1)
    stats = [train_step(model, opt, batches, s, cfg.train, accum, device=torch.device("cpu")) for s in range(cfg.train.max_steps)]
    return steady([s.tokens / s.seconds for s in stats], warmup), steady([s.data_seconds / s.seconds for s in stats], warmup)


def through_ray(cfg: PretrainConfig, warmup: int, tracking: str) -> tuple[float, float]:
    result = run_pretraining(cfg, tracking)
    if result.error:
        raise RuntimeError(result.error)
    rows = [r for r in read_metrics(cfg.run_dir()) if "loss" in r]
    return steady([r["tokens_per_s"] for r in rows], warmup), steady([r["data_share"] for r in rows], warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    init_ray()
    ensure_data()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracking = f"sqlite:///{root / 'mlflow.db'}"
        plain, plain_data = plain_loop(config(root, "plain", args.steps, 1, 2), args.warmup)
        ray1, ray1_data = through_ray(config(root, "ray-1x2", args.steps, 1, 2), args.warmup, tracking)
        ray2, ray2_data = through_ray(config(root, "ray-2x1", args.steps, 2, 1), args.warmup, tracking)
    print(f"\n## Pretraining throughput, `small` model, 16 × 256 tokens per step, fp32, {args.steps} steps (median after {args.warmup})")
    print("| setup | tokens/s | loader share of step time |")
    print("|---|---|---|")
    print(f"| plain loop, 1 process × 2 threads | {plain:.0f} | {plain_data:.2%} |")
    print(f"| Ray Train, 1 worker × 2 threads | {ray1:.0f} | {ray1_data:.2%} |")
    print(f"| Ray Train, 2 workers × 1 thread (DDP, gloo) | {ray2:.0f} | {ray2_data:.2%} |")
    print(f"\nRay Train overhead vs plain loop: {1 - ray1 / plain:+.1%} (goal ≤ 5%)")
    print(f"2 workers × 1 thread vs 1 worker × 2 threads: {ray2 / ray1:.2f}x")


if __name__ == "__main__":
    main()
