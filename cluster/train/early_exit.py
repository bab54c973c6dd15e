"""Early exit as jobs: the exit classifier trained on a frozen backbone with Ray Train, tau calibrated on validation
text, the early-exit variant saved next to the model; and the side-by-side decode timing that the profile job and
the benchmark share.

Every Ray Train worker (`train_loop_per_worker`) runs `train_and_calibrate`, which is plain PyTorch and also runs
without Ray as rank 0 of 1 (`cluster.train.worker.Worker.in_process`):

1. Features and labels (gpt2.early_exit.exit_features_and_labels: backbone in eval mode, no gradients) from
   `data.train_batches` micro-batches of this worker's training windows; label 1 where the exit head's argmax equals
   the full model's.
2. The classifier trained on them (gpt2.early_exit.train_classifier). With several workers it is wrapped in DDP:
   each worker trains on its own windows and gradients are averaged. The classifier is tiny, so extra workers only
   share the backbone passes that make the features.
3. Rank 0: held-out loss and accuracy on the validation split next to the majority-class baseline; the tau sweep
   (gpt2.early_exit.calibrate: exit rate, next-token agreement and perplexity per tau) as CSV and PNG; the chosen
   tau; the early-exit model saved into <run>/model, a copy of the base checkpoint plus early_exit.json/.safetensors,
   which the server and cluster.runtime.models.load_model load as the early-exit variant; MLflow.

Choosing tau: the highest exit rate among the taus whose agreement reaches calibration.target_agreement. When no
swept tau reaches it the run still succeeds, because the trained classifier is worth keeping and re-sweeping is
cheap: it takes the most accurate tau, warns, and records target_reached = 0 in MLflow and the summary. Higher taus
(tau > 1 never exits) or a later exit layer reach the target.

Ray is imported only where a worker or the launcher uses it, so the profile job and the benchmark run without it.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from cluster.config import build, flatten, to_dict
from cluster.config.early_exit import EarlyExitConfig
from cluster.runtime.models import is_mlflow_uri, local_model_dir
from cluster.runtime.tracking import RunLogger
from cluster.train.worker import Worker, worker_threads
from gpt2 import GPT
from gpt2.checkpoint import add_tokenizer_files, atomic_directory, resolve_hub_name
from gpt2.data import ShardedTokenLoader
from gpt2.early_exit import (
    EXIT_CONFIG_FILE,
    EXIT_WEIGHTS_FILE,
    EarlyExitGPT,
    ExitClassifier,
    HeldOut,
    calibrate,
    choose_threshold,
    exit_features_and_labels,
    held_out,
    save_early_exit,
    train_classifier,
)
from gpt2.generate import stream

STANDARD, EARLY_EXIT = "standard", "early-exit"
MODEL_SUBDIR = "model"
# Files of a base checkpoint that do not belong in the early-exit copy: training state, and any earlier classifier
# (save_early_exit writes the new one).
NOT_COPIED = ("trainer_state.pt", "worker_state_rank*.pt", EXIT_CONFIG_FILE, EXIT_WEIGHTS_FILE, ".*")


# ---------------------------------------------------------------------------------------------------- data


def resolve_model_dir(source: str) -> Path:
    """A local checkpoint directory for model.source: an MLflow model is downloaded, a hub name looked up."""
    if is_mlflow_uri(source):
        return Path(local_model_dir(source))
    if Path(source).is_dir():
        return Path(source)
    return resolve_hub_name(source)


def token_batches(
    shards: str | Path, B: int, T: int, split: str, count: int, *, rank: int = 0, world: int = 1, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (x, y) micro-batches of (B, T) for one worker: the train split's next batches in the loader's shuffled
    order, or the validation split's first ones in file order (count 0: the whole validation split)."""
    loader = ShardedTokenLoader(shards, B, T, rank=rank, world_size=world, split=split, seed=seed)
    if split == "train":
        return [loader.next_batch() for _ in range(count)]
    return list(itertools.islice(loader, count or None))


