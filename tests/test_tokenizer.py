import hashlib

import pytest

from gpt2 import EOT_TOKEN, get_tokenizer
from gpt2 import tokenizer as tok_module


def test_known_ids():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.eot_token == EOT_TOKEN == 50256
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]


def test_unicode_round_trip():
    enc = get_tokenizer()
    text = "Grüße, 東京! naïve café — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 emoji 🙂 tabs\tand\nnewlines  "
    assert enc.decode(enc.encode(text)) == text


def test_bpe_files_match_published_hashes():
    vocab, encoder = tok_module.bpe_files()
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == tok_module.VOCAB_BPE_SHA256
    assert hashlib.sha256(encoder.read_bytes()).hexdigest() == tok_module.ENCODER_JSON_SHA256


def test_tampered_file_is_refused(tmp_path):
    bad = tmp_path / "vocab.bpe"
    bad.write_text("#version: 0.2\nnot the gpt2 merges\n")
    with pytest.raises(RuntimeError, match="sha256"):
        tok_module._check_sha256(bad, tok_module.VOCAB_BPE_SHA256)
    with pytest.raises(RuntimeError, match="missing"):
        tok_module._check_sha256(tmp_path / "absent.bpe", tok_module.VOCAB_BPE_SHA256)


def test_incremental_decoder_never_splits_characters():
    from gpt2.tokenizer import IncrementalDecoder

    enc = get_tokenizer()
    text = "emoji 🙂🙂 and 東京 and naïve"
    tokens = enc.encode(text)
    assert len(tokens) > len(enc.encode("emoji")) + 3
    dec = IncrementalDecoder(enc)
    pieces = [dec.push(t) for t in tokens] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
