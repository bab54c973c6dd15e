"""The whole mission in one job: prepare data → pretrain → evaluate → Ray Tune LR search + fine-tune → early-exit
classifier → Serve (pretrained, fine-tuned and early-exit variants), then a results table and a sample over HTTP.

  python jobs/pipeline.py                              # configs/pipeline-local.yaml: the make demo pipeline
  python jobs/pipeline.py --from finetune              # reuse the stages before fine-tuning, rerun the rest
  ray job submit --runtime-env runtime_env.yaml -- python jobs/pipeline.py --config configs/pipeline-local.yaml root=$PWD/runs

Stages whose inputs (configs, data, upstream results) are unchanged since the last run are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Running a file in jobs/ puts jobs/ first on sys.path, where jobs/serve.py would stand in for the `serve` package.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cluster.config import ConfigError, load  # noqa: E402 (after the path fix)
from cluster.pipeline import STAGES, PipelineConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="pipeline YAML (default: configs/pipeline-local.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. name=mine search=false")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and every later one")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a local head, or a new local instance)")
    args = p.parse_args(argv)
    from cluster.ray_env import PROJECT_ROOT

    try:
        cfg = load(PipelineConfig, args.config or PROJECT_ROOT / "configs" / "pipeline-local.yaml", args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")

    from cluster.pipeline import run_pipeline, summary_table
    from cluster.ray_env import init_ray

    init_ray(args.address)
    try:
        pipeline = run_pipeline(cfg, from_stage=args.from_stage, tracking_uri=cfg.tracking_uri)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    served = pipeline.results["serve"].outputs
    print("\n=== pipeline results ===")
    print(summary_table(pipeline))
    print(f"Serve API: {served['url']}/v1   web page: {served['url']}/")
    print(f"sample completion from '{served['sample_model']}' over HTTP:\n{served['sample']}")


if __name__ == "__main__":
    main()
