"""The training checkpoint without Ray: a resumed loop takes exactly the steps an uninterrupted one takes."""

from __future__ import annotations

import torch

from gpt2 import GPT, preset
from gpt2.data import ShardedTokenLoader
from gpt2.train import TrainConfig, make_optimizer, seed_everything, train_step
from gpt2.train_checkpoint import (
    TRAINER_STATE,
    is_due,
    load_training_checkpoint,
    save_training_checkpoint,
    worker_state_file,
)
from tests.pretrain_fixtures import write_python_docs_shards

CPU = torch.device("cpu")
CFG = TrainConfig(max_steps=6, warmup_steps=2, max_lr=1e-2, micro_batch=2, seq_len=32, total_batch_tokens=64)


def setup(shards):
    seed_everything(0)
    model = GPT(preset("tiny", block_size=64))
    return model, make_optimizer(model, CFG, "cpu"), ShardedTokenLoader(shards, 2, 32, split="train", seed=0)


def test_save_then_load_continues_bit_for_bit(tmp_path):
    shards = write_python_docs_shards(tmp_path / "shards", n_docs=40)
    model, opt, loader = setup(shards)
    batches = iter(loader)
    straight = [train_step(model, opt, batches, s, CFG, 1, device=CPU).loss for s in range(6)]

    model, opt, loader = setup(shards)
    batches = iter(loader)
    first = [train_step(model, opt, batches, s, CFG, 1, device=CPU).loss for s in range(3)]
    ckpt = save_training_checkpoint(model, opt, loader, 0, {"step": 3}, tmp_path)
    assert {TRAINER_STATE, worker_state_file(0), "config.json", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}

    model, opt, loader = setup(shards)
    state = load_training_checkpoint(ckpt, model, opt, loader, 0)
    batches = iter(loader)
    rest = [train_step(model, opt, batches, s, CFG, 1, device=CPU).loss for s in range(state["step"], 6)]
    assert first + rest == straight


def test_other_ranks_write_only_their_own_state(tmp_path, tiny_model):
    model = tiny_model
    shards = write_python_docs_shards(tmp_path / "shards", n_docs=40)
    loader = ShardedTokenLoader(shards, 2, 32, rank=1, world_size=2, split="train", seed=0)
    ckpt = save_training_checkpoint(model, make_optimizer(model, CFG, "cpu"), loader, 1, {"step": 1}, tmp_path)
    assert [p.name for p in ckpt.iterdir()] == [worker_state_file(1)]


def test_is_due_every_n_steps_and_after_the_last():
    assert [s for s in range(10) if is_due(s, 4, last=s == 9)] == [3, 7, 9]
    assert [s for s in range(10) if is_due(s, 0, last=s == 9)] == [9]
