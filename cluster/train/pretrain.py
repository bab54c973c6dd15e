"""Pretraining on Ray Train: the per-worker loop and the driver that starts it.

The worker loop reads like a plain PyTorch loop around `gpt2.train.train_step`; where it runs (rank, device,
precision, the checkpoint to resume from, DDP, reports) comes from `cluster.train.worker.Worker`, and the driver is
`cluster.train.launcher`, shared by every training job. Checkpoints are this project's model directory
(config.json + model.safetensors, loadable by transformers) plus `trainer_state.pt` (step, optimizer, best val loss)
written by rank 0 and `worker_state_rank{r}.pt` (loader position, RNG) written by every rank; Ray merges the
workers' files into one checkpoint directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import torch
from ray.train.torch import TorchTrainer

from cluster.config import build, flatten, to_dict
from cluster.config.pretrain import PretrainConfig
from cluster.runtime import storage
from cluster.runtime.tracking import UPLOADED_FILE, RunLogger, run_tags
from cluster.train import launcher
from cluster.train.publish import publish_final_model
from cluster.train.worker import Worker, worker_threads
from gpt2 import GPT, get_tokenizer
from gpt2.data import ShardedTokenLoader
from gpt2.device import peak_flops
from gpt2.hellaswag import HellaSwagExample, download_hellaswag, evaluate_hellaswag, load_hellaswag
from gpt2.model_card import shards_description, write_model_card
from gpt2.train import evaluate_loss, make_optimizer, seed_everything, train_step
from gpt2.train_checkpoint import is_due, load_training_checkpoint, save_training_checkpoint

RUN_STATE = ("metrics.jsonl", "mlflow_run_id", UPLOADED_FILE)  # what a resumed run needs from its run directory


def train_loop_per_worker(config: dict) -> None:
    cfg = build(PretrainConfig, config["pretrain"])
    worker = Worker.ray_train(worker_threads(cfg.scaling.threads_per_worker, cfg.scaling.cpus_per_worker))
    rank, world, device = worker.rank, worker.world, worker.device
    run = storage.RunDir(cfg.run_dir())
    run_dir = run.local
    shards = storage.local_shards(cfg.data.shards)

    seed_everything(cfg.train.seed)
    model = GPT(cfg.model.build()).to(device)
    optimizer = make_optimizer(model, cfg.train, device.type)
    accum = cfg.train.grad_accum_steps(world)
    B, T = cfg.train.micro_batch, cfg.train.seq_len
    loader = ShardedTokenLoader(shards, B, T, rank=rank, world_size=world, split="train", seed=cfg.train.seed)

    state = {"step": 0, "best_val_loss": float("inf")}
    checkpoint = worker.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_checkpoint(Path(d), model, optimizer, loader, rank)
    trained = worker.wrap(model)
    if cfg.train.compile:
        trained = torch.compile(trained)
    amp_dtype, autocast = worker.autocast(cfg.train.autocast)
    peak = peak_flops(device.type, amp_dtype or torch.float32) * world
    flops_per_token = model.flops_per_token(T)

    logger = None
    if worker.is_main:
        run.pull(*RUN_STATE)  # a resumed run continues its MLflow run and metrics history, whichever node it is on
        logger = RunLogger(
            run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=config.get("tracking_uri"),
            params=flatten(config["pretrain"]), tags=config.get("tags", {}),
        )
        logger.set_tags({"resumed_from_step": str(state["step"])} if state["step"] else {})
    batches = iter(loader)

    hellaswag = _hellaswag_examples(cfg)

    def hellaswag_metrics() -> dict[str, float]:
        """HellaSwag (completion scoring) with the examples split across ranks and the counts summed."""
        mine = evaluate_hellaswag(model, hellaswag[rank::world], methods=("completion",))["completion"]
        counts = torch.tensor([mine.n, mine.correct, mine.correct_norm], dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        n, correct, correct_norm = counts.tolist()
        return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}

    def validate(step: int) -> float:
        """Validation loss after `step` updates (every rank takes part); rank 0 exports a new best model."""
        val = ShardedTokenLoader(shards, B, T, rank=rank, world_size=world, split="val", seed=0)
        loss = evaluate_loss(model, iter(val), cfg.eval.val_batches, device=device, autocast=autocast)
        if logger and loss < state["best_val_loss"]:
            card = _card_fields(model, cfg, shards, step, {"val_loss": loss}, world)
            model.save_pretrained(str(run_dir / "best"), extra=lambda d: write_model_card(d, model.config, **card))
            run.push("best")
        state["best_val_loss"] = min(state["best_val_loss"], loss)
        return loss

    for step in range(state["step"], cfg.train.max_steps):
        last = step == cfg.train.max_steps - 1
        # As in nanoGPT, validation at step s measures the model after s updates, so step 0 is the untrained model.
        val_loss = validate(step) if cfg.eval.val_every > 0 and step % cfg.eval.val_every == 0 else None
        stats = train_step(trained, optimizer, batches, step, cfg.train, accum, device=device, autocast=autocast)
        metrics = {
            "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "step_time": stats.seconds,
            "tokens_per_s": stats.tokens / stats.seconds,
            "mfu": flops_per_token * stats.tokens / stats.seconds / peak,
            "data_share": stats.data_seconds / stats.seconds,
        }
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        if hellaswag and step % cfg.eval.hellaswag_every == 0:
            metrics.update(hellaswag_metrics())
        if logger:
            logger.log_metrics(metrics, step)
            print(progress_line(step, cfg.train.max_steps, metrics), flush=True)
            if is_due(step, cfg.eval.sample_every, last):
                logger.log_text(_samples(model, cfg), f"samples/step_{step + 1:06d}.txt")
        state["step"] = step + 1
        # Reported to Ray with a checkpoint only (the last step always has one): see Worker.report.
        if is_due(step, cfg.checkpoint.every, last):
            if logger:
                run.push(*RUN_STATE, "samples")
            with tempfile.TemporaryDirectory() as tmp:
                worker.report(metrics, save_training_checkpoint(model, optimizer, loader, rank, dict(state), Path(tmp)))
    final = {"val_loss": validate(cfg.train.max_steps), **(hellaswag_metrics() if hellaswag else {})}
    if logger:
        logger.log_metrics(final, cfg.train.max_steps)
        _finish(model, cfg, logger, run, _card_fields(model, cfg, shards, cfg.train.max_steps, final, world))


def progress_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    """One line per step on rank 0, as nanoGPT prints it: what the run is doing without opening MLflow."""
    line = (f"step {step + 1}/{max_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad norm {m['grad_norm']:.2f}"
            f" | {m['step_time'] * 1000:.0f} ms | {m['tokens_per_s']:,.0f} tokens/s | MFU {m['mfu']:.1%}")
    extra = [f"{k} {m[k]:.4f}" for k in ("val_loss", "hellaswag_acc_norm") if k in m]
    return " | ".join([line, *extra])


def _hellaswag_examples(cfg: PretrainConfig) -> list[HellaSwagExample] | None:
    if cfg.eval.hellaswag_every <= 0:
        return None
    return load_hellaswag(cfg.eval.hellaswag_path or download_hellaswag(), limit=cfg.eval.hellaswag_limit)


def _samples(model: GPT, cfg: PretrainConfig) -> str:
    enc = get_tokenizer()
    prompts = [enc.encode_ordinary(p) for p in cfg.eval.sample_prompts]
    tokens = cfg.eval.sample_tokens
    outs = model.generate(prompts, min(tokens, model.config.block_size - max(map(len, prompts))), top_k=50, seed=42)
    return "\n\n".join(f"{p}{enc.decode(o)}" for p, o in zip(cfg.eval.sample_prompts, outs)) + "\n"


def _card_fields(
    model: GPT, cfg: PretrainConfig, shards: str, step: int, evaluation: dict[str, float], world: int
) -> dict:
    """render_model_card's arguments for the model after `step` updates, from what the run recorded."""
    examples = f"first {cfg.eval.hellaswag_limit} examples" if cfg.eval.hellaswag_limit else "all 10,042 examples"
    return {
        "params": model.num_params(),
        "name": cfg.run.name,
        "training": {
            "data": shards_description(shards, origin=cfg.data.shards),
            "tokens_seen": step * cfg.train.total_batch_tokens,
            "optimizer_steps": step,
            "hardware": f"{world} {'GPU' if cfg.scaling.use_gpu else 'CPU'} worker(s), Ray Train DDP",
            "run": f"{cfg.run.experiment}/{cfg.run.name} (MLflow experiment/run name)",
        },
        "recipe": to_dict(cfg.train),
        "evaluation": evaluation,
        "methods": {
            "val_loss": f"mean next-token cross-entropy (nats per token) on {cfg.eval.val_batches} batches of"
            f" {cfg.train.micro_batch} × {cfg.train.seq_len} tokens on each of {world} worker(s), from the validation"
            " shard",
            "hellaswag_acc": f"HellaSwag validation, {examples}, completion-style: lowest summed loss of the ending",
            "hellaswag_acc_norm": f"HellaSwag validation, {examples}, completion-style: lowest mean loss per ending token",
        },
    }


