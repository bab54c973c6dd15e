"""The OpenAI completions protocol: request validation, error bodies, stop strings and response/chunk shapes.

Pure Python (pydantic, the tokenizer): the Serve deployments in serve/app.py use it, and it is testable alone.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from gpt2.tokenizer import IncrementalDecoder

Number = StrictFloat | StrictInt
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]

# Accepted so that standard clients work, but this server implements only their neutral value.
UNSUPPORTED_FIELDS = {
    "echo": False,
    "logprobs": None,
    "best_of": None,
    "suffix": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Types are strict: "5" is not a number here (a client bug we report, not guess at)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Early-exit variants: exit when the classifier's score reaches this (0 exits always, above 1 never).
    early_exit_threshold: Number | None = Field(None, ge=0)
    user: StrictStr | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    logit_bias: dict | None = None
    presence_penalty: Number = 0
    frequency_penalty: Number = 0

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids (OpenAI accepts all four shapes)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Limits(BaseModel):
    """Per-request limits of the server (configurable in serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = 1_000_000
    max_n: int = 8
    max_prompts: int = 16
    max_choices: int = 32  # prompts × n
    max_stop: int = 4


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 503: "server_overloaded"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def check_request(req: CompletionRequest, limits: Limits) -> None:
    """Checks the schema cannot express: unsupported options, configured limits, empty prompts."""
    for name, neutral in UNSUPPORTED_FIELDS.items():
        if getattr(req, name) not in (neutral, None):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported")
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt is an empty list", param="prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise APIError(400, f"prompt {i} is empty: give at least one character or token", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts in one request; the limit is {limits.max_prompts}", param="prompt")
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} is above this server's limit of {limits.max_n}", param="n")
    if len(prompts) * req.n > limits.max_choices:
        raise APIError(
            400, f"{len(prompts)} prompts × n={req.n} completions exceed the limit of {limits.max_choices}", param="n"
        )
    stops = req.stops()
    if len(stops) > limits.max_stop or any(s == "" for s in stops):
        raise APIError(400, f"stop takes up to {limits.max_stop} non-empty strings", param="stop")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        param = param or (str(e["loc"][0]) if e.get("loc") else None)
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts), param


class StopText:
    """Turns one completion's tokens into text pieces, ending at the first stop string (which is not returned).

    Text that could be the beginning of a stop string is held back until it is clear it is not one, so a stop
    string split across tokens is still found and never half-streamed to the client.
    """

    def __init__(self, stops: list[str]) -> None:
        self._decoder = IncrementalDecoder()
        self._stops = stops
        self._held = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        text = self._held + self._decoder.push(token)
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = max((k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        if self.stopped:
            return ""
        text, self._held = self._held + self._decoder.flush(), ""
        return text


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, created: int, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    """One streamed piece in the OpenAI `text_completion` chunk shape."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}],
    }


def response(cid: str, model: str, texts: list[str], reasons: list[str], usage: dict, extra: dict) -> dict:
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": t, "index": i, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))
        ],
        "usage": usage,
        **extra,
    }
