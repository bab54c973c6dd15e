"""Golden loss sequences of the cluster/ training jobs, recorded on CPU before the cluster/ layer was redesigned.

The four Ray Train loops (cluster/train/pretrain.py, distill.py, finetune.py, early_exit.py) once had their own
worker setup, trainer construction and config sections; they now share one launcher (cluster/train/launcher.py), one
worker context (cluster/train/worker.py) and one config vocabulary (cluster/config/sections.py). A refactor like that
must not change a single bit of what the jobs compute, so each function here runs one job through its real cluster/
entry point on tiny shapes with fixed seeds and returns the losses it recorded, in a fixed order.
`python -m tests.golden_losses --write` stores them (as float.hex strings, with the config of each job) in
tests/golden/losses.json; tests/test_golden_losses.py runs the jobs again and requires the very same bits.

Exact equality holds for one machine and one software stack: a different CPU (vector width, oneDNN kernels) or
another torch version may round differently, so the environment that recorded the file is stored beside the losses
and shown on a mismatch. Everything runs on 1 torch thread in float32: the thread count changes how matmuls and
reductions are split, and bf16 autocast depends on the CPU, so neither is left to the machine.

Tracking goes to an address where nothing listens (as tests/conftest.py sets up for every test): the jobs cannot
run without a RunLogger, which then keeps every metric in <run>/metrics.jsonl, where the losses are read from.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from cluster.config.distill import DistillConfig

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "losses.json"
# Port 9 (discard): nothing answers there, so a RunLogger fails fast, warns once and keeps metrics.jsonl.
OFFLINE_TRACKING = "http://127.0.0.1:9"
CPU = torch.device("cpu")

Losses = list[float]

# The overrides of each job that do not name a path (paths are added where the inputs are written). They are stored
# in the golden file: a change here without --write shows up as a config difference, not a mysterious loss change.
PRETRAIN = [
    "model.preset=tiny", "model.block_size=32", "train.seq_len=16", "train.micro_batch=2",
    "train.total_batch_tokens=64",  # 2 micro-batches of 2 × 16 per step on 1 worker: gradient accumulation of 2
    "train.max_steps=8", "train.warmup_steps=2", "train.max_lr=1e-2", "train.min_lr=1e-3", "train.seed=1337",
    "train.autocast=fp32", "eval.val_every=4", "eval.val_batches=2", "eval.sample_every=0", "eval.sample_tokens=4",
    "checkpoint.every=4", "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
    "scaling.threads_per_worker=1", "run.name=golden", "run.max_failures=0",
]
DISTILL = [
    "student.preset=tiny", "student.n_layer=1", "student.block_size=64", "train.total_batch_tokens=128",
    "train.micro_batch=2", "train.seq_len=32", "train.max_steps=6", "train.warmup_steps=1", "train.max_lr=3e-3",
    "train.min_lr=3e-4", "train.seed=1337", "train.autocast=fp32", "distill.temperature=2.0", "distill.alpha=0.5",
    "eval.val_every=3", "eval.val_batches=2", "eval.report_tokens=300", "eval.decode_tokens=8",
    "checkpoint.every=3", "scaling.num_workers=1", "scaling.use_gpu=false", "scaling.cpus_per_worker=1",
    "scaling.threads_per_worker=1", "run.max_failures=0",
]
FINETUNE = [
    "data.txt_delimiter=<LOC>...</LOC>", "data.seq_len=32", "data.val_fraction=0.2", "data.split_seed=0",
    "train.epochs=3", "train.micro_batch=4", "train.lr=3e-3", "train.seed=1337", "train.autocast=fp32",
    "train.patience=null", "samples.prompts=[alpha]", "samples.max_tokens=4", "scaling.num_workers=1",
    "scaling.use_gpu=false", "scaling.cpus_per_worker=1", "scaling.threads_per_worker=1", "run.max_failures=0",
]
FINETUNE_LORA = [*FINETUNE, "train.mode=lora", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.05", "train.lr=1e-2"]
EARLY_EXIT = [
    "model.exit_layer=2", "data.seq_len=16", "data.micro_batch=16", "data.train_batches=4", "data.val_batches=4",
    "data.seed=0", "classifier.hidden_dim=32", "classifier.epochs=5", "classifier.batch_size=64",
    "classifier.lr=3e-3", "classifier.seed=0", "calibration.taus=[0.5, 0.9]", "scaling.num_workers=1",
    "scaling.use_gpu=false", "scaling.cpus_per_worker=1", "scaling.threads_per_worker=1", "run.register_model=false",
    f"run.tracking_uri={OFFLINE_TRACKING}", "run.name=golden",
]

# What each job's sequence holds, in order (index i of a mismatch is found here).
ORDER = {
    "pretrain": "metrics.jsonl records in step order; per record val_loss (steps 0, 4 and the final 8) then loss"
                " (steps 0-7)",
    "distill": "metrics.jsonl records in step order; per record val_loss, teacher_val_loss (steps 0, 3 and the"
               " final 6) then loss (steps 0-5)",
    "finetune_full": "per epoch 1-3: train_loss (mean of the epoch's steps), val_loss",
    "finetune_lora": "per epoch 1-3: train_loss (mean of the epoch's steps), val_loss",
    "early_exit": "per classifier epoch 1-5: classifier_loss, classifier_val_loss",
}
INPUTS = {
    "pretrain": "tests.pretrain_fixtures.write_python_docs_shards(n_docs=60, val_tokens=3000)",
    "distill": "python-docs shards as pretrain; teacher GPT(preset('tiny', block_size=64)) after torch.manual_seed(0)",
    "finetune": "base GPT(preset('tiny', block_size=64)) after torch.manual_seed(0); 24 <LOC>-delimited documents,"
                " each 30 of 12 Greek letter names in rotation",
    "early_exit": "uniform random tokens below 64 (numpy seed 0: 8,000 train, 2,000 val); base GPT(vocab 64, block"
                  " 32, 4 layers × 2 heads × 32) after torch.manual_seed(0), blocks 2-3 c_proj perturbed by"
                  " 0.05·randn",
}


# ------------------------------------------------------------------------------------------------------ inputs


def _python_docs_shards(work: Path) -> Path:
    from tests.pretrain_fixtures import write_python_docs_shards

    return write_python_docs_shards(work / "shards", n_docs=60, val_tokens=3_000)


def _tiny_gpt2(path: Path) -> Path:
    """A random tiny model with GPT-2's vocabulary: the distillation teacher and the fine-tuning base."""
    from gpt2 import GPT, preset

    torch.manual_seed(0)
    GPT(preset("tiny", block_size=64)).save_pretrained(str(path))
    return path


