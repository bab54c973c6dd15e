"""Inference-time weight compression: int8 dynamic quantization and bf16 weights.

Batch-1 decoding reads every weight once per token, so it is bound by memory bandwidth: smaller weights are faster.
int8 dynamic quantization stores each nn.Linear weight (the tied LM head included) as int8 with per-tensor scales and
quantizes activations on the fly; the fbgemm kernels run it on x86 CPUs (VNNI where present). The embedding lookups
stay fp32. bf16 weights halve the bytes but only pay off where the CPU/GPU computes bf16 natively.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from gpt2.model import GPT


def quantize_int8(model: GPT) -> GPT:
    """A CPU copy of `model` with int8 dynamically quantized Linear layers (for inference only)."""
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(model).float().cpu().eval()
    with warnings.catch_warnings():
        # torch.ao eager quantization is marked for migration to torchao; it is the dependency-free CPU path today.
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def to_bf16(model: GPT) -> GPT:
    """A copy of `model` with bf16 weights."""
    return copy.deepcopy(model).to(dtype=torch.bfloat16).eval()


def decode_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decoding step reads: every Linear (the LM head included) and LayerNorm in full. Embedding
    tables are not counted: a step reads one row of each (the tied head's full read is counted as the Linear)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, DynamicInt8Linear):
            w, b = m._weight_bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
        elif isinstance(m, (nn.Linear, nn.LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
