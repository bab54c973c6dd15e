"""What one training checkpoint of a recipe costs, in storage and in time, side by side with the disk's own speed.

The checkpoint is rank 0's part as `cluster/train/pretrain.py` writes it (`gpt2.train_checkpoint.save_training_checkpoint`):
the recipe's model with random fp32 weights, an AdamW state with both moments filled, the loader position and RNG,
written and fsynced to a temporary folder that is then renamed. Beside it, the same number of bytes written and
fsynced as one plain file: the ratio says how close the save comes to the disk, so the figure on another machine or
on a cluster's shared storage follows from that storage's write bandwidth. On a cluster Ray Train then copies the
folder from the node's temporary directory to `storage_path` inside `ray.train.report` (every rank waits for it).

  python -m benchmarks.bench_checkpoint [--config configs/gpt2-124m-fineweb-edu.yaml] [--dir /tmp] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from gpt2 import GPT
from gpt2.data import ShardedTokenLoader
from gpt2.shards import shard_file_name, write_shard
from gpt2.train import make_optimizer, seed_everything
from gpt2.train_checkpoint import save_training_checkpoint

MB = 1e6


def filled_optimizer(model: GPT, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The recipe's AdamW after one step, so its state holds both fp32 moments of every parameter, as in training."""
    optimizer = make_optimizer(model, cfg.train, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def plain_write(path: Path, n_bytes: int, chunk: int = 64 << 20) -> float:
    """Seconds to write and fsync `n_bytes` of random data as one file (deleted afterwards)."""
    data = np.random.default_rng(0).integers(0, 256, size=min(chunk, n_bytes), dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            left -= f.write(data[: min(left, len(data))])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt2-124m-fineweb-edu.yaml", help="the recipe whose model to save")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (the disk being measured)")
    parser.add_argument("--rounds", type=int, default=3, help="saves to time; the median is reported")
    args = parser.parse_args()

    cfg = load(PretrainConfig, args.config, [])
    seed_everything(0)
    model = GPT(cfg.model.build())
    optimizer = filled_optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        work = Path(work)
        tokens = np.random.default_rng(0).integers(0, 50257, size=4 * (cfg.train.seq_len + 1), dtype=np.uint16)
        write_shard(work / shard_file_name("bench", "train", 0), tokens)
        loader = ShardedTokenLoader(str(work / "*.bin"), 1, cfg.train.seq_len, split="train", seed=0)

        seconds, sizes = [], {}
        for i in range(args.rounds):
            target = work / f"round{i}"
            target.mkdir()
            start = time.perf_counter()
            ckpt = save_training_checkpoint(model, optimizer, loader, 0, {"step": 1000, "best_val_loss": 3.3}, target)
            seconds.append(time.perf_counter() - start)
            sizes = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())}
            for p in ckpt.iterdir():
                p.unlink()
        total = sum(sizes.values())
        raw = statistics.median(plain_write(work / "plain.bin", total) for _ in range(args.rounds))

    save = statistics.median(seconds)
    steps, every, keep = cfg.train.max_steps, cfg.checkpoint.every, cfg.checkpoint.keep
    count = math.ceil(steps / every) if every > 0 else 1
    print(f"{args.config}: {n_params:,} parameters (vocab padded to {cfg.model.build().padded_vocab_size}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, writing under {args.dir}")
    for name, size in sizes.items():
        print(f"  {name:28s} {size / MB:10.1f} MB")
    print(f"  {'one checkpoint':28s} {total / MB:10.1f} MB")
    print(f"save_training_checkpoint: {save:.2f} s median of {args.rounds} ({min(seconds):.2f}-{max(seconds):.2f}), "
          f"{total / MB / save:.0f} MB/s")
    print(f"plain write + fsync of the same bytes: {raw:.2f} s, {total / MB / raw:.0f} MB/s "
          f"-> the save takes {save / raw:.2f}x the disk's time")
    print(f"recipe: every {every:,} of {steps:,} steps -> {count} checkpoints, {keep} kept "
          f"({keep * total / MB / 1e3:.1f} GB, {(keep + 1) * total / MB / 1e3:.1f} GB while a new one is written); "
          f"a failure loses at most {every - 1:,} steps ({(every - 1) / steps:.1%} of the run)")


if __name__ == "__main__":
    main()
