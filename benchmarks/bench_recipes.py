"""Which pretraining recipe gets the lowest validation loss out of `make demo`'s time budget?

Each recipe is `configs/local.yaml` (the demo's pretraining: the `small` model on the built-in python-docs corpus,
2 workers × 1 thread through Ray Train, as the demo runs it) plus a few overrides. Every recipe gets the same wall
time: a short calibration run of each measures its seconds per step (wall clock, so the DDP all-reduce and the
optimizer count; the median of its later steps), and its full run takes as many steps as fit the budget, with
warmup and cosine decay stretched to that length. The budget defaults to what configs/local.yaml's own steps take.
The final validation loss is over the whole validation split (every token once), the same tokens for every recipe
whatever its batch shape.

Two kinds of noise sit between close recipes, both measured on a 2-core AVX2 machine. The pace of the same run
drifts by ±10% from one run to the next (a 1,024-token step took 1.22 s a step in one run and 1.03 s in the next),
so a recipe's wall time misses the budget by that much whatever its calibration; the table gives the wall time of
each run. And a run's final loss depends on its seed: two seeds of the 1,024-token recipe ended 0.097 apart (5.826,
5.729), two of the 2,048-token one 0.001 (5.906, 5.907). --repeats N runs every recipe N times, each round with
its own seed (train.seed) and the recipes in turn, so that drift falls on all of them alike; the table gives the
mean and each run's loss.

  python -m benchmarks.bench_recipes [--budget-s 210] [--recipes local,2-layers] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_pretrain import DATA, ensure_data, step_ends
from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from cluster.runtime.ray_env import PROJECT_ROOT, init_ray
from cluster.runtime.tracking import read_metrics
from cluster.train.pretrain import run_pretraining
from gpt2.data import ShardedTokenLoader

BASE = PROJECT_ROOT / "configs" / "local.yaml"
# configs/local.yaml (2 workers × 2 sequences of 256 tokens a step, lr 3e-3, 4 layers) and its neighbours.
RECIPES: dict[str, list[str]] = {
    "local": [],
    "512-tokens": ["train.micro_batch=1", "train.total_batch_tokens=512"],
    "2048-tokens": ["train.micro_batch=4", "train.total_batch_tokens=2048"],
    "4096-tokens": ["train.micro_batch=8", "train.total_batch_tokens=4096"],
    "lr-6e-3": ["train.max_lr=6.0e-3", "train.min_lr=6.0e-4"],
    "2-layers": ["model.n_layer=2"],
}
WHOLE_VAL_SPLIT = ["eval.val_batches=100000"]  # the val loader makes one pass, so this means "every token once"
QUIET = ["eval.val_every=0", "eval.sample_every=0", "checkpoint.every=0"]  # the final validation still runs


@dataclass
class Outcome:
    cfg: PretrainConfig
    seconds: float  # wall clock from the first step's start (estimated) to the last step's end
    val_loss: float


def config(root: Path, name: str, overrides: list[str]) -> PretrainConfig:
    return load(PretrainConfig, BASE, [f"data.shards={DATA}", *overrides, f"run.root={root}", f"run.name={name}"])


def run(cfg: PretrainConfig, tracking: str) -> list[dict]:
    result = run_pretraining(cfg, tracking)
    if result.error:
        raise RuntimeError(f"{cfg.run.name}: {result.error}")
    return read_metrics(cfg.run_dir())


def step_seconds(rows: list[dict]) -> list[float]:
    """Wall-clock seconds of each step but the first."""
    ends = step_ends(rows)
    return [b - a for a, b in zip(ends, ends[1:])]


def schedule(steps: int, base: PretrainConfig) -> list[str]:
    """Warmup as the same share of the run as configs/local.yaml's, cosine decay to the end."""
    share = base.train.warmup_steps / base.train.max_steps
    return [f"train.max_steps={steps}", f"train.warmup_steps={max(1, round(share * steps))}"]


def full_run(root: Path, tracking: str, base: PretrainConfig, name: str, steps: int, seed: int) -> Outcome:
    overrides = [*RECIPES[name], *QUIET, *WHOLE_VAL_SPLIT, *schedule(steps, base), f"train.seed={seed}"]
    cfg = config(root, f"{name}-seed{seed}", overrides)
    rows = run(cfg, tracking)
    gaps = step_seconds(rows)
    seconds = sum(gaps) * steps / len(gaps)  # the first step's time taken as the mean of the others
    val = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    print(f"{name}, seed {seed}: {steps} steps, {seconds:.0f} s, val loss {val:.4f}", flush=True)
    return Outcome(cfg, seconds, val)


def base_train_tokens() -> int:
    return ShardedTokenLoader(DATA, 1, 256, split="train").num_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, help="wall time per recipe (default: configs/local.yaml's max_steps)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--calibration-steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=1, help="runs of each recipe, each with its own seed (default 1)")
    args = p.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, not {args.repeats}")
    init_ray()
    ensure_data()
    base = load(PretrainConfig, BASE)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracking = f"sqlite:///{root / 'mlflow.db'}"
        per_step = {}
        for name in names:  # all calibrations first, so every recipe's figure comes from the same stretch of time
            overrides = [*RECIPES[name], *QUIET, "eval.val_batches=1", f"train.max_steps={args.calibration_steps}"]
            gaps = step_seconds(run(config(root, f"calibrate-{name}", overrides), tracking))
            per_step[name] = statistics.median(gaps[len(gaps) // 2:])  # the first steps run slower
            print(f"calibration: {name}: {per_step[name]:.2f} s per step", flush=True)
        budget = args.budget_s or base.train.max_steps * per_step.get("local", next(iter(per_step.values())))
        steps = {name: max(2, math.floor(budget / per_step[name])) for name in names}  # the same for every seed
        runs: dict[str, list[Outcome]] = {name: [] for name in names}
        for repeat in range(args.repeats):  # the recipes in turn, so the machine's drift falls on each alike
            for name in names:
                runs[name].append(full_run(root, tracking, base, name, steps[name], base.train.seed + repeat))
    corpus = base_train_tokens()
    print(f"\n## Pretraining recipes in the same wall time ({budget:.0f} s a recipe, `small` model,"
          f" 2 workers × 1 thread, {args.repeats} seed(s) each)")
    print("| recipe | layers | tokens a step | max lr | steps | epochs | wall s | val loss (mean) | val perplexity |"
          " each seed's val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in sorted(names, key=lambda n: statistics.mean(o.val_loss for o in runs[n])):
        cfg, losses = runs[name][0].cfg, [o.val_loss for o in runs[name]]
        t, mean = cfg.train, statistics.mean(losses)
        print(f"| {name} | {cfg.model.build().n_layer} | {t.total_batch_tokens:,} | {t.max_lr:g} |"
              f" {steps[name]} | {steps[name] * t.total_batch_tokens / corpus:.2f} |"
              f" {', '.join(f'{o.seconds:.0f}' for o in runs[name])} | {mean:.4f} | {math.exp(mean):.0f} |"
              f" {', '.join(f'{v:.3f}' for v in losses)} |")


if __name__ == "__main__":
    main()