def features_and_labels(
    base: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], exit_layer: int, head_features: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier data (N, F), (N,) from token batches, one row per position whose target is not masked (the
    validation split's last window of a shard repeats positions that an earlier window covered)."""
    device = base.transformer.wte.weight.device
    rows = [exit_features_and_labels(base, x.to(device), exit_layer, head_features=head_features, targets=y)
            for x, y in batches]
    features, labels = (torch.cat(parts) for parts in zip(*rows))
    return features, labels


# ---------------------------------------------------------------------------------------------------- calibration


def choose_tau(rows: Sequence[dict], target: float) -> tuple[float, bool]:
    """(tau, whether it reaches the target): the highest exit rate at agreement >= target, else the most accurate
    tau (ties: the higher exit rate)."""
    if any(r["agreement"] >= target for r in rows):
        return choose_threshold(rows, target), True
    return max(rows, key=lambda r: (r["agreement"], r["exit_rate"]))["tau"], False


def write_calibration_csv(rows: Sequence[dict], chosen_tau: float, path: str | Path) -> Path:
    """One line per tau with calibrate's columns and `chosen` (1 for the saved threshold); empty cells for None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "chosen"])
        writer.writeheader()
        for row in rows:
            cells = {k: "" if v is None else v for k, v in row.items()}
            writer.writerow({**cells, "chosen": int(row["tau"] == chosen_tau)})
    return path


def copy_base_checkpoint(source: str | Path, target: str | Path) -> None:
    """Make `target` a copy of the base checkpoint's model files (with the tokenizer files, also when an older base
    lacks them), replacing any earlier `target` in one rename."""
    with atomic_directory(target, create=False) as tmp:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED))
        add_tokenizer_files(tmp)


# ---------------------------------------------------------------------------------------------------- the worker


def train_and_calibrate(
    cfg: EarlyExitConfig,
    model_dir: str | Path,
    worker: Worker | None = None,
    *,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> dict | None:
    """One worker's part of the job (see the module docstring); by default this process as the only worker. Rank 0
    returns the summary, other ranks None. With several workers the classifier trains under DDP."""
    worker = worker or Worker.in_process(torch.device("cpu"))
    rank, world, device = worker.rank, worker.world, worker.device
    d, c = cfg.data, cfg.classifier
    base = GPT.from_pretrained(str(model_dir), device=device)  # eval mode; features are made without gradients
    exit_layer = cfg.exit_layer(base.config)
    train = token_batches(
        d.shards, d.micro_batch, d.seq_len, "train", d.train_batches, rank=rank, world=world, seed=d.seed
    )
    features, labels = features_and_labels(base, train, exit_layer, c.head_features)
    val = val_features = val_labels = None
    if worker.is_main:  # held-out metrics come from rank 0 alone; they are not a collective
        # One backbone pass per validation batch serves both the classifier's held-out metrics and the tau sweep.
        val = [held_out(base, batch, exit_layer, head_features=c.head_features)
               for batch in token_batches(d.shards, d.micro_batch, d.seq_len, "val", d.val_batches)]
        val_features, val_labels = (torch.cat(parts) for parts in zip(*(b.features_and_labels() for b in val)))
    torch.manual_seed(c.seed)  # the same initial classifier on every worker
    classifier = ExitClassifier(base.config.n_embd, c.hidden_dim, c.head_features).to(device)
    history = train_classifier(
        worker.wrap(classifier), features, labels, epochs=c.epochs, batch_size=c.batch_size,
        lr=c.lr, weight_decay=c.weight_decay, balance_classes=c.balance_classes, val_features=val_features,
        val_labels=val_labels, seed=c.seed, on_epoch=_print_epoch(c.epochs) if worker.is_main else None,
    )
    if not worker.is_main:
        return None
    model = EarlyExitGPT(base, exit_layer, classifier=classifier.eval()).eval()
    # The best constant guess, chosen on the training labels and scored on the held-out ones.
    majority = float(labels.mean() >= 0.5)
    baseline = float((val_labels == majority).float().mean())
    return _calibrate_and_save(cfg, model, model_dir, history, baseline, int(labels.numel()), val, tags, tracking_uri)


def _print_epoch(epochs: int) -> Callable[[dict], None]:
    """The classifier's progress, one line per epoch as the other training jobs print it."""

    def show(entry: dict) -> None:
        held_out = f" | val_accuracy {entry['val_accuracy']:.4f}" if "val_accuracy" in entry else ""
        print(f"epoch {entry['epoch']}/{epochs} | classifier loss {entry['loss']:.4f} | accuracy"
              f" {entry['accuracy']:.4f}{held_out}", flush=True)

    return show


