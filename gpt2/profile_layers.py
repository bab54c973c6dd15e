"""Where a forward pass spends its time and memory, layer component by layer component, for prefill and decoding.

Timing is telescoping: forward hooks put a timestamp at the end of every component (torch.cuda.Event on CUDA,
time.perf_counter after a synchronize elsewhere), and a component's time is the interval from the previous timestamp
to its own. So the rows of one forward add up to the whole forward (from the model's forward pre-hook to its
post-hook), and the small glue between modules (residual additions, row gathering in an early-exit model) is counted
in the component that follows it. Components, in the order a forward meets them:

- `embedding`: token + position embeddings
- `block.{i}.attn`: the attention sub-layer with its LayerNorm and residual addition; `block.{i}.mlp`: the same for
  the MLP (for Post-LN the sub-layer's LayerNorm comes after the residual addition and is counted with it)
- early-exit models only: `exit.classifier` (exit head, features and classifier, after block exit_layer - 1) and
  `exit.kv_projection` (deeper keys/values of exited rows, only in cached passes where some row exited)
- `ln_f+head`: the final LayerNorm and LM head, plus assembling the output

Memory per component: `param_bytes` are the parameters its modules own (the tied embedding/LM-head matrix is listed
under ln_f+head, where it is read in full; the embedding reads a few rows), so the column sums to the model's
parameter bytes. `activation_bytes` are the bytes of the tensors its modules output per forward. On CUDA and MPS the
allocator's allocated bytes at the component's end are recorded too, and on CUDA the peak during the component.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from gpt2.early_exit import EarlyExitGPT

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class ComponentProfile:
    phase: str  # "prefill" (a prompt into an empty KV cache) or "decode" (one token per row with the cache)
    component: str
    layer: int | None  # the block index for block components
    calls: int  # forwards in which it ran (a deeper block of an early-exit model only runs when a row continues)
    seconds: float  # mean per forward
    fraction: float  # of the phase's summed seconds
    param_bytes: int
    activation_bytes: float  # mean per forward
    device_allocated_bytes: int | None  # allocator's allocated bytes at the component's end (CUDA/MPS), last forward
    device_peak_bytes: int | None  # allocator's peak during the component (CUDA), max over forwards


@dataclass(frozen=True)
class LayerProfile:
    rows: list[ComponentProfile]
    # Mean wall time per forward measured around the model call (same clock and synchronisation as the rows),
    # hooks included: the rows of a phase should add up to just under this.
    forward_seconds: dict[str, float]
    batch_size: int
    prompt_len: int
    decode_steps: int
    device: str

    def phase_rows(self, phase: str) -> list[ComponentProfile]:
        return [r for r in self.rows if r.phase == phase]


# The early-exit components are EarlyExitGPT's own submodules (classifier, exited_kv), so the checks below are for
# that class, not for the gpt2.protocols.ExitingModel interface.


def _component_names(model: nn.Module) -> list[str]:
    n_layer = model.config.n_layer
    exit_layer = model.exit_layer if isinstance(model, EarlyExitGPT) else None
    names = ["embedding"]
    for i in range(n_layer):
        if i == exit_layer:
            names.append("exit.classifier")
        names += [f"block.{i}.attn", f"block.{i}.mlp"]
    if exit_layer is not None:
        names.append("exit.kv_projection")
    return names + ["ln_f+head"]


def _owned_params(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    t = model.transformer
    owned: dict[str, list[nn.Parameter]] = {
        "embedding": list(t.wpe.parameters()) + ([] if model.config.tie_embeddings else list(t.wte.parameters())),
        "ln_f+head": list(t.ln_f.parameters()) + list(model.lm_head.parameters()),
    }
    for i, block in enumerate(t.h):
        owned[f"block.{i}.attn"] = list(block.ln_1.parameters()) + list(block.attn.parameters())
        owned[f"block.{i}.mlp"] = list(block.ln_2.parameters()) + list(block.mlp.parameters())
    if isinstance(model, EarlyExitGPT):
        owned["exit.classifier"] = list(model.classifier.parameters())
    return owned


def _bytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(_bytes(x) for x in t)
    return 0


class _Recorder:
    """Timestamps at component ends and the activation bytes produced since the previous timestamp."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[tuple[str | None, object, float, int | None, int | None]] = []
        self.pending_bytes = 0

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()

    def mark(self, label: str | None) -> None:
        allocated = peak = None
        if self.device.type == "cuda":
            allocated, peak = torch.cuda.memory_allocated(self.device), torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "mps":
            allocated = torch.mps.current_allocated_memory()
        self.marks.append((label, self._now(), self.pending_bytes, allocated, peak))
        self.pending_bytes = 0

    def intervals(self) -> list[tuple[str, float, int, int | None, int | None]]:
        """(label, seconds, activation bytes, allocated, peak) for every interval, in order."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out = []
        for (_, start, *_), (label, end, nbytes, allocated, peak) in zip(self.marks, self.marks[1:]):
            seconds = start.elapsed_time(end) / 1000 if self.device.type == "cuda" else end - start
            out.append((label, seconds, nbytes, allocated, peak))
        return out


def _install_hooks(model: nn.Module, recorder: _Recorder) -> list:
    def count_output(_module, _inputs, output) -> None:
        recorder.pending_bytes += _bytes(output)

    # Counting hooks first: hooks run in registration order, and a module's output must be counted before a
    # marker on the same module closes the interval (Post-LN's ln_1).
    handles = []
    for module in model.modules():
        # Dropout in eval mode returns its input: no new tensor.
        if not any(True for _ in module.children()) and not isinstance(module, nn.Dropout):
            handles.append(module.register_forward_hook(count_output))
    t = model.transformer
    handles += [
        model.register_forward_pre_hook(lambda *_: recorder.mark(None)),
        model.register_forward_hook(lambda *_: recorder.mark("ln_f+head")),
        t.drop.register_forward_hook(lambda *_: recorder.mark("embedding")),
    ]

    def marker(label: str) -> Callable:
        return lambda *_: recorder.mark(label)

    for i, block in enumerate(t.h):
        if block.pre_norm:  # the attention sub-layer ends where the MLP's LayerNorm starts
            handles.append(block.ln_2.register_forward_pre_hook(marker(f"block.{i}.attn")))
        else:  # Post-LN: it ends with ln_1, which normalises the residual sum
            handles.append(block.ln_1.register_forward_hook(marker(f"block.{i}.attn")))
        handles.append(block.register_forward_hook(marker(f"block.{i}.mlp")))
    if isinstance(model, EarlyExitGPT):
        handles.append(model.classifier.register_forward_hook(marker("exit.classifier")))
        handles.append(model.exited_kv.register_forward_hook(marker("exit.kv_projection")))
    return handles


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def profile_layers(
    model: nn.Module,
    *,
    batch_size: int = 1,
    prompt_len: int = 64,
    decode_steps: int = 16,
    repeats: int = 3,
    seed: int = 0,
    forward_kwargs: dict | None = None,
) -> LayerProfile:
    """Profile a GPT or EarlyExitGPT on random tokens, as generation runs it (KV cache, last position's logits).

    prefill: `repeats` passes of (batch_size, prompt_len) tokens into fresh caches; decode: `repeats` times
    `decode_steps` one-token steps after an unmeasured prefill. One unmeasured pass of each kind warms up first.
    forward_kwargs go to every forward call (e.g. {"threshold": 0.8} for an EarlyExitGPT, whose running
    statistics then include these passes).
    """
    config = model.config
    if prompt_len < 1 or decode_steps < 1 or repeats < 1 or batch_size < 1:
        raise ValueError(
            "batch_size, prompt_len, decode_steps and repeats must be >= 1, got"
            f" {batch_size}, {prompt_len}, {decode_steps}, {repeats}"
        )
    if prompt_len + decode_steps > config.block_size:
        raise ValueError(
            f"prompt_len + decode_steps = {prompt_len + decode_steps} exceeds the context of {config.block_size}"
        )
    device = model.transformer.wte.weight.device
    kwargs = dict(forward_kwargs or {})
    generator = torch.Generator().manual_seed(seed)

    def tokens(T: int) -> torch.Tensor:
        return torch.randint(0, config.vocab_size, (batch_size, T), generator=generator).to(device)

    was_training = model.training
    model.eval()
    recorder = _Recorder(device)
    handles: list = []
    per_phase: dict[str, list[list]] = {phase: [] for phase in PHASES}  # the intervals of each measured forward
    forward_seconds: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def measured(phase: str, idx: torch.Tensor, cache) -> None:
        recorder.marks.clear()
        _sync(device)
        start = time.perf_counter()
        model(idx, kv_cache=cache, last_only=True, **kwargs)
        _sync(device)
        forward_seconds[phase].append(time.perf_counter() - start)
        per_phase[phase].append(recorder.intervals())

    try:
        for _ in range(2):  # warm-up: allocator, kernels, lazy initialisation
            cache = model.new_kv_cache(batch_size, prompt_len + decode_steps)
            model(tokens(prompt_len), kv_cache=cache, last_only=True, **kwargs)
            model(tokens(1), kv_cache=cache, last_only=True, **kwargs)
        handles = _install_hooks(model, recorder)
        for _ in range(repeats):
            cache = model.new_kv_cache(batch_size, prompt_len + decode_steps)
            measured("prefill", tokens(prompt_len), cache)
            for _ in range(decode_steps):
                measured("decode", tokens(1), cache)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = _summarise(model, per_phase)
    return LayerProfile(
        rows=rows,
        forward_seconds={phase: sum(s) / len(s) for phase, s in forward_seconds.items()},
        batch_size=batch_size,
        prompt_len=prompt_len,
        decode_steps=decode_steps,
        device=str(device),
    )


def _summarise(model: nn.Module, per_phase: dict[str, list[list]]) -> list[ComponentProfile]:
    param_bytes = {name: sum(_bytes(p) for p in params) for name, params in _owned_params(model).items()}
    rows = []
    for phase, forwards in per_phase.items():
        seconds: dict[str, float] = defaultdict(float)
        nbytes: dict[str, int] = defaultdict(int)
        calls: dict[str, int] = defaultdict(int)
        allocated: dict[str, int | None] = {}
        peak: dict[str, int | None] = {}
        for intervals in forwards:
            seen = set()
            for label, s, b, alloc, pk in intervals:
                seconds[label] += s
                nbytes[label] += b
                seen.add(label)
                allocated[label] = alloc
                peak[label] = pk if peak.get(label) is None or pk is None else max(peak[label], pk)
            for label in seen:
                calls[label] += 1
        n = len(forwards)
        total = sum(seconds.values())
        for name in _component_names(model):
            layer = int(name.split(".")[1]) if name.startswith("block.") else None
            rows.append(
                ComponentProfile(
                    phase=phase,
                    component=name,
                    layer=layer,
                    calls=calls[name],
                    seconds=seconds[name] / n,
                    fraction=seconds[name] / total if total else 0.0,
                    param_bytes=param_bytes.get(name, 0),
                    activation_bytes=nbytes[name] / n,
                    device_allocated_bytes=allocated.get(name),
                    device_peak_bytes=peak.get(name),
                )
            )
    return rows


def write_csv(rows: Sequence[ComponentProfile], path: str | os.PathLike) -> Path:
    """One line per row, columns as the ComponentProfile fields; empty cells for None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [f.name for f in dataclasses.fields(ComponentProfile)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(row).items()})
    return path
