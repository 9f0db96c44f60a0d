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


# --- Variants: the same layers with other published choices ---

VARIANT_CROPS = {"paper": 224, "torchvision": 224, "bvlc_alexnet": 227, "caffenet": 227}


@pytest.mark.parametrize(
    ("variant", "count"),
    [
        ("paper", 60_965_224),
        ("torchvision", 61_100_840),
        ("bvlc_alexnet", 60_965_224),
        ("caffenet", 60_965_224),
    ],
)
def test_each_variants_parameter_count(variant, count):
    crop = VARIANT_CROPS[variant]
    shapes = jax.eval_shape(
        lambda: AlexNet(variant=variant).init(
            jax.random.PRNGKey(0), jnp.zeros((1, crop, crop, 3)), train=False
        )
    )["params"]
    assert model.count_params(shapes) == count


def _layer_shapes(variant, crop, width=1.0):
    net = AlexNet(num_classes=1000, width=width, variant=variant)
    images = jnp.zeros((2, crop, crop, 3))

    def run():
        variables = net.init(jax.random.PRNGKey(0), images, train=False)
        _, inter = net.apply(
            variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return variables["params"], inter["intermediates"]

    params, inter = jax.eval_shape(run)
    outputs = {n: inter[n]["__call__"][0].shape for n in ("conv1", "conv2", "conv3", "conv4")}
    outputs.update({n: inter[n]["__call__"][0].shape for n in ("conv5", "fc6", "fc7")})
    return jax.tree.map(lambda a: a.shape, params), outputs


def test_torchvision_layers_are_one_tower_of_64_192_384_256_256():
    params, out = _layer_shapes("torchvision", 224)
    assert params["conv1"]["kernel"] == (1, 11, 11, 3, 64)
    assert params["conv2"]["kernel"] == (1, 5, 5, 64, 192)
    assert params["conv3"]["kernel"] == (1, 3, 3, 192, 384)
    assert params["conv4"]["kernel"] == (1, 3, 3, 384, 256)
    assert params["conv5"]["kernel"] == (1, 3, 3, 256, 256)
    assert params["fc6"]["kernel"] == (1, 9216, 4096)
    assert params["fc7"]["kernel"] == (1, 4096, 4096)
    assert params["fc8"]["kernel"] == (4096, 1000)
    # T x B x H x W x C: 55 -> (pool) 27 -> 27 -> (pool) 13 -> 13 -> 13, fc T x B x 4096.
    assert out["conv1"] == (1, 2, 55, 55, 64) and out["conv2"] == (1, 2, 27, 27, 192)
    assert out["conv3"] == (1, 2, 13, 13, 384) and out["conv4"] == (1, 2, 13, 13, 256)
    assert out["conv5"] == (1, 2, 13, 13, 256) and out["fc6"] == out["fc7"] == (1, 2, 4096)


@pytest.mark.parametrize("variant", ["bvlc_alexnet", "caffenet"])
def test_caffe_variants_are_the_papers_layers_at_227_without_conv1_padding(variant):
    params, out = _layer_shapes(variant, 227)
    paper_params, paper_out = _layer_shapes("paper", 224)
    assert params == paper_params  # Caffe's group: 2 is the paper's two towers.
    assert out == paper_out
    assert out["conv1"] == (2, 2, 55, 55, 48) and out["conv2"] == (2, 2, 27, 27, 128)
    assert out["conv5"] == (2, 2, 13, 13, 128) and out["fc6"] == (2, 2, 2048)
    # At 224 unpadded, conv1 gives 54x54 maps and pool5 5x5.
    params_224, out_224 = _layer_shapes(variant, 224)
    assert out_224["conv1"][2:4] == (54, 54) and params_224["fc6"]["kernel"] == (
        2,
        5 * 5 * 256,
        2048,
    )


def test_torchvision_average_pools_any_crop_to_6x6():
    params, out = _layer_shapes("torchvision", 256)  # pool5 is 7x7 here.
    assert out["conv5"][2:4] == (15, 15) and params["fc6"]["kernel"] == (1, 9216, 4096)


def test_adaptive_average_pool_bins_are_pytorchs():
    rng = np.random.default_rng(0)
    for n in (13, 7, 5, 2):
        x = rng.normal(size=(2, n, n, 3)).astype(np.float32)
        got = np.asarray(model.adaptive_average_pool(jnp.asarray(x), 6))
        expected = np.empty((2, 6, 6, 3), np.float32)
        for i in range(6):
            for j in range(6):
                rows = slice(i * n // 6, -(-(i + 1) * n // 6))
                cols = slice(j * n // 6, -(-(j + 1) * n // 6))
                expected[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    x = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.adaptive_average_pool(jnp.asarray(x), 6)), x)


def test_adaptive_average_pool_matches_torch_when_installed():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 3, 13, 9)).astype(np.float32)  # N C H W.
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), (6, 6)).numpy()
    got = model.adaptive_average_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), 6)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-6)


