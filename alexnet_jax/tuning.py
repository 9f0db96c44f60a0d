"""Platform-specific performance choices, selected by backend here and nowhere else.

``model.py`` computes the paper's operations the plain way (autodiff
gradients, whole-batch convolutions, one convolution per tower). On XLA:CPU
some of those plain forms are slow, so this module holds faster schedules of
the *same values*, and picks them per backend:

* ``kernels(backend, ...)``: the ``model.Kernels`` a model runs with. On CPU:
  LRN and max-pool with hand-written gradients, conv1-pool5 on chunks of the
  batch, shared-input towers as one side-by-side convolution. On GPU and TPU:
  the plain forms, until a measurement there says otherwise (run
  ``python -m alexnet_jax.benchmarks.train_step --kernels=cpu`` against
  ``--kernels=plain`` on the accelerator and change ``KERNELS_BY_BACKEND``).
* ``KernelOptions``: further forms of single operations for accelerators
  (LRN in the compute dtype, max-pool as strided slices, the towers as one
  grouped convolution, conv1's RGB padded to 4 or 8 channels), applied on
  top of the schedule; ``KERNEL_OPTIONS_BY_BACKEND`` picks them per backend
  and today picks none anywhere (``benchmarks/kernel_choices.py`` measures
  them on a GPU; see docs/gpu-train-step.md).
* ``configure_process()``: the process-level settings, made once before JAX
  starts its backends: which library runs XLA:CPU's convolutions (through
  ``XLA_FLAGS``, so every jit in the process compiles the same way) and which
  host malloc the process should run with.
* ``finish_augmentation_on_device`` and ``input_workers``: where the input's
  float work runs and how many processes decode it, for ``config.data``'s
  "auto" settings.

Tests hold every schedule here equal to the plain one (values and gradients);
the README's performance section holds the measurements behind each choice.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from alexnet_jax import errors, model

# --- Process-level settings (environment variables, read once per process) ---

# Which library runs XLA:CPU's convolutions: "eigen" (XLA's own) or "ynnpack" (XLA's default
# on jaxlib 0.10-0.12). Matmuls and reductions stay with YNNPACK either way.
CPU_CONVS_ENV = "ALEXNET_JAX_CPU_CONVS"
CPU_CONV_LIBRARIES = ("eigen", "ynnpack")
DEFAULT_CPU_CONV_LIBRARY = "eigen"
# Host malloc: "auto" (mimalloc when the process computes on the CPU), "mimalloc" or "system".
HOST_ALLOCATOR_ENV = "ALEXNET_JAX_HOST_ALLOCATOR"
HOST_ALLOCATORS = ("auto", "mimalloc", "system")

# The XLA:CPU debug option that lists the op kinds YNNPACK takes over. It is experimental:
# it is set only for jaxlib releases it was tested with (an unknown flag in XLA_FLAGS
# aborts the process).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_FUSION_TYPES = {
    "eigen": ("INDIVIDUAL_DOT", "REDUCE"),
    "ynnpack": ("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "REDUCE"),
}
YNN_FLAG_TESTED_JAXLIB = ((0, 10), (0, 12))  # Oldest and newest (major, minor) tested.

# Packages that give JAX a non-CPU default backend.
_ACCELERATOR_PLUGIN_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


class SettingError(errors.UsageError, ValueError):
    """A process-level setting (environment variable) has a value outside its choices."""


def _choice(environ: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = environ.get(name, "") or default
    if value not in choices:
        raise SettingError(f"{name}={value!r}; accepted: one of {choices} (unset: {default!r})")
    return value


def ynn_fusion_flag(library: str) -> str:
    """The XLA_FLAGS entry that puts XLA:CPU's convolutions in ``library``."""
    kinds = _YNN_FUSION_TYPES[library]
    return f"{YNN_FUSION_FLAG}=" + ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds)


def cpu_conv_library(environ: Mapping[str, str] = os.environ) -> str:
    """The library that runs XLA:CPU's convolutions in a process with this environment."""
    for entry in environ.get("XLA_FLAGS", "").split():
        if entry.startswith(YNN_FUSION_FLAG + "="):
            return "ynnpack" if "INDIVIDUAL_CONVOLUTION" in entry else "eigen"
    return "ynnpack"  # XLA's default on the jaxlib releases this project supports.


