"""The stuck-training guard and the profiler window."""

import glob
import json
import math
import os

import jax
import pytest

from alexnet_jax import diagnostics, flops, train
from tests.conftest import tiny_config


def _guard(**overrides):
    kwargs = {"after_steps": 10, "margin": 0.02, "eval_patience": 3, "stop": False, **overrides}
    return diagnostics.StuckGuard(10, **kwargs)


def test_a_loss_near_chance_after_the_grace_steps_warns_once_naming_the_fields():
    guard = _guard()
    chance = math.log(10)
    assert guard.observe_loss(5, chance) is None  # Still in the grace period.
    message = guard.observe_loss(10, chance * 1.01)
    assert "stuck" in message and "config.model.init_scheme" in message
    assert "config.optim.learning_rate" in message
    guard.observe_loss(20, chance)
    assert len(guard.warned) == 1  # Warned once, not at every log line.


def test_a_learning_run_never_looks_stuck():
    guard = _guard()
    # A demo-like curve: from chance down to 0.3 over 100 steps; past the grace steps (10)
    # it is already more than 2% below chance.
    for step in range(1, 101):
        assert guard.observe_loss(step, math.log(10) * (1 - 0.87 * step / 100)) is None
    assert guard.warned == []


def test_a_loss_above_chance_is_stuck_too():
    assert _guard().observe_loss(10, math.log(10) * 1.1) is not None


def test_a_loss_just_below_the_margin_is_not_stuck():
    guard = _guard()
    assert guard.observe_loss(10, math.log(10) * 0.97) is None


def test_validation_without_a_new_best_for_patience_evaluations_warns():
    guard = _guard()
    errors = [0.9, 0.8, 0.81, 0.82, 0.80]
    results = [guard.observe_validation_error(i, e) for i, e in enumerate(errors)]
    assert results[:4] == [None] * 4
    assert "no new best top-1 error in 3 evaluations" in results[4]


def test_stop_when_stuck_raises():
    with pytest.raises(diagnostics.StuckError, match="stop_when_stuck"):
        _guard(stop=True).observe_loss(10, math.log(10))


def test_the_papers_init_at_tiny_width_is_caught_and_the_profile_is_written(
    tiny_demo_dir, tmp_path
):
    config = tiny_config(tiny_demo_dir)
    config.model.init_scheme = "paper"  # N(0, 0.01), bias 1: at chance for many steps.
    config.max_steps = 4
    config.log_every_steps = 2
    config.diagnostics.stuck_after_steps = 2
    config.diagnostics.stop_when_stuck = True
    config.diagnostics.profile_start_step = 2
    config.diagnostics.profile_num_steps = 1
    config.diagnostics.peak_tflops = 0.001  # Per device: MFU is logged against it.
    with pytest.raises(diagnostics.StuckError, match=r"init_scheme='paper'"):
        train.train_and_evaluate(config, str(tmp_path))
    traces = glob.glob(os.path.join(tmp_path, "profile", "**", "*.xplane.pb"), recursive=True)
    assert traces and os.path.getsize(traces[0]) > 0
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        row = json.loads(f.readline())  # Written before the guard stopped the run.
    expected = row["images_per_sec"] * flops.train_flops_per_image(config) / 1e12
    assert row["train_tflops_per_sec"] == pytest.approx(expected, rel=1e-6)
    assert row["mfu"] == pytest.approx(expected / (0.001 * jax.device_count()), rel=1e-6)
    assert 0 <= row["data_wait_fraction"] <= 1


def test_without_a_known_peak_there_is_no_mfu_on_cpu():
    assert diagnostics.peak_tflops(0.0, "float32") is None
    assert diagnostics.peak_tflops(2.0, "float32") == 2.0 * jax.device_count()


def test_the_guard_stays_silent_on_the_demos_net_while_it_learns(fixed_batch_fit):
    """The demo's he-init net fitting a fixed batch (conftest): real losses, no warning."""
    guard = _guard(after_steps=8)
    losses = fixed_batch_fit["losses"]
    for step, loss in enumerate(losses, start=1):
        guard.observe_loss(step, loss)
    assert guard.warned == [], losses
    assert losses[-1] < 0.9 * math.log(10), losses  # It did learn.
