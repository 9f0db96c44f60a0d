"""The optimizer performs the paper's update rule (Sec. 5)."""

import jax.numpy as jnp
import numpy as np
import optax

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
