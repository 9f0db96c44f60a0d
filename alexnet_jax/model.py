"""The paper's AlexNet: two explicit towers, LRN, overlapping pooling, dropout.

Per-tower parameters carry a leading tower axis of size 2 (``conv1/kernel`` is
``2 x 11 x 11 x 3 x 48``), so each tower's kernels are one slice that the
sharding rules can place on its own device (not a grouped convolution,
whose kernels would be one array).

Activations between tower-local layers are stacked as ``T x B x H x W x C``.
Towers exchange activations only where the paper's GPUs did: into conv3,
fc6, fc7 and fc8. Given a mesh, each tower-local layer runs under
``sharding.tower_map`` (device d computes tower d with its own kernels) and
each exchange is ``sharding.all_towers``; without one, or on one device, the
same code loops over both towers in python. ``Kernels`` says how each
operation is computed; the plain forms here are the reference, and
``alexnet_jax/tuning.py`` picks faster schedules of the same values per backend.

conv1 pads 2 pixels on each side so that a 224x224 crop gives the paper's
55x55 maps (the torchvision convention; Caffe crops 227 instead).

Other published AlexNets are the same layers with other choices (``Variant``,
``VARIANTS``, chosen by ``AlexNet.variant``): torchvision's one-tower net,
and Caffe's bvlc_alexnet and caffenet (towers as Caffe's ``group: 2``, its
LRN constants, normalization across both groups' maps). Their weights are
read by ``alexnet_jax/import_weights.py``.
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
# "paper": b = a / (k + alpha * sum)^beta with k=2. "caffe" (Caffe's LRN layer and PyTorch's
# LocalResponseNorm with their defaults): k=1 and alpha divided by the window size n.
LRN_CONVENTIONS = ("paper", "caffe")

INIT_SCHEMES = ("paper", "he")

Initializer = Callable[..., jax.Array]


def channel_window_sum(a: jax.Array, radius: int) -> jax.Array:
    """sum_{|j-c| <= radius} a_j over the last (channel) axis, zeros past the edges."""
    channels = a.shape[-1]
    padded = jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((radius, radius),))
    total = padded[..., :channels]
    for shift in range(1, 2 * radius + 1):
        total = total + padded[..., shift : shift + channels]
    return total


def local_response_norm(
    x: jax.Array,
    *,
    depth_radius: int = LRN_DEPTH_RADIUS,
    bias: float = LRN_BIAS,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
) -> jax.Array:
    """The paper's LRN (Sec. 3.3) over the channel axis, computed in float32.

    b_c = a_c / (bias + alpha * sum_{|j-c| <= depth_radius} a_j^2) ** beta,
    the window clipped at the first and last channel. alpha is NOT divided by
    the window size (PyTorch and Caffe do that: ``lrn_constants("caffe")``
    passes their alpha / n).
    """
    a = x.astype(jnp.float32)
    denominator = bias + alpha * channel_window_sum(jnp.square(a), depth_radius)
    return (a * denominator ** (-beta)).astype(x.dtype)


def lrn_constants(convention: str) -> dict[str, float]:
    """``local_response_norm``'s keyword arguments for an LRN convention.

    Both use n=5, alpha=1e-4, beta=0.75 as published; Caffe scales the window
    sum by alpha/n and adds k=1 where the paper adds k=2 to alpha times it.
    """
    window = 2 * LRN_DEPTH_RADIUS + 1
    if convention == "paper":
        return {"depth_radius": LRN_DEPTH_RADIUS, "bias": LRN_BIAS, "alpha": LRN_ALPHA}
    if convention == "caffe":
        return {"depth_radius": LRN_DEPTH_RADIUS, "bias": 1.0, "alpha": LRN_ALPHA / window}
    raise ValueError(f"LRN convention must be one of {LRN_CONVENTIONS}, got {convention!r}")


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Overlapping pooling (Sec. 3.4): window 3, stride 2, no padding, over axes -3 and -2.

    Any leading axes (batch, tower) are kept.
    """
    window = (1,) * (x.ndim - 3) + (3, 3, 1)
    strides = (1,) * (x.ndim - 3) + (2, 2, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")


def adaptive_average_pool(x: jax.Array, size: int) -> jax.Array:
    """Averages axes -3 and -2 into ``size`` x ``size`` cells, as PyTorch's AdaptiveAvgPool2d.

    Output cell i of an axis of n averages inputs floor(i n / size) to
    ceil((i + 1) n / size) - 1; the cells of both axes are products, so the
    axes are averaged one after the other. A ``size`` axis is left as it is.
    """
    for axis in (x.ndim - 3, x.ndim - 2):
        n = x.shape[axis]
        if n == size:
            continue
        cells = [
            jnp.mean(
                jax.lax.slice_in_dim(x, i * n // size, -(-(i + 1) * n // size), axis=axis),
                axis=axis,
                keepdims=True,
            )
            for i in range(size)
        ]
        x = jnp.concatenate(cells, axis=axis)
    return x


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int) -> jax.Array:
    """B x H x W x Cin (*) kh x kw x Cin x Cout, zero padding on every side."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def convolve_towers(
    x: jax.Array,
    kernel_T: jax.Array,
    bias_T: jax.Array,
    *,
    stride: int,
    padding: int,
    shared_input: bool,
) -> jax.Array:
    """Tower t convolves ``x`` (``shared_input``) or its own ``x[t]`` with ``kernel_T[t]``.

    Returns T x B x H' x W' x Cout, T = the number of towers in ``kernel_T``.
    """
    outputs = []
    for t in range(kernel_T.shape[0]):
        inputs = x if shared_input else x[t]
        outputs.append(conv2d(inputs, kernel_T[t], stride=stride, padding=padding) + bias_T[t])
    return jnp.stack(outputs)


def whole_batch(
    conv_layers: Callable[[jax.Array], jax.Array], images: jax.Array, data_shards: int
) -> jax.Array:
    """Runs the conv layers on the whole batch at once."""
    del data_shards
    return conv_layers(images)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How the model computes its operations: same values, backend-specific speed.

    The defaults are the plain forms above under autodiff. ``alexnet_jax/tuning.py``
    chooses faster schedules of the same values per backend.
    """

    lrn: Callable[..., jax.Array] = local_response_norm  # (x, **lrn_constants(convention))
    max_pool: Callable[[jax.Array], jax.Array] = max_pool_3x3_s2
    convolve_towers: Callable[..., jax.Array] = convolve_towers
    # (conv_layers, images B x H x W x C, data shards) -> B x D.
    conv_layers: Callable[[Callable[[jax.Array], jax.Array], jax.Array, int], jax.Array] = (
        whole_batch
    )


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
    kernels: Kernels = Kernels()
    towers: int = NUM_TOWERS

    @nn.compact
    def __call__(self, x: jax.Array, *, shared_input: bool) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.init.kernel, (self.towers, k, k, x.shape[-1], self.features)
        )
        bias = self.param(
            "bias", nn.initializers.constant(self.init.bias_value), (self.towers, self.features)
        )
        kernel, bias, x = (a.astype(self.dtype) for a in (kernel, bias, x))
        convolve = functools.partial(
            self.kernels.convolve_towers,
            stride=self.stride,
            padding=self.padding,
            shared_input=shared_input,
        )
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
    towers: int = NUM_TOWERS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.init.kernel, (self.towers, x.shape[-1], self.features))
        bias = self.param(
            "bias", nn.initializers.constant(self.init.bias_value), (self.towers, self.features)
        )
        kernel, bias, x = (a.astype(self.dtype) for a in (kernel, bias, x))

        def dense(x, kernel, bias):  # One matmul per tower's neurons.
            per_tower = [x @ kernel[t] for t in range(kernel.shape[0])]
            return jnp.stack(per_tower) + bias[:, None, :]

        return sharding.tower_map(dense, self.mesh, shared_input=True)(x, kernel, bias)


