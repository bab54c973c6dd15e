"""Fine-tune a pretrained GPT-2 on domain text (full or LoRA), optionally after a Ray Tune learning-rate search.

  python jobs/finetune.py --config configs/finetune-local.yaml                 # at train.lr
  python jobs/finetune.py --config configs/finetune-local.yaml --search        # ASHA search over search.lrs first
  python jobs/finetune.py --config configs/finetune-local.yaml train.mode=lora lora.rank=8
  ray job submit --runtime-env runtime_env.yaml -- python jobs/finetune.py --config ... --search

The model is a checkpoint of this project, a Hugging Face GPT-2 directory or an MLflow model URI (model.source).
The best epoch's model is written to <run>/best (LoRA: merged, with the adapters in <run>/best_adapters),
registered in MLflow as gpt2-<run.name>-finetuned, and sampled; the search table is printed and saved as CSV.
Re-running a search whose driver died resumes it.
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import config_for_job, job_parser
from cluster.config.finetune import FinetuneConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = job_parser(__doc__, "YAML run config (configs/finetune-*.yaml)", "train.mode=lora train.epochs=5")
    p.add_argument("--search", action="store_true", help="run the Ray Tune learning-rate search first")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_for_job(FinetuneConfig, args, validate=lambda c: c.validate(search=args.search))

    from cluster.runtime.ray_env import init_ray
    from cluster.train.finetune import run

    init_ray(args.address)
    try:
        summary = run(cfg, search=args.search, tracking_uri=cfg.run.tracking_uri)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    m = summary["metrics"]
    print(f"fine-tuned at lr {summary['lr']:g}: best val loss {m.get('best_val_loss', float('nan')):.4f}"
          f" at epoch {m.get('best_epoch')}, {m.get('epoch')} epochs run")
    print(f"best model: {summary['best_dir']}")
    if summary["model_uri"]:
        print(f"MLflow model: {summary['model_uri']}")
    print(summary["samples"])


if __name__ == "__main__":
    main()
