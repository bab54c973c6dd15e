"""Model variants the server offers: a name mapped to a source (checkpoint, Hugging Face dir, MLflow URI) and options.

In serving/config.yaml a variant is either just its source or a mapping:

    variants:
      pretrained: runs/local/demo/final
      int8: {source: runs/local/demo/final, quantize: int8, description: "int8 dynamic quantization"}
      nf4: {source: runs/local/demo/final, quantize: nf4}  # 4-bit weights (bitsandbytes), on CUDA or CPU
      early-exit: {source: runs/local/demo/early-exit}    # a directory holding early_exit.json is served with exits

Relative paths are relative to the project root, so the same config works from `serve run`, `jobs/serve.py` and a
Ray job whatever their working directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.runtime.models import is_mlflow_uri, load_model
from cluster.runtime.ray_env import PROJECT_ROOT

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
QUANTIZE = ("none", "int8", "nf4")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    source: str
    dtype: str = "auto"  # auto (fast on the device) | fp32 | bf16
    quantize: str = "none"  # none | int8 (CPU) | nf4 (bitsandbytes, CUDA or CPU)
    description: str = ""

    def resolved_source(self) -> str:
        if is_mlflow_uri(self.source) or Path(self.source).is_absolute():
            return self.source
        local = PROJECT_ROOT / self.source
        # A bare hub name ("gpt2") is not a project path; it resolves through the Hugging Face cache.
        return str(local) if local.exists() or "/" in self.source else self.source


def parse_variants(raw: dict) -> dict[str, VariantSpec]:
    """Validate the `variants` mapping of the serve config; errors name the variant and the field."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError("serve config: 'variants' must map at least one variant name to a model source")
    specs = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"serve config: variant name {name!r} must be 1-64 letters, digits or . _ : -")
        if isinstance(value, str):
            value = {"source": value}
        if not isinstance(value, dict) or not isinstance(value.get("source"), str) or not value["source"]:
            raise ValueError(f"serve config: variant {name!r} needs a 'source' (checkpoint path or MLflow URI)")
        unknown = set(value) - {"source", "dtype", "quantize", "description"}
        if unknown:
            raise ValueError(f"serve config: variant {name!r} has unknown field(s) {sorted(unknown)}")
        spec = VariantSpec(name=name, **value)
        if spec.quantize not in QUANTIZE:
            raise ValueError(f"serve config: variant {name!r}: quantize must be one of {QUANTIZE}, got {spec.quantize!r}")
        if spec.dtype not in ("auto", "fp32", "float32", "bf16", "bfloat16"):
            raise ValueError(f"serve config: variant {name!r}: dtype must be auto, fp32 or bf16, got {spec.dtype!r}")
        specs[name] = spec
    return specs


def load_variant(spec: VariantSpec, device: torch.device, *, max_batch: int):
    """The model for a variant, ready for inference: a GPT, or an EarlyExitGPT when the directory holds a classifier.
    max_batch: the rows its engine decodes together (what packed CPU weights are laid out for)."""
    from gpt2.device import parse_dtype

    model = load_model(spec.resolved_source(), device=device, dtype=parse_dtype(spec.dtype, device))
    if spec.quantize == "int8":
        from gpt2.quantize import quantize_int8

        model = quantize_int8(model)
    elif spec.quantize == "nf4":
        from gpt2 import GPT
        from gpt2.quantize import quantize_nf4

        if not isinstance(model, GPT):  # an early-exit model: its classifier was calibrated on unquantized blocks
            raise ValueError(f"variant {spec.name!r}: quantize nf4 applies to a plain checkpoint, not {spec.source}")
        model = quantize_nf4(model, device=device)
    if device.type == "cpu":
        from gpt2.early_exit import EarlyExitGPT
        from gpt2.packed_linear import pack_linears

        # The backbone's float linears in oneDNN's layout: a batched decoding step is 2-4x faster in fp32 on CPU.
        # Not the early-exit classifier, whose dtype is read from its weight.
        pack_linears(model.base if isinstance(model, EarlyExitGPT) else model, batch_hint=max_batch)
    return model.eval()
