"""benchmarks/gpu_check.py on the CPU (--cpu-smoke), so the GPU check never rots between the rare runs on a GPU.

The script runs as it would on the GPU machine, where Ray and MLflow are not installed: both are made unimportable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.device import cpu_has_fast_bf16

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# A None in sys.modules makes `import ray` raise ImportError, as on a machine without Ray.
WITHOUT_RAY_OR_MLFLOW = (
    "import runpy, sys; sys.modules.update(ray=None, mlflow=None); sys.argv = sys.argv[1:];"
    " runpy.run_path(sys.argv[0], run_name='__main__')"
)
CHECKS = {
    "logits-fp32", "logits-bf16-autocast-flash", "logits-bf16-weights", "kv-cache-fp32", "kv-cache-bf16",
    "lm-head-fp32-loss", "lm-head-fp32-grads", "lm-head-bf16-loss", "lm-head-bf16-grads", "train-step-fp32",
    "train-step-fp32-updated", "train-step-bf16", "train-step-bf16-updated", "engine-seeded-fp32", "nf4-perplexity",
    "no-ray-mlflow",
}
FIGURES = {
    "matmul-peak", "bandwidth", "train-tiny", "train-tiny-mfu-measured", "train-small", "decode-batch1",
    "engine-c1", "engine-c8", "engine-c64", "hellaswag",
}


def gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_OR_MLFLOW, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    return done, report


@pytest.mark.slow
def test_cpu_smoke_passes_every_check(tmp_path):
    done, report = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    status = {c["id"]: c["status"] for c in report["checks"]}
    # Where bf16 matmuls are emulated, the bf16 LM-head check (over a thousand tokens) is skipped to stay quick.
    expected = CHECKS if cpu_has_fast_bf16() else CHECKS - {"lm-head-bf16-loss", "lm-head-bf16-grads"}
    assert {i: status.get(i) for i in expected} == dict.fromkeys(expected, "PASS")
    assert status["compile-equals-eager"] == "SKIP"  # no torch.compile on the CPU
    assert "FAIL" not in status.values() and report["failed"] == 0
    figures = {f["id"]: f["value"] for f in report["figures"]}
    assert FIGURES <= figures.keys()
    assert all(figures[i] > 0 for i in FIGURES)
    assert "| figure | this run | anchor |" in report["markdown"]
    assert "467K per H100" in report["markdown"]  # the llm.c anchor beside the training row


@pytest.mark.slow
def test_injected_fault_fails_the_run(tmp_path):
    done, report = gpu_check(tmp_path, "--only", "logits", "--inject-fault", "logits")
    assert done.returncode == 1, done.stdout[-4000:] + done.stderr[-4000:]
    status = {c["id"]: c["status"] for c in report["checks"]}
    # A 5% scale of the logits is beyond the fp32 and the bf16 tolerances alike.
    assert [status[i] for i in ("logits-fp32", "logits-bf16-autocast-flash", "logits-bf16-weights")] == ["FAIL"] * 3
    assert "FAIL  logits fp32 vs CPU fp32" in done.stdout
    assert status["no-ray-mlflow"] == "PASS" and report["failed"] == 3
