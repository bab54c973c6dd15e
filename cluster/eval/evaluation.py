"""Evaluation distributed with Ray Data: HellaSwag examples and perplexity windows split across an actor pool.

One pool per model: each actor builds one copy of the model (on a GPU when the cluster has GPUs) and scores
every kind of work for it, so a model pays the actor start-up once for all its metrics. The work is cut into the
same consecutive batches as the single-process loops in gpt2.hellaswag / gpt2.perplexity, one Ray Data row per
batch, so each example is scored in exactly the forward pass a single process would run. Results arrive in any
order and are merged by index: accuracy counts are integers and perplexity sums use math.fsum, so the merged
numbers are those of a single process. (Bit-identical per-example scores also need the same number of torch
threads per model, since float summation order inside a matmul depends on it.)

`compute_metrics` is the one place that turns a model into the flat {name: value} dict that the JSON results file
(and MLflow) take; new metrics are added in `evaluate` and `EvalResults.metrics`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, cast

import numpy as np
import ray
import torch
from tqdm import tqdm

from gpt2.config import GPTConfig
from gpt2.hellaswag import METHODS, ExampleScore, HellaSwagExample, MethodResult, evaluate_hellaswag, score_examples
from gpt2.model import GPT
from gpt2.perplexity import PerplexityResult, Window, evaluate_perplexity, plan_windows, resolve_window, window_nll
from gpt2.protocols import LanguageModel
from gpt2.tokenizer import get_tokenizer


@dataclass(frozen=True)
class ActorPool:
    """Ray Data actors that score for one model, each holding its own copy."""

    size: int = 2
    cpus_per_actor: int = 1  # also the actor's torch thread count
    use_gpu: bool | None = None  # None: one GPU per actor when the cluster has GPUs

    def __post_init__(self) -> None:
        if self.size < 1 or self.cpus_per_actor < 1:
            raise ValueError(f"an actor pool needs size >= 1 and cpus_per_actor >= 1, got {self}")


@dataclass(frozen=True)
class EvalSettings:
    methods: tuple[str, ...] = METHODS
    hellaswag_batch_size: int = 8  # examples per forward pass (4 rows each)
    context_length: int | None = None  # perplexity window; None: the model's block_size
    stride: int | None = None  # None: half the window
    window_batch_size: int = 4  # perplexity windows per forward pass
    pool: ActorPool | None = field(default_factory=ActorPool)  # None: score in this process, without Ray
    progress: bool = True


@dataclass(frozen=True)
class EvalResults:
    hellaswag: Mapping[str, MethodResult]  # by method; empty when HellaSwag was not evaluated
    texts: Mapping[str, PerplexityResult]  # by text name

    def metrics(self) -> dict[str, float]:
        """hellaswag/<method>/acc and acc_norm (fractions), hellaswag/examples, text/<name>/loss, perplexity, tokens."""
        metrics: dict[str, float] = {}
        for result in self.hellaswag.values():
            metrics.update(result.metrics())
            metrics["hellaswag/examples"] = result.n
        for name, result in self.texts.items():
            metrics.update(result.metrics(f"text/{name}"))
        return metrics


def compute_metrics(
    model: LanguageModel,
    settings: EvalSettings,
    *,
    hellaswag: Sequence[HellaSwagExample] = (),
    texts: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, float]:
    """Every requested metric of one model as a flat {name: value} dict (see EvalResults.metrics)."""
    return evaluate(model, settings, hellaswag=hellaswag, texts=texts).metrics()


def evaluate(
    model: LanguageModel,
    settings: EvalSettings,
    *,
    hellaswag: Sequence[HellaSwagExample] = (),
    texts: Mapping[str, Sequence[int]] | None = None,
) -> EvalResults:
    """HellaSwag on `hellaswag` and sliding-window perplexity on each named token stream in `texts`
    (see gpt2.perplexity.text_tokens), on the actor pool of `settings`, or in this process when it has none.

    In this process any LanguageModel is scored (a GPT, an EarlyExitGPT, a quantized copy); the pool's actors rebuild
    a plain GPT from the model's config and state_dict, so the pool takes a GPT."""
    texts = texts or {}
    if settings.pool is not None:
        return _evaluate_on_pool(cast(GPT, model), settings, hellaswag, texts)
    methods: dict[str, MethodResult] = {}
    if hellaswag:
        with _progress(len(hellaswag), "example", "HellaSwag", settings.progress) as bar:
            methods = evaluate_hellaswag(
                model,
                hellaswag,
                methods=settings.methods,
                batch_size=settings.hellaswag_batch_size,
                on_progress=bar.update,
            )
    perplexities = {}
    for name, tokens in texts.items():
        with _progress(len(tokens) - 1, "token", f"perplexity {name}", settings.progress) as bar:
            perplexities[name] = evaluate_perplexity(
                model,
                tokens,
                context_length=settings.context_length,
                stride=settings.stride,
                batch_size=settings.window_batch_size,
                on_progress=bar.update,
            )
    return EvalResults(methods, perplexities)


