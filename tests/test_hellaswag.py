"""HellaSwag loading, the two scoring methods against an independent per-example computation, bad input, download."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from gpt2 import get_tokenizer
from gpt2.hellaswag import (
    PUBLISHED_BASELINES,
    HellaSwagDownloadError,
    HellaSwagFormatError,
    comparison_table,
    download_hellaswag,
    evaluate_hellaswag,
    harness_clean,
    harness_context,
    load_hellaswag,
    parse_example,
    score_examples,
)

# Written for these tests in the format of hellaswag_val.jsonl: ActivityNet captions (ctx_b starts a sentence in
# lower case) and WikiHow steps (bracketed section markers, empty ctx_b). The label of one is a string, as in the
# Hugging Face copy of the data. The last context is longer than the tiny model's 128-token window.
EXAMPLES = [
    {
        "ind": 14, "activity_label": "Making a sandwich",
        "ctx_a": "A man lays two slices of bread on a cutting board.", "ctx_b": "he",
        "ctx": "A man lays two slices of bread on a cutting board. he",
        "split": "val", "split_type": "indomain", "label": 0, "source_id": "activitynet~v_sandwich01",
        "endings": [
            "spreads peanut butter evenly across one of the slices.",
            "throws the bread into a swimming pool and dives in after it.",
            "starts playing the violin while the bread listens.",
            "puts on a helmet and rides the cutting board down the stairs.",
        ],
    },
    {
        "ind": 31, "activity_label": "Home and Garden",
        "ctx_a": "[header] How to repot a houseplant [title] Choose a slightly larger pot. [step] The new pot should "
                 "be one or two inches wider than the old one.",
        "ctx_b": "",
        "ctx": "[header] How to repot a houseplant [title] Choose a slightly larger pot. [step] The new pot should be "
               "one or two inches wider than the old one.",
        "split": "val", "split_type": "zeroshot", "label": 0, "source_id": "wikihow~48213",
        "endings": [
            "[substeps] A pot that is much bigger holds too much wet soil, which can rot the roots.",
            "[title] Paint the pot bright orange. [step] Orange pots are the only kind that plants enjoy.",
            "Then bury the whole plant in the garden and forget about it for a year.",
            "[title] Water the plant with lemonade. [step] The sugar in it helps the leaves grow faster.",
        ],
    },
    {
        "ind": 57, "activity_label": "Playing guitar",
        "ctx_a": "A young woman sits on a stool holding an acoustic guitar. She tunes the strings one by one.",
        "ctx_b": "the woman",
        "ctx": "A young woman sits on a stool holding an acoustic guitar. She tunes the strings one by one. the woman",
        "split": "val", "split_type": "indomain", "label": "2", "source_id": "activitynet~v_guitar07",
        "endings": [
            "eats the guitar pick and walks out of the room.",
            "paints the stool green and sits on the floor instead.",
            "begins strumming a slow song while tapping her foot.",
            "hands the guitar to a dog, who plays a drum solo.",
        ],
    },
    {
        "ind": 88, "activity_label": "Food and Entertaining",
        "ctx_a": "[header] How to make iced tea [title] Boil water in a kettle. [step] Use about four cups of water "
                 "for a full pitcher.",
        "ctx_b": "[title] Steep the tea bags. [step]",
        "ctx": "[header] How to make iced tea [title] Boil water in a kettle. [step] Use about four cups of water for "
               "a full pitcher. [title] Steep the tea bags. [step]",
        "split": "val", "split_type": "zeroshot", "label": 3, "source_id": "wikihow~90311",
        "endings": [
            "[step] Put the tea bags in the freezer so the water stays hot.",
            "[step] Drop the kettle on the floor to wake up the leaves.",
            "[step] Pour the tea into the car's fuel tank before it cools.",
            "[step] Leave four tea bags in the hot water for about five minutes, then remove them.",
        ],
    },
    {
        "ind": 102, "activity_label": "Shoveling snow",
        "ctx_a": " ".join(
            ["Snow has fallen all night on a quiet street lined with parked cars and low brick houses."] * 9
        ),
        "ctx_b": "a man in a red coat",
        "ctx": " ".join(
            ["Snow has fallen all night on a quiet street lined with parked cars and low brick houses."] * 9
        ) + " a man in a red coat",
        "split": "val", "split_type": "indomain", "label": 1, "source_id": "activitynet~v_snow03",
        "endings": [
            "climbs onto the roof and starts sunbathing.",
            "clears the sidewalk in front of his house with a wide shovel.",
            "opens an umbrella and sails away down the street.",
            "builds a campfire on the hood of a parked car.",
        ],
    },
]


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def hellaswag_file(tmp_path):
    path = tmp_path / "hellaswag_small.jsonl"
    write_jsonl(path, EXAMPLES)
    return path


# ---------------------------------------------------------------------------------------------------- reference


def reference_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return text.replace("  ", " ")


def reference_rows(record: dict, method: str) -> list[tuple[list[int], int, int]]:
    """(tokens, number of ending tokens, acc_norm divisor) per ending, written from the method descriptions."""
    enc = get_tokenizer()
    rows = []
    for ending in record["endings"]:
        if method == "completion":
            ending_tokens = enc.encode(" " + ending)
            rows.append((enc.encode(record["ctx"]) + ending_tokens, len(ending_tokens), len(ending_tokens)))
        else:
            query = reference_clean(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
            choice = reference_clean(ending)
            tokens = enc.encode(query + " " + choice)
            # Whitespace at the end of the query (from a removed final marker) counts as part of the ending.
            rows.append((tokens, len(tokens) - len(enc.encode(query.rstrip())), len(choice)))
    return rows


def reference_example(model, record: dict, method: str) -> tuple[list[float], list[int]]:
    """Each ending alone, unbatched and unpadded, with a float64 log-softmax."""
    limit = model.config.block_size + 1
    logprobs, norms = [], []
    for tokens, n_ending, norm in reference_rows(record, method):
        tokens = tokens[-limit:]  # a row too long for the model keeps its last block_size + 1 tokens
        x = torch.tensor(tokens[:-1])[None]
        with torch.no_grad():
            logits = model(x)[0][0].double()  # (T, V)
        token_logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]
        logprobs.append(token_logprobs[-n_ending:].sum().item())
        norms.append(norm)
    return logprobs, norms


def argmax(values) -> int:
    return max(range(len(values)), key=lambda i: values[i])


# ---------------------------------------------------------------------------------------------------- tests


def test_load_reads_every_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + json.dumps(EXAMPLES[2]) + "\n")
    first, second = load_hellaswag(path)
    assert (first.index, first.line, first.label, first.ctx_b) == (0, 1, 0, "he")
    assert first.endings == tuple(EXAMPLES[0]["endings"])
    assert (second.index, second.line, second.label) == (1, 3, 2)  # the label "2" was a string
    assert len(load_hellaswag(path, limit=1)) == 1


def test_harness_preprocessing_matches_the_harness_text():
    wikihow = parse_example(json.dumps(EXAMPLES[1]), index=0, line=1, source="inline")
    assert harness_context(wikihow) == (
        "Home and Garden: How to repot a houseplant. Choose a slightly larger pot. The new pot should be one or two"
        " inches wider than the old one."
    )
    activitynet = parse_example(json.dumps(EXAMPLES[2]), index=0, line=1, source="inline")
    assert harness_context(activitynet).endswith("one by one. The woman")
    ends_with_marker = parse_example(json.dumps(EXAMPLES[3]), index=0, line=1, source="inline")
    # capitalize() lower-cases the rest of ctx_b, and " [title]" after a full stop leaves two; both as in the harness.
    assert harness_context(ends_with_marker).endswith("full pitcher.. steep the tea bags. ")
    # Removing a leading marker leaves its space, as in the harness.
    first, second = (harness_clean(ending) for ending in EXAMPLES[1]["endings"][:2])
    assert first == " A pot that is much bigger holds too much wet soil, which can rot the roots."
    assert second == " Paint the pot bright orange. Orange pots are the only kind that plants enjoy."


@pytest.mark.parametrize("method", ["completion", "harness"])
def test_batched_scores_equal_independent_per_example_computation(tiny_model, hellaswag_file, method):
    examples = load_hellaswag(hellaswag_file)
    assert len(get_tokenizer().encode(EXAMPLES[-1]["ctx"])) > tiny_model.config.block_size  # truncation is exercised
    scores = score_examples(tiny_model, examples, method)  # all 5 × 4 rows in one padded forward pass
    correct = correct_norm = 0
    for record, score in zip(EXAMPLES, scores):
        logprobs, norms = reference_example(tiny_model, record, method)
        assert score.logprobs == pytest.approx(logprobs, rel=1e-5, abs=1e-4)
        assert list(score.norm_lengths) == norms
        assert score.prediction == argmax(logprobs)
        assert score.prediction_norm == argmax([lp / n for lp, n in zip(logprobs, norms)])
        label = int(record["label"])
        correct += argmax(logprobs) == label
        correct_norm += argmax([lp / n for lp, n in zip(logprobs, norms)]) == label
    result = evaluate_hellaswag(tiny_model, examples, methods=[method], batch_size=2)[method]
    assert (result.n, result.correct, result.correct_norm) == (len(EXAMPLES), correct, correct_norm)
    assert result.acc == correct / len(EXAMPLES)
    assert result.metrics() == {f"hellaswag/{method}/acc": result.acc, f"hellaswag/{method}/acc_norm": result.acc_norm}


def test_evaluation_restores_training_mode(tiny_model, hellaswag_file):
    tiny_model.train()
    evaluate_hellaswag(tiny_model, load_hellaswag(hellaswag_file, limit=1), methods=["completion"])
    assert tiny_model.training


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ctx": "A man", "endings": ["a", "b"', r"bad\.jsonl:3: malformed JSON"),
        (json.dumps({**EXAMPLES[0], "label": 4}), r"bad\.jsonl:3: label 4 is not an ending index 0\.\.3"),
        (json.dumps({**EXAMPLES[0], "label": "x"}), r"bad\.jsonl:3: label 'x'"),
        (
            json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "endings"}),
            r"bad\.jsonl:3: missing field\(s\) \['endings'\]",
        ),
        (
            json.dumps({**EXAMPLES[0], "endings": EXAMPLES[0]["endings"][:3]}),
            r"bad\.jsonl:3: 'endings' must be a list of 4",
        ),
        (json.dumps({**EXAMPLES[0], "ctx": None}), r"bad\.jsonl:3: field\(s\) \['ctx'\] must be strings"),
        ("[1, 2, 3]", r"bad\.jsonl:3: expected a JSON object"),
    ],
)
def test_bad_lines_are_reported_with_their_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps(EXAMPLES[1]) + "\n" + line + "\n")
    with pytest.raises(HellaSwagFormatError, match=message):
        load_hellaswag(path)


def test_non_utf8_and_empty_files_are_refused(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(EXAMPLES[0]).encode() + b"\n" + '{"ctx": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(HellaSwagFormatError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_hellaswag(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(HellaSwagFormatError, match="no examples"):
        load_hellaswag(empty)


def test_download_verifies_the_checksum_and_caches(tmp_path, hellaswag_file):
    data = hellaswag_file.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    url = hellaswag_file.as_uri()

    with pytest.raises(HellaSwagDownloadError, match="expected " + "0" * 64):
        download_hellaswag(cache, url=url, sha256="0" * 64)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written is left behind

    path = download_hellaswag(cache, url=url, sha256=sha256)
    assert path == cache / hellaswag_file.name and path.read_bytes() == data

    hellaswag_file.unlink()  # the cached, verified copy is used without the source
    assert download_hellaswag(cache, url=url, sha256=sha256) == path

    path.write_bytes(data[:-10])  # a damaged cache entry is fetched again, which now fails
    with pytest.raises(HellaSwagDownloadError, match="cannot download"):
        download_hellaswag(cache, url=url, sha256=sha256)


def test_comparison_table_puts_results_next_to_the_published_baselines():
    metrics = {"hellaswag/completion/acc": 0.2512, "hellaswag/completion/acc_norm": 0.2634,
               "hellaswag/harness/acc": 0.25, "hellaswag/harness/acc_norm": 0.2701}
    table = comparison_table([("my-model", metrics)])
    assert re.search(r"my-model\s+25\.12\s+26\.34\s+25\.00\s+27\.01", table)
    assert re.search(r"GPT-2 124M \(OpenAI weights\)\s+28\.59\s+29\.55\s+28\.92\s+31\.14", table)
    assert re.search(r"GPT-3 124M.*\s+-\s+33\.70\s+-\s+-", table)
    for baseline in PUBLISHED_BASELINES:
        assert baseline.name in table
    assert {"30.52", "30.78", "33.52"} <= set(re.findall(r"\d+\.\d\d", table))
