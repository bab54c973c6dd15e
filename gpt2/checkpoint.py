"""Checkpoint I/O: one directory format that is both this project's checkpoint and a Hugging Face GPT-2 model.

Layout: `config.json` in the Hugging Face GPT-2 schema, with this project's extra fields under "gpt2_project",
and `model.safetensors` with Hugging Face tensor names. Hugging Face stores the four projection weights as Conv1D,
i.e. transposed relative to nn.Linear, so they are transposed on the way in and out.

Beside them, the tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`) and
`generation_config.json`: without the tokenizer files `transformers.pipeline`/`AutoTokenizer` build an empty GPT-2
tokenizer and generate nothing, and vLLM and lm-eval cannot start. Loading never needs them, so checkpoints written
before they existed still load.

Nothing here unpickles arbitrary objects: safetensors, or torch.load(weights_only=True) for `pytorch_model.bin`.

Writes are atomic: a checkpoint is written to a hidden sibling and swapped in at once, so a process killed at any
moment leaves the previous complete checkpoint or the new one, never a mix (see `atomic_directory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2.config import EOT_TOKEN, GPTConfig
from gpt2.durable import fsync_directory
from gpt2.model import GPT
from gpt2.tokenizer import EOT_TEXT, bpe_file_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LEGACY_WEIGHTS_FILE = "pytorch_model.bin"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PROJECT_KEY = "gpt2_project"
FORMAT_VERSION = 1
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------------- config.json


def hf_config_dict(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json content: the Hugging Face GPT-2 schema plus this project's fields."""
    post_ln, pruned = config.norm == "post", config.n_head_per_layer is not None
    # transformers has no Post-LN GPT-2, and 5.x dropped `pruned_heads` (per-layer head counts); a distinct type
    # makes it refuse such a model instead of running it wrong.
    variant = ("PostLN" if post_ln else "") + ("PrunedHeads" if pruned else "")
    return {
        "architectures": [f"GPT2{variant}LMHeadModel"],
        "model_type": "gpt2" + ("-post-ln" if post_ln else "") + ("-pruned-heads" if pruned else ""),
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "dtype": str(dtype).removeprefix("torch."),
        PROJECT_KEY: {
            "format_version": FORMAT_VERSION,
            "norm": config.norm,
            "bias": config.bias,
            "vocab_pad_multiple": config.vocab_pad_multiple,
            "n_head_per_layer": list(config.n_head_per_layer) if pruned else None,
        },
    }


def config_from_hf_dict(d: dict, source: str = CONFIG_FILE) -> GPTConfig:
    """GPTConfig from a config.json written by this project or by transformers."""
    unsupported = {
        "activation_function": (d.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (d.get("n_inner"), (None, 4 * d.get("n_embd", 0))),
        "scale_attn_by_inverse_layer_idx": (d.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "reorder_and_upcast_attn": (d.get("reorder_and_upcast_attn", False), (False,)),
        "scale_attn_weights": (d.get("scale_attn_weights", True), (True,)),
    }
    for field, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise CheckpointError(f"{source}: {field}={value!r} is not supported (expected one of {list(allowed)})")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "vocab_size") if k not in d]
    if missing:
        raise CheckpointError(f"{source}: missing GPT-2 config field(s) {missing}")
    project = d.get(PROJECT_KEY, {})
    if project.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: written by a newer version of this project (format {project['format_version']})")
    try:
        return GPTConfig(
            vocab_size=d["vocab_size"],
            block_size=d.get("n_positions", d.get("n_ctx", 1024)),
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_embd=d["n_embd"],
            dropout=d.get("resid_pdrop", 0.0),
            bias=project.get("bias", True),
            norm=project.get("norm", "pre"),
            tie_embeddings=d.get("tie_word_embeddings", True),
            vocab_pad_multiple=project.get("vocab_pad_multiple", 1),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            n_head_per_layer=project.get("n_head_per_layer"),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------------------------------- tokenizer files


def hf_tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json content: the settings under which transformers' GPT2Tokenizer, reading this project's
    BPE files, encodes and decodes exactly as tiktoken does."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_prefix_space": False,
        "errors": "replace",  # as tiktoken's decode, for a token sequence that ends inside a UTF-8 character
        # transformers 4.x defaults to True, which rewrites " ." as "." and " 's" as "'s" when decoding.
        "clean_up_tokenization_spaces": False,
    }


