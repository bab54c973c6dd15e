"""The whole mission as one job: prepare data → pretrain → evaluate → LR search + fine-tune → early exit → serve.

Each stage runs the same code as its own job (cluster/*), in this Ray job's driver. Stages are cached by content:
a stage's key is a hash of its resolved inputs (its config, its data, the keys of the stages it reads from), kept
in runs/pipeline/<name>/stages.json; a stage whose key and outputs are unchanged is skipped on rerun, and `--from
STAGE` runs that stage and everything after it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from cluster.config import check_name, load, to_dict
from cluster.config.early_exit import EarlyExitConfig
from cluster.config.finetune import FinetuneConfig
from cluster.config.pretrain import PretrainConfig
from cluster.runtime.mlflow_connection import check_tracking_uri
from cluster.runtime.ray_env import PROJECT_ROOT
from cluster.runtime.storage import local_run_root
from gpt2.durable import write_file_atomically

STAGES = ("prepare", "pretrain", "evaluate", "finetune", "early_exit", "serve")
STAGE_RECORDS = "stages.json"  # in the pipeline's folder: each stage's key and outputs, for skipping unchanged ones
# The prepare stage writes the fine-tuning corpus and the cloze set into domain_dir, with a marker that makes the
# folder the pipeline's to rewrite on later runs.
DOMAIN_FILE, CLOZE_FILE, DOMAIN_MARKER = "topics.txt", "cloze_hellaswag.jsonl", ".written-by-the-pipeline"
DEFAULT_DOMAIN_DIR = "data/domain"  # the pipeline's own, also as written before the marker existed
T = TypeVar("T")
SAMPLE_TEMPERATURE = 0.8  # the completion the pipeline fetches over HTTP once the variants are served


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "demo"
    root: str = "runs"  # every stage's run directory lives under it
    data_dir: str = "data/pydocs"  # pretraining shards of the built-in python-docs corpus
    # Where the prepare stage writes the fine-tuning corpus (the corpus' Python reference topics, <LOC>-delimited)
    # and the cloze set: a new or empty folder, or one it wrote before (check_domain_dir).
    domain_dir: str = DEFAULT_DOMAIN_DIR
    pretrain_config: str = "configs/local.yaml"
    pretrain_overrides: tuple[str, ...] = ()
    finetune_config: str = "configs/finetune-local.yaml"
    finetune_overrides: tuple[str, ...] = ()
    search: bool = True  # the Ray Tune learning-rate search before fine-tuning
    early_exit_config: str = "configs/early-exit-local.yaml"
    early_exit_overrides: tuple[str, ...] = ()
    # A HellaSwag-format file (relative to the project, as the other paths); None: a cloze set made from the corpus.
    hellaswag_path: str | None = None
    cloze_examples: int = 200
    eval_actors: int = 2
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    # CPUs the model replica reserves in Ray's accounting (it decodes with torch_threads threads regardless). An idle
    # server holding a whole CPU of a 2-core head would leave the jobs a user runs next on that head waiting forever.
    serve_replica_cpus: float = 0.2
    tracking_uri: str | None = None

    def pipeline_dir(self) -> Path:
        local_run_root(self.root, "the pipeline", field="root")  # its stages pass files to each other through this folder
        return Path(self.root).resolve() / "pipeline" / self.name

    # ---- each stage's config: its file and the pipeline's overrides, then what the earlier stages produced -------

    def pretrain_recipe(self, shards: str) -> PretrainConfig:
        return self._stage_config(PretrainConfig, "pretrain", self.pretrain_config, self.pretrain_overrides,
                                  {"data.shards": shards})

    def finetune_recipe(self, model: str, domain: str) -> FinetuneConfig:
        return self._stage_config(FinetuneConfig, "finetune", self.finetune_config, self.finetune_overrides,
                                  {"model.source": model, "data.inputs": [domain]})

    def early_exit_recipe(self, model: str, shards: str) -> EarlyExitConfig:
        return self._stage_config(EarlyExitConfig, "early_exit", self.early_exit_config, self.early_exit_overrides,
                                  {"model.source": model, "data.shards": shards})

    def _stage_config(self, cls: type[T], stage: str, path: str, overrides: tuple[str, ...], inputs: dict) -> T:
        # The pipeline's own values as JSON, which YAML reads back as they are: a path may hold ", " or ": ".
        inputs = {**inputs, "run.root": str(Path(self.root).resolve()), "run.name": self.name}
        return load(cls, _abs(path), [*overrides, *(f"{key}={json.dumps(value)}" for key, value in inputs.items())],
                    overrides_from=f"{stage}_overrides")

    def validate(self) -> None:
        """Every stage's config, checked before the first stage runs, so that a mistake in the last stage's
        overrides ends the job at once rather than after minutes of pretraining. What a stage reads from an
        earlier one (shards, models) is checked again as that stage starts, once it exists."""
        check_name(self.name, "name")
        check_tracking_uri(self.tracking_uri, "tracking_uri")
        for name in ("cloze_examples", "eval_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.serve_replica_cpus < 0:
            raise ValueError(f"serve_replica_cpus must be >= 0, got {self.serve_replica_cpus}")
        if self.hellaswag_path and not _abs(self.hellaswag_path).is_file():
            raise ValueError(f"hellaswag_path={self.hellaswag_path}: no such file")
        check_domain_dir(_abs(self.domain_dir), written_before=self.domain_written_before())
        shards = str(_abs(self.data_dir))
        with _stage("pretrain"):
            pretrain = self.pretrain_recipe(shards)
            pretrain.check_settings()
        model = str(Path(pretrain.run_dir()) / "final")
        with _stage("finetune"):
            finetune = self.finetune_recipe(model, str(_abs(self.domain_dir) / DOMAIN_FILE))
            finetune.check_settings(self.search)
        with _stage("early_exit"):
            early_exit = self.early_exit_recipe(model, shards)
            early_exit.check_settings()
            early_exit.check_model_config(pretrain.model.build())
        if not self.tracking_uri:  # each stage logs to its own run.tracking_uri then
            for stage, config in (("pretrain", pretrain), ("finetune", finetune), ("early_exit", early_exit)):
                with _stage(stage):
                    config.check_tracking()
        with _stage("serve"):
            from serving.deploy import check_port
            from serving.settings import check_settings

            check_port(self.serve_port, "serve_port")
            check_settings(self.serve_settings({"pretrained": model, "finetuned": model, "early-exit": model}))

    def serve_settings(self, variants: dict[str, str]) -> dict:
        """The Serve application's settings (serving/config.yaml's `args:`) for the pipeline's variants."""
        return {"variants": variants, "max_batch": 8, "torch_threads": 2, "model_replica_cpus": self.serve_replica_cpus}

    def domain_written_before(self) -> Path | None:
        """The folder where this pipeline's last prepare stage wrote its domain corpus (stages.json), which may
        predate the marker file."""
        domain = read_stage_records(self.pipeline_dir() / STAGE_RECORDS).get("prepare", {}).get("outputs", {})
        return Path(domain["domain"]).parent if isinstance(domain.get("domain"), str) else None


