import json

import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.checkpoint import CheckpointError
from gpt2.early_exit import (
    EXIT_CONFIG_FILE,
    EXIT_WEIGHTS_FILE,
    EarlyExitGPT,
    ExitClassifier,
    calibrate,
    choose_threshold,
    exit_features_and_labels,
    held_out,
    load_early_exit,
    save_early_exit,
    train_classifier,
)

NEVER, ALWAYS = 1.5, 0.0  # sigmoid scores lie in [0, 1]
CONFIG = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=2, n_embd=32)


def _model(norm: str = "pre", head_features: bool = True, exit_layer: int = 2, **config) -> EarlyExitGPT:
    torch.manual_seed(0)
    base = GPT(CONFIG.replace(norm=norm, **config)).eval()
    return EarlyExitGPT(base, exit_layer, classifier=ExitClassifier(CONFIG.n_embd, 16, head_features)).eval()


def _truncated(base: GPT, n_layer: int) -> GPT:
    """The same weights with only the first n_layer blocks (ln_f and the tied head kept)."""
    short = GPT(base.config.replace(n_layer=n_layer)).eval()
    deeper = tuple(f"transformer.h.{i}." for i in range(n_layer, base.config.n_layer))
    short.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith(deeper)})
    return short


@torch.no_grad()
def _reference_logits(base: GPT, exit_layer: int, tokens: list[int], exited: list[bool]) -> torch.Tensor:
    """Full recompute with given exit decisions: an exited position's state stays h_k in every deeper block
    and its logits come from ln_f(h_k); the others run every block. (T, V). Attention is causal, so row i equals
    what a recompute at decoding step i would give."""
    t = base.transformer
    idx, held = torch.tensor([tokens]), torch.tensor([exited])[..., None]  # (1, T), (1, T, 1)
    x = t.wte(idx) + t.wpe(torch.arange(len(tokens)))
    for block in t.h[:exit_layer]:
        x = block(x)
    h = x
    for block in t.h[exit_layer:]:
        x = torch.where(held, h, block(x))
    return base.lm_head(torch.where(held, t.ln_f(h), t.ln_f(x)))[0, :, : base.config.vocab_size]


def _thresholds_that_mix(model: EarlyExitGPT, quantiles: list[float]) -> list[float]:
    """Thresholds at quantiles of the classifier's scores on random tokens, so some positions exit and some not."""
    score = model.exit_scores(torch.randint(0, CONFIG.vocab_size, (8, 32))).flatten()
    return [float(score.quantile(q)) for q in quantiles]


# ------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("head_features", [True, False])
def test_never_exit_is_the_standard_model(head_features):
    model = _model(head_features=head_features)
    base = model.base
    idx = torch.randint(0, CONFIG.vocab_size, (3, 20))
    with torch.no_grad():
        logits, exited = model.forward_with_exits(idx, threshold=NEVER)
        assert not exited.any() and torch.equal(logits, base(idx)[0])
    prompts = [[5, 6, 7], [100, 3, 9, 4, 2, 8]]
    model.threshold = NEVER
    assert model.generate(prompts, 25, temperature=0, stop_at_eot=False) == base.generate(
        prompts, 25, temperature=0, stop_at_eot=False
    )
    assert model.generate(prompts, 25, temperature=1.0, top_k=40, seed=3) == base.generate(
        prompts, 25, temperature=1.0, top_k=40, seed=3
    )


@pytest.mark.parametrize("head_features", [True, False])
def test_always_exit_is_the_truncated_model_with_its_head(head_features):
    model = _model(head_features=head_features)
    short = _truncated(model.base, model.exit_layer)
    idx = torch.randint(0, CONFIG.vocab_size, (3, 20))
    with torch.no_grad():
        logits, exited = model.forward_with_exits(idx, threshold=ALWAYS)
        assert exited.all() and torch.equal(logits, short(idx)[0])
    model.threshold = ALWAYS
    prompts = [[5, 6, 7], [100, 3, 9, 4, 2, 8]]
    assert model.generate(prompts, 25, temperature=0, stop_at_eot=False) == short.generate(
        prompts, 25, temperature=0, stop_at_eot=False
    )
    sampled = model.generate(prompts, 25, temperature=0.8, seed=11)
    assert sampled == short.generate(prompts, 25, temperature=0.8, seed=11)
    # The standard generation loop ran with the exits: per-forward decisions and running totals are visible.
    assert model.last_exited is not None and model.last_exited.all()
    assert model.stats.exit_rate == 1.0 and model.stats.mean_blocks == model.exit_layer


