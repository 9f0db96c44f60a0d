"""The network timed apart from its train step: the eval forward, and each layer alone.

``train_step.py`` prints both after the step's rates: the eval rates (centre
crop, 10 crops averaged as ``evaluate`` averages them) and a per-layer table
of forward and forward+backward times, which says where a step's time goes
layer by layer (``step_profile.py`` says it by XLA operation).
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], steps: int) -> float:
    """Median wall time of ``steps`` calls of ``fn`` (which must block until done)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eval_rates(model: Any, images_BxHxWxC: Any, steps: int) -> dict[str, float]:
    """Images/s of ``model``'s eval forward: centre crop, and 10 crops with softmax averaging."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax.data import augment

    jit = jax.jit
    params = jax.jit(
        lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *images_BxHxWxC.shape[1:])), train=False
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

    images = jnp.asarray(images_BxHxWxC)
    batch_size = images.shape[0]
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
        seconds = median_seconds(
            lambda fn=fn, inputs=inputs: fn(params, inputs).block_until_ready(), steps
        )
        results[name] = count / seconds
    return results


def layer_table(model: Any, images_BxHxWxC: Any, steps: int) -> list[tuple[str, str, float, float]]:
    """(layer, output shape, forward ms, forward+backward ms) of each layer of ``model``.

    Layers with parameters are found by intercepting the model's own submodule
    calls, so the table follows ``model.py``; LRN and pooling are timed with the
    model's own kernels on the shapes where the network applies them.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    jit = jax.jit
    images = jnp.asarray(images_BxHxWxC)
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
        fwd_s = median_seconds(lambda: jax.block_until_ready(forward(diff_args, const_args)), steps)
        jax.block_until_ready(backward(diff_args, const_args, cotangent))
        both_s = median_seconds(
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
            use_lrn = model.use_lrn and name != "conv5"
            x = jax.tree.map(lambda a: jnp.maximum(a, 0), concrete(out, 100 + i))

            def norm_pool(x, use_lrn=use_lrn):
                if use_lrn:
                    x = jax.tree.map(model.kernels.lrn, x)
                return jax.tree.map(model.kernels.max_pool, x)

            label = after[name] if use_lrn else "pool" + name[-1]
            time_row(label, norm_pool, (x,), (), jax.eval_shape(norm_pool, x), repeat)
    return rows


def print_layer_table(
    rows: list[tuple[str, str, float, float]], batch_size: int, step_ms: float
) -> None:
    """Prints ``layer_table``'s rows, their sums and the whole step's ``step_ms`` beside them."""
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
    print(
        f"  whole train step: {step_ms:.1f} ms (the rest: ReLU, dropout, loss, optimizer, "
        "copies, minus fusion across layers)"
    )
