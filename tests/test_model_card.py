"""Model cards: what they say, which loaders they promise, atomic writing, and the pretraining export's figures."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from cluster.train.pretrain import _card_fields
from gpt2 import GPT, preset
from gpt2.model_card import (
    CARD_FILE,
    loads_in_transformers,
    render_model_card,
    shards_description,
    split_front_matter,
    write_model_card,
)

TRAINING = {"data": "python-docs: 400,000 training tokens", "tokens_seen": 1_048_576, "optimizer_steps": 8}


def card(config, **overrides) -> str:
    fields = {"params": 123_456, "training": TRAINING, "evaluation": {"val_loss": 3.4567, "hellaswag_acc_norm": 0.3125}}
    return render_model_card(config, **(fields | overrides))


def test_card_describes_model_training_and_results_with_their_method():
    text = card(preset("tiny"), name="tiny-demo", methods={"val_loss": "cross-entropy on 4 validation batches"},
                recipe={"max_lr": 6e-4, "warmup_steps": 715})
    header, body = split_front_matter(text)
    assert yaml.safe_load(header)["library_name"] == "transformers" and body.startswith("\n# tiny-demo")
    for row in ("| parameters | 123,456 (123.5K;", "| layers | 2 |", "| attention heads | 2 |", "| embedding width | 64 |",
                "| context length | 128 tokens |", "| LayerNorm | Pre-LN (GPT-2) |",
                "| tokens seen | 1,048,576 (1.0M) |", "| optimizer steps | 8 |",
                "| max_lr | 0.0006 |", "| warmup_steps | 715 |",
                "| val_loss | 3.457 | cross-entropy on 4 validation batches |",
                "| hellaswag_acc_norm | 0.3125 | HellaSwag validation, completion-style"):
        assert row in text, row
    assert 'GPT.from_pretrained("path/to/this/directory")' in text
    assert 'GPT2LMHeadModel.from_pretrained("path/to/this/directory")' in text


@pytest.mark.parametrize("variant, words", [({"norm": "post"}, "Post-LN"), ({"n_head_per_layer": (1, 2)}, "head-pruned")])
def test_variants_transformers_cannot_load_are_not_promised_to_it(variant, words):
    config = preset("tiny", **variant)
    assert not loads_in_transformers(config)
    text = card(config)
    assert "GPT2LMHeadModel.from_pretrained" not in text and "library_name" not in text
    assert f"transformers` cannot load this model: it is {words}" in text
    assert 'GPT.from_pretrained("path/to/this/directory")' in text


def test_a_card_without_evaluation_says_so():
    assert "No evaluation was recorded for this model." in card(preset("tiny"), evaluation={})


def test_written_atomically_next_to_the_weights_and_readable_by_transformers(tmp_path, tiny_model):
    transformers = pytest.importorskip("transformers")
    tiny_model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / CARD_FILE).write_text("an old card")
    path = write_model_card(tmp_path / "model", params=tiny_model.num_params(), training=TRAINING,
                            evaluation={"val_loss": 2.5})  # the config is read from the directory
    assert path == tmp_path / "model" / CARD_FILE
    assert "| val_loss | 2.5 |" in path.read_text()
    # The card is written beside the weights and tokenizer files (no temporary file is left behind).
    assert {"README.md", "config.json", "model.safetensors", "vocab.json"} <= {p.name for p in path.parent.iterdir()}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model")  # the card's promise holds


def test_pretraining_export_card_reports_what_the_run_recorded(tmp_path, tiny_model):
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"source": {"spec": {"kind": "files", "inputs": ["notes/"]}},
                "shards": [{"file": "n_val_000000.bin", "split": "val", "tokens": 1000, "sha256": "0"},
                           {"file": "n_train_000001.bin", "split": "train", "tokens": 250_000, "sha256": "0"}]}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = load(PretrainConfig, None, ["model.preset=tiny", f"data.shards={shards}", "train.seq_len=32",
                                      "train.micro_batch=2", "train.total_batch_tokens=128", "eval.val_batches=4",
                                      "eval.hellaswag_limit=6", "run.name=card-test"])
    fields = _card_fields(tiny_model, cfg, str(shards), 40, {"val_loss": 4.25, "hellaswag_acc_norm": 0.5}, world=2)
    path = write_model_card(tmp_path, tiny_model.config, **fields)
    text = path.read_text()
    assert f"| data | files (notes/): 250,000 training tokens in {shards} |" in text
    assert "| tokens seen | 5,120 (5.1K) |" in text  # 40 steps × 128 tokens
    assert "| val_loss | 4.25 | mean next-token cross-entropy (nats per token) on 4 batches of 2 × 32 tokens" in text
    assert "tokens on each of 2 worker(s), from the validation shard |" in text
    assert "| hellaswag_acc_norm | 0.5 | HellaSwag validation, first 6 examples" in text
    assert "| total_batch_tokens | 128 |" in text and "# card-test" in text


def test_shards_description_without_a_manifest(tmp_path):
    assert shards_description(tmp_path) == f"token shards in {tmp_path} (no readable manifest.json)"


def test_the_registered_mlflow_model_carries_the_card(tmp_path, mlflow_server):
    import mlflow

    from cluster.runtime.mlflow_model import log_checkpoint_model
    from cluster.runtime.models import checkpoint_dir_of

    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    text = card(model.config)
    model.save_pretrained(tmp_path / "final", extra=lambda d: (d / CARD_FILE).write_text(text))
    client = mlflow.MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("model-card-test"))
    uri = log_checkpoint_model(mlflow_server, run.info.run_id, tmp_path / "final", "model-card-tiny",
                               kind="pretrained")
    downloaded = checkpoint_dir_of(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=mlflow_server))
    assert (downloaded / CARD_FILE).read_text() == text
    description = client.get_model_version("model-card-tiny", uri.rsplit("/", 1)[1]).description
    assert description.endswith(split_front_matter(text)[1].lstrip("\n"))  # the card without its Hub metadata
