"""The local demo behind `make demo`: start a Ray head and an MLflow server on this machine (if not running), then
submit the whole pipeline (jobs/pipeline.py) with `ray job submit`, and print where to look."""

from __future__ import annotations

import argparse
import subprocess
import sys

from cluster.local_services import DASHBOARD_URL, _bin, client_env, up
from cluster.ray_env import PROJECT_ROOT
from cluster.tracking import DEFAULT_TRACKING_URI


def submit(*job: str) -> None:
    """`ray job submit` with the project's runtime env; streams the job's output and fails if the job fails."""
    cmd = [_bin("ray"), "job", "submit", "--address", DASHBOARD_URL, "--runtime-env", "runtime_env.yaml", "--", "python", *job]
    print("$ " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=PROJECT_ROOT, env=client_env()).returncode != 0:
        sys.exit(f"error: job failed: {' '.join(job)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/pipeline-local.yaml", help="the pipeline config")
    p.add_argument("--from", dest="from_stage", help="rerun the pipeline from this stage (see jobs/pipeline.py)")
    args = p.parse_args()
    up()
    # Absolute paths: a submitted job runs in an uploaded copy of the project, not in this checkout, and the data,
    # runs and models must land here.
    paths = [f"root={PROJECT_ROOT / 'runs'}", f"data_dir={PROJECT_ROOT / 'data' / 'pydocs'}",
             f"domain_dir={PROJECT_ROOT / 'data' / 'domain'}"]
    submit("jobs/pipeline.py", "--config", args.config, *paths, *(["--from", args.from_stage] if args.from_stage else []))
    print("\n=== demo finished ===")
    print(f"Ray dashboard:   {DASHBOARD_URL}   (Jobs, Train and Tune views; Serve)")
    print(f"MLflow UI:       {DEFAULT_TRACKING_URI}   (experiments pretrain, finetune, early-exit)")
    print("Serve:           http://127.0.0.1:8000/v1 (OpenAI-compatible API), http://127.0.0.1:8000/ (web page)")
    print("stop the services with `make stop`")


if __name__ == "__main__":
    main()
