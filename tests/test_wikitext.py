"""WikiText-2 from a local copy in either layout, and jobs/evaluate.py's --dataset wikitext-2 against gpt2.perplexity."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2.perplexity import evaluate_perplexity, text_tokens
from gpt2.wikitext import WikiTextError, wikitext2_rows, wikitext2_text
from tests.job_loader import load_job

# wiki.test.raw as released: every line starts with a space, blank lines hold a single space.
RAW = (
    " \n"
    " = Robert Boulter = \n"
    " \n"
    " Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role on the"
    " television series The Bill in 2000 . This was followed by a starring role in the play Herons written by Simon"
    " Stephens , which was performed in 2001 at the Royal Court Theatre . \n"
    " \n"
    " = = Career = = \n"
    " \n"
    " In 2006 , Boulter starred alongside Whishaw in the play Citizenship written by Mark Ravenhill . \n"
)
# The same split as rows of the Hugging Face dataset: each line with its newline, blank lines as "".
ROWS = ["", " = Robert Boulter = \n", "", RAW.splitlines(keepends=True)[3], "", " = = Career = = \n", "",
        RAW.splitlines(keepends=True)[7]]


@pytest.fixture
def raw_layout(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(RAW, encoding="utf-8")
    return tmp_path  # the parent works too: wikitext-2-raw/ is looked for inside it


@pytest.fixture
def hub_layout(tmp_path):
    folder = tmp_path / "hub" / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"text": ROWS}), folder / "test-00000-of-00001.parquet")
    return tmp_path / "hub"


def test_both_local_layouts_give_the_datasets_rows(raw_layout, hub_layout):
    assert wikitext2_rows("test", raw_layout) == ROWS
    assert wikitext2_rows("test", raw_layout / "wikitext-2-raw") == ROWS
    assert wikitext2_rows("test", hub_layout) == ROWS
    assert wikitext2_text("test", hub_layout) == "\n\n".join(ROWS)


def test_missing_copies_are_explained(tmp_path, monkeypatch):
    with pytest.raises(WikiTextError, match=f"{tmp_path}: no WikiText-2 validation split; expected wiki.valid.raw"):
        wikitext2_rows("validation", tmp_path)
    with pytest.raises(WikiTextError, match="does not exist"):
        wikitext2_rows("test", tmp_path / "nowhere")
    with pytest.raises(WikiTextError, match="unknown WikiText-2 split 'dev'"):
        wikitext2_rows("dev", tmp_path)
    # No local copy, an empty Hugging Face cache and no hub: the message says how to bring the files.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WikiTextError, match="neither in the Hugging Face cache nor downloadable here.*huggingface-cli"):
        wikitext2_rows("test")


def test_a_parquet_file_without_text_is_named(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "test-00000-of-00001.parquet")
    with pytest.raises(WikiTextError, match="test-00000-of-00001.parquet: no 'text' column"):
        wikitext2_rows("test", tmp_path)


def test_evaluate_job_perplexity_equals_gpt2_perplexity(raw_layout, tiny_model, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_model.save_pretrained(checkpoint)
    output = tmp_path / "results.json"
    args = ["--model", str(checkpoint), "--no-hellaswag", "--dataset", "wikitext-2", "--wikitext-dir", str(raw_layout),
            "--actors", "0", "--device", "cpu", "--dtype", "float32", "--context-length", "32", "--output", str(output),
            "--no-progress"]
    assert load_job("evaluate").main(args) == 0

    results = json.loads(output.read_text())
    expected = evaluate_perplexity(tiny_model, text_tokens("\n\n".join(ROWS)), context_length=32)
    [model] = results["models"]
    assert model["metrics"]["text/wikitext-2/perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert model["metrics"]["text/wikitext-2/tokens"] == expected.n_tokens
    assert results["data"]["text/wikitext-2"] == {"path": str(raw_layout), "split": "test", "tokens": expected.n_tokens}
    assert results["settings"]["device"] == "cpu" and results["settings"]["dtype"] == "float32"


def test_evaluate_job_refuses_inconsistent_options(tmp_path, capsys):
    job = load_job("evaluate")
    for args, message in [
        (["--no-hellaswag", "--wikitext-dir", str(tmp_path), "--text", "a.txt"], "--wikitext-dir is only read with"),
        (["--no-hellaswag", "--dataset", "wikitext-2", "--device", "cpu"], "--device chooses where --actors 0 scores"),
        (["--no-hellaswag", "--dataset", "wikitext-3"], "invalid choice: 'wikitext-3'"),
    ]:
        with pytest.raises(SystemExit):
            job.parse_args(["--model", "m", *args])
        assert message in capsys.readouterr().err
