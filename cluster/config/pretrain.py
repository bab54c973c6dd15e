"""The pretraining run config: what configs/*.yaml hold, section by section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.config.sections import (
    Checkpoints,
    JobConfig,
    ModelShape,
    Run,
    Scaling,
    Shards,
    Validation,
    check_shards,
    check_step_recipe,
)
from gpt2.train import TrainConfig


@dataclass(frozen=True)
class PretrainEval(Validation):
    sample_every: int = 1000  # steps between logged sample generations (0: only at the end)
    sample_prompts: tuple[str, ...] = ("Hello, I'm a language model,", "The most important thing to learn is")
    sample_tokens: int = 48
    hellaswag_every: int = 0  # steps between HellaSwag runs (0: off)
    hellaswag_path: str | None = None  # hellaswag_val.jsonl (downloaded when None and there is network)
    hellaswag_limit: int | None = None  # score only the first N examples (None: all 10,042)


@dataclass(frozen=True)
class PretrainConfig(JobConfig):
    model: ModelShape = field(default_factory=ModelShape)
    data: Shards = field(default_factory=Shards)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: PretrainEval = field(default_factory=PretrainEval)
    # The best checkpoint by validation loss is also exported to <run>/best.
    checkpoint: Checkpoints = field(default_factory=Checkpoints)
    scaling: Scaling = field(default_factory=lambda: Scaling(num_workers=8, use_gpu=True))
    run: Run = field(default_factory=lambda: Run(experiment="pretrain", name="gpt2-124m", max_failures=2))

    def validate(self) -> None:
        """Everything that can be checked before a worker starts; raises ValueError naming the field."""
        self.check_settings()
        check_shards(self.data.shards)

    def check_settings(self) -> None:
        """The recipe by itself, without the shards it reads (the pipeline checks it before they are written)."""
        check_step_recipe(self.train, self.scaling, self.model.build().block_size)
        self.run.validate()
        self.eval.validate()
        if self.eval.hellaswag_path and not Path(self.eval.hellaswag_path).is_file():
            raise ValueError(f"eval.hellaswag_path={self.eval.hellaswag_path}: no such file")
