"""Fine-tuning on Ray: a Ray Tune learning-rate search (ASHA), then the full fine-tune on Ray Train, all in MLflow.

One epoch loop (`finetune_loop`) serves both: as a Tune *function trainable* for the search trials, and as the
`train_loop_per_worker` of a TorchTrainer for the final run. Trials are function trainables, one process each,
because a trial on this scale (a small domain corpus, a few epochs) fits one worker: wrapping a TorchTrainer per
trial would add a worker group and a controller per trial (seconds of start-up each, and a CPU apiece that a 2-core
machine does not have) for no parallelism inside the trial. The final run is a TorchTrainer so it scales to DDP
over many GPUs with `scaling.num_workers`.

When a trial already ran the final fine-tune's recipe (the same epochs, on one CPU worker), its best epoch *is* that
fine-tune: the job adopts it (`adopt_trial`) instead of training the same model a second time.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.tune
import torch

from cluster.config import build, flatten, to_dict
from cluster.config.finetune import FinetuneConfig
from cluster.runtime.models import load_model
from cluster.runtime.tracking import RunLogger, read_metrics, run_tags
from cluster.train import launcher
from cluster.train.worker import Worker, worker_threads
from gpt2.checkpoint import atomic_directory
from gpt2.finetune_data import EarlyStopping, PackedSequences, encode_documents, pack_documents, split_documents
from gpt2.train import TrainConfig, evaluate_loss, make_optimizer, train_step

WIKITEXT_ARTICLE = re.compile(r"^ = [^=].* = \n?$")  # a top-level heading (" = Title = ") starts an article


# ---------------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DomainData:
    train: PackedSequences
    val: PackedSequences
    documents: tuple[int, int]  # (train, val) document counts

    def summary(self) -> str:
        return (
            f"{self.documents[0]} train / {self.documents[1]} val documents; {len(self.train)} / {len(self.val)} sequences;"
            f" {self.train.num_targets:,} / {self.val.num_targets:,} target tokens"
        )


def load_documents(cfg: FinetuneConfig) -> list[str]:
    """The domain documents, read with the data pipeline's readers; any unreadable part is an error naming where."""
    d = cfg.data
    if d.dataset == "wikitext-2":
        from gpt2.wikitext import wikitext2_rows

        return _wikitext_articles(wikitext2_rows("train", local=d.inputs[0] if d.inputs else None))
    from cluster.data.sources import SourceSpec, iter_documents, resolve_source

    source = resolve_source(SourceSpec(kind="files", inputs=d.inputs, text_field=d.text_field, txt_delimiter=d.txt_delimiter))
    documents = []
    for table in iter_documents(source):
        for text, problem, where in zip(*(table.column(c).to_pylist() for c in ("text", "problem", "where"))):
            if problem:
                raise ValueError(f"{where}: {problem}")
            if text and text.strip():
                documents.append(text)
    if not documents:
        raise ValueError(f"no documents with text in {', '.join(d.inputs)}")
    return documents


def _wikitext_articles(rows: list[str]) -> list[str]:
    articles: list[list[str]] = []
    for row in rows:
        if WIKITEXT_ARTICLE.match(row) or not articles:
            articles.append([])
        articles[-1].append(row)
    return [text for text in ("".join(a).strip() for a in articles) if text]


def prepare_data(cfg: FinetuneConfig) -> DomainData:
    documents = load_documents(cfg)[: cfg.data.max_documents]
    train_docs, val_docs = split_documents(documents, cfg.data.val_fraction, seed=cfg.data.split_seed)
    pack = lambda docs: pack_documents([t for t in encode_documents(docs) if t], cfg.data.seq_len)  # noqa: E731
    return DomainData(pack(train_docs), pack(val_docs), (len(train_docs), len(val_docs)))


# ------------------------------------------------------------------------------------------------- worker loop


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


EPOCH_METRICS = ("train_loss", "val_loss", "best_val_loss", "best_epoch", "epochs_since_best", "stopped_early",
                 "tokens_seen")  # what each epoch logs to MLflow (and reports, with "epoch")