def test_caffe_lrn_convention_is_k1_and_alpha_over_n():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 150.0, (3, 5, 5, 12)).astype(np.float32)
    caffe = model.local_response_norm(jnp.asarray(x), **model.lrn_constants("caffe"))
    np.testing.assert_allclose(
        np.asarray(caffe), _lrn_reference(x, k=1.0, alpha=1e-4 / 5), rtol=2e-5
    )
    paper = model.local_response_norm(jnp.asarray(x), **model.lrn_constants("paper"))
    np.testing.assert_allclose(np.asarray(paper), _lrn_reference(x), rtol=2e-5)
    assert np.abs(np.asarray(caffe) - np.asarray(paper)).max() > 1.0  # Not the same numbers.
    with pytest.raises(ValueError, match="paper"):
        model.lrn_constants("tensorflow")


def test_caffe_lrn_convention_matches_torch_when_installed():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(0.0, 150.0, (2, 16, 4, 4)).astype(np.float32)  # NCHW.
    expected = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(torch.from_numpy(x))
    got = model.local_response_norm(
        jnp.asarray(x.transpose(0, 2, 3, 1)), **model.lrn_constants("caffe")
    )
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected.numpy(), rtol=1e-5)


def test_lrn_convention_field_overrides_the_variants():
    images = 60 * jax.random.normal(jax.random.PRNGKey(1), (1, 224, 224, 3))
    net = AlexNet(num_classes=5, width=1 / 16, init_scheme="he")
    params = net.init(jax.random.PRNGKey(0), images, train=False)
    paper = net.apply(params, images, train=False)
    assert np.array_equal(
        paper, net.clone(lrn_convention="paper").apply(params, images, train=False)
    )
    caffe = net.clone(lrn_convention="caffe").apply(params, images, train=False)
    assert float(jnp.abs(caffe - paper).max()) > 1e-3


def test_caffe_lrn_spans_both_towers_and_the_papers_does_not():
    images = 60 * jax.random.normal(jax.random.PRNGKey(1), (2, 227, 227, 3))
    for variant, crosses in [("paper", False), ("bvlc_alexnet", True), ("caffenet", True)]:
        net = AlexNet(num_classes=10, width=1 / 16, init_scheme="he", variant=variant)
        params = net.init({"params": jax.random.PRNGKey(0)}, images, train=False)["params"]

        def tower0_conv2(conv1_kernel, net=net, params=params):
            p = {**params, "conv1": {**params["conv1"], "kernel": conv1_kernel}}
            return jnp.sum(_intermediate(net, p, images, "conv2")[0] ** 2)

        grad = jax.grad(tower0_conv2)(params["conv1"]["kernel"])
        assert (float(jnp.abs(grad[1]).max()) > 0.0) == crosses, variant


def test_caffenet_pools_before_it_normalizes():
    images = 60 * jax.random.normal(jax.random.PRNGKey(1), (1, 227, 227, 3))
    bvlc = AlexNet(num_classes=10, width=1 / 16, init_scheme="he", variant="bvlc_alexnet")
    params = bvlc.init({"params": jax.random.PRNGKey(0)}, images, train=False)
    caffenet = bvlc.clone(variant="caffenet")
    conv2 = [_intermediate(n, params["params"], images, "conv2") for n in (bvlc, caffenet)]
    assert conv2[0].shape == conv2[1].shape and float(jnp.abs(conv2[0] - conv2[1]).max()) > 1e-3
    # Without LRN the two orders are the same net.
    a, b = (n.clone(use_lrn=False).apply(params, images, train=False) for n in (bvlc, caffenet))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
def test_dropout_sits_where_each_variant_puts_it(variant):
    """With every unit dropped: the paper drops fc7's output (logits = fc8's bias);
    torchvision drops pool5 and fc6's output (fc7 = ReLU(its bias))."""
    net = AlexNet(num_classes=10, width=1 / 16, init_scheme="he", variant=variant, dropout_rate=1.0)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 224, 224, 3))
    params = net.init({"params": jax.random.PRNGKey(0)}, images, train=False)["params"]
    logits, fc7 = net.apply(
        {"params": params}, images, train=True, with_features=True,
        rngs={"dropout": jax.random.PRNGKey(2)},
    )  # fmt: skip
    fc8 = params["fc8"]
    if variant == "paper":
        np.testing.assert_array_equal(np.asarray(fc7), 0.0)
        np.testing.assert_array_equal(np.asarray(logits), np.broadcast_to(fc8["bias"], (2, 10)))
    else:
        expected_fc7 = jnp.maximum(params["fc7"]["bias"][0], 0.0)
        np.testing.assert_allclose(np.asarray(fc7), np.broadcast_to(expected_fc7, fc7.shape))
        np.testing.assert_allclose(logits[0], expected_fc7 @ fc8["kernel"] + fc8["bias"], rtol=1e-5)


def test_an_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="torchvision"):
        AlexNet(variant="vgg").init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
