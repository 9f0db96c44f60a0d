"""tuning.py: every CPU schedule equals model.py's plain form; the backend picks the schedules.

Tolerances: the LRN schedule computes d ** -0.75 as rsqrt(d) * sqrt(rsqrt(d))
and its gradient with another association of the same ~10 f32 operations, so
values agree to a few ulp (rtol 2e-6, ~16 eps) and gradients, whose two terms
partly cancel, to ~170 eps (rtol 2e-5) of their scale. Max-pooling only
selects and routes values: exact. Side-by-side and chunked convolutions sum the
same products, possibly in another order: the error of an f32 sum of N terms
is bounded by ~N eps times the sum of magnitudes, so 1e-5 of the output scale
holds for the few hundred terms per output here on any CPU.

The accelerator options (``tuning.KernelOptions``) are held to the same
bounds; their own tests derive theirs per element (convolutions: the sum of
the products' magnitudes times the number of terms) or from bfloat16's
rounding (LRN in the compute dtype: one bfloat16 ulp).
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import model, tuning
from alexnet_jax.model import AlexNet
from tests.conftest import ROOT

F32_EPS = float(np.finfo(np.float32).eps)
BF16_ULP = 2.0**-7  # A bfloat16 ulp relative to the value it rounds (8 significant bits).
EVERY_OPTION = tuning.KernelOptions(
    lrn="compute_dtype", max_pool="sliced", tower_convs="grouped", pad_input_channels=8
)


def _relu_maps(shape, seed, scale=40.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.maximum(rng.normal(0, scale, shape), 0), jnp.float32)


@pytest.mark.parametrize("convention", model.LRN_CONVENTIONS)
@pytest.mark.parametrize("shape", [(3, 13, 13, 8), (2, 2, 11, 9, 7)])
def test_lrn_schedule_equals_autodiff_of_the_formula(shape, convention):
    x = _relu_maps(shape, 0, scale=40.0 if convention == "paper" else 100.0)
    # Large ReLU'd maps: the cross-channel term matters.
    g = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    constants = model.lrn_constants(convention)
    y_ref, vjp_ref = jax.vjp(functools.partial(model.local_response_norm, **constants), x)
    y, vjp = jax.vjp(functools.partial(tuning.lrn_fused_gradient, **constants), x)
    np.testing.assert_allclose(y, y_ref, rtol=16 * F32_EPS, atol=16 * F32_EPS)
    grad, grad_ref = vjp(g)[0], vjp_ref(g)[0]
    scale = float(jnp.abs(grad_ref).max())
    np.testing.assert_allclose(grad, grad_ref, rtol=2e-5, atol=2e-5 * scale)
    # Not just g * scale: the neighbours' term is present and large here.
    without_cross_term = g * y_ref / jnp.where(x == 0, 1, x)
    assert float(jnp.abs(grad_ref - without_cross_term).max()) > 1e-3


@pytest.mark.parametrize("shape", [(2, 13, 13, 4), (2, 3, 27, 27, 5), (1, 8, 10, 3)])
def test_max_pool_schedule_equals_autodiff_including_ties(shape):
    rng = np.random.default_rng(1)
    # Rounded ReLU outputs: many equal values in a window, so tie-breaking is exercised.
    x = jnp.asarray(np.round(np.maximum(rng.normal(0, 2, shape), 0)), jnp.float32)
    y_ref, vjp_ref = jax.vjp(model.max_pool_3x3_s2, x)
    y, vjp = jax.vjp(tuning.max_pool_sliced, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(jax.jit(tuning.max_pool_sliced)(x), y_ref)  # Eval form.
    g = jnp.asarray(rng.integers(1, 5, y.shape), jnp.float32)  # Integers: sums are exact.
    np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
    assert float(vjp(g)[0].sum()) == float(g.sum())  # Every output routes to one input.


@pytest.mark.parametrize("min_features", [0, 10**6])
@pytest.mark.parametrize("shared_input", [True, False])
def test_side_by_side_conv_equals_one_conv_per_tower(shared_input, min_features):
    rng = np.random.default_rng(2)
    x_shape = (3, 13, 13, 6) if shared_input else (2, 3, 13, 13, 6)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 3, 3, 6, 5)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    kw = dict(stride=2, padding=1, shared_input=shared_input)
    expected = model.convolve_towers(x, kernel, bias, **kw)
    got = tuning.SideBySideConv(min_features)(x, kernel, bias, **kw)
    assert got.shape == expected.shape == (2, 3, 7, 7, 5)
    # 54 products per output: well inside 1e-5 of the scale.
    np.testing.assert_allclose(got, expected, atol=1e-5 * float(jnp.abs(expected).max()))


def test_conv_batch_chunks_divide_the_batch_evenly():
    assert tuning.conv_batch_chunks(128, 8) == 16
    assert tuning.conv_batch_chunks(100, 8) == 10  # 10 chunks of 10: the most with >= 8 each.
    assert tuning.conv_batch_chunks(7, 2) == 1  # A prime batch cannot be split evenly.
    assert tuning.conv_batch_chunks(12, 8) == 1  # Too small for two chunks of 8.
    assert tuning.conv_batch_chunks(128, 0) == 1  # 0 = whole batch.


def _schedule_loss(params, net, images):
    labels = jnp.arange(images.shape[0]) % 10
    logits = net.apply(
        {"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)}
    )
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(images.shape[0]), labels]), logits


def _loss_and_gradients(net, params, images):
    """Under jit: one compile per schedule instead of thousands of single-op dispatches."""
    value_and_grad = jax.value_and_grad(_schedule_loss, has_aux=True)
    return jax.jit(lambda p, x: value_and_grad(p, net, x))(params, images)


@pytest.fixture(scope="module")
def plain_network_reference():
    """The plain network's params, images, loss, logits and gradients, computed once."""
    plain = AlexNet(num_classes=10, width=1 / 16, init_scheme="he")
    images = jax.random.normal(jax.random.PRNGKey(1), (6, 224, 224, 3))
    init = jax.jit(functools.partial(plain.init, train=False))
    params = init({"params": jax.random.PRNGKey(0)}, images)["params"]
    return plain, images, params, _loss_and_gradients(plain, params, images)


