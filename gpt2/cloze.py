"""A HellaSwag-format sentence-completion set built from any documents: the offline stand-in for HellaSwag.

Without network the official HellaSwag file cannot be fetched, yet the pipeline should still measure the same
ability the same way: pick the right continuation of a context among four. Each example here takes a context of a
few consecutive sentences from one document; the right ending is the sentence that follows it, and the three wrong
ones are sentences from other documents (similar length, same corpus style). The file has the HellaSwag schema, so
gpt2/hellaswag.py scores it with both of its methods, and a model that learned the corpus does better than the
25% of chance. It is an easier task than HellaSwag (distractors are off-topic rather than adversarial): compare
checkpoints with it, never with published HellaSwag figures.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Sequence

from gpt2.durable import write_file_atomically

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
MIN_WORDS, MAX_WORDS = 5, 30  # sentences outside this range are headings, code or lists: not good endings


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in SENTENCE_END.split(flat) if MIN_WORDS <= len(s.split()) <= MAX_WORDS and not s.startswith(">>>")]


def cloze_examples(documents: Sequence[str], n: int, *, context_sentences: int = 2, seed: int = 0,
                   label: str = "documentation") -> list[dict]:
    """Up to `n` HellaSwag-format records (deterministic for a given seed and documents)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per_doc = [_sentences(d) for d in documents]
    usable = [i for i, s in enumerate(per_doc) if len(s) > context_sentences]
    if len(usable) < 4:
        raise ValueError(f"only {len(usable)} documents have {context_sentences + 1}+ usable sentences; need 4")
    rng = random.Random(seed)
    records = []
    for ind in range(n):
        doc = rng.choice(usable)
        sentences = per_doc[doc]
        start = rng.randrange(len(sentences) - context_sentences)
        context = sentences[start : start + context_sentences]
        others = rng.sample([i for i in usable if i != doc], 3)
        endings = [sentences[start + context_sentences]] + [rng.choice(per_doc[i]) for i in others]
        order = list(range(4))
        rng.shuffle(order)
        # HellaSwag splits its context in two (ctx_b starts the sentence to complete); here ctx_b is the context's
        # last sentence, so both scoring methods see the whole context.
        records.append({
            "ind": ind, "activity_label": label, "ctx_a": " ".join(context[:-1]), "ctx_b": context[-1],
            "ctx": " ".join(context), "endings": [endings[i] for i in order], "label": order.index(0),
            "split": "val", "split_type": "cloze", "source_id": f"doc{doc}",
        })
    return records


def write_cloze_file(documents: Sequence[str], path: str | os.PathLike, n: int, **kwargs) -> Path:
    """Write `cloze_examples` as a jsonl file (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, "".join(json.dumps(r) + "\n" for r in cloze_examples(documents, n, **kwargs)).encode())
    return path