# ---------------------------------------------------------------------------------------------------- work kinds


@dataclass(frozen=True)
class _HellaSwagWork:
    """Examples scored with every method; an item is one example."""

    data: ray.ObjectRef  # the examples
    n_items: int
    batch_size: int
    methods: tuple[str, ...]
    description: str = "HellaSwag"
    unit: str = "example"

    @property
    def total(self) -> int:
        return self.n_items

    def score(self, model: GPT, examples: list[HellaSwagExample], start: int, stop: int) -> list[tuple[int, int, str]]:
        batch = examples[start:stop]
        tokenizer = get_tokenizer()
        by_method = {method: score_examples(model, batch, method, tokenizer) for method in self.methods}
        # JSON keeps every float exactly (shortest round-trip repr) and is a plain string column for Ray Data.
        results = []
        for example, *scores in zip(batch, *by_method.values()):
            record = {m: [s.label, s.logprobs, s.norm_lengths] for m, s in zip(self.methods, scores)}
            results.append((example.index, 1, json.dumps(record)))
        return results

    def merge(self, items: Sequence[tuple[int, dict]]) -> dict[str, MethodResult]:
        return {
            method: MethodResult.merge(
                method,
                [ExampleScore(index, r[method][0], tuple(r[method][1]), tuple(r[method][2])) for index, r in items],
            )
            for method in self.methods
        }


@dataclass(frozen=True)
class _TextWork:
    """Sliding windows over one token stream; an item is one window."""

    data: ray.ObjectRef  # the token stream
    n_items: int
    batch_size: int
    windows: tuple[Window, ...]
    description: str
    unit: str = "token"

    @property
    def total(self) -> int:
        return sum(w.n_scored for w in self.windows)

    def score(self, model: GPT, tokens: np.ndarray, start: int, stop: int) -> list[tuple[int, int, str]]:
        windows = self.windows[start:stop]
        nll = window_nll(model, tokens, windows)
        return [(start + i, w.n_scored, json.dumps(value)) for i, (w, value) in enumerate(zip(windows, nll))]

    def merge(self, items: Sequence[tuple[int, float]]) -> PerplexityResult:
        return PerplexityResult.merge(self.windows, [value for _, value in items])


# ---------------------------------------------------------------------------------------------------- the pool


def _evaluate_on_pool(
    model: GPT, settings: EvalSettings, hellaswag: Sequence[HellaSwagExample], texts: Mapping[str, Sequence[int]]
) -> EvalResults:
    works: list[_HellaSwagWork | _TextWork] = []
    if hellaswag:
        examples = ray.put(list(hellaswag))
        works.append(_HellaSwagWork(examples, len(hellaswag), settings.hellaswag_batch_size, settings.methods))
    for name, tokens in texts.items():
        windows = tuple(plan_windows(len(tokens), *resolve_window(model, settings.context_length, settings.stride)))
        stream = ray.put(np.asarray(tokens, dtype=np.int64))
        works.append(_TextWork(stream, len(windows), settings.window_batch_size, windows, f"perplexity {name}"))
    if not works:
        return EvalResults({}, {})
    merged = _run_on_pool(model, works, settings.pool, settings.progress)
    methods = merged.pop(0) if hellaswag else {}
    return EvalResults(methods, dict(zip(texts, merged)))


def _progress(total: int, unit: str, description: str, enabled: bool, position: int = 0) -> tqdm:
    return tqdm(total=total, unit=unit, desc=description, position=position, disable=not enabled)


