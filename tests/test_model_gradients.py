"""The hand-written gradients of LRN and max-pooling equal autodiff of the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import model


def _lrn_scale(x, k=2.0, alpha=1e-4, beta=0.75):
    sums = jax.lax.reduce_window(
        jnp.square(x), 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (5,), (1,) * x.ndim,
        ((0, 0),) * (x.ndim - 1) + ((2, 2),),
    )  # fmt: skip
    return (k + alpha * sums) ** (-beta)


def _lrn_autodiff(x):
    return x * _lrn_scale(x)


def _pool_autodiff(x):
    lead = (1,) * (x.ndim - 3)
    window, strides = lead + (3, 3, 1), lead + (2, 2, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")


@pytest.mark.parametrize("shape", [(3, 13, 13, 8), (2, 2, 11, 9, 7)])
def test_lrn_gradient_equals_autodiff(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.normal(0, 40, shape), 0), jnp.float32)  # ReLU'd, large
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y_ref, vjp_ref = jax.vjp(_lrn_autodiff, x)
    y, vjp = jax.vjp(model.local_response_norm, x)
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=2e-5, atol=1e-6)
    # The cross-channel term matters at these magnitudes: not just g * scale.
    plain_grad = jax.vjp(lambda x: x * jax.lax.stop_gradient(_lrn_scale(x)), x)[1]
    assert float(jnp.abs(vjp(g)[0] - plain_grad(g)[0]).max()) > 1e-3


@pytest.mark.parametrize("shape", [(2, 13, 13, 4), (2, 3, 27, 27, 5), (1, 8, 10, 3)])
def test_max_pool_gradient_equals_autodiff_including_ties(shape):
    rng = np.random.default_rng(1)
    # Rounded ReLU outputs: many equal values in a window, so tie-breaking is exercised.
    x = jnp.asarray(np.round(np.maximum(rng.normal(0, 2, shape), 0)), jnp.float32)
    y_ref, vjp_ref = jax.vjp(_pool_autodiff, x)
    y, vjp = jax.vjp(model.max_pool_3x3_s2, x)
    assert y.shape == y_ref.shape and bool(jnp.all(y == y_ref))
    g = jnp.asarray(rng.integers(1, 5, y.shape), jnp.float32)  # Integers: sums are exact.
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
    assert float(vjp(g)[0].sum()) == float(g.sum())  # Every output routes to one input.
