"""LoRA (Hu et al., 2021): fine-tune a frozen GPT through low-rank updates W + (alpha/r)·B·A of chosen projections.

`apply_lora` wraps the target nn.Linear layers in place and freezes every other parameter (embeddings and
LayerNorms included). The wrapper keeps the base layer's parameter names (`...attn.c_attn.weight`), so a LoRA
model's state dict is the base state dict plus `...lora_A` / `...lora_B`. Adapters are saved on their own
(`save_adapters`, in peft's format for Hugging Face GPT-2, which peft and transformers' load_adapter read;
`load_adapters` reads that format whoever wrote it) or folded into a plain GPT (`merge_lora`) that
`gpt2.checkpoint.save_pretrained` writes as a checkpoint the server and Hugging Face transformers load. Pass the
unwrapped model (not a DDP wrapper) to the functions here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import CheckpointError, atomic_directory
from gpt2.model import GPT

# The projections of a GPT-2 block, named as in the model (and in the OpenAI / Hugging Face checkpoints).
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# peft's file names, which peft, transformers' load_adapter and vLLM's --lora-modules look for.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Adapters this project saved before it wrote peft's format: its own config keys and tensor names. Still loaded.
LEGACY_WEIGHTS_FILE = "adapters.safetensors"
# peft names a tensor by its path in PeftModel(GPT2LMHeadModel): base_model (the LoraModel) . model (the GPT-2),
# then the module's own path, which is the same as here, and the nn.Linear inside lora_A / lora_B.
_PEFT_PREFIX, _PEFT_SUFFIX = "base_model.model.", ".weight"
# peft options that this project's LoRA does not have. Those that add tensors (DoRA's magnitudes, modules_to_save)
# would also fail as unexpected tensors, but the others (alpha_pattern, ...) would load and compute something else.
_PEFT_OPTIONS_NOT_SUPPORTED = (
    "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
    "target_parameters", "layer_replication", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
    "velora_config", "monteclora_config", "kasa_config", "loftq_config",
)  # fmt: skip
# Initialisations that leave the base weights alone; PiSSA, OLoRA, LoftQ, ... change them, so their adapters only
# fit the changed base.
_PEFT_INITS_SUPPORTED = (True, False, "gaussian")


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
        # Order means nothing to the model; one order makes configs read back from any file compare equal.
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))

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
    base_model: str | None  # the base checkpoint's path or hub name (peft's base_model_name_or_path)


def _peft_name(name: str) -> str:
    """peft's name for a tensor of lora_state_dict: transformer.h.0.attn.c_attn.lora_A becomes
    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight."""
    return f"{_PEFT_PREFIX}{name}{_PEFT_SUFFIX}"


def _name_from_peft(key: str) -> str:
    """The inverse of _peft_name; a key of another shape comes back unchanged, to be reported as unexpected."""
    if key.startswith(_PEFT_PREFIX) and key.endswith(_PEFT_SUFFIX):
        return key[len(_PEFT_PREFIX) : -len(_PEFT_SUFFIX)]
    return key


def _peft_config(cfg: LoRAConfig, base_model: str | None) -> dict:
    """peft's LoraConfig fields for `cfg`.

    Hugging Face GPT-2's projections are Conv1D modules with weight (in, out), which peft records as fan_in_fan_out;
    that flag only transposes the weight when peft merges. lora_A (r, in) and lora_B (out, r) and the update
    scaling·B·A·x are the same as here, so the tensors need no transposing.
    """
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # peft and vLLM declare an int
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "use_rslora": False,  # scaling alpha / r, as in LoRALinear
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),  # peft matches the modules whose names end with ".attn.c_attn", ...
        "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
        "layers_pattern": None if cfg.layers is None else "h",  # the blocks are transformer.h.<i>
        "fan_in_fan_out": True,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
    }


def save_adapters(model: GPT, directory: str | os.PathLike, *, base_model: str | None = None) -> None:
    """Write `directory` atomically in peft's LoRA format for Hugging Face GPT-2: adapter_config.json and
    adapter_model.safetensors. `base_model` is the base checkpoint's path or hub name; then
    peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_model), directory) computes the logits
    of merge_lora(model)."""
    cfg = _lora_config(model)
    tensors = {_peft_name(name): t.detach().contiguous().cpu() for name, t in lora_state_dict(model).items()}
    with atomic_directory(directory, replaces=ADAPTER_CONFIG_FILE) as tmp:
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(_peft_config(cfg, base_model), indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def _adapted_targets(names: Iterable[str]) -> tuple[str, ...]:
    """The projections that tensors of these names (as in lora_state_dict) adapt.

    Read from the tensors rather than from peft's target_modules, which peft matches by suffix or as a regex:
    "c_proj" there means both attn.c_proj and mlp.c_proj.
    """
    found = {m[1] for name in names if (m := re.fullmatch(r"transformer\.h\.\d+\.(.+)\.lora_[AB]", name))}
    return tuple(t for t in TARGETS if t in found)


def _lora_config_from_peft(d: dict, directory: Path) -> LoRAConfig:
    """The LoRAConfig that computes what peft computes for the LoRA config `d`; AdapterError for peft options that
    this project's LoRA does not have."""
    path = directory / ADAPTER_CONFIG_FILE
    if d["peft_type"] != "LORA":
        raise AdapterError(f"{path}: peft_type {d['peft_type']!r}; only LoRA adapters load here")
    unsupported = [f"{k}={d[k]!r}" for k in _PEFT_OPTIONS_NOT_SUPPORTED if d.get(k)]
    if d.get("bias", "none") != "none":
        unsupported.append(f"bias={d['bias']!r}")
    if d.get("init_lora_weights", True) not in _PEFT_INITS_SUPPORTED:
        unsupported.append(f"init_lora_weights={d['init_lora_weights']!r}")
    if unsupported:
        raise AdapterError(f"{path}: peft options this project's LoRA does not support: {', '.join(unsupported)}")
    rank, alpha = d.get("r", 8), d.get("lora_alpha", 8)  # peft's defaults
    if d.get("use_rslora"):  # rank-stabilised scaling alpha / sqrt(r) is alpha·sqrt(r) / r
        alpha = alpha * math.sqrt(rank)
    layers = d.get("layers_to_transform")
    return LoRAConfig(
        rank=rank,
        alpha=alpha,
        dropout=d.get("lora_dropout", 0.0),
        targets=_adapted_targets(_read_adapter_tensors(directory)[1]),
        layers=(layers,) if isinstance(layers, int) else layers,
    )