def _jaxlib_version() -> tuple[int, int]:
    import jaxlib

    major, minor = jaxlib.__version__.split(".")[:2]
    return int(major), int(minor)


def _backends_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def configure_process(environ: MutableMapping[str, str] = os.environ) -> None:
    """Applies the process-level settings; call before the first JAX computation.

    Puts XLA:CPU's convolutions in ``$ALEXNET_JAX_CPU_CONVS`` (default eigen)
    by adding the flag to ``XLA_FLAGS``, unless ``XLA_FLAGS`` already chooses.
    Raises ``SettingError`` naming the variable for a value outside its choices.
    """
    library = _choice(environ, CPU_CONVS_ENV, CPU_CONV_LIBRARIES, DEFAULT_CPU_CONV_LIBRARY)
    _choice(environ, HOST_ALLOCATOR_ENV, HOST_ALLOCATORS, "auto")
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG + "=" in flags:
        return  # An explicit XLA flag wins.
    oldest, newest = YNN_FLAG_TESTED_JAXLIB
    if not oldest <= _jaxlib_version() <= newest:
        logging.warning(
            "jaxlib %s is outside the releases %s=%s was tested with; XLA's default CPU "
            "convolutions run.",
            ".".join(map(str, _jaxlib_version())),
            CPU_CONVS_ENV,
            library,
        )
        return
    if _backends_started():
        logging.warning(
            "configure_process() ran after JAX started its backends: %s=%s takes effect "
            "only in a new process.",
            CPU_CONVS_ENV,
            library,
        )
        return
    environ["XLA_FLAGS"] = f"{flags} {ynn_fusion_flag(library)}".strip()


def host_allocator(environ: Mapping[str, str] = os.environ) -> str:
    """The malloc this process should run with: "mimalloc" or "system".

    "auto" (the default) picks mimalloc when the process computes on the CPU
    (XLA:CPU frees and re-allocates each step's buffers, which glibc maps
    afresh from the OS every time); with an accelerator the host's malloc is
    off the step's path, so the system's is kept.
    """
    choice = _choice(environ, HOST_ALLOCATOR_ENV, HOST_ALLOCATORS, "auto")
    if choice != "auto":
        return choice
    return "mimalloc" if _computes_on_cpu(environ) else "system"


def _computes_on_cpu(environ: Mapping[str, str]) -> bool:
    """Whether JAX's default backend will be the CPU (decided without starting JAX)."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().startswith(_ACCELERATOR_PLUGIN_PREFIXES) for n in names)


# --- CPU schedules of the paper's operations (same values as model.py's) ---


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lrn_fused(x: jax.Array, params: tuple[int, float, float, float]) -> jax.Array:
    return x * _lrn_scale(x, *params)[0]


def _lrn_scale(x, radius, bias, alpha, beta) -> tuple[jax.Array, jax.Array]:
    """(d ** -beta, d) with d = bias + alpha * (window sum of x^2)."""
    denominator = bias + alpha * model.channel_window_sum(jnp.square(x), radius)
    if beta == 0.75:
        # d ** -0.75 as rsqrt(d) * sqrt(rsqrt(d)): avoids a general pow (log + exp).
        inv = jax.lax.rsqrt(denominator)
        return inv * jnp.sqrt(inv), denominator
    return denominator ** (-beta), denominator


def _lrn_fused_forward(x, params):
    # Only x is kept; the scale is recomputed in the backward pass (cheap, fused), which
    # saves storing two more activation-sized arrays.
    return _lrn_fused(x, params), x


def _lrn_fused_backward(params, x, g):
    """dx_j = g_j s_j - 2 alpha beta x_j * sum_{|c-j| <= radius} g_c x_c s_c / d_c.

    The exact gradient of ``x * s`` with s = d ** -beta, as two fused
    elementwise passes instead of autodiff's windowed reductions.
    """
    return (_lrn_gradient(params, x, g),)


def _lrn_gradient(params, x, g) -> jax.Array:
    """``_lrn_fused_backward``'s formula on arrays of one dtype."""
    radius, _, alpha, beta = params
    scale, denominator = _lrn_scale(x, *params)
    g_scaled = g * scale
    spread = model.channel_window_sum(g_scaled * x / denominator, radius)
    return g_scaled - (2 * alpha * beta) * x * spread


