"""The pure-PyTorch training step: batch arithmetic, optimizer groups, LR schedule, gradient accumulation.

Works the same in a plain loop, under torch.distributed DDP (Ray Train's workers), on CPU, CUDA or MPS. Ray-free so
that it is testable and benchmarkable on its own.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2.config import IGNORE_INDEX

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    total_batch_tokens: int = 524_288  # tokens per optimizer step, over all workers and accumulation steps
    micro_batch: int = 64  # sequences per worker per forward/backward
    seq_len: int = 1024
    max_steps: int = 19_073
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    autocast: str = "auto"  # "auto" (bf16 where the hardware has it natively), "bf16", or "fp32"
    compile: bool = False  # torch.compile the model
    seed: int = 1337

    def grad_accum_steps(self, world_size: int) -> int:
        per_step = self.micro_batch * self.seq_len * world_size
        if self.total_batch_tokens % per_step:
            raise ValueError(
                f"train.total_batch_tokens={self.total_batch_tokens} is not divisible by micro_batch × seq_len × workers"
                f" = {self.micro_batch} × {self.seq_len} × {world_size} = {per_step}"
            )
        return self.total_batch_tokens // per_step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr at max_steps (and min_lr after)."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (≥ 2-D) only; biases and LayerNorm gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass over each tensor: on CPU it measured 6x faster than the
    # multi-tensor (foreach) path for 124M parameters, about a tenth of a training step.
    return torch.optim.AdamW(
        groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device_type in ("cuda", "cpu")
    )


AUTOCAST_CHOICES = ("auto", "bf16", "fp32")  # TrainConfig.autocast


def autocast_dtype(cfg_value: str, device_type: str, native_bf16: bool) -> torch.dtype | None:
    """bf16 when asked, or under "auto" where the hardware runs bf16 natively; None means full fp32."""
    if cfg_value not in AUTOCAST_CHOICES:
        raise ValueError(f"train.autocast must be auto, bf16 or fp32, got {cfg_value!r}")
    use = cfg_value == "bf16" or (cfg_value == "auto" and native_bf16)
    return torch.bfloat16 if use and device_type != "mps" else None


def autocast_context(dtype: torch.dtype | None, device_type: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of fresh autocast contexts (one per forward) for `dtype`, or no-op contexts for None."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


@dataclass
class StepStats:
    loss: float  # mean loss over the step's micro-batches and all workers
    lr: float
    grad_norm: float
    tokens: int  # tokens processed by all workers in this step
    seconds: float
    data_seconds: float  # time spent waiting for the loader


def _mean_over_workers(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    step: int,
    cfg: TrainConfig,
    accum_steps: int,
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> StepStats:
    """One optimizer step over `accum_steps` micro-batches from `batches`.

    Under DDP the gradient all-reduce runs only on the last micro-batch (no_sync on the others), so accumulation
    costs no communication.
    """
    start = time.perf_counter()
    model.train()
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    data_seconds = 0.0
    for micro in range(accum_steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        data_seconds += time.perf_counter() - t0
        last = micro == accum_steps - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                _, loss = model(x, y, return_logits=False)  # the loss without materialising every logit
            (loss / accum_steps).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mean_loss = _mean_over_workers(loss_sum / accum_steps)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return StepStats(
        loss=mean_loss.item(),
        lr=lr,
        grad_norm=grad_norm.item(),
        tokens=accum_steps * x.numel() * world,
        seconds=time.perf_counter() - start,
        data_seconds=data_seconds,
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterator[Batch],
    max_batches: int,
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """Mean loss per predicted token over up to `max_batches` batches, over all workers.

    Weighted by the number of scored targets (targets of -100 are not scored), so batches of different sizes and
    workers with different numbers of batches combine exactly.
    """
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device, dtype=torch.float64)
    for _, (x, y) in zip(range(max_batches), batches):
        y = y.to(device)
        with autocast():
            _, loss = model(x.to(device), y, return_logits=False)
        scored = (y != IGNORE_INDEX).sum()
        total += loss.double() * scored
        count += scored
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item()


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, data order helpers), for exact resume.

    Plain lists and tensors only, so the state loads with torch.load(weights_only=True).
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