@pytest.mark.parametrize(
    "config", [{"norm": "pre"}, {"norm": "post"}, {"n_head": 4, "n_head_per_layer": (4, 4, 1, 3)}], ids=str
)
def test_cached_decoding_with_mixed_exits_equals_full_recompute(config):
    model = _model(**config)  # Pre-LN, Post-LN, and pruned heads in the layers above the exit
    taus = _thresholds_that_mix(model, [0.2, 0.5, 0.8])
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7], [10, 20]]
    rows = [list(p) for p in prompts]
    decisions: list[list[bool]] = []  # per row, one per position fed
    step_logits: list[list[torch.Tensor]] = [[] for _ in prompts]  # per row, the logits that chose each new token
    steps = 20
    cache = model.new_kv_cache(len(prompts), max(map(len, prompts)) + steps)
    with torch.no_grad():
        for b, p in enumerate(prompts):  # prefill each row alone into its cache row, as gpt2.generate does
            logits, exited = model.forward_with_exits(torch.tensor([p]), kv_cache=cache.rows(b), threshold=taus[b])
            decisions.append(exited[0].tolist())
            step_logits[b].append(logits[0, -1])
        mixed_steps = 0
        for _ in range(steps):
            feed = [int(step_logits[b][-1].argmax()) for b in range(len(rows))]
            for row, tok in zip(rows, feed):
                row.append(tok)
            logits, exited = model.forward_with_exits(
                torch.tensor(feed)[:, None], kv_cache=cache, last_only=True, threshold=torch.tensor(taus)
            )
            mixed_steps += 0 < int(exited.sum()) < len(rows)
            for b in range(len(rows)):
                decisions[b].append(bool(exited[b, 0]))
                step_logits[b].append(logits[b, -1])
    assert mixed_steps > 0, "the thresholds should make rows of one decoding step decide differently"
    for b, row in enumerate(rows):
        assert any(decisions[b]) and not all(decisions[b]), decisions[b]
        got = torch.stack(step_logits[b])  # the logits after the prompt and after each fed token
        reference = _reference_logits(model.base, model.exit_layer, row, decisions[b])  # (T, V)
        wanted = reference[len(prompts[b]) - 1 :]
        torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-5)
        assert got.argmax(-1).tolist() == wanted.argmax(-1).tolist()
        # The uncached forward over the whole sequence makes the same decisions and predictions.
        with torch.no_grad():
            full, exited = model.forward_with_exits(torch.tensor([row]), threshold=taus[b])
        assert exited[0].tolist() == decisions[b]
        torch.testing.assert_close(full[0], reference, atol=1e-5, rtol=1e-5)


def test_per_row_thresholds_equal_rows_run_alone():
    model = _model()
    taus = _thresholds_that_mix(model, [0.1, 0.5, 0.9])
    idx = torch.randint(0, CONFIG.vocab_size, (3, 16))
    with torch.no_grad():
        batched, exited = model.forward_with_exits(idx, threshold=taus)
        for b, tau in enumerate(taus):
            alone, alone_exited = model.forward_with_exits(idx[b : b + 1], threshold=tau)
            assert torch.equal(alone_exited[0], exited[b])
            torch.testing.assert_close(alone[0], batched[b], atol=1e-5, rtol=1e-5)
    assert len({int(e.sum()) for e in exited}) == 3  # the rows really used different thresholds


@pytest.mark.parametrize("head_features", [True, False])
def test_logits_at_with_mixed_exits_are_those_positions_of_the_full_logits(head_features):
    model = _model(head_features=head_features)
    idx = torch.randint(0, CONFIG.vocab_size, (4, 24))
    at = torch.rand(4, 24) < 0.5
    low, high = _thresholds_that_mix(model, [0.3, 0.7])
    per_row = [ALWAYS, NEVER, low, high]  # a row that stops entirely leaves the others to run deeper alone
    for tau in [low, high, NEVER, ALWAYS, per_row]:
        with torch.no_grad():
            full, exited = model.forward_with_exits(idx, threshold=tau)
            picked, exited_too = model.forward_with_exits(idx, threshold=tau, logits_at=at)
            via_forward, _ = model(idx, threshold=tau, logits_at=at)
        assert torch.equal(exited, exited_too)
        torch.testing.assert_close(picked, full[at], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(via_forward, picked, rtol=0, atol=0)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, logits_at=at, last_only=True)


