import pytest
import torch

from gpt2 import GPT, GPTConfig, preset


def test_presets_and_param_counts():
    # The paper-style count (no position embeddings, tied head counted once) for the 124M model.
    with torch.device("meta"):
        m = GPT(preset("gpt2"))
    assert m.num_params() == 124_439_808 - 1024 * 768
    assert m.num_params(non_embedding=False) == 124_439_808
    with torch.device("meta"):
        assert 350e6 < GPT(preset("gpt2-medium")).num_params(non_embedding=False) < 360e6


def test_forward_shapes_loss_and_hidden_states(tiny_model):
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = tiny_model(idx)
    assert logits.shape == (2, 16, 50257) and loss is None
    targets = torch.randint(0, 50257, (2, 16))
    logits, loss, hidden = tiny_model(idx, targets, output_hidden_states=True)
    assert len(hidden) == tiny_model.config.n_layer + 1
    assert all(h.shape == (2, 16, 64) for h in hidden)
    # Near-uniform predictions at init: loss close to ln(50257) ≈ 10.8.
    assert abs(loss.item() - 10.825) < 0.3


def test_logits_at_gives_the_selected_positions_of_the_full_logits(tiny_model):
    idx = torch.randint(0, 50257, (3, 12))
    at = torch.rand(3, 12) < 0.4
    at[0] = False  # a row with nothing selected contributes no rows
    with torch.no_grad():
        full, _ = tiny_model(idx)
        picked, loss = tiny_model(idx, logits_at=at)
    assert picked.shape == (int(at.sum()), 50257) and loss is None
    torch.testing.assert_close(picked, full[at], rtol=1e-4, atol=1e-4)  # the head's matmul shape differs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"logits_at": torch.ones(2, 5, dtype=torch.bool)}, "shaped like idx"),
        ({"logits_at": torch.ones(2, 6, dtype=torch.long)}, "bool mask"),
        ({"logits_at": torch.ones(2, 6, dtype=torch.bool), "last_only": True}, "last_only"),
        ({"logits_at": torch.ones(2, 6, dtype=torch.bool), "targets": torch.zeros(2, 6, dtype=torch.long)}, "targets"),
    ],
)
def test_logits_at_that_cannot_be_honoured_is_refused(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.zeros(2, 6, dtype=torch.long), **kwargs)


def test_padded_vocab_is_never_predicted():
    torch.manual_seed(0)
    m = GPT(preset("tiny", vocab_pad_multiple=64)).eval()
    assert m.transformer.wte.weight.shape[0] == 50304
    logits, _ = m(torch.randint(0, 50257, (1, 8)))
    assert logits.shape[-1] == 50257


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(preset("small"))
    std_proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.001
    assert abs(std_proj - 0.02 / (2 * m.config.n_layer) ** 0.5) < 0.001


def test_post_ln_differs_and_trains():
    torch.manual_seed(0)
    m = GPT(preset("tiny", norm="post"))
    idx = torch.randint(0, 50257, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    assert m.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_flops_per_token_matches_formula():
    c = preset("gpt2")
    with torch.device("meta"):
        m = GPT(c)
    assert m.flops_per_token() == 6 * m.num_params() + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("field,value", [("norm", "middle"), ("n_embd", 65), ("dropout", 1.5)])
def test_bad_config_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **{field: value})


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_dict({"n_layers": 3})


def test_sequence_longer_than_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="longer than the context"):
        tiny_model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("layout", ["cpu", "gpu"])
def test_chunked_head_loss_equals_the_full_logits_loss_and_gradients(autocast, layout, monkeypatch):
    import gpt2.lm_head_loss

    monkeypatch.setattr(gpt2.lm_head_loss, "chunk_tokens", lambda device, n_vocab: 5)  # several uneven chunks
    monkeypatch.setattr(gpt2.lm_head_loss, "vocab_block", lambda device, rows: 7000)  # a short last block
    if layout == "gpu":  # the GPU's way: padded rows multiplied too, their logits masked (the last block holds both)
        monkeypatch.setattr(gpt2.lm_head_loss, "head_rows", lambda device, n_vocab, padded: padded)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_pad_multiple=64))  # 50304 rows, 50257 in the softmax
    idx, targets = torch.randint(0, 50257, (2, 11)), torch.randint(0, 50257, (2, 11))
    targets[0, :3] = -100  # ignored positions

    def loss_and_grads(return_logits: bool, autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss = model(idx, targets, return_logits=return_logits)
        loss.backward()
        return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full_logits, full, full_grads = loss_and_grads(True, autocast)
    chunked_logits, chunked, chunked_grads = loss_and_grads(False, autocast)
    assert full_logits is not None and chunked_logits is None
    if autocast:
        # bf16 matmuls round partial sums in a different order, so the two bf16 results differ by about as much as
        # each differs from the fp32 gradient: the chunked one must be as close to fp32 as the plain one is.
        _, _, exact_grads = loss_and_grads(True, autocast=False)
        assert torch.allclose(chunked, full, rtol=1e-2)
        for name, exact_grad in exact_grads.items():
            error = lambda grads: ((grads[name] - exact_grad).norm() / exact_grad.norm()).item()  # noqa: E731
            assert error(chunked_grads) <= max(1.5 * error(full_grads), 1e-3), name
    else:
        assert torch.allclose(chunked, full, rtol=1e-4, atol=1e-6)
        for name, grad in full_grads.items():
            assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name
    assert not chunked_grads["transformer.wte.weight"][50257:].any()  # padded rows get no gradient
    with torch.no_grad():
        assert torch.allclose(model(idx, targets, return_logits=False)[1], model(idx, targets)[1], rtol=1e-5)
