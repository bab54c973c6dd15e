"""A checkpoint directory is a complete Hugging Face text-generation model: transformers' own tokenizer and pipeline
load it offline and agree with this project's tokenizer and generation."""

import hashlib
import json

import pytest
import torch
import transformers

from gpt2 import GPT, get_tokenizer, preset
from gpt2 import tokenizer as tok_module
from gpt2.checkpoint import add_tokenizer_files
from gpt2.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, bpe_files

TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}
TEXTS = [
    "Hello world",
    "  leading spaces, double  spaces and a trailing one ",
    "lines\n\nwith\r\nbreaks\tand tabs\n",
    "naïve café, Straße, 日本語の文章, emoji 🎉🦙",
    "It's 3.14159 -- isn't it? (yes) [no] {maybe}",
    "end of one document<|endoftext|>start of the next",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    directory = tmp_path_factory.mktemp("hf") / "ckpt"
    model.save_pretrained(str(directory))
    return model, directory


def test_the_directory_holds_the_tokenizer_and_generation_files(checkpoint):
    _, directory = checkpoint
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors", *TOKENIZER_FILES}
    vocab_bpe, encoder_json = bpe_files()
    assert (directory / "vocab.json").read_bytes() == encoder_json.read_bytes()
    assert (directory / "merges.txt").read_bytes() == vocab_bpe.read_bytes()
    assert hashlib.sha256((directory / "vocab.json").read_bytes()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256((directory / "merges.txt").read_bytes()).hexdigest() == VOCAB_BPE_SHA256
    special = json.loads((directory / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def test_auto_tokenizer_encodes_and_decodes_as_tiktoken(checkpoint):
    _, directory = checkpoint
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    enc = get_tokenizer()
    assert hf("Hello world")["input_ids"] == [15496, 995]
    assert len(hf) == 50257 and hf.eos_token_id == hf.bos_token_id == 50256 and hf.pad_token_id is None
    assert hf.model_max_length == preset("tiny").block_size
    for text in TEXTS:
        ids = enc.encode(text, allowed_special={"<|endoftext|>"})
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == enc.decode(ids) == text


def test_generation_config_has_gpt2_end_of_text_and_no_pad(checkpoint):
    _, directory = checkpoint
    generation = transformers.GenerationConfig.from_pretrained(directory)
    assert generation.bos_token_id == generation.eos_token_id == 50256
    assert generation.pad_token_id is None


def test_transformers_pipeline_generates_what_model_generate_does(checkpoint):
    model, directory = checkpoint
    enc = get_tokenizer()
    generator = transformers.pipeline("text-generation", model=str(directory), device="cpu")
    for prompt in ["Hello world", "The capital of France is"]:
        new = model.generate(enc.encode_ordinary(prompt), 8, temperature=0)[0]
        assert len(new) == 8  # no early end-of-text: both sides generate all 8 tokens
        out = generator(prompt, do_sample=False, max_new_tokens=8)
        assert out[0]["generated_text"] == prompt + enc.decode(new)


def test_a_checkpoint_without_tokenizer_files_still_loads(checkpoint, tmp_path):
    model, directory = checkpoint
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "model.safetensors"):
        (old / name).write_bytes((directory / name).read_bytes())
    back = GPT.from_pretrained(str(old))
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])

    # The jobs that copy such a base (the early-exit model's) add what it lacks and keep what it has.
    (old / "vocab.json").write_bytes((directory / "vocab.json").read_bytes())
    assert add_tokenizer_files(old) == sorted(TOKENIZER_FILES - {"vocab.json"})
    assert all((old / n).read_bytes() == (directory / n).read_bytes() for n in TOKENIZER_FILES)
    assert add_tokenizer_files(old) == []


def test_tampered_bpe_data_is_never_copied_into_a_checkpoint(tmp_path, monkeypatch):
    vocab_bpe, encoder_json = bpe_files()
    tampered = tmp_path / "encoder.json"
    tampered.write_bytes(encoder_json.read_bytes().replace(b'"world"', b'"w0rld"'))
    monkeypatch.setattr(tok_module, "bpe_files", lambda: (vocab_bpe, tampered))
    tok_module.bpe_file_bytes.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="sha256"):
            GPT(preset("tiny", n_layer=1)).save_pretrained(str(tmp_path / "ckpt"))
    finally:
        tok_module.bpe_file_bytes.cache_clear()  # the real files for the tests that follow
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.json"]  # no checkpoint, no temporary directory
