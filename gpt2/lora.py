"""LoRA (Hu et al., 2021): fine-tune a frozen GPT through low-rank updates W + (alpha/r)·B·A of chosen projections.

`apply_lora` wraps the target nn.Linear layers in place and freezes every other parameter (embeddings and
LayerNorms included). The wrapper keeps the base layer's parameter names (`...attn.c_attn.weight`), so a LoRA
model's state dict is the base state dict plus `...lora_A` / `...lora_B`. Adapters are saved on their own
(`save_adapters`) or folded into a plain GPT (`merge_lora`) that `gpt2.checkpoint.save_pretrained` writes as a
checkpoint the server and Hugging Face transformers load. Pass the unwrapped model (not a DDP wrapper) to the
functions here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import CheckpointError, atomic_directory
from gpt2.config import GPTConfig
from gpt2.model import GPT

# The projections of a GPT-2 block, named as in the model (and in the OpenAI / Hugging Face checkpoints).
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
ADAPTER_FORMAT_VERSION = 1


class AdapterError(CheckpointError):
    """An adapter directory that cannot be loaded into this model; the message names the file or tensor."""


@dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their shape.

    The default, rank 8 on `attn.c_attn` of every block, trains 294,912 of GPT-2 124M's parameters (0.24%),
    the fraction usually quoted for LoRA on GPT-2. `layers` is None for every block, or block indices.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05  # on the adapter's input only; the frozen path sees the input unchanged
    targets: tuple[str, ...] = ("attn.c_attn",)
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # YAML and JSON give lists; the config is frozen and hashable, so store tuples.
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose one or more of {list(TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets {list(self.targets)} name a projection twice")
        if self.layers is not None:
            bad = [i for i in self.layers if not isinstance(i, int) or i < 0]
            if bad or not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(
                    f"LoRA layers {list(self.layers)}: give distinct non-negative block indices, or None for all"
                )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = x·Wᵀ + b + scaling · dropout(x)·Aᵀ·Bᵀ.

    B starts at zero, so the wrapped layer computes exactly what the base layer did until training moves B.
    A starts like an nn.Linear weight (Kaiming-uniform), so gradients reach B from the first step.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in): the same Parameter object, so the name and any tying survive
        self.register_parameter("bias", base.bias)
        self.rank, self.scaling = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) → (..., out)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def merged_weight(self) -> torch.Tensor:
        """W + scaling·B·A, (out, in), computed in fp32 and returned in the base weight's dtype."""
        delta = self.lora_B.detach().float() @ self.lora_A.detach().float()  # (out, in)
        return (self.weight.detach().float() + self.scaling * delta).to(self.weight.dtype)


def _target_layers(model: GPT, cfg: LoRAConfig) -> dict[str, nn.Module]:
    """The modules `cfg` puts adapters on, by name; ValueError for blocks the model does not have."""
    n_layer = len(model.transformer.h)
    layers = range(n_layer) if cfg.layers is None else cfg.layers
    out_of_range = [i for i in layers if i >= n_layer]
    if out_of_range:
        raise ValueError(f"LoRA layers {out_of_range} do not exist: the model has blocks 0..{n_layer - 1}")
    names = [f"transformer.h.{i}.{target}" for i in layers for target in cfg.targets]
    return {name: model.get_submodule(name) for name in names}


def apply_lora(model: GPT, cfg: LoRAConfig) -> GPT:
    """Freeze every parameter of `model` and wrap its target projections with LoRA, in place; returns `model`."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_lora it first to stack another set")
    targets = _target_layers(model, cfg)
    for name, base in targets.items():
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, LoRA wraps nn.Linear only")
    model.requires_grad_(False)
    for name, base in targets.items():
        parent_name, child_name = name.rsplit(".", 1)
        wrapped = LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout).train(base.training)  # eval stays eval
        setattr(model.get_submodule(parent_name), child_name, wrapped)
    model.lora_config = cfg  # what save_adapters records and load_adapters checks against
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped layers by module name, e.g. "transformer.h.0.attn.c_attn"."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (adapters included in both)."""
    trainable, total = count_parameters(model)
    return trainable / total