def _calibrate_and_save(
    cfg: EarlyExitConfig,
    model: EarlyExitGPT,
    model_dir: str | Path,
    history: list[dict],
    baseline: float,
    train_positions: int,
    val: list[HeldOut],
    tags: Mapping[str, str] | None,
    tracking_uri: str | None,
) -> dict:
    from cluster.eval.plots import plot_exit_calibration

    run_dir = Path(cfg.run_dir())
    target = cfg.calibration.target_agreement
    logger = RunLogger(
        run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=tracking_uri or cfg.run.tracking_uri,
        params={**flatten(to_dict(cfg)), "exit_layer": model.exit_layer, "base_model_dir": str(model_dir)},
        tags=dict(tags or {}),
    )
    for entry in history:
        logger.log_metrics({f"classifier_{k}": v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])

    rows = calibrate(model, val, cfg.calibration.taus)
    tau, reached = choose_tau(rows, target)
    chosen = next(r for r in rows if r["tau"] == tau)
    model.threshold = tau
    output = run_dir / MODEL_SUBDIR
    copy_base_checkpoint(model_dir, output)
    save_early_exit(model, output)
    csv_path = write_calibration_csv(rows, tau, run_dir / "calibration.csv")
    png_path = plot_exit_calibration(
        rows, run_dir / "calibration.png", chosen_tau=tau, target=target,
        title=f"{cfg.run.name}: exit after block {model.exit_layer} of {model.config.n_layer}",
    )
    last = history[-1]
    summary = {
        "exit_layer": model.exit_layer,
        "n_layer": model.config.n_layer,
        "tau": tau,
        "target_agreement": target,
        "target_reached": float(reached),
        "exit_rate": chosen["exit_rate"],
        "agreement": chosen["agreement"],
        # Of the positions that exit at tau, the share whose exit prediction is the full model's: the
        # classifier's precision on held-out text (None when nothing exits).
        "precision_at_tau": chosen["agreement_exited"],
        "perplexity": chosen["perplexity"],
        "perplexity_full": chosen["perplexity_full"],
        "mean_blocks": chosen["mean_blocks"],
        "classifier_loss": last["loss"],
        "classifier_accuracy": last["accuracy"],
        "classifier_val_loss": last["val_loss"],
        "classifier_val_accuracy": last["val_accuracy"],
        "majority_baseline": baseline,
        "train_positions": train_positions,
        "val_positions": sum(int(batch.valid.sum()) for batch in val),
    }
    if not reached:
        best = max(r["agreement"] for r in rows)
        print(
            f"WARNING: no swept tau reaches next-token agreement {target:.3f} (best {best:.4f} at tau={tau});"
            f" saved tau={tau}, the most accurate one. Sweep higher taus (calibration.taus) or exit later"
            " (model.exit_layer).",
            file=sys.stderr,
        )
    # The classifier_* figures are the last epoch's, already logged with the history.
    final = {k: float(v) for k, v in summary.items() if v is not None and not k.startswith("classifier_")}
    logger.log_metrics(final, step=cfg.classifier.epochs)
    logger.set_tags({"target_reached": str(reached).lower(), "kind": "early-exit"})
    for path in (csv_path, png_path, output / EXIT_CONFIG_FILE):
        logger.log_artifact(path)
    model_uri = _register(logger, cfg, output, model, chosen) if cfg.run.register_model else None
    logger.close()
    summary.update(
        model_dir=str(output.resolve()), calibration_csv=str(csv_path.resolve()),
        calibration_png=str(png_path.resolve()), model_uri=model_uri, mlflow_run_id=logger.run_id,
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _register(
    logger: RunLogger, cfg: EarlyExitConfig, output: Path, model: EarlyExitGPT, chosen: Mapping[str, float]
) -> str | None:
    """The early-exit model in `output` as a new registry version. Its val_loss is the loss of the early-exit
    predictions on the held-out windows (log perplexity), so `champion` is the variant that predicts best with its
    exits."""
    note = (
        f"Exits after block {model.exit_layer} of {model.config.n_layer} where the exit classifier's confidence"
        f" reaches tau = {model.threshold:g}: on held-out text {chosen['exit_rate']:.1%} of the tokens exit, the"
        f" next-token agreement with the full model is {chosen['agreement']:.4f} and the perplexity"
        f" {chosen['perplexity']:.4g} (full model: {chosen['perplexity_full']:.4g}). The card below is the base"
        f" model's ({cfg.model.source})."
    )
    tags = {"val_loss": math.log(chosen["perplexity"]), "base_model": cfg.model.source,
            "exit_layer": model.exit_layer, "tau": model.threshold, "exit_rate": chosen["exit_rate"]}
    return logger.log_model(output, "early-exit", registered_name=cfg.run.registered_model, note=note, tags=tags)


def train_loop_per_worker(config: dict) -> dict | None:
    """The Ray Train worker: `train_and_calibrate` on this worker's rank; rank 0's summary becomes the run's
    Result.return_value (reported metrics without a checkpoint are not kept by Ray Train)."""
    cfg = build(EarlyExitConfig, config["early_exit"])
    worker = Worker.ray_train(worker_threads(cfg.scaling.threads_per_worker, cfg.scaling.cpus_per_worker))
    return train_and_calibrate(cfg, config["model_dir"], worker, tags=config["tags"],
                               tracking_uri=config["tracking_uri"])


# ---------------------------------------------------------------------------------------------------- the driver


def run(cfg: EarlyExitConfig, tracking_uri: str | None = None) -> dict:
    """Validate, resolve the base model, train and calibrate on Ray Train; the rank-0 summary. MLflow:
    `tracking_uri`, else run.tracking_uri, else $MLFLOW_TRACKING_URI, else the local server."""
    from cluster.runtime.tracking import run_tags
    from cluster.train import launcher

    cfg.validate()
    model_dir = resolve_model_dir(cfg.model.source).resolve()
    cfg.check_model(model_dir)  # again, for a model that only now is on disk (MLflow, hub cache)
    config = launcher.absolute_paths(to_dict(cfg), [("run", "root"), ("data", "shards")])
    s = cfg.scaling
    tags = {**run_tags(cfg.run.name, s.num_workers, s.use_gpu), "base_model": cfg.model.source}
    result = launcher.launch(
        train_loop_per_worker, {"early_exit": config, "model_dir": str(model_dir), "tags": tags},
        scaling=s, run=cfg.run, run_dir=str(Path(cfg.run_dir()).resolve()), tracking=tracking_uri,
    )
    if result.error:
        raise RuntimeError(f"early-exit training failed: {result.error}")
    if result.return_value is None:
        raise RuntimeError(f"the run in {Path(cfg.run_dir()).resolve()} finished without rank 0's summary")
    return result.return_value


# ---------------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class DecodeTiming:
    tokens: int  # new tokens over all decodes
    seconds: float  # the model's own time over all decodes: prefill, decode steps and sampling
    step_seconds: tuple[float, ...]  # each decode step after a decode's first token: the latency per generated token
    exit_rate: float | None  # early-exit models: the share of decode-step positions that exited

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def latency_ms(self, percentile: float) -> float:
        return 1000 * float(np.percentile(self.step_seconds, percentile))


def time_decoding(
    models: Mapping[str, nn.Module], prompts: Sequence[list[int]], new_tokens: int
) -> dict[str, DecodeTiming]:
    """Greedy decoding, batch 1, of `new_tokens` for each prompt with each model (gpt2.generate.stream; end-of-text
    does not stop a decode, so every model generates as many tokens from the same prompts).

    The models decode a prompt in lockstep, one token each in turn, and each step is timed on its own: a machine busy
    with other work then slows them alike, however briefly. A step's time is the model's forward and sampling; the
    first step of a decode includes the prompt's prefill and is left out of the per-token latencies. One unmeasured
    two-token decode per model warms up first.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (latency is measured between tokens), got {new_tokens}")
    for model in models.values():
        list(stream(model, [prompts[0]], 2, temperature=0, stop_at_eot=False))
    seconds = dict.fromkeys(models, 0.0)
    steps: dict[str, list[float]] = {name: [] for name in models}
    exits = {name: [0, 0] for name, model in models.items() if isinstance(model, EarlyExitGPT)}  # exited, positions
    for prompt in prompts:
        decodes = {
            name: stream(model, [prompt], new_tokens, temperature=0, stop_at_eot=False)
            for name, model in models.items()
        }
        for step in range(new_tokens):
            for name, decode in decodes.items():
                start = time.perf_counter()
                next(decode)
                took = time.perf_counter() - start
                seconds[name] += took
                if step:
                    steps[name].append(took)
                elif name in exits:
                    models[name].reset_stats()  # the prompt is prefilled: count decode steps only
        for name, decode in decodes.items():
            decode.close()
            if name in exits:
                stats = models[name].reset_stats()
                exits[name][0] += stats.exited
                exits[name][1] += stats.tokens
    return {
        name: DecodeTiming(
            tokens=new_tokens * len(prompts),
            seconds=seconds[name],
            step_seconds=tuple(steps[name]),
            exit_rate=exits[name][0] / exits[name][1] if name in exits else None,
        )
        for name in models
    }


def validation_quality(
    model: EarlyExitGPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], threshold: float
) -> dict[str, dict[str, float]]:
    """Exit rate, next-token agreement with the full model, and perplexity on validation batches for the backbone
    alone (STANDARD: exit rate 0 and agreement 1 by definition) and at `threshold` (EARLY_EXIT), from one pass."""
    (row,) = calibrate(model, batches, [threshold])
    return {
        STANDARD: {"exit_rate": 0.0, "agreement": 1.0, "perplexity": row["perplexity_full"]},
        EARLY_EXIT: {key: row[key] for key in ("exit_rate", "agreement", "perplexity")},
    }
