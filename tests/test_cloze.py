"""The offline HellaSwag-format cloze set: valid HellaSwag records, deterministic, right ending in the right place."""

from __future__ import annotations

import pytest

from gpt2.cloze import cloze_examples, write_cloze_file
from gpt2.hellaswag import load_hellaswag

DOCS = [
    f"Document {d} opens with a sentence about topic {d}. It continues with a second sentence on topic {d}. "
    f"A third sentence follows about topic {d} here. The fourth sentence closes topic {d} for good."
    for d in range(6)
]


def test_records_load_as_hellaswag_and_keep_the_true_continuation(tmp_path):
    path = write_cloze_file(DOCS, tmp_path / "cloze.jsonl", 20, seed=3)
    examples = load_hellaswag(path)
    assert len(examples) == 20
    for e in examples:
        doc = int(e.ctx.split("topic ")[1].split()[0].rstrip("."))
        right = e.endings[e.label]
        assert f"topic {doc}" in right and right not in e.ctx  # the next sentence of the same document
        assert all(f"topic {doc} " not in w and f"topic {doc}." not in w for i, w in enumerate(e.endings) if i != e.label)
    assert cloze_examples(DOCS, 20, seed=3) == cloze_examples(DOCS, 20, seed=3)
    assert cloze_examples(DOCS, 20, seed=3) != cloze_examples(DOCS, 20, seed=4)
    assert {e.label for e in examples} == {0, 1, 2, 3}  # the right ending is not always in one place


def test_too_few_documents_is_a_clear_error():
    with pytest.raises(ValueError, match="need 4"):
        cloze_examples(DOCS[:3], 5)
    with pytest.raises(ValueError, match="n must be"):
        cloze_examples(DOCS, 0)
