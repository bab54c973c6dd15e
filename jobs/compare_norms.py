"""Pre-LN vs Post-LN: train the same model twice, LayerNorm before each sub-layer (GPT-2) and after each residual
addition (the original Transformer), from the same initial weights on the same batches, and compare loss curves
and gradient norms.

  python jobs/compare_norms.py --config configs/norms-local.yaml [section.key=value ...]
  python jobs/compare_norms.py --config configs/norms-local.yaml train.max_lr=1e-2 train.warmup_steps=0

The config is a pretraining config (jobs/pretrain.py reads the same file; model.norm is set here). Both runs train
in this process, one after the other, with gpt2.train.train_step; scaling is not used (one worker, the same total
batch per step by gradient accumulation), nor are checkpoints, samples or HellaSwag. A run whose loss stops being
finite is stopped there and reported as diverged. Writes norms.png (loss and gradient-norm curves), history.csv and
summary.md to runs/<experiment>/<name>/ and logs them with every step's metrics (pre/loss, post/grad_norm, ...) to
one MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from cluster.config import ConfigError, flatten, load, to_dict
from cluster.config.loading import OverridesParser
from cluster.config.pretrain import PretrainConfig
from cluster.eval.compression import markdown_table, write_csv
from cluster.runtime.tracking import fresh_run_logger
from gpt2 import GPT
from gpt2.data import ShardedTokenLoader
from gpt2.device import cpu_has_fast_bf16, pick_device
from gpt2.train import autocast_context, autocast_dtype, evaluate_loss, make_optimizer, seed_everything, train_step

NORMS = {"pre": "Pre-LN", "post": "Post-LN"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OverridesParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML pretraining config (configs/norms-local.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100 train.max_lr=1e-2")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--no-mlflow", action="store_true", help="only write the files")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def train_one(cfg: PretrainConfig, norm: str, device: torch.device, log) -> list[dict]:
    """One run with model.norm=`norm`: a record per step (loss, grad_norm, lr, and val_loss every eval.val_every
    steps and after the last), passed to `log(record)` as it is made."""
    seed_everything(cfg.train.seed)  # the same seed gives both variants the same initial weights: same shapes
    model = GPT(dataclasses.replace(cfg.model, norm=norm).build()).to(device)
    optimizer = make_optimizer(model, cfg.train, device.type)
    accum = cfg.train.grad_accum_steps(1)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    batches = iter(ShardedTokenLoader(cfg.data.shards, B, T, split="train", seed=cfg.train.seed))  # same order
    amp = autocast_context(
        autocast_dtype(cfg.train.autocast, device.type, device.type == "cuda" or cpu_has_fast_bf16()), device.type
    )

    def val_loss() -> float:
        val = ShardedTokenLoader(cfg.data.shards, B, T, split="val")
        return evaluate_loss(model, iter(val), cfg.eval.val_batches, device=device, autocast=amp)

    history = []
    for step in range(cfg.train.max_steps):
        record: dict = {"step": step}
        if cfg.eval.val_every > 0 and step % cfg.eval.val_every == 0:
            record["val_loss"] = val_loss()
        stats = train_step(model, optimizer, batches, step, cfg.train, accum, device=device, autocast=amp)
        record.update(loss=stats.loss, grad_norm=stats.grad_norm, lr=stats.lr)
        history.append(record)
        log(record)
        if not (math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)):
            return history  # diverged: further steps would only repeat NaN
    final = {"step": cfg.train.max_steps, "val_loss": val_loss()}
    history.append(final)
    log(final)
    return history


def summarize(histories: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for norm, history in histories.items():
        trained = [r for r in history if "loss" in r]
        diverged = not math.isfinite(trained[-1]["loss"]) or not math.isfinite(trained[-1]["grad_norm"])
        norms = [r["grad_norm"] for r in trained if math.isfinite(r["grad_norm"])]
        val = [r["val_loss"] for r in history if "val_loss" in r]
        rows.append({
            "norm": NORMS[norm],
            "steps": len(trained),
            "diverged_at_step": trained[-1]["step"] if diverged else None,
            "first_loss": trained[0]["loss"],
            "last_loss": trained[-1]["loss"],
            "final_val_loss": None if diverged else val[-1],
            "median_grad_norm": sorted(norms)[len(norms) // 2] if norms else None,
            "max_grad_norm": max(norms, default=None),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load(PretrainConfig, args.config, args.overrides)
        cfg = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, num_workers=1))
        cfg.validate()
        if not args.no_mlflow:
            cfg.check_tracking()
        device = pick_device(args.device)
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0

    run_dir = Path(cfg.run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = None
    if not args.no_mlflow:
        logger = fresh_run_logger(run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name,
                                  uri=cfg.run.tracking_uri, params=flatten(to_dict(cfg)), tags={"kind": "norm-comparison"})
    histories: dict[str, list[dict]] = {}
    for norm, label in NORMS.items():
        print(f"{label}: {cfg.train.max_steps} steps of {cfg.train.total_batch_tokens:,} tokens on {device}")

        def log(record: dict, norm: str = norm) -> None:
            if logger:
                metrics = {f"{norm}/{k}": v for k, v in record.items() if k != "step" and math.isfinite(v)}
                logger.log_metrics(metrics, record["step"])

        histories[norm] = train_one(cfg, norm, device, log)

    from cluster.eval.plots import plot_norm_comparison

    rows = summarize(histories)
    png = plot_norm_comparison({NORMS[n]: h for n, h in histories.items()}, run_dir / "norms.png",
                               title=f"{cfg.run.name}: Pre-LN vs Post-LN, same data and seed")
    flat = [{"norm": norm, "step": r["step"], "loss": r.get("loss"), "grad_norm": r.get("grad_norm"),
             "lr": r.get("lr"), "val_loss": r.get("val_loss")} for norm, history in histories.items() for r in history]
    table = markdown_table(rows)
    summary = run_dir / "summary.md"
    summary.write_text(f"# {cfg.run.name}: Pre-LN vs Post-LN\n\n{cfg.model.preset} model, {cfg.train.max_steps} steps"
                       f" of {cfg.train.total_batch_tokens:,} tokens, max LR {cfg.train.max_lr:g} after"
                       f" {cfg.train.warmup_steps} warm-up steps, seed {cfg.train.seed}, data {cfg.data.shards}.\n\n"
                       f"{table}")
    files = [png, write_csv(flat, run_dir / "history.csv"), summary]
    if logger:
        for path in files:
            logger.log_artifact(path)
        logger.close()
    print()
    print(table)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
