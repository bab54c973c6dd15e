"""Choosing the threshold tau: a sweep of taus measured on the same data, and the tau picked from it.

`calibrate` measures, per tau, the exit rate, the agreement of the early-exit model's next-token predictions with the
full model's, and both perplexities; `choose_threshold` takes the tau that exits most while the agreement reaches a
target. Kept apart from training because it measures the finished EarlyExitGPT (its held states and deeper
keys/values included), not the classifier alone. It drives the model's forward in its stages (EarlyExitGPT._lower,
_exit_scores, _upper) so the backbone and classifier run once per batch and only the deeper blocks run again per tau.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from gpt2.config import IGNORE_INDEX
from gpt2.early_exit.model import EarlyExitGPT
from gpt2.early_exit.training import frozen


def _inputs_and_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2 or batch.shape[1] < 2:
            raise ValueError(f"a token batch must be (B, T+1) with T >= 1, got shape {tuple(batch.shape)}")
        return batch[:, :-1], batch[:, 1:]
    x, y = batch
    return x, y


def calibrate(
    model: EarlyExitGPT,
    token_batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    taus: Sequence[float],
) -> list[dict]:
    """Measure each threshold tau on the same data: one dict per tau, in the order given.

    token_batches: (B, T+1) token tensors (inputs and next-token targets from one row) or (x, y) pairs as the shard
    loader yields. Each row: tau, exit_rate, agreement (fraction of positions whose early-exit argmax equals the
    full model's), agreement_exited (the same over exited positions, None when none exited), perplexity of the
    early-exit predictions, perplexity_full (the full model's, the same for every tau), mean_blocks per token.
    Positions whose target is -100 are left out of every figure.
    The backbone, the classifier and the LM head on every position run once per batch; per tau, only the positions
    that go deeper after an exited one in their row are computed again. Statistics counters are left alone.
    """
    taus = [float(t) for t in taus]
    totals = {tau: {"exited": 0, "agree": 0, "agree_exited": 0, "nll": []} for tau in taus}
    n_tokens, full_nll = 0, []
    device = model.transformer.wte.weight.device

    def nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)

    vocab = model.config.vocab_size
    with frozen(model):
        for batch in token_batches:
            x, y = (t.to(device) for t in _inputs_and_targets(batch))
            valid = y != IGNORE_INDEX  # (B, T): masked targets (the shard loader's -100) count nowhere
            h = model._lower(x, None)
            normed, exit_logits, score = model._exit_scores(h)
            # An exited position's logits are the exit head's whatever tau is. A position that goes deeper has the
            # full model's logits unless an earlier position of its row exited (deeper layers attend to that one's
            # held state): only those are computed per tau, through the deeper blocks and the LM head.
            if exit_logits is None:
                exit_logits = model.base.lm_head(normed)[..., :vocab]  # (B, T, V)
            exit_pred, exit_nll = exit_logits.argmax(-1), nll(exit_logits.flatten(0, 1), y.flatten()).view_as(y)
            full = model.base.lm_head(model.base.transformer.ln_f(model._deeper(h, torch.zeros_like(valid), None)))
            full = full[..., :vocab]  # (B, T, V)
            full_pred, full_token_nll = full.argmax(-1), nll(full.flatten(0, 1), y.flatten()).view_as(y)
            n_tokens += int(valid.sum())
            full_nll.append(float(full_token_nll.sum()))
            for tau in taus:
                exited = score >= tau
                pred = torch.where(exited, exit_pred, full_pred)
                token_nll = torch.where(exited, exit_nll, full_token_nll)
                changed = ~exited & (exited.cumsum(dim=1) > 0)  # (B, T) deeper, after an exited position
                if changed.any():
                    final = model.base.transformer.ln_f(model._deeper(h, exited, None)[changed])  # (N, C)
                    logits = model.base.lm_head(final)[..., :vocab]  # (N, V)
                    pred[changed], token_nll[changed] = logits.argmax(-1), nll(logits, y[changed])
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
