"""Train-step speed against PyTorch and against this machine's own matmul peak.

    python -m alexnet_jax.benchmarks.train_step       # the paper's net, batch 128 and 64
    python -m alexnet_jax.benchmarks.train_step --batch_sizes=128 --steps=10
    python -m alexnet_jax.benchmarks.train_step --width=0.0625 --batch_sizes=4 --skip_torch

In one process, on one machine, it prints:
  * the f32 matmul peak XLA reaches here (the ceiling for a conv net on CPU);
  * per batch size: the project's jitted train step (the same ``train.train_step``
    that ``launch.py`` runs, donated state): compile time, images/s, achieved
    GFLOP/s and its fraction of the matmul peak;
  * the same network in PyTorch eager (two towers as grouped convs, the paper's
    LRN per tower, dropout, SGD with momentum and weight decay) and the ratio
    project / PyTorch; skipped with a message when torch is not installed
    (``pip install -r requirements-bench.txt``);
  * peak resident memory, a per-layer forward+backward time table, and eval
    throughput for the centre crop and for 10 crops (softmax averaged).

The machine may be shared: each number is the median of ``--steps`` timed
calls after a warm-up call, and A/B comparisons belong in one run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from alexnet_jax import allocator, inference, tuning

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["128", "64"], "Train batch sizes to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per measurement (the median is reported).")
_WIDTH = flags.DEFINE_float("width", 1.0, "Width multiplier of the network (1.0 = the paper's).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Output classes.")
_USE_LRN = flags.DEFINE_bool("use_lrn", True, "Include local response normalization.")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Do not run the PyTorch reference.")
_SKIP_LAYERS = flags.DEFINE_bool("skip_layers", False, "Do not print the per-layer table.")
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Do not time eval throughput.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square f32 matmul peak.")
_CONV_CHUNK_SIZE = flags.DEFINE_integer(
    "conv_chunk_size", -1, "config.model.conv_chunk_size (-1 auto: 8 on CPU; 0 whole batch)."
)
_KERNELS = flags.DEFINE_enum(
    "kernels",
    "auto",
    list(tuning.KERNEL_CHOICES),
    "How the model computes its operations: the backend's choice, model.py's plain forms, "
    "or the CPU schedules (alexnet_jax/tuning.py).",
)

IMAGE_SIZE = 224


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


def matmul_peak_gflops(size: int, steps: int) -> float:
    """GFLOP/s of an f32 ``size x size`` matmul under XLA: the best of ``steps`` calls."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(max(steps, 3)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _config(
    width: float,
    num_classes: int,
    use_lrn: bool,
    batch_size: int,
    conv_chunk_size: int = -1,
):
    from configs import common

    config = common.base_config()
    config.model.width = width
    config.model.num_classes = num_classes
    config.model.use_lrn = use_lrn
    config.model.conv_chunk_size = conv_chunk_size
    config.batch_size = batch_size
    return config


def build_model(config, kernels: str = "auto"):
    """``inference.build_model(config)`` with the ``kernels`` choice (``tuning.kernels``)."""

    return inference.build_model(config).clone(
        kernels=tuning.kernels(conv_chunk_size=config.model.conv_chunk_size, choice=kernels)
    )


