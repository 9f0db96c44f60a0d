"""The one way to run a trained model: build it from a config, load it, feed it images.

The training loop's validation, ``evaluate`` (centre, 10-crop, ensembles),
``predict``, ``visualize`` and the benchmarks all build the model with
``build_model``; the tools load a workdir with ``load_trained``, which
restores the newest usable checkpoint as training does (a damaged one is
skipped with a warning naming its step), and run it with
``make_probabilities_fn``. Tools import this module, never the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import checkpoint, config_lib, errors, tuning
from alexnet_jax.data import augment, pipeline, writer
from alexnet_jax.model import AlexNet

CROP_SIZE = pipeline.CROP_SIZE
# Errors for image files that are missing, unreadable, not images, truncated or corrupt.
IMAGE_ERRORS = (OSError, writer.BadImageError)


def build_model(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> AlexNet:
    """The config's AlexNet with this backend's kernels; with ``mesh``, towers on their devices."""
    fields = config.model.to_dict()
    chunk_size = fields.pop("conv_chunk_size")  # How to compute, not what: a tuning choice.
    return AlexNet(**fields, mesh=mesh, kernels=tuning.kernels(conv_chunk_size=chunk_size))


def abstract_params(model: AlexNet, sharding: Any = None, *, crop_size: int = CROP_SIZE) -> Any:
    """The model's parameter shapes and dtypes (no computation), placed by ``sharding``.

    ``sharding`` is one Sharding for every parameter, or a pytree of them
    shaped like the params (e.g. another run's, whose head may differ in size).
    ``crop_size`` is ``config.data.crop_size``: fc6's input follows it.
    """
    shapes = jax.eval_shape(
        lambda: model.clone(mesh=None).init(
            jax.random.PRNGKey(0), jnp.zeros((1, crop_size, crop_size, 3)), train=False
        )["params"]
    )
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes
        )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sharding
    )


class CheckpointMissingError(errors.NoCheckpointError, FileNotFoundError):
    """The workdir holds no checkpoint to load."""


class MissingConfigError(errors.UsageError, ValueError):
    """An old checkpoint saved without its config, and none was given."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A restored checkpoint with everything needed to feed it images and name its outputs."""

    config: ml_collections.ConfigDict
    model: AlexNet
    params: Any
    step: int
    dataset: pipeline.Dataset  # The prepared data it was trained on: classes, mean image.

    @property
    def classes(self) -> list[dict[str, str]]:
        """One ``{"id", "name"}`` per output, in output order (wnid and name for ImageNet)."""
        return self.dataset.metadata["classes"]

    @functools.cached_property
    def preprocessing(self) -> pipeline.Preprocessing:
        """The run's evaluation preprocessing (mean subtraction, input scale)."""
        return pipeline.Preprocessing.from_config(self.config.data, self.dataset)

    def views(self, image_256x256x3: np.ndarray, *, ten_crop: bool) -> np.ndarray:
        """A prepared uint8 image -> V x crop x crop x 3 float32 inputs (V = 1 or 10)."""
        p = self.preprocessing
        return augment.eval_views(
            image_256x256x3, ten_crop=ten_crop, mean=p.mean, crop_size=p.crop_size, scale=p.scale
        )


def run_config(
    ckpt: checkpoint.Checkpointer, step: int, fallback: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """The config saved with ``step`` (``config_lib.from_saved``); else ``fallback``."""
    try:
        saved = ckpt.saved_config(step)
    except Exception as e:  # noqa: BLE001 - older checkpoints have no config item.
        if fallback is None:
            raise MissingConfigError(
                f"The checkpoint at step {step} in {ckpt.directory} holds no config "
                f"({type(e).__name__}); pass the config it was trained with (predict and "
                "visualize: --config=configs/demo.py)"
            ) from e
        return fallback
    if fallback is not None:
        logging.warning("Using the config saved in the checkpoint; --config is ignored")
    return config_lib.from_saved(saved)


def load_params(
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
    sharding: Any = None,
    check_config: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[ml_collections.ConfigDict, AlexNet, Any, int]:
    """(run config, model, params, step) of ``workdir``'s newest usable checkpoint, or of ``step``.

    The run's config comes from the checkpoint; ``config`` is used only for
    checkpoints saved without one. Without ``step``, a checkpoint that cannot
    be restored is skipped with a warning and the previous one tried, as
    training does (nothing is moved: this only reads); if none restores,
    ``checkpoint.NoUsableCheckpointError``. ``sharding`` (as ``abstract_params``
    takes it) places the params; default: this process's first device.
    ``check_config`` sees each run config before its params are read; a
    ``config_lib.ConfigError`` it raises ends the search.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    train_command = f"python launch.py --config=configs/demo.py --workdir={workdir}"
    if not os.path.isdir(ckpt_dir):
        raise CheckpointMissingError(
            f"No checkpoint in {workdir} (no {ckpt_dir} directory). Train a model first, "
            f"e.g.:\n  {train_command}"
        )
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointMissingError(
                f"{ckpt_dir} holds no finished checkpoint. Train a model first, e.g.:\n"
                f"  {train_command}"
            )
        if step is not None and step not in steps:
            raise CheckpointMissingError(
                f"No checkpoint for step {step} in {ckpt_dir}: has {steps}"
            )
        candidates = [step] if step is not None else sorted(steps, reverse=True)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def attempt(candidate: int) -> tuple[ml_collections.ConfigDict, AlexNet, Any]:
            run = run_config(ckpt, candidate, config)
            if check_config is not None:
                check_config(run)
            model = build_model(run)
            shapes = abstract_params(model, sharding, crop_size=run.data.crop_size)
            return run, model, ckpt.restore_params(candidate, shapes)

        step, (run, model, params), _ = checkpoint.first_usable(
            candidates,
            attempt,
            ckpt.directory,
            # A config the user must give or change: not damage.
            reraise=(MissingConfigError, config_lib.ConfigError),
            advice=(
                "Pick another one with --step, or retrain: " if step is not None else "Retrain: "
            )
            + train_command,
        )
    finally:
        ckpt.close()
    return run, model, params, step


def load_trained(
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    data_dir: str | None = None,
    step: int | None = None,
) -> TrainedModel:
    """``load_params`` plus the prepared dataset the run trained on.

    ``data_dir`` overrides ``config.data.dir`` (the prepared dataset gives the
    class names and the mean image).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    run, model, params, step = load_params(workdir, config=config, step=step)
    if data_dir is not None:
        run = ml_collections.ConfigDict(run.to_dict())
        run.data.dir = data_dir
    dataset = pipeline.open_dataset(
        run.data.dir,
        how_to_prepare=(
            f"the prepared dataset the run in {workdir} trained on; pass --data_dir=DIR "
            "if it has moved"
        ),
    )
    if dataset.num_classes != run.model.num_classes:
        raise errors.UsageError(
            f"The dataset in {dataset.data_dir} has {dataset.num_classes} classes but the model "
            f"in {workdir} has {run.model.num_classes} outputs: pass the right --data_dir"
        )
    return TrainedModel(run, model, params, step, dataset)


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 256x256x3, prepared exactly as the training data (Sec. 2).

    The same function as ``prepare`` (``writer.prepare_image``: decode, mode
    conversion, alpha onto white, resize, central crop), except that a photo's
    EXIF orientation is honoured. Raises one of ``IMAGE_ERRORS``.
    """
    with open(path, "rb") as f:
        data = f.read()
    image, _ = writer.prepare_image(data, honour_exif_orientation=True)
    return np.asarray(image, np.uint8)


def centre_patch(image_HxWx3: np.ndarray, crop_size: int = CROP_SIZE) -> np.ndarray:
    """The central ``crop_size`` patch: an exported model's input, cut from a prepared image."""
    top, left = augment.center_crop_window(*image_HxWx3.shape[:2], crop_size)
    return augment.crop(image_HxWx3, top, left, crop_size)


def make_probabilities_fn(model: AlexNet):
    """Jitted (params, B x V x 224 x 224 x 3 views) -> softmax averaged over the V views."""

    @jax.jit
    def probabilities(params: Any, views_BxVxHxWxC: jax.Array) -> jax.Array:
        b, v = views_BxVxHxWxC.shape[:2]
        images = views_BxVxHxWxC.reshape(b * v, *views_BxVxHxWxC.shape[2:])
        logits = model.apply({"params": params}, images, train=False)
        return augment.average_crop_softmax(logits.reshape(b, v, -1))

    return probabilities


def pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a short final batch to ``size`` and adds a 0/1 ``mask``."""
    n = len(batch["labels"])
    padded = {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    padded["mask"] = (np.arange(size) < n).astype(np.float32)
    return padded


def shard_images(total: int, process_index: int, process_count: int) -> int:
    """How many of a split's first ``total`` images process ``process_index`` reads.

    The eval iterator deals images out in turn (image i to process i mod count).
    """
    return len(range(process_index, total, process_count))


def batches_per_pass(total: int, local_batch: int, process_count: int) -> int:
    """The batches every process runs in one pass: the largest shard's."""
    return max(
        -(-shard_images(total, p, process_count) // local_batch) for p in range(process_count)
    )


def padded_pass(
    batches: Iterator[dict[str, np.ndarray]], *, images: int, local_batch: int, num_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """``num_batches`` batches of ``local_batch`` with a 0/1 ``mask``: ``images`` real ones first.

    Each batch is a collective across the job's processes, so all of them must
    run the same number: a process whose shard is shorter goes on with batches
    whose mask is all 0 (errors count each image once) instead of finishing
    while the others wait for it in their next batch. Reads exactly the batches
    that hold ``images``, so an endless iterator stays at the next pass's start.
    """
    if images <= 0 < num_batches:
        raise ValueError("a process without images cannot shape its padding batches")
    padded = {}
    for _ in range(num_batches):
        if images > 0:
            batch = next(batches)
            keep = min(len(batch["labels"]), images)
            images -= keep
            padded = pad_batch({k: v[:keep] for k, v in batch.items()}, local_batch)
            yield padded
        else:
            yield {k: np.zeros_like(v) for k, v in padded.items()}
