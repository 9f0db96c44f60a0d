"""The paper's network: parameter count, map sizes, LRN formula, tower wiring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import model
from alexnet_jax.model import AlexNet


def _abstract_params(net: AlexNet):
    return jax.eval_shape(
        lambda: net.init(
            {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 224, 224, 3)), train=False
        )
    )["params"]


def test_parameter_count_is_the_papers():
    assert model.count_params(_abstract_params(AlexNet(num_classes=1000))) == 60_965_224


def test_per_tower_kernel_shapes():
    shapes = jax.tree.map(lambda a: a.shape, _abstract_params(AlexNet()))
    assert shapes["conv1"]["kernel"] == (2, 11, 11, 3, 48)
    assert shapes["conv2"]["kernel"] == (2, 5, 5, 48, 128)  # Own tower's 48 maps only.
    assert shapes["conv3"]["kernel"] == (2, 3, 3, 256, 192)  # Both towers' 256 maps.
    assert shapes["conv4"]["kernel"] == (2, 3, 3, 192, 192)
    assert shapes["conv5"]["kernel"] == (2, 3, 3, 192, 128)
    assert shapes["fc6"]["kernel"] == (2, 9216, 2048)
    assert shapes["fc7"]["kernel"] == (2, 4096, 2048)
    assert shapes["fc8"]["kernel"] == (4096, 1000)


def test_width_and_classes_scale_the_same_network():
    shapes = jax.tree.map(lambda a: a.shape, _abstract_params(AlexNet(num_classes=10, width=0.25)))
    assert shapes["conv1"]["kernel"] == (2, 11, 11, 3, 12)
    assert shapes["fc6"]["kernel"] == (2, 6 * 6 * 64, 512)
    assert shapes["fc8"]["kernel"] == (1024, 10)


def test_spatial_sizes_55_27_13_6_and_output_shapes():
    net = AlexNet(num_classes=7, width=1 / 16)
    images = jnp.zeros((2, 224, 224, 3))
    params = net.init({"params": jax.random.PRNGKey(0)}, images, train=False)
    _, inter = net.apply(
        params, images, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = inter["intermediates"]
    # TowerConv outputs are T x B x H x W x C.
    assert inter["conv1"]["__call__"][0].shape[:4] == (2, 2, 55, 55)
    assert inter["conv2"]["__call__"][0].shape[:4] == (2, 2, 27, 27)
    assert inter["conv3"]["__call__"][0].shape[:4] == (2, 2, 13, 13)
    assert inter["conv5"]["__call__"][0].shape[:4] == (2, 2, 13, 13)
    # fc6 sees pool5 (6 x 6 x both towers' channels).
    assert params["params"]["fc6"]["kernel"].shape[1] == 6 * 6 * 2 * 8
    logits, fc7 = net.apply(params, images, train=False, with_features=True)
    assert logits.shape == (2, 7)
    assert fc7.shape == (2, 2 * 128)


def _lrn_reference(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """Sec. 3.3 written out, window clipped at the edges:

    b_c = a_c / (k + alpha * sum_{j=max(0, c-n/2)}^{min(N-1, c+n/2)} a_j^2) ** beta
    """
    a = np.asarray(a, np.float64)
    channels = a.shape[-1]
    out = np.empty_like(a)
    for c in range(channels):
        lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
        s = np.sum(a[..., lo : hi + 1] ** 2, axis=-1)
        out[..., c] = a[..., c] / (k + alpha * s) ** beta
    return out


def test_lrn_equals_the_papers_formula():
    rng = np.random.default_rng(0)
    # Large activations (as after conv1 on 0-255 inputs) make alpha * sum matter.
    x = rng.normal(0.0, 80.0, (3, 5, 5, 12)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(model.local_response_norm(jnp.asarray(x))), _lrn_reference(x), rtol=2e-5
    )
    # The normalization is not a no-op at these magnitudes.
    assert np.abs(_lrn_reference(x) - x / 2**0.75).max() > 1.0


def test_lrn_matches_tensorflow_when_installed():
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(1).normal(0.0, 50.0, (2, 4, 4, 16)).astype(np.float32)
    expected = tf.nn.local_response_normalization(x, depth_radius=2, bias=2, alpha=1e-4, beta=0.75)
    np.testing.assert_allclose(
        np.asarray(model.local_response_norm(jnp.asarray(x))), expected.numpy(), rtol=1e-5
    )


def test_paper_init_statistics():
    net = AlexNet(num_classes=10, width=0.25, init_scheme="paper")
    params = net.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 224, 224, 3)), train=False)[
        "params"
    ]
    assert abs(float(jnp.std(params["fc6"]["kernel"])) - 0.01) < 2e-4
    for name, bias in [
        ("conv1", 0),
        ("conv2", 1),
        ("conv3", 0),
        ("conv4", 1),
        ("conv5", 1),
        ("fc6", 1),
        ("fc7", 1),
        ("fc8", 0),
    ]:
        assert np.all(np.asarray(params[name]["bias"]) == bias), name


def test_unknown_init_scheme_names_the_choices():
    with pytest.raises(ValueError, match="paper"):
        model.layer_inits("xavier")


@pytest.fixture(scope="module")
def small_net_and_params():
    net = AlexNet(num_classes=10, width=1 / 16, init_scheme="he")
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 224, 224, 3))
    params = net.init({"params": jax.random.PRNGKey(0)}, images, train=False)["params"]
    return net, params, images


def _intermediate(net, params, images, layer):
    _, inter = net.apply(
        {"params": params},
        images,
        train=False,
        capture_intermediates=lambda mdl, _: mdl.name == layer,
        mutable=["intermediates"],
    )
    return inter["intermediates"][layer]["__call__"][0]


def test_conv2_of_tower0_does_not_see_tower1(small_net_and_params):
    net, params, images = small_net_and_params

    def tower0_conv2(conv1_kernel):
        p = {**params, "conv1": {**params["conv1"], "kernel": conv1_kernel}}
        return jnp.sum(_intermediate(net, p, images, "conv2")[0] ** 2)

    grad = jax.grad(tower0_conv2)(params["conv1"]["kernel"])
    assert float(jnp.abs(grad[1]).max()) == 0.0  # Tower 1's conv1 kernel: no path.
    assert float(jnp.abs(grad[0]).max()) > 0.0  # Tower 0's own kernel does matter.


def test_conv3_sees_both_towers(small_net_and_params):
    net, params, images = small_net_and_params
    for tower in (0, 1):

        def tower_conv3(conv1_kernel, tower=tower):
            p = {**params, "conv1": {**params["conv1"], "kernel": conv1_kernel}}
            return jnp.sum(_intermediate(net, p, images, "conv3")[tower] ** 2)

        grad = jax.grad(tower_conv3)(params["conv1"]["kernel"])
        assert float(jnp.abs(grad[0]).max()) > 0.0
        assert float(jnp.abs(grad[1]).max()) > 0.0


def test_dropout_only_in_training(small_net_and_params):
    net, params, images = small_net_and_params
    apply = functools.partial(net.apply, {"params": params}, images)
    eval_a, eval_b = apply(train=False), apply(train=False)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a = apply(train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    train_b = apply(train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert float(jnp.abs(train_a - train_b).max()) > 0.0


def test_conv_chunk_size_bad_values_name_the_field():
    from alexnet_jax import config_lib

    config = config_lib.defaults()
    config.model.conv_chunk_size = -2
    with pytest.raises(config_lib.ConfigError, match=r"config.model.conv_chunk_size = -2 .*-1"):
        config_lib.validate(config)