def _random_batch(batch_size: int, num_classes: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "images": rng.normal(0, 50, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
        "labels": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


def jax_train_step(config, kernels: str = "auto") -> tuple[Callable[[], None], dict[str, float]]:
    """The project's train step, jitted as in ``train.train_and_evaluate``.

    Returns a function that runs one step to completion, and the compile time
    and XLA's FLOP count of the compiled step.
    """
    import jax

    from alexnet_jax import optim, train

    model = build_model(config, kernels)
    optimizer = optim.make_optimizer(config)
    step_fn = train.jit_train_step(model, optimizer, optim.learning_rate_schedule(config))
    state = jax.jit(functools.partial(train.init_state, model, optimizer, config.seed))()
    batch = jax.device_put(_random_batch(config.batch_size, config.model.num_classes))

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = _xla_flops(compiled)

    holder = {"state": state}

    def one_step():
        holder["state"], step_metrics = compiled(holder["state"], batch)
        jax.block_until_ready(step_metrics)

    return one_step, {"compile_s": compile_s, "xla_flops": flops}


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


def forward_flops_per_image(config) -> float:
    """Forward FLOPs of one 224x224 image: 2 x multiply-adds of every conv and dense layer.

    Counted from the model's own layers (their kernels and output shapes, found
    by intercepting its submodule calls), so it follows ``model.py``.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    model = inference.build_model(config)
    images = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
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


def time_eval(config, batch_size: int, steps: int, kernels: str = "auto") -> dict[str, float]:
    """Images/s of the eval forward: centre crop, and 10 crops with softmax averaging."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax.data import augment

    model = build_model(config, kernels)
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

    images = jnp.asarray(_random_batch(batch_size, 2)["images"])
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
    config, batch_size: int, steps: int, kernels: str = "auto"
) -> list[tuple[str, str, float, float]]:
    """(layer, output shape, forward ms, forward+backward ms) of each layer of the net.

    Layers with parameters are found by intercepting the model's own submodule
    calls, so the table follows ``model.py``; LRN and pooling are timed with the
    model's own kernels on the shapes where the network applies them.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    model = build_model(config, kernels)
    jit = jax.jit
    images = jnp.asarray(_random_batch(batch_size, 2)["images"])
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


def torch_alexnet(num_classes: int, width: float, use_lrn: bool):
    """The same two-tower network in PyTorch: towers as groups=2, LRN per tower.

    ``nn.LocalResponseNorm`` divides alpha by the window size, so the paper's
    alpha=1e-4 is passed as 5e-4. LRN runs on each tower's channels separately,
    as in the paper (and the JAX model).
    """
    import torch
    from torch import nn

    from alexnet_jax import model as model_lib

    c = functools.partial(model_lib.scaled, width=width)
    size = 2 * model_lib.LRN_DEPTH_RADIUS + 1

    class TowerLRN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(
                size,
                alpha=model_lib.LRN_ALPHA * size,
                beta=model_lib.LRN_BETA,
                k=model_lib.LRN_BIAS,
            )

        def forward(self, x):
            return torch.cat([self.lrn(t) for t in x.chunk(2, dim=1)], dim=1)

    norm = TowerLRN if use_lrn else nn.Identity
    return nn.Sequential(
        nn.Conv2d(3, 2 * c(48), 11, stride=4, padding=2), nn.ReLU(), norm(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(2 * c(48), 2 * c(128), 5, padding=2, groups=2), nn.ReLU(), norm(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(2 * c(128), 2 * c(192), 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * c(192), 2 * c(192), 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(2 * c(192), 2 * c(128), 3, padding=1, groups=2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(2 * c(128) * 36, 2 * c(2048)), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(2 * c(2048), 2 * c(2048)), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(2 * c(2048), num_classes),
    )  # fmt: skip


def torch_train_step(config) -> tuple[Callable[[], None], dict[str, float]]:
    """PyTorch eager train step of the same network, with torch's default threads."""
    import torch
    from torch.nn import functional

    m = config.model
    net = torch_alexnet(m.num_classes, m.width, m.use_lrn)
    optimizer = torch.optim.SGD(
        net.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    batch = _random_batch(config.batch_size, m.num_classes)
    images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(batch["labels"]).long()
    net.train()

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        loss = functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()

    return one_step, {
        "params": sum(p.numel() for p in net.parameters()),
        "threads": torch.get_num_threads(),
    }


def run(
    batch_sizes: Sequence[int],
    *,
    steps: int,
    width: float = 1.0,
    num_classes: int = 1000,
    use_lrn: bool = True,
    skip_torch: bool = False,
    skip_layers: bool = False,
    skip_eval: bool = False,
    matmul_size: int = 2048,
    conv_chunk_size: int = -1,
    kernels: str = "auto",
) -> dict[str, Any]:
    """Runs every measurement, prints the report, and returns the numbers."""
    import jax

    from alexnet_jax import model as model_lib
    from alexnet_jax import train

    out: dict[str, Any] = {"batches": {}}
    print(f"jax {jax.__version__} on {jax.devices()} ({_cpu_count()} CPU cores)")
    out["host_allocator"] = allocator.active()
    out["cpu_conv_library"] = tuning.cpu_conv_library() if jax.default_backend() == "cpu" else "n/a"
    base = _config(width, num_classes, use_lrn, batch_sizes[0], conv_chunk_size)
    base_model = build_model(base, kernels)
    out["kernels"] = _describe_kernels(base_model.kernels)
    print(f"host allocator: {out['host_allocator']}; CPU convolutions: "
          f"{out['cpu_conv_library']}; kernels: {out['kernels']}")  # fmt: skip
    params = jax.eval_shape(
        functools.partial(train.init_state, base_model, _optimizer(base), base.seed)
    ).params
    out["params"] = model_lib.count_params(params)
    print(f"network: width {width}, {num_classes} classes, LRN {use_lrn}, "
          f"{out['params']:,} parameters, float32")  # fmt: skip

    out["matmul_peak_gflops"] = matmul_peak_gflops(matmul_size, steps)
    print(f"matmul peak: {out['matmul_peak_gflops']:.1f} GFLOP/s "
          f"(f32 {matmul_size}x{matmul_size} under XLA, best of runs)")  # fmt: skip
    out["train_gflop_per_image"] = 3 * forward_flops_per_image(base) / 1e9
    print(f"model FLOPs: {out['train_gflop_per_image']:.3f} GFLOP per training image "
          "(3 x forward: forward, input and weight gradients)")  # fmt: skip

    torch_error = None
    if not skip_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            torch_error = "torch is not installed (pip install -r requirements-bench.txt)"
    for batch_size in batch_sizes:
        config = _config(width, num_classes, use_lrn, batch_size, conv_chunk_size)
        jax_step, jax_info = jax_train_step(config, kernels)
        steps_by_name = {"jax": jax_step}
        if not (skip_torch or torch_error):
            torch_step, torch_info = torch_train_step(config)
            steps_by_name["torch"] = torch_step
        times = time_alternating(steps_by_name, steps)
        images_per_s = batch_size / statistics.median(times["jax"])
        gflops = images_per_s * out["train_gflop_per_image"]
        row = {
            "images_per_s": images_per_s,
            "gflops": gflops,
            "fraction_of_peak": gflops / out["matmul_peak_gflops"],
            "compile_s": jax_info["compile_s"],
            "xla_step_gflop": jax_info["xla_flops"] / 1e9,
        }
        print(f"[jax] batch {batch_size}: {images_per_s:.1f} images/s, {gflops:.1f} GFLOP/s, "
              f"{row['fraction_of_peak']:.2f} of matmul peak, compile {row['compile_s']:.1f} s, "
              f"step {1e3 * batch_size / images_per_s:.0f} ms "
              f"(best {batch_size / min(times['jax']):.1f} images/s)")  # fmt: skip
        row["peak_rss_mib"] = peak_rss_mib()
        print(f"peak resident memory: {row['peak_rss_mib']:.0f} MiB (process, after batch "
              f"{batch_size})")  # fmt: skip
        if skip_torch:
            print(f"[torch] batch {batch_size}: skipped (--skip_torch)")
        elif torch_error:
            print(f"[torch] batch {batch_size}: skipped: {torch_error}")
        else:
            row["torch_images_per_s"] = batch_size / statistics.median(times["torch"])
            paired = [t / j for t, j in zip(times["torch"], times["jax"], strict=True)]
            row["ratio"] = statistics.median(paired)
            threads, params = torch_info["threads"], torch_info["params"]
            print(f"[torch] batch {batch_size}: {row['torch_images_per_s']:.1f} images/s "
                  f"({threads} threads, {params:,} parameters)")  # fmt: skip
            print(
                f"ratio jax/torch at batch {batch_size}: {row['ratio']:.2f}x "
                "(median of per-step time ratios over alternating turns)"
            )
        del steps_by_name, jax_step  # Free this batch size's buffers before the next.
        out["batches"][batch_size] = row

    eval_batch = batch_sizes[0]
    if not skip_eval:
        out["eval"] = time_eval(base, eval_batch, steps, kernels)
        print(f"[eval] centre crop: {out['eval']['centre']:.1f} images/s (batch {eval_batch}); "
              f"10 crops: {out['eval']['ten_crop']:.1f} images/s "
              f"({max(1, eval_batch // 10)} images x 10 crops per call)")  # fmt: skip
    if not skip_layers:
        rows = layer_table(base, batch_sizes[-1], steps, kernels)
        out["layers"] = rows
        print(f"per-layer times, batch {batch_sizes[-1]} (median ms):")
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
        batch_row = out["batches"][batch_sizes[-1]]
        step_ms = 1e3 * batch_sizes[-1] / batch_row["images_per_s"]
        print(
            f"  whole train step: {step_ms:.1f} ms (the rest: ReLU, dropout, loss, optimizer, "
            "copies, minus fusion across layers)"
        )
    out["peak_rss_mib"] = peak_rss_mib()
    print(f"peak resident memory (whole run): {out['peak_rss_mib']:.0f} MiB")
    return out


def _describe_kernels(kernels) -> str:
    """One line naming each of ``kernels``' choices (function or schedule names)."""
    parts = []
    for field in dataclasses.fields(kernels):
        value = getattr(kernels, field.name)
        parts.append(f"{field.name}={getattr(value, '__name__', None) or value!r}")
    return ", ".join(parts)


def _optimizer(config):
    from alexnet_jax import optim

    return optim.make_optimizer(config)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    tuning.configure_process()  # As launch.py does, before JAX starts its backends.
    allocator.use(tuning.host_allocator())  # May restart this command once.
    run(
        [int(b) for b in _BATCH_SIZES.value],
        steps=_STEPS.value,
        width=_WIDTH.value,
        num_classes=_NUM_CLASSES.value,
        use_lrn=_USE_LRN.value,
        skip_torch=_SKIP_TORCH.value,
        skip_layers=_SKIP_LAYERS.value,
        skip_eval=_SKIP_EVAL.value,
        matmul_size=_MATMUL_SIZE.value,
        conv_chunk_size=_CONV_CHUNK_SIZE.value,
        kernels=_KERNELS.value,
    )
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
