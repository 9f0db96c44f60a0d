"""Host batches to device batches: the one way training, validation and benchmarks get input.

``train_input`` builds what the training loop consumes, and
``benchmarks/input_pipeline.py`` times the same object, so the benchmark
measures what a run does: the grain iterator (its worker processes sized by
``tuning.input_workers``), the transfer to the mesh, and on an accelerator
the device's finish of the augmentation (``device_augment``).
``validation_input`` does the same for the validation passes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import errors, inference, sharding, tuning
from alexnet_jax.data import device_augment, pipeline

DeviceBatch = dict[str, jax.Array]


def loading(config: ml_collections.ConfigDict, backend: str | None = None) -> pipeline.Loading:
    """``config.data``'s reading settings with ``num_workers`` resolved for this host."""
    workers = tuning.input_workers(config.data.num_workers, backend)
    return pipeline.Loading.from_config(config.data, workers)


def preprocessing(
    config: ml_collections.ConfigDict, dataset: pipeline.Dataset, backend: str | None = None
) -> pipeline.Preprocessing:
    """``config.data``'s preprocessing, finished on the device where ``augment_on`` says so."""
    on_device = tuning.finish_augmentation_on_device(config.data.augment_on, backend)
    return pipeline.Preprocessing.from_config(config.data, dataset, finish_on_device=on_device)


@dataclasses.dataclass
class TrainInput:
    """Training batches as global device arrays; ``iterator``'s state goes in checkpoints."""

    iterator: pipeline.BatchIterator
    to_device: Callable[[dict[str, np.ndarray]], DeviceBatch]
    loading: pipeline.Loading
    preprocessing: pipeline.Preprocessing

    def __iter__(self) -> TrainInput:
        return self

    def __next__(self) -> DeviceBatch:
        return self.to_device(next(self.iterator))

    def close(self) -> None:
        self.iterator.close()


def train_input(
    config: ml_collections.ConfigDict, dataset: pipeline.Dataset, mesh: jax.sharding.Mesh
) -> TrainInput:
    """The training input of ``config`` on ``mesh``: this process's block of each global batch."""
    shard_index, shard_count = sharding.process_data_shard(mesh)
    prep = preprocessing(config, dataset)
    read = loading(config)
    iterator = pipeline.train_iterator(
        dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        preprocessing=prep,
        loading=read,
        # Processes on the same rows of the data axis read the same examples.
        process_index=shard_index,
        process_count=shard_count,
    )
    to_device = _to_device(mesh, prep, device_augment.finish_training_batch)
    return TrainInput(iterator, to_device, read, prep)


def _to_device(
    mesh: jax.sharding.Mesh,
    prep: pipeline.Preprocessing,
    finish_fn: Callable[..., DeviceBatch],
    **options: object,
) -> Callable[[dict[str, np.ndarray]], DeviceBatch]:
    """Host batch -> global device batch, then ``finish_fn`` (a ``device_augment`` function,
    jitted, with the mean image on the devices) where ``prep`` finishes on the device."""
    if not prep.finish_on_device:
        return lambda local: sharding.global_batch(mesh, local)
    mean = jax.device_put(np.asarray(prep.mean, np.float32), sharding.replicated(mesh))
    finish = jax.jit(
        functools.partial(
            finish_fn,
            scale=prep.scale,
            dtype=jnp.dtype(pipeline.numpy_dtype(prep.dtype)),
            **options,
        ),
        out_shardings=sharding.batch_sharding(mesh),
    )
    return lambda local: finish(sharding.global_batch(mesh, local), mean)


@dataclasses.dataclass
class ValidationInput:
    """The validation split, pass after pass, as global device batches (centre crops).

    Each pass is ``batches_per_pass`` batches of ``config.eval_batch_size`` with
    a 0/1 ``mask``, the same number in every process (``inference.padded_pass``).
    The iterator behind it is endless, so its worker processes start once per run.
    """

    iterator: pipeline.BatchIterator
    images: int  # This process's images of the split.
    batches_per_pass: int
    local_batch: int
    to_device: Callable[[dict[str, np.ndarray]], DeviceBatch]

    def one_pass(self) -> Iterator[DeviceBatch]:
        local = inference.padded_pass(
            self.iterator,
            images=self.images,
            local_batch=self.local_batch,
            num_batches=self.batches_per_pass,
        )
        return map(self.to_device, local)

    def close(self) -> None:
        self.iterator.close()


class NoValidationImagesError(errors.UsageError, ValueError):
    """More processes read the validation split than it has images."""


def validation_input(
    config: ml_collections.ConfigDict,
    dataset: pipeline.Dataset,
    mesh: jax.sharding.Mesh,
    *,
    split: str = "val",
) -> ValidationInput:
    """The validation input of ``config`` on ``mesh``, finished on the device where it runs."""
    shard_index, shard_count = sharding.process_data_shard(mesh)
    total = dataset.num_examples(split)
    if total < shard_count:
        raise NoValidationImagesError(
            f"The {split!r} split of {dataset.data_dir} has {total} images, fewer than the "
            f"{shard_count} processes that read it: use a larger split or fewer processes."
        )
    prep = preprocessing(config, dataset)
    iterator = pipeline.eval_iterator(
        dataset,
        batch_size=config.eval_batch_size,
        loading=loading(config),
        preprocessing=prep,
        split=split,
        process_index=shard_index,
        process_count=shard_count,
        endless=True,
    )
    local_batch = config.eval_batch_size // shard_count
    to_device = _to_device(mesh, prep, device_augment.finish_eval_batch, crop_size=prep.crop_size)
    # Its worker processes start now: a shared memory too small for their slots stops the
    # run before its first step, not at its first evaluation.
    iterator.start_prefetch()
    return ValidationInput(
        iterator,
        images=inference.shard_images(total, shard_index, shard_count),
        batches_per_pass=inference.batches_per_pass(total, local_batch, shard_count),
        local_batch=local_batch,
        to_device=to_device,
    )
