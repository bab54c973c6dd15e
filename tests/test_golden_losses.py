"""The cluster/ training jobs still produce, bit for bit, the losses recorded in tests/golden/losses.json.

The file was written from the code before the cluster/ layer's four Ray Train loops and their config modules were
merged into one launcher and one worker context (see tests/golden_losses.py, which runs the jobs). A refactor that
changes no computation leaves every value identical, so values are compared as float.hex strings, not with a
tolerance, on a machine like the recording one (see ROUNDING; elsewhere to a small relative tolerance). A deliberate
change of the computation means re-recording: `python -m tests.golden_losses --write`.

distill_ray (the distillation on Ray Train) is recorded too but not run here: it costs a Ray Train start-up (half a
minute on 2 busy cores) and was bit-identical to the in-process loop when recorded. Compare it on demand with
`python -m tests.golden_losses distill_ray`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests import golden_losses
from tests.golden_losses import CONFIGS, GOLDEN_FILE, Losses, environment, first_difference, read_golden


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN_FILE.is_file():
        pytest.fail(f"{GOLDEN_FILE} is missing: record it from the unmodified code with"
                    " `python -m tests.golden_losses --write`")
    return read_golden()


# What decides how float arithmetic rounds here: another torch build or another vector instruction set (AVX2,
# AVX-512, ...) runs other kernels. Where these differ from the recording machine, values are compared to 1e-4
# relative instead of bit for bit: kernel rounding moves the last digits, a real change of the computation (another
# seed, another data order, a lost accumulation step) moves far more.
ROUNDING = ("torch", "machine", "cpu_capability")
RELATIVE_TOLERANCE = 1e-4


def assert_matches_golden(name: str, values: Losses, golden: dict) -> None:
    actual = [v.hex() for v in values]
    recorded_on = {k: golden["environment"].get(k) for k in ROUNDING}
    if recorded_on != {k: environment()[k] for k in ROUNDING}:
        expected = [float.fromhex(h) for h in golden["losses"][name]]
        assert len(values) == len(expected) and all(
            math.isclose(v, e, rel_tol=RELATIVE_TOLERANCE) for v, e in zip(values, expected)
        ), f"{name}: {values} differ from the recorded {expected} beyond {RELATIVE_TOLERANCE:g} (recorded on {recorded_on})"
        return
    difference = first_difference(golden["losses"][name], actual)
    if difference is not None:
        recorded, now = golden["environment"], environment()
        changed = {k: (recorded.get(k), v) for k, v in now.items() if recorded.get(k) != v}
        # Print the whole sequences too: one shifted value and a wholly different run call for different fixes.
        print(f"{name} stored: {golden['losses'][name]}\n{name} now:    {actual}")
        pytest.fail(
            f"{name}: the losses differ from {GOLDEN_FILE.name} at {difference}.\n"
            f"Sequence layout: {CONFIGS[name]['order']}.\n"
            + (f"The environment differs from the recording one (recorded, now): {changed}; exact floats may change"
               " with it.\n" if changed else "Same environment as the recording.\n")
            + ("The job's config in tests/golden_losses.py differs from the recorded one too."
               if golden["configs"][name] != CONFIGS[name] else "")
        )
    # Equal losses from an edited config would leave the file describing a run it did not record.
    assert golden["configs"][name] == CONFIGS[name], (
        f"{name}: the config in tests/golden_losses.py differs from the recorded one; re-record with --write")


def test_pretraining_on_ray_train(ray_session, golden, tmp_path: Path):
    assert_matches_golden("pretrain", golden_losses.pretrain(tmp_path), golden)


def test_distillation_in_process(golden, tmp_path: Path):
    assert_matches_golden("distill", golden_losses.distill(tmp_path), golden)


def test_full_finetune_on_ray_train(ray_session, golden, tmp_path: Path):
    assert_matches_golden("finetune_full", golden_losses.finetune_full(tmp_path), golden)


def test_lora_finetune_on_ray_train(ray_session, golden, tmp_path: Path):
    assert_matches_golden("finetune_lora", golden_losses.finetune_lora(tmp_path), golden)


def test_early_exit_classifier_on_ray_train(ray_session, golden, tmp_path: Path):
    assert_matches_golden("early_exit", golden_losses.early_exit(tmp_path), golden)