def hf_tokenizer_files(config: GPTConfig) -> dict[str, bytes]:
    """The tokenizer and generation files of a checkpoint directory, by name. The BPE data is the sha256-checked
    bytes this project tokenizes with, copied as they are."""
    merges, vocab = bpe_file_bytes()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    # GPT-2 has no padding token; transformers pads a batch with eos when none is set.
    generation_config = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}
    return {
        VOCAB_FILE: vocab,
        MERGES_FILE: merges,
        TOKENIZER_CONFIG_FILE: _json_bytes(hf_tokenizer_config(config.block_size)),
        SPECIAL_TOKENS_MAP_FILE: _json_bytes(special),
        GENERATION_CONFIG_FILE: _json_bytes(generation_config),
    }


def add_tokenizer_files(directory: str | os.PathLike) -> list[str]:
    """Write the tokenizer and generation files that a model directory lacks (one saved before checkpoints carried
    them, or a hub download without them); the files it has are kept. Returns the names written."""
    directory = Path(directory)
    missing = {n: d for n, d in hf_tokenizer_files(read_config(directory)).items() if not (directory / n).exists()}
    for name, data in missing.items():
        (directory / name).write_bytes(data)
    return sorted(missing)


def _json_bytes(d: dict) -> bytes:
    return (json.dumps(d, indent=2) + "\n").encode()


# ---------------------------------------------------------------------------------------------------- tensors


def _to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    config = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the same storage as wte; Hugging Face re-ties it on load
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]  # padding rows are an in-memory detail
        out[name] = tensor.detach().contiguous().cpu()
    if not config.bias:
        # Hugging Face GPT-2 always has biases; zeros are the exact equivalent of none.
        for name, tensor in list(out.items()):
            if name.startswith("transformer.h.") or name.startswith("transformer.ln_f."):
                bias_name = name.removesuffix(".weight") + ".bias"
                if name.endswith(".weight") and bias_name not in out:
                    width = tensor.shape[1] if name.endswith(CONV1D_SUFFIXES) else tensor.shape[0]
                    out[bias_name] = torch.zeros(width, dtype=tensor.dtype)
    return out


def _from_hf_state_dict(sd: dict[str, torch.Tensor], model: GPT, source: str) -> dict[str, torch.Tensor]:
    """Map a Hugging Face-named state dict onto `model`'s names and shapes, checking every tensor."""
    config = model.config
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old transformers stored the causal mask as a buffer
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if key not in expected:
            if not config.bias and key.endswith(".bias"):
                if torch.count_nonzero(tensor):
                    raise CheckpointError(f"{source}: {name} is non-zero but the config says bias=false")
                continue
            raise CheckpointError(f"{source}: unexpected tensor {name} {tuple(tensor.shape)} for this config")
        mapped[key] = tensor
    if config.tie_embeddings:
        head = mapped.pop("lm_head.weight", None)
        wte = mapped.get("transformer.wte.weight")
        if head is not None and wte is not None and not torch.equal(head, wte):
            raise CheckpointError(f"{source}: lm_head.weight differs from wte but the config ties them")
    state = {}
    for key, want in expected.items():
        if key == "lm_head.weight" and config.tie_embeddings:
            continue
        if key not in mapped:
            raise CheckpointError(f"{source}: tensor {key} is missing")
        got = mapped[key]
        if key in ("transformer.wte.weight", "lm_head.weight") and got.shape[0] == config.vocab_size:
            padded = torch.zeros(want.shape, dtype=got.dtype)
            padded[: config.vocab_size] = got
            got = padded
        if got.shape != want.shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(got.shape)}, the config needs {tuple(want.shape)}")
        state[key] = got
    return state


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = directory / WEIGHTS_FILE
    if path.is_file():
        try:
            return load_file(str(path)), path
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e}); the file is corrupt or truncated") from e
    path = directory / LEGACY_WEIGHTS_FILE
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # torch raises several types for a bad file; all mean the same to the user
            raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    present = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {LEGACY_WEIGHTS_FILE} (found {present})")


