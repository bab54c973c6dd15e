"""Which pretraining recipe gets the lowest validation loss out of `make demo`'s time budget?

Each recipe is `configs/local.yaml` (the demo's pretraining: the `small` model on the built-in python-docs corpus,
2 workers × 1 thread through Ray Train, as the demo runs it) plus a few overrides. Every recipe gets the same wall
time: a short calibration run of each measures its seconds per step (wall clock, so the DDP all-reduce and the
optimizer count; the median of its later steps), and its full run takes as many steps as fit the budget, with
warmup and cosine decay stretched to that length. The budget defaults to what configs/local.yaml's own steps take.
The final validation loss is over the whole validation split (every token once), the same tokens for every recipe
whatever its batch shape. The table gives each run's wall time too, since a calibration can miss: with 6 steps,
median of all, it overestimated the shortest steps by a quarter (1.39 s against 1.10).

  python -m benchmarks.bench_recipes [--budget-s 210] [--recipes local,2-layers]
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
# configs/local.yaml (2 workers × 4 sequences of 256 tokens a step, lr 3e-3, 4 layers) and its neighbours.
RECIPES: dict[str, list[str]] = {
    "local": [],
    "4096-tokens": ["train.micro_batch=8", "train.total_batch_tokens=4096"],
    "1024-tokens": ["train.micro_batch=2", "train.total_batch_tokens=1024"],
    "lr-6e-3": ["train.max_lr=6.0e-3", "train.min_lr=6.0e-4"],
    "2-layers": ["model.n_layer=2"],
}
WHOLE_VAL_SPLIT = ["eval.val_batches=100000"]  # the val loader makes one pass, so this means "every token once"
QUIET = ["eval.val_every=0", "eval.sample_every=0", "checkpoint.every=0"]  # the final validation still runs


@dataclass
class Outcome:
    recipe: str
    cfg: PretrainConfig
    steps: int
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


def base_train_tokens() -> int:
    return ShardedTokenLoader(DATA, 1, 256, split="train").num_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, help="wall time per recipe (default: configs/local.yaml's max_steps)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--calibration-steps", type=int, default=12)
    args = p.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
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
        outcomes = []
        for name in names:
            steps = max(2, math.floor(budget / per_step[name]))
            cfg = config(root, name, [*RECIPES[name], *QUIET, *WHOLE_VAL_SPLIT, *schedule(steps, base)])
            rows = run(cfg, tracking)
            gaps = step_seconds(rows)
            seconds = sum(gaps) * steps / len(gaps)  # the first step's time taken as the mean of the others
            val = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
            outcomes.append(Outcome(name, cfg, steps, seconds, val))
            print(f"{name}: {steps} steps, {seconds:.0f} s, val loss {val:.4f}", flush=True)
    corpus = base_train_tokens()
    print(f"\n## Pretraining recipes in the same wall time ({budget:.0f} s a recipe, `small` model, 2 workers × 1 thread)")
    print("| recipe | layers | tokens a step | max lr | steps | epochs | wall s | val loss | val perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for o in sorted(outcomes, key=lambda o: o.val_loss):
        t = o.cfg.train
        print(f"| {o.recipe} | {o.cfg.model.build().n_layer} | {t.total_batch_tokens:,} | {t.max_lr:g} | {o.steps} |"
              f" {o.steps * t.total_batch_tokens / corpus:.2f} | {o.seconds:.0f} | {o.val_loss:.4f} |"
              f" {math.exp(o.val_loss):.0f} |")


if __name__ == "__main__":
    main()
