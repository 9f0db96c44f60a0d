"""XLA compile options a config asks for: which library runs XLA:CPU's convolutions.

jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default. On the paper's
net its own (Eigen) convolutions are faster: 2-core AMD EPYC, batch 128, f32
train step, conv chunks of 8, one process: 76.1 images/s with YNNPACK, 82.4 with
Eigen (per layer on chunks of 8, forward + both gradients: conv1 207 -> 297 GFLOP/s,
conv2 375 -> 416, conv3 346 -> 456, conv4 324 -> 406, conv5 331 -> 381). Matmuls
and reductions stay with YNNPACK either way.

Every ``jax.jit`` that runs the model passes ``for_config(config)`` as its
``compiler_options``; off CPU, or with an XLA that lacks the option, that is {}.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

CPU_CONV_LIBRARIES = ("eigen", "ynnpack")

# The XLA:CPU debug option that lists the op kinds YNNPACK takes over.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_FUSION_TYPES = {
    "eigen": ("INDIVIDUAL_DOT", "REDUCE"),
    "ynnpack": ("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "REDUCE"),  # jaxlib 0.10's default
}


def cpu_options(conv_library: str) -> dict[str, str]:
    """The XLA:CPU options that put convolutions in ``conv_library``."""
    if conv_library not in _YNN_FUSION_TYPES:
        raise ValueError(
            f"cpu_conv_library = {conv_library!r}; accepted: one of {CPU_CONV_LIBRARIES}"
        )
    kinds = _YNN_FUSION_TYPES[conv_library]
    return {YNN_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds)}


# Shared-input towers (conv1, conv3) run as one side-by-side convolution from this many
# outputs (AlexNet.side_by_side_min_features). With Eigen, always (quarter-width demo net,
# batch 64: 458 vs 368 images/s; paper width 1.05x); YNNPACK picks a slow kernel for
# conv1 with 24 outputs (the quarter-width side-by-side conv1: 140 vs 368 images/s), while
# 48 and 96 are fast.
SIDE_BY_SIDE_MIN_FEATURES = {"eigen": 0, "ynnpack": 48}


def side_by_side_min_features(config: Any) -> int:
    """``AlexNet.side_by_side_min_features`` for ``config`` on this backend."""
    if jax.default_backend() != "cpu":
        return 0
    return SIDE_BY_SIDE_MIN_FEATURES[config.cpu_conv_library]


def for_config(config: Any) -> dict[str, str]:
    """``compiler_options`` for the jits that run ``config``'s model on this backend."""
    if jax.default_backend() != "cpu":
        return {}
    options = cpu_options(config.cpu_conv_library)
    return options if _xla_accepts(tuple(options.items())) else {}


@functools.cache
def _xla_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's XLA compiles with ``options`` (the option is experimental)."""
    try:
        jax.jit(jnp.negative, compiler_options=dict(options)).lower(jnp.zeros(())).compile()
    except jax.errors.JaxRuntimeError as e:
        logging.warning(
            "This XLA does not take %s (%s); config.cpu_conv_library has no effect, XLA's "
            "default convolutions run.",
            dict(options),
            str(e).splitlines()[0],
        )
        return False
    return True
