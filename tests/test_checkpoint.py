import json
import os
import subprocess

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2.checkpoint as checkpoint
from gpt2 import GPT, preset
from gpt2.checkpoint import CheckpointError, save_pretrained


def _hf_model(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2, **kw)
    return GPT2LMHeadModel(cfg).eval()


def _logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def test_load_transformers_directory(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 50257, (2, 20))
    assert torch.allclose(_logits(ours, idx), _logits(hf, idx), atol=1e-4)


def test_load_pytorch_model_bin(tmp_path):
    hf = _hf_model()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 50257, (1, 12))
    assert torch.allclose(_logits(ours, idx), _logits(hf, idx), atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"vocab_pad_multiple": 64}, {"bias": False}, {"tie_embeddings": False}])
def test_save_loads_in_transformers_with_same_logits(tmp_path, overrides):
    torch.manual_seed(1)
    ours = GPT(preset("tiny", **overrides)).eval()
    ours.save_pretrained(str(tmp_path / "ckpt"))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    idx = torch.randint(0, 50257, (2, 20))
    assert torch.allclose(_logits(ours, idx), _logits(hf, idx), atol=1e-4)
    back = GPT.from_pretrained(str(tmp_path / "ckpt"))
    assert back.config == ours.config
    assert torch.equal(_logits(back, idx), _logits(ours, idx))


def test_post_ln_round_trip_and_marked_for_transformers(tmp_path):
    torch.manual_seed(2)
    ours = GPT(preset("tiny", norm="post", vocab_pad_multiple=64)).eval()
    ours.save_pretrained(str(tmp_path / "post"))
    cfg = json.loads((tmp_path / "post" / "config.json").read_text())
    assert cfg["model_type"] != "gpt2"  # transformers has no Post-LN GPT-2: it must not run it as Pre-LN
    back = GPT.from_pretrained(str(tmp_path / "post"))
    idx = torch.randint(0, 50257, (1, 10))
    assert back.config.norm == "post"
    assert torch.equal(_logits(back, idx), _logits(ours, idx))


def test_save_is_atomic_when_interrupted(tmp_path, tiny_model):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(target))
    before = (target / "model.safetensors").read_bytes()

    def crash(_tmp):
        raise KeyboardInterrupt("simulated crash mid-save")

    other = GPT(preset("tiny", n_layer=1))
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(other, target, extra=crash)
    assert (target / "model.safetensors").read_bytes() == before
    assert GPT.from_pretrained(str(target)).config.n_layer == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp directory left behind


def test_saving_over_a_checkpoint_without_an_atomic_exchange_leaves_only_the_new_one(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # as on macOS, or a filesystem without it
    target = tmp_path / "ckpt"
    GPT(preset("tiny", n_layer=1)).save_pretrained(str(target))
    tiny_model.save_pretrained(str(target))
    assert GPT.from_pretrained(str(target)).config.n_layer == 2
    assert os.listdir(tmp_path) == ["ckpt"]


def test_save_refuses_to_replace_a_file_or_a_folder_that_holds_no_model(tmp_path, tiny_model):
    """A checkpoint replaces its directory as a whole: a path that holds something else is refused, untouched."""
    from gpt2.lora import LoRAConfig, apply_lora, save_adapters

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "train.py").write_text("keep")
    with pytest.raises(CheckpointError, match=f"{a_file} exists and is not a folder"):
        tiny_model.save_pretrained(str(a_file))
    with pytest.raises(CheckpointError, match=f"{folder} is a folder with other contents \\(no config.json\\)"):
        tiny_model.save_pretrained(str(folder))
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        save_adapters(apply_lora(GPT(preset("tiny")), LoRAConfig(rank=2)), folder)
    assert a_file.read_text() == "keep" and [p.name for p in folder.iterdir()] == ["train.py"]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "project"]  # nothing written beside them either

    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_model.save_pretrained(str(empty))  # an empty folder, or a model's (above: every overwrite test), is fine
    assert GPT.from_pretrained(str(empty)).config.n_layer == tiny_model.config.n_layer