def lora_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The adapter tensors only, named as in model.state_dict() ("transformer.h.0.attn.c_attn.lora_A", ...)."""
    if not lora_modules(model):
        raise ValueError("the model has no LoRA adapters; call apply_lora first")
    return {name: t for name, t in model.state_dict().items() if name.endswith((".lora_A", ".lora_B"))}


def _lora_config(model: GPT) -> LoRAConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise ValueError("the model has no LoRA adapters; call apply_lora or load_adapters first")
    return cfg


@dataclass(frozen=True)
class AdapterInfo:
    """What adapter_config.json records: the LoRA shape and the base model the adapters were trained on."""

    lora: LoRAConfig
    base_config: GPTConfig
    base_model: str | None  # the base checkpoint's path or hub name, as given to save_adapters


def save_adapters(model: GPT, directory: str | os.PathLike, *, base_model: str | None = None) -> None:
    """Write `directory` atomically: adapter_config.json (LoRA config, base model identity and config) and
    adapters.safetensors (the lora_A/lora_B tensors). `base_model` is the base checkpoint's path or hub name."""
    cfg = _lora_config(model)
    tensors = {name: t.detach().contiguous().cpu() for name, t in lora_state_dict(model).items()}
    config = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "lora": cfg.to_dict(),
        "base_model": base_model,
        "base_config": model.config.to_dict(),
    }
    with atomic_directory(directory) as tmp:
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def read_adapter_config(directory: str | os.PathLike) -> AdapterInfo:
    """The LoRA config and base model recorded in `directory`, e.g. to load the right base before the adapters."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        where = "does not exist" if not Path(directory).is_dir() else f"has no {ADAPTER_CONFIG_FILE}"
        raise AdapterError(f"adapter directory {directory} {where}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format_version", ADAPTER_FORMAT_VERSION) > ADAPTER_FORMAT_VERSION:
        raise AdapterError(f"{path}: not an adapter config of this project's format {ADAPTER_FORMAT_VERSION}")
    try:
        return AdapterInfo(LoRAConfig.from_dict(d["lora"]), GPTConfig.from_dict(d["base_config"]), d.get("base_model"))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: not a valid adapter config ({type(e).__name__}: {e})") from e


def load_adapters(model: GPT, directory: str | os.PathLike) -> GPT:
    """Load saved adapters into `model`, in place; returns `model`.

    A plain GPT gets apply_lora with the saved config. A model that already has LoRA layers must have the same
    LoRA config (rank, alpha, dropout, targets, layers) as the saved adapters. Everything is checked before the
    model is touched, so a failed load leaves it as it was.
    """
    info = read_adapter_config(directory)
    trained_on = f"adapters trained on base {info.base_model!r}"
    if lora_modules(model):
        saved_cfg, model_cfg = info.lora.to_dict(), _lora_config(model).to_dict()
        differences = [f"{k}: saved {v!r}, model {model_cfg[k]!r}" for k, v in saved_cfg.items() if v != model_cfg[k]]
        if differences:
            raise AdapterError(f"{directory}: LoRA config differs from the model's ({', '.join(differences)})")
    base = info.base_config
    if (model.config.n_layer, model.config.n_embd) != (base.n_layer, base.n_embd):
        raise AdapterError(
            f"{directory}: {trained_on} with n_layer={base.n_layer}, n_embd={base.n_embd}; this model has"
            f" n_layer={model.config.n_layer}, n_embd={model.config.n_embd}"
        )
    targets = _target_layers(model, info.lora)  # in range: the model has the base's n_layer
    weights_path = Path(directory) / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS_FILE}")
    try:
        saved = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_path}: cannot read safetensors file ({e}); it is corrupt or truncated") from e
    rank = info.lora.rank
    shapes = {}
    for name, layer in targets.items():
        shapes[f"{name}.lora_A"] = (rank, layer.in_features)
        shapes[f"{name}.lora_B"] = (layer.out_features, rank)
    missing, unexpected = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or unexpected:
        raise AdapterError(f"{weights_path}: tensors missing {missing[:4]}, unexpected {unexpected[:4]} ({trained_on})")
    for name, shape in shapes.items():
        if tuple(saved[name].shape) != shape:
            raise AdapterError(
                f"{weights_path}: tensor {name} has shape {tuple(saved[name].shape)}, this model needs {shape}"
                f" for rank {rank} ({trained_on})"
            )
    if not lora_modules(model):
        apply_lora(model, info.lora)
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            tensor.copy_(saved[name])
    return model


def merge_lora(model: GPT) -> GPT:
    """A plain GPT (new object, same device and dtype) whose target weights are W + scaling·B·A; `model` is unchanged.

    Its logits equal the LoRA model's in eval mode (adapter dropout off). Save it with
    gpt2.checkpoint.save_pretrained for a checkpoint that the server and transformers load.
    """
    _lora_config(model)
    merged_weights = {f"{name}.weight": m.merged_weight() for name, m in lora_modules(model).items()}
    state = {
        name: merged_weights.get(name, tensor)
        for name, tensor in model.state_dict().items()
        if not name.endswith((".lora_A", ".lora_B"))
    }
    weight = model.transformer.wte.weight
    merged = GPT(model.config).to(device=weight.device, dtype=weight.dtype)
    merged.load_state_dict(state)
    return merged.train(model.training)