def _put_model(model: GPT) -> ray.ObjectRef:
    """The model's config and weights in the object store, so actors on any node can build it."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    return ray.put({"config": model.config.to_dict(), "state_dict": state})


def _run_on_pool(model: GPT, works: Sequence[_HellaSwagWork | _TextWork], pool: ActorPool, progress: bool) -> list:
    """Each work's merged result, in order; all of them scored by one actor pool."""
    use_gpu = pool.use_gpu if pool.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    batches = [
        {"work": w, "start": start, "stop": min(start + work.batch_size, work.n_items)}
        for w, work in enumerate(works)
        for start in range(0, work.n_items, work.batch_size)
    ]
    scored = ray.data.from_items(batches, override_num_blocks=len(batches)).map_batches(
        _Scorer,
        batch_size=1,  # one row is one batch of items, scored exactly as the single-process loop scores it
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        fn_constructor_kwargs={
            "model_ref": _put_model(model),
            "works": list(works),
            "device": "cuda" if use_gpu else "cpu",
            "threads": pool.cpus_per_actor,
        },
        num_cpus=pool.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    items: list[list[tuple[int, object]]] = [[] for _ in works]
    bars = [_progress(work.total, work.unit, work.description, progress, i) for i, work in enumerate(works)]
    try:
        for part in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for w, index, amount, result in zip(part["work"], part["index"], part["amount"], part["result"]):
                items[int(w)].append((int(index), json.loads(str(result))))
                bars[int(w)].update(int(amount))
    finally:
        for bar in bars:
            bar.close()
    merged = []
    for work, found in zip(works, items):
        found.sort(key=lambda item: item[0])
        if len(found) != work.n_items or len({index for index, _ in found}) != len(found):
            raise RuntimeError(f"{work.description}: {len(found)} results for {work.n_items} items")
        merged.append(work.merge(found))
    return merged


class _Scorer:
    """A Ray Data actor: one model, and the data of every work kind, fetched once from the object store."""

    def __init__(self, model_ref: ray.ObjectRef, works: list, device: str, threads: int) -> None:
        # Ray sets OMP_NUM_THREADS from num_cpus; torch's intra-op pool is set explicitly so that it is known.
        torch.set_num_threads(threads)
        payload = ray.get(model_ref)
        model = GPT(GPTConfig.from_dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
        dtype = payload["state_dict"]["transformer.wte.weight"].dtype  # a bf16 model is scored in bf16, as locally
        self.model = model.to(device=device, dtype=dtype).eval()
        self.works = works
        self.data = [ray.get(work.data) for work in works]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        w, start, stop = (int(batch[key][0]) for key in ("work", "start", "stop"))
        scored = self.works[w].score(self.model, self.data[w], start, stop)
        return {
            "work": np.full(len(scored), w, dtype=np.int64),
            "index": np.array([index for index, _, _ in scored], dtype=np.int64),
            "amount": np.array([amount for _, amount, _ in scored], dtype=np.int64),
            "result": np.array([result for _, _, result in scored]),
        }


def log_evaluation(
    model_source: str, metrics: Mapping[str, float], results_file: Path, *, run_name: str,
    params: Mapping[str, object] | None = None, uri: str | None = None,
) -> str:
    """Log a model's metrics (as eval/<name>) and the results file to MLflow: into the training run whose checkpoint
    this is (its run directory keeps the MLflow run id), else into a new run `run_name` of the 'evaluate'
    experiment, kept beside the results file. The registered versions of the model (those of its training run, or
    the one an MLflow URI names) get the figures as tags. Returns where they went, for the job's output."""
    from cluster.runtime.models import is_mlflow_uri
    from cluster.runtime.tracking import RunLogger

    source = Path(model_source)
    run_dir = None if is_mlflow_uri(model_source) else next(
        (d for d in (source.parent, source.parent.parent) if (d / "mlflow_run_id").is_file()), None)
    if run_dir is not None:
        logger = RunLogger(run_dir, uri=uri)  # the training run, resumed from its mlflow_run_id
    else:
        logger = RunLogger(results_file.parent / "mlflow" / run_name, experiment="evaluate", run_name=run_name,
                           uri=uri, params=dict(params or {}))
    logger.log_metrics({f"eval/{k}": float(v) for k, v in metrics.items()}, step=0)
    if run_dir is not None:
        logger.tag_model_versions(metrics)
    elif is_mlflow_uri(model_source):
        logger.tag_model_versions(metrics, model_uri=model_source)
    logger.log_artifact(results_file, "eval")
    logger.close()
    return f"run {logger.run_id}" if logger.run_id else f"(server unreachable; kept in {logger.jsonl})"