_lrn_fused.defvjp(_lrn_fused_forward, _lrn_fused_backward)


def lrn_fused_gradient(
    x: jax.Array,
    *,
    depth_radius: int = model.LRN_DEPTH_RADIUS,
    bias: float = model.LRN_BIAS,
    alpha: float = model.LRN_ALPHA,
    beta: float = model.LRN_BETA,
) -> jax.Array:
    """``model.local_response_norm`` (the same constants) with a hand-written gradient."""
    params = (depth_radius, bias, alpha, beta)
    return _lrn_fused(x.astype(jnp.float32), params).astype(x.dtype)


def _max3_stride2(x: jax.Array, axis: int) -> jax.Array:
    """Max over windows of 3 with stride 2 along one axis."""
    window, strides = [1] * x.ndim, [1] * x.ndim
    window[axis], strides[axis] = 3, 2
    return jax.lax.reduce_window(
        x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, window, strides, "VALID"
    )


@jax.custom_vjp
def max_pool_sliced(x: jax.Array) -> jax.Array:
    """``model.max_pool_3x3_s2`` as strided-slice maxima, with a two-pass gradient.

    Forward only (eval): the maxima of 3 strided row slices, then of 3 column
    slices. Under differentiation the forward is reduce_window instead: XLA
    fuses the slices with their producer (LRN) and recomputes it.
    """
    for axis in (x.ndim - 3, x.ndim - 2):
        out = (x.shape[axis] - 3) // 2 + 1
        slices = [jax.lax.slice_in_dim(x, i, i + 2 * (out - 1) + 1, 2, axis) for i in range(3)]
        x = jnp.maximum(jnp.maximum(slices[0], slices[1]), slices[2])
    return x


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

    Autodiff's select-and-scatter rule (row-major window order, first maximum
    wins ties): the first maximum lies in the window's first row whose maximum
    is the window's, at that row's first maximum. So the gradient goes through
    the 3 rows, then within the row through its 3 columns: 2 x 3 masked
    scatters instead of the 9 of the 2-d window.
    """
    x, row_maxima, y = residuals
    g_rows = _route_to_first_max(row_maxima, y, g, x.ndim - 3)
    return (_route_to_first_max(x, row_maxima, g_rows, x.ndim - 2),)


max_pool_sliced.defvjp(_max_pool_forward, _max_pool_backward)


@dataclasses.dataclass(frozen=True)
class SideBySideConv:
    """``model.convolve_towers`` with shared-input towers as one convolution.

    When every tower reads the same input (conv1, conv3), the towers' kernels
    side by side give the same sums per output channel in one convolution.
    Used from ``min_features`` outputs on (some CPU libraries pick a slow
    kernel for narrow ones); below that, and for tower-own inputs, one
    convolution per tower.
    """

    min_features: int = 0

    def __call__(
        self, x: jax.Array, kernel_T: jax.Array, bias_T: jax.Array, *, stride: int,
        padding: int, shared_input: bool,
    ) -> jax.Array:  # fmt: skip
        towers, features = kernel_T.shape[0], kernel_T.shape[-1]
        if not shared_input or towers * features < self.min_features:
            return model.convolve_towers(
                x, kernel_T, bias_T, stride=stride, padding=padding, shared_input=shared_input
            )
        side_by_side = jnp.moveaxis(kernel_T, 0, -2).reshape(*kernel_T.shape[1:-1], -1)
        y = model.conv2d(x, side_by_side, stride=stride, padding=padding)
        y = jnp.moveaxis(y.reshape(*y.shape[:-1], towers, features), -2, 0)
        return y + bias_T[:, None, None, None, :]


def conv_batch_chunks(local_batch: int, chunk_size: int) -> int:
    """How many chunks a data shard's ``local_batch`` examples are split into.

    The most chunks that divide the batch evenly with at least ``chunk_size``
    examples each; 1 (the whole batch) when ``chunk_size`` is 0 or the batch
    is too small to split.
    """
    if chunk_size <= 0 or local_batch < 2 * chunk_size:
        return 1
    return max(n for n in range(1, local_batch // chunk_size + 1) if local_batch % n == 0)


@dataclasses.dataclass(frozen=True)
class InChunks:
    """Runs the conv layers on chunks of about ``size`` examples per data shard.

    The same sums per example; on CPU a chunk's feature maps stay in cache.
    Example b = i * chunks + j goes to chunk j, so every chunk takes an equal
    share of each data shard (the leading i axis) and no example changes device.
    """

    size: int

    def __call__(
        self, conv_layers: Callable[[jax.Array], jax.Array], images: jax.Array, data_shards: int
    ) -> jax.Array:
        batch = images.shape[0]
        chunks = conv_batch_chunks(batch // data_shards, self.size)
        if chunks == 1:
            return conv_layers(images)
        x = images.reshape(batch // chunks, chunks, *images.shape[1:])
        x = jnp.stack([conv_layers(x[:, j]) for j in range(chunks)], axis=1)
        return x.reshape(batch, -1)


# --- Accelerator options: more schedules of the same values, chosen per backend ---


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _lrn_low_precision(x: jax.Array, params: tuple[int, float, float, float]) -> jax.Array:
    wide = x.astype(jnp.float32)
    return (wide * _lrn_scale(wide, *params)[0]).astype(x.dtype)


def _lrn_low_precision_forward(x, params):
    # The residual is x in its own dtype: a bfloat16 step stores half the bytes of the
    # float32 forms, and the backward pass recomputes the scale from it.
    return _lrn_low_precision(x, params), x


def _lrn_low_precision_backward(params, x, g):
    wide = _lrn_gradient(params, x.astype(jnp.float32), g.astype(jnp.float32))
    return (wide.astype(x.dtype),)


_lrn_low_precision.defvjp(_lrn_low_precision_forward, _lrn_low_precision_backward)


def lrn_in_compute_dtype(
    x: jax.Array,
    *,
    depth_radius: int = model.LRN_DEPTH_RADIUS,
    bias: float = model.LRN_BIAS,
    alpha: float = model.LRN_ALPHA,
    beta: float = model.LRN_BETA,
) -> jax.Array:
    """``model.local_response_norm`` reading, storing and returning ``x``'s dtype.

    Squares, window sums and the scale are float32 inside one elementwise
    pass (so XLA can fuse it with the ReLU before and the pool after), and
    only the result is rounded, as the plain form rounds it. The gradient is
    ``lrn_fused_gradient``'s formula, also float32 inside; the pass keeps
    nothing but ``x`` for it. With float32 compute it is that schedule.
    """
    return _lrn_low_precision(x, (depth_radius, bias, alpha, beta))


def _conv_grouped(
    x: jax.Array, kernel: jax.Array, *, stride: int, padding: int, groups: int
) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


@dataclasses.dataclass(frozen=True)
class GroupedConv:
    """``model.convolve_towers`` as one convolution for all towers.

    Tower-own inputs (conv2, conv4, conv5) become one grouped convolution
    (``feature_group_count`` = towers) on the towers' maps side by side in
    the channel axis; shared inputs (conv1, conv3) one convolution with the
    towers' kernels side by side. Output channel t * F + f is tower t's f-th.
    """

    def __call__(
        self, x: jax.Array, kernel_T: jax.Array, bias_T: jax.Array, *, stride: int,
        padding: int, shared_input: bool,
    ) -> jax.Array:  # fmt: skip
        towers, features = kernel_T.shape[0], kernel_T.shape[-1]
        side_by_side = jnp.moveaxis(kernel_T, 0, -2).reshape(*kernel_T.shape[1:-1], -1)
        if shared_input:
            inputs, groups = x, 1
        else:  # T x B x H x W x C -> B x H x W x (T*C), tower 0's channels first.
            inputs = jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], towers * x.shape[-1])
            groups = towers
        y = _conv_grouped(inputs, side_by_side, stride=stride, padding=padding, groups=groups)
        return model.split_towers(y + bias_T.reshape(towers * features), towers)


@dataclasses.dataclass(frozen=True)
class PaddedInputChannels:
    """``convolve`` with each tower's input channels zero-padded to a multiple of ``multiple``.

    The kernels get zero rows for the new channels, so every sum gains only
    zero products: conv1's 3 RGB channels become 4 or 8, the counts GPU
    convolution kernels are built for. Inputs already at a multiple pass as they are.
    """

    multiple: int
    convolve: Callable[..., jax.Array] = model.convolve_towers

    def __call__(
        self, x: jax.Array, kernel_T: jax.Array, bias_T: jax.Array, *, stride: int,
        padding: int, shared_input: bool,
    ) -> jax.Array:  # fmt: skip
        extra = -x.shape[-1] % self.multiple
        if extra:
            x = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))
            kernel_T = jnp.pad(kernel_T, ((0, 0),) * 3 + ((0, extra), (0, 0)))
        return self.convolve(
            x, kernel_T, bias_T, stride=stride, padding=padding, shared_input=shared_input
        )


# Each option's accepted values; the first is "keep what the schedule (--kernels) computes".
KERNEL_OPTION_VALUES: Mapping[str, tuple] = {
    "lrn": ("schedule", "compute_dtype"),  # compute_dtype: lrn_in_compute_dtype.
    "max_pool": ("schedule", "sliced"),  # sliced: max_pool_sliced (the CPU's) anywhere.
    "tower_convs": ("schedule", "grouped"),  # grouped: GroupedConv.
    "pad_input_channels": (0, 4, 8),  # > 0: PaddedInputChannels(multiple=N).
}


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Choices on top of a backend's schedule; the defaults change nothing.

    Each replaces one operation's form with another of the same values
    (tests hold each equal to the plain form). They exist for accelerators,
    where each is kept only once measured faster there
    (``KERNEL_OPTIONS_BY_BACKEND``; ``alexnet_jax/benchmarks/kernel_choices.py``
    times them against each other).
    """

    lrn: str = "schedule"
    max_pool: str = "schedule"
    tower_convs: str = "schedule"
    pad_input_channels: int = 0

    def __post_init__(self):
        for name, accepted in KERNEL_OPTION_VALUES.items():
            if getattr(self, name) not in accepted:
                raise SettingError(
                    f"kernel option {name}={getattr(self, name)!r}; accepted: one of {accepted}"
                )

    def describe(self) -> str:
        """``parse_kernel_options``'s text for these options ("" when all are defaults)."""
        default = KernelOptions()
        return ",".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        )


