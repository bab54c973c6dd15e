"""vLLM's tokenizer endpoints over the GPT-2 tokenizer that every variant shares: request shapes and answers of
`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`.

lm-evaluation-harness's `local-completions` model detects them (`tokenizer_backend=auto`, 0.4.9+) and then tokenizes
through them (`tokenizer_backend=remote`): `GET /tokenizer_info` must answer a JSON object holding `eos_token` (it reads
`eos_token`, `bos_token`, `pad_token`, `chat_template`), `POST /tokenize` gets `{"prompt", "add_special_tokens": false}`
and reads `tokens` (the end-of-text token's id comes from tokenizing `eos_token`), `POST /detokenize` gets `{"tokens"}`
and reads `prompt`. It sends no `model`, so `model` is optional, as in vLLM.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from cluster.runtime.models import is_mlflow_uri
from gpt2.checkpoint import hf_tokenizer_config
from gpt2.config import EOT_TOKEN
from gpt2.tokenizer import EOT_TEXT, bpe_files, get_tokenizer
from serving.protocol import APIError

DEFAULT_CONTEXT = 1024  # GPT-2's, for variants whose config cannot be read without loading them (MLflow, hub names)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True  # GPT-2 adds no special tokens around a text: accepted, changes nothing
    return_token_strs: StrictBool | None = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: list[StrictInt]


def context_length(source: str) -> int:
    """A variant's context length (max_model_len) without loading it: `n_positions` of the config.json of a local
    model directory; GPT-2's 1024 otherwise."""
    from gpt2.checkpoint import CheckpointError, read_config

    if is_mlflow_uri(source) or not Path(source).is_dir():
        return DEFAULT_CONTEXT
    try:
        return read_config(source).block_size
    except (CheckpointError, OSError, TypeError, ValueError, AttributeError):
        # Not a model directory, or a broken config.json: loading the variant will say why, with the variant named,
        # and answer 503 for it alone; the server (and every other variant) must still start.
        return DEFAULT_CONTEXT


def tokenize(req: TokenizeRequest, max_model_len: int) -> dict:
    """vLLM's TokenizeResponse. `<|endoftext|>` in the text is the special token, as in completion prompts."""
    tokens = get_tokenizer().encode(req.prompt, allowed_special={EOT_TEXT})
    answer = {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens, "token_strs": None}
    if req.return_token_strs:
        strings = _token_strings()
        answer["token_strs"] = [strings[t] for t in tokens]
    return answer


def detokenize(req: DetokenizeRequest) -> dict:
    enc = get_tokenizer()
    for position, token in enumerate(req.tokens):
        if not 0 <= token < enc.n_vocab:
            raise APIError(400, f"tokens[{position}] = {token} is not a token id: ids run from 0 to {enc.n_vocab - 1}",
                           param="tokens")
    return {"prompt": enc.decode(req.tokens)}


def tokenizer_info(max_model_len: int) -> dict:
    """What vLLM answers at /tokenizer_info: the Hugging Face tokenizer's settings (a checkpoint's
    tokenizer_config.json), plus the ids of the special tokens and the vocabulary size."""
    return {
        **hf_tokenizer_config(max_model_len),  # what a checkpoint's tokenizer_config.json holds
        "pad_token": None,  # GPT-2 has none
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "vocab_size": get_tokenizer().n_vocab,
    }


@functools.lru_cache(maxsize=1)
def _token_strings() -> list[str]:
    """Every token as the byte-level BPE string of GPT-2's vocabulary ("Ġworld"), as Hugging Face tokenizers and
    vLLM's `return_token_strs` show them: the keys of the BPE data's encoder.json."""
    _, encoder_json = bpe_files()
    strings = [""] * get_tokenizer().n_vocab
    for text, token in json.loads(encoder_json.read_text(encoding="utf-8")).items():
        strings[token] = text
    return strings
