import math

import pytest
import torch

from gpt2 import GPT, preset
from gpt2.train import TrainConfig, evaluate_loss, lr_at, make_optimizer, rng_state, set_rng_state, train_step


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(preset("tiny"))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # tied weights once, nothing missed


def test_grad_accum_arithmetic_and_error():
    cfg = TrainConfig(total_batch_tokens=524_288, micro_batch=64, seq_len=1024)
    assert cfg.grad_accum_steps(8) == 1 and cfg.grad_accum_steps(2) == 4
    with pytest.raises(ValueError, match="not divisible by micro_batch × seq_len × workers = 48 × 1024 × 8"):
        TrainConfig(micro_batch=48).grad_accum_steps(8)


def _batches(n, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 50257, (n, B, T + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def test_two_accumulation_steps_equal_one_double_batch():
    cfg = TrainConfig(total_batch_tokens=4 * 16, micro_batch=2, seq_len=16, max_lr=1e-3, warmup_steps=1, max_steps=5)
    a, b = _batches(2, 2, 16)
    torch.manual_seed(0)
    m1 = GPT(preset("tiny"))
    m2 = GPT(preset("tiny"))
    m2.load_state_dict(m1.state_dict())
    o1, o2 = make_optimizer(m1, cfg, "cpu"), make_optimizer(m2, cfg, "cpu")
    s1 = train_step(m1, o1, iter([a, b]), 0, cfg, accum_steps=2, device=torch.device("cpu"))
    big = (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    s2 = train_step(m2, o2, iter([big]), 0, cfg, accum_steps=1, device=torch.device("cpu"))
    assert s1.loss == pytest.approx(s2.loss, abs=1e-5)
    assert s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-4)
    assert s1.tokens == 4 * 16


def test_loss_goes_down_on_repeated_batch():
    cfg = TrainConfig(total_batch_tokens=64, micro_batch=2, seq_len=32, max_lr=3e-3, warmup_steps=2, max_steps=30)
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    opt = make_optimizer(model, cfg, "cpu")
    batch = _batches(1, 2, 32)[0]
    losses = [train_step(model, opt, iter([batch]), s, cfg, 1, device=torch.device("cpu")).loss for s in range(30)]
    assert losses[-1] < losses[0] - 3
    assert evaluate_loss(model, iter([batch]), 1, device=torch.device("cpu")) < losses[0] - 3
    assert math.isfinite(losses[-1])


def test_rng_state_round_trip_survives_weights_only_load(tmp_path):
    torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    expected = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    again = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
