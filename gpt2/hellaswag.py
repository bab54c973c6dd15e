"""HellaSwag (Zellers et al., 2019): load the validation set, score a GPT-2 on it, compare with published numbers.

Published GPT-2 figures come from two scoring methods that differ by about 1.6 points of acc_norm, so both exist
here under their own names and every result says which one it is:

- ``completion`` (build-nanogpt, llm.c and this project's seeds): context ``ctx``; each ending is prefixed with a
  space and tokenized on its own. ``acc`` picks the ending with the lowest summed cross-entropy of its tokens,
  ``acc_norm`` the lowest mean cross-entropy per ending token.
- ``harness`` (EleutherAI lm-evaluation-harness): context ``activity_label: ctx_a + " " + ctx_b.capitalize()`` and
  endings with WikiHow's bracketed markers (``[title]``, ``[step]``, ...) removed; ``" " + ending`` is tokenized
  together with the context and split at the context's token count. ``acc`` uses the summed log-likelihood,
  ``acc_norm`` divides it by the ending's length in characters.

Scoring is batched: the 4 endings of every example in a batch are rows of one forward pass (see loglikelihood.py).
A row longer than the model's context keeps its last ``block_size + 1`` tokens, cutting the context from the left as
the harness does; HellaSwag rows are far shorter than GPT-2's 1024 tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import tiktoken

from gpt2.config import EOT_TOKEN
from gpt2.loglikelihood import row_logprobs
from gpt2.protocols import LanguageModel
from gpt2.shards import file_sha256
from gpt2.tokenizer import get_tokenizer

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# The release file's sha256 (12,246,618 bytes), as pinned in the download checksums of the Hugging Face `datasets`
# HellaSwag loader; a changed or truncated download is refused.
HELLASWAG_VAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
HELLASWAG_VAL_EXAMPLES = 10_042
NUM_ENDINGS = 4
METHODS = ("completion", "harness")
TEXT_FIELDS = ("activity_label", "ctx_a", "ctx_b", "ctx")


class HellaSwagFormatError(ValueError):
    """A HellaSwag line that cannot be scored; the message starts with ``path:line:``."""


class HellaSwagDownloadError(RuntimeError):
    """The file could not be downloaded, or what arrived does not have the expected checksum."""


@dataclass(frozen=True)
class HellaSwagExample:
    index: int  # position among the file's examples: results are merged and reported in this order
    line: int  # 1-based line number in the file, for messages
    activity_label: str
    ctx_a: str
    ctx_b: str
    ctx: str
    endings: tuple[str, ...]
    label: int


# ---------------------------------------------------------------------------------------------------- loading


def _parse_label(value: object) -> int | None:
    # The release stores the label as an int; the Hugging Face copy of the data stores it as a string.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def parse_example(text: str, *, index: int, line: int, source: str) -> HellaSwagExample:
    """One JSON line of a HellaSwag file; any problem raises HellaSwagFormatError naming ``source:line``."""
    where = f"{source}:{line}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise HellaSwagFormatError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise HellaSwagFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in (*TEXT_FIELDS, "endings", "label") if name not in record]
    if missing:
        raise HellaSwagFormatError(f"{where}: missing field(s) {missing}")
    not_text = [name for name in TEXT_FIELDS if not isinstance(record[name], str)]
    if not_text:
        raise HellaSwagFormatError(f"{where}: field(s) {not_text} must be strings")
    endings = record["endings"]
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagFormatError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings, got {endings!r:.120}")
    label = _parse_label(record["label"])
    if label is None or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagFormatError(f"{where}: label {record['label']!r} is not an ending index 0..{NUM_ENDINGS - 1}")
    return HellaSwagExample(
        index=index,
        line=line,
        activity_label=record["activity_label"],
        ctx_a=record["ctx_a"],
        ctx_b=record["ctx_b"],
        ctx=record["ctx"],
        endings=tuple(endings),
        label=label,
    )


def load_hellaswag(path: str | os.PathLike, *, limit: int | None = None) -> list[HellaSwagExample]:
    """The examples of a HellaSwag jsonl file (the first `limit` when given); blank lines are skipped."""
    examples: list[HellaSwagExample] = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HellaSwagFormatError(f"{path}:{line_number}: not UTF-8 ({e.reason} at byte {e.start})") from e
            if text.strip():
                examples.append(parse_example(text, index=len(examples), line=line_number, source=str(path)))
    if not examples:
        raise HellaSwagFormatError(f"{path}: no examples")
    return examples


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-on-ray" / "hellaswag"


def download_hellaswag(
    cache_dir: str | os.PathLike | None = None,
    *,
    url: str = HELLASWAG_VAL_URL,
    sha256: str = HELLASWAG_VAL_SHA256,
    timeout: float = 60.0,
) -> Path:
    """The checksum-verified file in the cache, downloaded first when it is missing or does not match.

    The download goes to a temporary name and is renamed into place only after its sha256 matched, so the cache
    never holds a partial or altered file.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / Path(urllib.parse.urlparse(url).path).name
    if target.is_file() and file_sha256(target) == sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise HellaSwagDownloadError(f"{url}: downloaded file has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(partial, target)
    except OSError as e:
        raise HellaSwagDownloadError(
            f"cannot download {url} ({e}). Where there is no network, copy hellaswag_val.jsonl here from a machine"
            f" that has it and pass its path (--hellaswag PATH), or put it at {target}"
        ) from e
    finally:
        partial.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------- preprocessing


def harness_clean(text: str) -> str:
    """lm-evaluation-harness's clean-up: WikiHow examples carry section markers ("[header]", "[title]", "[step]");
    the title marker becomes a sentence break, every other bracketed marker is deleted."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_context(example: HellaSwagExample) -> str:
    return harness_clean(f"{example.activity_label}: {example.ctx_a} {example.ctx_b.capitalize()}")


@dataclass(frozen=True)
class EncodedExample:
    """One example ready for the model: a token row per ending and where that ending starts in it."""

    index: int
    label: int
    rows: tuple[tuple[int, ...], ...]
    ending_starts: tuple[int, ...]
    norm_lengths: tuple[int, ...]  # what acc_norm divides an ending's log-likelihood by


# Per ending: (context tokens, ending tokens, acc_norm divisor).
Pieces = list[tuple[list[int], list[int], int]]


def _completion_pieces(example: HellaSwagExample, tokenizer: tiktoken.Encoding) -> Pieces:
    context = tokenizer.encode_ordinary(example.ctx)
    pieces = []
    for ending in example.endings:
        ending_tokens = tokenizer.encode_ordinary(" " + ending)
        pieces.append((context, ending_tokens, len(ending_tokens)))
    return pieces


def _harness_pieces(example: HellaSwagExample, tokenizer: tiktoken.Encoding) -> Pieces:
    context = harness_context(example)
    # The harness moves trailing whitespace of the context (left by a removed final marker) into the continuation.
    context_length = len(tokenizer.encode_ordinary(context.rstrip()))
    pieces = []
    for ending in example.endings:
        choice = harness_clean(ending)
        whole = tokenizer.encode_ordinary(f"{context} {choice}")
        # An ending that cleans to nothing has no characters to normalise by; 1 keeps its score finite.
        pieces.append((whole[:context_length], whole[context_length:], max(len(choice), 1)))
    return pieces


_PIECES = {"completion": _completion_pieces, "harness": _harness_pieces}


def encode_example(
    example: HellaSwagExample, method: str, tokenizer: tiktoken.Encoding, max_row_tokens: int
) -> EncodedExample:
    """Token rows for `method`, each cut from the left to at most `max_row_tokens` (the model's block_size + 1)."""
    if method not in _PIECES:
        raise ValueError(f"unknown HellaSwag method {method!r}; choose from {METHODS}")
    rows, starts, norms = [], [], []
    for number, (context, ending, norm) in enumerate(_PIECES[method](example, tokenizer)):
        if not ending:
            raise HellaSwagFormatError(f"line {example.line}: ending {number} has no tokens after the context")
        if len(ending) >= max_row_tokens:
            raise HellaSwagFormatError(
                f"line {example.line}: ending {number} has {len(ending)} tokens, more than the model's context"
            )
        # The first ending token must be predicted from something; GPT-2 documents follow <|endoftext|>.
        row = (context or [EOT_TOKEN]) + ending
        cut = max(0, len(row) - max_row_tokens)
        rows.append(tuple(row[cut:]))
        starts.append(len(row) - len(ending) - cut)
        norms.append(norm)
    return EncodedExample(example.index, example.label, tuple(rows), tuple(starts), tuple(norms))


# ---------------------------------------------------------------------------------------------------- scoring


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties go to the lowest index, as numpy's argmax


@dataclass(frozen=True)
class ExampleScore:
    index: int
    label: int
    logprobs: tuple[float, ...]  # per ending: summed log-probability of its tokens
    norm_lengths: tuple[int, ...]  # per ending: token count (completion) or character count (harness)

    @property
    def prediction(self) -> int:
        return _first_argmax(self.logprobs)

    @property
    def prediction_norm(self) -> int:
        return _first_argmax([lp / n for lp, n in zip(self.logprobs, self.norm_lengths)])


def score_examples(
    model: LanguageModel, examples: Sequence[HellaSwagExample], method: str, tokenizer: tiktoken.Encoding | None = None
) -> list[ExampleScore]:
    """Score every ending of `examples` with `method` in one forward pass of 4 × len(examples) rows."""
    tokenizer = tokenizer or get_tokenizer()
    encoded = [encode_example(ex, method, tokenizer, model.config.block_size + 1) for ex in examples]
    logprobs = row_logprobs(
        model, [row for e in encoded for row in e.rows], [start for e in encoded for start in e.ending_starts]
    )
    return [
        ExampleScore(e.index, e.label, tuple(logprobs[i * NUM_ENDINGS : (i + 1) * NUM_ENDINGS]), e.norm_lengths)
        for i, e in enumerate(encoded)
    ]


@dataclass(frozen=True)
class MethodResult:
    """One method's scores for a set of examples, in example order, and its accuracies."""

    method: str
    scores: tuple[ExampleScore, ...]

    @classmethod
    def merge(cls, method: str, scores: Sequence[ExampleScore]) -> "MethodResult":
        """Scores gathered from any number of workers in any order; each example must appear once."""
        ordered = tuple(sorted(scores, key=lambda s: s.index))
        if len({s.index for s in ordered}) != len(ordered):
            raise ValueError(f"{method}: some examples were scored more than once")
        return cls(method, ordered)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def correct(self) -> int:
        return sum(s.prediction == s.label for s in self.scores)

    @property
    def correct_norm(self) -> int:
        return sum(s.prediction_norm == s.label for s in self.scores)

    @property
    def acc(self) -> float:
        return self.correct / self.n

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n

    def metrics(self) -> dict[str, float]:
        return {f"hellaswag/{self.method}/acc": self.acc, f"hellaswag/{self.method}/acc_norm": self.acc_norm}


def evaluate_hellaswag(
    model: LanguageModel,
    examples: Sequence[HellaSwagExample],
    *,
    methods: Sequence[str] = METHODS,
    batch_size: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, MethodResult]:
    """Every method on every example in this process, `batch_size` consecutive examples per forward pass.

    `on_progress(n)` is called after each batch with the number of examples it held.
    """
    tokenizer = get_tokenizer()
    scores: dict[str, list[ExampleScore]] = {method: [] for method in methods}
    was_training = model.training
    model.eval()  # dropout would make the scores random
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            for method in methods:
                scores[method].extend(score_examples(model, batch, method, tokenizer))
            if on_progress is not None:
                on_progress(len(batch))
    finally:
        model.train(was_training)
    return {method: MethodResult.merge(method, s) for method, s in scores.items()}


# ---------------------------------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class PublishedResult:
    name: str
    percent: Mapping[str, float]  # keyed like MethodResult.metrics()


PUBLISHED_BASELINES: tuple[PublishedResult, ...] = (
    PublishedResult(
        "GPT-2 124M (OpenAI weights)",
        {
            "hellaswag/completion/acc": 28.59,
            "hellaswag/completion/acc_norm": 29.55,
            "hellaswag/harness/acc": 28.92,
            "hellaswag/harness/acc_norm": 31.14,
        },
    ),
    # The GPT-3 paper's own zero-shot protocol, normalised per token; compared against completion acc_norm.
    PublishedResult("GPT-3 124M (GPT-3 paper)", {"hellaswag/completion/acc_norm": 33.7}),
    PublishedResult("llm.c GPT-2 124M, 10B FineWeb tokens", {"hellaswag/completion/acc_norm": 29.9}),
    PublishedResult("seed run 124M (a)", {"hellaswag/completion/acc_norm": 30.52}),
    PublishedResult("seed run 124M (b)", {"hellaswag/completion/acc_norm": 30.78}),
    PublishedResult("seed run 350M", {"hellaswag/completion/acc_norm": 33.52}),
)

_TABLE_COLUMNS = [(method, metric) for method in METHODS for metric in ("acc", "acc_norm")]


def comparison_table(models: Sequence[tuple[str, Mapping[str, float]]]) -> str:
    """A text table of each model's HellaSwag accuracies (metrics as fractions) above the published baselines."""
    names = [name for name, _ in models] + [b.name for b in PUBLISHED_BASELINES]
    width = max(len("model"), *(len(n) for n in names))

    def line(name: str, percent: Mapping[str, float]) -> str:
        values = [percent.get(f"hellaswag/{method}/{metric}") for method, metric in _TABLE_COLUMNS]
        return f"{name:<{width}}" + "".join(f"{'-':>10}" if v is None else f"{v:>10.2f}" for v in values)

    header = f"{'HellaSwag (%)':<{width}}" + "".join(f"{method:>20}" for method in METHODS)
    header += "\n" + f"{'model':<{width}}" + "".join(f"{metric:>10}" for _, metric in _TABLE_COLUMNS)
    rule = "-" * (width + 10 * len(_TABLE_COLUMNS))
    rows = [line(name, {k: 100 * v for k, v in metrics.items()}) for name, metrics in models]
    published = [line(b.name, b.percent) for b in PUBLISHED_BASELINES]
    return "\n".join([header, rule, *rows, f"published ({HELLASWAG_VAL_EXAMPLES} validation examples):", *published])
