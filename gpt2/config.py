"""Model hyper-parameters and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, also used as the document separator in shards
# Targets with this value carry no loss: F.cross_entropy's default ignore_index, which every loss here uses.
IGNORE_INDEX = -100
GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = GPT2_VOCAB_SIZE  # real vocabulary; token ids are always < vocab_size
    block_size: int = 1024  # context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    norm: str = "pre"  # "pre" (GPT-2) or "post" (original Transformer) LayerNorm placement
    tie_embeddings: bool = True  # lm_head shares wte's weight
    # Embedding rows are padded to a multiple of this (64 → 50304) so the big matmuls get friendly shapes.
    # Padded rows are never looked up, never sampled and never part of the loss: logits are cut to vocab_size.
    vocab_pad_multiple: int = 1
    layer_norm_epsilon: float = 1e-5
    # Heads kept in each layer after structured pruning (gpt2.prune); None means n_head everywhere. head_dim stays
    # n_embd // n_head. Every layer keeps at least one head: an attention sub-layer without heads would need special
    # cases in the model for what is better done by removing the sub-layer. A tuple that keeps every head is
    # stored as None, so an unpruned config has one spelling.
    n_head_per_layer: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_head_per_layer, (list, tuple)):  # config.json gives a list
            heads = tuple(self.n_head_per_layer)
            object.__setattr__(self, "n_head_per_layer", None if heads == (self.n_head,) * self.n_layer else heads)
        checks = {
            "vocab_size": self.vocab_size > 0,
            "block_size": self.block_size > 0,
            "n_layer": self.n_layer > 0,
            "n_head": self.n_head > 0,
            "n_embd": self.n_embd > 0 and self.n_embd % max(self.n_head, 1) == 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "norm": self.norm in ("pre", "post"),
            "vocab_pad_multiple": self.vocab_pad_multiple >= 1,
            "n_head_per_layer": self.n_head_per_layer is None
            or (
                isinstance(self.n_head_per_layer, tuple)
                and len(self.n_head_per_layer) == self.n_layer
                and all(isinstance(h, int) and 0 < h <= self.n_head for h in self.n_head_per_layer)
            ),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid GPTConfig field(s) {bad}: {self}"
                " (n_embd must be divisible by n_head; norm is 'pre' or 'post';"
                " n_head_per_layer has n_layer entries, each in [1, n_head])"
            )

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def heads_in_layer(self, layer: int) -> int:
        """Attention heads in block `layer` (fewer than n_head once heads are pruned)."""
        if not 0 <= layer < self.n_layer:
            raise IndexError(f"layer {layer} does not exist; the model has {self.n_layer} layers")
        return self.n_head if self.n_head_per_layer is None else self.n_head_per_layer[layer]

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, GPTConfig] = {
    # The OpenAI GPT-2 family.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small shapes for CPU: `tiny` for tests, `small` for the local demo run.
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset with optional field overrides, e.g. ``preset("gpt2", vocab_pad_multiple=64)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
