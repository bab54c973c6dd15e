"""The local demo behind `make demo`: start a Ray head and an MLflow server on this machine (if not running), then
submit the whole pipeline (jobs/pipeline.py) with `ray job submit`, and print where to look.

The console shows the pipeline's stages, a line per training step with the time left, the results table and the
URLs; the job's whole output (Ray's, Tune's and MLflow's own logs included) goes to runs/demo/<time>.log, whose path
is printed first, and is also in the Ray dashboard's Jobs view. Errors are shown in full.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from cluster.config import load
from cluster.runtime.job_console import JobConsole
from cluster.runtime.local_services import DASHBOARD_URL, MLFLOW_DIR, _bin, client_env, up
from cluster.runtime.mlflow_connection import DEFAULT_TRACKING_URI
from cluster.runtime.ray_env import PROJECT_ROOT
from workflow.pipeline import STAGES, PipelineConfig

LOG_DIR = PROJECT_ROOT / "runs" / "demo"


def submit(*job: str) -> Path:
    """`ray job submit` with the project's runtime env, its output filtered through JobConsole; exits if the job
    fails. Returns the path of the job's whole output."""
    cmd = [_bin("ray"), "job", "submit", "--address", DASHBOARD_URL, "--runtime-env", "runtime_env.yaml", "--", "python", *job]
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    print(f"the job's whole output: {log_path}", flush=True)
    with open(log_path, "w", buffering=1) as log:
        console = JobConsole(log, lambda line: print(line, flush=True))
        with subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=client_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            try:
                for line in proc.stdout:
                    console.feed(line)
            except KeyboardInterrupt:
                proc.terminate()
                sys.exit(f"\nstopped watching; the job goes on: `ray job stop {console.job_id or '<id>'}` stops it")
    if proc.returncode != 0:
        console.failed(str(log_path))
        sys.exit(f"error: job failed: {' '.join(job)} (its whole output: {log_path})")
    return log_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/pipeline-local.yaml", help="the pipeline config")
    p.add_argument("--from", dest="from_stage", choices=STAGES,
                   help="rerun the pipeline from this stage (see jobs/pipeline.py)")
    args = p.parse_args()
    # Absolute paths: a submitted job runs in an uploaded copy of the project, not in this checkout, and the data,
    # runs and models must land here.
    paths = [f"root={PROJECT_ROOT / 'runs'}", f"data_dir={PROJECT_ROOT / 'data' / 'pydocs'}",
             f"domain_dir={PROJECT_ROOT / 'data' / 'domain'}"]
    config = str(PROJECT_ROOT / args.config)  # the job opens this file, not one in its uploaded copy
    try:  # the config and every stage's, as the job will check them, before services start and the job is sent
        load(PipelineConfig, config, paths).validate()
    except ValueError as e:
        sys.exit(f"error: {e}")
    up()
    log_path = submit("jobs/pipeline.py", "--config", config, *paths,
                      *(["--from", args.from_stage] if args.from_stage else []))
    print("\n=== demo finished ===")
    print(f"Ray dashboard:   {DASHBOARD_URL}   (Jobs, Train and Tune views; Serve)")
    print(f"MLflow UI:       {DEFAULT_TRACKING_URI}   (experiments pretrain, finetune, early-exit)")
    print("Serve:           http://127.0.0.1:8000/v1 (OpenAI-compatible API), http://127.0.0.1:8000/ (web page)")
    print(f"logs:            {log_path} (the job), {MLFLOW_DIR / 'server.log'} (MLflow),"
          " /tmp/ray/session_latest/logs (Ray)")
    print("stop the services with `make stop`")


if __name__ == "__main__":
    main()