def finetune_loop(config: dict) -> None:
    """Epochs of fine-tuning at config["lr"]; reports val_loss per epoch (Tune: ASHA's signal; Train: the run)."""
    cfg = build(FinetuneConfig, config["finetune"])
    worker = (Worker.ray_train if config["session"] == "train" else Worker.tune_trial)(config["threads"])
    lr = float(config["lr"])
    epochs = int(config["epochs"])
    device = worker.device
    data: DomainData = ray.get(config["data"])

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.source, device=device).train()
    if cfg.train.mode == "lora":
        from gpt2.lora import apply_lora

        apply_lora(model, cfg.lora.build())
    B, T = cfg.train.micro_batch, cfg.data.seq_len
    steps_per_epoch = max(1, math.ceil(len(data.train) / (B * worker.world)))
    tcfg = TrainConfig(
        total_batch_tokens=B * T * worker.world, micro_batch=B, seq_len=T, max_steps=epochs * steps_per_epoch,
        max_lr=lr, min_lr=lr * cfg.train.min_lr_ratio,
        warmup_steps=max(1, int(cfg.train.warmup_fraction * epochs * steps_per_epoch)),
        weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip, autocast=cfg.train.autocast,
        seed=cfg.train.seed,
    )
    optimizer = make_optimizer(model, tcfg, device.type)
    stopper = EarlyStopping(cfg.train.patience, cfg.train.min_delta)
    start_epoch = 0
    checkpoint = worker.checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "finetune_state.pt", weights_only=True, map_location=device)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        stopper.load_state_dict(state["stopper"])
        start_epoch = state["epoch"] + 1
    trained = worker.wrap(model)
    _, amp = worker.autocast(cfg.train.autocast)
    logger = _trial_logger(config, cfg, lr) if worker.is_main else None
    best_dir = config.get("best_dir")
    if config["session"] == "tune" and config.get("export_best"):
        best_dir = str(Path(ray.tune.get_context().get_trial_dir()) / BEST)

    for epoch in range(start_epoch, epochs):
        batches = _epoch_batches(data.train, B, steps_per_epoch, worker, seed=cfg.train.seed + epoch)
        losses = [
            train_step(trained, optimizer, batches, epoch * steps_per_epoch + s, tcfg, 1, device=device, autocast=amp).loss
            for s in range(steps_per_epoch)
        ]
        val_rows = torch.arange(worker.rank, len(data.val), worker.world)
        val_batches = ((data.val.inputs[r], data.val.targets[r]) for r in val_rows.split(B))
        val_loss = evaluate_loss(trained, val_batches, len(data.val), device=device, autocast=amp)
        verdict = stopper.update(epoch, val_loss)
        metrics = {
            "epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "val_loss": val_loss,
            "best_val_loss": stopper.best_loss, "best_epoch": (stopper.best_epoch or 0) + 1,
            "epochs_since_best": verdict.epochs_since_best, "stopped_early": float(verdict.should_stop),
            "tokens_seen": (epoch + 1) * steps_per_epoch * tcfg.total_batch_tokens,
        }
        if logger:
            logger.log_metrics({k: float(metrics[k]) for k in EPOCH_METRICS}, step=epoch + 1)
            if worker.session == "train":  # a search's trials report through Tune's own table instead
                print(f"epoch {epoch + 1}/{epochs} | train_loss {metrics['train_loss']:.4f} | val_loss {val_loss:.4f}",
                      flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            directory = None
            if worker.is_main:
                if verdict.is_best and best_dir:
                    _export_best(model, cfg, Path(best_dir))
                directory = tmp
                torch.save(
                    {"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                     "stopper": stopper.state_dict(), "epoch": epoch},
                    Path(tmp) / "finetune_state.pt",
                )
            worker.report(metrics, directory)
        if verdict.should_stop:
            break
    if logger:
        logger.close()


def _epoch_batches(packed: PackedSequences, B: int, steps: int, worker: Worker, seed: int):
    """This worker's micro-batches for one epoch: a seeded shuffle of every row, dealt to the workers so each does
    the same number of steps (DDP needs that); the few rows needed to fill the last step come round again."""
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed))
    needed = steps * B * worker.world
    order = order.repeat(math.ceil(needed / len(order)))[:needed]
    mine = order.view(steps, worker.world, B)[:, worker.rank]  # (steps, B)
    return iter((packed.inputs[rows], packed.targets[rows]) for rows in mine)


BEST, ADAPTERS = "best", "best_adapters"  # the best epoch's model, and beside it (LoRA) its adapters


def _export_best(model, cfg: FinetuneConfig, best_dir: Path) -> None:
    """The best epoch's model as a plain checkpoint (LoRA merged in, adapters saved beside it as ADAPTERS)."""
    if cfg.train.mode == "lora":
        from gpt2.lora import merge_lora, save_adapters

        merge_lora(model).save_pretrained(str(best_dir))
        save_adapters(model, best_dir.parent / ADAPTERS, base_model=cfg.model.source)
    else:
        model.save_pretrained(str(best_dir))


