import csv

import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.early_exit import EarlyExitGPT
from gpt2.profile_layers import profile_layers, write_csv

CONFIG = GPTConfig(vocab_size=512, block_size=64, n_layer=3, n_head=2, n_embd=32)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once


def _check_sums(profile) -> None:
    for phase in ("prefill", "decode"):
        rows = profile.phase_rows(phase)
        summed, total = sum(r.seconds for r in rows), profile.forward_seconds[phase]
        # The rows span the forward from its pre-hook to its post-hook; the call around it adds only a little.
        assert 0.7 * total < summed <= total, (phase, summed, total)
        assert sum(r.fraction for r in rows) == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_gpt_profile_has_one_row_per_component_and_sane_totals(norm, tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG.replace(norm=norm))
    profile = profile_layers(model, batch_size=2, prompt_len=16, decode_steps=4, repeats=2)
    names = ["embedding", "block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp", "block.2.attn", "block.2.mlp",
             "ln_f+head"]
    for phase, calls in (("prefill", 2), ("decode", 8)):
        rows = profile.phase_rows(phase)
        assert [r.component for r in rows] == names
        assert all(r.calls == calls and r.seconds > 0 for r in rows)
        assert [r.layer for r in rows] == [None, 0, 0, 1, 1, 2, 2, None]
        assert sum(r.param_bytes for r in rows) == _param_bytes(model)
        assert all(r.device_allocated_bytes is None for r in rows)  # CPU: no allocator statistics
    _check_sums(profile)
    # Activation bytes: prefill outputs grow with the prompt; a block's MLP outputs ln_2 (C), c_fc (4C), c_proj (C).
    prefill_mlp = profile.phase_rows("prefill")[2].activation_bytes
    assert prefill_mlp == 2 * 16 * (32 + 4 * 32 + 32) * 4
    assert profile.phase_rows("decode")[2].activation_bytes == prefill_mlp / 16
    # GPT.forward applies ln_f to every position and the head to the last one only.
    assert profile.phase_rows("prefill")[-1].activation_bytes == 2 * (16 * 32 + 512) * 4

    path = write_csv(profile.rows, tmp_path / "out" / "layers.csv")
    with open(path) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 16 and lines[0]["component"] == "embedding" and lines[0]["layer"] == ""
    assert float(lines[1]["seconds"]) == profile.rows[1].seconds
    assert model.training  # restored


def test_early_exit_profile_shows_skipped_blocks_and_kv_projection():
    torch.manual_seed(0)
    model = EarlyExitGPT(GPT(CONFIG), exit_layer=2).eval()
    exits = profile_layers(model, prompt_len=8, decode_steps=3, repeats=2, forward_kwargs={"threshold": 0.0})
    decode = {r.component: r for r in exits.phase_rows("decode")}
    assert list(decode) == ["embedding", "block.0.attn", "block.0.mlp", "block.1.attn", "block.1.mlp",
                            "exit.classifier", "block.2.attn", "block.2.mlp", "exit.kv_projection", "ln_f+head"]
    assert decode["block.2.mlp"].calls == 0 and decode["block.2.mlp"].seconds == 0  # every token stopped early
    assert decode["exit.kv_projection"].calls == 6 and decode["exit.classifier"].calls == 6
    assert sum(r.param_bytes for r in exits.phase_rows("decode")) == _param_bytes(model)
    _check_sums(exits)

    never = profile_layers(model, prompt_len=8, decode_steps=3, repeats=2, forward_kwargs={"threshold": 2.0})
    decode = {r.component: r for r in never.phase_rows("decode")}
    assert decode["block.2.mlp"].calls == 6 and decode["exit.kv_projection"].calls == 0
    _check_sums(never)


def test_bad_arguments():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        profile_layers(model, prompt_len=60, decode_steps=10)
    with pytest.raises(ValueError, match="must be >= 1"):
        profile_layers(model, repeats=0)