# ---------------------------------------------------------------------------------------------------- public API


def read_config(directory: str | os.PathLike) -> GPTConfig:
    recover_directory(directory)
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a model directory (no {CONFIG_FILE})")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object (found {type(d).__name__})")
    return config_from_hf_dict(d, str(path))


def load_directory(directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    directory = Path(directory)
    config = read_config(directory)
    sd, weights_path = _read_weights(directory)
    model = GPT(config)
    model.load_state_dict(_from_hf_state_dict(sd, model, str(weights_path)), strict=not config.tie_embeddings)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device).eval()


def resolve_hub_name(name: str) -> Path:
    """A Hugging Face hub model ("gpt2", "openai-community/gpt2-medium", ...) from the local cache or the hub."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is in requirements.txt
        raise CheckpointError(f"{name!r} is not a directory and huggingface_hub is not installed") from e
    repo_id = HUB_ALIASES.get(name, name)
    patterns = [CONFIG_FILE, WEIGHTS_FILE]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(
            f"{name!r} is not a local directory, and the Hugging Face hub model {repo_id} is neither in the local cache"
            f" nor downloadable here ({type(e).__name__}). On a machine with network run"
            f" `huggingface-cli download {repo_id} {CONFIG_FILE} {WEIGHTS_FILE} --local-dir DIR`, copy DIR here"
            " and pass its path."
        ) from e


def hub_like(name: str) -> bool:
    """Whether `name` reads as a Hugging Face hub name ("gpt2", "openai-community/gpt2") when no model directory
    has it. `runs/final` is a missing local folder, not the hub's organisation "runs", when ./runs is a folder."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    organisation = name.rpartition("/")[0]
    return not organisation or not Path(organisation).is_dir()


def load_pretrained(name_or_path: str | os.PathLike, **kwargs) -> GPT:
    path, name = Path(name_or_path), str(name_or_path)
    recover_directory(path)
    if (path / CONFIG_FILE).is_file():
        return load_directory(path, **kwargs)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the model directory that holds {CONFIG_FILE}")
    if not hub_like(name):
        if path.is_dir():
            raise CheckpointError(f"{path}: not a model directory (no {CONFIG_FILE})")
        raise CheckpointError(f"model directory {path} does not exist")
    return load_directory(resolve_hub_name(name), **kwargs)


def save_pretrained(model: GPT, path: str | os.PathLike, *, extra: Callable[[Path], None] | None = None) -> None:
    """Write the model's weights, config, tokenizer and generation files to `path` atomically (see `atomic_directory`).

    `extra(tmp_dir)` may add more files (trainer state, a model card) before the rename, so they land together.
    """
    with atomic_directory(path, replaces=CONFIG_FILE) as tmp:
        dtype = model.transformer.wte.weight.dtype
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2) + "\n")
        _save_safetensors(_to_hf_state_dict(model), tmp / WEIGHTS_FILE)
        for name, data in hf_tokenizer_files(model.config).items():
            (tmp / name).write_bytes(data)
        if extra is not None:
            extra(tmp)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        # safetensors reports a failed write (disk full, file too large) as its own error that only quotes the OS
        # error; as the OSError it is, it gets the handling and the message of every other failed write.
        if (found := re.search(r"os error (\d+)", str(e))) is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from e


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, create: bool = True, replaces: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill. When the block ends, its files are flushed to disk and it
    replaces `path` in one step (`replace_directory`); if the block raises, it is deleted and `path` is untouched.
    A process killed at any point leaves the previous complete directory or the new complete one (plus hidden
    leftovers that the next read or write of `path` clears, see `recover_directory`). A write that fails in the
    operating system (disk full, file too large) raises an OSError naming `path` and saying it is unchanged.
    With create=False the block creates the folder itself (e.g. with shutil.copytree).

    The previous `path` is deleted as a whole, so what it is gets checked first (CheckpointError, nothing written):
    never a file, and with `replaces` (the file every version holds, e.g. config.json) never a folder that holds
    other things without it: a user's folder given by mistake (`--to .`) is refused, not emptied."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    _check_replaceable(path, replaces)
    tmp = _sibling(path, "tmp")
    if create:
        tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, path) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(path: Path, replaces: str | None) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; a folder is written there as a whole, so choose "
                              "another path or remove it first")
    if replaces is not None and not (path / replaces).is_file() and any(path.iterdir()):
        raise CheckpointError(f"{path} is a folder with other contents (no {replaces}); writing there would replace "
                              "it as a whole, so choose another path or empty it first")