@pytest.mark.parametrize(
    "kernels",
    [
        tuning.cpu_kernels("eigen", conv_chunk_size=1),
        tuning.cpu_kernels("ynnpack", conv_chunk_size=0),
        tuning.plain_kernels(conv_chunk_size=2),
        tuning.kernels("gpu", options=EVERY_OPTION),
    ],
    ids=[
        "cpu_eigen_chunks_of_one",
        "cpu_ynnpack_whole_batch",
        "plain_chunks_of_two",
        "gpu_every_option",
    ],  # fmt: skip
)
def test_every_schedule_gives_the_plain_networks_logits_and_gradients(
    kernels, plain_network_reference
):
    plain, images, params, ((loss_p, logits_p), grads_p) = plain_network_reference
    tuned = plain.clone(kernels=kernels)
    (loss_t, logits_t), grads_t = _loss_and_gradients(tuned, params, images)
    # The same logits, loss and (summed) gradients, in the examples' order.
    np.testing.assert_allclose(logits_t, logits_p, rtol=1e-5, atol=1e-5)
    assert float(loss_t) == pytest.approx(float(loss_p), rel=1e-5)
    for path, g_p in jax.tree_util.tree_leaves_with_path(grads_p):
        g_t = functools.reduce(lambda t, k: t[k.key], path, grads_t)
        scale = float(jnp.abs(g_p).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g_t, g_p, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize(
    "variant, options",
    [
        ("torchvision", tuning.KernelOptions()),
        ("bvlc_alexnet", tuning.KernelOptions()),
        ("caffenet", EVERY_OPTION),  # LRN across both towers, after the pool.
    ],
)
def test_the_cpu_schedules_give_each_variants_plain_logits_and_gradients(variant, options):
    plain = AlexNet(num_classes=10, width=1 / 16, init_scheme="he", variant=variant)
    cpu = tuning.cpu_kernels("eigen", conv_chunk_size=1)
    tuned = plain.clone(kernels=tuning.with_options(cpu, options))
    # Small crops keep it quick; torchvision's 2x2 pool5 is averaged up to 6x6.
    images = 60 * jax.random.normal(jax.random.PRNGKey(1), (2, 100, 100, 3))

    def loss(params, net):
        logits = net.apply({"params": params}, images, train=False)
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits

    params = plain.init({"params": jax.random.PRNGKey(0)}, images, train=False)["params"]
    (_, logits_p), grads_p = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, plain
    )
    (_, logits_t), grads_t = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
        params, tuned
    )
    # Each logit is a float32 sum whose terms reach the logits' scale (~1e2 here), so a logit
    # near 0 carries rounding of that scale's order: the bound is relative to the largest.
    logit_scale = float(jnp.abs(logits_p).max())
    np.testing.assert_allclose(logits_t, logits_p, rtol=1e-5, atol=1e-5 * logit_scale)
    # A bias gradient sums ~1e4 per-position terms that largely cancel (the sum is ~1e-2 of
    # the terms' magnitudes); summed in another order (grouped convolutions, chunks) float32
    # moves it by ~sqrt(1e4) * 6e-8 of those magnitudes, i.e. up to a few 1e-4 of the result.
    for (path, g_p), g_t in zip(
        jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_t), strict=True
    ):
        scale = float(jnp.abs(g_p).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g_t, g_p, atol=3e-4 * scale, err_msg=jax.tree_util.keystr(path))


