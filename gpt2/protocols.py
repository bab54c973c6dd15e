"""What decoding and evaluation code needs from a model, as `typing.Protocol`s rather than a base class.

The models that code receives share no base class beyond nn.Module: a GPT (gpt2.model), an EarlyExitGPT
(gpt2.early_exit) that wraps one, and GPT copies whose layers were swapped for int8, NF4 or oneDNN-packed ones
(gpt2.quantize, gpt2.packed_linear). They agree on an interface, and these protocols name it:

- `LanguageModel`: what every model offers and the generation, serving and evaluation code uses (gpt2.generate,
  gpt2.loglikelihood, gpt2.perplexity, gpt2.hellaswag, serving.engine, cluster.eval.evaluation).
- `ExitingModel`: what an early-exit model offers on top, used by the serving engine and the completions it reports
  (serving.engine, serving.completions). It is runtime_checkable, so code tells the two kinds apart with
  `isinstance(model, ExitingModel)`.

They live in their own module rather than in gpt2/model.py because they describe the callers' needs, not GPT: GPT
satisfies LanguageModel without knowing it, and the GPT module need not know about early exit. The module imports
nothing at run time (the annotations' types are for type checkers only), so a process that only checks a model's
kind, such as the serving layer, pays for no import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol, Self, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from gpt2.config import GPTConfig
    from gpt2.early_exit.model import ExitStats
    from gpt2.kv_cache import KVCache


class LanguageModel(Protocol):
    """A causal language model: next-token logits for token rows, optionally continuing a KV cache.

    GPT, EarlyExitGPT and the quantized or packed copies of a GPT all satisfy it; nn.Module provides `training`,
    `eval`, `train`, `parameters` and `__call__` (which runs `forward`). Not runtime_checkable: a GPT keeps
    `transformer` among its submodules, where isinstance does not look on Python 3.12+ (it reads attributes
    statically there).
    """

    @property
    def config(self) -> GPTConfig: ...

    @property
    def transformer(self) -> nn.ModuleDict:
        """wte (whose weight tells the model's device), wpe, h (the blocks), ln_f."""
        ...

    @property
    def training(self) -> bool: ...

    def eval(self) -> Self: ...

    def train(self, mode: bool = True) -> Self: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` positions (default: block_size)."""
        ...

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V), (B, 1, V) with last_only or (N, V) with logits_at, and the mean cross-entropy (None
        without targets).

        kv_cache: append these tokens after each row's cached ones.
        logits_at: a (B, T) bool mask, the only positions whose logits are computed (row-major order)."""
        ...

    def __call__(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@runtime_checkable
class ExitingModel(Protocol):
    """The early-exit extras of a LanguageModel (EarlyExitGPT): tokens may stop after block `exit_layer` when the
    exit classifier's score reaches a threshold, and a forward pass reports which positions did.

    `isinstance(model, ExitingModel)` only checks that these names exist on the model, not their signatures
    or types. The members are therefore plain attributes and methods of EarlyExitGPT, never submodules such as its
    classifier: on Python 3.12+ isinstance looks attributes up statically and would not find a submodule. Code that
    needs EarlyExitGPT's internals (gpt2.profile_layers hooks its classifier) checks for that class instead.
    """

    exit_layer: int  # blocks run before the exit
    threshold: float  # the default tau: a position exits when its score >= tau

    def forward_with_exits(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        threshold: float | Sequence[float] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits as LanguageModel.forward, and `exited` (B, T) bool: which positions stopped after exit_layer.

        threshold: None uses self.threshold; a float applies to every row; one value per row gives each its own."""
        ...

    def reset_stats(self) -> ExitStats:
        """How many positions exited since the last call (tokens, exit rate, mean blocks run), and a fresh count."""
        ...
