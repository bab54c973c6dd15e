"""LoRA: frozen base, trainable fraction, training, saved adapters, merging into a checkpoint transformers loads."""

import copy
import json
import os

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2 import GPT, preset
from gpt2.checkpoint import save_pretrained
from gpt2.lora import (
    TARGETS,
    AdapterError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_modules,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapters,
    trainable_fraction,
)
from gpt2.train import TrainConfig, make_optimizer, train_step

IDX = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))


def _base(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", **overrides)).eval()


def _logits(model, idx=IDX):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def _randomize_adapters(model, seed=1):
    """Non-zero B (and A) as after training, so comparisons exercise the update, not just the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def trained_lora():
    """A tiny LoRA model after a few optimizer steps on a fixed batch, with the base weights from before.

    The batch cycles through 8 tokens, so it is learnable. The base is random and frozen, its tied output layer
    included, which bounds how sharp the logits can get: the loss cannot fall far below ~9.5 here.
    """
    model = _base(dropout=0.0)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=TARGETS))
    cfg = TrainConfig(max_lr=1e-2, min_lr=1e-2, warmup_steps=1, max_steps=12, weight_decay=0.1, autocast="fp32")
    optimizer = make_optimizer(model, cfg, "cpu")
    vocab = torch.randint(0, 50257, (8,), generator=torch.Generator().manual_seed(2))
    x = vocab[torch.arange(4 * 33).reshape(4, 33) % 8]  # (4, 33)
    batch = (x[:, :-1], x[:, 1:])
    losses = [
        train_step(model, optimizer, iter([batch]), step, cfg, 1, device=torch.device("cpu")).loss
        for step in range(cfg.max_steps)
    ]
    return model.eval(), base_state, optimizer, losses


def test_adapters_start_as_a_no_op_and_only_they_train():
    model = _base()
    before = _logits(model)
    apply_lora(model, LoRAConfig(rank=4, targets=("attn.c_attn", "mlp.c_fc")))
    assert torch.equal(_logits(model), before)  # B = 0: the wrapped model computes exactly what the base did
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(
        f"transformer.h.{i}.{t}.lora_{ab}" for i in range(2) for t in ("attn.c_attn", "mlp.c_fc") for ab in "AB"
    )
    assert not model.transformer.wte.weight.requires_grad and not model.transformer.ln_f.weight.requires_grad
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives
    assert set(lora_modules(model)) == {f"transformer.h.{i}.{t}" for i in range(2) for t in ("attn.c_attn", "mlp.c_fc")}
    base_names = set(_base().state_dict())
    assert set(model.state_dict()) - base_names == set(lora_state_dict(model))  # base names are unchanged


def test_trainable_fraction_on_gpt2_124m():
    def counts(cfg):
        with torch.device("meta"):  # the 124M shapes without allocating or initialising them
            model = GPT(preset("gpt2"))
        apply_lora(model, cfg)
        return count_parameters(model), trainable_fraction(model)

    # rank 8 on attn.c_attn of all 12 blocks: 12 × 8 × (768 + 2304) adapter weights, the LoRA-on-GPT-2 figure.
    (trainable, total), fraction = counts(LoRAConfig(rank=8))
    assert trainable == 12 * 8 * (768 + 3 * 768) == 294_912
    assert total == 124_439_808 + trainable  # GPT-2 124M (tied head counted once) plus the adapters
    assert round(100 * fraction, 4) == 0.2364
    (trainable, _), fraction = counts(LoRAConfig(rank=8, targets=TARGETS))
    assert trainable == 12 * 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert round(100 * fraction, 2) == 0.94
    (trainable, _), _ = counts(LoRAConfig(rank=8, layers=(10, 11)))
    assert trainable == 2 * 8 * (768 + 2304)


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(trained_lora):
    model, base_state, optimizer, losses = trained_lora
    assert losses[-1] < losses[0] - 0.8 and losses[-1] == min(losses), losses
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    state = model.state_dict()
    for name, tensor in base_state.items():
        assert torch.equal(state[name], tensor), f"{name} changed"
    assert all(t.abs().sum() > 0 for n, t in lora_state_dict(model).items() if n.endswith("lora_B"))


def test_merged_model_is_a_plain_gpt_with_the_same_logits(trained_lora):
    model = trained_lora[0]
    expected = _logits(model)  # eval mode: adapter dropout off
    merged = merge_lora(model)
    assert type(merged) is GPT and not lora_modules(merged)
    assert all(type(m) is not LoRALinear for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert torch.allclose(_logits(merged), expected, atol=1e-5)
    assert lora_modules(model)  # the LoRA model itself is unchanged
    base_only = _base()
    assert not torch.allclose(_logits(base_only), expected, atol=1e-3)  # the adapters did change the model


def test_merged_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, trained_lora):
    model = trained_lora[0]
    save_pretrained(merge_lora(model), tmp_path / "merged")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert (_logits(hf) - _logits(model)).abs().max() < 1e-4
    ours = GPT.from_pretrained(str(tmp_path / "merged"))
    assert (_logits(ours) - _logits(model)).abs().max() < 1e-5


def test_adapters_round_trip_to_identical_logits(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=4, targets=("attn.c_attn", "mlp.c_proj"), layers=(1,))
    model = _randomize_adapters(apply_lora(_base(), cfg))
    save_adapters(model, tmp_path / "adapters", base_model="runs/pretrain/ckpt")
    save_adapters(model, tmp_path / "adapters", base_model="runs/pretrain/ckpt")  # replaces the directory
    assert sorted(os.listdir(tmp_path)) == ["adapters"]  # no temporary directory left
    assert sorted(os.listdir(tmp_path / "adapters")) == ["adapter_config.json", "adapter_model.safetensors"]
    info = read_adapter_config(tmp_path / "adapters")
    assert (info.lora, info.base_model) == (cfg, "runs/pretrain/ckpt")

    fresh = load_adapters(_base(), tmp_path / "adapters")  # a plain base gets the saved LoRA config
    assert torch.equal(_logits(fresh), _logits(model))
    already = apply_lora(_base(), cfg)
    load_adapters(already, tmp_path / "adapters")
    assert torch.equal(_logits(already), _logits(model))


def test_adapter_loading_errors_name_the_problem_and_leave_the_model_alone(tmp_path):
    model = _randomize_adapters(apply_lora(_base(), LoRAConfig(rank=8)))
    directory = tmp_path / "adapters"
    save_adapters(model, directory, base_model="tiny-base")

    with pytest.raises(AdapterError, match="missing does not exist"):
        load_adapters(_base(), tmp_path / "missing")
    with pytest.raises(AdapterError, match=r"rank: saved 8, model 4"):
        load_adapters(apply_lora(_base(), LoRAConfig(rank=4)), directory)
    narrow = _base(n_embd=32)
    with pytest.raises(AdapterError, match=r"has shape \(8, 64\), this model needs \(8, 32\) .*'tiny-base'"):
        load_adapters(narrow, directory)
    assert not lora_modules(narrow)

    config = json.loads((directory / "adapter_config.json").read_text())
    config["r"] = 4  # the tensors say 8
    (directory / "adapter_config.json").write_text(json.dumps(config))
    wrong_rank = r"tensor transformer\.h\.0\.attn\.c_attn\.lora_A has shape \(8, 64\), this model needs \(4, 64\)"
    with pytest.raises(AdapterError, match=wrong_rank):
        load_adapters(_base(), directory)
    (directory / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: cannot read"):
        load_adapters(_base(), directory)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        load_adapters(_base(), directory)
    (directory / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: invalid JSON"):
        load_adapters(_base(), directory)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": ("attn.q_proj",)}, r"targets \['attn.q_proj'\]: choose one or more of"),
        ({"targets": ()}, "choose one or more of"),
        ({"targets": ("mlp.c_fc", "mlp.c_fc")}, "name a projection twice"),
        ({"layers": (0, -1)}, "distinct non-negative block indices"),
    ],
)
def test_invalid_lora_configs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**fields)


def test_config_from_yaml_lists_and_application_errors():
    cfg = LoRAConfig.from_dict({"rank": 2, "targets": ["mlp.c_fc"], "layers": [0]})
    assert cfg.targets == ("mlp.c_fc",) and cfg.layers == (0,) and cfg.scaling == 8.0
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['r'\]"):
        LoRAConfig.from_dict({"r": 8})
    with pytest.raises(ValueError, match=r"LoRA layers \[2, 5\] do not exist: the model has blocks 0\.\.1"):
        apply_lora(_base(), LoRAConfig(layers=(0, 2, 5)))
    model = apply_lora(_base(), cfg)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, cfg)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(_base())


def test_adapter_dropout_is_active_in_training_only():
    model = _randomize_adapters(apply_lora(_base(), LoRAConfig(rank=4, dropout=0.5)))
    merged = merge_lora(copy.deepcopy(model))
    assert torch.allclose(_logits(model), _logits(merged), atol=1e-5)
    model.train()
    assert not torch.allclose(_logits(model), _logits(merged), atol=1e-3)
