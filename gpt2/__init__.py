"""GPT-2 in pure PyTorch: model, tokenizer, checkpoints, generation. No Ray or MLflow in this package."""

from gpt2.config import EOT_TOKEN, PRESETS, GPTConfig, preset
from gpt2.model import GPT
from gpt2.tokenizer import get_tokenizer

__all__ = ["EOT_TOKEN", "GPT", "GPTConfig", "PRESETS", "get_tokenizer", "preset"]
