"""The paper's AlexNet: two explicit towers, LRN, overlapping pooling, dropout.

Per-tower parameters carry a leading tower axis of size 2 (``conv1/kernel`` is
``2 x 11 x 11 x 3 x 48``), so each tower's kernels are one slice that the
sharding rules can place on its own device. Towers never use grouped
convolutions: on XLA:CPU two ordinary convolutions are about 4x faster.

Activations between tower-local layers are stacked as ``T x B x H x W x C``.
Towers exchange activations only where the paper's GPUs did: into conv3,
fc6, fc7 and fc8. Given a mesh, each tower-local layer runs under
``sharding.tower_map`` (device d computes tower d with its own kernels) and
each exchange is ``sharding.all_towers``; without one, or on one device, the
same code loops over both towers in python.

conv1 pads 2 pixels on each side so that a 224x224 crop gives the paper's
55x55 maps (the torchvision convention; Caffe crops 227 instead).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from alexnet_jax import sharding

NUM_TOWERS = 2

# The paper's LRN constants (Sec. 3.3): k=2, n=5, alpha=1e-4, beta=0.75.
LRN_BIAS = 2.0
LRN_DEPTH_RADIUS = 2
LRN_ALPHA = 1e-4
LRN_BETA = 0.75

INIT_SCHEMES = ("paper", "he")

Initializer = Callable[..., jax.Array]


def local_response_norm(
    x: jax.Array,
    *,
    depth_radius: int = LRN_DEPTH_RADIUS,
    bias: float = LRN_BIAS,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
) -> jax.Array:
    """The paper's LRN over the last (channel) axis, window clipped at the edges.

    b_c = a_c / (bias + alpha * sum_{|j-c| <= depth_radius} a_j^2) ** beta.
    alpha is NOT divided by the window size (PyTorch and Caffe do that).
    Computed in float32 with a hand-written gradient (see ``_lrn``).
    """
    return _lrn(x.astype(jnp.float32), depth_radius, bias, alpha, beta).astype(x.dtype)


def _channel_window_sum(a: jax.Array, radius: int) -> jax.Array:
    """sum_{|j-c| <= radius} a_j over the last axis (zeros past the edges).

    Shifted adds of a padded copy: XLA fuses them into one elementwise loop,
    where reduce_window's gradient is a second, slower windowed reduction.
    """
    channels = a.shape[-1]
    padded = jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((radius, radius),))
    total = padded[..., :channels]
    for shift in range(1, 2 * radius + 1):
        total = total + padded[..., shift : shift + channels]
    return total


def _lrn_scale(x, radius, bias, alpha, beta) -> tuple[jax.Array, jax.Array]:
    """(d ** -beta, d) with d = bias + alpha * (window sum of x^2)."""
    denominator = bias + alpha * _channel_window_sum(jnp.square(x), radius)
    if beta == 0.75:
        # d ** -0.75 as rsqrt(d) * sqrt(rsqrt(d)): avoids a general pow (log + exp).
        inv = jax.lax.rsqrt(denominator)
        return inv * jnp.sqrt(inv), denominator
    return denominator ** (-beta), denominator


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x, radius, bias, alpha, beta):
    return x * _lrn_scale(x, radius, bias, alpha, beta)[0]


def _lrn_forward(x, radius, bias, alpha, beta):
    # Only x is kept for the backward pass; the scale is recomputed there
    # (cheap, fused), which saves storing two more activation-sized arrays.
    return _lrn(x, radius, bias, alpha, beta), x


def _lrn_backward(radius, bias, alpha, beta, x, g):
    """dx_j = g_j s_j - 2 alpha beta x_j * sum_{|c-j| <= radius} g_c x_c s_c / d_c.

    The exact gradient of ``x * s`` with s = d ** -beta, written so it is two
    fused elementwise passes instead of autodiff's windowed reductions.
    """
    scale, denominator = _lrn_scale(x, radius, bias, alpha, beta)
    g_scaled = g * scale
    spread = _channel_window_sum(g_scaled * x / denominator, radius)
    return (g_scaled - (2 * alpha * beta) * x * spread,)


_lrn.defvjp(_lrn_forward, _lrn_backward)


def _max3_stride2(x: jax.Array, axis: int) -> jax.Array:
    """Max over windows of 3 with stride 2 along one axis."""
    window, strides = [1] * x.ndim, [1] * x.ndim
    window[axis], strides[axis] = 3, 2
    return jax.lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, window, strides, "VALID"
    )


def _max_pool_forward_only(x: jax.Array) -> jax.Array:
    """Max over 3 strided row slices, then over 3 strided column slices.

    The same maxima as ``reduce_window``, which XLA:CPU runs ~2-5x slower
    when only the forward is needed (eval). Under differentiation reduce_window
    is used instead: XLA fuses the slices with their producer (LRN) and
    recomputes it, which made the train step slower.
    """
    for axis in (x.ndim - 3, x.ndim - 2):
        out = (x.shape[axis] - 3) // 2 + 1
        slices = [jax.lax.slice_in_dim(x, i, i + 2 * (out - 1) + 1, 2, axis) for i in range(3)]
        x = jnp.maximum(jnp.maximum(slices[0], slices[1]), slices[2])
    return x


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Overlapping pooling (Sec. 3.4): window 3, stride 2, no padding, over axes -3 and -2.

    Any leading axes (batch, tower) are kept. The gradient is hand-written
    (``_max_pool_backward``); XLA:CPU's select-and-scatter is ~3x slower.
    """
    return _max_pool_forward_only(x)