def parse_kernel_options(text: str) -> KernelOptions:
    """``"lrn=compute_dtype,tower_convs=grouped,pad_input_channels=8"`` -> KernelOptions.

    "" gives the defaults; unnamed fields keep theirs. Raises SettingError
    naming the option and its accepted values.
    """
    fields: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in KERNEL_OPTION_VALUES:
            raise SettingError(
                f"kernel option {item!r}; accepted: NAME=VALUE with NAME one of "
                f"{tuple(KERNEL_OPTION_VALUES)}, e.g. lrn=compute_dtype,pad_input_channels=8"
            )
        numeric = isinstance(KERNEL_OPTION_VALUES[name][0], int)
        fields[name] = int(value) if numeric and value.lstrip("-").isdigit() else value
    return KernelOptions(**fields)


def with_options(kernels: model.Kernels, options: KernelOptions) -> model.Kernels:
    """``kernels`` with ``options`` applied (the same object when they change nothing)."""
    changes: dict[str, Any] = {}
    if options.lrn == "compute_dtype":
        changes["lrn"] = lrn_in_compute_dtype
    if options.max_pool == "sliced":
        changes["max_pool"] = max_pool_sliced
    convolve = kernels.convolve_towers
    if options.tower_convs == "grouped":
        convolve = GroupedConv()
    if options.pad_input_channels:
        convolve = PaddedInputChannels(options.pad_input_channels, convolve)
    if convolve != kernels.convolve_towers:
        changes["convolve_towers"] = convolve
    return dataclasses.replace(kernels, **changes) if changes else kernels


