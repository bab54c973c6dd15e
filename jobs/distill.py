"""Distil a teacher GPT-2 into a smaller student: temperature-scaled KL to the teacher plus cross-entropy with the
data, on Ray Train (DDP over scaling.num_workers), tracked in MLflow; then student vs teacher perplexity, size and
decode speed.

  python jobs/distill.py --config configs/distill-local.yaml [section.key=value ...]
  python jobs/distill.py --config configs/distill-local.yaml teacher.source=gpt2-medium student.preset=gpt2
  python jobs/distill.py --config configs/distill-local.yaml --in-process     # one worker in this process, no Ray

teacher.source is a checkpoint directory, a Hugging Face GPT-2 directory or hub name, or an MLflow model URI; the
student is built from a pretraining `model` section (a preset with optional shape overrides). The student is
written to runs/<experiment>/<name>/final (with a model card) and registered in MLflow as gpt2-<run.name>-distilled; the
comparison goes to comparison.csv/.md beside it. Re-running the same run.name on Ray resumes from the newest
checkpoint; --in-process runs keep no intermediate checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cluster.config import config_for_job, job_parser
from cluster.config.distill import DistillConfig
from cluster.runtime.mlflow_connection import tracking_uri
from cluster.train.distill import compare_with_teacher, run_distillation, run_in_process
from gpt2.device import pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser(__doc__, "YAML run config (configs/distill-*.yaml)", "train.max_steps=100 distill.temperature=4")
    p.add_argument("--in-process", action="store_true",
                   help="run the worker loop in this process without Ray (scaling.num_workers=1)")
    p.add_argument("--device", help="--in-process training and the final comparison: cuda, mps or cpu (default: the"
                                    " best available)")
    return p.parse_args(argv)


def one_worker(cfg: DistillConfig) -> DistillConfig:
    """--in-process: the same total batch per step, by gradient accumulation on the one worker."""
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, num_workers=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_for_job(DistillConfig, args, prepare=one_worker if args.in_process else None)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")

    uri = cfg.run.tracking_uri
    where = "in this process" if args.in_process else f"on {cfg.scaling.num_workers} Ray Train workers"
    print(f"distilling {cfg.teacher.source} into a {cfg.student.preset} student (T={cfg.distill.temperature:g},"
          f" alpha={cfg.distill.alpha:g}) {where}, {cfg.train.max_steps} steps; run {cfg.run_dir()};"
          f" MLflow {tracking_uri(uri)}")
    if args.in_process:
        run_in_process(cfg, device, uri)
    else:
        from cluster.runtime.ray_env import init_ray

        init_ray(args.address)
        result = run_distillation(cfg, uri)
        if result.error:
            sys.exit(f"error: distillation failed: {result.error}")
    try:
        rows = compare_with_teacher(cfg, device, uri)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    teacher, student = rows
    print(f"student: {student.parameters / teacher.parameters:.0%} of the teacher's parameters,"
          f" {student.weights_mb / teacher.weights_mb:.0%} of its weight bytes,"
          f" {student.decode_tokens_per_s / teacher.decode_tokens_per_s:.2f}x its decode speed,"
          f" perplexity {student.perplexity:.2f} vs {teacher.perplexity:.2f} ({student.perplexity_change_pct:+.1f}%)")
    print(f"student model: {cfg.run_dir()}/final")
    print(f"comparison: {cfg.run_dir()}/comparison.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