def _trial_logger(config: dict, cfg: FinetuneConfig, lr: float) -> RunLogger | None:
    tracking = config.get("tracking")
    if not tracking:
        return None
    if config["session"] == "tune":  # a child run of the search's parent run
        name = ray.tune.get_context().get_trial_name()
        return RunLogger(
            Path(tracking["search_dir"]) / "trials" / name, experiment=cfg.run.experiment, run_name=f"{name} lr={lr:.3g}",
            uri=tracking.get("uri"), params={"lr": lr, **flatten(config["finetune"])},
            tags={"mlflow.parentRunId": tracking["parent_run_id"], "trial": name},
        )
    return RunLogger(
        tracking["run_dir"], experiment=cfg.run.experiment, run_name=cfg.run.name, uri=config["tracking_uri"],
        params={"lr": lr, **flatten(config["finetune"])}, tags=tracking.get("tags", {}),
    )


# ------------------------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class SearchResult:
    best_lr: float
    best_val_loss: float
    rows: list[dict]  # trial, lr, best_val_loss, epochs_run, status
    csv_path: Path
    best_trial: Path  # the best trial's directory; holds BEST when the trials exported their best epochs
    best_history: list[dict]  # the best trial's reports, one per epoch (finetune_loop's metrics)
    best_status: str


REUSABLE = ("completed", "early-stopped (patience)")  # trials that ran the whole recipe (ASHA cut the others short)


def trials_run_the_finetune(cfg: FinetuneConfig) -> bool:
    """Whether a search trial trains exactly what the final fine-tune would: the same epochs (so the same schedule
    and early stopping) on one CPU process, as the trials do. Then the best trial's best epoch is the fine-tuned
    model, and training it again would only repeat the work (and its float rounding)."""
    return cfg.search.epochs == cfg.train.epochs and cfg.scaling.num_workers == 1 and not cfg.scaling.use_gpu


def _abs_config(cfg: FinetuneConfig) -> dict:
    return launcher.absolute_paths(to_dict(cfg), [("run", "root"), ("data", "inputs"), ("model", "source")])


def run_search(cfg: FinetuneConfig, data_ref, tracking_uri: str | None = None) -> SearchResult:
    """The learning-rate search: one function-trainable trial per learning rate, ASHA stopping the bad ones early.

    Results live under <run>/search/tune, so re-running after the driver died resumes the unfinished trials.
    """
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.search
    search_dir = Path(cfg.run_dir()).resolve() / "search"
    search_dir.mkdir(parents=True, exist_ok=True)
    parent = RunLogger(
        search_dir, experiment=cfg.run.experiment, run_name=f"{cfg.run.name}-lr-search", uri=tracking_uri,
        params={f"search.{k}": v for k, v in flatten(to_dict(s)).items()}, tags={"kind": "lr-search"},
    )
    space = ray.tune.grid_search(list(s.lrs)) if s.num_samples == 0 else ray.tune.loguniform(s.low, s.high)
    param_space = {
        "lr": space, "epochs": s.epochs, "session": "tune", "data": data_ref, "finetune": _abs_config(cfg),
        "export_best": trials_run_the_finetune(cfg),
        "threads": worker_threads(0, s.cpus_per_trial),
        "tracking": {"uri": parent.uri, "parent_run_id": parent.run_id, "search_dir": str(search_dir)}
        if parent.run_id else None,
    }
    trainable = ray.tune.with_resources(finetune_loop, {"cpu": s.cpus_per_trial})
    storage = str(search_dir)
    # Saving the search's state with every trial checkpoint is intended (see checkpoint_config below); Tune warns
    # when that happens more than once in 5 s, which every epoch of a small search does.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.tune.Tuner.can_restore(str(search_dir / "tune")):
        print(f"resuming the learning-rate search in {search_dir / 'tune'}")
        tuner = ray.tune.Tuner.restore(
            str(search_dir / "tune"), trainable=trainable, param_space=param_space, resume_errored=True
        )
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                metric="val_loss", mode="min", num_samples=max(1, s.num_samples),
                scheduler=ASHAScheduler(max_t=s.epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor),
                max_concurrent_trials=s.max_concurrent,
            ),
            # A trial whose actor dies (its node lost, the process killed) starts again from its newest epoch
            # checkpoint instead of leaving a hole in the search. That newest one is all a trial needs (its best
            # model is exported on its own), and keeping one makes Tune save the search's state with every trial
            # checkpoint rather than every 10 s or more: a driver killed just after a trial's last epoch resumes
            # knowing that epoch, instead of running it again.
            run_config=ray.tune.RunConfig(name="tune", storage_path=storage,
                                          failure_config=ray.tune.FailureConfig(max_failures=cfg.run.max_failures),
                                          checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1)),
        )
    grid = tuner.fit()
    rows, results = [], {}
    for result in grid:
        history = result.metrics_dataframe
        epochs_run = int(result.metrics.get("epoch", 0)) if result.metrics else 0
        best = float(history["val_loss"].min()) if history is not None and "val_loss" in history else math.nan
        if result.error:
            status = f"error: {type(result.error).__name__}"
        elif result.metrics.get("stopped_early"):
            status = "early-stopped (patience)"
        elif epochs_run < s.epochs:
            status = "stopped by ASHA"
        else:
            status = "completed"
        rows.append({"trial": Path(result.path).name, "lr": float(result.config["lr"]), "best_val_loss": best,
                     "epochs_run": epochs_run, "status": status})
        results[rows[-1]["trial"]] = result
    rows.sort(key=lambda r: r["lr"])
    finished = [r for r in rows if not math.isnan(r["best_val_loss"])]
    if not finished:
        parent.close(status="FAILED")
        raise RuntimeError(f"every trial of the learning-rate search failed: {rows}")
    best = min(finished, key=lambda r: r["best_val_loss"])
    csv_path = search_dir / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    parent.log_metrics({"best_lr": best["lr"], "best_val_loss": best["best_val_loss"]}, step=0)
    parent.log_artifact(csv_path)
    parent.close()
    winner = results[best["trial"]]
    # One row per epoch (a trial restarted from its epoch checkpoint reports the later epochs again: keep the last).
    epochs = {int(r["epoch"]): r for r in winner.metrics_dataframe.to_dict("records")}
    history = [{"epoch": e, **{k: float(epochs[e][k]) for k in EPOCH_METRICS}} for e in sorted(epochs)]
    return SearchResult(best["lr"], best["best_val_loss"], rows, csv_path, Path(winner.path), history, best["status"])