def merge_towers(x_T: jax.Array) -> jax.Array:
    """T x B x ... x C -> B x ... x (T*C): tower 0's channels first."""
    return jnp.concatenate(list(x_T), axis=-1)


def split_towers(x: jax.Array, towers: int) -> jax.Array:
    """B x ... x (T*C) -> T x B x ... x C, the inverse of ``merge_towers``."""
    return jnp.moveaxis(x.reshape(*x.shape[:-1], towers, -1), -2, 0)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What tells one published AlexNet from another; the layers themselves are shared.

    Kernel sizes (11, 5, 3, 3, 3), strides (4, 1, 1, 1, 1), the padding of
    conv2-conv5 (2, 1, 1, 1), 3x3/2 max-pooling after conv1, conv2 and conv5,
    and the fc layers' 4096/4096/classes are common to all of them.
    """

    towers: int  # 2: the paper's GPUs (Caffe's group: 2 on conv2, conv4, conv5); 1: one net.
    conv_features: tuple[int, int, int, int, int]  # conv1..conv5, both towers together.
    conv1_padding: int  # 2: a 224 crop gives 55x55 maps; Caffe crops 227 and pads none.
    lrn: str  # After conv1's and conv2's ReLU: "before_pool", "after_pool" or "none".
    lrn_across_towers: bool  # Caffe normalizes both groups' maps as one; the paper per GPU.
    lrn_convention: str  # The LRN constants (LRN_CONVENTIONS) when model.lrn_convention="auto".
    average_pool: bool  # torchvision: adaptive average pool of pool5 to 6x6.
    dropout_before_fc: bool  # torchvision drops fc6's and fc7's inputs; the paper their outputs.
    fc_features: int = 4096  # fc6 and fc7, both towers together.


_TWO_TOWERS = (96, 256, 384, 384, 256)
VARIANTS: dict[str, Variant] = {
    "paper": Variant(2, _TWO_TOWERS, 2, "before_pool", False, "paper", False, False),
    # One tower ("one weird trick", Krizhevsky 2014), as torchvision.models.alexnet.
    "torchvision": Variant(1, (64, 192, 384, 256, 256), 2, "none", False, "paper", True, True),
    # Caffe's models/bvlc_alexnet: the paper's layers at a 227 crop; norm1 before pool1.
    "bvlc_alexnet": Variant(2, _TWO_TOWERS, 0, "before_pool", True, "caffe", False, False),
    # Caffe's models/bvlc_reference_caffenet: the same with pooling before normalization.
    "caffenet": Variant(2, _TWO_TOWERS, 0, "after_pool", True, "caffe", False, False),
}
AVERAGE_POOL_SIZE = 6  # torchvision's pool5 -> 6x6 whatever the input size.


def scaled(channels: int, width: float) -> int:
    """Channels of a layer at a width multiplier; never below 1."""
    return max(1, int(round(channels * width)))


class AlexNet(nn.Module):
    """AlexNet as in the paper's Fig. 2 (or another ``variant``), at an optional width multiplier.

    Returns logits ``B x num_classes``; with ``with_features=True`` returns
    ``(logits, fc7)`` where fc7 (B x 4096 at width 1) is the post-ReLU
    activation the paper's Fig. 4 compares. ``mesh`` (a ('data', 'tower')
    mesh) places each tower on its own devices; ``kernels`` chooses how the
    operations are computed (``alexnet_jax/tuning.py``). Neither changes the
    parameters or the values computed.
    """

    num_classes: int = 1000
    width: float = 1.0
    dropout_rate: float = 0.5
    init_scheme: str = "paper"
    use_lrn: bool = True  # LRN where the variant has it.
    variant: str = "paper"  # A key of VARIANTS.
    lrn_convention: str = "auto"  # "auto" (the variant's) or one of LRN_CONVENTIONS.
    compute_dtype: str = "float32"  # Of matmuls and convs; the parameters stay float32.
    mesh: Mesh | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(
        self, images_BxHxWxC: jax.Array, *, train: bool, with_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"model.variant must be one of {tuple(VARIANTS)}, got {self.variant!r}"
            )
        v = VARIANTS[self.variant]
        inits = layer_inits(self.init_scheme)
        dtype = jnp.dtype(self.compute_dtype)
        w, towers = self.width, v.towers
        conv = lambda name, c, k, s, p: TowerConv(  # noqa: E731
            scaled(c // towers, w), k, s, p, inits[name], dtype, self.mesh, self.kernels, towers,
            name=name,
        )  # fmt: skip
        dense = lambda name: TowerDense(  # noqa: E731
            scaled(v.fc_features // towers, w), inits[name], dtype, self.mesh, towers, name=name
        )
        # The towers' only exchange: every tower device gets all towers' maps.
        merge = lambda x_T: merge_towers(sharding.all_towers(x_T, self.mesh))  # noqa: E731
        convention = v.lrn_convention if self.lrn_convention == "auto" else self.lrn_convention
        normalize = functools.partial(self.kernels.lrn, **lrn_constants(convention))
        if v.lrn_across_towers:  # One normalization over all towers' maps, then split again.
            lrn = lambda x_T: split_towers(normalize(merge(x_T)), towers)  # noqa: E731
        else:
            lrn = normalize
        # Pools T x B x H x W x C directly: folding T into B would merge a replicated axis
        # with a data-sharded one, which forces an all-gather of the batch.
        pool = self.kernels.max_pool
        order = v.lrn if self.use_lrn else "none"

        def normalize_and_pool(x):
            if order == "before_pool":
                return pool(lrn(x))
            if order == "after_pool":
                return lrn(pool(x))
            return pool(x)

        # Defined once, so that every call of conv_layers uses the same parameters.
        c1, c2, c3, c4, c5 = v.conv_features
        conv1, conv2 = conv("conv1", c1, 11, 4, v.conv1_padding), conv("conv2", c2, 5, 1, 2)
        conv3, conv4 = conv("conv3", c3, 3, 1, 1), conv("conv4", c4, 3, 1, 1)
        conv5 = conv("conv5", c5, 3, 1, 1)

        def conv_layers(x):
            x = nn.relu(conv1(x, shared_input=True))  # T,B,55,55,48
            x = normalize_and_pool(x)  # T,B,27,27,48
            x = nn.relu(conv2(x, shared_input=False))  # T,B,27,27,128
            x = normalize_and_pool(x)  # T,B,13,13,128
            x = nn.relu(conv3(merge(x), shared_input=True))
            x = nn.relu(conv4(x, shared_input=False))
            x = nn.relu(conv5(x, shared_input=False))
            x = pool(x)  # T,B,6,6,128
            if v.average_pool:
                x = adaptive_average_pool(x, AVERAGE_POOL_SIZE)
            return merge(x).reshape(x.shape[1], -1)  # B, 6*6*256

        data_shards = 1 if self.mesh is None else self.mesh.shape[sharding.DATA_AXIS]
        x = self.kernels.conv_layers(conv_layers, images_BxHxWxC.astype(dtype), data_shards)

        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        if v.dropout_before_fc:
            x = dropout(x)
        x = dropout(nn.relu(dense("fc6")(x)))
        x = merge(x)
        x = nn.relu(dense("fc7")(x))
        if not v.dropout_before_fc:
            x = dropout(x)
        fc7 = merge(x)
        logits = nn.Dense(
            self.num_classes,
            kernel_init=inits["fc8"].kernel,
            bias_init=nn.initializers.constant(inits["fc8"].bias_value),
            dtype=dtype,
            name="fc8",
        )(fc7)
        logits = logits.astype(jnp.float32)
        if with_features:
            return logits, fc7.astype(jnp.float32)
        return logits


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))
