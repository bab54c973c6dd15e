"""The early-exit file format: the classifier stored beside a base checkpoint, and the pair loaded back.

A model directory written by gpt2.checkpoint gains two files: `early_exit.safetensors` (the classifier's weights,
float32) and `early_exit.json` (format version, exit layer, tau, the classifier's shape and features). The base
weights are untouched, so the directory still loads as a plain GPT; a directory holding `EXIT_CONFIG_FILE` is what
loaders such as cluster.runtime.models treat as an early-exit model. Kept in one module so the names, the version and the
checks of this on-disk contract are read and changed in one place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.checkpoint import CheckpointError, atomic_directory, load_directory, read_config
from gpt2.early_exit.classifier import HEAD_FEATURES, ExitClassifier
from gpt2.early_exit.model import EarlyExitGPT, check_exit_layer

EXIT_WEIGHTS_FILE = "early_exit.safetensors"
EXIT_CONFIG_FILE = "early_exit.json"
EXIT_FORMAT_VERSION = 1


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the other checkpoint files are only referenced again, not copied
    except OSError:
        shutil.copy2(src, dst)


def save_early_exit(model: EarlyExitGPT, directory: str | os.PathLike) -> None:
    """Add the classifier (`early_exit.safetensors`, `early_exit.json`) to the model's checkpoint directory.

    Atomic as gpt2.checkpoint.save_pretrained: a sibling copy of the directory (hard links, so cheap) gets the new
    files and replaces the directory, so readers see the old or the new pair, never a mix. Saving the base model
    again with save_pretrained writes a new directory without these files.
    """
    directory = Path(directory)
    config = read_config(directory)
    arch = ("vocab_size", "n_layer", "n_head", "n_embd")
    if any(getattr(config, f) != getattr(model.config, f) for f in arch):
        raise CheckpointError(
            f"{directory}: holds a different model ({ {f: getattr(config, f) for f in arch} }) than the early-exit"
            f" model's base ({ {f: getattr(model.config, f) for f in arch} })"
        )
    spec = {
        "format_version": EXIT_FORMAT_VERSION,
        "exit_layer": model.exit_layer,
        "threshold": model.threshold,
        "n_layer": model.config.n_layer,
        **model.classifier.spec(),
    }
    with atomic_directory(directory, create=False) as tmp:
        # The old pair is left out rather than linked: writing through a link would change the live files.
        old_pair = shutil.ignore_patterns(EXIT_WEIGHTS_FILE, EXIT_CONFIG_FILE)
        shutil.copytree(directory, tmp, copy_function=_link_or_copy, ignore=old_pair)
        state = {k: v.detach().float().contiguous().cpu() for k, v in model.classifier.state_dict().items()}
        save_file(state, str(tmp / EXIT_WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / EXIT_CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; this checkpoint has no early-exit classifier (save_early_exit adds one)"
        )
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(spec).__name__}")
    try:
        if int(spec.get("format_version", EXIT_FORMAT_VERSION)) > EXIT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer version of this project ({spec['format_version']})")
        return {
            "exit_layer": spec["exit_layer"],
            "threshold": float(spec["threshold"]),
            "hidden_dim": int(spec["classifier"]["hidden_dim"]),
            "n_embd": int(spec["classifier"]["n_embd"]),
            "head_features": list(spec["features"]["head"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or malformed field ({type(e).__name__}: {e})") from e


def load_early_exit(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> EarlyExitGPT:
    """The early-exit model saved in a checkpoint directory: base weights via gpt2.checkpoint.load_directory, the
    classifier from early_exit.*. `dtype` applies to the backbone; the classifier stays float32 (it is tiny and
    its score is compared with a threshold). Returned in eval mode."""
    directory = Path(directory)
    config_path, weights_path = directory / EXIT_CONFIG_FILE, directory / EXIT_WEIGHTS_FILE
    spec = _read_spec(config_path)
    if spec["head_features"] not in ([], list(HEAD_FEATURES)):
        raise CheckpointError(
            f"{config_path}: unknown head features {spec['head_features']} (known: {list(HEAD_FEATURES)})"
        )
    base = load_directory(directory, device=device, dtype=dtype)
    try:
        check_exit_layer(spec["exit_layer"], base.config.n_layer)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; the early-exit classifier's weights are not in {directory}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{weights_path}: cannot read safetensors file ({e}); the file is corrupt or truncated"
        ) from e
    if spec["n_embd"] != base.config.n_embd:
        raise CheckpointError(
            f"{config_path}: classifier for n_embd={spec['n_embd']}, the model has {base.config.n_embd}"
        )
    classifier = ExitClassifier(spec["n_embd"], spec["hidden_dim"], head_features=bool(spec["head_features"]))
    try:
        classifier.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{weights_path}: does not match the classifier described in {EXIT_CONFIG_FILE} ({e})"
        ) from e
    return EarlyExitGPT(base, spec["exit_layer"], spec["threshold"], classifier.to(device)).eval()
