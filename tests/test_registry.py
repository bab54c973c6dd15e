"""The model registry as the jobs fill it (RunLogger.log_model, a real `mlflow server`): one registered model per
kind and run, versions described by their model card and tagged with their figures, `latest` and `champion` aliases,
a signature whose params reach generation; the registered model loads and serves from a Python that has the
project's dependencies but not the project, in a directory outside the checkout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.types import DataType

from cluster.config import load
from cluster.config.pretrain import PretrainConfig
from cluster.eval.evaluation import log_evaluation
from cluster.runtime.local_services import free_port
from cluster.runtime.registry import CHAMPION, default_name
from cluster.runtime.tracking import RunLogger
from gpt2 import GPT, get_tokenizer, preset
from gpt2.generate import generate
from gpt2.model_card import split_front_matter, write_model_card
from tests.job_loader import load_job

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The Python standard library"
PRETRAINED, FINETUNED = default_name("reg", "pretrained"), default_name("reg", "finetuned")
VAL_LOSSES = (3.0, 3.5, 2.5)  # three pretraining runs of one config: the third is the best, the second not


def checkpoint(directory: Path, seed: int, card: bool) -> Path:
    torch.manual_seed(seed)
    model = GPT(preset("tiny"))
    extra = (lambda d: write_model_card(d, model.config, params=model.num_params(), training={"tokens_seen": 4096},
                                        evaluation={}, name=f"tiny-{seed}")) if card else None
    model.save_pretrained(str(directory), extra=extra)
    return directory


def continuation(model_dir: Path, max_tokens: int, **sampling) -> str:
    """What the project's own generation gives for PROMPT: the registered model must give the same."""
    enc = get_tokenizer()
    model = GPT.from_pretrained(str(model_dir)).eval()
    return enc.decode(generate(model, [enc.encode_ordinary(PROMPT)], max_tokens, **sampling)[0])


@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory):
    """Three pretraining runs named "reg" and a fine-tune of one, registered the way the jobs do it."""
    root = tmp_path_factory.mktemp("registry")
    runs = []
    for i, val_loss in enumerate(VAL_LOSSES):
        run_dir = root / f"pretrain-{i}"
        logger = RunLogger(run_dir, experiment="registry-test", run_name="reg", uri=mlflow_server,
                           tags={"git_commit": "abc123"})
        logger.log_metrics({"val_loss": val_loss + 1}, step=0)
        logger.log_metrics({"val_loss": val_loss}, step=4)  # the final model's: the last step's value counts
        final = checkpoint(run_dir / "final", seed=i, card=True)
        assert logger.log_model(final, "pretrained", tags={"tokens_seen": 4096}) == f"models:/{PRETRAINED}/{i + 1}"
        logger.close()
        runs.append((logger.run_id, final))

    run_dir = root / "finetune"
    logger = RunLogger(run_dir, experiment="registry-test", run_name="reg", uri=mlflow_server)
    logger.log_metrics({"val_loss": 2.9, "best_val_loss": 2.8}, step=1)
    logger.log_metrics({"val_loss": 3.1, "best_val_loss": 2.8}, step=2)  # the exported model is the best epoch's
    best = checkpoint(run_dir / "best", seed=7, card=False)  # a fine-tune saves its best epoch without a card
    assert logger.log_model(best, "finetuned") == f"models:/{FINETUNED}/1"
    assert logger.log_model(best, "finetuned", registered_name="reg-custom") == "models:/reg-custom/1"
    logger.close()
    return {"runs": runs, "finetune": (logger.run_id, best), "root": root}