def _domain_corpus(path: Path) -> Path:
    """Repetitive, learnable documents in one delimited file (as tests/test_finetune.py writes its corpus)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(24)]
    path.write_text("".join(f"<LOC>{d}</LOC>\n" for d in docs))
    return path


def _early_exit_inputs(work: Path) -> tuple[Path, Path]:
    """Shards of random tokens below 64 and a random small model over that vocabulary whose deeper blocks are
    perturbed (as tests/test_early_exit_jobs.py does), so the exit and full predictions disagree at part of the
    positions: about 38% of the classifier's labels say "exit is safe" (without the noise 98% would)."""
    from gpt2 import GPT, GPTConfig
    from gpt2.shards import write_shard

    rng = np.random.RandomState(0)
    shards = work / "random-tokens"
    shards.mkdir(parents=True)
    written = [
        write_shard(shards / "rand_val_000000.bin", rng.randint(0, 64, 2_000).astype(np.uint16), "val"),
        write_shard(shards / "rand_train_000000.bin", rng.randint(0, 64, 8_000).astype(np.uint16), "train"),
    ]
    (shards / "manifest.json").write_text(json.dumps({"shards": [dataclasses.asdict(s) for s in written]}))
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=4, n_head=2, n_embd=32))
    with torch.no_grad():
        for block in base.transformer.h[2:]:
            block.mlp.c_proj.weight.add_(0.05 * torch.randn_like(block.mlp.c_proj.weight))
    base.save_pretrained(str(work / "exit-base"))
    return shards, work / "exit-base"


# --------------------------------------------------------------------------------------------------- helpers