def test_the_backend_picks_the_kernels():
    cpu = tuning.kernels("cpu")
    assert cpu.lrn is tuning.lrn_fused_gradient and cpu.max_pool is tuning.max_pool_sliced
    assert cpu.conv_layers == tuning.InChunks(tuning.CPU_CONV_CHUNK_SIZE)
    assert tuning.kernels("cpu", conv_chunk_size=0).conv_layers is model.whole_batch
    assert tuning.kernels("cpu", conv_chunk_size=16).conv_layers == tuning.InChunks(16)
    for accelerator in ("gpu", "tpu"):  # Unmeasured there: the plain forms.
        assert tuning.kernels(accelerator) == model.Kernels()
        assert tuning.kernels(accelerator, conv_chunk_size=4).conv_layers == tuning.InChunks(4)
    assert tuning.kernels("gpu", choice="cpu").lrn is tuning.lrn_fused_gradient
    assert tuning.kernels("cpu", choice="plain") == model.Kernels()
    with pytest.raises(tuning.SettingError, match="'fast'.*plain"):
        tuning.kernels("cpu", choice="fast")


def test_side_by_side_threshold_follows_the_active_conv_library(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", tuning.ynn_fusion_flag("eigen"))
    assert tuning.cpu_conv_library() == "eigen"
    assert tuning.kernels("cpu").convolve_towers == tuning.SideBySideConv(0)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert tuning.cpu_conv_library() == "ynnpack"  # XLA's default.
    # YNNPACK's 24-output conv1 (the quarter-width demo) is slow side by side.
    assert tuning.kernels("cpu").convolve_towers == tuning.SideBySideConv(48)


def test_configure_process_adds_the_flag_once_and_keeps_an_explicit_one(monkeypatch):
    if not tuning.YNN_FLAG_TESTED_JAXLIB[0] <= tuning._jaxlib_version():
        pytest.skip("jaxlib older than the flag")
    monkeypatch.setattr(tuning, "_backends_started", lambda: False)  # As in a fresh process.
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    tuning.configure_process(env)
    tuning.configure_process(env)
    flag = tuning.ynn_fusion_flag(tuning.DEFAULT_CPU_CONV_LIBRARY)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flag}"
    explicit = {"XLA_FLAGS": tuning.ynn_fusion_flag("ynnpack"), tuning.CPU_CONVS_ENV: "eigen"}
    tuning.configure_process(explicit)
    assert explicit["XLA_FLAGS"] == tuning.ynn_fusion_flag("ynnpack")  # The explicit flag wins.
    with pytest.raises(tuning.SettingError, match=r"ALEXNET_JAX_CPU_CONVS='mkl'.*eigen"):
        tuning.configure_process({tuning.CPU_CONVS_ENV: "mkl"})
    with pytest.raises(tuning.SettingError, match=r"ALEXNET_JAX_HOST_ALLOCATOR='jemalloc'"):
        tuning.configure_process({tuning.HOST_ALLOCATOR_ENV: "jemalloc"})