@dataclass
class StageResult:
    key: str
    outputs: dict
    seconds: float
    cached: bool = False


@dataclass
class Pipeline:
    cfg: PipelineConfig
    tracking_uri: str | None = None
    results: dict[str, StageResult] = field(default_factory=dict)

    # ---- stage records ----------------------------------------------------------------------------------------

    @property
    def record_file(self) -> Path:
        return self.cfg.pipeline_dir() / STAGE_RECORDS

    def _records(self) -> dict:
        return read_stage_records(self.record_file)

    def _save_record(self, stage: str, result: StageResult) -> None:
        records = self._records()
        records[stage] = {"key": result.key, "outputs": result.outputs, "seconds": result.seconds, "at": time.time()}
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(self.record_file, json.dumps(records, indent=2).encode())

    def run_stage(self, stage: str, inputs: dict, fn: Callable[[], dict], force: bool) -> StageResult:
        key = hashlib.sha256(json.dumps({"stage": stage, **inputs}, sort_keys=True, default=str).encode()).hexdigest()
        old = self._records().get(stage)
        if not force and old and old["key"] == key and _outputs_exist(old["outputs"]):
            print(f"[{stage}] unchanged since the last run: skipped", flush=True)
            result = StageResult(key, old["outputs"], old["seconds"], cached=True)
        else:
            print(f"[{stage}] running", flush=True)
            start = time.monotonic()
            outputs = fn()
            result = StageResult(key, outputs, time.monotonic() - start)
            self._save_record(stage, result)
            print(f"[{stage}] done in {result.seconds:.0f} s", flush=True)
        self.results[stage] = result
        return result

    def key(self, stage: str) -> str:
        return self.results[stage].key

    # ---- stages -----------------------------------------------------------------------------------------------

    def prepare(self, force: bool) -> StageResult:
        from cluster.data.prepare import PYTHON_DOCS_VAL_TOKENS, PrepareConfig, prepare_data
        from cluster.data.sources import SourceSpec

        cfg = self.cfg
        data_dir, domain_dir = _abs(cfg.data_dir), _abs(cfg.domain_dir)
        prepare_cfg = PrepareConfig(SourceSpec(), str(data_dir), "pydocs", val_tokens=PYTHON_DOCS_VAL_TOKENS)

        def run() -> dict:
            check_domain_dir(domain_dir, written_before=cfg.domain_written_before())  # before any work
            print(prepare_data(prepare_cfg).format())
            return {"shards": str(data_dir), **write_builtin_eval_and_domain(domain_dir, cfg.cloze_examples)}

        return self.run_stage("prepare", {"config": to_dict(prepare_cfg), "cloze": cfg.cloze_examples,
                                          "domain": str(domain_dir)}, run, force)

    def pretrain(self, force: bool) -> StageResult:
        from cluster.train.pretrain import run_pretraining

        p = self.cfg.pretrain_recipe(self.results["prepare"].outputs["shards"])
        p.validate()

        def run() -> dict:
            result = run_pretraining(p, self.tracking_uri)
            if result.error:
                raise RuntimeError(f"pretraining failed: {result.error}")
            from cluster.runtime.tracking import read_metrics

            val = [r["val_loss"] for r in read_metrics(p.run_dir()) if "val_loss" in r]
            return {"final": str(Path(p.run_dir()) / "final"), "run_dir": p.run_dir(),
                    "val_loss_first": val[0] if val else None, "val_loss_last": val[-1] if val else None,
                    "tokens": p.train.max_steps * p.train.total_batch_tokens,
                    "n_layer": p.model.build().n_layer}

        return self.run_stage("pretrain", {"config": to_dict(p), "prepare": self.key("prepare")}, run, force)

    def evaluate(self, force: bool) -> StageResult:
        from cluster.eval.evaluation import ActorPool, EvalSettings, evaluate, log_evaluation
        from cluster.runtime.models import load_model
        from gpt2.hellaswag import load_hellaswag
        from gpt2.shards import split_tokens

        pre = self.results["pretrain"].outputs
        given = self.cfg.hellaswag_path
        hellaswag = str(_abs(given)) if given else self.results["prepare"].outputs["cloze"]

        pretrained = self.cfg.pretrain_recipe(self.results["prepare"].outputs["shards"])
        tracking = self.tracking_uri or pretrained.run.tracking_uri  # the server the pretraining run is on

        def run() -> dict:
            model = load_model(pre["final"])
            val_tokens = split_tokens(self.results["prepare"].outputs["shards"], "val").tolist()
            settings = EvalSettings(pool=ActorPool(size=self.cfg.eval_actors), progress=False)
            metrics = evaluate(model, settings, hellaswag=load_hellaswag(hellaswag), texts={"val": val_tokens}).metrics()
            out = Path(pre["run_dir"]) / "eval" / "results.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            record = {"model": pre["final"], "hellaswag_file": hellaswag, "metrics": metrics}
            write_file_atomically(out, json.dumps(record, indent=2).encode())
            # Into the pretraining run's MLflow record (its run id is kept in the run directory), on its server.
            log_evaluation(pre["final"], metrics, out, run_name=self.cfg.name, uri=tracking)
            return {"results": str(out), "metrics": metrics}

        return self.run_stage("evaluate", {"pretrain": self.key("pretrain"), "hellaswag": hellaswag,
                                           "actors": self.cfg.eval_actors}, run, force)

    def finetune(self, force: bool) -> StageResult:
        from cluster.train.finetune import run as run_finetune

        prepared = self.results["prepare"].outputs
        f = self.cfg.finetune_recipe(self.results["pretrain"].outputs["final"], prepared["domain"])

        def run() -> dict:
            summary = run_finetune(f, search=self.cfg.search, tracking_uri=self.tracking_uri)
            search = summary["search"]
            return {"best": summary["best_dir"], "lr": summary["lr"], "model_uri": summary["model_uri"],
                    "best_val_loss": summary["metrics"].get("best_val_loss"),
                    "search_csv": str(search.csv_path) if search else None}

        return self.run_stage("finetune", {"config": to_dict(f), "search": self.cfg.search,
                                           "pretrain": self.key("pretrain"), "prepare": self.key("prepare")}, run, force)

    def early_exit(self, force: bool) -> StageResult:
        from cluster.runtime.models import load_model
        from cluster.train.early_exit import run as run_early_exit
        from cluster.train.early_exit import time_decoding

        pre = self.results["pretrain"].outputs
        e = self.cfg.early_exit_recipe(pre["final"], self.results["prepare"].outputs["shards"])

        def run() -> dict:
            from gpt2.tokenizer import get_tokenizer

            summary = run_early_exit(e, self.tracking_uri)
            enc = get_tokenizer()
            prompts = [enc.encode(p) for p in ("The Python language", "A module is", "To open a file")]
            early_exit = load_model(summary["model_dir"])
            timing = time_decoding({"standard": load_model(pre["final"]), "early-exit": early_exit}, prompts, 32)
            speedup = timing["early-exit"].tokens_per_s / timing["standard"].tokens_per_s
            macs = early_exit.decode_macs()  # what bounds the speed-up on this model, printed next to it
            return {
                "model": summary["model_dir"], "speedup": speedup, "speedup_bound": macs.every_token_exits,
                "head_share": macs.head_share,
                "summary": f"{summary['tau']:.3g} / {100 * summary['exit_rate']:.0f}% / {100 * summary['agreement']:.1f}%"
                           + ("" if summary["target_reached"] else " (target agreement not reached)"),
            }

        return self.run_stage("early_exit", {"config": to_dict(e), "pretrain": self.key("pretrain")}, run, force)

    def serve(self, variants: dict[str, str]) -> StageResult:
        """Always (re)deployed: a running application is state outside the stage cache."""

        def run() -> dict:
            from serving.deploy import deploy

            base = deploy(self.cfg.serve_settings(variants), host=self.cfg.serve_host, port=self.cfg.serve_port)
            model = "finetuned" if "finetuned" in variants else next(iter(variants))
            return {"url": base, "sample_model": model,
                    "sample": completion_over_http(base, model, "The Python language reference")}

        return self.run_stage("serve", {"variants": variants, "at": time.time()}, run, force=True)


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    """A stage's config error, prefixed with the stage (a field such as train.lr exists in several of them)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"the {name} stage: {e}") from e


def _abs(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


def _outputs_exist(outputs: dict) -> bool:
    paths = [v for v in outputs.values() if isinstance(v, str) and v.startswith("/")]
    return all(Path(p).exists() for p in paths)


def read_stage_records(path: Path) -> dict[str, dict]:
    """stages.json: for each stage that ran, its key, outputs, duration and time ({} before the first run)."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the stage records ({e}); delete it to run every stage again") from e
    if not isinstance(records, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("outputs"), dict)
            for r in records.values()):
        raise ValueError(f"{path}: not the stage records this pipeline writes; delete it to run every stage again")
    return records