def _write_error(error: OSError, path: Path) -> OSError:
    """The error of a failed write, naming the directory that was being written and what became of it."""
    where = f" ({error.filename})" if error.filename else ""
    state = f"the previous {path} is unchanged" if path.exists() else f"nothing was written to {path}"
    message = f"{error.strerror or error}{where} while writing {path}; {state}"
    return OSError(error.errno, message) if error.errno else OSError(message)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so that once renamed into place it is complete even after
    a power loss (the rename itself may reach the disk before file data that was never flushed)."""
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            fsync_directory(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`, replacing any previous `target`.

    rename(2) cannot replace a non-empty directory. Linux swaps the two in one step (renameat2 with
    RENAME_EXCHANGE), so `target` is never missing. Where that is unavailable (another OS, an old kernel or C
    library, a filesystem without it) the old one is renamed aside under a name that `recover_directory` restores
    if the process dies before the new one is in place. The old one is deleted only once the new one is.
    """
    if not target.exists():
        os.rename(new, target)
        old = None
    elif _exchange(new, target):
        old = new  # after the swap, `new`'s name holds the previous version
    else:
        old = _sibling(target, "old")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's renameat2, or None where there is none (not Linux, or glibc older than 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the kernel, C library or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # flag or call unsupported here
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# A hidden sibling of a directory being written: `.{name}.tmp-{host}-{pid}-{random}` while the new version is
# filled (and, after a swap, the previous version until it is deleted), `.{name}.old-...` for the previous version
# renamed aside. Names written before host and pid were part of them (`.{name}.old-{random}`) are recognised too.
_LEFTOVER = re.compile(r"(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-)?[0-9a-f]{8}")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_gone(leftover: re.Match) -> bool | None:
    """Whether the process that named a leftover has ended: True or False on this host; None (cannot tell) for one
    on another host sharing the filesystem, or a name from before host and pid were recorded."""
    if leftover["pid"] is None or leftover["host"] != _host():
        return None
    try:
        os.kill(int(leftover["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def recover_directory(target: str | os.PathLike) -> None:
    """Repair what a writer killed mid-save left beside `target`; runs before every read and write of it.

    If `target` is missing, the newest previous version that a writer had renamed aside is renamed back, unless
    that writer still runs (it is between its two renames). A temporary directory is never used instead: nothing
    shows that it was complete. The leftovers of writers that have ended are then deleted; those of live writers
    and of writers that may run elsewhere are left alone (they are hidden, and no reader looks at them).
    """
    target = Path(target)
    if not target.name:
        return
    prefix = f".{target.name}."
    try:
        with os.scandir(target.parent) as entries:
            leftovers = {
                Path(e.path): m
                for e in entries
                if e.name.startswith(prefix) and (m := _LEFTOVER.fullmatch(e.name[len(prefix) :]))
            }
    except OSError:  # no parent folder, or one this process may not list: nothing it could repair
        return
    gone = {p: _writer_gone(m) for p, m in leftovers.items()}
    aside = [p for p, m in leftovers.items() if m["kind"] == "old" and gone[p] is not False]
    if aside and not target.exists():
        newest = max(aside, key=lambda p: p.stat().st_mtime_ns)
        try:
            os.rename(newest, target)
        except OSError:
            if not target.exists():  # else another process restored or wrote it first
                raise
        fsync_directory(target.parent)
        del gone[newest]
    for p, ended in gone.items():
        if ended:
            shutil.rmtree(p, ignore_errors=True)