def _from_metrics(run_dir: str | Path, keys: tuple[str, ...]) -> Losses:
    """The values of `keys` in the run's metrics.jsonl: record by record in step order, each record's keys in the
    order given. A record that has none of them adds nothing."""
    from cluster.runtime.tracking import read_metrics

    return [float(row[k]) for row in read_metrics(run_dir) for k in keys if k in row]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's thread count for an in-process job: how matmuls and reductions are split, so their rounding, depends
    on it (Ray Train workers set their own from scaling.threads_per_worker)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ jobs
# Each job runs with Ray already initialised where it uses Ray (the ray_session fixture, or main() below).


def pretrain(work: Path) -> Losses:
    """cluster.train.pretrain.run_pretraining on Ray Train, 1 worker: 8 steps of 2 accumulated micro-batches, with
    validation before the first update, mid-run and after the last."""
    from cluster.config import load
    from cluster.config.pretrain import PretrainConfig
    from cluster.train.pretrain import run_pretraining

    shards = _python_docs_shards(work)
    cfg = load(PretrainConfig, None, [*PRETRAIN, f"data.shards={shards}", f"run.root={work / 'runs'}"])
    result = run_pretraining(cfg, OFFLINE_TRACKING)
    if result.error:
        raise RuntimeError(f"pretraining failed: {result.error}")
    return _from_metrics(cfg.run_dir(), ("val_loss", "loss"))


def _distill_config(work: Path, name: str) -> DistillConfig:
    from cluster.config import load
    from cluster.config.distill import DistillConfig

    shards = _python_docs_shards(work)
    teacher = _tiny_gpt2(work / "teacher")
    return load(DistillConfig, None, [*DISTILL, f"teacher.source={teacher}", f"data.shards={shards}",
                                      f"run.root={work / 'runs'}", f"run.name={name}"])


DISTILL_KEYS = ("val_loss", "teacher_val_loss", "loss")


def distill(work: Path) -> Losses:
    """cluster.train.distill.run_in_process: the distillation loop as one worker in this process (no Ray), 6 steps of 2
    accumulated micro-batches."""
    from cluster.train.distill import run_in_process

    cfg = _distill_config(work, "golden-in-process")
    with _torch_threads(1):
        run_in_process(cfg, CPU, OFFLINE_TRACKING)
    return _from_metrics(cfg.run_dir(), DISTILL_KEYS)


def distill_ray(work: Path) -> Losses:
    """cluster.train.distill.run_distillation: the same loop and config on Ray Train, 1 worker (the Ray Train worker
    context, with checkpoints every 3 steps)."""
    from cluster.train.distill import run_distillation

    cfg = _distill_config(work, "golden-ray")
    result = run_distillation(cfg, OFFLINE_TRACKING)
    if result.error:
        raise RuntimeError(f"distillation failed: {result.error}")
    return _from_metrics(cfg.run_dir(), DISTILL_KEYS)


def _finetune(work: Path, overrides: list[str]) -> Losses:
    from cluster.config import load
    from cluster.config.finetune import FinetuneConfig
    from cluster.train.finetune import run

    base = _tiny_gpt2(work / "base")
    corpus = _domain_corpus(work / "domain.txt")
    cfg = load(FinetuneConfig, None, [*overrides, f"model.source={base}", f"data.inputs=[{corpus}]",
                                      f"run.root={work / 'runs'}"])
    run(cfg, search=False, tracking_uri=OFFLINE_TRACKING)
    return _from_metrics(cfg.run_dir(), ("train_loss", "val_loss"))


def finetune_full(work: Path) -> Losses:
    """cluster.train.finetune.run(search=False): data preparation, then the fine-tune on Ray Train (1 worker), 3 epochs
    of every weight, then samples and the (unreachable) registry."""
    return _finetune(work, [*FINETUNE, "run.name=golden-full"])


def finetune_lora(work: Path) -> Losses:
    """As finetune_full with LoRA adapters (rank 4, dropout 0.05) on attn.c_attn."""
    return _finetune(work, [*FINETUNE_LORA, "run.name=golden-lora"])


def early_exit(work: Path) -> Losses:
    """cluster.train.early_exit.run: features from the frozen base, the exit classifier trained for 5 epochs on Ray Train
    (1 worker), tau calibrated and the variant saved."""
    from cluster.config import load
    from cluster.config.early_exit import EarlyExitConfig
    from cluster.train.early_exit import run

    shards, base = _early_exit_inputs(work)
    cfg = load(EarlyExitConfig, None, [*EARLY_EXIT, f"model.source={base}", f"data.shards={shards}",
                                       f"run.root={work / 'runs'}"])
    run(cfg)
    return _from_metrics(cfg.run_dir(), ("classifier_loss", "classifier_val_loss"))


