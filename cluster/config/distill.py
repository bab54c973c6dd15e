"""The distillation run config (configs/distill-*.yaml): a teacher to learn from, a student shaped like a pretraining
model, and the pretraining recipe's sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cluster.config.sections import (
    Checkpoints,
    JobConfig,
    ModelShape,
    ModelSource,
    Run,
    Scaling,
    Shards,
    Validation,
    check_model_source,
    check_shards,
    check_step_recipe,
)
from cluster.runtime.models import is_mlflow_uri
from cluster.runtime.storage import local_run_root
from gpt2.checkpoint import read_config
from gpt2.train import TrainConfig


@dataclass(frozen=True)
class DistillSection:
    temperature: float = 2.0  # softens both distributions; the loss scales the KL term by T² to keep its size
    alpha: float = 0.5  # share of the KL term; 1 - alpha goes to the cross-entropy with the data


@dataclass(frozen=True)
class DistillEval(Validation):
    val_every: int = 50
    val_batches: int = 8
    report_tokens: int = 32_768  # validation tokens of the final student-vs-teacher perplexity
    decode_tokens: int = 64  # greedy tokens per decode-speed run in the final comparison


@dataclass(frozen=True)
class DistillConfig(JobConfig):
    teacher: ModelSource = field(default_factory=ModelSource)
    student: ModelShape = field(default_factory=lambda: ModelShape(preset="small", n_layer=2))
    data: Shards = field(default_factory=Shards)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: DistillEval = field(default_factory=DistillEval)
    checkpoint: Checkpoints = field(default_factory=Checkpoints)
    scaling: Scaling = field(default_factory=lambda: Scaling(num_workers=8, use_gpu=True))
    run: Run = field(default_factory=lambda: Run(experiment="distill", name="distill-local", max_failures=2))

    def validate(self) -> None:
        """Everything that can be checked before a worker starts; raises ValueError naming the field."""
        student = self.student.build("student")
        local_run_root(self.run.root, "distillation")
        self.run.validate()
        if not self.distill.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.distill.temperature}")
        if not 0 <= self.distill.alpha <= 1:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.distill.alpha}")
        check_step_recipe(self.train, self.scaling, student.block_size, "student")
        self.eval.validate()
        for name in ("report_tokens", "decode_tokens"):
            if getattr(self.eval, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1")
        check_shards(self.data.shards)
        source = self.teacher.source
        check_model_source(source, "teacher.source")
        if not is_mlflow_uri(source) and Path(source).is_dir():  # an MLflow model is checked when the workers load it
            teacher = read_config(source)  # a directory that is not a model fails here, naming the file
            if teacher.vocab_size != student.vocab_size:
                raise ValueError(f"teacher.source={source} has a vocabulary of {teacher.vocab_size} tokens, the student"
                                 f" {student.vocab_size}: distillation compares their distributions token by token")
            if self.train.seq_len > teacher.block_size:
                raise ValueError(f"train.seq_len={self.train.seq_len} exceeds the teacher's block_size={teacher.block_size}")
