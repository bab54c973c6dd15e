"""Fine-tuning data: cutting text into documents, the train/val split by document, packing, early stopping."""

import random

import pytest
import torch

from gpt2 import GPT, preset
from gpt2.config import EOT_TOKEN
from gpt2.finetune_data import EarlyStopping, encode_documents, pack_documents, split_documents
from gpt2.text_documents import DocumentFormatError, read_text_documents, split_on_delimiters, split_txt

# --- documents from text ----------------------------------------------------------------------------------------


def test_tagged_documents_are_returned_verbatim_and_blank_ones_skipped():
    text = "<LOC>Paris, France</LOC>\n\n<LOC>\nRue de Rivoli\n</LOC>\n<LOC>  </LOC>\n"
    assert split_on_delimiters(text, "<LOC>...</LOC>") == ["Paris, France", "\nRue de Rivoli\n"]


def test_separator_and_whole_text_documents():
    text = "first doc\n---\nsecond doc\n---\n"
    assert split_on_delimiters(text, "\n---\n") == ["first doc", "second doc"]  # the trailing blank piece is skipped
    assert split_on_delimiters(text, None) == [text]


@pytest.mark.parametrize(
    "text, delimiter, message",
    [
        (" \n\n", "<LOC>...</LOC>", r"^notes\.txt: empty"),
        ("just prose, no tags\n", "<LOC>...</LOC>", r"^notes\.txt: no '<LOC>' in the text"),
        ("one long document\n", "\n---\n", r"^notes\.txt: no '\\n---\\n' in the text"),
        ("<LOC>a</LOC>\n<LOC>b</LOC>\nstray words\n<LOC>c</LOC>", "<LOC>...</LOC>", r"^notes\.txt:3: text outside"),
        ("<LOC>a</LOC>\n\n\n<LOC>never closed", "<LOC>...</LOC>", r"^notes\.txt:4: <LOC> without </LOC>"),
        ("<LOC></LOC>\n<LOC> </LOC>", "<LOC>...</LOC>", r"^notes\.txt: every document .* is empty"),
        ("<LOC>a</LOC>", "<LOC>...", r"^notes\.txt: delimiter '<LOC>\.\.\.': give both tags"),
    ],
)
def test_bad_text_raises_naming_the_source_and_line(text, delimiter, message):
    with pytest.raises(DocumentFormatError, match=message):
        split_on_delimiters(text, delimiter, source="notes.txt")


def test_files_are_read_with_errors_naming_the_file(tmp_path):
    good = tmp_path / "places.txt"
    good.write_text("<LOC>Zürich</LOC>\n<LOC>Kyōto</LOC>\n", encoding="utf-8")
    assert read_text_documents(good, "<LOC>...</LOC>") == ["Zürich", "Kyōto"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DocumentFormatError, match=rf"^{empty}: empty"):
        read_text_documents(empty, None)
    untagged = tmp_path / "untagged.txt"
    untagged.write_text("Zürich\nKyōto\n")
    with pytest.raises(DocumentFormatError, match=rf"^{untagged}: no '<LOC>'"):
        read_text_documents(untagged, "<LOC>...</LOC>")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("<LOC>café</LOC>".encode("latin-1"))
    with pytest.raises(DocumentFormatError, match=rf"^{latin1}: not UTF-8 \(byte 8\)"):
        read_text_documents(latin1, "<LOC>...</LOC>")
    with pytest.raises(DocumentFormatError, match=r"missing\.txt: cannot read"):
        read_text_documents(tmp_path / "missing.txt", None)


def test_split_txt_reports_problems_with_their_lines_and_keeps_going():
    # The lenient form that the Ray Data readers (cluster/data/sources.py) use: problems are yielded, not raised.
    data = "<LOC>one</LOC>\nstray\n<LOC>two\nlines</LOC>\n<LOC>open".encode()
    assert list(split_txt(data, "<LOC>...</LOC>")) == [
        (b"one", 1, None),
        (b"", 2, "text outside <LOC>...</LOC>"),
        (b"two\nlines", 3, None),
        (b"", 5, "<LOC> without </LOC>"),
    ]
    assert list(split_txt(b"a\n\nb\n\n\nc", "\n\n")) == [(b"a", 1, None), (b"b", 3, None), (b"\nc", 5, None)]


def test_text_that_spells_end_of_text_is_not_a_separator():
    tokens = encode_documents(["a<|endoftext|>b", "Hello world"])
    assert EOT_TOKEN not in tokens[0]
    assert tokens[1] == [15496, 995]


# --- packing ----------------------------------------------------------------------------------------------------


def _stream(docs_tokens):
    out = []
    for tokens in docs_tokens:
        out += [EOT_TOKEN, *tokens]
    return out + [EOT_TOKEN]


