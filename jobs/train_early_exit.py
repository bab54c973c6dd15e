"""Train an early-exit classifier on a frozen GPT-2 (Ray Train), calibrate its threshold, save the early-exit model.

  python jobs/train_early_exit.py --config configs/early-exit-local.yaml [section.key=value ...]
  python jobs/train_early_exit.py --config configs/early-exit-local.yaml model.exit_layer=2 scaling.num_workers=2
  ray job submit --runtime-env runtime_env.yaml -- \
      python jobs/train_early_exit.py --config configs/early-exit-local.yaml

Labels come from the full model on the training shards (1 where the exit head after block model.exit_layer predicts
the full model's next token); the classifier trains on them; thresholds tau are swept on the validation shards
(exit rate, next-token agreement, perplexity: <run>/calibration.csv and .png), and the tau with the highest exit
rate whose agreement reaches calibration.target_agreement (default 0.97) becomes the saved default. If none does,
the most accurate tau is saved and the job warns. The model goes to runs/<experiment>/<name>/model: a copy of the
base checkpoint plus early_exit.json and early_exit.safetensors, which the server loads as an early-exit variant;
everything is logged to MLflow and the model is registered as gpt2-<run.name>-early-exit.
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import config_for_job, job_parser
from cluster.config.early_exit import EarlyExitConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser(__doc__, "YAML run config (configs/early-exit-*.yaml)", "model.exit_layer=3 classifier.epochs=20")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_for_job(EarlyExitConfig, args)

    from cluster.runtime.ray_env import init_ray
    from cluster.train.early_exit import run

    init_ray(args.address)
    try:
        s = run(cfg)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    reached = "reached" if s["target_reached"] else "NOT reached: the most accurate tau was saved"
    print(f"exit after block {s['exit_layer']} of {s['n_layer']};"
          f" {s['train_positions']:,} training positions per worker")
    print(f"classifier: held-out accuracy {s['classifier_val_accuracy']:.4f}"
          f" (majority class {s['majority_baseline']:.4f}), loss {s['classifier_val_loss']:.4f}")
    print(f"tau {s['tau']:g}: exit rate {s['exit_rate']:.3f}, next-token agreement {s['agreement']:.4f}"
          f" (target {s['target_agreement']:g} {reached}), perplexity {s['perplexity']:.3f}"
          f" vs {s['perplexity_full']:.3f} without exits, {s['mean_blocks']:.2f} blocks per token")
    print(f"calibration: {s['calibration_csv']} and {s['calibration_png']}")
    print(f"early-exit model: {s['model_dir']}")
    if s.get("model_uri"):
        print(f"MLflow model: {s['model_uri']}")


if __name__ == "__main__":
    main()
