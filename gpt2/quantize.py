"""Inference-time weight compression: int8 dynamic quantization, bf16 weights, and NF4 on CUDA.

Batch-1 decoding reads every weight once per token, so it is bound by memory bandwidth: smaller weights are faster.
int8 dynamic quantization stores each nn.Linear weight (the tied LM head included) as int8 with per-tensor scales and
quantizes activations on the fly; the fbgemm kernels run it on x86 CPUs (VNNI where present). The embedding lookups
stay fp32. bf16 weights halve the bytes but only pay off where the CPU/GPU computes bf16 natively.
NF4 (QLoRA's 4-bit NormalFloat, blockwise scales) needs bitsandbytes and a CUDA GPU; bitsandbytes is an optional
dependency (`pip install bitsandbytes`), not in requirements.txt.
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


def quantize_nf4(
    model: GPT, *, compute_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None
) -> GPT:
    """A copy of `model` whose blocks' Linear layers hold NF4 weights (bitsandbytes Linear4bit), computing in
    `compute_dtype`, on `device`: CUDA, or CPU (bitsandbytes runs 4-bit layers on CPU since 0.47); by default CUDA
    when there is one. The tied LM head / token embedding stays in `compute_dtype`, as transformers' 4-bit loading
    keeps lm_head: the output layer is the most sensitive to quantization error."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"NF4 weights run on CUDA or CPU (bitsandbytes), not on {device.type}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError("quantize_nf4 needs bitsandbytes, an optional dependency: `pip install bitsandbytes`") from e
    model = copy.deepcopy(model).to(dtype=compute_dtype).cpu().eval()
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, nn.Linear):
                    continue
                has_bias = linear.bias is not None
                nf4 = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, has_bias, compute_dtype=compute_dtype, quant_type="nf4"
                )
                nf4.load_state_dict(linear.state_dict())
                setattr(parent, name, nf4)
    return model.to(device)  # bitsandbytes quantizes the weights when they move to their device, CPU included


def _int8_linear_bytes(linear: nn.Module) -> int:
    """An int8 dynamic Linear's int8 weight and fp32 bias, which live in packed params (neither parameter nor buffer)."""
    w, b = linear._weight_bias()
    return w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers as stored: tied weights once, int8 dynamic Linear layers by their packed
    int8 weights and fp32 biases, bitsandbytes 4-bit weights by their packed bytes (half a byte per weight; the
    per-block scales are not counted)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # tied ones once
    return total + sum(_int8_linear_bytes(m) for m in model.modules() if isinstance(m, DynamicInt8Linear))


def decode_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decoding step reads: every Linear (the LM head included) and LayerNorm in full. Embedding
    tables are not counted: a step reads one row of each (the tied head's full read is counted as the Linear)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, DynamicInt8Linear):
            total += _int8_linear_bytes(m)
        elif isinstance(m, (nn.Linear, nn.LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
