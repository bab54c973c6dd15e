"""The real lm-evaluation-harness scoring a HellaSwag-format task through the Serve endpoint (`local-completions`).

lm-eval sends each context + continuation as token ids with `echo: true, logprobs: 1, max_tokens: 1` and sums the
continuation's `token_logprobs`; with `tokenizer_backend=remote` it tokenizes through the server's /tokenize, so
nothing needs Hugging Face tokenizer files or network. Its per-choice log-likelihoods must equal the project's
in-process scoring, and its accuracies those of `jobs/evaluate.py`'s harness method on the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2 import GPT, preset
from gpt2.hellaswag import load_hellaswag, score_examples
from serving.deploy import deploy
from tests.job_loader import load_job
from tests.test_hellaswag import EXAMPLES, write_jsonl

pytestmark = pytest.mark.usefixtures("ray_session")

TASK = """\
task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
test_split: null
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

# The task's preprocessing is lm-eval's own HellaSwag preprocessing, so the comparison below also checks that the
# project's harness method prepares examples as the harness does.
UTILS = "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve as ray_serve

    from cluster.runtime.local_services import free_port

    root = tmp_path_factory.mktemp("lm-eval")
    torch.manual_seed(0)
    model = GPT(preset("tiny").replace(block_size=1024)).eval()  # HellaSwag rows are ~190 tokens: no truncation
    model.save_pretrained(root / "model")
    settings = {"variants": {"tiny": {"source": str(root / "model"), "dtype": "fp32"}}, "max_batch": 8,
                "torch_threads": 1, "model_replica_cpus": 0.5}
    base = deploy(settings, port=free_port(), name="gpt2-lm-eval", route_prefix="/", timeout=120)
    yield {"base": base, "root": root, "model": model}
    ray_serve.shutdown()


def test_lm_eval_hellaswag_through_the_server_equals_in_process_scoring(served, tmp_path):
    data = tmp_path / "hellaswag.jsonl"
    write_jsonl(data, EXAMPLES)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_local.yaml").write_text(TASK.format(data=data))
    (tasks / "utils.py").write_text(UTILS)
    out = tmp_path / "lm-eval-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    model_args = (f"base_url={served['base']}/v1/completions,model=tiny,tokenizer_backend=remote,"
                  "tokenized_requests=True,num_concurrent=4,max_retries=1")
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
         "--tasks", "hellaswag_local", "--include_path", str(tasks), "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    [results_file] = out.rglob("results_*.json")
    [samples_file] = out.rglob("samples_hellaswag_local_*.jsonl")
    metrics = json.loads(results_file.read_text())["results"]["hellaswag_local"]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])

    # Per-choice log-likelihoods: lm-eval's, read back from the server, against gpt2.loglikelihood in this process.
    examples = load_hellaswag(data)
    expected = score_examples(served["model"], examples, "harness")
    assert len(samples) == len(expected) == len(EXAMPLES)
    for sample, score in zip(samples, expected):
        served_ll = [float(resp[0][0]) for resp in sample["resps"]]  # lm-eval logs them as text
        assert served_ll == pytest.approx(list(score.logprobs), abs=1e-4), sample["doc_id"]

    # Accuracies: lm-eval's against jobs/evaluate.py's harness method on the same file, fp32 in this process.
    output = tmp_path / "evaluate.json"
    assert load_job("evaluate").main(["--model", str(served["root"] / "model"), "--hellaswag", str(data),
                                      "--actors", "0", "--dtype", "float32", "--output", str(output), "--no-progress",
                                      "--no-mlflow"]) == 0
    ours = json.loads(output.read_text())["models"][0]["metrics"]
    assert metrics["acc,none"] == pytest.approx(ours["hellaswag/harness/acc"])
    assert metrics["acc_norm,none"] == pytest.approx(ours["hellaswag/harness/acc_norm"])
    print(f"lm-eval through the server: acc {metrics['acc,none']:.4f} acc_norm {metrics['acc_norm,none']:.4f};"
          f" jobs/evaluate.py harness: acc {ours['hellaswag/harness/acc']:.4f}"
          f" acc_norm {ours['hellaswag/harness/acc_norm']:.4f}")
