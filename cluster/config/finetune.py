"""The fine-tuning run config (configs/finetune-*.yaml), section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.config.sections import JobConfig, LoRA, ModelSource, Run, Scaling, check_model_source, check_optimizer
from cluster.runtime.storage import local_run_root

# The seeds' learning-rate grid: 6 values from 1e-4 to 7e-3.
DEFAULT_LR_GRID = (1e-4, 3e-4, 7e-4, 1e-3, 3e-3, 7e-3)


@dataclass(frozen=True)
class FinetuneData:
    inputs: tuple[str, ...] = ()  # files or folders of .txt / .jsonl / .parquet documents
    dataset: str | None = None  # "wikitext-2" (its train split); then inputs may name a local copy of it
    text_field: str = "text"  # the document key in .jsonl / column in .parquet
    txt_delimiter: str | None = None  # None: one .txt file is one document; "SEP"; or "START...END" e.g. "<LOC>...</LOC>"
    max_documents: int | None = None  # use only the first N documents (quick runs on a slice of a big corpus)
    seq_len: int = 512
    val_fraction: float = 0.1
    split_seed: int = 0


@dataclass(frozen=True)
class FinetuneTrain:
    """The schedule counts epochs of a small domain corpus, not steps of a stream: the job derives
    gpt2.train.TrainConfig (steps, warmup steps, min_lr) from these and the data's size."""

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
class Search:
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
class Samples:
    prompts: tuple[str, ...] = ("The", "In this chapter")
    max_tokens: int = 300
    top_k: int = 50
    temperature: float = 0.9
    seed: int = 42


@dataclass(frozen=True)
class FinetuneConfig(JobConfig):
    model: ModelSource = field(default_factory=ModelSource)
    data: FinetuneData = field(default_factory=FinetuneData)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    lora: LoRA = field(default_factory=LoRA)
    search: Search = field(default_factory=Search)
    samples: Samples = field(default_factory=Samples)
    scaling: Scaling = field(default_factory=Scaling)  # the final fine-tune's Ray Train workers
    run: Run = field(default_factory=lambda: Run(experiment="finetune", name="finetune-local", max_failures=1))

    def validate(self, search: bool = False) -> None:
        """What can be checked before any worker starts; raises ValueError naming the field."""
        self.check_settings(search)
        for path in self.data.inputs:
            if "://" not in path and not Path(path).exists():
                raise ValueError(f"data.inputs: {path} does not exist")
        check_model_source(self.model.source)

    def check_settings(self, search: bool = False) -> None:
        """The recipe by itself, without the model and files it reads (the pipeline checks it before they are
        written)."""
        t, s = self.train, self.search
        local_run_root(self.run.root, "fine-tuning")
        self.run.validate()
        if t.mode not in ("full", "lora"):
            raise ValueError(f"train.mode must be 'full' or 'lora', got {t.mode!r}")
        for name in ("epochs", "micro_batch"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        check_optimizer(t)  # lr, weight_decay, grad_clip, autocast
        self.scaling.validate()
        if not 0 < self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if self.data.dataset not in (None, "wikitext-2"):
            raise ValueError(f"data.dataset: only 'wikitext-2' is known, got {self.data.dataset!r}")
        if self.data.dataset is None and not self.data.inputs:
            raise ValueError("data.inputs: give the domain files/folders (or data.dataset: wikitext-2)")
        if self.data.dataset and len(self.data.inputs) > 1:
            raise ValueError("data.inputs: with data.dataset, give at most one folder (a local copy of the dataset)")
        if t.mode == "lora":
            self.lora.build()
        if search:
            if s.num_samples < 0 or (s.num_samples == 0 and not s.lrs):
                raise ValueError("search: the learning-rate search space is empty (give search.lrs or search.num_samples)")
            if any(lr <= 0 for lr in s.lrs) or not 0 < s.low < s.high:
                raise ValueError("search: learning rates must be positive and low < high")
            if s.epochs < 1 or s.grace_period < 1 or s.reduction_factor < 2:
                raise ValueError("search: epochs and grace_period must be >= 1, reduction_factor >= 2")
