"""Choosing the threshold tau: a sweep of taus measured on the same data, and the tau picked from it.

`calibrate` measures, per tau, the exit rate, the agreement of the early-exit model's next-token predictions with the
full model's, and both perplexities; `choose_threshold` takes the tau that exits most while the agreement reaches a
target. Kept apart from training because it measures the finished EarlyExitGPT (its held states and deeper
keys/values included), not the classifier alone. The backbone runs once per batch (`held_out`, which the training job
also takes the classifier's held-out data from, so that pass is shared) and only the deeper blocks run again per tau,
through EarlyExitGPT._deeper.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from gpt2.config import IGNORE_INDEX
from gpt2.early_exit.model import EarlyExitGPT
from gpt2.early_exit.training import classifier_rows, exit_pass, frozen
from gpt2.model import GPT


def _inputs_and_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"a token batch must be (B, T+1) with T >= 1, got shape {tuple(batch.shape)}")
        return batch[:, :-1], batch[:, 1:]
    x, y = batch
    return x, y


def _nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of targets y (…) under logits (…, V); 0 where y is -100."""
    flat = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view_as(y)


class HeldOut(NamedTuple):
    """A held-out token batch after the one backbone pass it needs (`held_out`): every (B, T) figure the threshold sweep
    reads, without the (B, T, V) logits, so a whole validation split fits in memory."""

    h: torch.Tensor  # (B, T, C) block exit_layer's output
    features: torch.Tensor  # (B, T, F) the classifier's input
    targets: torch.Tensor  # (B, T) next tokens; -100 where a position counts nowhere
    exit_pred: torch.Tensor  # (B, T) the exit head's argmax
    exit_nll: torch.Tensor  # (B, T)
    full_pred: torch.Tensor  # (B, T) the full model's argmax
    full_nll: torch.Tensor  # (B, T)

    @property
    def valid(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    def features_and_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's data (N, F), (N,) at the valid positions, as gpt2.early_exit.exit_features_and_labels."""
        return classifier_rows(self.features, self.exit_pred, self.full_pred, self.targets)


def held_out(
    base: GPT, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor], exit_layer: int, *, head_features: bool = True
) -> HeldOut:
    """One token batch ((B, T+1) tokens or an (x, y) pair) through the frozen backbone once; see HeldOut."""
    device = base.transformer.wte.weight.device
    x, y = (t.to(device) for t in _inputs_and_targets(batch))
    run = exit_pass(base, x, exit_layer, head_features=head_features)
    return HeldOut(
        run.h, run.features, y, run.exit_logits.argmax(-1), _nll(run.exit_logits, y),
        run.full_logits.argmax(-1), _nll(run.full_logits, y),
    )


def calibrate(
    model: EarlyExitGPT,
    token_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | HeldOut],
    taus: Sequence[float],
) -> list[dict]:
    """Measure each threshold tau on the same data: one dict per tau, in the order given.

    token_batches: (B, T+1) token tensors (inputs and next-token targets from one row), (x, y) pairs as the shard
    loader yields, or batches already through the backbone (`held_out`, with this model's base and exit layer).
    Each row: tau, exit_rate, agreement (fraction of positions whose early-exit argmax equals the
    full model's), agreement_exited (the same over exited positions, None when none exited), perplexity of the
    early-exit predictions, perplexity_full (the full model's, the same for every tau), mean_blocks per token.
    Positions whose target is -100 are left out of every figure.
    The backbone, the classifier and the LM head on every position run once per batch; per tau, only the positions
    that go deeper after an exited one in their row are computed again. Statistics counters are left alone.
    """
    taus = [float(t) for t in taus]
    totals = {tau: {"exited": 0, "agree": 0, "agree_exited": 0, "nll": []} for tau in taus}
    n_tokens, full_nll = 0, []
    vocab = model.config.vocab_size
    with frozen(model):
        for batch in token_batches:
            if not isinstance(batch, HeldOut):
                batch = held_out(model.base, batch, model.exit_layer, head_features=model.classifier.head_features)
            h, y, valid = batch.h, batch.targets, batch.valid  # masked targets (the loader's -100) count nowhere
            exit_pred, full_pred = batch.exit_pred, batch.full_pred
            score = model.exit_probability(batch.features)  # (B, T)
            n_tokens += int(valid.sum())
            full_nll.append(float(batch.full_nll.sum()))
            # An exited position's logits are the exit head's whatever tau is. A position that goes deeper has the
            # full model's logits unless an earlier position of its row exited (deeper layers attend to that one's
            # held state): only those are computed per tau, through the deeper blocks and the LM head.
            for tau in taus:
                exited = score >= tau
                pred = torch.where(exited, exit_pred, full_pred)
                token_nll = torch.where(exited, batch.exit_nll, batch.full_nll)
                changed = ~exited & (exited.cumsum(dim=1) > 0)  # (B, T) deeper, after an exited position
                if changed.any():
                    final = model.base.transformer.ln_f(model._deeper(h, exited, None)[changed])  # (N, C)
                    logits = model.base.lm_head(final)[..., :vocab]  # (N, V)
                    pred[changed], token_nll[changed] = logits.argmax(-1), _nll(logits, y[changed])
                agree = (pred == full_pred) & valid
                exited &= valid
                total = totals[tau]
                total["exited"] += int(exited.sum())
                total["agree"] += int(agree.sum())
                total["agree_exited"] += int((agree & exited).sum())
                total["nll"].append(float(token_nll.sum()))
    if n_tokens == 0:
        raise ValueError("calibrate needs at least one token batch with a target that is not -100")
    rows = []
    for tau in taus:
        total = totals[tau]
        exited = total["exited"]
        rows.append(
            {
                "tau": tau,
                "exit_rate": exited / n_tokens,
                "agreement": total["agree"] / n_tokens,
                "agreement_exited": total["agree_exited"] / exited if exited else None,
                "perplexity": math.exp(math.fsum(total["nll"]) / n_tokens),
                "perplexity_full": math.exp(math.fsum(full_nll) / n_tokens),
                "mean_blocks": (exited * model.exit_layer + (n_tokens - exited) * model.config.n_layer) / n_tokens,
            }
        )
    return rows


def choose_threshold(rows: Sequence[dict], target_agreement: float = 0.97) -> float:
    """The tau of the `calibrate` row with the highest exit rate among those whose agreement reaches the target."""
    good = [r for r in rows if r["agreement"] >= target_agreement]
    if not good:
        best = max((r["agreement"] for r in rows), default=None)
        raise ValueError(
            f"no threshold reaches agreement {target_agreement} (best {best}); calibrate with higher taus"
            " (tau > 1 never exits and always agrees)"
        )
    return max(good, key=lambda r: (r["exit_rate"], r["agreement"], -r["tau"]))["tau"]
