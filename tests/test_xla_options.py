"""config.cpu_conv_library: which library runs XLA:CPU's convolutions (xla_options.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import config_lib, train, xla_options
from configs import common

ON_CPU = jax.default_backend() == "cpu"


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_each_library_names_the_op_kinds_ynnpack_takes():
    eigen, ynnpack = (
        xla_options.cpu_options(name)[xla_options.YNN_FUSION_OPTION].split(",")
        for name in ("eigen", "ynnpack")
    )
    assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION" not in eigen
    assert set(ynnpack) - set(eigen) == {"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
    with pytest.raises(ValueError, match="'mkl'.*eigen"):
        xla_options.cpu_options("mkl")


def test_unknown_library_is_a_config_error_naming_the_choices():
    config = common.base_config()
    config.cpu_conv_library = "mkl"
    with pytest.raises(config_lib.ConfigError, match=r"config.cpu_conv_library = 'mkl'.*ynnpack"):
        config_lib.validate(config)


@pytest.mark.skipif(not ON_CPU, reason="the threshold is for XLA:CPU's libraries")
def test_side_by_side_towers_avoid_ynnpacks_slow_24_output_conv():
    config = common.base_config()
    assert xla_options.side_by_side_min_features(config) == 0  # Eigen: always side by side.
    config.cpu_conv_library = "ynnpack"
    assert xla_options.side_by_side_min_features(config) == 48
    config.model.width = 0.25  # conv1: 2 x 12 = 24 outputs -> one conv per tower.
    assert train.build_model(config).side_by_side_min_features == 48


@pytest.mark.skipif(not ON_CPU, reason="the option is XLA:CPU's")
def test_the_option_moves_convolutions_out_of_ynnpack_with_the_same_result():
    config = common.base_config()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 13, 13, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
    results, in_ynnpack = {}, {}
    for library in xla_options.CPU_CONV_LIBRARIES:
        config.cpu_conv_library = library
        options = xla_options.for_config(config)
        assert options == xla_options.cpu_options(library)  # This jaxlib takes the option.
        compiled = jax.jit(_conv, compiler_options=options).lower(x, w).compile()
        in_ynnpack[library] = "__ynn_fusion" in compiled.as_text()
        results[library] = np.asarray(compiled(x, w))
    assert in_ynnpack == {"eigen": False, "ynnpack": True}
    np.testing.assert_allclose(results["eigen"], results["ynnpack"], rtol=1e-5, atol=1e-4)


def test_an_option_this_xla_lacks_is_dropped():
    # The option is experimental: a jaxlib without it must still train (with a warning).
    assert xla_options._xla_accepts((("xla_cpu_no_such_option_for_this_test", "1"),)) is False