@pytest.mark.parametrize("seq_len", [1, 4, 5, 7, 64])
def test_packing_loses_no_token_and_puts_separators_between_documents(seq_len):
    rng = random.Random(seq_len)
    docs = [[rng.randrange(50000) for _ in range(rng.randint(1, 30))] for _ in range(9)]
    packed = pack_documents(docs, seq_len)
    stream = _stream(docs)
    assert packed.inputs.shape == packed.targets.shape == (len(packed), seq_len)
    assert packed.inputs.dtype == packed.targets.dtype == torch.int64
    assert len(packed) == -(-(len(stream) - 1) // seq_len)  # the final partial row is kept
    scored = packed.targets.flatten()
    n = len(stream) - 1
    assert scored[:n].tolist() == stream[1:]  # every token but the first is a target once, in order
    assert (scored[n:] == -100).all()  # only padding is ignored
    assert packed.inputs.flatten()[:n].tolist() == stream[:-1]
    assert (packed.inputs.flatten()[n:] == EOT_TOKEN).all()
    assert packed.num_targets == n


def test_packing_layout_on_a_small_example():
    packed = pack_documents([[1, 2, 3], [4], [5, 6]], seq_len=4)
    E = EOT_TOKEN
    assert packed.inputs.tolist() == [[E, 1, 2, 3], [E, 4, E, 5], [6, E, E, E]]
    assert packed.targets.tolist() == [[1, 2, 3, E], [4, E, 5, 6], [E, -100, -100, -100]]


def test_padded_targets_carry_no_loss():
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    packed = pack_documents([[10, 11, 12, 13, 14]], seq_len=8)  # 7 tokens: one row, 6 targets, 2 padded
    x, y = packed.inputs, packed.targets
    with torch.no_grad():
        logits, loss = model(x, y)
    expected = torch.nn.functional.cross_entropy(logits[0, :6], y[0, :6])
    assert torch.allclose(loss, expected)


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="no documents"):
        pack_documents([], 8)
    with pytest.raises(ValueError, match=r"document\(s\) \[1\] have no tokens"):
        pack_documents([[1], [], [2]], 8)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        pack_documents([[1]], 0)


def _rows(batches):
    return [tuple(row) for x, _ in batches for row in x.tolist()]


def test_batches_cover_every_row_once_in_a_seeded_order():
    packed = pack_documents([list(range(1, 200))], seq_len=8)  # 25 rows
    plain = list(packed.batches(4))
    assert [len(x) for x, _ in plain] == [4] * 6 + [1]
    assert _rows(plain) == [tuple(r) for r in packed.inputs.tolist()]
    shuffled = _rows(packed.batches(4, shuffle=True, seed=3))
    assert sorted(shuffled) == sorted(_rows(plain)) and shuffled != _rows(plain)
    assert shuffled == _rows(packed.batches(4, shuffle=True, seed=3))
    assert shuffled != _rows(packed.batches(4, shuffle=True, seed=4))
    for x, y in packed.batches(4, shuffle=True, seed=3):  # inputs and targets stay paired
        assert torch.equal(x[:, 1:], y[:, :-1])


# --- train/val split ---------------------------------------------------------------------------------------------

DOCS = [f"document number {i} about place {i % 17}" for i in range(1000)]


def test_split_is_deterministic_and_near_the_fraction():
    train, val = split_documents(DOCS, 0.1, seed=0)
    assert (train, val) == split_documents(DOCS, 0.1, seed=0)
    assert sorted(train + val) == sorted(DOCS) and not set(train) & set(val)
    assert 60 <= len(val) <= 140  # Binomial(1000, 0.1): mean 100, sd 9.5
    assert train == [d for d in DOCS if d in set(train)]  # input order kept
    assert split_documents(DOCS, 0.1, seed=1)[1] != val


def test_split_does_not_depend_on_order_or_on_other_documents():
    _, val = split_documents(DOCS, 0.1)
    shuffled = DOCS[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_documents(shuffled, 0.1)[1]) == set(val)
    _, val_of_half = split_documents(DOCS[:500], 0.1)
    assert set(val_of_half) == set(val) & set(DOCS[:500])


def test_duplicates_never_straddle_the_split():
    docs = DOCS[:100] * 3
    train, val = split_documents(docs, 0.2)
    assert not set(train) & set(val)


def test_small_corpora_still_get_a_validation_document():
    train, val = split_documents(["only two", "documents here"], 0.1)
    assert len(train) == len(val) == 1
    assert split_documents(["a", "b"], 0.0) == (["a", "b"], [])
    with pytest.raises(ValueError, match="all 1 document"):
        split_documents(["alone"], 0.1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_documents(DOCS, 1.0)


# --- best epoch and early stopping -------------------------------------------------------------------------------


def test_early_stopping_tracks_the_best_epoch_and_stops_after_patience():
    stopper = EarlyStopping(patience=2)
    verdicts = [stopper.update(epoch, loss) for epoch, loss in enumerate([3.0, 2.5, 2.6, 2.4, 2.45, 2.5])]
    assert [v.is_best for v in verdicts] == [True, True, False, True, False, False]
    assert [v.should_stop for v in verdicts] == [False, False, False, False, False, True]
    assert [v.epochs_since_best for v in verdicts] == [0, 0, 1, 0, 1, 2]
    assert (stopper.best_epoch, stopper.best_loss) == (3, 2.4)


def test_min_delta_nan_and_no_patience():
    stopper = EarlyStopping(patience=None, min_delta=0.1)
    verdicts = [stopper.update(e, loss) for e, loss in enumerate([float("nan"), 2.0, 1.95, 1.85, float("inf")] * 3)]
    assert [v.is_best for v in verdicts[:5]] == [False, True, False, True, False]  # 1.95 is within min_delta
    assert not any(v.should_stop for v in verdicts)
    assert stopper.best_epoch == 3
    resumed = EarlyStopping(patience=None, min_delta=0.1)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.update(15, 1.8) == stopper.update(15, 1.8)
    with pytest.raises(ValueError, match="patience must be at least 1"):
        EarlyStopping(patience=0)