def test_one_registered_model_per_kind_with_card_tags_and_aliases(registry, mlflow_server):
    client = MlflowClient(mlflow_server)
    assert {PRETRAINED, FINETUNED, "reg-custom"} <= {m.name for m in client.search_registered_models()}

    pretrained = client.get_registered_model(PRETRAINED)
    assert pretrained.tags["kind"] == "pretrained" and f"`models:/{PRETRAINED}@champion`" in pretrained.description
    assert pretrained.aliases == {CHAMPION: "3"}  # the lowest val_loss
    for number, ((run_id, final), val_loss) in enumerate(zip(registry["runs"], VAL_LOSSES), start=1):
        version = client.get_model_version(PRETRAINED, str(number))
        assert version.tags == {
            "kind": "pretrained", "val_loss": f"{val_loss:g}", "tokens_seen": "4096", "git_commit": "abc123",
            "source_run": run_id, "source_run_name": "registry-test/reg",
        }
        first_line, card = version.description.split("\n\n", 1)
        assert first_line == f"A `pretrained` GPT-2 model from MLflow run `registry-test/reg` (run id `{run_id}`)."
        # The card without its YAML header (metadata for the Hub, not for a reader of the registry).
        assert card == split_front_matter((final / "README.md").read_text())[1].lstrip("\n")
        assert not card.startswith("---") and card.startswith("# ")

    run_id, _ = registry["finetune"]
    finetuned = client.get_model_version(FINETUNED, "1")
    assert finetuned.tags["kind"] == "finetuned" and finetuned.tags["val_loss"] == "2.8"
    assert finetuned.tags["source_run"] == run_id and len(finetuned.tags["git_commit"]) == 40  # this checkout's
    # No card in the checkpoint: one rendered from its config and the run's figures.
    assert f"# {FINETUNED}" in finetuned.description and "| val_loss | 2.8 |" in finetuned.description
    assert client.get_registered_model("reg-custom").aliases == {CHAMPION: "1"}


