"""What the exit classifier reads and what it is: the exit head, the features, and the MLP that scores them.

- `exit_head`: block k's output through the model's own final LayerNorm and tied LM head (no new weights); its argmax
  is the exit prediction.
- `exit_features`: the classifier's input, h_k standardised per token and, optionally, the three `HEAD_FEATURES`
  taken from the exit head's softmax.
- `ExitClassifier`: a two-layer MLP whose sigmoid score estimates P(exit argmax == full-model argmax).

Kept apart from the model because three places must build exactly the same features for the same classifier:
EarlyExitGPT at inference (gpt2.early_exit.model), the training data taken from the frozen backbone
(gpt2.early_exit.training), and the classifier rebuilt from early_exit.json (gpt2.early_exit.files). The design and
its costs are described in gpt2.early_exit.model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.model import GPT

HEAD_FEATURES = ("max_prob", "entropy", "top2_margin")


def exit_head(base: GPT, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exit prediction for block k's output h (B, T, C): ln_f(h) and the tied head's logits (B, T, V)."""
    normed = base.transformer.ln_f(h)
    return normed, base.lm_head(normed)[..., : base.config.vocab_size]


def exit_features(h: torch.Tensor, exit_logits: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """Classifier input (…, F) from block k's output h (…, C) and, when given, the exit head's logits (…, V).

    F = C standardised hidden values, then max_prob, entropy / ln(V), top2_margin when logits are given (float32).
    """
    standardized = F.layer_norm(h.float(), (h.size(-1),), eps=eps)  # (…, C)
    if exit_logits is None:
        return standardized
    logp = F.log_softmax(exit_logits.float(), dim=-1)  # (…, V)
    probs = logp.exp()
    top2 = probs.topk(2, dim=-1).values  # (…, 2)
    entropy = -(probs * logp).sum(-1) / math.log(exit_logits.size(-1))  # in [0, 1]
    head = torch.stack([top2[..., 0], entropy, top2[..., 0] - top2[..., 1]], dim=-1)  # (…, 3)
    return torch.cat([standardized, head], dim=-1)


class ExitClassifier(nn.Module):
    """A two-layer MLP on `exit_features`: one logit per position; sigmoid(logit) estimates P(exit is safe)."""

    def __init__(self, n_embd: int, hidden_dim: int = 128, head_features: bool = True) -> None:
        super().__init__()
        if n_embd < 1 or hidden_dim < 1:
            raise ValueError(f"n_embd and hidden_dim must be >= 1, got {n_embd} and {hidden_dim}")
        self.n_embd = n_embd
        self.hidden_dim = hidden_dim
        self.head_features = head_features
        self.net = nn.Sequential(nn.Linear(self.input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))

    @property
    def input_dim(self) -> int:
        return self.n_embd + (len(HEAD_FEATURES) if self.head_features else 0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (…,) for features (…, input_dim)."""
        return self.net(features.to(self.net[0].weight.dtype)).squeeze(-1)

    def spec(self) -> dict:
        """What `early_exit.json` records about the classifier and its input."""
        return {
            "features": {
                "hidden": f"block exit_layer's output standardised per token (LayerNorm without affine),"
                f" {self.n_embd} values",
                "head": list(HEAD_FEATURES) if self.head_features else [],
            },
            "classifier": {"input_dim": self.input_dim, "hidden_dim": self.hidden_dim, "n_embd": self.n_embd},
        }
