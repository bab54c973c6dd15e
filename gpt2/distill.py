"""Knowledge distillation (Hinton et al. 2015): a student learns from a teacher's softened next-token distribution
as well as from the data.

`Distiller` pairs a student with a frozen teacher and returns the distillation loss where a GPT returns its
cross-entropy, so gpt2.train's step, evaluation, optimizer groups and autocast work on it unchanged. Under DDP wrap
the Distiller itself (the teacher's frozen weights take no part in gradient synchronisation) and call train_step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.config import IGNORE_INDEX
from gpt2.train import Batch, StepStats, TrainConfig, train_step


def _check_options(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """alpha · T² · KL(teacher_T ‖ student_T) + (1 - alpha) · cross-entropy(student, targets).

    Logits (B, T, V), targets (B, T); both terms are means over the positions whose target is not -100.
    teacher_T and student_T are the softmax of the logits divided by the temperature T: a higher T spreads the
    teacher's probability over more tokens, which carries more of what it knows than its top choice does.
    Softening scales the KL term's gradients by 1/T², so the T² factor keeps their size independent of T and
    `alpha` means the same share at any temperature.
    """
    _check_options(temperature, alpha)
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)} and targets"
            f" {tuple(targets.shape)} must be (B, T, V), (B, T, V) and (B, T): the same vocabulary and tokens"
        )
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).float()  # (N, V)
    teacher = teacher_logits.reshape(-1, vocab).float()  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    cross_entropy = F.cross_entropy(student, targets, ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    student_log_probs = F.log_softmax(student[scored] / temperature, dim=-1)  # (S, V)
    teacher_log_probs = F.log_softmax(teacher[scored] / temperature, dim=-1)  # (S, V)
    # "batchmean" divides the summed KL by its rows, the S scored positions: the KL per token.
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * cross_entropy


class Distiller(nn.Module):
    """A student and its teacher; forward(idx, targets) → (student logits, distillation loss), as GPT.forward.

    The teacher is frozen here (requires_grad off) and stays in eval mode whatever mode the Distiller is put in.
    Only the student's parameters train, so make_optimizer(distiller, ...) gives the student's groups.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5) -> None:
        super().__init__()
        _check_options(temperature, alpha)  # fail at construction, not at the first step
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.temperature = temperature
        self.alpha = alpha

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # teacher dropout would only add noise to the targets
        return self

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor, return_logits: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student logits, distillation loss). `return_logits` is accepted as GPT.forward's is (gpt2.train passes
        it); the student's logits are always computed, since the KL term needs all of them."""
        with torch.no_grad():
            teacher_logits, _ = self.teacher(idx)  # (B, T, V)
        student_logits, _ = self.student(idx)  # (B, T, V)
        loss = distillation_loss(student_logits, teacher_logits, targets, self.temperature, self.alpha)
        return student_logits, loss


def distill_step(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    step: int,
    cfg: TrainConfig,
    accum_steps: int,
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> StepStats:
    """One optimizer step of `student` (train_step's LR schedule, accumulation, clipping) on the distillation loss;
    StepStats.loss is that loss. `optimizer` holds the student's parameters. Under DDP use train_step on a wrapped
    Distiller instead (see the module docstring), so accumulation skips the gradient all-reduce."""
    distiller = Distiller(student, teacher, temperature, alpha)
    return train_step(distiller, optimizer, batches, step, cfg, accum_steps, device=device, autocast=autocast)