# The options each backend runs with; a backend not listed runs KernelOptions() (no change).
# GPU: every option is unmeasured on a GPU yet, so today's forms; the GPU script
# (alexnet_jax/benchmarks/gpu_train_step.sh, docs/gpu-train-step.md) times each one and an
# option measured faster goes here.
KERNEL_OPTIONS_BY_BACKEND: Mapping[str, KernelOptions] = {"gpu": KernelOptions()}


def backend_options(backend: str | None = None) -> KernelOptions:
    """The kernel options ``backend`` (default: JAX's default backend) runs with."""
    return KERNEL_OPTIONS_BY_BACKEND.get(backend or jax.default_backend(), KernelOptions())


# conv1-pool5 on chunks of this many examples per data shard when model.conv_chunk_size
# is auto (-1) on CPU.
CPU_CONV_CHUNK_SIZE = 8

# Shared-input towers run side by side from this many outputs, per CPU convolution library:
# YNNPACK picks a slow kernel for the quarter-width net's 24-output conv1.
SIDE_BY_SIDE_MIN_FEATURES = {"eigen": 0, "ynnpack": 48}

KERNEL_CHOICES = ("auto", "plain", "cpu")


def _conv_layers(chunk_size: int) -> Callable[..., jax.Array]:
    return InChunks(chunk_size) if chunk_size > 0 else model.whole_batch


