import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from gpt2 import GPT, GPTConfig, preset
from gpt2.kv_cache import KVCache
from gpt2.prune import (
    attention_patterns,
    group_by_layer,
    head_importance,
    head_outputs,
    head_similarity,
    mask_heads,
    plan_pruning,
    prune_heads,
    redundant_heads,
)

HS = 16  # head size of the test models: n_embd 64 / 4 heads


def _model(seed: int = 0, **overrides) -> GPT:
    """A tiny 4-head model with sharper attention and larger head outputs than at initialisation (where every head
    attends almost uniformly and adds almost nothing), so heads differ and removing one shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(preset("tiny", n_head=4, **overrides)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(6)
            block.attn.c_proj.weight.mul_(10)
    return model


def _tokens(seed: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


# ------------------------------------------------------------------------------------------ config and model


def test_per_layer_head_counts_in_config():
    config = preset("tiny", n_head=4, n_head_per_layer=[3, 1])  # a list, as config.json gives it
    assert config.n_head_per_layer == (3, 1)
    assert [config.heads_in_layer(layer) for layer in range(2)] == [3, 1]
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert preset("tiny", n_head_per_layer=(2, 2)).n_head_per_layer is None  # nothing pruned has one spelling
    assert preset("tiny").heads_in_layer(1) == 2
    with pytest.raises(IndexError, match="layer 2 does not exist"):
        config.heads_in_layer(2)


@pytest.mark.parametrize("bad", [(1,), (2, 0), (2, 5), 3, (2.0, 1)])
def test_bad_head_counts_are_named(bad):
    with pytest.raises(ValueError, match="n_head_per_layer"):
        preset("tiny", n_head=4, n_head_per_layer=bad)


def test_kv_cache_and_flops_follow_the_head_counts():
    pruned = prune_heads(_model(), {0: [0, 1, 2]})
    cache = pruned.new_kv_cache(2, 32)
    assert [k.shape for k in cache.k] == [(2, 1, 33, HS), (2, 4, 33, HS)]  # 32 positions and the scratch slot
    with pytest.raises(ValueError, match="3 per-layer entries for 2 layers"):
        KVCache(2, 1, [1, 2, 3], 8, HS)
    assert pruned.flops_per_token(128) == 6 * pruned.num_params() + 12 * (1 + 4) * HS * 128


# ------------------------------------------------------------------------------------------ pruning


@pytest.mark.parametrize("overrides", [{}, {"norm": "post"}, {"bias": False, "vocab_pad_multiple": 64}])
def test_pruned_logits_equal_masked_logits(overrides):
    model = _model(**overrides)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    plan = {0: [1, 3], 1: [0, 1, 2]}
    pruned, masked = prune_heads(model, plan), mask_heads(model, plan)
    assert pruned.config.n_head_per_layer == (2, 1)
    attn = pruned.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (3 * 2 * HS, 64) and attn.c_proj.weight.shape == (64, 2 * HS)
    per_head = 4 * 64 * HS + (3 * HS if model.config.bias else 0)  # q, k, v rows and c_proj columns (+ biases)
    assert model.num_params() - pruned.num_params() == 5 * per_head
    idx = _tokens(0)
    expected = _logits(masked, idx)
    assert torch.allclose(_logits(pruned, idx), expected, atol=1e-5)
    assert not torch.allclose(_logits(model, idx), expected, atol=1e-2)  # the removed heads mattered
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert torch.equal(torch.get_rng_state(), rng)  # building the pruned model drew no random numbers


def test_pruning_no_heads_changes_nothing():
    model = _model()
    idx = _tokens(1)
    for plan in ({}, {1: []}):
        same = prune_heads(model, plan)
        assert same.config == model.config and same.config.n_head_per_layer is None
        assert same.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(same.state_dict()[k], v) for k, v in model.state_dict().items())
        assert torch.equal(_logits(same, idx), _logits(model, idx))
        assert torch.equal(_logits(mask_heads(model, plan), idx), _logits(model, idx))


def test_head_indices_refer_to_the_current_model():
    model = _model()
    # After dropping head 0 of layer 0 its heads 1, 2, 3 are renumbered 0, 1, 2: the second step's "1" is head 2.
    twice = prune_heads(prune_heads(model, {0: [0]}), {0: [1], 1: [3]})
    once = prune_heads(model, {0: [0, 2], 1: [3]})
    assert twice.config == once.config
    assert all(torch.equal(twice.state_dict()[k], v) for k, v in once.state_dict().items())


@pytest.mark.parametrize(
    "plan,message",
    [
        ({2: [0]}, "layer 2 does not exist"),
        ({-1: [0]}, "layer -1 does not exist"),
        ({"0": [0]}, "layer '0' does not exist"),
        ({0: [4]}, r"layer 0 has heads 0..3; there is no head \[4\]"),
        ({0: [1, 1]}, "listed twice"),
    ],
)
def test_bad_plans_are_named(plan, message):
    model = _model()
    for apply in (prune_heads, mask_heads):
        with pytest.raises(ValueError, match=message):
            apply(model, plan)


def test_a_layer_keeps_its_minimum_of_heads():
    model = _model()
    with pytest.raises(ValueError, match="pruning 4 of the 4 heads of layer 1 leaves 0, fewer than min_heads_per_layer=1"):
        prune_heads(model, {1: [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="min_heads_per_layer=3"):
        prune_heads(model, {0: [0, 1]}, min_heads_per_layer=3)
    with pytest.raises(ValueError, match="min_heads_per_layer must be >= 1"):
        prune_heads(model, {0: [0]}, min_heads_per_layer=0)
    # The masked reference may silence a whole layer: its attention then adds only c_proj's bias.
    silent = mask_heads(model, {1: [0, 1, 2, 3]})
    assert torch.count_nonzero(silent.transformer.h[1].attn.c_proj.weight) == 0


def _greedy_full_recompute(model: GPT, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    for _ in range(n):
        nxt = int(_logits(model, idx)[0, -1].argmax())
        idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    return idx[0, len(prompt) :].tolist()


def test_pruned_model_saves_loads_and_generates(tmp_path):
    pruned = prune_heads(_model(), {0: [0, 2], 1: [1]})
    pruned.save_pretrained(str(tmp_path / "pruned"))
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["gpt2_project"]["n_head_per_layer"] == [2, 3]
    back = GPT.from_pretrained(str(tmp_path / "pruned"))
    assert back.config == pruned.config
    idx = _tokens(2)
    assert torch.equal(_logits(back, idx), _logits(pruned, idx))
    prompt = _tokens(3, 1, 7)[0].tolist()
    assert back.generate([prompt], 12, temperature=0, stop_at_eot=False)[0] == _greedy_full_recompute(back, prompt, 12)
    prompts = [_tokens(seed, 1, n)[0].tolist() for seed, n in ((4, 3), (5, 9))]
    batched = back.generate(prompts, 8, temperature=0, stop_at_eot=False)
    assert batched == [back.generate([p], 8, temperature=0, stop_at_eot=False)[0] for p in prompts]


def test_transformers_refuses_a_pruned_checkpoint(tmp_path):
    # transformers 5.x removed `pruned_heads`: its GPT-2 has n_head heads in every layer, so it must not load this.
    prune_heads(_model(), {0: [1]}).save_pretrained(str(tmp_path / "pruned"))
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["model_type"] == "gpt2-pruned-heads" and saved["architectures"] == ["GPT2PrunedHeadsLMHeadModel"]
    with pytest.raises(ValueError, match="gpt2-pruned-heads"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    with pytest.raises(RuntimeError):  # the shapes of layer 0's attention do not fit
        GPT2LMHeadModel.from_pretrained(tmp_path / "pruned")


# ------------------------------------------------------------------------------------------ analysis


@pytest.mark.parametrize("plan", [{}, {0: [0, 3]}])
def test_patterns_and_head_outputs_reproduce_the_attention_layer(plan):
    model = prune_heads(_model(norm="post"), plan)
    idx = _tokens(6, 2, 12)
    layer_outputs = {}
    hooks = [
        block.attn.register_forward_hook(lambda _m, _args, out, layer=layer: layer_outputs.__setitem__(layer, out))
        for layer, block in enumerate(model.transformer.h)
    ]
    _logits(model, idx)
    for hook in hooks:
        hook.remove()
    for layer, (probs, outputs) in enumerate(zip(attention_patterns(model, idx), head_outputs(model, idx))):
        nh = model.config.heads_in_layer(layer)
        assert probs.shape == (2, nh, 12, 12) and outputs.shape == (2, nh, 12, 64)
        assert torch.allclose(probs.sum(dim=-1), torch.ones(2, nh, 12))
        assert torch.count_nonzero(probs.triu(diagonal=1)) == 0  # causal: nothing from the future
        bias = model.transformer.h[layer].attn.c_proj.bias
        assert torch.allclose(outputs.sum(dim=1) + bias, layer_outputs[layer], atol=1e-5)


def test_a_duplicated_head_is_the_most_redundant():
    model = _model()
    attn = model.transformer.h[1].attn
    with torch.no_grad():  # head 3 of layer 1 becomes a copy of head 0: same queries, keys, values and projection
        for part in range(3):
            rows = slice(part * 64, (part + 1) * 64)
            attn.c_attn.weight[rows][3 * HS : 4 * HS] = attn.c_attn.weight[rows][:HS]
            attn.c_attn.bias[rows][3 * HS : 4 * HS] = attn.c_attn.bias[rows][:HS]
        attn.c_proj.weight[:, 3 * HS :] = attn.c_proj.weight[:, :HS]
    a, b = _tokens(7), _tokens(8, 3, 16)
    similarity = head_similarity(model, [a, (b, b)])  # tokens alone or (inputs, targets) batches
    for matrix in similarity.patterns + similarity.outputs:
        assert matrix.shape == (4, 4) and torch.allclose(matrix, matrix.T)
        assert torch.allclose(matrix.diagonal(), torch.ones(4)) and matrix.abs().max() <= 1 + 1e-5
    assert similarity.patterns[1][0, 3] > 0.9999 and similarity.outputs[1][0, 3] > 0.9999
    first, second = redundant_heads(similarity.outputs, 2)
    assert (first.layer, {first.head, first.twin}) == (1, {0, 3}) and first.similarity > 0.9999
    assert second.similarity < 0.99  # no other pair is a copy
    # One long vector per head over all tokens: the split into batches does not matter.
    whole = head_similarity(model, [torch.cat([a, b])])
    pairs = zip(whole.patterns + whole.outputs, similarity.patterns + similarity.outputs)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in pairs)


def test_redundant_heads_greedy_keeps_a_head_per_layer():
    g = torch.Generator().manual_seed(0)
    similarity = []
    for _ in range(2):
        m = torch.rand(4, 4, generator=g)
        similarity.append(((m + m.T) / 2).fill_diagonal_(1.0))
    dropped = redundant_heads(similarity, 6)
    assert [d.similarity for d in dropped] == sorted((d.similarity for d in dropped), reverse=True)
    gone: set[tuple[int, int]] = set()
    for d in dropped:
        assert (d.layer, d.head) not in gone and (d.layer, d.twin) not in gone and d.head != d.twin
        assert d.similarity == pytest.approx(float(similarity[d.layer][d.head, d.twin]))
        gone.add((d.layer, d.head))
    plan = group_by_layer(dropped)
    assert sorted(plan) == [0, 1] and all(len(heads) == 3 for heads in plan.values())
    assert redundant_heads(similarity, 0) == []
    with pytest.raises(ValueError, match=r"k must be in \[0, 6\]"):
        redundant_heads(similarity, 7)


def _loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    # GPT.forward's loss is float32 whatever the model's dtype; a finite difference needs all of float64.
    logits = _logits(model, x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()


def test_head_importance_is_the_loss_gradient_for_a_head_gate():
    model = _model().double()  # float64 so a finite difference can check the gradient tightly
    x, y = _tokens(9), _tokens(10)
    raw = head_importance(model, [(x, y)], normalize=False)
    assert [s.shape for s in raw] == [(4,), (4,)]
    eps = 1e-5
    for layer, head in [(0, 1), (1, 2)]:
        scaled = []
        for factor in (1 + eps, 1 - eps):  # the gate ξ_h is a factor on the head's output, i.e. its c_proj columns
            copy_ = copy.deepcopy(model)
            with torch.no_grad():
                copy_.transformer.h[layer].attn.c_proj.weight[:, head * HS : (head + 1) * HS] *= factor
            scaled.append(_loss(copy_, x, y))
        assert raw[layer][head].item() == pytest.approx(abs(scaled[0] - scaled[1]) / (2 * eps), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # only the gates got gradients

    masked = mask_heads(model, {0: [2]})
    masked.train()
    scores = head_importance(masked, [(x, y), (y, x)])
    assert masked.training  # the mode is restored
    assert scores[0][2] == 0 and bool((scores[0][[0, 1, 3]] > 0).all())  # a silenced head cannot matter
    assert all(s.norm().item() == pytest.approx(1.0) for s in scores)  # normalised per layer


def test_plan_prunes_the_least_important_heads_over_all_layers():
    scores = [torch.tensor([0.9, 0.1, 0.5, 0.3]), torch.tensor([0.2, 0.8, 0.05, 0.7])]
    assert plan_pruning(scores, 0.0) == {}
    assert plan_pruning(scores, 0.25) == {0: [1], 1: [2]}  # 0.05 and 0.1
    assert plan_pruning(scores, 0.3) == {0: [1], 1: [2]}  # 2.4 heads: never more than asked
    assert plan_pruning(scores, 0.5) == {0: [1, 3], 1: [0, 2]}
    lopsided = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.9, 0.8, 0.7, 0.6])]
    assert plan_pruning(lopsided, 0.5, min_heads_per_layer=2) == {0: [0, 1], 1: [2, 3]}
    pruned = prune_heads(_model(), plan_pruning(scores, 0.5))
    assert pruned.config.n_head_per_layer == (2, 2)


@pytest.mark.parametrize(
    "fraction,min_heads,message",
    [
        (-0.1, 1, r"fraction must be in \[0, 1\), got -0.1"),
        (1.0, 1, r"fraction must be in \[0, 1\), got 1.0"),
        (0.5, 0, "min_heads_per_layer must be >= 1"),
        (0.9, 2, "fraction 0.9 asks for 7 of 8 heads, but only 4 can go"),
    ],
)
def test_bad_plan_options_are_named(fraction, min_heads, message):
    scores = [torch.rand(4), torch.rand(4)]
    with pytest.raises(ValueError, match=message):
        plan_pruning(scores, fraction, min_heads_per_layer=min_heads)
