"""Linear layers whose weights are packed once into oneDNN's blocked layout, for inference on CPU.

PyTorch's CPU `nn.Linear` hands each call to a BLAS sgemm that reads the weight in its row-major layout every time.
oneDNN (bundled with PyTorch, what torch.compile's CPU freezing uses) can keep the weight in the layout its kernels
want, so a decoding step's small-batch matmuls stop paying for the reordering. Measured on the 2-core AVX2 development
machine (AMD EPYC), fp32, one thread: 8 rows through a 768×3072 linear 3.2 → 1.9 ms, through the 768×50304 LM head
75 → 31 ms; at one row, where reading the weight from memory is the whole cost, it is unchanged.

Inference only (no autograd), and only where oneDNN packs the dtype: fp32 on any x86 CPU, bf16 only on CPUs with
AVX512 or AVX-NE-CONVERT (elsewhere oneDNN refuses, and `can_pack` says so).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout. `batch_hint` is the typical number of rows per call."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs linear weights of `dtype` on this CPU (tried on a small weight)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def pack_linears(model: nn.Module, batch_hint: int = 1) -> int:
    """Replace, in place, every plain `nn.Linear` on the CPU whose dtype oneDNN packs by a PackedLinear; returns
    how many were replaced. Other modules (quantized linears, embeddings) are left as they are. A tied output layer
    gets its own packed copy; the embedding keeps the original weight. The model is for inference afterwards."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and can_pack(child.weight.dtype):
                setattr(parent, name, PackedLinear(child, batch_hint))
                replaced += 1
    return replaced