JOBS: dict[str, Callable[[Path], Losses]] = {
    "pretrain": pretrain,
    "distill": distill,
    "distill_ray": distill_ray,
    "finetune_full": finetune_full,
    "finetune_lora": finetune_lora,
    "early_exit": early_exit,
}
CONFIGS: dict[str, dict] = {
    "pretrain": {"overrides": PRETRAIN, "inputs": INPUTS["pretrain"], "order": ORDER["pretrain"]},
    "distill": {"overrides": DISTILL, "inputs": INPUTS["distill"], "order": ORDER["distill"]},
    "distill_ray": {"overrides": DISTILL, "inputs": INPUTS["distill"], "order": ORDER["distill"]},
    "finetune_full": {"overrides": FINETUNE, "inputs": INPUTS["finetune"], "order": ORDER["finetune_full"]},
    "finetune_lora": {"overrides": FINETUNE_LORA, "inputs": INPUTS["finetune"], "order": ORDER["finetune_lora"]},
    "early_exit": {"overrides": EARLY_EXIT, "inputs": INPUTS["early_exit"], "order": ORDER["early_exit"]},
}


# ------------------------------------------------------------------------------------------------- the file


def environment() -> dict[str, str]:
    """What exact float results depend on besides the code: shown next to a mismatch."""
    import ray

    return {"torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def read_golden(path: Path = GOLDEN_FILE) -> dict:
    return json.loads(path.read_text())


def first_difference(expected: list[str], actual: list[str]) -> str | None:
    """None when the float.hex sequences are equal, else where they first differ and how."""
    if expected == actual:
        return None
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e != a:
            return (f"index {i}: stored {e} ({float.fromhex(e)!r}), now {a} ({float.fromhex(a)!r});"
                    f" {len(expected)} stored values, {len(actual)} now")
    common = min(len(expected), len(actual))
    return f"index {common}: lengths differ, {len(expected)} stored values, {len(actual)} now (equal before it)"


def _runs(names: list[str]) -> Iterator[tuple[str, Losses, float]]:
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
            start = time.monotonic()
            values = JOBS[name](Path(tmp))
            yield name, values, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN_FILE} from the current code")
    parser.add_argument("jobs", nargs="*", help=f"only these of {', '.join(JOBS)} (default: all); without --write"
                        " each is compared with the golden file (exit status 1 if any differs)")
    args = parser.parse_args(argv)
    names = args.jobs or list(JOBS)
    if unknown := sorted(set(names) - set(JOBS)):
        parser.error(f"unknown job(s) {unknown}; choose from {', '.join(JOBS)}")
    if args.write and args.jobs:
        parser.error("--write records every job: give no job names")

    from cluster.runtime.ray_env import init_ray
    from cluster.runtime.storage import CACHE_ENV

    os.environ["MLFLOW_TRACKING_URI"] = OFFLINE_TRACKING  # as tests/conftest.py: never a developer's real server
    with tempfile.TemporaryDirectory(prefix="golden-cache-") as cache:
        os.environ[CACHE_ENV] = cache  # node-local copies go to a temporary folder, as in tests/conftest.py
        init_ray("local", num_cpus=4)
        stored = read_golden() if GOLDEN_FILE.is_file() and not args.write else None
        losses: dict[str, list[str]] = {}
        differ = []
        for name, values, seconds in _runs(names):
            losses[name] = [v.hex() for v in values]
            verdict = ""
            if stored and name in stored["losses"]:
                diff = first_difference(stored["losses"][name], losses[name])
                verdict = " | matches the golden file" if diff is None else f" | DIFFERS at {diff}"
                differ += [name] if diff else []
            print(f"{name}: {len(values)} losses in {seconds:.1f} s {[round(v, 4) for v in values]}{verdict}",
                  flush=True)
    if args.write:
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        document = {"losses": losses, "configs": CONFIGS, "environment": environment()}
        GOLDEN_FILE.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {GOLDEN_FILE}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
