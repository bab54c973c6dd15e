"""The local demo behind `make demo`: start a Ray head and an MLflow server on this machine (if not running), then
submit data preparation and pretraining as Ray jobs with `ray job submit`, and print where to look."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from cluster.local_services import DASHBOARD_URL, _bin, client_env, up
from cluster.ray_env import PROJECT_ROOT
from cluster.tracking import DEFAULT_TRACKING_URI, read_metrics


def submit(*job: str) -> None:
    """`ray job submit` with the project's runtime env; streams the job's output and fails if the job fails."""
    cmd = [_bin("ray"), "job", "submit", "--address", DASHBOARD_URL, "--runtime-env", "runtime_env.yaml", "--", "python", *job]
    print("$ " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=PROJECT_ROOT, env=client_env()).returncode != 0:
        sys.exit(f"error: job failed: {' '.join(job)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/local.yaml")
    args = p.parse_args()
    data = PROJECT_ROOT / "data" / "pydocs"
    runs = PROJECT_ROOT / "runs"
    up()
    # Absolute paths: a submitted job runs in an uploaded copy of the project, not in this checkout.
    submit("jobs/prepare_data.py", "--source", "python-docs", "--output", str(data))
    submit("jobs/pretrain.py", "--config", args.config, f"data.shards={data}", f"run.root={runs}")

    from cluster.config import load
    from cluster.pretrain_config import PretrainConfig

    cfg = load(PretrainConfig, PROJECT_ROOT / args.config, [f"run.root={runs}"])
    run_dir = Path(cfg.run_dir())
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    samples = sorted((run_dir / "samples").glob("*.txt"))
    print("\n=== demo finished ===")
    print(f"Ray dashboard:   {DASHBOARD_URL}   (Jobs and Train views)")
    print(f"MLflow UI:       {DEFAULT_TRACKING_URI}   (experiment '{cfg.run.experiment}', run '{cfg.run.name}')")
    print(f"final model:     {run_dir / 'final'}")
    if val:
        print(f"validation loss: {val[0]:.3f} at the first measurement -> {val[-1]:.3f} at the end")
    if samples:
        print(f"sample text ({samples[-1].name}):\n{samples[-1].read_text()}")
    print("stop the services with `make stop`")


if __name__ == "__main__":
    main()
