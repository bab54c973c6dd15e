"""The fine-tuning run config (configs/finetune-*.yaml), section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.models import is_mlflow_uri
from cluster.storage import local_run_root
from gpt2.lora import TARGETS, LoRAConfig

# The seeds' learning-rate grid: 6 values from 1e-4 to 7e-3.
DEFAULT_LR_GRID = (1e-4, 3e-4, 7e-4, 1e-3, 3e-3, 7e-3)


@dataclass(frozen=True)
class ModelSection:
    source: str = "runs/pretrain/local/final"  # checkpoint dir, Hugging Face GPT-2 dir, or MLflow model URI


@dataclass(frozen=True)
class DataSection:
    inputs: tuple[str, ...] = ()  # files or folders of .txt / .jsonl / .parquet documents
    dataset: str | None = None  # "wikitext-2" (its train split); then inputs may name a local copy of it
    text_field: str = "text"  # the document key in .jsonl / column in .parquet
    txt_delimiter: str | None = None  # None: one .txt file is one document; "SEP"; or "START...END" e.g. "<LOC>...</LOC>"
    max_documents: int | None = None  # use only the first N documents (quick runs on a slice of a big corpus)
    seq_len: int = 512
    val_fraction: float = 0.1
    split_seed: int = 0


@dataclass(frozen=True)
class TrainSection:
    mode: str = "full"  # "full" or "lora"
    lr: float = 3e-4  # peak learning rate when there is no search (--search picks it)
    epochs: int = 3
    micro_batch: int = 8  # sequences per worker per step
    warmup_fraction: float = 0.05  # of all steps; then cosine decay to lr × min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # adapters and full weights alike: decay would pull the model away from the domain
    grad_clip: float = 1.0
    patience: int | None = 2  # stop after this many epochs without a new best validation loss (None: never)
    min_delta: float = 0.0
    autocast: str = "auto"
    seed: int = 1337


@dataclass(frozen=True)
class LoRASection:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("attn.c_attn",)  # ~0.24% of GPT-2 124M's parameters at rank 8
    layers: tuple[int, ...] | None = None  # None: every block

    def build(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets, layers=self.layers)


@dataclass(frozen=True)
class SearchSection:
    lrs: tuple[float, ...] = DEFAULT_LR_GRID  # grid search over these (used when num_samples is 0)
    num_samples: int = 0  # > 0: sample this many learning rates log-uniformly from [low, high] instead of the grid
    low: float = 1e-4
    high: float = 7e-3
    epochs: int = 2  # per trial (ASHA's max_t)
    grace_period: int = 1  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 2
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0


@dataclass(frozen=True)
class SamplesSection:
    prompts: tuple[str, ...] = ("The", "In this chapter")
    max_tokens: int = 300
    top_k: int = 50
    temperature: float = 0.9
    seed: int = 42


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 1  # Ray Train workers of the final fine-tune
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # 0: the worker's CPU count


@dataclass(frozen=True)
class RunSection:
    experiment: str = "finetune"
    name: str = "finetune-local"
    root: str = "runs"
    tracking_uri: str | None = None
    max_failures: int = 1
    registered_model: str | None = None  # MLflow registered model name; None: gpt2-<name>-<kind> (cluster/registry.py)


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoRASection = field(default_factory=LoRASection)
    search: SearchSection = field(default_factory=SearchSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self, search: bool = False) -> None:
        """What can be checked before any worker starts; raises ValueError naming the field."""
        t, s = self.train, self.search
        local_run_root(self.run.root, "fine-tuning")
        if t.mode not in ("full", "lora"):
            raise ValueError(f"train.mode must be 'full' or 'lora', got {t.mode!r}")
        for name in ("epochs", "micro_batch"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if t.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {t.lr}")
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if self.data.dataset not in (None, "wikitext-2"):
            raise ValueError(f"data.dataset: only 'wikitext-2' is known, got {self.data.dataset!r}")
        if self.data.dataset is None and not self.data.inputs:
            raise ValueError("data.inputs: give the domain files/folders (or data.dataset: wikitext-2)")
        if self.data.dataset and len(self.data.inputs) > 1:
            raise ValueError("data.inputs: with data.dataset, give at most one folder (a local copy of the dataset)")
        for path in self.data.inputs:
            if "://" not in path and not Path(path).exists():
                raise ValueError(f"data.inputs: {path} does not exist")
        source = self.model.source
        if not is_mlflow_uri(source) and "/" in source and not Path(source).exists():
            raise ValueError(f"model.source: {source} does not exist (a checkpoint dir, HF dir or MLflow model URI)")
        if t.mode == "lora":
            unknown = set(self.lora.targets) - set(TARGETS)
            if unknown:
                raise ValueError(f"lora.targets: unknown {sorted(unknown)}; choose from {list(TARGETS)}")
            self.lora.build()
        if search:
            if s.num_samples < 0 or (s.num_samples == 0 and not s.lrs):
                raise ValueError("search: the learning-rate search space is empty (give search.lrs or search.num_samples)")
            if any(lr <= 0 for lr in s.lrs) or not 0 < s.low < s.high:
                raise ValueError("search: learning rates must be positive and low < high")
            if s.epochs < 1 or s.grace_period < 1 or s.reduction_factor < 2:
                raise ValueError("search: epochs and grace_period must be >= 1, reduction_factor >= 2")

    def run_dir(self) -> str:
        return f"{self.run.root.rstrip('/')}/{self.run.experiment}/{self.run.name}"
