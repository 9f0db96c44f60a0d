"""The grain input pipeline: records -> shuffle -> decode -> augment -> batch.

Every random choice comes from grain's per-record generator (seeded by the
config seed and the record's position), so batches are the same whatever the
number of worker processes, and the iterator state can be checkpointed.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from alexnet_jax.data import records

CROP_SIZE = 224


class DatasetMissingError(FileNotFoundError):
    """The prepared data a config points at does not exist."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset on disk and what its metadata says about it."""

    data_dir: str
    metadata: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.metadata["classes"])

    def num_examples(self, split: str) -> int:
        return int(self.metadata["splits"][split]["num_examples"])

    def source(self, split: str) -> grain.sources.ArrayRecordDataSource:
        if split not in self.metadata["splits"]:
            raise DatasetMissingError(
                f"Split {split!r} not in {self.data_dir} (has {sorted(self.metadata['splits'])})"
            )
        return grain.sources.ArrayRecordDataSource(
            records.shard_paths(self.data_dir, split, self.metadata)
        )

    def mean_image(self) -> np.ndarray:
        return np.load(os.path.join(self.data_dir, self.metadata["mean_image_file"]))


def open_dataset(data_dir: str, *, how_to_prepare: str) -> Dataset:
    """Opens a prepared dataset, or fails naming the directory and the command that makes it."""
    data_dir = os.path.expanduser(data_dir)
    metadata = records.read_metadata(data_dir)
    if metadata is None:
        raise DatasetMissingError(
            f"No prepared dataset at {data_dir!r} (looked for {records.METADATA_FILE}). "
            f"Prepare it with:\n  {how_to_prepare}"
        )
    return Dataset(data_dir, metadata)


def decode_jpeg(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 H x W x 3."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """Sec. 4.1: a random 224x224 patch and, half the time, its mirror image."""

    mean_image: np.ndarray  # 256 x 256 x 3 float32, subtracted before cropping
    input_scale: float = 1.0  # Multiplies the mean-subtracted pixels (the paper: 1).
    crop_size: int = CROP_SIZE

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
        example = records.decode_example(record)
        image = decode_jpeg(example["image"]).astype(np.float32) - self.mean_image
        image *= self.input_scale
        h, w = image.shape[:2]
        top = int(rng.integers(0, h - self.crop_size + 1))
        left = int(rng.integers(0, w - self.crop_size + 1))
        image = image[top : top + self.crop_size, left : left + self.crop_size]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return {"images": np.ascontiguousarray(image), "labels": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """The central 224x224 patch, mean-subtracted."""

    mean_image: np.ndarray
    input_scale: float = 1.0
    crop_size: int = CROP_SIZE

    def map(self, record: bytes) -> dict[str, Any]:
        example = records.decode_example(record)
        image = decode_jpeg(example["image"]).astype(np.float32) - self.mean_image
        image *= self.input_scale
        h, w = image.shape[:2]
        top, left = (h - self.crop_size) // 2, (w - self.crop_size) // 2
        image = image[top : top + self.crop_size, left : left + self.crop_size]
        return {"images": np.ascontiguousarray(image), "labels": np.int32(example["label"])}


def _to_iter(ds: grain.MapDataset, num_workers: int, num_threads: int) -> grain.IterDataset:
    """Threads (PIL decodes without the GIL) and, optionally, worker processes."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def train_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    num_threads: int = 2,
    input_scale: float = 1.0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of host-local training batches.

    The whole training set is reshuffled every epoch from ``seed``; each JAX
    process takes every ``process_count``-th example of that order, so the
    processes' batches together form the global batch.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    ds = grain.MapDataset.source(dataset.source("train")).seed(seed).shuffle().repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.random_map(TrainTransform(dataset.mean_image(), input_scale))
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    return iter(_to_iter(ds, num_workers, num_threads))


def eval_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    num_threads: int = 2,
    input_scale: float = 1.0,
    split: str = "val",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """One pass over ``split`` in order; the last batch may be short."""
    ds = grain.MapDataset.source(dataset.source(split))[process_index::process_count]
    ds = ds.map(EvalTransform(dataset.mean_image(), input_scale))
    ds = ds.batch(batch_size // process_count, drop_remainder=False)
    return iter(_to_iter(ds, num_workers, num_threads))
