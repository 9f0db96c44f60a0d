"""Subprocess for tests/test_sharding.py: one train step on several meshes of fake CPU devices.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX
starts, which is why this is a separate process):

    python tests/sharding_worker.py {meshes|extras} OUT.json

Writes JSON: for each mesh, the step's loss, its largest difference from the
1-device step (params, optimizer state), the shapes the compiled step
all-gathers, and for the 2-device mesh where every tower-local array's shards
live and how they compare with the 1-device arrays. ``meshes`` runs the
paper's SGD on 1, 2 (1x2) and 4 (2x2) devices, and with conv chunks of
one image on 1 and 4 devices; ``extras`` runs LARS on 1 and
2 devices and a bfloat16-compute step on 2.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alexnet_jax import inference, optim, sharding, train, tuning  # noqa: E402
from configs import demo  # noqa: E402

BATCH = 4


def tiny_config(optimizer: str = "sgd", compute_dtype: str = "float32"):
    config = demo.get_config()
    config.model.width = 1 / 16
    config.model.num_classes = 10
    config.batch_size = BATCH
    config.optim.name = optimizer
    config.model.compute_dtype = compute_dtype
    config.model.conv_chunk_size = 0  # The whole batch; chunked cases set 1.
    return config


def fixed_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "images": rng.normal(size=(BATCH, 224, 224, 3)).astype(np.float32),
        "labels": rng.integers(0, 10, size=(BATCH,)).astype(np.int32),
    }


def one_step(config, mesh_shape, devices):
    """(state before, state after, metrics, compiled HLO text) of one jitted train step."""
    mesh = sharding.make_mesh(mesh_shape, devices)
    model = inference.build_model(config, mesh)
    optimizer = optim.make_optimizer(config.optim)
    learning_rate_fn = optim.learning_rate_schedule(
        config.optim, batch_size=config.batch_size, steps_per_epoch=10, total_steps=100
    )
    init_fn = functools.partial(train.init_state, model, optimizer, config.seed)
    state_shardings = sharding.state_shardings(mesh, jax.eval_shape(init_fn))
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    step = jax.jit(
        functools.partial(
            train.train_step, model=model, optimizer=optimizer, learning_rate_fn=learning_rate_fn
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )
    batch = sharding.global_batch(mesh, fixed_batch())
    hlo = step.lower(state, batch).compile().as_text()
    new_state, metrics = step(state, batch)
    return state, new_state, jax.device_get(metrics), hlo


def all_gather_shapes(hlo: str) -> list[list[int]]:
    """Result shapes of every all-gather in compiled HLO text."""
    shapes = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.+?)\s+all-gather(?:-start)?\(", line)
        if match:
            shapes += [
                [int(d) for d in dims.split(",") if d]
                for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))
            ]
    return shapes


def max_diff(a, b) -> float:
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def case_report(after, step_metrics, hlo: str, reference) -> dict:
    """One mesh's step against the 1-device reference state, and what it all-gathers."""
    return {
        "loss": float(step_metrics["loss"]),
        "params_max_diff": max_diff(after.params, reference.params),
        "opt_state_max_diff": max_diff(after.opt_state, reference.opt_state),
        "all_gather_shapes": all_gather_shapes(hlo),
    }


def shard_report(state, reference) -> list[dict]:
    """Every tower-local leaf of params and optimizer state: its shards vs the reference."""
    rows = []
    flat = jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
    flat_ref = jax.tree.leaves((reference.params, reference.opt_state))
    for (path, leaf), ref in zip(flat, flat_ref, strict=True):
        if not sharding.is_tower_local(path, leaf):
            continue
        ref = np.asarray(ref)
        shards = []
        for shard in leaf.addressable_shards:
            tower = shard.index[0].start or 0
            data = np.asarray(shard.data)
            shards.append(
                {
                    "device": shard.device.id,
                    "tower": tower,
                    "shape": list(data.shape),
                    "max_diff": float(np.max(np.abs(data - ref[tower : tower + data.shape[0]]))),
                }
            )
        rows.append(
            {
                "path": jax.tree_util.keystr(path),
                "shape": list(leaf.shape),
                "fully_replicated": leaf.sharding.is_fully_replicated,
                "shards": shards,
            }
        )
    return rows


def main(mode: str, out_path: str) -> None:
    devices = jax.devices()
    assert len(devices) == 4, f"needs 4 fake devices, got {devices}"
    results: dict = {"cases": {}}
    if mode == "variants":
        # One-tower and Caffe variants, data parallel over 2 devices (tower axis 1).
        for variant in ("torchvision", "bvlc_alexnet"):
            config = tiny_config()
            config.model.variant = variant
            _, reference, ref_metrics, _ = one_step(config, (1, 1), devices[:1])
            results["cases"][f"{variant}/1x1"] = {"loss": float(ref_metrics["loss"])}
            _, after, step_metrics, hlo = one_step(config, (2, 1), devices[:2])
            results["cases"][f"{variant}/2x1"] = case_report(after, step_metrics, hlo, reference)
        return _write(results, out_path)
    for optimizer in ("sgd",) if mode == "meshes" else ("lars",):
        config = tiny_config(optimizer)
        _, reference, ref_metrics, _ = one_step(config, (1, 1), devices[:1])
        results["cases"][f"{optimizer}/1x1"] = {"loss": float(ref_metrics["loss"])}
        meshes = {"1x2": ((1, 2), devices[:2]), "2x2": ((2, 2), devices)}
        if optimizer == "lars":
            meshes = {"1x2": meshes["1x2"]}
        for name, (shape, devs) in meshes.items():
            _, after, step_metrics, hlo = one_step(config, shape, devs)
            results["cases"][f"{optimizer}/{name}"] = case_report(
                after, step_metrics, hlo, reference
            )
            if optimizer == "sgd" and name == "1x2":
                results["shards"] = shard_report(after, reference)
                results["fc8_kernel_replicated"] = after.params["fc8"][
                    "kernel"
                ].sharding.is_fully_replicated
                results["kernel_shapes"] = [
                    list(leaf.shape)
                    for path, leaf in jax.tree_util.tree_flatten_with_path(after.params)[0]
                    if sharding.is_tower_local(path, leaf)
                ]
                mesh = sharding.make_mesh(shape, devs)
                results["mesh_tower_devices"] = [d.id for d in mesh.devices[0]]
    if mode == "meshes":
        # conv1-pool5 on one-image chunks: 2 chunks per data shard on 2x2, 4 on 1x1.
        chunked = tiny_config()
        chunked.model.conv_chunk_size = 1
        for name, (shape, devs) in {"1x1": ((1, 1), devices[:1]), "2x2": ((2, 2), devices)}.items():
            _, after, step_metrics, hlo = one_step(chunked, shape, devs)
            results["cases"][f"chunked/{name}"] = case_report(after, step_metrics, hlo, reference)
        return _write(results, out_path)
    # bfloat16 compute on 2 devices against the float32 step: close, params stay float32.
    _, _, f32_metrics, _ = one_step(tiny_config(), (1, 2), devices[:2])
    _, after, step_metrics, _ = one_step(tiny_config(compute_dtype="bfloat16"), (1, 2), devices[:2])
    results["bf16"] = {
        "loss": float(step_metrics["loss"]),
        "f32_loss": float(f32_metrics["loss"]),
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(after.params)}),
    }
    _write(results, out_path)


def _write(results: dict, out_path: str) -> None:
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    tuning.configure_process()  # As every command does, before JAX starts its backends.
    main(sys.argv[1], sys.argv[2])
