"""Training the exit classifier: its data from the frozen backbone, and the fitting loop.

A label says whether the exit head after block exit_layer already predicts what the full model predicts (same
argmax); the classifier learns to recognise those positions from `exit_features`. The backbone itself is never
trained: `frozen` runs it in eval mode without autograd (calibration runs the finished model the same way).
These are the single-process pieces; cluster.train.early_exit runs them on Ray Train workers (the classifier in DDP).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn as nn

from gpt2.config import IGNORE_INDEX
from gpt2.early_exit.classifier import ExitClassifier, exit_features, exit_head
from gpt2.early_exit.model import check_exit_layer
from gpt2.model import GPT


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd inside the block; the module's previous mode is restored afterwards."""
    was_training = module.training
    try:
        with torch.no_grad():
            yield module.eval()
    finally:
        module.train(was_training)


class ExitPass(NamedTuple):
    """One frozen forward pass over token rows (B, T), seen from the exit: what the classifier's data and the
    threshold sweep (gpt2.early_exit.calibration) are both made from, so held-out rows need the pass only once."""

    h: torch.Tensor  # (B, T, C) block exit_layer's output: the state an exiting position keeps
    exit_logits: torch.Tensor  # (B, T, V) the exit head's prediction from h
    full_logits: torch.Tensor  # (B, T, V) the full model's
    features: torch.Tensor  # (B, T, F) the classifier's input, as `exit_features` makes it


def exit_pass(base: GPT, idx: torch.Tensor, exit_layer: int, *, head_features: bool = True) -> ExitPass:
    """The backbone run once on idx (B, T), frozen (eval mode, no grad); see ExitPass."""
    check_exit_layer(exit_layer, base.config.n_layer)
    with frozen(base):
        logits, _, hidden = base(idx, output_hidden_states=True)
        h = hidden[exit_layer]  # (B, T, C)
        _, exit_logits = exit_head(base, h)
        features = exit_features(h, exit_logits if head_features else None, base.config.layer_norm_epsilon)
    return ExitPass(h, exit_logits, logits, features)


def classifier_rows(
    features: torch.Tensor, exit_pred: torch.Tensor, full_pred: torch.Tensor, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's rows from one pass's (B, T) figures: features (N, F) and labels (N,) float32, 1.0 where the
    exit head's argmax equals the full model's (exiting there changes nothing). One row per position, or, given the
    (B, T) targets, per position whose target counts (IGNORE_INDEX marks the others)."""
    labels = (exit_pred == full_pred).float()
    if targets is None:
        return features.reshape(-1, features.size(-1)), labels.reshape(-1)
    keep = (targets != IGNORE_INDEX).to(labels.device)
    return features[keep], labels[keep]


def exit_features_and_labels(
    base: GPT, idx: torch.Tensor, exit_layer: int, *, head_features: bool = True, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier training data from token rows idx (B, T), with the backbone frozen (eval mode, no grad).

    Returns features (N, F) float32 as `exit_features` makes them and labels (N,) float32 (`classifier_rows`): one
    per position, or per position whose target counts when targets (B, T) are given.
    """
    run = exit_pass(base, idx, exit_layer, head_features=head_features)
    return classifier_rows(run.features, run.exit_logits.argmax(-1), run.full_logits.argmax(-1), targets)


def _loss_and_accuracy(classifier: nn.Module, features, labels, loss_fn) -> tuple[float, float]:
    with torch.no_grad():
        logits = classifier(features)
        return float(loss_fn(logits, labels)), float(((logits > 0).float() == labels).float().mean())


def train_classifier(
    classifier: ExitClassifier,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    balance_classes: bool = False,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    seed: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Fit the classifier with AdamW on binary cross-entropy; one history entry per epoch.

    balance_classes weights the positive class by n_negative / n_positive (for rare agreement). Each entry has epoch,
    loss (mean over the epoch's minibatches), accuracy (on all training data after the epoch), and val_loss /
    val_accuracy when validation data is given. on_epoch receives each entry as soon as its epoch ends (progress).
    """
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(
            f"need as many labels as feature rows (> 0): {features.shape[0]} rows, {labels.shape[0]} labels"
        )
    device = next(classifier.parameters()).device
    features, labels = features.to(device), labels.to(device).float()
    pos_weight = None
    if balance_classes:
        n_pos = float(labels.sum())
        pos_weight = torch.tensor((len(labels) - n_pos) / max(n_pos, 1.0), device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(labels), generator=generator).to(device)
        losses = []
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = loss_fn(classifier(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        classifier.eval()
        entry = {"epoch": epoch + 1, "loss": math.fsum(losses) / len(losses)}
        entry["accuracy"] = _loss_and_accuracy(classifier, features, labels, loss_fn)[1]
        if val_features is not None and val_labels is not None:
            val = _loss_and_accuracy(classifier, val_features.to(device), val_labels.to(device).float(), loss_fn)
            entry["val_loss"], entry["val_accuracy"] = val
        history.append(entry)
        if on_epoch:
            on_epoch(entry)
    return history
