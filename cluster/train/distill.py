"""Knowledge distillation on Ray Train: a frozen teacher, a smaller student trained on
alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · cross-entropy (gpt2.distill), tracked in MLflow.

The worker loop is the pretraining loop's shape around `gpt2.train.train_step` on a `gpt2.distill.Distiller`; the
Ray-specific calls sit in `cluster.train.worker.Worker`, so the same loop also runs in this process without Ray
(`run_in_process`, one worker). Checkpoints are the student's model directory
plus the training state, in the pretraining format (cluster.train.pretrain), so a restarted worker group resumes exactly.
After training, `compare_with_teacher` measures student and teacher side by side: perplexity, size, decode speed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import torch
import torch.nn as nn

from cluster.config import build, flatten, to_dict
from cluster.config.distill import DistillConfig
from cluster.eval.compression import (
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
from cluster.runtime.models import load_model
from cluster.runtime.storage import local_shards
from cluster.runtime.tracking import RunLogger, run_tags
from cluster.train import launcher
from cluster.train.publish import publish_final_model
from cluster.train.worker import Worker, worker_threads
from gpt2 import GPT
from gpt2.data import ShardedTokenLoader
from gpt2.distill import Distiller
from gpt2.model_card import shards_description
from gpt2.train import evaluate_loss, make_optimizer, seed_everything, train_step
from gpt2.train_checkpoint import is_due, load_training_checkpoint, save_training_checkpoint

# ------------------------------------------------------------------------------------------------- worker loop


def train_loop_per_worker(config: dict) -> None:
    cfg = build(DistillConfig, config["distill"])
    worker = Worker.ray_train(worker_threads(cfg.scaling.threads_per_worker, cfg.scaling.cpus_per_worker))
    distill_loop(cfg, worker, config.get("tracking_uri"), config.get("tags", {}))


def distill_loop(cfg: DistillConfig, worker: Worker, tracking_uri: str | None, tags: dict) -> None:
    device, rank, world = worker.device, worker.rank, worker.world
    run_dir = Path(cfg.run_dir())
    seed_everything(cfg.train.seed)
    student = GPT(cfg.student.build()).to(device)
    teacher = load_model(cfg.teacher.source, device=device, dtype=torch.float32)
    distiller = Distiller(student, teacher, cfg.distill.temperature, cfg.distill.alpha)
    optimizer = make_optimizer(distiller, cfg.train, device.type)  # the student's parameters: the teacher is frozen
    accum = cfg.train.grad_accum_steps(world)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    shards = local_shards(cfg.data.shards)  # a node-local copy of remote shards
    loader = ShardedTokenLoader(shards, B, T, rank=rank, world_size=world, split="train", seed=cfg.train.seed)
    state = {"step": 0}
    checkpoint = worker.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_checkpoint(Path(d), student, optimizer, loader, rank)
    trained = worker.wrap(distiller)  # under DDP only the student's parameters need gradients, so only they sync
    _, amp = worker.autocast(cfg.train.autocast)
    logger = None
    if worker.is_main:
        logger = RunLogger(run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=tracking_uri,
                           params=flatten(to_dict(cfg)), tags=tags)

    def val_loss(model: nn.Module) -> float:
        """Cross-entropy on the validation split (every rank takes part), as pretraining measures it."""
        val = ShardedTokenLoader(shards, B, T, rank=rank, world_size=world, split="val", seed=0)
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
        if worker.keeps_checkpoints and is_due(step, cfg.checkpoint.every, last):  # see Worker.report
            with tempfile.TemporaryDirectory() as tmp:
                worker.report(metrics, save_training_checkpoint(student, optimizer, loader, rank, dict(state), Path(tmp)))
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
    card = _card(student, cfg, final, world)
    publish_final_model(
        student, run_dir, logger, card, kind="distilled",
        plot_title=f"{cfg.run.name}: distillation loss (train), student cross-entropy (validation)",
        registered_name=cfg.run.registered_model,
        tags={"tokens_seen": card["training"]["tokens_seen"], "teacher": cfg.teacher.source},
    )


# ------------------------------------------------------------------------------------------------------ driver


def run_distillation(cfg: DistillConfig, tracking_uri: str | None = None) -> ray.train.Result:
    """The distillation on Ray Train (DDP over scaling.num_workers); running the same run.name again resumes."""
    cfg.validate()
    config = launcher.absolute_paths(to_dict(cfg), [("run", "root"), ("data", "shards"), ("teacher", "source")])
    tags = {**run_tags(cfg.run.name, cfg.scaling.num_workers, cfg.scaling.use_gpu), "kind": "distill"}
    return launcher.launch(
        train_loop_per_worker, {"distill": config, "tags": tags}, scaling=cfg.scaling, run=cfg.run,
        run_dir=cfg.run_dir(), keep_checkpoints=cfg.checkpoint.keep, tracking=tracking_uri,
    )


def run_in_process(cfg: DistillConfig, device: torch.device, tracking_uri: str | None = None) -> None:
    """The same loop as one worker in this process, without Ray and without intermediate checkpoints."""
    cfg.validate()
    distill_loop(cfg, Worker.in_process(device), tracking_uri, {**run_tags(cfg.run.name, 1, device.type == "cuda"),
                                                         "kind": "distill", "ray": "no (in process)"})


def compare_with_teacher(cfg: DistillConfig, device: torch.device, tracking_uri: str | None = None) -> list[VariantRow]:
    """Teacher and distilled student side by side (perplexity on the validation split, parameters, size, decode
    speed), written to <run>/comparison.csv and .md and logged into the distillation's MLflow run."""
    run_dir = Path(cfg.run_dir())
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise RuntimeError(f"the distillation did not write the student to {final}")
    tokens = validation_tokens(local_shards(cfg.data.shards), cfg.eval.report_tokens)
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