def adopt_trial(cfg: FinetuneConfig, search: SearchResult, tracking_uri: str | None = None) -> dict | None:
    """Make the best trial's exported best epoch the fine-tune's result, when that trial ran the fine-tune's recipe
    to its end: copy it to <run>/best (and its LoRA adapters), and give the fine-tune its own MLflow run holding the
    trial's per-epoch metrics. Returns the last epoch's metrics, as a Train run's result would, or None when the
    search could not stand in for the fine-tune (then it must be trained)."""
    exported = search.best_trial / BEST
    if not (trials_run_the_finetune(cfg) and search.best_status in REUSABLE and (exported / "config.json").is_file()):
        return None
    run_dir = Path(cfg.run_dir()).resolve()
    for name in (BEST, ADAPTERS) if cfg.train.mode == "lora" else (BEST,):
        with atomic_directory(run_dir / name, create=False) as tmp:
            shutil.copytree(search.best_trial / name, tmp)
    logger = RunLogger(
        run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=tracking_uri,
        params={"lr": search.best_lr, **flatten(_abs_config(cfg))},
        tags={**_finetune_tags(cfg), "from_search_trial": search.best_trial.name},
    )
    if not read_metrics(run_dir):  # a job re-run after a crash has logged them already
        for m in search.best_history:
            logger.log_metrics({k: float(m[k]) for k in EPOCH_METRICS}, step=int(m["epoch"]))
    logger.close()
    return search.best_history[-1]


def _finetune_tags(cfg: FinetuneConfig) -> dict[str, str]:
    """The fine-tune run's MLflow tags, whether Ray Train trains it or a search trial is adopted."""
    s = cfg.scaling
    return {**run_tags(cfg.run.name, s.num_workers, s.use_gpu), "kind": "finetune"}


def run_finetune(cfg: FinetuneConfig, lr: float, data_ref, tracking_uri: str | None = None) -> ray.train.Result:
    """The fine-tune itself on Ray Train; the best epoch's model is exported to <run>/best."""
    run_dir = Path(cfg.run_dir()).resolve()
    s = cfg.scaling
    return launcher.launch(
        finetune_loop,
        {
            "lr": lr, "epochs": cfg.train.epochs, "session": "train", "data": data_ref, "finetune": _abs_config(cfg),
            "threads": worker_threads(s.threads_per_worker, s.cpus_per_worker), "best_dir": str(run_dir / BEST),
            "tracking": {"run_dir": str(run_dir),  # the URI: the launcher's "tracking_uri"
                         "tags": _finetune_tags(cfg)},
        },
        scaling=s, run=cfg.run, run_dir=str(run_dir), keep_checkpoints=1, tracking=tracking_uri,
    )


