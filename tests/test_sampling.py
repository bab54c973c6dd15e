"""The batched sampler (gpt2.sampling): right distribution, rows independent of their batch, settings per row."""

from __future__ import annotations

import pytest
import torch

from gpt2 import EOT_TOKEN
from gpt2.sampling import SamplingParams, SequenceSampling, choose


def test_draws_follow_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    rows = [SequenceSampling(SamplingParams(temperature=1.0), seed=i) for i in range(n)]
    tokens, _ = choose(logits.expand(n, -1), rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / n
    expected = torch.softmax(logits.double(), dim=0)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)
    # Temperature 0.5 sharpens the distribution as softmax(logits / 0.5).
    rows = [SequenceSampling(SamplingParams(temperature=0.5), seed=i) for i in range(n)]
    freq = torch.bincount(torch.tensor(choose(logits.expand(n, -1), rows)[0]), minlength=4).double() / n
    assert torch.allclose(freq, torch.softmax(logits.double() / 0.5, dim=0), atol=0.03)


def test_a_seeded_row_is_the_same_whatever_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    alone = SequenceSampling(SamplingParams(temperature=0.9, top_k=50, top_p=0.9), seed=7)
    crowd = [SequenceSampling(SamplingParams(temperature=t, top_p=0.5), seed=s) for t, s in ((0, None), (1.3, 1))]
    seeded = SequenceSampling(SamplingParams(temperature=0.9, top_k=50, top_p=0.9), seed=7)
    for step in range(5):
        mine = choose(logits[step : step + 1], [alone])[0][0]
        batch = torch.stack([logits[(step + 1) % 5], logits[step], logits[(step + 2) % 5]])
        assert choose(batch, [crowd[0], seeded, crowd[1]])[0][1] == mine


def test_logprobs_are_the_raw_distributions_and_include_the_top_tokens():
    logits = torch.tensor([[3.0, 1.0, 0.5, -2.0], [0.0, 0.0, 5.0, 0.0]])
    rows = [SequenceSampling(SamplingParams(temperature=0, logit_bias=((3, 100.0),)), logprobs=2),
            SequenceSampling(SamplingParams(temperature=0))]
    tokens, lps = choose(logits, rows)
    assert tokens == [3, 2] and lps[1] is None  # the bias forces token 3; the second row asked for no logprobs
    raw = torch.log_softmax(logits[0], dim=0)
    assert lps[0].logprob == pytest.approx(float(raw[3]))  # reported without the bias
    assert [t for t, _ in lps[0].top] == [0, 1] and lps[0].top[0][1] == pytest.approx(float(raw[0]))


def test_min_tokens_bans_the_stop_tokens_until_reached():
    logits = torch.zeros(1, 50257)
    logits[0, EOT_TOKEN] = 10.0
    logits[0, 7] = 9.0
    logits[0, 5] = 8.0
    row = SequenceSampling(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(7,)))
    assert choose(logits, [row])[0] == [5]  # both stop tokens banned
    row.record(0)
    row.record(0)
    assert choose(logits, [row])[0] == [EOT_TOKEN]


def test_bad_settings_are_refused():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(repetition_penalty=0), dict(min_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
