"""The pretraining run config: what configs/*.yaml hold, section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster import storage
from gpt2.config import GPTConfig, preset
from gpt2.train import TrainConfig


@dataclass(frozen=True)
class ModelSection:
    preset: str = "gpt2"
    vocab_pad_multiple: int = 64  # 50257 -> 50304 rows: friendlier matmul shapes
    dropout: float = 0.0
    norm: str = "pre"
    # Optional shape overrides of the preset (None keeps the preset's value).
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None

    def build(self) -> GPTConfig:
        shape = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k)}
        return preset(self.preset, vocab_pad_multiple=self.vocab_pad_multiple, dropout=self.dropout, norm=self.norm, **shape)


@dataclass(frozen=True)
class DataSection:
    shards: str = "data/fineweb-edu"  # a folder or s3:// / gs:// URI with manifest.json (from jobs/prepare_data.py)


@dataclass(frozen=True)
class EvalSection:
    val_every: int = 250  # steps between validation-loss measurements (0: only at the end)
    val_batches: int = 20  # micro-batches per worker per validation
    sample_every: int = 1000  # steps between logged sample generations (0: only at the end)
    sample_prompts: tuple[str, ...] = ("Hello, I'm a language model,", "The most important thing to learn is")
    sample_tokens: int = 48
    hellaswag_every: int = 0  # steps between HellaSwag runs (0: off)
    hellaswag_path: str | None = None  # hellaswag_val.jsonl (downloaded when None and there is network)
    hellaswag_limit: int | None = None  # score only the first N examples (None: all 10,042)


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 5000  # steps between checkpoints (the last step is always checkpointed)
    keep: int = 2  # newest checkpoints kept for resuming; the best by val loss is exported to <run>/best


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 8
    use_gpu: bool = True
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch threads per worker; 0 = the worker's CPU count (Ray sets OMP from num_cpus)


@dataclass(frozen=True)
class RunSection:
    experiment: str = "pretrain"
    name: str = "gpt2-124m"  # the same name again resumes the run
    root: str = "runs"  # runs/<experiment>/<name>/ ; on a multi-node cluster shared storage or an s3:// / gs:// URI
    max_failures: int = 2  # worker-group restarts from the newest checkpoint before giving up
    tracking_uri: str | None = None  # MLflow; default: $MLFLOW_TRACKING_URI, else the local server
    registered_model: str | None = None  # MLflow registered model name; None: gpt2-<name>-<kind> (cluster/registry.py)


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        """Everything that can be checked before a worker starts; raises ValueError naming the field."""
        model = self.model.build()
        if self.train.seq_len > model.block_size:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds the model's block_size={model.block_size}")
        self.train.grad_accum_steps(self.scaling.num_workers)
        for name in ("max_steps", "micro_batch", "seq_len"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.scaling.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        if self.eval.hellaswag_path and not Path(self.eval.hellaswag_path).is_file():
            raise ValueError(f"eval.hellaswag_path={self.eval.hellaswag_path}: no such file")
        if not storage.exists(f"{self.data.shards.rstrip('/')}/manifest.json"):
            raise ValueError(
                f"data.shards={self.data.shards}: no manifest.json there; prepare the data first"
                " (python jobs/prepare_data.py ...)"
            )

    def run_dir(self) -> str:
        return f"{self.run.root.rstrip('/')}/{self.run.experiment}/{self.run.name}"
