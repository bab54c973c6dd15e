"""The whole mission in one job: prepare data → pretrain → evaluate → Ray Tune LR search + fine-tune → early-exit
classifier → Serve (pretrained, fine-tuned and early-exit variants), then a results table and a sample over HTTP.

  python jobs/pipeline.py                              # configs/pipeline-local.yaml: the make demo pipeline
  python jobs/pipeline.py --from finetune              # reuse the stages before fine-tuning, rerun the rest
  ray job submit --runtime-env runtime_env.yaml -- python jobs/pipeline.py --config configs/pipeline-local.yaml root=$PWD/runs

Stages whose inputs (configs, data, upstream results) are unchanged since the last run are skipped.
"""

from __future__ import annotations

import sys

from cluster.config import config_for_job, job_parser
from workflow.pipeline import STAGES, PipelineConfig


def main(argv: list[str] | None = None) -> None:
    p = job_parser(__doc__, "pipeline YAML (default: configs/pipeline-local.yaml)", "name=mine search=false")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun this stage and every later one")
    args = p.parse_args(argv)
    from cluster.runtime.ray_env import PROJECT_ROOT

    args.config = args.config or PROJECT_ROOT / "configs" / "pipeline-local.yaml"
    cfg = config_for_job(PipelineConfig, args)  # every stage's config, before the first stage runs

    from cluster.runtime.ray_env import init_ray
    from workflow.pipeline import run_pipeline, sample_caption, summary_table

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
    print(sample_caption(pipeline))


if __name__ == "__main__":
    main()