def write_samples(cfg: FinetuneConfig, model_dir: Path) -> str:
    """Samples from the fine-tuned model with the configured prompts, sampling options and seed."""
    from gpt2.generate import generate
    from gpt2.tokenizer import get_tokenizer

    s = cfg.samples
    enc = get_tokenizer()
    model = load_model(str(model_dir))
    pieces = []
    for i, prompt in enumerate(s.prompts):
        room = model.config.block_size - len(enc.encode(prompt))
        tokens = generate(model, enc.encode(prompt), min(s.max_tokens, room), temperature=s.temperature,
                          top_k=s.top_k, seed=s.seed + i)[0]
        pieces.append(f"--- prompt: {prompt!r} (top-k {s.top_k}, temperature {s.temperature}, seed {s.seed + i})\n"
                      f"{prompt}{enc.decode(tokens)}\n")
    return "\n".join(pieces)


def finish_run(
    cfg: FinetuneConfig, lr: float, search: SearchResult | None, tracking_uri: str | None, last: dict,
) -> dict:
    """After training: samples, the search table, the registered model, all logged into the fine-tune's MLflow run.
    `last`: the metrics of the last epoch, from which the best epoch's token count follows."""
    run_dir = Path(cfg.run_dir()).resolve()
    best = run_dir / BEST
    if not (best / "config.json").is_file():
        raise RuntimeError(f"the fine-tune did not export a best model to {best}")
    samples = write_samples(cfg, best)
    logger = RunLogger(run_dir, experiment=cfg.run.experiment, run_name=cfg.run.name, uri=tracking_uri)
    logger.log_text(samples, "samples.txt")
    if search:
        logger.log_artifact(search.csv_path)
        logger.set_tags({"lr_search_best_lr": str(search.best_lr)})
    if cfg.train.mode == "lora":
        logger.log_artifact(run_dir / ADAPTERS, "adapters")
    # Every epoch trains on the same number of tokens; the exported model is the best epoch's.
    tokens_seen = int(last["tokens_seen"]) // int(last["epoch"]) * int(last["best_epoch"])
    model_uri = logger.log_model(best, "finetuned", registered_name=cfg.run.registered_model,
                                 tags={"tokens_seen": tokens_seen})
    logger.close()
    return {"best_dir": str(best), "samples": samples, "model_uri": model_uri, "lr": lr, "run_id": logger.run_id}


def run(cfg: FinetuneConfig, *, search: bool, tracking_uri: str | None = None) -> dict:
    """The whole job: data, optional search, the fine-tune at the chosen learning rate, samples and registration.
    MLflow: `tracking_uri`, else run.tracking_uri, else $MLFLOW_TRACKING_URI, else the local server, for every run
    the job logs (the search's, the trials', the fine-tune's)."""
    cfg.validate(search=search)
    tracking_uri = tracking_uri or cfg.run.tracking_uri
    data = prepare_data(cfg)
    print(f"domain data: {data.summary()}")
    data_ref = ray.put(data)
    result = run_search(cfg, data_ref, tracking_uri) if search else None
    lr = result.best_lr if result else cfg.train.lr
    if result:
        print(_table(result.rows))
        print(f"best learning rate: {lr:g} (val loss {result.best_val_loss:.4f}); results in {result.csv_path}")
    last = adopt_trial(cfg, result, tracking_uri) if result else None
    adopted = last is not None
    if adopted:
        print(f"the fine-tune is the best trial's best epoch ({result.best_trial.name}): the trial trained the same "
              f"recipe ({cfg.train.epochs} epochs at lr {lr:g}, one worker), so it is not trained again")
    else:
        fit = run_finetune(cfg, lr, data_ref, tracking_uri)
        if fit.error:
            raise RuntimeError(f"the fine-tune failed: {fit.error}")
        last = fit.metrics
    summary = finish_run(cfg, lr, result, tracking_uri, last)
    summary["search"] = result
    summary["metrics"] = last
    summary["adopted_trial"] = result.best_trial.name if adopted else None  # None: trained by run_finetune
    return summary


def _table(rows: list[dict]) -> str:
    lines = [f"{'trial':<28} {'lr':>9} {'best val loss':>14} {'epochs':>7}  status"]
    lines += [f"{r['trial'][:28]:<28} {r['lr']:>9.2e} {r['best_val_loss']:>14.4f} {r['epochs_run']:>7}  {r['status']}"
              for r in rows]
    return "\n".join(lines)

