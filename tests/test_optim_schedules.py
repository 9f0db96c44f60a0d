"""Learning-rate schedules (the paper's plateau rule, step, warmup+cosine) and weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import config_lib, optim
from configs import imagenet
from tests.test_optim import _paper_loop


def _config(**overrides):
    """config.optim with ``overrides``."""
    config = config_lib.defaults().optim
    for k, v in overrides.items():
        config[k] = v
    return config


def _run_plateau(errors, config):
    """Feeds ``errors`` one evaluation at a time; returns the lr scale after each."""
    state = optim.init_schedule_state()
    observe = jax.jit(lambda s, e: optim.observe_validation_error(s, e, config))
    scales = []
    for e in errors:
        state = observe(state, e)
        scales.append(float(state.lr_scale))
    return scales, state


def test_plateau_divides_by_ten_after_patience_evaluations_without_improvement():
    config = _config(schedule="plateau", plateau_patience=2)
    # Drops after the 2nd evaluation in a row without a new best: at 0.81, 0.71 and 0.70.
    errors = [0.90, 0.80, 0.80, 0.81, 0.70, 0.75, 0.71, 0.69, 0.69, 0.70]
    scales, state = _run_plateau(errors, config)
    expected = [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]
    np.testing.assert_allclose(scales, expected, rtol=1e-6)
    assert int(state.num_reductions) == 3
    assert float(state.best_error) == pytest.approx(0.69)


def test_plateau_stops_after_max_reductions():
    config = _config(schedule="plateau", plateau_patience=1, plateau_max_reductions=3)
    scales, state = _run_plateau([0.5] + [0.6] * 8, config)
    np.testing.assert_allclose(scales, [1, 0.1, 0.01, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001])
    assert int(state.num_reductions) == 3


def test_plateau_min_delta_counts_tiny_improvements_as_none():
    config = _config(schedule="plateau", plateau_patience=2, plateau_min_delta=0.01)
    scales, _ = _run_plateau([0.50, 0.495, 0.492], config)  # Both below 0.5 but by < 0.01.
    np.testing.assert_allclose(scales, [1, 1, 0.1], rtol=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "step", "warmup_cosine"])
def test_other_schedules_never_drop_on_validation_error(schedule):
    scales, state = _run_plateau([0.5] + [0.6] * 10, _config(schedule=schedule, plateau_patience=1))
    assert scales == [1.0] * 11
    assert float(state.best_error) == pytest.approx(0.5)  # Still tracked, for the logs.


def test_step_schedule_drops_at_the_first_step_of_each_listed_epoch():
    config = _config(
        schedule="step", learning_rate=0.01, lr_step_epochs=(1, 3), lr_decay_factor=0.1
    )
    lr = optim.learning_rate_schedule(config, batch_size=128, steps_per_epoch=10, total_steps=50)
    values = [float(lr(s)) for s in (0, 9, 10, 29, 30, 49)]
    np.testing.assert_allclose(values, [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4], rtol=1e-5)


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    config = _config(schedule="warmup_cosine", learning_rate=0.1, warmup_epochs=2)
    lr = optim.learning_rate_schedule(config, batch_size=128, steps_per_epoch=5, total_steps=50)
    values = np.array([float(lr(s)) for s in range(51)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 0.1, 11), atol=1e-7)
    assert values[10] == pytest.approx(0.1)
    # Cosine from step 10 to 50: halfway (step 30) is half the peak.
    assert values[30] == pytest.approx(0.05, rel=1e-5)
    assert np.all(np.diff(values[10:]) <= 1e-9) and values[50] == pytest.approx(0.0, abs=1e-9)


def test_step_and_cosine_need_the_epoch_length():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.learning_rate_schedule(_config(schedule="step"), batch_size=128)


def test_plateau_drop_through_the_optimizer_state_matches_the_paper_rule():
    """The lr lives in the optimizer state; a drop scales new gradients, not the velocity."""
    config = _config(schedule="plateau", plateau_patience=1, learning_rate=0.01)
    tx = optim.make_optimizer(config)
    base = optim.learning_rate_schedule(config, batch_size=128)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5,))
    grads = [rng.normal(size=(5,)) for _ in range(6)]
    params = {"w": jnp.asarray(w0, jnp.float32)}
    opt_state, schedule = tx.init(params), optim.init_schedule_state()
    used = []
    for t, g in enumerate(grads):
        if t == 3:  # Two evaluations: the second one does not improve -> drop.
            schedule = optim.observe_validation_error(schedule, 0.5, config)
            schedule = optim.observe_validation_error(schedule, 0.6, config)
        lr = optim.scaled_learning_rate(base, jnp.int32(t), schedule)
        used.append(float(lr))
        opt_state = optim.with_learning_rate(opt_state, lr)
        updates, opt_state = tx.update({"w": jnp.asarray(g, jnp.float32)}, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(used, [0.01] * 3 + [0.001] * 3, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(params["w"]), _paper_loop(w0, grads, used), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("on_biases", [True, False])
def test_weight_decay_optionally_spares_biases(on_biases):
    config = _config(weight_decay=0.1, learning_rate=1.0, momentum=0.0)
    config.weight_decay_on_biases = on_biases
    tx = optim.make_optimizer(config)
    params = {"conv1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["conv1"]["kernel"], 0.9)  # w - lr * wd * w
    np.testing.assert_allclose(new["conv1"]["bias"], 0.9 if on_biases else 1.0)


def test_imagenet_config_is_the_papers_recipe():
    config = imagenet.get_config()
    config_lib.validate(config)
    o = config.optim
    assert o.schedule == "plateau"
    assert (o.learning_rate, o.lr_decay_factor, o.plateau_max_reductions) == (
        0.01,
        0.1,
        3,
    )
    assert (config.batch_size, config.num_epochs, o.momentum, o.weight_decay) == (
        128,
        90,
        0.9,
        5e-4,
    )
    assert o.weight_decay_on_biases


@pytest.mark.parametrize(
    "field, value",
    [
        ("schedule", "linear"),
        ("lr_decay_factor", 1.5),
        ("plateau_patience", 0),
        ("lr_step_epochs", (60, 30)),
        ("warmup_epochs", -1.0),
    ],
)
def test_bad_schedule_fields_are_named(field, value):
    config = config_lib.defaults()
    config.optim[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.optim.{field} "):
        config_lib.validate(config)