def _finish(model: GPT, cfg: PretrainConfig, logger: RunLogger, run: storage.RunDir, card: dict) -> None:
    """Rank 0 after the last step: the final model, its card, the loss plot and the registered MLflow model, then
    the run directory's files pushed to its remote location (when it has one)."""
    publish_final_model(model, run.local, logger, card, kind="pretrained", plot_title=cfg.run.name,
                        registered_name=cfg.run.registered_model, tags={"tokens_seen": card["training"]["tokens_seen"]})
    run.push("final", "loss.png", "samples", *RUN_STATE)


# ------------------------------------------------------------------------------------------------------- driver


def make_trainer(cfg: PretrainConfig, tracking_uri: str | None = None) -> TorchTrainer:
    config = launcher.absolute_paths(to_dict(cfg), [("run", "root"), ("data", "shards")])
    tags = run_tags(cfg.run.name, cfg.scaling.num_workers, cfg.scaling.use_gpu)
    return launcher.trainer(
        train_loop_per_worker, {"pretrain": config, "tags": tags}, scaling=cfg.scaling, run=cfg.run,
        run_dir=cfg.run_dir(), keep_checkpoints=cfg.checkpoint.keep, tracking=tracking_uri,
    )


def run_pretraining(cfg: PretrainConfig, tracking_uri: str | None = None) -> ray.train.Result:
    cfg.validate()
    if not storage.is_uri(cfg.run_dir()):
        Path(cfg.run_dir()).mkdir(parents=True, exist_ok=True)
    return make_trainer(cfg, tracking_uri).fit()
