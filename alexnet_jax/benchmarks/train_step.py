"""Train-step speed of a config's network: JAX against PyTorch and against the chip's peak.

    python -m alexnet_jax.benchmarks.train_step          # configs/imagenet.py, batch 128 and 64
    python -m alexnet_jax.benchmarks.train_step --config=configs/imagenet.py \
        --config.model.width=0.25 --batch_sizes=128,64
    python -m alexnet_jax.benchmarks.train_step --config.model.compute_dtype=bfloat16
    python -m alexnet_jax.benchmarks.train_step --framework=torch --batch_sizes=128  # its own RSS

The network, its compute dtype, the optimizer and the mesh are the config's
(``--config`` plus ``--config.*`` overrides, as ``launch.py`` takes them), so
the step timed is the one that config trains; only ``batch_size`` is replaced
by each of ``--batch_sizes``. In one process it prints:
  * the host CPU and its bfloat16 instructions (AVX512-BF16, AMX), and the
    matmul peak XLA reaches here in the compute dtype;
  * per batch size: the trainer's jitted step (built as ``train.py`` builds it:
    mesh, ``inference.build_model``, ``optim.make_optimizer``, state donated)
    with compile time, images/s, GFLOP/s, fraction of the peak, and device
    memory where the backend reports it;
  * the same network in PyTorch (``torch_reference.py``), eager and under
    ``torch.compile`` (inductor), on JAX's chip: the CPU when JAX computes
    there, CUDA (channels_last, bfloat16 autocast or TF32) when JAX runs on a
    GPU; in alternating turns with the JAX step, and the ratios. Skipped with
    the reason when torch is not installed (``pip install -r
    requirements-bench.txt``), has no device on JAX's chip, or inductor fails;
  * memory: peak resident memory (``ru_maxrss``) and, on a GPU, device memory
    for both frameworks (JAX's ``peak_bytes_in_use``, torch's
    ``max_memory_allocated``, counted from each batch's build). The resident
    and JAX's device peaks are per process, so ``--framework=jax`` (or
    ``torch``, ``torch_compile``) times one framework alone and its peaks
    are that framework's;
  * eval throughput (centre crop, 10 crops) and a per-layer table (JAX only).

``--kernels`` and ``--kernel_options`` (``tuning.KernelOptions``) pick how
the JAX model computes; ``kernel_choices.py`` times several in one process.

The machine may be shared: each number is the median of ``--steps`` timed
calls, and A/B comparisons belong in one run. On a CPU the frameworks take
turns in one process, which puts them under the same load. On a GPU they can
too, but ``gpu_train_step.sh`` runs one framework per process: the device is
not shared, so turns cancel no drift, while device peaks are only a
framework's own in a process of its own (JAX's cannot be reset) and JAX
reserves most of the device's memory at start.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

import configs
from alexnet_jax import allocator, cli, config_lib, inference, tuning
from alexnet_jax.benchmarks import command, torch_reference
from alexnet_jax.flops import CHIP_PEAK_TFLOPS, chip_peak_tflops, forward_flops_per_image

IMAGE_SIZE = 224
DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "imagenet.py")
FRAMEWORKS = ("jax", "torch", "torch_compile")
# The learning-rate schedule is a function of the step; a nominal epoch length lets the
# step-based schedules build (their values do not change what a step costs).
NOMINAL_STEPS_PER_EPOCH = 1000
NOMINAL_TOTAL_STEPS = 100_000
# CPU flags (/proc/cpuinfo) that say how fast bfloat16 can be on this host.
CPU_BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def _median_seconds(fn: Callable[[], Any], steps: int) -> float:
    """Median wall time of ``steps`` calls of ``fn`` (which must block until done)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_features(cpuinfo: str) -> dict[str, Any]:
    """The CPU's model name and which of ``CPU_BF16_FLAGS`` it has, from /proc/cpuinfo text.

    bfloat16 on CPU is fast only with AVX512-BF16 or AMX; printing them says
    what a bfloat16 number on this host can mean.
    """
    model, cpu_flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not cpu_flags:
            cpu_flags = set(value.split())
    return {"model": model, "flags": {f: f in cpu_flags for f in CPU_BF16_FLAGS}}


