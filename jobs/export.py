"""Export a model as a directory the Hugging Face Hub takes as it is: weights, config.json, the tokenizer files,
generation_config.json and a README.md model card whose YAML header carries the Hub's metadata (license, datasets,
library, tags, and the measured metrics in model-index form).

    python jobs/export.py --model runs/pretrain/local/final --to export/gpt2-local --license mit \\
        --dataset HuggingFaceFW/fineweb-edu
    huggingface-cli upload YOUR_NAME/gpt2-local export/gpt2-local .

--model takes a checkpoint directory, a Hugging Face GPT-2 directory or name, or an MLflow model URI
(models:/NAME@champion). The card is the model's own (its evaluation becomes the model-index), or a new one when it
has none. Models that transformers cannot run (Post-LN, head-pruned) are exported in the same format, and their
card and tags say they need this project. No Ray, no network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from cluster.runtime.models import load_model, local_model_dir
from gpt2 import GPT
from gpt2.checkpoint import CheckpointError, save_pretrained
from gpt2.model_card import CARD_FILE, front_matter, hub_metadata, render_model_card, split_front_matter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint dir, Hugging Face dir or name, or MLflow model URI")
    p.add_argument("--to", required=True, type=Path,
                   help="the directory to write: replaced as a whole if it holds a model, refused if it holds anything"
                        " else (a file, a folder without config.json)")
    p.add_argument("--license", help="the Hub license id in the card's metadata (default: the card's own, else mit)")
    p.add_argument("--dataset", action="append", default=[], metavar="HUB_ID",
                   help="a dataset the model was trained on, as a Hub id (repeatable)")
    p.add_argument("--name", help="the model's name in model-index, a new card's title and the upload hint"
                                  " (default: the name of --to)")
    return p.parse_args(argv)


def hub_card(source_dir: Path, model: GPT, name: str, license: str | None, datasets: list[str]) -> str:
    """The model's card with the Hub's metadata in front: its own card (keeping the metadata it has, such as the
    model-index of its evaluation), else a new card without figures."""
    existing = source_dir / CARD_FILE
    if existing.is_file():
        header, body = split_front_matter(existing.read_text(encoding="utf-8"))
        meta = (yaml.safe_load(header) or {}) if header else {}
        if not isinstance(meta, dict):
            raise ValueError(f"{existing}: the YAML header is not a mapping")
    else:
        card = render_model_card(model.config, params=model.num_params(), training={}, evaluation={}, name=name)
        header, body = split_front_matter(card)
        meta = yaml.safe_load(header)
    for key, value in hub_metadata(model.config, {}, name).items():  # tags and library follow the architecture
        if key == "tags":
            value = list(dict.fromkeys([*(meta.get("tags") or []), *value]))
        meta[key] = value
    if "library_name" not in hub_metadata(model.config, {}, name):
        meta.pop("library_name", None)  # transformers cannot run this architecture: do not promise it
    meta["license"] = license or meta.get("license") or "mit"
    for entry in meta.get("model-index") or []:
        entry["name"] = name
    if datasets:
        meta["datasets"] = datasets
    return front_matter(meta) + "\n" + body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        source_dir = Path(local_model_dir(args.model))
        model = load_model(str(source_dir))  # an MLflow URI is downloaded once, above
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: cannot load --model {args.model}: {e}", file=sys.stderr)
        return 2
    if not isinstance(model, GPT):  # an early-exit model: its exit classifier is this project's own file format
        print(f"{args.model} is an early-exit model: exporting its backbone (the directory's weights); the exit"
              " classifier is served by this project only", file=sys.stderr)
        model = model.base
    name = args.name or args.to.resolve().name
    card = hub_card(source_dir, model, name, args.license, args.dataset)
    try:
        save_pretrained(model, args.to, extra=lambda tmp: (tmp / CARD_FILE).write_text(card, encoding="utf-8"))
    except (CheckpointError, OSError) as e:  # --to is a file or someone else's folder; a failed write
        print(f"error: cannot write --to {args.to}: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.model} to {args.to}: {', '.join(sorted(p.name for p in args.to.iterdir()))}")
    print(f"publish it with: huggingface-cli upload YOUR_NAME/{name} {args.to} .")
    return 0


if __name__ == "__main__":
    sys.exit(main())
