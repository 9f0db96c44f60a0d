"""Model FLOPs and accelerator peaks: what throughput and MFU are measured against.

Used by the training loop's log (``train_tflops_per_sec``, ``mfu``) and the benchmarks.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from alexnet_jax import inference

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's H100 SXM and H200 SXM
# datasheets (the H200 has the H100's compute; the sheets print twice these, with sparsity).
# "tensorfloat32" is how JAX computes float32 convolutions and matmuls on these chips by
# default; "float32" (no tensor cores) applies with jax_default_matmul_precision=highest.
CHIP_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.5, "tensorfloat32": 494.5, "float32": 67.0},
    "H100 80GB HBM3": {"bfloat16": 989.5, "tensorfloat32": 494.5, "float32": 67.0},
}
FULL_F32_PRECISIONS = ("highest", "float32", "f32_f32_f32")


def chip_peak_tflops(
    device_kind: str, compute_dtype: str, matmul_precision: str | None = None
) -> tuple[float, str] | None:
    """The datasheet peak of a known accelerator for this dtype, and what it counts.

    None for other devices (the CPU, unknown chips): the benchmark then uses
    the matmul peak it measures, or ``--peak_tflops``.
    """
    for name, peaks in CHIP_PEAK_TFLOPS.items():
        if name in device_kind:
            if compute_dtype == "bfloat16":
                mode = "bfloat16"
            elif str(matmul_precision or "").lower() in FULL_F32_PRECISIONS:
                mode = "float32"
            else:
                mode = "tensorfloat32"
            return peaks[mode], f"{name} datasheet, dense {mode}"
    return None


def forward_flops_per_image(config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of one 224x224 image: 2 x multiply-adds of every conv and dense layer.

    Counted from the model's own layers (their kernels and output shapes, found
    by intercepting its submodule calls), so it follows ``model.py``.
    """
    model = inference.build_model(config)
    images = jnp.zeros((1, inference.CROP_SIZE, inference.CROP_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    macs = 0

    def count(next_fun, args, kwargs, context):
        nonlocal macs
        out = next_fun(*args, **kwargs)
        params = variables["params"].get(context.module.name) if context.module.name else None
        if context.method_name == "__call__" and params is not None and "kernel" in params:
            kernel = params["kernel"].shape
            # Per-tower kernels lead with the tower axis: T x [k x k x] Cin x Cout.
            fan_in = kernel[1:-1] if len(kernel) in (3, 5) else kernel[:-1]
            outputs = sum(leaf.size for leaf in jax.tree.leaves(out))  # batch of 1
            macs += outputs * math.prod(fan_in)
        return out

    with nn.intercept_methods(count):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return 2.0 * macs


def train_flops_per_image(config: ml_collections.ConfigDict) -> float:
    """A training step's FLOPs per image: the forward and twice it for the backward."""
    return 3.0 * forward_flops_per_image(config)