def test_champion_stays_with_the_lowest_val_loss_while_latest_is_the_newest(registry, mlflow_server, monkeypatch):
    """A fourth run that does worse is `models:/NAME/latest` (MLflow's own; `latest` is no alias name MLflow
    accepts) but does not take `champion`."""
    from cluster.runtime.models import load_model

    run_dir = registry["root"] / "pretrain-worse"
    logger = RunLogger(run_dir, experiment="registry-test", run_name="reg", uri=mlflow_server)
    logger.log_metrics({"val_loss": 4.0}, step=4)
    worse = checkpoint(run_dir / "final", seed=9, card=True)
    assert logger.log_model(worse, "pretrained") == f"models:/{PRETRAINED}/4"
    logger.close()
    assert MlflowClient(mlflow_server).get_registered_model(PRETRAINED).aliases == {CHAMPION: "3"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    weights = load_model(f"models:/{PRETRAINED}/latest").transformer.wte.weight
    assert torch.equal(weights, GPT.from_pretrained(str(worse)).transformer.wte.weight)


def test_an_evaluation_of_the_run_tags_its_versions_with_hellaswag(registry, mlflow_server, tmp_path):
    run_id, final = registry["runs"][0]
    results = tmp_path / "results.json"
    results.write_text("{}")
    metrics = {"hellaswag/completion/acc": 0.25, "hellaswag/completion/acc_norm": 0.375, "hellaswag/examples": 8,
               "text/val/loss": 3.2}
    assert log_evaluation(str(final), metrics, results, run_name="eval", uri=mlflow_server) == f"run {run_id}"
    tags = MlflowClient(mlflow_server).get_model_version(PRETRAINED, "1").tags
    assert (tags["hellaswag_acc"], tags["hellaswag_acc_norm"], tags["hellaswag_examples"]) == ("0.25", "0.375", "8")
    assert tags["val_loss"] == "3"  # the evaluation's text loss is not the validation loss


def test_an_evaluation_of_a_registered_uri_tags_that_version(registry, mlflow_server, monkeypatch, tmp_path):
    """`jobs/evaluate.py --model models:/NAME@ALIAS` tags the version the alias names, and no other."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    results = tmp_path / "results.json"
    results.write_text("{}")
    champion = client.get_model_version_by_alias(PRETRAINED, CHAMPION).version
    metrics = {"hellaswag/completion/acc": 0.5, "hellaswag/completion/acc_norm": 0.625, "hellaswag/examples": 16}
    where = log_evaluation(f"models:/{PRETRAINED}@{CHAMPION}", metrics, results, run_name="eval-uri", uri=mlflow_server)
    assert where.startswith("run ") and where != f"run {client.get_model_version(PRETRAINED, champion).run_id}"
    for version in client.search_model_versions(f"name='{PRETRAINED}'"):
        tagged = version.tags.get("hellaswag_acc_norm") == "0.625"
        assert tagged == (version.version == champion), version.version


def test_the_signature_input_example_and_code_travel_with_the_model(registry, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    uri = f"models:/{PRETRAINED}@{CHAMPION}"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.input_types() == [DataType.string]
    assert {p.name: p.default for p in info.signature.params.params} == {
        "max_tokens": 64, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None}
    assert info.saved_input_example_info is not None
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    assert (model / "code" / "gpt2" / "generate.py").is_file()
    assert (model / "code" / "cluster" / "runtime" / "mlflow_model.py").is_file()
    assert "torch==2.13.0" in (model / "requirements.txt").read_text().split()
    example = json.loads((model / "serving_input_example.json").read_text())
    assert example == {"inputs": ["Once upon a time"], "params": {"max_tokens": 8}}


def test_jobs_and_the_server_take_an_alias_uri(registry, mlflow_server, monkeypatch, capsys):
    """cluster.runtime.models.load_model is how the server's variants and every job resolve a model source."""
    from cluster.runtime.models import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    _, champion = registry["runs"][2]
    model = load_model(f"models:/{PRETRAINED}@{CHAMPION}")
    assert torch.equal(model.transformer.wte.weight, GPT.from_pretrained(str(champion)).transformer.wte.weight)
    load_job("generate").main(["--model", f"models:/{PRETRAINED}@{CHAMPION}", "--prompt", PROMPT,
                               "--max-tokens", "5", "--temperature", "0", "--dtype", "float32"])
    assert capsys.readouterr().out == f"--- sample 1\n{PROMPT}{continuation(champion, 5, temperature=0)}\n"


def test_run_configs_name_the_registered_model():
    cfg = load(PretrainConfig, ROOT / "configs" / "local.yaml", ["run.registered_model=my-gpt2"])
    assert cfg.run.registered_model == "my-gpt2"
    assert load(PretrainConfig, ROOT / "configs" / "local.yaml", []).run.registered_model is None


# ----------------------------------------------------------------------- outside the checkout, without the project


@pytest.fixture(scope="module")
def outside(tmp_path_factory, mlflow_server) -> dict:
    """A virtualenv whose only packages are this one's dependencies: a .pth line adds this virtualenv's
    site-packages but runs none of the .pth files there, so the editable install of gpt2/cluster/serve stays out.
    A `uvicorn` launcher on its PATH (what `mlflow models serve` starts) runs on that interpreter. Returns the
    environment, the working directory (outside the checkout) and the interpreter."""
    root = tmp_path_factory.mktemp("outside")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    uvicorn = venv / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    path = [str(venv / "bin")] + [p for p in os.environ["PATH"].split(os.pathsep) if not p.startswith(str(ROOT))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join(path), MLFLOW_TRACKING_URI=mlflow_server)
    cwd = root / "elsewhere"
    cwd.mkdir()
    probe = subprocess.run([python, "-c", "import gpt2"], cwd=cwd, env=env, capture_output=True, text=True)
    assert "No module named 'gpt2'" in probe.stderr  # without the model's code there is no project here
    return {"env": env, "cwd": cwd, "python": python}


LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
prompts = [sys.argv[2]]
import gpt2
print(json.dumps({
    "default": model.predict(prompts),
    "short": model.predict(pd.DataFrame({"prompt": prompts}), params={"max_tokens": 3}),
    "sampled": model.predict(prompts, params={"max_tokens": 6, "temperature": 1.0, "top_k": 5, "top_p": 0.9,
                                              "seed": 7}),
    "gpt2_from": gpt2.__file__,
}))
"""


def test_pyfunc_loads_and_honours_params_outside_the_checkout(registry, outside):
    _, champion = registry["runs"][2]
    out = subprocess.run(
        [outside["python"], "-c", LOAD_AND_PREDICT, f"models:/{PRETRAINED}@{CHAMPION}", PROMPT],
        cwd=outside["cwd"], env=outside["env"], capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["gpt2_from"].startswith(str(ROOT)) and "/code/gpt2/" in got["gpt2_from"]
    assert got["default"] == [continuation(champion, 64, temperature=0)]
    assert got["short"] == [continuation(champion, 3, temperature=0)]
    assert got["sampled"] == [continuation(champion, 6, temperature=1.0, top_k=5, top_p=0.9, seed=7)]
    assert len(got["short"][0]) < len(got["default"][0])


def test_mlflow_models_serve_answers_invocations_outside_the_checkout(registry, outside):
    _, champion = registry["runs"][2]
    port = free_port()
    server = subprocess.Popen(
        [outside["python"], "-m", "mlflow", "models", "serve", "-m", f"models:/{PRETRAINED}@{CHAMPION}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=outside["cwd"], env=outside["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{server.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(1)
        body = {"inputs": [PROMPT], "params": {"max_tokens": 4}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            assert json.loads(r.read()) == {"predictions": [continuation(champion, 4, temperature=0)]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
