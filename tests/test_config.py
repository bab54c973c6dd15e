import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, load
from cluster.config.pretrain import PretrainConfig


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_lr: 6e-4\n  micro_batch: 4\nmodel:\n  preset: tiny\n")
    cfg = load(PretrainConfig, f, ["train.max_lr=3e-4", "scaling.num_workers=2", "eval.sample_prompts=[a, b]"])
    assert cfg.train.max_lr == 3e-4 and cfg.train.micro_batch == 4 and cfg.scaling.num_workers == 2
    assert cfg.eval.sample_prompts == ("a", "b")
    assert cfg.model.build().n_layer == 2
    assert cfg.train.warmup_steps == 715  # untouched defaults stay


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.bogus=1", r"train.bogus"),
        ("train.micro_batch=abc", r"train.micro_batch: expected int"),
        ("train.compile=3", r"train.compile: expected true or false"),
        ("nosection.key=1", r"nosection"),
        ("train.max_lr", r"section.key=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load(PretrainConfig, None, [override])


def test_errors_name_the_file_or_the_command_line_whichever_holds_the_bad_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_lr: fast\n")
    with pytest.raises(ConfigError, match=f"^{f}: train.max_lr: expected float"):
        load(PretrainConfig, f)
    with pytest.raises(ConfigError, match=f"^{f}: train.max_lr: expected float"):  # the file's error comes first
        load(PretrainConfig, f, ["train.micro_batch=4"])
    assert load(PretrainConfig, f, ["train.max_lr=1e-3"]).train.max_lr == 1e-3  # an override mends the file
    f.write_text("run:\n  name: 2026-12-07\n")  # YAML reads a date: still a named error, with an override too
    with pytest.raises(ConfigError, match=f"^{f}: run.name: expected a string"):
        load(PretrainConfig, f, ["train.micro_batch=4"])
    f.write_text("train:\n  max_lr: 6e-4\n")
    unknown = rf"^command-line override\(s\) of {f}: unknown config key\(s\) \['train.lr'\]"
    with pytest.raises(ConfigError, match=unknown):
        load(PretrainConfig, f, ["train.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"^command-line override\(s\): train.micro_batch: expected int"):
        load(PretrainConfig, None, ["train.micro_batch=abc"])


def test_an_override_that_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match=r"override 'train.max_lr=\[1': the value '\[1' is not valid YAML"):
        load(PretrainConfig, None, ["train.max_lr=[1"])


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from tests.pretrain_fixtures import write_python_docs_shards

    return write_python_docs_shards(tmp_path_factory.mktemp("shards"), n_docs=20, val_tokens=500)


@pytest.mark.parametrize("override, message", [
    ("train.autocast=fp8", "train.autocast must be auto, bf16 or fp32"),
    ("train.max_lr=-1", "train.max_lr must be a finite number > 0"),
    ("train.min_lr=.nan", "train.min_lr must be a finite number > 0 \\(or 0\\)"),
    ("train.beta2=1", "train.beta2 must be in \\[0, 1\\)"),
    ("train.eps=-1e-8", "train.eps must be a finite number >= 0"),
])
def test_optimizer_settings_are_checked_before_any_worker(small_shards, override, message):
    shards = small_shards
    good = ["model.preset=tiny", "train.seq_len=32", "train.micro_batch=2", "train.total_batch_tokens=64",
            "scaling.num_workers=1", f"data.shards={shards}"]
    load(PretrainConfig, None, good).validate()
    with pytest.raises(ValueError, match=message):
        load(PretrainConfig, None, [*good, override]).validate()


def test_output_paths_of_the_wrong_kind_are_refused_when_a_job_starts(tmp_path, capsys):
    from tests.job_loader import load_job

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(SystemExit):
        load_job("compare").parse_args(["--model", "a=gpt2", "--shards", str(tmp_path), "--output", str(a_file)])
    assert f"argument --output: {a_file} is a file; give a folder" in capsys.readouterr().err
    (tmp_path / "train").mkdir()  # a training run's folder: its metrics.jsonl and MLflow run id are not replaced
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        load_job("analyze_tokenizer").parse_args(["--output", str(tmp_path)])
    assert f"argument --output: {tmp_path} is a training run's folder (it holds train/)" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    with pytest.raises(SystemExit):
        load_job("evaluate").parse_args(["--model", "gpt2", "--output", str(tmp_path)])
    assert f"argument --output: {tmp_path} is a folder; give the file to write" in capsys.readouterr().err
    assert a_file.read_text() == "keep"


def test_validate_names_the_problem(tmp_path):
    cfg = load(PretrainConfig, None, ["train.micro_batch=48", f"data.shards={tmp_path}"])
    with pytest.raises(ValueError, match="not divisible"):
        cfg.validate()
    cfg = load(PretrainConfig, None, [f"data.shards={tmp_path}"])
    with pytest.raises(ValueError, match="no manifest.json"):
        cfg.validate()
    cfg = load(PretrainConfig, None, ["model.preset=tiny", "train.seq_len=1024"])
    with pytest.raises(ValueError, match="block_size"):
        cfg.validate()


def test_shipped_configs_resolve_and_124m_batch_arithmetic():
    for name in ("gpt2-124m-fineweb-edu", "gpt2-350m-fineweb-edu"):
        cfg = load(PretrainConfig, f"configs/{name}.yaml")
        t = cfg.train
        assert t.micro_batch * t.seq_len * cfg.scaling.num_workers * t.grad_accum_steps(cfg.scaling.num_workers) == 524_288
    cfg = load(PretrainConfig, "configs/gpt2-124m-fineweb-edu.yaml")
    assert (cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.max_lr, cfg.train.min_lr) == (19073, 715, 6e-4, 6e-5)


def test_print_config_shows_the_config_even_when_its_data_is_missing(tmp_path, capsys):
    """--print-config prints the resolved config first; the checks of what lies outside it (here: shards not yet
    prepared) then end the job with their error, and a config that passes them ends it with status 0."""
    from cluster.config.loading import config_for_job, job_parser
    from tests.pretrain_fixtures import write_python_docs_shards

    parser = job_parser("test", "--config YAML", "train.max_steps=10")
    # Options may stand between the overrides, as users type them.
    args = parser.parse_args(["train.max_steps=3", "--address", "local", "train.seed=2", "--print-config",
                              "run.name=x"])
    assert args.overrides == ["train.max_steps=3", "train.seed=2", "run.name=x"] and args.address == "local"
    args = parser.parse_args(["--config", "configs/local.yaml", f"data.shards={tmp_path / 'missing'}", "--print-config"])
    with pytest.raises(SystemExit, match="no manifest.json there") as stop:
        config_for_job(PretrainConfig, args)
    assert stop.value.code != 0
    assert json.loads(capsys.readouterr().out)["data"]["shards"] == str(tmp_path / "missing")

    shards = write_python_docs_shards(tmp_path / "shards", n_docs=10, val_tokens=500)
    args = parser.parse_args(["--config", "configs/local.yaml", f"data.shards={shards}", "--print-config"])
    with pytest.raises(SystemExit) as stop:
        config_for_job(PretrainConfig, args)
    assert stop.value.code == 0 and json.loads(capsys.readouterr().out)["data"]["shards"] == str(shards)


def test_tracking_uris_mlflow_cannot_open_are_refused_naming_where_they_are_set(small_shards, tmp_path, monkeypatch,
                                                                                capsys):
    """MLflow 3 refuses a folder (its file store) and schemes it has no store for with a traceback when the job
    first logs, after its work; the check refuses them as the job starts, and only them, and only in a job that
    logs to MLflow."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from cluster.config.loading import config_for_job, job_parser
    from tests.job_loader import load_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    folder = tmp_path / "mlruns"
    with pytest.raises(MlflowException):  # what the check stands in for: MLflow's own refusal
        MlflowClient(tracking_uri=str(folder))
    good = ["model.preset=tiny", "train.seq_len=32", "train.micro_batch=2", "train.total_batch_tokens=64",
            "scaling.num_workers=1", f"data.shards={small_shards}"]
    for uri, message in ((str(folder), "run.tracking_uri=.*mlruns: MLflow 3 no longer writes runs to a folder"),
                         (f"file://{folder}", "run.tracking_uri=file:.*no longer writes runs to a folder"),
                         ("ftp://host/x", "run.tracking_uri=ftp://host/x: MLflow has no store for 'ftp:' URIs"),
                         ("localhost:5000", "localhost:5000: a tracking server is named with its scheme, e.g."
                                            " http://localhost:5000")):
        with pytest.raises(ValueError, match=message):
            load(PretrainConfig, None, [*good, f"run.tracking_uri={uri}"]).check_tracking()
    for uri in ("http://127.0.0.1:9", f"sqlite:///{tmp_path}/m.db", "postgresql+psycopg2://u@h/db", "databricks"):
        load(PretrainConfig, None, [*good, f"run.tracking_uri={uri}"]).check_tracking()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(folder))  # named as the variable, for a job's every setting
    parser = job_parser("test", "--config YAML", "train.max_steps=10")
    with pytest.raises(SystemExit, match=r"error: \$MLFLOW_TRACKING_URI=.*no longer writes runs to a folder"):
        config_for_job(PretrainConfig, parser.parse_args([*good, "--print-config"]))
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match=r"error: \$MLFLOW_TRACKING_URI=.*no longer writes runs to a folder"):
        load_job("analyze_tokenizer").main(["--max-documents", "2", "--output", str(out)])
    with pytest.raises(SystemExit, match="error: --tracking-uri=ftp://x: MLflow has no store"):
        load_job("analyze_tokenizer").main(["--tracking-uri", "ftp://x", "--output", str(out)])
    assert not out.exists()  # refused before the work
    norms = load_job("compare_norms")
    with pytest.raises(SystemExit, match=r"error: \$MLFLOW_TRACKING_URI="):
        norms.main([*good, "--print-config"])
    capsys.readouterr()
    assert norms.main([*good, "--print-config", "--no-mlflow"]) == 0  # a job that logs nothing does not care
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-in is honoured
    load(PretrainConfig, None, good).check_tracking()
    MlflowClient(tracking_uri=str(folder))


def test_the_pipeline_checks_every_stage_before_the_first_one_runs(tmp_path, monkeypatch):
    """A mistake in a later stage's overrides ends the pipeline job at once, named with its stage, instead of after
    minutes of data preparation and pretraining; the shipped pipeline config passes."""
    from workflow.pipeline import PipelineConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    root = [f"root={tmp_path / 'runs'}", f"domain_dir={tmp_path / 'domain'}"]
    load(PipelineConfig, "configs/pipeline-local.yaml", root).validate()
    for override, message in (
        ("finetune_overrides=[train.lrr=1]",
         r"the finetune stage: finetune_overrides of .*finetune-local.yaml: unknown config key\(s\) \['train.lrr'\]"),
        ("pretrain_overrides=[train.max_lr=-1]", r"the pretrain stage: train.max_lr must be a finite number > 0"),
        ("early_exit_overrides=[model.exit_layer=9]",  # against the shape the pretrain stage is about to train
         r"the early_exit stage: model.exit_layer: exit_layer=9 is out of range.* n_layer=4"),
        ("finetune_overrides=['search.lrs=[-1.0]']", "the finetune stage: search: learning rates must be positive"),
        ("early_exit_config=configs/missing.yaml", r"the early_exit stage: config file .*missing.yaml does not exist"),
        ("tracking_uri=ftp://x", "tracking_uri=ftp://x: MLflow has no store"),
        ("pretrain_overrides=[run.tracking_uri=ftp://x]", "the pretrain stage: run.tracking_uri=ftp://x: MLflow has"),
        ("eval_actors=0", "eval_actors must be >= 1"),
        ("serve_port=0", "the serve stage: serve_port must be a TCP port number in 1-65535, got 0"),
        ("serve_replica_cpus=-1", "serve_replica_cpus must be >= 0, got -1"),
        (f"hellaswag_path={tmp_path / 'none.jsonl'}", r"hellaswag_path=.*none.jsonl: no such file"),
    ):
        with pytest.raises(ValueError, match=message):
            load(PipelineConfig, "configs/pipeline-local.yaml", [*root, override]).validate()
    # The stages log to the pipeline's tracking_uri when it has one: the environment's is not theirs to check.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    with pytest.raises(ValueError, match=r"\$MLFLOW_TRACKING_URI=.*no longer writes runs to a folder"):
        load(PipelineConfig, "configs/pipeline-local.yaml", root).validate()
    load(PipelineConfig, "configs/pipeline-local.yaml", [*root, "tracking_uri=http://127.0.0.1:9"]).validate()


def test_the_pipeline_writes_its_domain_corpus_only_where_it_may(tmp_path, capsys):
    """domain_dir receives the built-in fine-tuning corpus (replacing what the pipeline wrote there before); a
    user's folder of other files, named in the hope of fine-tuning on them, is refused untouched, as is a file."""
    from tests.job_loader import load_job
    from workflow.pipeline import DOMAIN_FILE, Pipeline, PipelineConfig, check_domain_dir, write_builtin_eval_and_domain

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / DOMAIN_FILE).write_text("my own topics")
    with pytest.raises(SystemExit, match=rf"error: domain_dir={notes} holds files the pipeline did not write"
                                         rf" \({DOMAIN_FILE}\); .* give a new or empty folder"):
        load_job("pipeline").main(["--print-config", f"root={tmp_path / 'runs'}", f"domain_dir={notes}"])
    pipeline = Pipeline(load(PipelineConfig, "configs/pipeline-local.yaml",
                             [f"root={tmp_path / 'runs'}", f"domain_dir={notes}", f"data_dir={tmp_path / 'data'}"]))
    with pytest.raises(ValueError, match="holds files the pipeline did not write"):
        pipeline.prepare(force=True)  # the stage itself, as a program that runs it without the job's check does
    assert not (tmp_path / "data").exists()
    assert [p.name for p in notes.iterdir()] == [DOMAIN_FILE] and (notes / DOMAIN_FILE).read_text() == "my own topics"
    with pytest.raises(ValueError, match="is a file; give a folder"):
        check_domain_dir(notes / DOMAIN_FILE)
    # A folder this pipeline's stages.json records as its domain output, written before the marker existed, and
    # named through a link: the pipeline's own.
    (tmp_path / "link").symlink_to(tmp_path)
    check_domain_dir(tmp_path / "link" / "notes", written_before=notes)
    record = tmp_path / "runs" / "pipeline" / "local" / "stages.json"
    record.parent.mkdir(parents=True)
    for text, message in (("{not json", "cannot read the stage records"),
                          ('{"prepare": {"outputs": {}}}', "not the stage records this pipeline writes")):
        record.write_text(text)
        with pytest.raises(SystemExit, match=rf"error: {record}: {message}.*delete it"):
            load_job("pipeline").main(["--print-config", f"root={tmp_path / 'runs'}", f"domain_dir={notes}"])
    record.write_text(json.dumps({"prepare": {"key": "k", "outputs": {"domain": str(notes / DOMAIN_FILE)},
                                              "seconds": 1.0, "at": 0.0}}))
    with pytest.raises(SystemExit) as stop:
        load_job("pipeline").main(["--print-config", f"root={tmp_path / 'runs'}", f"domain_dir={notes}"])
    assert stop.value.code == 0

    fresh = tmp_path / "domain"
    for _ in range(2):  # a new folder, then the same folder again: the second run rewrites its own files
        check_domain_dir(fresh)
        written = write_builtin_eval_and_domain(fresh, 4)
    assert Path(written["domain"]).read_text().startswith("<LOC>") and Path(written["cloze"]).is_file()


def test_a_model_shape_of_zero_is_refused_not_ignored():
    """model.n_layer=0 used to mean "the preset's depth" (a falsy override was dropped) and trained a 12-layer model."""
    from cluster.config.distill import DistillConfig

    for override in ("model.n_layer=0", "model.n_head=0", "model.block_size=-1"):
        with pytest.raises(ValueError, match=rf"{override.split('=')[0]} must be >= 1"):
            load(PretrainConfig, None, [override]).validate()
    with pytest.raises(ValueError, match=r"student.n_layer must be >= 1, got 0"):
        load(DistillConfig, None, ["student.n_layer=0"]).validate()
    assert load(PretrainConfig, None, ["model.preset=tiny", "model.n_layer=3"]).model.build().n_layer == 3


def test_run_names_that_are_paths_are_refused(tmp_path, capsys):
    """A name is one folder of runs/<experiment>/<name>/: `../x` put a job's outputs outside the run root."""
    from tests.job_loader import load_job
    from workflow.pipeline import PipelineConfig

    for override in ("run.name=../x", "run.experiment=a/b", "run.name=.."):
        with pytest.raises(ValueError, match=rf"{override.split('=')[0]}=.* must be a plain name, not a path"):
            load(PretrainConfig, None, ["model.preset=tiny", "train.seq_len=32", override]).validate()
    with pytest.raises(ValueError, match="name='../x' must be a plain name"):
        load(PipelineConfig, "configs/pipeline-local.yaml", [f"root={tmp_path}", "name=../x"]).validate()
    for job in ("compare", "analyze_heads", "analyze_tokenizer"):
        with pytest.raises(SystemExit):
            load_job(job).parse_args(["--model", "a=gpt2", "--name", "../x"])
        assert "argument --name: must be a plain name, not a path" in capsys.readouterr().err