_PROBE = """
from alexnet_jax import tuning
tuning.configure_process()
import jax, jax.numpy as jnp
x, w = jnp.ones((2, 13, 13, 32)), jnp.ones((3, 3, 32, 32))
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
text = jax.jit(conv).lower(x, w).compile().as_text()  # A plain jit: no options passed.
print(tuning.cpu_conv_library(), "__ynn_fusion" in text)
"""


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's libraries")
@pytest.mark.parametrize("library", tuning.CPU_CONV_LIBRARIES)
def test_every_jit_in_a_process_compiles_convs_with_the_chosen_library(library):
    if not tuning.YNN_FLAG_TESTED_JAXLIB[0] <= tuning._jaxlib_version():
        pytest.skip("jaxlib older than the flag")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", tuning.CPU_CONVS_ENV: library})
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [library, str(library == "ynnpack")]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"JAX_PLATFORMS": "cpu"}, "mimalloc"),
        ({"JAX_PLATFORMS": "cuda"}, "system"),
        ({"JAX_PLATFORMS": "cuda", tuning.HOST_ALLOCATOR_ENV: "mimalloc"}, "mimalloc"),
        ({"JAX_PLATFORMS": "cpu", tuning.HOST_ALLOCATOR_ENV: "system"}, "system"),
    ],
)
def test_host_allocator_is_mimalloc_where_the_process_computes_on_the_cpu(env, expected):
    assert tuning.host_allocator(env) == expected


# --- Accelerator options (tuning.KernelOptions): each equals the plain form on the CPU ---


@pytest.mark.parametrize("convention", model.LRN_CONVENTIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lrn_in_compute_dtype_equals_the_plain_lrn(dtype, convention):
    """Both compute in float32 and round once to the input's dtype.

    float32: the CPU schedule's formula, so its tolerances (module docstring).
    bfloat16: the float32 values differ by those few ulp, and rounding them can
    land on neighbouring bfloat16 values: at most one bfloat16 ulp apart
    (rtol 2^-7), on top of the float32 gradient's 2e-5 of its scale.
    """
    shape = (2, 2, 9, 9, 16)
    x = _relu_maps(shape, 3, scale=40.0 if convention == "paper" else 100.0).astype(dtype)
    g = jnp.asarray(np.random.default_rng(4).normal(size=shape), dtype)
    constants = model.lrn_constants(convention)
    y_ref, vjp_ref = jax.vjp(functools.partial(model.local_response_norm, **constants), x)
    y, vjp = jax.vjp(functools.partial(tuning.lrn_in_compute_dtype, **constants), x)
    assert y.dtype == y_ref.dtype == x.dtype
    grad, grad_ref = vjp(g)[0], vjp_ref(g)[0]
    assert grad.dtype == x.dtype
    rtol = 16 * F32_EPS if dtype == "float32" else BF16_ULP
    y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=16 * F32_EPS)
    grad, grad_ref = np.asarray(grad, np.float32), np.asarray(grad_ref, np.float32)
    scale = float(np.abs(grad_ref).max())
    np.testing.assert_allclose(
        grad, grad_ref, rtol=2e-5 if dtype == "float32" else BF16_ULP, atol=2e-5 * scale
    )
    if dtype == "bfloat16":  # Nearly all values round to the same bfloat16.
        assert np.mean(y == y_ref) > 0.99 and np.mean(grad == grad_ref) > 0.95


def _conv_case(shared_input: bool, in_channels: int, seed: int):
    rng = np.random.default_rng(seed)
    x_shape = (3, 13, 13, in_channels) if shared_input else (2, 3, 13, 13, in_channels)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 3, 3, in_channels, 5)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    return x, kernel, bias