def host_cpu() -> dict[str, Any]:
    """``cpu_features`` of this host (empty flags where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_features(f.read())
    except OSError:
        return {"model": platform.processor(), "flags": {}}


def matmul_peak_gflops(size: int, steps: int, dtype: str = "float32") -> float:
    """GFLOP/s of a ``size x size`` matmul in ``dtype`` under XLA: the best of ``steps`` calls."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(max(steps, 3)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def selected_frameworks(
    framework: str, *, skip_torch: bool = False, skip_torch_compile: bool = False
) -> tuple[str, ...]:
    """What to time: ``framework`` alone (its own peak memory) or "all", less the skipped."""
    if framework != "all" and framework not in FRAMEWORKS:
        raise ValueError(f"framework {framework!r} is not 'all' or one of {FRAMEWORKS}")
    chosen = FRAMEWORKS if framework == "all" else (framework,)
    skipped = {"torch": skip_torch, "torch_compile": skip_torch_compile}
    chosen = tuple(f for f in chosen if not skipped.get(f, False))
    if not chosen:
        raise ValueError(f"--framework={framework} with its skip flag leaves nothing to time")
    return chosen


def with_batch_size(
    config: ml_collections.ConfigDict, batch_size: int
) -> ml_collections.ConfigDict:
    """A copy of ``config`` training at ``batch_size`` (the config itself is left alone)."""
    copy = config.copy_and_resolve_references()
    copy.batch_size = batch_size
    return copy


def build_model(
    config: ml_collections.ConfigDict,
    kernels: str = "auto",
    mesh: Any = None,
    options: tuning.KernelOptions | None = None,
):
    """``inference.build_model(config, mesh)`` with the ``kernels`` choice and kernel ``options``.

    ``tuning.kernels``' arguments: None ``options`` are the backend's own.
    """
    chosen = tuning.kernels(
        conv_chunk_size=config.model.conv_chunk_size, choice=kernels, options=options
    )
    return inference.build_model(config, mesh).clone(kernels=chosen)


