"""Pretrain GPT-2 on Ray Train (DDP over N workers), tracked in MLflow.

  python jobs/pretrain.py --config configs/local.yaml [section.key=value ...]
  ray job submit --working-dir . -- python jobs/pretrain.py --config configs/gpt2-124m-fineweb-edu.yaml

Re-running with the same run.name resumes from the newest checkpoint and continues the same MLflow run.
On a multi-node cluster run.root and data.shards may be s3:// or gs:// URIs (or a shared filesystem path).
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import config_for_job, job_parser
from cluster.config.pretrain import PretrainConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser(__doc__, "YAML run config (configs/*.yaml); defaults are the GPT-2 124M recipe",
                   "train.max_steps=100 scaling.num_workers=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_for_job(PretrainConfig, args)

    from cluster.runtime import storage
    from cluster.runtime.mlflow_connection import tracking_uri
    from cluster.runtime.ray_env import init_ray
    from cluster.runtime.tracking import read_metrics
    from cluster.train.pretrain import run_pretraining

    init_ray(args.address)
    accum = cfg.train.grad_accum_steps(cfg.scaling.num_workers)
    print(
        f"run {cfg.run_dir()}: {cfg.scaling.num_workers} workers × micro-batch {cfg.train.micro_batch} × T {cfg.train.seq_len}"
        f" × {accum} accumulation = {cfg.train.total_batch_tokens:,} tokens/step, {cfg.train.max_steps} steps;"
        f" MLflow {tracking_uri(cfg.run.tracking_uri)}"
    )
    result = run_pretraining(cfg, cfg.run.tracking_uri)
    if result.error:
        sys.exit(f"error: training failed: {result.error}")
    run = storage.RunDir(storage.absolute(cfg.run_dir()))
    run.pull("metrics.jsonl", "samples")  # a remote run directory is read through this machine's mirror
    rows = read_metrics(run.local)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    print(f"validation loss: {val[0]:.3f} (first) -> {val[-1]:.3f} (last)" if val else "no validation measured")
    print(f"final model: {run.uri('final') if run.remote else run.local / 'final'}")
    print(f"newest checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
    samples = sorted((run.local / "samples").glob("*.txt"))
    if samples:
        print(f"sample ({samples[-1].name}):\n{samples[-1].read_text()}")


if __name__ == "__main__":
    main()