def _assert_same_sums(convolve, x, kernel, bias, *, stride, padding, shared_input):
    """``convolve`` gives ``model.convolve_towers``' values and gradients.

    Both sum the same products in some order. An f32 sum of N terms is off by
    at most ~N eps times the sum of their magnitudes, which is the plain
    convolution applied to |x|, |kernel|, |bias| (forward) and its VJP at |g|
    (gradients): two such errors apart, plus the bias add's rounding.
    """
    kw = dict(stride=stride, padding=padding, shared_input=shared_input)
    plain = functools.partial(model.convolve_towers, **kw)
    tuned = functools.partial(convolve, **kw)
    y_ref, vjp_ref = jax.vjp(plain, x, kernel, bias)
    y, vjp = jax.vjp(tuned, x, kernel, bias)
    g = jnp.asarray(np.random.default_rng(9).normal(size=y_ref.shape), jnp.float32)
    magnitudes, vjp_magnitudes = jax.vjp(plain, jnp.abs(x), jnp.abs(kernel), jnp.abs(bias))
    terms = max(int(np.prod(kernel.shape[1:4])), int(np.prod(y_ref.shape[1:-1])), 5) + 2
    assert y.shape == y_ref.shape
    np.testing.assert_array_less(np.abs(y - y_ref), 2 * terms * F32_EPS * magnitudes + 1e-30)
    for got, ref, bound in zip(vjp(g), vjp_ref(g), vjp_magnitudes(jnp.abs(g)), strict=True):
        assert got.shape == ref.shape
        np.testing.assert_array_less(np.abs(got - ref), 2 * terms * F32_EPS * bound + 1e-30)


@pytest.mark.parametrize("shared_input", [True, False])
def test_grouped_conv_equals_one_conv_per_tower(shared_input):
    x, kernel, bias = _conv_case(shared_input, 6, 2)
    _assert_same_sums(
        tuning.GroupedConv(), x, kernel, bias, stride=2, padding=1, shared_input=shared_input
    )


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize(
    "inner", [model.convolve_towers, tuning.GroupedConv()], ids=["per_tower", "grouped"]
)
@pytest.mark.parametrize("shared_input", [True, False])
def test_padded_input_channels_equal_the_unpadded_convolution(shared_input, inner, multiple):
    x, kernel, bias = _conv_case(shared_input, 3, 5)  # conv1's 3 input channels.
    padded = tuning.PaddedInputChannels(multiple, inner)
    _assert_same_sums(padded, x, kernel, bias, stride=4, padding=2, shared_input=shared_input)
    # The padded kernel rows are zeros, so the gradient keeps the kernel's own shape.
    kw = dict(stride=4, padding=2, shared_input=shared_input)
    grad = jax.grad(lambda k: padded(x, k, bias, **kw).sum())(kernel)
    assert grad.shape == kernel.shape


def test_kernel_options_parse_describe_and_change_nothing_by_default():
    parse = tuning.parse_kernel_options
    assert parse("") == tuning.KernelOptions()
    assert parse(EVERY_OPTION.describe()) == EVERY_OPTION
    assert parse(" tower_convs=grouped , pad_input_channels=4") == tuning.KernelOptions(
        tower_convs="grouped", pad_input_channels=4
    )
    with pytest.raises(tuning.SettingError, match=r"pad_input_channels=3.*\(0, 4, 8\)"):
        parse("pad_input_channels=3")
    with pytest.raises(tuning.SettingError, match=r"'fast'.*NAME=VALUE"):
        parse("fast")
    with pytest.raises(tuning.SettingError, match=r"lrn='bf16'.*compute_dtype"):
        parse("lrn=bf16")
    # The defaults leave every schedule as it is (the same object).
    for schedule in (tuning.cpu_kernels("eigen", 8), tuning.plain_kernels(0)):
        assert tuning.with_options(schedule, tuning.KernelOptions()) is schedule
    # Unmeasured on a GPU: the GPU keeps the plain forms until a measurement flips them.
    assert tuning.KERNEL_OPTIONS_BY_BACKEND["gpu"] == tuning.KernelOptions()
    assert tuning.kernels("gpu") == model.Kernels()
    tuned = tuning.kernels("gpu", options=EVERY_OPTION)
    assert tuned.lrn is tuning.lrn_in_compute_dtype and tuned.max_pool is tuning.max_pool_sliced
    assert tuned.convolve_towers == tuning.PaddedInputChannels(8, tuning.GroupedConv())
    assert tuning.kernels("cpu", options=EVERY_OPTION).conv_layers == tuning.InChunks(8)
