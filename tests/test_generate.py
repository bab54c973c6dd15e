import pytest
import torch

from gpt2 import EOT_TOKEN, GPT, preset
from gpt2.sampling import SamplingParams, SequenceSampling, choose


def _greedy_full_recompute(model, prompt, n):
    idx = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    return out


def test_kv_cache_greedy_equals_full_recompute(tiny_model):
    prompt = torch.randint(0, 50257, (7,)).tolist()
    cached = tiny_model.generate([prompt], 40, temperature=0, stop_at_eot=False)[0]
    assert cached == _greedy_full_recompute(tiny_model, prompt, 40)


def test_batched_prompts_of_different_lengths_match_single(tiny_model):
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (3, 11, 6)]
    batched = tiny_model.generate(prompts, 15, temperature=0, stop_at_eot=False)
    singles = [tiny_model.generate([p], 15, temperature=0, stop_at_eot=False)[0] for p in prompts]
    assert batched == singles


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model):
    prompt = [464, 1893, 286]
    a = tiny_model.generate([prompt], 20, temperature=1.0, top_k=50, seed=7)
    b = tiny_model.generate([prompt], 20, temperature=1.0, top_k=50, seed=7)
    c = tiny_model.generate([prompt], 20, temperature=1.0, top_k=50, seed=8)
    assert a == b and a != c
    # Row i of a batch seeded with s uses seed s + i: the same text as alone with that seed.
    batch = tiny_model.generate([[1, 2, 3], prompt], 20, temperature=1.0, top_k=50, seed=6)
    assert batch[1] == a[0]


def test_stream_yields_tokens_as_produced(tiny_model):
    steps = list(tiny_model.generate_stream([[1, 2, 3]], 5, temperature=0, stop_at_eot=False))
    assert len(steps) == 5 and all(len(s) == 1 and isinstance(s[0], int) for s in steps)
    assert [s[0] for s in steps] == tiny_model.generate([[1, 2, 3]], 5, temperature=0, stop_at_eot=False)[0]


def test_stops_at_end_of_text():
    torch.manual_seed(0)
    m = GPT(preset("tiny")).eval()
    with torch.no_grad():  # the final hidden state becomes all ones, and <|endoftext|> its best match
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.fill_(1.0)
        m.transformer.wte.weight[EOT_TOKEN] = 1.0
    assert m.generate([[5, 6]], 10, temperature=0) == [[]]
    assert len(m.generate([[5, 6]], 10, temperature=0, stop_at_eot=False)[0]) == 10


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0, -10.0])

    def draws(params: SamplingParams, n: int) -> set[int]:
        # n rows of one batch, each with its own generator: every row is an independent draw
        rows = [SequenceSampling(params, seed=i) for i in range(n)]
        return set(choose(logits.expand(n, -1), rows)[0])

    assert draws(SamplingParams(1.0, top_k=2), 200) == {0, 1}
    # Probabilities ≈ 0.665, 0.245, 0.090: the nucleus is {0} for p=0.5, {0, 1} for 0.9, {0, 1, 2} for 0.95.
    assert draws(SamplingParams(1.0, top_p=0.5), 200) == {0}
    assert draws(SamplingParams(1.0, top_p=0.9), 300) == {0, 1}
    assert draws(SamplingParams(1.0, top_p=0.95), 300) == {0, 1, 2}
    assert choose(logits[None], [SequenceSampling(SamplingParams(0.0))])[0] == [0]


def test_bad_inputs_raise_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.generate([[]], 5)
    with pytest.raises(ValueError, match="token id 60000 at prompt position 1"):
        tiny_model.generate([[1, 60000]], 5)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        tiny_model.generate([list(range(120))], 20)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        tiny_model.generate([[1]], -1)
    with pytest.raises(ValueError, match="temperature"):
        tiny_model.generate([[1]], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        tiny_model.generate([[1]], 3, top_p=0)


def test_crop_prompt_keeps_the_last_tokens(tiny_model):
    long = torch.randint(0, 50257, (200,)).tolist()
    a = tiny_model.generate([long], 8, temperature=0, crop_prompt=True, stop_at_eot=False)
    b = tiny_model.generate([long[-120:]], 8, temperature=0, stop_at_eot=False)
    assert a == b
