import math
import sys
from pydoc_data.topics import topics

import pytest
import torch
import torch.nn as nn

from gpt2 import GPT, GPTConfig, preset
from gpt2.quantize import model_size_bytes, quantize_int8, quantize_nf4, to_bf16
from gpt2.train import TrainConfig, evaluate_loss, make_optimizer


def test_model_size_bytes_counts_what_is_stored(tiny_model):
    n = sum(p.numel() for p in tiny_model.parameters())  # the tied head once
    assert model_size_bytes(tiny_model) == 4 * n
    assert model_size_bytes(to_bf16(tiny_model)) == 2 * n
    linears = [m for m in tiny_model.modules() if isinstance(m, nn.Linear)]  # the blocks' and the tied head
    block_linears = [m for m in linears if m is not tiny_model.lm_head]
    block_linear_params = sum(m.weight.numel() + m.bias.numel() for m in block_linears)
    # int8: every Linear weight 1 byte (the head an int8 copy of the fp32 embedding, which stays for lookups),
    # biases and everything else fp32.
    expected = 4 * (n - block_linear_params) + sum(m.weight.numel() for m in linears)
    expected += 4 * sum(m.bias.numel() for m in block_linears)
    assert model_size_bytes(quantize_int8(tiny_model)) == expected


def _byte_batches(text: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(text.encode()))
    usable = (len(data) - 1) // length * length
    return data[:usable].view(-1, length), data[1 : usable + 1].view(-1, length)  # inputs, targets (N, length)


@pytest.fixture(scope="module")
def byte_model_and_val() -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """A byte-level model (vocab 256), which learns real structure from the Python docs in seconds on a CPU, and
    held-out validation batches."""
    names = sorted(topics)
    text = "\n\n".join(topics[name] for name in names[:30])
    train, val = text[:-16_384], text[-16_384:]
    x_train, y_train = _byte_batches(train, 64)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64))
    cfg = TrainConfig(weight_decay=0.0, max_lr=1e-2)
    optimizer = make_optimizer(model, cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        rows = torch.randint(0, len(x_train), (16,), generator=g)
        _, loss = model(x_train[rows], y_train[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), _byte_batches(val, 64)


def _perplexity(model: nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> float:
    return math.exp(evaluate_loss(model, iter([val]), 1, device=torch.device("cpu")))


def test_int8_perplexity_is_within_one_percent_of_fp32(byte_model_and_val):
    model, val = byte_model_and_val
    fp32, int8 = _perplexity(model, val), _perplexity(quantize_int8(model), val)
    assert fp32 < 40  # trained: uniform guessing is 256
    # Per-tensor int8 moves each weight by at most half a step (max|w| / 254) and activations likewise; that
    # changed perplexity by about 0.02% here and by well under 1% in published GPT-2 int8 results. 1% keeps a
    # wide margin for other CPUs' kernels and still fails a broken path (a lost scale or transposed weight gives
    # a perplexity that is far off).
    assert abs(int8 / fp32 - 1) < 0.01, (fp32, int8)


def test_nf4_perplexity_is_within_two_percent_of_fp32_on_cpu(byte_model_and_val):
    model, val = byte_model_and_val
    nf4 = quantize_nf4(model, device="cpu")
    assert not any(type(m) is nn.Linear for m in nf4.transformer.h.modules())  # all replaced by Linear4bit
    fp32, nf4_ppl = _perplexity(model, val), _perplexity(nf4, val)
    # NF4 keeps 16 levels per weight (one scale per 64 weights) and computes in bf16, a coarser grid than int8's
    # 255 levels; it changed perplexity by about 0.01% here. 2% leaves room for other CPUs' and GPUs' kernels
    # and still fails a broken path (a lost scale or a transposed weight is far off).
    assert abs(nf4_ppl / fp32 - 1) < 0.02, (fp32, nf4_ppl)


def test_nf4_model_is_smaller_and_generates():
    torch.manual_seed(0)
    model = GPT(preset("small")).eval()
    nf4 = quantize_nf4(model)  # CUDA when there is one, else CPU
    device = next(nf4.parameters()).device
    with torch.no_grad():
        logits, _ = nf4(torch.randint(0, 50257, (1, 8), device=device))
    assert logits.shape == (1, 8, 50257) and torch.isfinite(logits).all()
    assert model_size_bytes(nf4) < model_size_bytes(to_bf16(model))
    assert len(nf4.generate([[1, 2, 3]], 4, temperature=0, stop_at_eot=False)[0]) == 4


def test_nf4_on_a_device_bitsandbytes_cannot_use_is_refused(tiny_model):
    with pytest.raises(ValueError, match="CUDA or CPU"):
        quantize_nf4(tiny_model, device="mps")


def test_nf4_without_bitsandbytes_is_refused(monkeypatch, tiny_model):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail as if not installed
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        quantize_nf4(tiny_model, device="cpu")
