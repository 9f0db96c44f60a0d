"""The optimizer performs the paper's update rule (Sec. 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import optim


def _paper_loop(w, grads, lrs, momentum=0.9, weight_decay=5e-4):
    """v <- momentum * v - weight_decay * lr * w - lr * grad;  w <- w + v, by hand."""
    v = np.zeros_like(w)
    for g, lr in zip(grads, lrs, strict=True):
        v = momentum * v - weight_decay * lr * w - lr * g
        w = w + v
    return w


def test_paper_update_matches_hand_written_loop_with_lr_drop():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(6)]
    lrs = [0.01, 0.01, 0.01, 0.001, 0.001, 0.001]  # A drop, as the paper's schedule does.
    schedule = lambda step: jnp.where(step < 3, 0.01, 0.001)
    tx = optim.paper_sgd(schedule, momentum=0.9, weight_decay=5e-4)
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        np.asarray(params["w"]), _paper_loop(w0, grads, lrs), rtol=1e-5, atol=1e-7
    )


def test_lr_drop_does_not_rescale_existing_velocity():
    """optax.sgd would rescale the accumulated velocity on a drop; the paper's rule does not."""
    w0 = np.ones((2,))
    grads = [np.ones((2,)), np.zeros((2,))]
    lrs = [0.1, 0.001]
    schedule = lambda step: jnp.where(step < 1, 0.1, 0.001)
    tx = optim.paper_sgd(schedule, momentum=0.9, weight_decay=0.0)
    params = {"w": jnp.asarray(w0, jnp.float32)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    # Step 2 moves by 0.9 * 0.1 (the old velocity), not 0.9 * 0.001.
    np.testing.assert_allclose(
        np.asarray(params["w"]), _paper_loop(w0, grads, lrs, weight_decay=0.0), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(params["w"]), 1 - 0.1 - 0.09, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_frozen_layers_keep_their_bits_and_have_no_optimizer_state(name):
    from alexnet_jax import config_lib

    config = config_lib.defaults().optim
    config.name, config.frozen_layers, config.weight_decay_on_biases = name, ("conv1",), False
    rng = np.random.default_rng(0)
    params = {
        layer: {
            "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        }
        for layer in ("conv1", "fc8")
    }
    tx = optim.make_optimizer(config)
    state = tx.init(params)
    # Momentum is kept for fc8's 16 numbers only (plus scalars: step counts, the rate).
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 16
    start = jax.tree.map(np.asarray, params)
    for step in range(3):
        grads = jax.tree.map(lambda p, g=0.5 + step: jnp.full_like(p, g), params)
        state = optim.with_learning_rate(state, 0.1)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for leaf in ("kernel", "bias"):
        assert np.asarray(params["conv1"][leaf]).tobytes() == start["conv1"][leaf].tobytes()
        moved = np.abs(np.asarray(params["fc8"][leaf]) - start["fc8"][leaf])
        assert moved.min() > 1e-4  # Every trained number moved.
    # Without frozen layers the same rule moves conv1 too.
    config.frozen_layers = ()
    plain = optim.make_optimizer(config)
    updates, _ = plain.update(grads, optim.with_learning_rate(plain.init(params), 0.1), params)
    assert float(jnp.abs(updates["conv1"]["kernel"]).min()) > 0


# Another accepted value of every optim.* field (the test below fails on a new field until it
# is listed here).
_OTHER_OPTIM_VALUES = {
    "optim.name": "lars",
    "optim.learning_rate": 0.02,
    "optim.lr_reference_batch_size": 256,
    "optim.schedule": "warmup_cosine",
    "optim.lr_decay_factor": 0.5,
    "optim.plateau_patience": 5,
    "optim.plateau_max_reductions": 1,
    "optim.plateau_min_delta": 0.01,
    "optim.lr_step_epochs": (10, 20),
    "optim.warmup_epochs": 1.0,
    "optim.momentum": 0.8,
    "optim.lars_trust_coefficient": 0.01,
    "optim.weight_decay": 1e-4,
    "optim.weight_decay_on_biases": False,
    "optim.frozen_layers": ("conv1",),
}


def test_every_field_that_changes_the_optimizer_states_shape_is_fixed_on_resume():
    """A resume restores the saved optimizer state into the current config's: their trees match.

    So a field whose change alters that tree must be checked before restoring
    (config_lib.RESUME_FIXED_FIELDS: a clear error naming it, not orbax's).
    """
    from alexnet_jax import config_lib

    optim_fields = {f.name for f in config_lib.FIELDS if f.name.startswith("optim.")}
    assert set(_OTHER_OPTIM_VALUES) == optim_fields
    params = {
        layer: {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
                "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}
        for layer in ("conv1", "fc8")
    }  # fmt: skip

    def state_tree(optim_config):
        state = jax.eval_shape(optim.make_optimizer(optim_config).init, params)
        return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]

    reference = state_tree(config_lib.defaults().optim)
    shaping = []
    for name, value in _OTHER_OPTIM_VALUES.items():
        config = config_lib.defaults()
        config.optim[name.split(".")[1]] = value
        config_lib.validate(config)
        if state_tree(config.optim) != reference:
            shaping.append(name)
    assert "optim.frozen_layers" in shaping  # The check can see a change.
    assert set(shaping) <= set(config_lib.RESUME_FIXED_FIELDS), shaping
