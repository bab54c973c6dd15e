"""The config sections that several jobs share, defined once: a job's config composes them with its own.

A job gives a shared section its own defaults with `field(default_factory=lambda: Run(experiment=...))`; a YAML file
or an override then changes only the keys it names (cluster.config.loading.build starts from the field's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cluster.config.loading import check_name
from cluster.runtime import storage
from cluster.runtime.mlflow_connection import check_tracking_uri
from gpt2.checkpoint import CONFIG_FILE, hub_like
from gpt2.config import GPTConfig, preset
from gpt2.lora import TARGETS, LoRAConfig
from gpt2.train import AUTOCAST_CHOICES, TrainConfig


@dataclass(frozen=True)
class Run:
    experiment: str = "run"
    name: str = "local"  # the same name again resumes the run (a job that keeps checkpoints) or replaces its outputs
    root: str = "runs"  # outputs in <root>/<experiment>/<name>/; on a multi-node cluster shared storage or a URI
    max_failures: int = 0  # worker-group restarts from the newest checkpoint before giving up
    tracking_uri: str | None = None  # MLflow; default: $MLFLOW_TRACKING_URI, else the local server
    registered_model: str | None = None  # MLflow registered model name; None: gpt2-<name>-<kind> (cluster/runtime/registry.py)

    def directory(self) -> str:
        return f"{self.root.rstrip('/')}/{self.experiment}/{self.name}"

    def validate(self) -> None:
        check_name(self.experiment, "run.experiment")
        check_name(self.name, "run.name")


class JobConfig:
    """What every job's config offers beside its sections: the run directory, <root>/<experiment>/<name>."""

    run: Run

    def run_dir(self) -> str:
        return self.run.directory()

    def check_tracking(self) -> str:
        """The MLflow tracking URI the job logs to (run.tracking_uri, else $MLFLOW_TRACKING_URI, else the local
        server), refused when MLflow cannot open it. Not part of validate(): a job that logs nothing (--no-mlflow),
        or a pipeline's stage that logs where the pipeline says, has no use for the check."""
        return check_tracking_uri(self.run.tracking_uri, "run.tracking_uri")


@dataclass(frozen=True)
class Scaling:
    num_workers: int = 1  # Ray Train workers (DDP)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch threads per worker; 0 = the worker's CPU count (Ray sets OMP from num_cpus)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")


@dataclass(frozen=True)
class ModelShape:
    """A model trained from scratch: a preset, optionally reshaped."""

    preset: str = "gpt2"
    vocab_pad_multiple: int = 64  # 50257 -> 50304 rows: friendlier matmul shapes
    dropout: float = 0.0
    norm: str = "pre"
    # Optional shape overrides of the preset (None keeps the preset's value).
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None

    def build(self, section: str = "model") -> GPTConfig:
        """The model's GPTConfig; a ValueError names the field of `section` (the config's name for this one)."""
        shape = {k: v for k in ("n_layer", "n_head", "n_embd", "block_size") if (v := getattr(self, k)) is not None}
        for name, value in shape.items():
            if value < 1:  # 0 is a value, not "keep the preset's"
                raise ValueError(f"{section}.{name} must be >= 1, got {value}")
        try:
            return preset(self.preset, vocab_pad_multiple=self.vocab_pad_multiple, dropout=self.dropout, norm=self.norm,
                          **shape)
        except ValueError as e:
            raise ValueError(f"{section}: {e}") from e


@dataclass(frozen=True)
class ModelSource:
    """A model that a job starts from."""

    source: str = "runs/pretrain/local/final"  # checkpoint dir, Hugging Face GPT-2 dir or hub name, MLflow model URI


@dataclass(frozen=True)
class Shards:
    shards: str = "data/fineweb-edu"  # a folder or s3:// / gs:// URI with manifest.json (from jobs/prepare_data.py)


@dataclass(frozen=True)
class Checkpoints:
    every: int = 5000  # steps between checkpoints (the last step is always checkpointed)
    keep: int = 2  # newest checkpoints kept for resuming


@dataclass(frozen=True)
class Validation:
    """Held-out loss during a step-based run; a job's eval section extends it with what else it measures."""

    val_every: int = 250  # steps between validation-loss measurements (0: only at the end)
    val_batches: int = 20  # micro-batches per worker per validation

    def validate(self) -> None:
        if self.val_every < 0:
            raise ValueError(f"eval.val_every must be >= 0, got {self.val_every}")
        if self.val_batches < 1:
            raise ValueError(f"eval.val_batches must be >= 1, got {self.val_batches}")


@dataclass(frozen=True)
class LoRA:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attn.c_attn",)  # ~0.24% of GPT-2 124M's parameters at rank 8
    layers: tuple[int, ...] | None = None  # None: every block

    def build(self) -> LoRAConfig:
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"lora.targets: unknown {sorted(unknown)}; choose from {list(TARGETS)}")
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets, layers=self.layers)


def check_optimizer(train) -> None:
    """The optimizer and precision settings of a training section (those it has of autocast, max_lr, min_lr, lr,
    beta1, beta2, eps, weight_decay, grad_clip), checked before any worker starts rather than by torch.optim or
    autocast in the first step."""
    if train.autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"train.autocast must be auto, bf16 or fp32, got {train.autocast!r}")
    lrs = [n for n in ("max_lr", "min_lr", "lr") if hasattr(train, n)]
    for name in lrs:
        value = getattr(train, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and name != "min_lr"):
            raise ValueError(f"train.{name} must be a finite number > 0{' (or 0)' if name == 'min_lr' else ''}, "
                             f"got {value}")
    for name in [n for n in ("beta1", "beta2") if hasattr(train, n)]:
        value = getattr(train, name)
        if not 0 <= value < 1:
            raise ValueError(f"train.{name} must be in [0, 1), got {value}")
    for name in [n for n in ("weight_decay", "grad_clip", "eps") if hasattr(train, n)]:
        value = getattr(train, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"train.{name} must be a finite number >= 0, got {value}")


def check_step_recipe(train: TrainConfig, scaling: Scaling, block_size: int, model: str = "model") -> None:
    """A step-based training recipe (gpt2.train.TrainConfig) against the workers and the model it trains: positive
    sizes, a batch that splits evenly into micro-batches over the workers, rows that fit the model's context."""
    if train.seq_len > block_size:
        raise ValueError(f"train.seq_len={train.seq_len} exceeds the {model}'s block_size={block_size}")
    for name in ("max_steps", "micro_batch", "seq_len"):
        if getattr(train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1")
    check_optimizer(train)
    scaling.validate()
    train.grad_accum_steps(scaling.num_workers)  # after the checks above: it divides by their product


def check_shards(location: str, field: str = "data.shards") -> None:
    """A shard folder (local or a URI) must hold the manifest that jobs/prepare_data.py writes."""
    if not storage.exists(f"{location.rstrip('/')}/manifest.json"):
        raise ValueError(f"{field}={location}: no manifest.json there; prepare the data first (python jobs/prepare_data.py ...)")


def check_model_source(source: str, field: str = "model.source") -> None:
    """A model source names a directory, an MLflow model URI, or a hub name such as "gpt2"; a path that does not
    exist is an error here rather than a failed download later."""
    from cluster.runtime.models import is_mlflow_uri

    local = not (is_mlflow_uri(source) or hub_like(source))
    if local and not Path(source).exists():
        raise ValueError(f"{field}: {source} does not exist (a checkpoint dir, HF dir or MLflow model URI)")
    if local and not (Path(source) / CONFIG_FILE).is_file():
        raise ValueError(f"{field}: {source} is not a model directory (no {CONFIG_FILE})")
