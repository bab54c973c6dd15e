"""LoRA adapters in peft's format: peft and transformers load ours, we load peft's, with the same logits."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from gpt2 import GPT, preset
from gpt2.lora import (
    TARGETS,
    AdapterError,
    LoRAConfig,
    apply_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    read_adapter_config,
    save_adapters,
)

IDX = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDX)
    return out.logits if hasattr(out, "logits") else out[0]


def _random_(tensors, seed: int = 1) -> None:
    """Non-zero values in place, as after training: B starts at zero, which would make every adapter a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random checkpoint, which is also a Hugging Face GPT-2 directory."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "tiny"
    GPT(preset("tiny")).save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize(
    "cfg",
    [
        LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=TARGETS),
        LoRAConfig(rank=2, alpha=3.5, targets=("mlp.c_fc", "attn.c_attn"), layers=(1,)),  # peft's layers_to_transform
    ],
)
def test_peft_and_transformers_load_our_adapters_with_the_merged_logits(tmp_path, base_dir, cfg):
    model = apply_lora(GPT.from_pretrained(str(base_dir)), cfg).eval()
    _random_(lora_state_dict(model).values())
    save_adapters(model, tmp_path / "adapters", base_model=str(base_dir))
    merged = merge_lora(model)
    merged.save_pretrained(str(tmp_path / "merged"))
    expected = _logits(GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval())
    assert (expected - _logits(merged)).abs().max() < 1e-4
    assert (_logits(GPT2LMHeadModel.from_pretrained(base_dir)) - expected).abs().max() > 1e-2  # adapters matter

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(config["base_model_name_or_path"]),
                                           str(tmp_path / "adapters")).eval()  # fmt: skip
    assert (_logits(peft_model) - expected).abs().max() < 1e-4
    assert peft_model.peft_config["default"].r == cfg.rank and peft_model.peft_config["default"].lora_alpha == cfg.alpha
    adapted = {name.removesuffix(".lora_A") for name in lora_state_dict(model) if name.endswith("lora_A")}
    assert {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")
            } == adapted  # fmt: skip

    hf = GPT2LMHeadModel.from_pretrained(base_dir)
    hf.load_adapter(str(tmp_path / "adapters"))  # transformers' own adapter loading
    assert (_logits(hf.eval()) - expected).abs().max() < 1e-4


@pytest.mark.parametrize(
    "peft_options, expected_cfg",
    [
        # peft's default for GPT-2, alpha / r scaling; "c_proj" matches attn.c_proj and mlp.c_proj alike.
        (dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
         LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("attn.c_attn", "attn.c_proj", "mlp.c_proj"))),
        # rank-stabilised scaling alpha / sqrt(r), one block, dropout.
        (dict(r=4, lora_alpha=6, lora_dropout=0.1, use_rslora=True, target_modules=["c_fc"], layers_to_transform=[1]),
         LoRAConfig(rank=4, alpha=12, dropout=0.1, targets=("mlp.c_fc",), layers=(1,))),
    ],
)  # fmt: skip
def test_we_load_adapters_written_by_peft(tmp_path, base_dir, peft_options, expected_cfg):
    peft_config = LoraConfig(task_type="CAUSAL_LM", **peft_options)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(base_dir)), peft_config)
    _random_(p for name, p in peft_model.named_parameters() if "lora_" in name)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    expected = _logits(peft_model.eval())

    info = read_adapter_config(tmp_path / "peft")
    assert info.lora == expected_cfg and info.base_model == str(base_dir)
    ours = load_adapters(GPT.from_pretrained(info.base_model), tmp_path / "peft").eval()
    assert (_logits(ours) - expected).abs().max() < 1e-4
    assert (_logits(merge_lora(ours)) - expected).abs().max() < 1e-4
    assert (_logits(GPT.from_pretrained(str(base_dir))) - expected).abs().max() > 1e-2  # the adapters were loaded


def test_peft_options_we_cannot_compute_are_refused(tmp_path, base_dir):
    model = apply_lora(GPT.from_pretrained(str(base_dir)), LoRAConfig(rank=2))
    directory = tmp_path / "adapters"
    save_adapters(model, directory, base_model=str(base_dir))
    saved = json.loads((directory / "adapter_config.json").read_text())
    cases = [
        ({"use_dora": True}, r"not support: use_dora=True"),
        ({"alpha_pattern": {"c_attn": 4}, "bias": "all"}, r"alpha_pattern=\{'c_attn': 4\}, bias='all'"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'"),
        ({"peft_type": "IA3"}, r"peft_type 'IA3'; only LoRA"),
        ({"r": 3}, r"lora_A has shape \(2, 64\), this model needs \(3, 64\) for rank 3"),
        ({"layers_to_transform": [5]}, r"LoRA layers \[5\] do not exist"),
    ]
    for changes, message in cases:
        (directory / "adapter_config.json").write_text(json.dumps({**saved, **changes}))
        with pytest.raises(AdapterError, match=message):
            load_adapters(GPT.from_pretrained(str(base_dir)), directory)

    (directory / "adapter_config.json").write_text(json.dumps(saved))
    extra = {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)}  # our LoRA does not wrap the output layer
    tensors = {f"base_model.model.{n}.weight": t for n, t in lora_state_dict(model).items()}
    save_file({**tensors, **extra}, str(directory / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"unexpected \['lm_head\.lora_A'\]"):
        load_adapters(GPT.from_pretrained(str(base_dir)), directory)


def test_adapters_in_the_projects_earlier_format_still_load(tmp_path, base_dir):
    cfg = LoRAConfig(rank=2, targets=("attn.c_proj",))
    model = apply_lora(GPT.from_pretrained(str(base_dir)), cfg).eval()
    _random_(lora_state_dict(model).values())
    directory = tmp_path / "adapters"
    directory.mkdir()
    legacy = {"format_version": 1, "lora": cfg.to_dict(), "base_model": str(base_dir), "base_config": {}}
    (directory / "adapter_config.json").write_text(json.dumps(legacy))
    save_file({n: t.contiguous() for n, t in lora_state_dict(model).items()}, str(directory / "adapters.safetensors"))
    assert read_adapter_config(directory).lora == cfg
    assert torch.equal(_logits(load_adapters(GPT.from_pretrained(str(base_dir)), directory).eval()), _logits(model))