def random_batch(
    batch_size: int, num_classes: int, seed: int = 0, dtype: str = "float32"
) -> dict[str, Any]:
    """Images and labels shaped (and typed, ``config.data.dtype``) as the pipeline yields them."""
    import numpy as np

    from alexnet_jax.data import pipeline

    rng = np.random.default_rng(seed)
    images = rng.normal(0, 50, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return {
        "images": images.astype(pipeline.numpy_dtype(dtype)),
        "labels": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


@dataclasses.dataclass
class JaxStep:
    """The trainer's compiled step with its own state, a fixed batch and what XLA says of it."""

    compiled: Any
    state: Any
    batch: dict[str, Any]
    mesh: Any
    compile_s: float
    xla_flops: float
    memory: Any  # XLA's CompiledMemoryStats of the step.

    def dispatch(self, batch: dict[str, Any]) -> Any:
        """Starts one step on ``batch`` (a global batch) and returns its metrics, unfetched."""
        self.state, step_metrics = self.compiled(self.state, batch)
        return step_metrics

    def __call__(self) -> None:
        """One step on the fixed batch, run to completion."""
        import jax

        jax.block_until_ready(self.dispatch(self.batch))


def jax_train_step(
    config: ml_collections.ConfigDict,
    kernels: str = "auto",
    options: tuning.KernelOptions | None = None,
) -> JaxStep:
    """The project's train step for ``config``, set up as ``train.train_and_evaluate`` does.

    The mesh from ``config.mesh_shape``, the model from ``inference.build_model``,
    the optimizer and schedule from ``optim``, the state initialized under jit with
    the trainer's shardings and donated to ``train.jit_train_step``.
    """
    import jax

    from alexnet_jax import optim, sharding, train

    mesh = sharding.make_mesh(config.mesh_shape)
    model = build_model(config, kernels, mesh, options)
    optimizer = optim.make_optimizer(config.optim)
    learning_rate_fn = optim.learning_rate_schedule(
        config.optim,
        batch_size=config.batch_size,
        steps_per_epoch=NOMINAL_STEPS_PER_EPOCH,
        total_steps=NOMINAL_TOTAL_STEPS,
    )
    init_fn = functools.partial(train.init_state, model, optimizer, config.seed)
    state_shardings = sharding.state_shardings(mesh, jax.eval_shape(init_fn))
    step_fn = train.jit_train_step(
        model,
        optimizer,
        learning_rate_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    local = random_batch(config.batch_size, config.model.num_classes, dtype=config.data.dtype)
    batch = sharding.global_batch(mesh, local)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    return JaxStep(
        compiled=compiled,
        state=state,
        batch=batch,
        mesh=mesh,
        compile_s=compile_s,
        xla_flops=_xla_flops(compiled),
        memory=compiled.memory_analysis(),
    )


def device_peak_mib() -> float | None:
    """Peak bytes in use on the first device so far (MiB); None where not reported (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def time_alternating(
    steps_by_name: dict[str, Callable[[], None]], steps: int, rounds: int = 3, warmup: int = 3
) -> dict[str, list]:
    """Wall times of ``steps`` calls of each function, in turns of consecutive calls.

    On a shared machine, load changes over time; taking turns puts the compared
    steps under the same load, so their ratio is fair. Each turn starts with an
    untimed call and then times consecutive calls, as a training loop runs them:
    the other framework's step in between would evict caches and let the
    allocator return the step's buffers to the OS. First, ``warmup`` untimed
    calls of each: the allocator's pool of step-sized buffers grows over the first
    few steps (a new 1.6 GB buffer, ~400k page faults, whenever the previous
    step's is not yet free), and a training run lives in the steady state after.
    """
    for one_step in steps_by_name.values():
        for _ in range(warmup):
            one_step()
    times: dict[str, list] = {name: [] for name in steps_by_name}
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    for count in per_round:
        for name, one_step in steps_by_name.items():
            one_step()
            for _ in range(count):
                start = time.perf_counter()
                one_step()
                times[name].append(time.perf_counter() - start)
    return times


def _xla_flops(compiled) -> float:
    """FLOPs of a compiled computation from XLA's cost analysis (0 when unavailable)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def time_eval(
    config, batch_size: int, steps: int, kernels: str = "auto", options=None
) -> dict[str, float]:
    """Images/s of the eval forward: centre crop, and 10 crops with softmax averaging."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax.data import augment

    model = build_model(config, kernels, options=options)
    jit = jax.jit
    params = jax.jit(
        lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False
        )["params"]
    )()

    @jit
    def centre(params, images_BxHxWxC):
        return jax.nn.softmax(model.apply({"params": params}, images_BxHxWxC, train=False))

    @jit
    def ten_crop(params, crops_BxNxHxWxC):
        b, n = crops_BxNxHxWxC.shape[:2]
        logits = model.apply(
            {"params": params},
            crops_BxNxHxWxC.reshape(b * n, *crops_BxNxHxWxC.shape[2:]),
            train=False,
        )
        return augment.average_crop_softmax(logits.reshape(b, n, -1))

    images = jnp.asarray(random_batch(batch_size, 2)["images"])
    # 10 crops per image: time ~batch_size crops per call, i.e. batch_size // 10 images.
    ten_images = max(1, batch_size // 10)
    first = np.asarray(images[:ten_images])
    crops = jnp.asarray(np.broadcast_to(first[:, None], (ten_images, 10, *first.shape[1:])))
    results = {}
    for name, fn, inputs, count in (
        ("centre", centre, images, batch_size),
        ("ten_crop", ten_crop, crops, ten_images),
    ):
        fn(params, inputs).block_until_ready()
        seconds = _median_seconds(
            lambda fn=fn, inputs=inputs: fn(params, inputs).block_until_ready(), steps
        )
        results[name] = count / seconds
    return results


def layer_table(
    config, batch_size: int, steps: int, kernels: str = "auto", options=None
) -> list[tuple[str, str, float, float]]:
    """(layer, output shape, forward ms, forward+backward ms) of each layer of the net.

    Layers with parameters are found by intercepting the model's own submodule
    calls, so the table follows ``model.py``; LRN and pooling are timed with the
    model's own kernels on the shapes where the network applies them.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    model = build_model(config, kernels, options=options)
    jit = jax.jit
    images = jnp.asarray(random_batch(batch_size, 2)["images"])
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images[:1])
    calls: list[tuple[str, nn.Module, tuple, dict, Any]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.name in variables["params"]:
            calls.append((module.name, module.clone(parent=None), args, kwargs, out))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)

    rows = []

    # With conv chunks, conv1-pool5 run once per chunk: time one chunk, count them all.
    repeats = collections.Counter(name for name, *_ in calls)
    first_calls: dict[str, tuple] = {}
    for call in calls:
        first_calls.setdefault(call[0], call)
    calls = list(first_calls.values())

    def time_row(name, fn, diff_args, const_args, out_shapes, repeat=1):
        """Times fn(*diff_args, *const_args) and its VJP w.r.t. diff_args (random cotangent)."""
        forward = jit(lambda d, c: fn(*d, *c))
        backward = jit(lambda d, c, ct: jax.vjp(lambda *dd: fn(*dd, *c), *d)[1](ct))
        cotangent = concrete(out_shapes, 7)
        jax.block_until_ready(forward(diff_args, const_args))
        fwd_s = _median_seconds(
            lambda: jax.block_until_ready(forward(diff_args, const_args)), steps
        )
        jax.block_until_ready(backward(diff_args, const_args, cotangent))
        both_s = _median_seconds(
            lambda: jax.block_until_ready(backward(diff_args, const_args, cotangent)), steps
        )
        shapes = " ".join("x".join(map(str, s.shape)) for s in jax.tree.leaves(out_shapes))
        if repeat > 1:
            name, shapes = f"{name} x{repeat}", f"{shapes} each"
        rows.append((name, shapes, repeat * fwd_s * 1e3, repeat * both_s * 1e3))

    def concrete(shape_tree, seed):
        key = jax.random.PRNGKey(seed)
        return jax.tree.map(lambda s: jax.random.normal(key, s.shape, s.dtype), shape_tree)

    after = {"conv1": "lrn1+pool1", "conv2": "lrn2+pool2", "conv5": "pool5"}
    for i, (name, module, args, kwargs, out) in enumerate(calls):
        params = variables["params"][name]
        inputs = concrete(args, i)

        def apply_layer(p, *xs, module=module, kwargs=kwargs):
            return module.apply({"params": p}, *xs, **kwargs)

        # conv1's input is the image batch: its gradient is never needed.
        repeat = repeats[name]
        if name == "conv1":
            time_row(name, apply_layer, (params,), tuple(inputs), out, repeat)
        else:
            time_row(name, apply_layer, (params, *inputs), (), out, repeat)
        if name in after:
            use_lrn = config.model.use_lrn and name != "conv5"
            x = jax.tree.map(lambda a: jnp.maximum(a, 0), concrete(out, 100 + i))

            def norm_pool(x, use_lrn=use_lrn):
                if use_lrn:
                    x = jax.tree.map(model.kernels.lrn, x)
                return jax.tree.map(model.kernels.max_pool, x)

            label = after[name] if use_lrn else "pool" + name[-1]
            time_row(label, norm_pool, (x,), (), jax.eval_shape(norm_pool, x), repeat)
    return rows


def resolve_peak(
    peak_tflops: float, device_kind: str, compute_dtype: str, measured_gflops: float
) -> tuple[float, str]:
    """The peak (GFLOP/s) that fractions are taken of, and where it comes from.

    ``--peak_tflops`` if given; else a known accelerator's datasheet peak; else
    the matmul peak measured on this machine (the CPU's practical ceiling).
    """
    import jax

    if peak_tflops > 0:
        return peak_tflops * 1e3, "--peak_tflops"
    chip = chip_peak_tflops(device_kind, compute_dtype, jax.config.jax_default_matmul_precision)
    if chip is not None:
        return chip[0] * 1e3, chip[1]
    return measured_gflops, f"measured {compute_dtype} matmul"


def _ratio(times: dict[str, list], slow: str, fast: str = "jax") -> float:
    """Median of per-step time ratios ``slow / fast`` over the alternating turns."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def run(
    config: ml_collections.ConfigDict,
    batch_sizes: Sequence[int],
    *,
    steps: int,
    frameworks: Sequence[str] = FRAMEWORKS,
    skip_layers: bool = False,
    skip_eval: bool = False,
    matmul_size: int = 2048,
    kernels: str = "auto",
    peak_tflops: float = 0.0,
    kernel_options: str | None = None,
) -> dict[str, Any]:
    """Runs every measurement on ``config``'s network, prints the report, returns the numbers.

    ``kernel_options``: ``tuning.parse_kernel_options`` text; None = the backend's options.
    """
    import jax

    from alexnet_jax import model as model_lib
    from alexnet_jax import optim, train

    config_lib.validate(config)
    m = config.model
    device = jax.local_devices()[0]
    out: dict[str, Any] = {"batches": {}, "frameworks": list(frameworks)}
    print(f"jax {jax.__version__} on {jax.devices()} ({_cpu_count()} CPU cores)")
    out["cpu"] = host_cpu()
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in out["cpu"]["flags"].items())
    print(f"host CPU: {out['cpu']['model'] or 'unknown'}; {features or 'flags unknown'}")
    out["host_allocator"] = allocator.active()
    out["cpu_conv_library"] = tuning.cpu_conv_library() if jax.default_backend() == "cpu" else "n/a"
    options = None if kernel_options is None else tuning.parse_kernel_options(kernel_options)
    base = with_batch_size(config, batch_sizes[0])
    base_model = build_model(base, kernels, options=options)
    out["kernels"] = _describe_kernels(base_model.kernels)
    out["kernel_options"] = (options or tuning.backend_options()).describe() or "none"
    print(f"host allocator: {out['host_allocator']}; CPU convolutions: "
          f"{out['cpu_conv_library']}; kernels: {out['kernels']}; "
          f"kernel options: {out['kernel_options']}")  # fmt: skip
    params = jax.eval_shape(
        functools.partial(train.init_state, base_model, optim.make_optimizer(base.optim), base.seed)
    ).params
    out["params"] = model_lib.count_params(params)
    print(f"network: width {m.width}, {m.num_classes} classes, LRN {m.use_lrn}, "
          f"{out['params']:,} parameters, compute {m.compute_dtype}, "
          f"mesh {tuple(config.mesh_shape)}")  # fmt: skip

    out["matmul_peak_gflops"] = matmul_peak_gflops(matmul_size, steps, m.compute_dtype)
    print(f"matmul peak: {out['matmul_peak_gflops']:.1f} GFLOP/s "
          f"({m.compute_dtype} {matmul_size}x{matmul_size} under XLA, best of runs)")  # fmt: skip
    peak, peak_source = resolve_peak(
        peak_tflops, device.device_kind, m.compute_dtype, out["matmul_peak_gflops"]
    )
    out["peak_gflops"], out["peak_source"] = peak, peak_source
    print(f"peak for fractions: {peak / 1e3:.3f} TFLOP/s ({peak_source})")
    out["train_gflop_per_image"] = 3 * forward_flops_per_image(base) / 1e9
    print(f"model FLOPs: {out['train_gflop_per_image']:.3f} GFLOP per training image "
          "(3 x forward: forward, input and weight gradients)")  # fmt: skip

    not_selected = "not selected (--framework, --skip_torch, --skip_torch_compile)"
    skipped = {f: not_selected for f in FRAMEWORKS if f not in frameworks}
    torch_error = torch_reference.torch_unavailable(frameworks, jax.default_backend())
    for f in frameworks:
        if f.startswith("torch") and torch_error:
            skipped[f] = torch_error
    out["rss_before_steps_mib"] = peak_rss_mib()
    for batch_size in batch_sizes:
        row = _time_batch(
            with_batch_size(config, batch_size),
            frameworks,
            skipped,
            steps,
            (kernels, options),
            out,
        )
        out["batches"][batch_size] = row

    if "jax" in frameworks and not skip_eval:
        eval_batch = batch_sizes[0]
        out["eval"] = time_eval(base, eval_batch, steps, kernels, options)
        print(f"[eval] centre crop: {out['eval']['centre']:.1f} images/s (batch {eval_batch}); "
              f"10 crops: {out['eval']['ten_crop']:.1f} images/s "
              f"({max(1, eval_batch // 10)} images x 10 crops per call)")  # fmt: skip
    if "jax" in frameworks and not skip_layers:
        out["layers"] = _print_layer_table(base, batch_sizes[-1], steps, (kernels, options), out)
    out["peak_rss_mib"] = peak_rss_mib()
    print(f"peak resident memory (whole run): {out['peak_rss_mib']:.0f} MiB")
    return out


def _time_batch(
    config: ml_collections.ConfigDict,
    frameworks: Sequence[str],
    skipped: dict[str, str],
    steps: int,
    kernels: tuple[str, tuple | None],
    out: dict[str, Any],
) -> dict[str, Any]:
    """Builds each framework's step at ``config.batch_size``, times them in turns, prints.

    ``kernels``: (``--kernels``, ``tuning.KernelOptions`` or None) of the JAX model.
    """
    import jax

    batch_size = config.batch_size
    steps_by_name: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    if "jax" in frameworks:
        jax_step = jax_train_step(config, *kernels)
        steps_by_name["jax"] = jax_step
        info["jax"] = {"compile_s": jax_step.compile_s}
    torch_device = torch_reference.torch_device(jax.default_backend())[0]
    torch_names = [n for n in ("torch", "torch_compile") if n in frameworks and n not in skipped]
    if torch_names:
        torch_reference.reset_device_peak(torch_device)
        batch = random_batch(batch_size, config.model.num_classes)
    for name in torch_names:
        try:
            steps_by_name[name], info[name] = torch_reference.torch_train_step(
                config, batch, compiled=name == "torch_compile", device=torch_device
            )
        except torch_reference.TorchCompileError as e:
            skipped[name] = str(e)
    times = time_alternating(steps_by_name, steps)
    row: dict[str, Any] = {}
    for name in FRAMEWORKS:
        if name not in times:
            print(f"[{name}] batch {batch_size}: skipped: {skipped.get(name, 'not run')}")
            continue
        images_per_s = batch_size / statistics.median(times[name])
        gflops = images_per_s * out["train_gflop_per_image"]
        prefix = "" if name == "jax" else f"{name}_"
        row[f"{prefix}images_per_s"] = images_per_s
        row[f"{prefix}gflops"] = gflops
        row[f"{prefix}fraction_of_peak"] = gflops / out["peak_gflops"]
        line = (
            f"[{name}] batch {batch_size}: {images_per_s:.1f} images/s, {gflops:.1f} GFLOP/s, "
            f"{gflops / out['peak_gflops']:.2f} of peak"
        )
        if "compile_s" in info[name]:
            row[f"{prefix}compile_s"] = info[name]["compile_s"]
            line += f", compile {info[name]['compile_s']:.1f} s"
        if name == "jax":
            row["xla_step_gflop"] = jax_step.xla_flops / 1e9
            line += (f", step {1e3 * batch_size / images_per_s:.0f} ms "
                     f"(best {batch_size / min(times['jax']):.1f} images/s)")  # fmt: skip
        else:
            row[f"{prefix}net"], row[f"{prefix}device"] = info[name]["net"], info[name]["device"]
            line += f" ({torch_reference.describe(info[name])})"
        if name == "torch_compile":
            line += "; compile = its first step (dynamo + inductor)"
        print(line)
    for name in ("torch", "torch_compile"):
        if "jax" in times and name in times:
            row[f"ratio_{name}"] = _ratio(times, name)
            print(f"ratio jax/{name} at batch {batch_size}: {row[f'ratio_{name}']:.2f}x "
                  "(median of per-step time ratios over alternating turns)")  # fmt: skip
    if "jax" in times:
        row["ratio"] = row.get("ratio_torch")
        memory = jax_step.memory
        row["xla_arguments_mib"] = memory.argument_size_in_bytes / 2**20
        row["xla_temporaries_mib"] = memory.temp_size_in_bytes / 2**20
        row["device_peak_mib"] = device_peak_mib()
        device_text = (
            "" if row["device_peak_mib"] is None
            else f"device peak in use {row['device_peak_mib']:.0f} MiB (process so far); "
        )  # fmt: skip
        print(f"[jax] memory at batch {batch_size}: {device_text}XLA's step buffers: "
              f"arguments {row['xla_arguments_mib']:.0f} MiB, "
              f"temporaries {row['xla_temporaries_mib']:.0f} MiB")  # fmt: skip
    timed_torch = [n for n in torch_names if n in times]
    row["torch_device_peak_mib"] = torch_reference.device_peak_mib(torch_device)
    if timed_torch and row["torch_device_peak_mib"] is not None:
        print(f"[torch] memory at batch {batch_size}: device peak allocated "
              f"{row['torch_device_peak_mib']:.0f} MiB (tensors of {'+'.join(timed_torch)}; "
              "torch.cuda.max_memory_allocated)")  # fmt: skip
    row["peak_rss_mib"] = peak_rss_mib()
    print(f"peak resident memory: {row['peak_rss_mib']:.0f} MiB (process, after batch "
          f"{batch_size}; holds {'+'.join(times) or 'nothing timed'}; "
          f"{out['rss_before_steps_mib']:.0f} MiB before any step was built)")  # fmt: skip
    return row


def _print_layer_table(
    config: ml_collections.ConfigDict, batch_size: int, steps: int, kernels: tuple, out: dict
) -> list[tuple[str, str, float, float]]:
    rows = layer_table(config, batch_size, steps, *kernels)
    print(f"per-layer times, batch {batch_size} (median ms):")
    print(f"  {'layer':<16}{'output':<30}{'fwd ms':>9}{'fwd+bwd ms':>12}")
    for name, shape, fwd_ms, both_ms in rows:
        print(f"  {name:<16}{shape:<30}{fwd_ms:>9.1f}{both_ms:>12.1f}")
    total = sum(r[3] for r in rows)
    print(f"  {'sum':<46}{sum(r[2] for r in rows):>9.1f}{total:>12.1f}")
    print("  (xN: the layer runs on N conv chunks; one chunk timed, times N)")
    print(
        "  (fwd+bwd = the forward plus the gradients w.r.t. inputs and parameters, "
        "as in a train step)"
    )
    step_ms = 1e3 * batch_size / out["batches"][batch_size]["images_per_s"]
    print(
        f"  whole train step: {step_ms:.1f} ms (the rest: ReLU, dropout, loss, optimizer, "
        "copies, minus fusion across layers)"
    )
    return rows


def _describe_kernels(kernels) -> str:
    """One line naming each of ``kernels``' choices (function or schedule names)."""
    parts = []
    for field in dataclasses.fields(kernels):
        value = getattr(kernels, field.name)
        parts.append(f"{field.name}={getattr(value, '__name__', None) or value!r}")
    return ", ".join(parts)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (other modules import this one)."""
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Experiment config whose network is timed.", lock_config=True
    )
    flags.DEFINE_list("batch_sizes", ["128", "64"], "Train batch sizes to time (replace "
                      "config.batch_size).")  # fmt: skip
    flags.DEFINE_integer("steps", 5, "Timed calls per measurement (the median is reported).")
    flags.DEFINE_enum(
        "framework",
        "all",
        ["all", *FRAMEWORKS],
        "Time all frameworks in turns, or one alone (then the peak resident memory is its own).",
    )
    flags.DEFINE_bool("skip_torch", False, "Do not run the PyTorch eager reference.")
    flags.DEFINE_bool("skip_torch_compile", False, "Do not run the torch.compile reference.")
    flags.DEFINE_bool("skip_layers", False, "Do not print the per-layer table.")
    flags.DEFINE_bool("skip_eval", False, "Do not time eval throughput.")
    flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul peak (compute dtype).")
    flags.DEFINE_float(
        "peak_tflops",
        0.0,
        "Peak TFLOP/s for the fractions; 0 = the datasheet peak of a known GPU "
        f"({', '.join(CHIP_PEAK_TFLOPS)}) for the compute dtype, else the measured matmul peak.",
    )
    flags.DEFINE_enum(
        "kernels",
        "auto",
        list(tuning.KERNEL_CHOICES),
        "How the model computes its operations: the backend's choice, model.py's plain forms, "
        "or the CPU schedules (alexnet_jax/tuning.py).",
    )
    flags.DEFINE_string(
        "kernel_options",
        None,
        "tuning.KernelOptions as NAME=VALUE,... (e.g. lrn=compute_dtype,tower_convs=grouped,"
        f"pad_input_channels=8; accepted: {dict(tuning.KERNEL_OPTION_VALUES)}); unset: the "
        "backend's (tuning.KERNEL_OPTIONS_BY_BACKEND); '' = none.",
    )
    flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")


def main(argv: Sequence[str]) -> int:
    """A bad flag or config value, or a missing path, is one ``error:`` line and exit 2."""
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    try:
        frameworks = selected_frameworks(
            FLAGS.framework,
            skip_torch=FLAGS.skip_torch,
            skip_torch_compile=FLAGS.skip_torch_compile,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    command.start(argv, FLAGS.config)
    out = run(
        FLAGS.config,
        [int(b) for b in FLAGS.batch_sizes],
        steps=FLAGS.steps,
        frameworks=frameworks,
        skip_layers=FLAGS.skip_layers,
        skip_eval=FLAGS.skip_eval,
        matmul_size=FLAGS.matmul_size,
        kernels=FLAGS.kernels,
        peak_tflops=FLAGS.peak_tflops,
        kernel_options=FLAGS.kernel_options,
    )
    command.finish(out, FLAGS.json)
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
