"""The early-exit training run config (configs/early-exit-*.yaml), section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.config.sections import JobConfig, ModelSource, Run, Scaling, check_model_source, check_shards
from cluster.runtime.models import is_mlflow_uri
from cluster.runtime.storage import local_run_root
from gpt2.checkpoint import read_config
from gpt2.config import GPTConfig
from gpt2.data import ShardedTokenLoader
from gpt2.early_exit import check_exit_layer, default_exit_layer

# Dense near the top, where the 97% agreement target usually sits; 0.5 anchors the cheap end of the curve.
DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


@dataclass(frozen=True)
class ExitModel(ModelSource):
    exit_layer: int | None = None  # blocks run before the exit; None: three quarters of the depth


@dataclass(frozen=True)
class ExitData:
    shards: str = "data/pydocs"  # a directory with manifest.json (from jobs/prepare_data.py): train and val splits
    seq_len: int = 256  # tokens per row fed to the frozen backbone
    micro_batch: int = 8  # rows per backbone forward pass
    train_batches: int = 32  # micro-batches of training windows per worker: the classifier's training positions
    val_batches: int = 16  # micro-batches of the validation split for held-out metrics and the tau sweep (0: all)
    seed: int = 0  # the order in which training windows are drawn


@dataclass(frozen=True)
class Classifier:
    hidden_dim: int = 128
    head_features: bool = True  # also feed the exit head's max prob, entropy and top-2 margin (costs one head pass)
    epochs: int = 10
    batch_size: int = 256  # positions per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.01
    balance_classes: bool = False  # weight the "exit is safe" class by n_negative / n_positive
    seed: int = 0


@dataclass(frozen=True)
class Calibration:
    taus: tuple[float, ...] = DEFAULT_TAUS  # thresholds swept on the validation split
    # The chosen tau is the one with the highest exit rate whose next-token agreement with the full model reaches
    # this; when none does, the most accurate tau is taken and the run says so (see cluster/train/early_exit.py).
    target_agreement: float = 0.97


@dataclass(frozen=True)
class EarlyExitRun(Run):
    experiment: str = "early-exit"  # outputs in <root>/<experiment>/<name>/; the early-exit model in .../model
    register_model: bool = True  # register the early-exit model in MLflow (as registered_model)


@dataclass(frozen=True)
class EarlyExitConfig(JobConfig):
    model: ExitModel = field(default_factory=ExitModel)
    data: ExitData = field(default_factory=ExitData)
    classifier: Classifier = field(default_factory=Classifier)
    calibration: Calibration = field(default_factory=Calibration)
    # The classifier is tiny: more workers only split feature extraction (DDP over their shards).
    scaling: Scaling = field(default_factory=Scaling)
    run: EarlyExitRun = field(default_factory=EarlyExitRun)

    def validate(self) -> None:
        """Everything that can be checked before a worker starts; raises ValueError naming the field.

        The model's shape is checked here for a local directory; an MLflow model is checked by the driver once it
        is downloaded (`check_model`).
        """
        self.check_settings()
        source = self.model.source
        check_model_source(source)
        if not is_mlflow_uri(source) and Path(source).is_dir():
            self.check_model(source)
        self._check_shards()

    def check_settings(self) -> None:
        """The recipe by itself, without the model and shards it reads (the pipeline checks it before they are
        written)."""
        local_run_root(self.run.root, "early-exit training")
        self.run.validate()
        d, c = self.data, self.classifier
        for name, value in (("data.seq_len", d.seq_len), ("data.micro_batch", d.micro_batch),
                            ("data.train_batches", d.train_batches), ("classifier.hidden_dim", c.hidden_dim),
                            ("classifier.epochs", c.epochs), ("classifier.batch_size", c.batch_size),
                            ("scaling.num_workers", self.scaling.num_workers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if d.val_batches < 0:
            raise ValueError(f"data.val_batches must be >= 0 (0: the whole validation split), got {d.val_batches}")
        if c.lr <= 0:
            raise ValueError(f"classifier.lr must be positive, got {c.lr}")
        taus = self.calibration.taus
        if not taus or any(t < 0 for t in taus):
            raise ValueError(f"calibration.taus must be a non-empty list of thresholds >= 0, got {list(taus)}")
        if not 0 < self.calibration.target_agreement <= 1:
            raise ValueError(
                f"calibration.target_agreement must be in (0, 1], got {self.calibration.target_agreement}"
            )

    def check_model(self, directory: str | Path) -> GPTConfig:
        """The base model's config, after checking model.exit_layer and data.seq_len against it."""
        try:
            config = read_config(directory)
        except ValueError as e:
            raise ValueError(f"model.source: {e}") from e
        return self.check_model_config(config)

    def check_model_config(self, config: GPTConfig) -> GPTConfig:
        """model.exit_layer and data.seq_len against the base model's shape (read from its folder, or the shape a
        pipeline is about to pretrain)."""
        try:
            check_exit_layer(self.exit_layer(config), config.n_layer)
        except ValueError as e:
            raise ValueError(f"model.exit_layer: {e}") from e
        if self.data.seq_len > config.block_size:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds the model's block_size={config.block_size}")
        return config

    def exit_layer(self, config: GPTConfig) -> int:
        return default_exit_layer(config.n_layer) if self.model.exit_layer is None else self.model.exit_layer

    def _check_shards(self) -> None:
        check_shards(self.data.shards)
        shards = Path(self.data.shards)
        d = self.data
        try:
            # Constructing the loaders checks that both splits exist and that every worker gets a full batch.
            ShardedTokenLoader(shards, d.micro_batch, d.seq_len, world_size=self.scaling.num_workers, split="train")
            val = ShardedTokenLoader(shards, d.micro_batch, d.seq_len, split="val")
        except (OSError, ValueError) as e:
            raise ValueError(f"data.shards={self.data.shards}: {e}") from e
        if val.num_tokens <= d.seq_len:
            raise ValueError(
                f"data.shards={self.data.shards}: the validation split has {val.num_tokens} tokens, fewer than one"
                f" row of data.seq_len + 1 = {d.seq_len + 1}"
            )
