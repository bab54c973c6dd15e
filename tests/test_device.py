"""Device and dtype choice: CUDA, then Apple MPS, then CPU; --device overrides; the dtype follows the device."""

from __future__ import annotations

import pytest
import torch

import gpt2.device as device_module
from gpt2.device import choose, default_dtype, describe, parse_dtype, pick_device
from tests.doc_commands import script_help


@pytest.fixture
def available(monkeypatch):
    """Pretend which accelerators exist: available(cuda=..., mps=..., cuda_bf16=..., cpu_bf16=...)."""

    def set_available(cuda: bool = False, mps: bool = False, cuda_bf16: bool = True, cpu_bf16: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: cpu_bf16)

    return set_available


def test_order_is_cuda_then_mps_then_cpu(available):
    available(cuda=True, mps=True)
    assert pick_device() == torch.device("cuda")
    available(cuda=False, mps=True)
    assert pick_device() == torch.device("mps")
    available(cuda=False, mps=False)
    assert pick_device() == torch.device("cpu")


def test_requested_device_overrides_and_must_exist(available):
    available(cuda=True, mps=True)
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    available(cuda=False, mps=False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="--device mps: Apple MPS is not available"):
        pick_device("mps")
    with pytest.raises(ValueError, match="--device tpu: choose cuda, mps or cpu"):
        pick_device("tpu")


def test_dtype_follows_the_device(available):
    available(cuda=True, cuda_bf16=True, cpu_bf16=False)
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("mps")) == torch.float32
    available(cuda=True, cuda_bf16=False, cpu_bf16=True)
    assert default_dtype(torch.device("cuda")) == torch.float32  # pre-Ampere GPUs emulate bf16
    assert default_dtype(torch.device("cpu")) == torch.bfloat16  # AVX512-BF16 / AMX
    assert parse_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert parse_dtype("fp32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        parse_dtype("int4", torch.device("cpu"))


def test_this_machine_runs_on_cpu_and_says_so():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    device, dtype = choose()
    assert device == torch.device("cpu")
    assert dtype == (torch.bfloat16 if device_module.cpu_has_fast_bf16() else torch.float32)
    line = describe(device, torch.float32)
    assert line.startswith("device cpu (") and line.endswith("dtype float32")
    assert f"{torch.get_num_threads()} threads" in line


@pytest.mark.parametrize("job", ["generate.py", "evaluate.py"])
def test_jobs_that_run_a_model_take_device_and_dtype(job):
    help_text = script_help(f"jobs/{job}")  # a `--help` subprocess; fails unless it exits 0
    assert "--device" in help_text and "--dtype" in help_text