def read_adapter_config(directory: str | os.PathLike) -> AdapterInfo:
    """The LoRA config and base model recorded in `directory`, e.g. to load the right base before the adapters.

    Reads peft's LoRA format (written here or by peft for a Hugging Face GPT-2) and the format this project wrote
    before.
    """
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_FILE
    if not path.is_file():
        where = "does not exist" if not directory.is_dir() else f"has no {ADAPTER_CONFIG_FILE}"
        raise AdapterError(f"adapter directory {directory} {where}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(d, dict) or not ("peft_type" in d or ("lora" in d and d.get("format_version", 1) == 1)):
        raise AdapterError(f"{path}: neither a peft adapter config nor one of this project's earlier format")
    try:
        if "peft_type" in d:
            return AdapterInfo(_lora_config_from_peft(d, directory), d.get("base_model_name_or_path"))
        return AdapterInfo(LoRAConfig.from_dict(d["lora"]), d.get("base_model"))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: not a valid adapter config ({type(e).__name__}: {e})") from e


def _read_adapter_tensors(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file and its tensors, named as in lora_state_dict."""
    peft_path, legacy_path = directory / ADAPTER_WEIGHTS_FILE, directory / LEGACY_WEIGHTS_FILE
    path = peft_path if peft_path.is_file() or not legacy_path.is_file() else legacy_path
    if not path.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS_FILE}")
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: cannot read safetensors file ({e}); it is corrupt or truncated") from e
    if path == peft_path:
        saved = {_name_from_peft(key): t for key, t in saved.items()}
    return path, saved


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
    try:
        targets = _target_layers(model, info.lora)
    except ValueError as e:
        raise AdapterError(f"{directory}: {e} ({trained_on})") from e
    weights_path, saved = _read_adapter_tensors(Path(directory))
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
