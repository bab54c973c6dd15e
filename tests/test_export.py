"""jobs/export.py: a directory the Hugging Face Hub takes as it is, which transformers loads offline, with a card
whose YAML header parses and carries the measured metrics."""

import subprocess
import sys

import pytest
import torch
import yaml

from gpt2 import GPT, preset
from gpt2.model_card import split_front_matter, write_model_card
from tests.job_loader import ROOT


def _export(source, target, *extra):
    out = subprocess.run([sys.executable, str(ROOT / "jobs/export.py"), "--model", str(source), "--to", str(target),
                          *extra], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _header(directory):
    header, body = split_front_matter((directory / "README.md").read_text())
    return yaml.safe_load(header), body


def test_export_loads_in_transformers_offline_with_the_hub_metadata(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    model.save_pretrained(tmp_path / "run")
    write_model_card(tmp_path / "run", params=model.num_params(), training={"steps": 10},
                     evaluation={"val_loss": 5.25, "hellaswag_acc_norm": 0.3125}, name="tiny-run")
    _export(tmp_path / "run", tmp_path / "hub", "--license", "apache-2.0", "--dataset", "HuggingFaceFW/fineweb-edu")

    hub = tmp_path / "hub"
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", "README.md"} <= {p.name for p in hub.iterdir()}
    meta, body = _header(hub)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    metrics = {m["type"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {"val_loss": 5.25, "accuracy": 0.3125} and "# tiny-run" in body
    assert meta["model-index"][0]["name"] == "hub"  # the exported name (--name, else the directory's)

    hf = transformers.GPT2LMHeadModel.from_pretrained(hub, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hub, local_files_only=True)
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert ids.tolist() == [[15496, 995]]
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[0][..., : model.config.vocab_size], atol=1e-5)


def test_a_model_transformers_cannot_run_says_it_needs_this_project(tmp_path):
    torch.manual_seed(0)
    GPT(preset("tiny", norm="post")).save_pretrained(tmp_path / "post")  # no card of its own: one is written
    _export(tmp_path / "post", tmp_path / "hub")
    meta, body = _header(tmp_path / "hub")
    assert "library_name" not in meta and "needs-gpt2-on-ray" in meta["tags"] and meta["license"] == "mit"
    assert "cannot load this model" in body
    assert GPT.from_pretrained(str(tmp_path / "hub")).config.norm == "post"


def test_a_source_that_is_not_a_model_is_named_in_the_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "jobs/export.py"), "--model", str(tmp_path / "missing"),
                          "--to", str(tmp_path / "hub")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"cannot load --model {tmp_path / 'missing'}" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "hub").exists()


def test_a_target_that_holds_something_else_is_refused_untouched(tmp_path):
    GPT(preset("tiny")).save_pretrained(tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    out = subprocess.run([sys.executable, str(ROOT / "jobs/export.py"), "--model", str(tmp_path / "run"),
                          "--to", str(tmp_path / "mine")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and f"cannot write --to {tmp_path / 'mine'}" in out.stderr, out.stderr[-2000:]
    assert "no config.json" in out.stderr and "Traceback" not in out.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
    _export(tmp_path / "run", tmp_path / "hub")
    _export(tmp_path / "run", tmp_path / "hub")  # an earlier export is a model: replaced
