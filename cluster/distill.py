"""Knowledge distillation on Ray Train: a frozen teacher, a smaller student trained on
alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · cross-entropy (gpt2.distill), tracked in MLflow.

The worker loop is the pretraining loop's shape around `gpt2.train.train_step` on a `gpt2.distill.Distiller`; the
Ray-specific calls (context, device, prepare_model, get_checkpoint, report) sit in `_RayWorker`, so the same loop
also runs in this process without Ray (`run_in_process`, one worker). Checkpoints are the student's model directory
plus the training state, in the pretraining format (cluster.pretrain), so a restarted worker group resumes exactly.
After training, `compare_with_teacher` measures student and teacher side by side: perplexity, size, decode speed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.nn as nn
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cluster.compression import (
    VariantRow,
    files_bytes,
    markdown_table,
    measure_variant,
    relative_to_first,
    source_directory,
    table_rows,
    validation_tokens,
    variant_metrics,
    write_csv,
)
from cluster.config import build, flatten, to_dict
from cluster.models import is_mlflow_uri, load_model
from cluster.pretrain_config import CheckpointSection, DataSection, ModelSection, RunSection, ScalingSection
from cluster.ray_env import quiet_train_reports
from cluster.storage import local_run_root
from cluster.tracking import RunLogger, run_tags
from gpt2 import GPT
from gpt2.checkpoint import read_config
from gpt2.data import ShardedTokenLoader
from gpt2.device import cpu_has_fast_bf16
from gpt2.distill import Distiller
from gpt2.model_card import render_model_card, shards_description, write_model_card
from gpt2.train import (
    TrainConfig,
    autocast_context,
    autocast_dtype,
    evaluate_loss,
    make_optimizer,
    seed_everything,
    train_step,
)
from gpt2.train_checkpoint import is_due, load_training_checkpoint, save_training_checkpoint

# ------------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class TeacherSection:
    source: str = "runs/pretrain/local/final"  # checkpoint dir, Hugging Face GPT-2 dir or hub name, MLflow model URI


@dataclass(frozen=True)
class DistillSection:
    temperature: float = 2.0  # softens both distributions; the loss scales the KL term by T² to keep its size
    alpha: float = 0.5  # share of the KL term; 1 - alpha goes to the cross-entropy with the data


@dataclass(frozen=True)
class DistillEvalSection:
    val_every: int = 50  # steps between student validation losses (0: only at the end)
    val_batches: int = 8  # micro-batches per worker per validation
    report_tokens: int = 32_768  # validation tokens of the final student-vs-teacher perplexity
    decode_tokens: int = 64  # greedy tokens per decode-speed run in the final comparison


@dataclass(frozen=True)
class DistillRunSection(RunSection):
    experiment: str = "distill"
    name: str = "distill-local"


@dataclass(frozen=True)
class DistillConfig:
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: ModelSection = field(default_factory=lambda: ModelSection(preset="small", n_layer=2))
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: DistillEvalSection = field(default_factory=DistillEvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: DistillRunSection = field(default_factory=DistillRunSection)

    def validate(self) -> None:
        """Everything that can be checked before a worker starts; raises ValueError naming the field."""
        student = self.student.build()
        local_run_root(self.run.root, "distillation")
        if not self.distill.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.distill.temperature}")
        if not 0 <= self.distill.alpha <= 1:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.distill.alpha}")
        for name in ("max_steps", "micro_batch", "seq_len"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be >= 1")
        if self.scaling.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")
        self.train.grad_accum_steps(self.scaling.num_workers)
        if self.train.seq_len > student.block_size:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds the student's block_size={student.block_size}")
        for name in ("report_tokens", "decode_tokens", "val_batches"):
            if getattr(self.eval, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1")
        if not (Path(self.data.shards) / "manifest.json").is_file():
            raise ValueError(f"data.shards={self.data.shards}: no manifest.json there; prepare the data first"
                             " (python jobs/prepare_data.py ...)")
        source = self.teacher.source
        if is_mlflow_uri(source):
            return  # fetched by the workers; its shape is checked when it loads
        if Path(source).is_dir():
            teacher = read_config(source)  # a directory that is not a model fails here, naming the file
            if teacher.vocab_size != student.vocab_size:
                raise ValueError(f"teacher.source={source} has a vocabulary of {teacher.vocab_size} tokens, the student"
                                 f" {student.vocab_size}: distillation compares their distributions token by token")
            if self.train.seq_len > teacher.block_size:
                raise ValueError(f"train.seq_len={self.train.seq_len} exceeds the teacher's block_size={teacher.block_size}")
        elif "/" in source:
            raise ValueError(f"teacher.source={source} does not exist (a checkpoint dir, HF dir or MLflow model URI)")

    def run_dir(self) -> str:
        return f"{self.run.root.rstrip('/')}/{self.run.experiment}/{self.run.name}"


# ------------------------------------------------------------------------------------------------- worker loop


class _RayWorker:
    """The Ray Train calls of the loop."""

    keeps_checkpoints = True

    def __init__(self) -> None:
        quiet_train_reports()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> Checkpoint | None:
        return ray.train.get_checkpoint()

    def wrap(self, module: nn.Module) -> nn.Module:
        # DDP over the Distiller: only the student's parameters need gradients, so only they are synchronised.
        return ray.train.torch.prepare_model(module) if self.world > 1 else module

    def report(self, metrics: dict, directory: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)) if directory else None)


class _InProcess:
    """One worker in this process: nothing to resume from, and nobody to report to but MLflow."""

    keeps_checkpoints = False
    rank, world = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def checkpoint(self) -> None:
        return None

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def report(self, metrics: dict, directory: Path | None) -> None:
        pass


def train_loop_per_worker(config: dict) -> None:
    cfg = build(DistillConfig, config["distill"])
    # Ray sets OMP_NUM_THREADS from the worker's CPUs (1 when fractional); torch needs its own setting.
    torch.set_num_threads(cfg.scaling.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)))
    distill_loop(cfg, _RayWorker(), config.get("tracking_uri"), config.get("tags", {}))


def distill_loop(cfg: DistillConfig, worker: _RayWorker | _InProcess, tracking_uri: str | None, tags: dict) -> None:
    device, rank, world = worker.device, worker.rank, worker.world
    run_dir = Path(cfg.run_dir())
    seed_everything(cfg.train.seed)
    student = GPT(cfg.student.build()).to(device)
    teacher = load_model(cfg.teacher.source, device=device, dtype=torch.float32)
    distiller = Distiller(student, teacher, cfg.distill.temperature, cfg.distill.alpha)
    optimizer = make_optimizer(distiller, cfg.train, device.type)  # the student's parameters: the teacher is frozen
    accum = cfg.train.grad_accum_steps(world)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    loader = ShardedTokenLoader(cfg.data.shards, B, T, rank=rank, world_size=world, split="train", seed=cfg.train.seed)
    state = {"step": 0}
    checkpoint = worker.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_checkpoint(Path(d), student, optimizer, loader, rank)
    trained = worker.wrap(distiller)
    amp = autocast_context(
        autocast_dtype(cfg.train.autocast, device.type, device.type == "cuda" or cpu_has_fast_bf16()), device.type
    )
    logger = None
    if rank == 0:
        logger = RunLogger(run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=tracking_uri,
                           params=flatten(to_dict(cfg)), tags=tags)

    def val_loss(model: nn.Module) -> float:
        """Cross-entropy on the validation split (every rank takes part), as pretraining measures it."""
        val = ShardedTokenLoader(cfg.data.shards, B, T, rank=rank, world_size=world, split="val", seed=0)
        return evaluate_loss(model, iter(val), cfg.eval.val_batches, device=device, autocast=amp)

    teacher_val_loss = val_loss(teacher)  # the level the student's validation loss is heading for
    batches = iter(loader)
    for step in range(state["step"], cfg.train.max_steps):
        last = step == cfg.train.max_steps - 1
        metrics = {}
        if cfg.eval.val_every > 0 and step % cfg.eval.val_every == 0:  # step 0: the untrained student
            metrics = {"val_loss": val_loss(student), "teacher_val_loss": teacher_val_loss}
        stats = train_step(trained, optimizer, batches, step, cfg.train, accum, device=device, autocast=amp)
        metrics.update({"loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "step_time": stats.seconds,
                        "tokens_per_s": stats.tokens / stats.seconds})
        if logger:
            logger.log_metrics(metrics, step)
        state["step"] = step + 1
        if worker.keeps_checkpoints and is_due(step, cfg.checkpoint.every, last):
            with tempfile.TemporaryDirectory() as tmp:
                worker.report(metrics, save_training_checkpoint(student, optimizer, loader, rank, dict(state), Path(tmp)))
        else:
            worker.report(metrics, None)
    final = {"val_loss": val_loss(student), "teacher_val_loss": teacher_val_loss}
    if logger:
        logger.log_metrics(final, cfg.train.max_steps)
        _finish(student, cfg, logger, run_dir, final, world)


def _card(student: GPT, cfg: DistillConfig, evaluation: dict[str, float], world: int) -> dict:
    where = f"on {cfg.eval.val_batches} batches of {cfg.train.micro_batch} × {cfg.train.seq_len} tokens per worker"
    return {
        "params": student.num_params(),
        "name": cfg.run.name,
        "training": {
            "data": shards_description(cfg.data.shards),
            "tokens_seen": cfg.train.max_steps * cfg.train.total_batch_tokens,
            "optimizer_steps": cfg.train.max_steps,
            "teacher": cfg.teacher.source,
            "distillation": "alpha·T²·KL(teacher‖student) + (1 − alpha)·cross-entropy,"
                            f" T = {cfg.distill.temperature:g}, alpha = {cfg.distill.alpha:g}",
            "hardware": f"{world} {'GPU' if cfg.scaling.use_gpu else 'CPU'} worker(s)",
            "run": f"{cfg.run.experiment}/{cfg.run.name} (MLflow experiment/run name)",
        },
        "recipe": to_dict(cfg.train),
        "evaluation": evaluation,
        "methods": {
            "val_loss": f"the student's mean next-token cross-entropy (nats per token) {where}, validation shard",
            "teacher_val_loss": f"the teacher's, measured the same way {where}",
        },
    }


def _finish(student: GPT, cfg: DistillConfig, logger: RunLogger, run_dir: Path, final: dict, world: int) -> None:
    """Rank 0 after the last step: the student in <run>/final with its card, the loss plot, the registered model."""
    from cluster.plots import plot_training_curves

    card = _card(student, cfg, final, world)
    student.save_pretrained(str(run_dir / "final"), extra=lambda d: write_model_card(d, student.config, **card))
    logger.flush(force=True)
    title = f"{cfg.run.name}: distillation loss (train), student cross-entropy (validation)"
    logger.log_artifact(plot_training_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", title=title))
    logger.log_artifact(run_dir / "metrics.jsonl")
    logger.log_text(render_model_card(student.config, **card), "README.md")
    logger.log_model(run_dir / "final", "distilled", registered_name=cfg.run.registered_model,
                     tags={"tokens_seen": card["training"]["tokens_seen"], "teacher": cfg.teacher.source})
    logger.close()


# ------------------------------------------------------------------------------------------------------ driver


def _absolute(cfg: DistillConfig) -> dict:
    """The config with local paths made absolute, for workers whose working directory differs."""
    d = to_dict(cfg)
    d["run"]["root"] = str(Path(cfg.run.root).resolve())
    d["data"]["shards"] = str(Path(cfg.data.shards).resolve())
    if Path(cfg.teacher.source).exists():
        d["teacher"]["source"] = str(Path(cfg.teacher.source).resolve())
    return d


def run_distillation(cfg: DistillConfig, tracking_uri: str | None = None) -> ray.train.Result:
    """The distillation on Ray Train (DDP over scaling.num_workers); running the same run.name again resumes."""
    cfg.validate()
    run_dir = Path(cfg.run_dir()).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"distill": _absolute(cfg), "tracking_uri": tracking_uri,
                           "tags": {**run_tags(cfg.run.name, s.num_workers, s.use_gpu), "kind": "distill"}},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    return trainer.fit()


def run_in_process(cfg: DistillConfig, device: torch.device, tracking_uri: str | None = None) -> None:
    """The same loop as one worker in this process, without Ray and without intermediate checkpoints."""
    cfg.validate()
    distill_loop(cfg, _InProcess(device), tracking_uri, {**run_tags(cfg.run.name, 1, device.type == "cuda"),
                                                         "kind": "distill", "ray": "no (in process)"})


def compare_with_teacher(cfg: DistillConfig, device: torch.device, tracking_uri: str | None = None) -> list[VariantRow]:
    """Teacher and distilled student side by side (perplexity on the validation split, parameters, size, decode
    speed), written to <run>/comparison.csv and .md and logged into the distillation's MLflow run."""
    run_dir = Path(cfg.run_dir())
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise RuntimeError(f"the distillation did not write the student to {final}")
    tokens = validation_tokens(cfg.data.shards, cfg.eval.report_tokens)
    rows = []
    for name, source in (("teacher", cfg.teacher.source), ("student", str(final))):
        model = load_model(source, device=device, dtype=torch.float32)
        rows.append(measure_variant(name, source, model, parameters=model.num_params(),
                                    disk_bytes=files_bytes(source_directory(source)), tokens=tokens,
                                    decode_tokens=cfg.eval.decode_tokens))
    table = table_rows(relative_to_first(rows))
    write_csv(table, run_dir / "comparison.csv")
    (run_dir / "comparison.md").write_text(
        f"# {cfg.run.name}: student vs teacher\n\nPerplexity on {len(tokens) - 1:,} validation tokens of"
        f" {cfg.data.shards}; decode: greedy, batch 1, {torch.get_num_threads()} threads on {device}.\n\n"
        + markdown_table(table)
    )
    logger = RunLogger(run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=tracking_uri)
    logger.log_metrics({k: v for row in rows for k, v in variant_metrics(row).items()}, step=cfg.train.max_steps)
    teacher, student = rows
    logger.log_metrics({"size_ratio": student.weights_mb / teacher.weights_mb,
                        "speedup": student.decode_tokens_per_s / teacher.decode_tokens_per_s,
                        "perplexity_ratio": student.perplexity / teacher.perplexity}, step=cfg.train.max_steps)
    for name in ("comparison.csv", "comparison.md"):
        logger.log_artifact(run_dir / name)
    logger.close()
    return rows