def ended_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def same_weights(a: GPT, b: GPT) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("writer", ["ended", "unrecorded"])
def test_a_checkpoint_left_renamed_aside_by_a_killed_writer_is_restored(tmp_path, tiny_model, writer):
    """The state a writer killed between its two renames leaves (on a system without an atomic exchange): the
    previous checkpoint under its aside name, the new one half-written, nothing at the path. "unrecorded" is the
    name a writer used before host and pid were part of it."""
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(target))
    tag = f"{checkpoint._host()}-{ended_pid()}-" if writer == "ended" else ""
    target.rename(tmp_path / f".ckpt.old-{tag}0123abcd")
    half_written = tmp_path / f".ckpt.tmp-{tag}4567abcd"
    half_written.mkdir()
    (half_written / "config.json").write_text("{")
    assert same_weights(GPT.from_pretrained(str(target)), tiny_model)
    assert sorted(os.listdir(tmp_path)) == (["ckpt"] if writer == "ended" else [half_written.name, "ckpt"])
    tiny_model.save_pretrained(str(target))  # the next save goes on from there
    assert same_weights(GPT.from_pretrained(str(target)), tiny_model)


def test_only_the_leftovers_of_writers_that_have_ended_here_are_deleted(tmp_path, tiny_model):
    target = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(target))
    host, ended = checkpoint._host(), ended_pid()
    kept = [f".ckpt.tmp-{host}-{os.getpid()}-00000001", f".ckpt.old-other-host-{ended}-00000002", ".ckpt.tmp-x"]
    for name in [*kept, f".ckpt.tmp-{host}-{ended}-00000003", f".ckpt.old-{host}-{ended}-00000004"]:
        (tmp_path / name).mkdir()
    tiny_model.save_pretrained(str(target))
    # A live writer's (here this process's) and one on another host sharing the folder may still be writing; the
    # last name is no leftover of this format at all.
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, "ckpt"])


def test_extra_files_land_with_the_checkpoint(tmp_path, tiny_model):
    tiny_model.save_pretrained(str(tmp_path / "c"), extra=lambda d: (d / "trainer_state.pt").write_bytes(b"x"))
    assert (tmp_path / "c" / "trainer_state.pt").read_bytes() == b"x"


def test_corrupt_and_missing_files_give_clear_errors(tmp_path, tiny_model):
    d = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(d))
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.from_pretrained(str(d))
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        GPT.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(str(d))
    with pytest.raises(CheckpointError, match="does not exist"):
        GPT.from_pretrained(str(tmp_path / "nowhere" / "deeper"))


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_model):
    d = tmp_path / "ckpt"
    tiny_model.save_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_positions"] = 64  # the weights have 128 positions
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="transformer.wpe.weight"):
        GPT.from_pretrained(str(d))


def test_a_name_is_a_hub_name_unless_a_local_folder_makes_it_a_path(tmp_path, monkeypatch):
    """openai-community/gpt2 (the hub's own name for GPT-2) is a hub name and is not refused as a missing folder
    when a job checks its model.source; runs/final, with ./runs a folder, is a local model that does not exist
    (named as such, where it was a hub download of the organisation "runs")."""
    from cluster.config.sections import check_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert checkpoint.hub_like("gpt2") and checkpoint.hub_like("openai-community/gpt2")
    for path in ("runs/final", "runs/pretrain/final", "./gpt2", "/models/gpt2", "~/gpt2"):
        assert not checkpoint.hub_like(path), path
    with pytest.raises(CheckpointError, match="model directory runs/final does not exist"):
        GPT.from_pretrained("runs/final")
    check_model_source("openai-community/gpt2")
    with pytest.raises(ValueError, match="model.source: runs/final does not exist"):
        check_model_source("runs/final")


def test_hub_name_without_network_or_cache_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="huggingface-cli download openai-community/gpt2"):
        GPT.from_pretrained("gpt2")