def check_domain_dir(folder: Path, written_before: Path | None = None) -> None:
    """The prepare stage replaces the files it writes in domain_dir: a folder that holds anything it did not write
    (a user's own notes, named in the hope that the pipeline fine-tunes on them) is refused before anything is
    written, as is a file. The pipeline's folders: one with its marker, the default data/domain, and
    `written_before` (where its stages.json says it wrote, before the marker existed)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"domain_dir={folder} is a file; give a folder (made if missing)")
    ours = {_abs(DEFAULT_DOMAIN_DIR).resolve(), *([written_before.resolve()] if written_before else [])}
    if not folder.is_dir() or (folder / DOMAIN_MARKER).is_file() or folder.resolve() in ours:
        return
    entries = sorted(p.name for p in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"domain_dir={folder} holds files the pipeline did not write ({shown}); it writes its built-in"
            f" fine-tuning corpus ({DOMAIN_FILE}) and cloze set ({CLOZE_FILE}) there: give a new or empty folder."
            " To fine-tune on your own files, run jobs/finetune.py with data.inputs=[...]")


def write_builtin_eval_and_domain(domain_dir: Path, cloze_examples: int) -> dict:
    """The offline stand-ins: a HellaSwag-format cloze set from the corpus, and a <LOC>-delimited domain corpus of
    the Python reference topics for fine-tuning."""
    from gpt2.cloze import write_cloze_file
    from gpt2.corpus import python_docs_documents

    domain_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomically(domain_dir / DOMAIN_MARKER, b"written by workflow/pipeline.py's prepare stage\n")
    docs = python_docs_documents()
    cloze = write_cloze_file([d.text for d in docs], domain_dir / CLOZE_FILE, cloze_examples)
    topics = [d.text for d in docs if d.source.startswith("pydoc_data")]
    domain = domain_dir / DOMAIN_FILE
    write_file_atomically(domain, "".join(f"<LOC>{t}</LOC>\n" for t in topics).encode("utf-8"))
    return {"cloze": str(cloze), "domain": str(domain)}


def completion_over_http(base: str, model: str, prompt: str, max_tokens: int = 40) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": SAMPLE_TEMPERATURE,
                       "seed": 1})
    request = urllib.request.Request(f"{base}/v1/completions", body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return prompt + json.loads(r.read())["choices"][0]["text"]


def run_pipeline(cfg: PipelineConfig, *, from_stage: str | None = None, tracking_uri: str | None = None) -> Pipeline:
    """Every stage in order; stages before `from_stage` are reused when unchanged, it and later ones rerun."""
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"--from {from_stage!r}: choose one of {', '.join(STAGES)}")
    first_forced = STAGES.index(from_stage) if from_stage else len(STAGES)
    force = {stage: i >= first_forced for i, stage in enumerate(STAGES)}
    p = Pipeline(cfg, tracking_uri)
    p.prepare(force["prepare"])
    p.pretrain(force["pretrain"])
    p.evaluate(force["evaluate"])
    p.finetune(force["finetune"])
    p.early_exit(force["early_exit"])
    variants = {"pretrained": p.results["pretrain"].outputs["final"], "finetuned": p.results["finetune"].outputs["best"],
                "early-exit": p.results["early_exit"].outputs["model"]}
    p.serve(variants)
    return p


def summary_table(p: Pipeline) -> str:
    pre, ev = p.results["pretrain"].outputs, p.results["evaluate"].outputs["metrics"]
    ft, ee = p.results["finetune"].outputs, p.results["early_exit"].outputs
    rows = [
        ("pretraining val loss (first → last)", f"{pre['val_loss_first']:.3f} → {pre['val_loss_last']:.3f}"),
        ("val perplexity of the final model", f"{ev['text/val/perplexity']:.1f}"),
        ("cloze/HellaSwag-format acc_norm (completion)", f"{100 * ev['hellaswag/completion/acc_norm']:.1f}%"
                                                         f" of {int(ev['hellaswag/examples'])} (chance 25%)"),
        ("fine-tune learning rate", f"{ft['lr']:g}" + (" (Ray Tune search)" if ft.get("search_csv") else "")),
        ("fine-tune best val loss", f"{ft['best_val_loss']:.3f}"),
        ("early exit: threshold / exit rate / agreement", ee["summary"]),
        ("early exit: decode speedup", _early_exit_speedup(ee)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("stages: " + ", ".join(f"{s} {'(cached)' if r.cached else f'{r.seconds:.0f}s'}"
                                       for s, r in p.results.items()))
    return "\n".join(lines)


def sample_caption(p: Pipeline) -> str:
    """What to expect of the served sample, from the model's own figures: a demo-sized model writes likely word
    pieces, not sentences, and the line says so next to what the full GPT-2 recipe reaches."""
    pre, ev = p.results["pretrain"].outputs, p.results["evaluate"].outputs["metrics"]
    if "tokens" not in pre:  # a stage record written before these figures were kept
        return ""
    return (f"(sampled at temperature {SAMPLE_TEMPERATURE:g} from a {pre['n_layer']}-layer model pretrained on {pre['tokens']:,} tokens,"
            f" validation perplexity {ev['text/val/perplexity']:.0f}: it strings likely word pieces together rather"
            " than sentences. The GPT-2 124M recipe, configs/gpt2-124m-fineweb-edu.yaml, trains on 10B tokens to a"
            " validation loss near 3.3, a perplexity near 27.)")


def _early_exit_speedup(ee: dict) -> str:
    """The measured ratio and, next to it, the most any exit classifier could give on this model (a record written
    before the bound was kept shows the ratio alone)."""
    if "speedup_bound" not in ee:
        return f"{ee['speedup']:.2f}x"
    return (f"{ee['speedup']:.2f}x (at most {ee['speedup_bound']:.2f}x were every token to exit: the LM head is"
            f" {ee['head_share']:.0%} of a token's work in this model; deeper models gain more, see README)")