def test_statistics_count_positions_and_blocks():
    model = _model()
    with torch.no_grad():
        _, exited = model.forward_with_exits(torch.randint(0, 512, (2, 8)), threshold=[ALWAYS, NEVER])
        model(torch.randint(0, 512, (1, 4)), threshold=ALWAYS)
    assert exited[0].all() and not exited[1].any()
    assert model.blocks_per_token(exited).tolist() == [[2] * 8, [4] * 8]
    stats = model.reset_stats()
    assert (stats.tokens, stats.exited, stats.blocks_run) == (20, 12, 12 * 2 + 8 * 4)
    assert stats.exit_rate == 0.6 and model.stats.tokens == 0
    with pytest.raises(ValueError, match=r"one value per row \(2 rows\), got shape \(3,\)"):
        model.forward_with_exits(torch.zeros(2, 3, dtype=torch.long), threshold=[0.1, 0.2, 0.3])


def test_forward_loss_matches_gpt_when_nothing_exits():
    model = _model()
    idx, targets = torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx, targets, threshold=NEVER)[1], model.base(idx, targets)[1])


# ------------------------------------------------------------------------------------------- classifier training

V, T = 64, 16  # the learnable stream: a small vocabulary, short rows


def _pair_stream(n_rows: int, generator: torch.Generator, successor: torch.Tensor) -> torch.Tensor:
    """(n_rows, T + 1) tokens: pairs of a random token in [0, 32) and its fixed successor in [32, 64). After a low
    token the next one is certain; after a high one it is uniform, so any prediction is a guess."""
    low = torch.randint(0, V // 2, (n_rows, T // 2 + 1), generator=generator)
    return torch.stack([low, successor[low]], dim=-1).flatten(1)[:, : T + 1]


@pytest.fixture(scope="module")
def trained_pair_model():
    """A tiny model briefly trained on the pair stream, whose deeper blocks are then perturbed: where the model is
    sure the exit and full predictions still agree; where it guesses among near-ties the perturbation reorders them,
    so they mostly disagree. Labels are mixed and predictable from the exit head's confidence, as on real text."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(V // 2, generator=g) + V // 2
    base = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=4, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small train fastest on one thread, and far faster on a busy machine
    try:
        for _ in range(40):
            batch = _pair_stream(16, g, successor)
            _, loss = base(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        for block in base.transformer.h[2:]:
            block.mlp.c_proj.weight.add_(0.5 * torch.randn_like(block.mlp.c_proj.weight))
    return base.eval(), lambda n: _pair_stream(n, g, successor)


def test_features_and_labels_compare_exit_and_full_argmax(trained_pair_model):
    base, data = trained_pair_model
    idx = data(4)[:, :-1]
    features, labels = exit_features_and_labels(base, idx, 2)
    assert features.shape == (4 * T, 32 + 3) and labels.shape == (4 * T,)
    with torch.no_grad():
        logits, _, hidden = base(idx, output_hidden_states=True)
        exit_pred = base.lm_head(base.transformer.ln_f(hidden[2])).argmax(-1)
    assert labels.tolist() == (exit_pred == logits.argmax(-1)).float().flatten().tolist()
    assert not features.requires_grad
    hidden_only, _ = exit_features_and_labels(base, idx, 2, head_features=False)
    assert hidden_only.shape == (4 * T, 32)


def test_classifier_learns_better_than_the_majority_class(trained_pair_model):
    base, data = trained_pair_model
    train_x, train_y = exit_features_and_labels(base, data(96)[:, :-1], 2)
    test_x, test_y = exit_features_and_labels(base, data(96)[:, :-1], 2)
    majority = float(train_y.mean() >= 0.5)  # the best constant guess, chosen on the training data
    baseline = float((test_y == majority).float().mean())  # and scored on the test data
    assert baseline < 0.85, f"labels should be mixed for this test to mean anything (baseline {baseline})"
    torch.manual_seed(0)
    classifier = ExitClassifier(32, 32)
    history = train_classifier(
        classifier, train_x, train_y, epochs=15, batch_size=64, lr=3e-3, val_features=test_x, val_labels=test_y
    )
    assert len(history) == 15 and history[-1]["loss"] < history[0]["loss"]
    # At most half the majority guess's mistakes on held-out data.
    assert 1 - history[-1]["val_accuracy"] < (1 - baseline) / 2, (history[-1], baseline)
    balanced = ExitClassifier(32, 32)
    history = train_classifier(balanced, train_x, train_y, epochs=5, batch_size=64, lr=3e-3, balance_classes=True)
    assert history[-1]["accuracy"] > baseline

    # Calibration on held-out tokens: the exit rate falls and agreement rises with tau; the ends are exact.
    model = EarlyExitGPT(base, 2, classifier=classifier).eval()
    rows = calibrate(model, [data(32), data(32)], [ALWAYS, 0.5, 0.9, NEVER])
    assert [r["tau"] for r in rows] == [ALWAYS, 0.5, 0.9, NEVER]
    assert rows[0]["exit_rate"] == 1.0 and rows[-1]["exit_rate"] == 0.0 and rows[-1]["agreement"] == 1.0
    assert rows[-1]["perplexity"] == pytest.approx(rows[-1]["perplexity_full"], rel=1e-9)
    assert rows[-1]["mean_blocks"] == 4 and rows[0]["mean_blocks"] == 2
    rates = [r["exit_rate"] for r in rows]
    assert rates == sorted(rates, reverse=True) and 0 < rows[1]["exit_rate"] < 1
    assert rows[1]["agreement"] > rows[0]["agreement"] + 0.2  # the classifier exits the right tokens
    with torch.no_grad():  # perplexity at tau = 0 is the truncated model's
        batch = data(8)
        _, loss = _truncated(base, 2)(batch[:, :-1], batch[:, 1:])
    assert calibrate(model, [batch], [ALWAYS])[0]["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    x, y = batch[:, :-1], batch[:, 1:].clone()
    y[:, : T // 2] = -100  # the shard loader masks targets so: they count nowhere
    masked = calibrate(model, [(x, y)], [0.5])[0]
    with torch.no_grad():
        assert masked["exit_rate"] == float((model.exit_scores(x)[:, T // 2 :] >= 0.5).float().mean())
    assert model.stats.tokens == 0  # calibration does not count as serving traffic

    # Batches passed through the backbone once (the training job's held-out data) give the same sweep, and the
    # classifier data of exit_features_and_labels at the positions whose target counts.
    held = held_out(base, (x, y), 2)
    assert calibrate(model, [held], [0.5])[0] == masked
    features, labels = held.features_and_labels()
    every_feature, every_label = exit_features_and_labels(base, x, 2)
    kept = (y != -100).flatten()
    assert torch.equal(features, every_feature[kept]) and torch.equal(labels, every_label[kept])


def test_choose_threshold_prefers_the_highest_exit_rate_that_agrees():
    rows = [
        {"tau": 0.0, "exit_rate": 1.0, "agreement": 0.6},
        {"tau": 0.7, "exit_rate": 0.5, "agreement": 0.97},
        {"tau": 0.9, "exit_rate": 0.3, "agreement": 0.99},
        {"tau": 1.5, "exit_rate": 0.0, "agreement": 1.0},
    ]
    assert choose_threshold(rows, 0.97) == 0.7
    assert choose_threshold(rows, 0.98) == 0.9
    assert choose_threshold(rows, 0.5) == 0.0
    with pytest.raises(ValueError, match="no threshold reaches agreement 0.99"):
        choose_threshold(rows[:2], 0.99)


# ------------------------------------------------------------------------------------------- save / load, errors


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.threshold = 0.42
    directory = tmp_path / "ckpt"
    model.base.save_pretrained(directory)
    (directory / "trainer_state.pt").write_bytes(b"kept")
    save_early_exit(model, directory)
    spec = json.loads((directory / EXIT_CONFIG_FILE).read_text())
    assert spec["exit_layer"] == 2 and spec["threshold"] == 0.42
    assert spec["features"]["head"] == ["max_prob", "entropy", "top2_margin"]
    assert spec["classifier"] == {"input_dim": 35, "hidden_dim": 16, "n_embd": 32}
    assert (directory / "trainer_state.pt").read_bytes() == b"kept"  # the rest of the checkpoint is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind

    loaded = load_early_exit(directory)
    assert (loaded.exit_layer, loaded.threshold, loaded.training) == (2, 0.42, False)
    idx = torch.randint(0, 512, (2, 10))
    taus = _thresholds_that_mix(model, [0.3, 0.6])
    with torch.no_grad():
        want, want_exited = model.forward_with_exits(idx, threshold=taus)
        got, got_exited = loaded.forward_with_exits(idx, threshold=taus)
    assert torch.equal(got_exited, want_exited) and torch.equal(got, want)

    model.exit_layer, model.threshold = 3, 0.5  # saving again replaces the pair
    save_early_exit(model, directory)
    assert load_early_exit(directory).exit_layer == 3


def test_bad_exit_layers_and_files_give_clear_errors(tmp_path):
    base = GPT(CONFIG)
    for bad in (0, 4, -1, 2.0):
        with pytest.raises(ValueError, match=rf"exit_layer={bad!r} is out of range.*\[1, 3\].*n_layer=4"):
            EarlyExitGPT(base, bad)
    with pytest.raises(ValueError, match="out of range"):
        exit_features_and_labels(base, torch.zeros(1, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="classifier expects n_embd=16"):
        EarlyExitGPT(base, 2, classifier=ExitClassifier(16))

    directory = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="no config.json"):
        save_early_exit(EarlyExitGPT(base, 2), tmp_path)
    base.save_pretrained(directory)
    with pytest.raises(CheckpointError, match=rf"{EXIT_CONFIG_FILE}: missing"):
        load_early_exit(directory)
    other = GPT(CONFIG.replace(n_layer=3))
    with pytest.raises(CheckpointError, match="holds a different model"):
        save_early_exit(EarlyExitGPT(other, 2), directory)

    save_early_exit(EarlyExitGPT(base, 2), directory)
    spec_path, weights_path = directory / EXIT_CONFIG_FILE, directory / EXIT_WEIGHTS_FILE
    spec = json.loads(spec_path.read_text())
    spec_path.write_text(json.dumps({**spec, "exit_layer": 4}))
    with pytest.raises(CheckpointError, match=rf"{EXIT_CONFIG_FILE}: exit_layer=4 is out of range"):
        load_early_exit(directory)
    spec_path.write_text(json.dumps({k: v for k, v in spec.items() if k != "classifier"}))
    with pytest.raises(CheckpointError, match=rf"{EXIT_CONFIG_FILE}: missing or malformed field"):
        load_early_exit(directory)
    spec_path.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{EXIT_CONFIG_FILE}: invalid JSON"):
        load_early_exit(directory)
    spec_path.write_text(json.dumps({**spec, "classifier": {**spec["classifier"], "hidden_dim": 64}}))
    with pytest.raises(CheckpointError, match=rf"{EXIT_WEIGHTS_FILE}: does not match"):
        load_early_exit(directory)
    spec_path.write_text(json.dumps(spec))
    weights_path.write_bytes(weights_path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{EXIT_WEIGHTS_FILE}: cannot read"):
        load_early_exit(directory)
    weights_path.unlink()
    with pytest.raises(CheckpointError, match=rf"{EXIT_WEIGHTS_FILE}: missing"):
        load_early_exit(directory)


def test_decode_macs_count_what_a_token_runs():
    """The bound the README gives for GPT-2 124M exiting after block 9 (about 1.15x even if every token exits), and
    why the demo's 4-layer model cannot gain: its LM head is most of a token's work."""
    from gpt2 import preset

    with torch.device("meta"):
        full = EarlyExitGPT(GPT(preset("gpt2")), exit_layer=9)
        small = EarlyExitGPT(GPT(preset("small")), exit_layer=3, classifier=ExitClassifier(256, head_features=False))
    d, V = 768, 50257
    macs = full.decode_macs()
    assert macs.head == V * d and macs.standard == 12 * 12 * d * d + V * d
    classifier = (d + 3) * 128 + 128
    assert macs.exited == 9 * 12 * d * d + V * d + 3 * 3 * d * d + classifier  # deeper layers: c_attn only
    assert macs.not_exited == macs.standard + classifier + V * d  # head features: one head more
    assert round(macs.every_token_exits, 2) == 1.15
    tiny = small.decode_macs()
    assert tiny.not_exited == tiny.standard + 256 * 128 + 128  # no head features, no second head
    assert tiny.head_share > 0.75 and tiny.every_token_exits < 1.05
