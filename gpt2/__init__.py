"""GPT-2 in pure PyTorch: model, tokenizer, checkpoints, generation. No Ray or MLflow in this package.

Names are imported on first use (PEP 562), so a process that only tokenizes (a Ray Data tokenizer actor) does not
pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EOT_TOKEN": "gpt2.config",
    "PRESETS": "gpt2.config",
    "GPTConfig": "gpt2.config",
    "preset": "gpt2.config",
    "GPT": "gpt2.model",
    "get_tokenizer": "gpt2.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
