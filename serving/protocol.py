"""The OpenAI completions protocol: request validation, error bodies, stop strings and response/chunk shapes.

Pure Python (pydantic, the tokenizer): the Serve deployments in serving/app.py use it, and it is testable alone.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from gpt2.sampling import SamplingParams
from gpt2.tokenizer import IncrementalDecoder, get_tokenizer

Number = StrictFloat | StrictInt
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
API_MAX_LOGPROBS = 5  # OpenAI's limit for the completions API (the engine reports up to 20)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's legacy completions fields and vLLM's extra sampling fields.

    Types are strict: "5" is not a number here (a client bug we report, not guess at). Fields this server does not
    know are accepted and ignored, as vLLM does (the server logs them and names them in X-Ignored-Fields), so
    clients written for other servers keep working.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # JSON's NaN/Infinity extension is no number

    model: StrictStr
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt = Field(16, ge=0)  # 0 (with echo) scores the prompt without generating
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # -1 or 0: no top-k (vLLM's neutral values)
    n: StrictInt = Field(1, ge=1)
    best_of: StrictInt | None = Field(None, ge=1)  # accepted when equal to n: every completion is returned
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    include_stop_str_in_output: StrictBool = False
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI and vLLM take it
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=API_MAX_LOGPROBS)
    presence_penalty: Number = Field(0, ge=-2, le=2)
    frequency_penalty: Number = Field(0, ge=-2, le=2)
    repetition_penalty: Number = Field(1, gt=0, le=2)
    logit_bias: dict[StrictStr, Number] | None = None
    suffix: StrictStr | None = None
    user: StrictStr | None = None
    # Early-exit variants: exit when the classifier's score reaches this (0 exits always, above 1 never).
    early_exit_threshold: Number | None = Field(None, ge=0)
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)  # vLLM's: keep the last k tokens; -1: the context

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

    def ignored_fields(self) -> list[str]:
        """Fields of the request that this server does not know (ignored)."""
        return sorted(self.model_extra or {})

    def sampling_params(self) -> SamplingParams:
        bias = tuple((int(t), float(b)) for t, b in (self.logit_bias or {}).items())
        return SamplingParams(
            temperature=float(self.temperature),
            top_k=self.top_k if self.top_k and self.top_k > 0 else None,
            top_p=float(self.top_p),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logit_bias=bias,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )


class Limits(BaseModel):
    """Per-request limits of the server (configurable in serving/config.yaml)."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = 1_000_000
    max_n: int = 8
    max_prompts: int = 16
    max_choices: int = 32  # prompts × n
    max_stop: int = 4
    max_stop_chars: int = 500_000  # all stop strings together; matching is linear in this and in the text
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300  # entries, as OpenAI allows
    request_timeout_s: float = 600.0  # a request still running then ends with finish_reason "length"


class APIError(Exception):
    """An error answered to the client as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        if self.status == 503:
            kind = "server_overloaded"
        else:  # 4xx: the client's to mend
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def check_request(req: CompletionRequest, limits: Limits, vocab_size: int = 50257) -> None:
    """Checks the schema cannot express: combinations of fields, configured limits, empty prompts, token ids."""
    if req.suffix:
        raise APIError(400, "'suffix' is not supported by this server (GPT-2 has no fill-in-the-middle)",
                       param="suffix", code="unsupported")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of} must equal n={req.n}: this server returns every completion it"
                       " generates, it does not rank them", param="best_of")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens=0 generates nothing: it is only allowed with echo (to score the prompt)",
                       param="max_tokens")
    if req.min_tokens > req.max_tokens:
        raise APIError(400, f"min_tokens={req.min_tokens} is above max_tokens={req.max_tokens}", param="min_tokens")
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
    stop_chars = sum(map(len, stops))
    if stop_chars > limits.max_stop_chars:
        raise APIError(400, f"the stop strings hold {stop_chars} characters; the limit is"
                       f" {limits.max_stop_chars}", param="stop")
    if req.truncate_prompt_tokens == 0:
        raise APIError(400, "truncate_prompt_tokens=0 would keep no prompt: give the number of the prompt's last"
                       " tokens to keep, or -1 for the model's context", param="truncate_prompt_tokens")
    ids = req.stop_token_ids or []
    if len(ids) > limits.max_stop_token_ids:
        raise APIError(400, f"{len(ids)} stop_token_ids; the limit is {limits.max_stop_token_ids}",
                       param="stop_token_ids")
    for t in ids:
        if t >= vocab_size:
            raise APIError(400, f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})",
                           param="stop_token_ids")
    bias = req.logit_bias or {}
    if len(bias) > limits.max_logit_bias:
        raise APIError(400, f"logit_bias has {len(bias)} entries; the limit is {limits.max_logit_bias}",
                       param="logit_bias")
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} is {value}; it must be in [-100, 100]",
                           param="logit_bias")


def fit_prompt(tokens: list[int], req: CompletionRequest, context: int) -> list[int]:
    """The prompt the model reads: its last `truncate_prompt_tokens` tokens where the request asks so (-1: as many as
    the context holds), refused when it and `max_tokens` do not fit the model's context."""
    if req.max_tokens >= context:
        raise APIError(400, f"max_tokens={req.max_tokens} leaves no room for a prompt in the model's context of"
                       f" {context} tokens", param="max_tokens")
    keep = req.truncate_prompt_tokens
    if keep is not None:
        if keep > context:
            raise APIError(400, f"truncate_prompt_tokens={keep} is above the model's context of {context} tokens",
                           param="truncate_prompt_tokens")
        tokens = tokens[-(context if keep == -1 else keep):]
    if len(tokens) + req.max_tokens > context:
        mend = "lower max_tokens" if keep is not None else (
            "shorten the prompt, lower max_tokens, or set truncate_prompt_tokens to keep the prompt's last tokens")
        raise APIError(400, f"the prompt ({len(tokens)} tokens) plus max_tokens ({req.max_tokens}) exceeds the"
                       f" model's context of {context} tokens; {mend}", param="prompt")
    return tokens


