"""Linears packed for oneDNN (gpt2/packed_linear.py): the same numbers as nn.Linear, each row independent of the
batch it is computed in (so a seeded request decodes the same alone or in a crowd), and what serving loads."""

import copy

import pytest
import torch
import torch.nn as nn

from gpt2 import GPT, preset
from gpt2.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack(torch.float32), reason="this PyTorch build has no oneDNN")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = GPT(preset("tiny")).eval()
    packed = copy.deepcopy(plain)
    return plain, packed, pack_linears(packed, batch_hint=8)


def test_every_linear_of_the_model_is_packed_and_gives_the_same_logits(models):
    plain, packed, replaced = models
    config = plain.config
    assert replaced == 4 * config.n_layer + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per block, and the LM head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.transformer.wte.weight.data_ptr() == plain.transformer.wte.weight.data_ptr() or torch.equal(
        packed.transformer.wte.weight, plain.transformer.wte.weight)
    idx = torch.randint(0, config.vocab_size, (3, 17))
    with torch.inference_mode():
        assert torch.allclose(packed(idx)[0], plain(idx)[0], atol=1e-5, rtol=1e-5)


def test_a_row_gets_the_same_bits_alone_and_in_any_batch():
    torch.manual_seed(1)
    packed = PackedLinear(nn.Linear(96, 320), batch_hint=16)
    x = torch.randn(37, 96)
    with torch.inference_mode():
        together = packed(x)
        assert torch.equal(torch.cat([packed(x[i : i + 1]) for i in range(len(x))]), together)
        assert all(torch.equal(packed(x[:m]), together[:m]) for m in (2, 8, 16, 33))
        assert torch.equal(packed(x.view(1, 37, 96))[0], together)  # (B, T, C) inputs as the model passes them


def test_greedy_generation_is_unchanged(models):
    plain, packed, _ = models
    prompts = [[464, 3290, 286], [15496, 995]]
    assert packed.generate(prompts, 12, temperature=0) == plain.generate(prompts, 12, temperature=0)


def test_only_plain_float_linears_on_the_cpu_are_replaced():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float16), nn.Embedding(4, 8))
    assert pack_linears(model) == 1
    assert type(model[0]) is PackedLinear and type(model[1]) is nn.Linear and type(model[2]) is nn.Embedding
    assert not can_pack(torch.float16) and not can_pack(torch.int8)


def test_served_variants_are_packed_on_the_cpu(tmp_path):
    from serving.variants import VariantSpec, load_variant

    torch.manual_seed(0)
    GPT(preset("tiny")).save_pretrained(tmp_path / "m")
    model = load_variant(VariantSpec(name="m", source=str(tmp_path / "m"), dtype="fp32"), torch.device("cpu"),
                         max_batch=8)
    assert type(model.lm_head) is PackedLinear and not any(type(m) is nn.Linear for m in model.modules())
