"""Model cards: the README.md of a model directory, saying what the model is, how it was trained, how well it does
(and measured how), and how to load it.

The figures come from the caller (what a run recorded); this module only formats them. Whether `transformers` can
load the model is decided from the config.json this project writes for it (`hf_config_dict`): Post-LN and pruned
models are declared under architectures that transformers does not have, and the card says so instead of
showing transformers code that would fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from gpt2.checkpoint import hf_config_dict, read_config
from gpt2.config import GPTConfig
from gpt2.durable import write_file_atomically

CARD_FILE = "README.md"

# How the metrics this project records are measured; a caller passes `methods` for details only it knows
# (number of batches or examples) and for metrics not listed here.
DEFAULT_METHODS = {
    "val_loss": "mean next-token cross-entropy (nats per token) on held-out validation tokens",
    "hellaswag_acc": "HellaSwag validation, completion-style scoring (lowest summed loss of the ending)",
    "hellaswag_acc_norm": "HellaSwag validation, completion-style scoring (lowest mean loss per ending token)",
}


def loads_in_transformers(config: GPTConfig) -> bool:
    """True when the config.json written for `config` declares the plain GPT-2 architecture of transformers."""
    return hf_config_dict(config)["architectures"] == ["GPT2LMHeadModel"]


def render_model_card(
    config: GPTConfig,
    *,
    params: int,
    training: Mapping[str, object],
    evaluation: Mapping[str, float],
    name: str | None = None,
    methods: Mapping[str, str] | None = None,
    recipe: Mapping[str, object] | None = None,
    load_path: str = "path/to/this/directory",
) -> str:
    """The card as Markdown.

    params: `GPT.num_params()` (position embeddings not counted, as in the GPT-2 paper).
    training: facts shown in the Training table, in order; `tokens_seen` is formatted as a token count.
    evaluation: metric name -> value; each row gets its method from `methods`, else DEFAULT_METHODS.
    recipe: the hyper-parameters the run used (shown as given).
    load_path: the directory name shown in the loading examples.
    """
    transformers_ok = loads_in_transformers(config)
    title = name or "GPT-2 model"
    lines = [front_matter(hub_metadata(config, evaluation, title, methods)), "", f"# {title}", ""]
    lines += [
        f"A {_human(params)}-parameter GPT-2 language model trained with this project (GPT-2 on Ray).",
        "It uses the GPT-2 BPE tokenizer (tiktoken `gpt2`, 50,257 tokens, `<|endoftext|>` = 50256).",
        "",
        "## Architecture",
        "",
        *_table(("property", "value"), _architecture_rows(config, params)),
        "",
        "## Training",
        "",
    ]
    training_rows = [(_label(key), _format_training_value(key, value)) for key, value in training.items()]
    lines += _table(("property", "value"), training_rows) if training_rows else ["Not recorded."]
    if recipe:
        rows = [(k, _format(v) if isinstance(v, float) else str(v)) for k, v in recipe.items()]  # a seed has no commas
        lines += ["", "### Recipe", "", *_table(("setting", "value"), rows)]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        described = {**DEFAULT_METHODS, **(methods or {})}
        rows = [(key, _format(value), described.get(key, "not described by the run")) for key, value in evaluation.items()]
        lines += _table(("metric", "value", "method"), rows)
    else:
        lines.append("No evaluation was recorded for this model.")
    lines += ["", "## How to load it", "", "With this project:", "", "```python", "from gpt2 import GPT, get_tokenizer",
              "", f'model = GPT.from_pretrained("{load_path}")',
              "enc = get_tokenizer()",
              'tokens = model.generate([enc.encode("Once upon a time")], max_new_tokens=50, top_k=50, seed=0)[0]',
              "print(enc.decode(tokens))", "```", "", "or from the command line:", "", "```bash",
              f'python jobs/generate.py --model {load_path} --prompt "Once upon a time" --max-tokens 50', "```", ""]
    if transformers_ok:
        lines += ["With Hugging Face `transformers` (the directory holds GPT-2's tokenizer files too):", "",
                  "```python", "from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline", "",
                  f'model = GPT2LMHeadModel.from_pretrained("{load_path}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{load_path}")',
                  'generator = pipeline("text-generation", model=model, tokenizer=tokenizer)',
                  'print(generator("Once upon a time", max_new_tokens=50, do_sample=False)[0]["generated_text"])',
                  "```"]
    else:
        architecture = hf_config_dict(config)["architectures"][0]
        lines.append(
            f"Hugging Face `transformers` cannot load this model: it is {_variant(config)}, which transformers'"
            f" GPT-2 does not implement (config.json declares `{architecture}`, so transformers refuses it instead"
            " of running it wrong). Load it with this project."
        )
    return "\n".join(lines) + "\n"


# Where the Hub's model-index puts each metric this project records: (dataset name, dataset type, split, metric
# type, metric name). Other metrics go under the run's own validation data.
_HUB_METRICS = {
    "hellaswag_acc": ("HellaSwag", "Rowan/hellaswag", "validation", "accuracy", "accuracy (completion scoring)"),
    "hellaswag_acc_norm": ("HellaSwag", "Rowan/hellaswag", "validation", "accuracy",
                           "accuracy, length-normalised (completion scoring)"),
}


def hub_metadata(
    config: GPTConfig, evaluation: Mapping[str, float], name: str, methods: Mapping[str, str] | None = None
) -> dict:
    """The card's YAML metadata as the Hugging Face Hub reads it: tags, library, pipeline and the measured metrics
    in `model-index` form. Models transformers cannot load are not declared as transformers models."""
    meta: dict = {"tags": ["gpt2", "text-generation", "causal-lm", "gpt2-on-ray"], "pipeline_tag": "text-generation"}
    if loads_in_transformers(config):
        meta["library_name"] = "transformers"
    else:
        meta["tags"].append("needs-gpt2-on-ray")
    results: dict[tuple, list] = {}
    described = {**DEFAULT_METHODS, **(methods or {})}
    for key, value in evaluation.items():
        dataset, dataset_type, split, metric_type, metric_name = _HUB_METRICS.get(
            key, ("validation data of the training run", "custom", "validation", key, described.get(key, key))
        )
        results.setdefault((dataset, dataset_type, split), []).append(
            {"type": metric_type, "name": metric_name, "value": float(value)}
        )
    if results:
        meta["model-index"] = [{"name": name, "results": [
            {"task": {"type": "text-generation", "name": "Text Generation"},
             "dataset": {"name": d, "type": t, "split": sp}, "metrics": metrics}
            for (d, t, sp), metrics in results.items()
        ]}]
    return meta


def front_matter(meta: Mapping[str, object]) -> str:
    """YAML front matter holding `meta`; each value is written as JSON, which YAML reads as it is (and which keeps
    this module free of a YAML writer)."""
    return "\n".join(["---", *(f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in meta.items()), "---"])


def split_front_matter(card: str) -> tuple[str, str]:
    """(the YAML between the opening and closing `---` lines, the rest); ("", card) when the card has none."""
    if card.startswith("---\n"):
        end = card.find("\n---", 3)
        if end != -1:
            rest = card[end + 4 :]
            return card[4:end], rest[1:] if rest.startswith("\n") else rest
    return "", card


def write_model_card(directory: str | os.PathLike, config: GPTConfig | None = None, **card) -> Path:
    """Render the card (see render_model_card; the config is read from `directory` when not given) and write it
    to `directory`/README.md atomically: a reader sees the old card or the new one, never half of one."""
    directory = Path(directory)
    text = render_model_card(config if config is not None else read_config(directory), **card)
    path = directory / CARD_FILE
    write_file_atomically(path, text.encode("utf-8"))
    return path


def shards_description(directory: str | os.PathLike, origin: str | None = None) -> str:
    """What a shard folder (jobs/prepare_data.py's output) holds, from its manifest.json, for the Training table.
    `origin` names where the shards came from when `directory` is a local copy of them."""
    manifest_path = Path(directory) / "manifest.json"
    directory = origin or directory
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"token shards in {directory} (no readable manifest.json)"
    source = manifest.get("source")
    if isinstance(source, dict):  # the fingerprint jobs/prepare_data.py records
        spec = source.get("spec", {})
        kind = spec.get("kind", "unknown source")
        where = ", ".join(spec.get("inputs") or ()) or (spec.get("fineweb_name") if kind == "fineweb-edu" else "")
        source = f"{kind} ({where})" if where else kind
    train_tokens = sum(s.get("tokens", 0) for s in manifest.get("shards", []) if s.get("split") == "train")
    return f"{source or 'unknown source'}: {train_tokens:,} training tokens in {directory}"


# ------------------------------------------------------------------------------------------------------ helpers


def _architecture_rows(config: GPTConfig, params: int) -> list[tuple[str, str]]:
    heads = str(config.n_head)
    padded = config.padded_vocab_size
    padding = f" (embedding padded to {padded:,} rows)" if padded != config.vocab_size else ""
    if config.n_head_per_layer is not None:
        heads = f"{sum(config.n_head_per_layer)} after pruning (per layer: {', '.join(map(str, config.n_head_per_layer))})"
    return [
        ("parameters", f"{params:,} ({_human(params)}; position embeddings not counted, as in the GPT-2 paper)"),
        ("layers", str(config.n_layer)),
        ("attention heads", heads),
        ("embedding width", str(config.n_embd)),
        ("context length", f"{config.block_size} tokens"),
        ("vocabulary", f"{config.vocab_size:,} tokens" + padding),
        ("LayerNorm", "Pre-LN (GPT-2)" if config.norm == "pre" else "Post-LN (original Transformer)"),
        ("biases", "yes" if config.bias else "no"),
        ("tied input/output embeddings", "yes" if config.tie_embeddings else "no"),
        ("dropout", _format(config.dropout)),
    ]


def _variant(config: GPTConfig) -> str:
    kinds = (["Post-LN"] if config.norm == "post" else []) + (["head-pruned"] if config.n_head_per_layer is not None else [])
    return " and ".join(kinds) or "a variant"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def _label(key: str) -> str:
    return key.replace("_", " ")


def _format_training_value(key: str, value: object) -> str:
    if key == "tokens_seen" and isinstance(value, int) and value >= 1000:
        return f"{value:,} ({_human(value)})"
    return _format(value)


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _human(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