def validation_message(errors: list[dict], subject: str = "invalid request") -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first offending field."""
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        param = param or (str(e["loc"][0]) if e.get("loc") else None)
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return f"{subject}: " + "; ".join(parts), param


class StopMatcher:
    """Finds stop strings in a stream of text in time linear in the text and in the stop strings' length.

    Each stop string gets its KMP failure table once per request (shared by every choice); a choice then keeps, per
    stop string, the length of the longest prefix of that string that ends the text so far, and advances it by one
    character at a time. (Re-searching the recent text for every stop string at every token, as a naive check does,
    costs the square of a long stop string's length per token.)
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.tables = [_failure_table(s) for s in stops]


def _failure_table(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopText:
    """Turns one completion's tokens into text pieces, ending at the first stop string (which is not returned
    unless `include_stop` asks for it).

    Text that could be the beginning of a stop string is held back until it is clear it is not one, so a stop
    string split across tokens is still found and never half-streamed to the client.
    """

    def __init__(self, matcher: StopMatcher, include_stop: bool = False) -> None:
        self._decoder = IncrementalDecoder()
        self._matcher = matcher
        self._state = [0] * len(matcher.stops)  # per stop string: how much of it ends the text so far
        self._include = include_stop
        self._held = ""
        self.stopped: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> str:
        if self.stopped is not None:
            return ""
        new = self._decoder.push(token)
        if not self._matcher.stops:
            return new
        text = self._held + new
        base = len(self._held)
        for offset, ch in enumerate(new):
            for j, (stop, fail) in enumerate(zip(self._matcher.stops, self._matcher.tables)):
                k = self._state[j]
                while k and ch != stop[k]:
                    k = fail[k - 1]
                if ch == stop[k]:
                    k += 1
                if k == len(stop):  # the first stop string to end here wins
                    self.stopped, self._held = stop, ""
                    end = base + offset + 1
                    return text[:end] if self._include else text[: end - len(stop)]
                self._state[j] = k
        keep = max(self._state)  # the longest stop-string prefix that ends the text
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        if self.stopped is not None:
            return ""
        text, self._held = self._held + self._decoder.flush(), ""
        return text


def token_text(token: int) -> str:
    """A token's text as logprobs show it (a token holding part of a UTF-8 character shows U+FFFD)."""
    return get_tokenizer().decode_single_token_bytes(token).decode("utf-8", errors="replace")


def logprobs_block(
    tokens: list[int], logprobs: list[float | None], tops: list, offset: int, with_chosen: bool = True
) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` object for some tokens, and the text offset after them.

    tops[i]: the (token id, logprob) alternatives of position i, or None where there are none (the first prompt
    token). The chosen token is always among a position's top_logprobs, as vLLM reports it.
    """
    texts = [token_text(t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top_logprobs = []
    for token, text, lp, top in zip(tokens, texts, logprobs, tops):
        if top is None:
            top_logprobs.append(None)
            continue
        entry = {token_text(t): v for t, v in top}
        if with_chosen:
            entry.setdefault(text, lp)
        top_logprobs.append(entry)
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top_logprobs,
            "text_offset": offsets}, offset


def merge_logprobs(blocks: list[dict]) -> dict | None:
    """Consecutive logprobs blocks of one choice as one."""
    if not blocks:
        return None
    return {key: [x for b in blocks for x in b[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                 "text_offset")}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def chunk(cid: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
          logprobs: dict | None = None, stop_reason: str | int | None = None) -> dict:
    """One streamed piece in the OpenAI `text_completion` chunk shape."""
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def response(cid: str, model: str, choices: list[dict], usage: dict, extra: dict) -> dict:
    """A whole completion response; choices hold text, finish_reason, stop_reason and logprobs."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, **c} for i, c in enumerate(choices)],
        "usage": usage,
        **extra,
    }
