"""Choosing where a model runs: CUDA, then Apple MPS, then CPU, and the dtype that is fast there."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX). Without those instructions bf16 matmuls are
    emulated and slower than fp32 (measured about 2x slower on an AVX512 Xeon without them)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.exists():
        return False
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` ("cuda", "cuda:1", "mps", "cpu") when given and available, else the best available device."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as e:  # torch's message lists every backend it knows; only three are supported here
            raise ValueError(f"--device {requested}: choose cuda, mps or cpu") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {requested}: Apple MPS is not available on this machine")
        if device.type not in ("cuda", "mps", "cpu"):
            raise ValueError(f"--device {requested}: choose cuda, mps or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32  # MPS: fp32 is the well-supported path across macOS versions


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype named on a command line ("auto" or None: `default_dtype(device)`)."""
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def choose(device: str | None = None, dtype: str | None = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and dtype for the `--device`/`--dtype` flags of a job that runs a model outside Ray Train."""
    chosen = pick_device(device)
    return chosen, parse_dtype(dtype, chosen)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """One line for a job to print, e.g. "device cpu (x86_64, 2 threads), dtype float32"."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        where = "Apple GPU (MPS)"
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"device {device} ({where}), dtype {str(dtype).removeprefix('torch.')}"


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU.
GPU_BF16_PEAK = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


@functools.lru_cache(maxsize=None)
def peak_flops(device_type: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """The device's peak matmul FLOP/s: the data-sheet figure for known GPUs, otherwise measured here with a
    large matmul in `dtype` on the current thread count (an achievable peak, so MFU on CPU is honest)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_BF16_PEAK.items():
            if key in name:
                return flops
    return measure_matmul_flops(device_type, dtype)


def measure_matmul_flops(device_type: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    import time

    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