def cpu_kernels(conv_library: str, conv_chunk_size: int) -> model.Kernels:
    """The CPU schedules: fused LRN gradient, sliced max-pool, side-by-side convs, chunks."""
    return model.Kernels(
        lrn=lrn_fused_gradient,
        max_pool=max_pool_sliced,
        convolve_towers=SideBySideConv(SIDE_BY_SIDE_MIN_FEATURES[conv_library]),
        conv_layers=_conv_layers(conv_chunk_size),
    )


def plain_kernels(conv_chunk_size: int) -> model.Kernels:
    """model.py's plain forms (GPU, TPU), on chunks only when asked for explicitly."""
    return model.Kernels(conv_layers=_conv_layers(conv_chunk_size))


KERNELS_BY_BACKEND = {"cpu": "cpu"}  # Backends not listed run the plain forms.


def kernels(
    backend: str | None = None,
    *,
    conv_chunk_size: int = -1,
    choice: str = "auto",
    options: KernelOptions | None = None,
) -> model.Kernels:
    """The kernels for ``backend`` (default: JAX's default backend).

    ``conv_chunk_size`` is ``config.model.conv_chunk_size`` (-1: the backend's
    choice, 8 on CPU and whole batches elsewhere). ``choice`` forces "plain"
    or "cpu" schedules (benchmarks that measure one against the other).
    ``options`` replaces the backend's ``KERNEL_OPTIONS_BY_BACKEND`` entry.
    """
    if choice not in KERNEL_CHOICES:
        raise SettingError(f"kernels = {choice!r}; accepted: one of {KERNEL_CHOICES}")
    backend = backend or jax.default_backend()
    if options is None:
        options = backend_options(backend)
    if choice == "auto":
        choice = KERNELS_BY_BACKEND.get(backend, "plain")
    if choice == "cpu":
        chunk = CPU_CONV_CHUNK_SIZE if conv_chunk_size == -1 else conv_chunk_size
        return with_options(cpu_kernels(cpu_conv_library(), chunk), options)
    return with_options(plain_kernels(max(conv_chunk_size, 0)), options)


def finish_augmentation_on_device(setting: str, backend: str | None = None) -> bool:
    """``config.data.augment_on`` for this backend: where the augmentation's float work runs.

    "auto": on the accelerator for GPU and TPU, where the host would otherwise set
    the pace; on the host for CPU, where host and device are the same cores and the
    NumPy path (``augment.train_augment``) has been measured.
    """
    if setting == "auto":
        return (backend or jax.default_backend()) != "cpu"
    return setting == "device"


# Cores kept for the training process itself when workers decode (dispatch, transfers).
INPUT_CORES_KEPT = 1


def input_workers(setting: int, backend: str | None = None, cores: int | None = None) -> int:
    """``config.data.num_workers`` for this host: how many processes decode and crop.

    -1 ("auto"): none on CPU, where XLA's step needs the same cores and the
    in-process threads keep up with it; on GPU and TPU, one per core this
    process may use (``os.sched_getaffinity``) but ``INPUT_CORES_KEPT``, since
    per image the Python work holds the GIL and only processes scale with the
    cores. Any other value is taken as it is.
    """
    if setting >= 0:
        return setting
    if (backend or jax.default_backend()) == "cpu":
        return 0
    if cores is None:
        cores = usable_cores()
    return max(1, (cores or 1) - INPUT_CORES_KEPT)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def describe_kernels(kernels: model.Kernels) -> str:
    """One line naming each of ``kernels``' choices (function or schedule names)."""
    parts = []
    for field in dataclasses.fields(kernels):
        value = getattr(kernels, field.name)
        parts.append(f"{field.name}={getattr(value, '__name__', None) or value!r}")
    return ", ".join(parts)