def _max_pool_forward(x):
    # Columns first, then rows; the column maxima are kept for the backward pass.
    row_maxima = _max3_stride2(x, x.ndim - 2)  # ... x H x W' x C
    y = _max3_stride2(row_maxima, x.ndim - 3)
    return y, (x, row_maxima, y)


def _route_to_first_max(x: jax.Array, y: jax.Array, g: jax.Array, axis: int) -> jax.Array:
    """Gradient of a 1-d max over windows of 3, stride 2: g goes to each window's first maximum.

    Three masked strided scatters that XLA fuses into one pass over ``x``.
    """
    out, size = y.shape[axis], x.shape[axis]
    taken = jnp.zeros(y.shape, bool)
    dx = jnp.zeros(x.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for i in range(3):
        end = i + 2 * (out - 1) + 1
        hit = (jax.lax.slice_in_dim(x, i, end, 2, axis) == y) & ~taken
        taken = taken | hit
        pad = [(0, 0, 0)] * x.ndim
        pad[axis] = (i, size - end, 1)
        dx = dx + jax.lax.pad(jnp.where(hit, g, zero), zero, pad)
    return dx


def _max_pool_backward(residuals, g):
    """Routes each output's gradient to the first maximum of its 3x3 window.

    The same rule as autodiff's select-and-scatter (row-major window order,
    first maximum wins ties): the first maximum is in the window's first row
    whose maximum is the window's, at that row's first maximum. So the
    gradient goes through the 3 rows, then within the row through its 3
    columns: two passes of 3 masked scatters, ~3x faster than the 9 masked
    scatters of the 2-d window (train step ~1.1x).
    """
    x, row_maxima, y = residuals
    g_rows = _route_to_first_max(row_maxima, y, g, x.ndim - 3)
    return (_route_to_first_max(x, row_maxima, g_rows, x.ndim - 2),)


max_pool_3x3_s2.defvjp(_max_pool_forward, _max_pool_backward)


@dataclasses.dataclass(frozen=True)
class LayerInit:
    """How one layer's parameters start: a kernel initializer and a bias value."""

    kernel: Initializer
    bias_value: float


def layer_inits(scheme: str) -> dict[str, LayerInit]:
    """Per-layer initializers for an init scheme.

    "paper": weights N(0, 0.01^2), biases 1 in conv2, conv4, conv5, fc6, fc7
    and 0 elsewhere (Sec. 5). Slow to start from scratch.
    "he": variance-scaling (fan-in, normal) weights and bias 0.1 where the
    paper uses 1 (Caffe's later choice); starts learning at once.
    The tower axis (0) of per-tower kernels is a batch axis for fan-in.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"model.init_scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    positive = ("conv2", "conv4", "conv5", "fc6", "fc7")
    layers = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    if scheme == "paper":
        kernel = nn.initializers.normal(stddev=0.01)
        return {n: LayerInit(kernel, 1.0 if n in positive else 0.0) for n in layers}
    inits = {}
    for n in layers:
        batch_axis = () if n == "fc8" else (0,)
        kernel = nn.initializers.variance_scaling(
            2.0, "fan_in", "truncated_normal", batch_axis=batch_axis
        )
        inits[n] = LayerInit(kernel, 0.1 if n in positive else 0.0)
    return inits


class TowerConv(nn.Module):
    """One convolution per tower, kernel ``T x kh x kw x Cin x Cout``.

    ``shared_input`` (B x H x W x C) feeds every tower (conv1, conv3);
    otherwise ``x`` is ``T x B x H x W x C`` and tower t sees only ``x[t]``.
    With a ``mesh``, each device convolves only its own towers.
    """

    features: int
    kernel_size: int
    stride: int
    padding: int
    init: LayerInit
    dtype: Any = jnp.float32
    mesh: Mesh | None = None
    side_by_side_min_features: int = 0  # See AlexNet.

    @nn.compact
    def __call__(self, x: jax.Array, *, shared_input: bool) -> jax.Array:
        in_features = x.shape[-1]
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.init.kernel, (NUM_TOWERS, k, k, in_features, self.features)
        )
        bias = self.param(
            "bias", nn.initializers.constant(self.init.bias_value), (NUM_TOWERS, self.features)
        )
        kernel, bias, x = (a.astype(self.dtype) for a in (kernel, bias, x))
        pad = ((self.padding, self.padding),) * 2

        def convolve(x, kernel, bias):  # The towers on this device: kernel[t] for t < T_local.
            towers, features = kernel.shape[0], kernel.shape[-1]
            if shared_input and towers * features >= self.side_by_side_min_features:
                # Every tower reads all of x: one convolution with the towers' kernels side
                # by side (same sums per output channel), ~5% faster per train step on CPU.
                side_by_side = jnp.moveaxis(kernel, 0, -2).reshape(*kernel.shape[1:-1], -1)
                y = jax.lax.conv_general_dilated(
                    x, side_by_side, window_strides=(self.stride, self.stride), padding=pad,
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )  # fmt: skip
                y = jnp.moveaxis(y.reshape(*y.shape[:-1], towers, features), -2, 0)
                return y + bias[:, None, None, None, :]
            outputs = []
            for t in range(kernel.shape[0]):
                inputs = x if shared_input else x[t]
                y = jax.lax.conv_general_dilated(
                    inputs,
                    kernel[t],
                    window_strides=(self.stride, self.stride),
                    padding=pad,
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )
                outputs.append(y + bias[t])
            return jnp.stack(outputs)

        return sharding.tower_map(convolve, self.mesh, shared_input=shared_input)(x, kernel, bias)


class TowerDense(nn.Module):
    """A fully connected layer whose output neurons are split between towers.

    Each tower computes ``features`` neurons from the whole input (B x D), as the
    paper's fc6 and fc7 do; the result is ``T x B x features``. With a
    ``mesh``, each device computes only its own towers' neurons.
    """

    features: int
    init: LayerInit
    dtype: Any = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.init.kernel, (NUM_TOWERS, x.shape[-1], self.features))
        bias = self.param(
            "bias", nn.initializers.constant(self.init.bias_value), (NUM_TOWERS, self.features)
        )
        kernel, bias, x = (a.astype(self.dtype) for a in (kernel, bias, x))

        def dense(x, kernel, bias):
            # One plain matmul per tower: XLA:CPU runs the batched einsum
            # "bd,tdf->tbf" (and its gradient) ~1.6x slower.
            per_tower = [x @ kernel[t] for t in range(kernel.shape[0])]
            return jnp.stack(per_tower) + bias[:, None, :]

        return sharding.tower_map(dense, self.mesh, shared_input=True)(x, kernel, bias)


def merge_towers(x_T: jax.Array) -> jax.Array:
    """T x B x ... x C -> B x ... x (T*C): tower 0's channels first."""
    return jnp.concatenate(list(x_T), axis=-1)


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at a width multiplier; never below 1."""
    return max(1, int(round(channels * width)))


class AlexNet(nn.Module):
    """AlexNet as in the paper's Fig. 2, at an optional width multiplier.

    Returns logits ``B x num_classes``; with ``with_features=True`` returns
    ``(logits, fc7)`` where fc7 (B x 4096 at width 1) is the post-ReLU
    activation the paper's Fig. 4 compares. ``mesh`` (a ('data', 'tower')
    mesh) places each tower on its own devices; parameters do not depend on it.
    ``conv_chunk_size`` > 0 runs conv1-pool5 as separate, smaller computations
    on chunks of about that many examples per data shard (``conv_batch_chunks``);
    it changes the schedule, not the result. Where towers share their input
    (conv1, conv3) they run as one convolution with the towers' kernels side by
    side once it has ``side_by_side_min_features`` outputs (same sums).
    """

    num_classes: int = 1000
    width: float = 1.0
    dropout_rate: float = 0.5
    init_scheme: str = "paper"
    use_lrn: bool = True
    conv_chunk_size: int = 0
    side_by_side_min_features: int = 0
    dtype: Any = jnp.float32
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self, images_BxHxWxC: jax.Array, *, train: bool, with_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        inits = layer_inits(self.init_scheme)
        w = self.width
        conv = lambda name, c, k, s, p: TowerConv(  # noqa: E731
            scaled(c, w), k, s, p, inits[name], self.dtype, self.mesh,
            self.side_by_side_min_features, name=name,
        )  # fmt: skip
        dense = lambda name: TowerDense(  # noqa: E731
            scaled(2048, w), inits[name], self.dtype, self.mesh, name=name
        )
        # The towers' only exchange: every tower device gets all towers' maps.
        merge = lambda x_T: merge_towers(sharding.all_towers(x_T, self.mesh))  # noqa: E731
        lrn = local_response_norm if self.use_lrn else (lambda x: x)

        # Defined once, so every chunk below calls the same layers (the same parameters).
        conv1, conv2 = conv("conv1", 48, 11, 4, 2), conv("conv2", 128, 5, 1, 2)
        conv3, conv4 = conv("conv3", 192, 3, 1, 1), conv("conv4", 192, 3, 1, 1)
        conv5 = conv("conv5", 128, 3, 1, 1)

        def conv_stack(x):
            x = nn.relu(conv1(x, shared_input=True))  # T,B,55,55,48
            x = _pool_towers(lrn(x))  # T,B,27,27,48
            x = nn.relu(conv2(x, shared_input=False))  # T,B,27,27,128
            x = _pool_towers(lrn(x))  # T,B,13,13,128
            x = nn.relu(conv3(merge(x), shared_input=True))
            x = nn.relu(conv4(x, shared_input=False))
            x = nn.relu(conv5(x, shared_input=False))
            x = _pool_towers(x)  # T,B,6,6,128
            return merge(x).reshape(x.shape[1], -1)  # B, 6*6*256

        # The conv layers run on chunks of the batch (each data shard's examples split
        # evenly): the same sums per example, and on CPU ~1.6x faster per image than
        # whole-batch convs (a chunk's maps stay in cache).
        x = images_BxHxWxC.astype(self.dtype)
        batch = x.shape[0]
        data_shards = 1 if self.mesh is None else self.mesh.shape[sharding.DATA_AXIS]
        chunks = conv_batch_chunks(batch // data_shards, self.conv_chunk_size)
        if chunks == 1:
            x = conv_stack(x)
        else:
            # Example b = i * chunks + j goes to chunk j: every chunk takes an equal share
            # of each data shard (the leading i axis), so no example changes device.
            x = x.reshape(batch // chunks, chunks, *x.shape[1:])
            x = jnp.stack([conv_stack(x[:, j]) for j in range(chunks)], axis=1)
            x = x.reshape(batch, -1)

        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        x = dropout(nn.relu(dense("fc6")(x)))
        x = merge(x)
        x = dropout(nn.relu(dense("fc7")(x)))
        fc7 = merge(x)
        logits = nn.Dense(
            self.num_classes,
            kernel_init=inits["fc8"].kernel,
            bias_init=nn.initializers.constant(inits["fc8"].bias_value),
            dtype=self.dtype,
            name="fc8",
        )(fc7)
        logits = logits.astype(jnp.float32)
        if with_features:
            return logits, fc7.astype(jnp.float32)
        return logits


def conv_batch_chunks(local_batch: int, chunk_size: int) -> int:
    """How many chunks a data shard's ``local_batch`` examples are split into.

    The most chunks that divide the batch evenly with at least ``chunk_size``
    examples each; 1 (the whole batch) when ``chunk_size`` is 0 or the batch
    is too small to split.
    """
    if chunk_size <= 0 or local_batch < 2 * chunk_size:
        return 1
    return max(n for n in range(1, local_batch // chunk_size + 1) if local_batch % n == 0)


def _pool_towers(x_T: jax.Array) -> jax.Array:
    """Overlapping 3x3/2 max-pooling of each tower's maps (T x B x H x W x C).

    Pools the 5-d array directly: folding T into B would merge a replicated
    axis with a data-sharded one, which forces an all-gather of the batch.
    """
    return max_pool_3x3_s2(x_T)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))
