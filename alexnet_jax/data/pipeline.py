"""The grain input pipeline: records -> shuffle -> decode -> augment -> batch.

Every random choice comes from grain's per-record generator (seeded by the
config seed and the record's position), so batches are the same whatever the
number of threads or worker processes, and the iterator state can be
checkpointed: a restored iterator continues with exactly the next batch.

Threads decode in parallel (PIL releases the GIL) and a prefetch buffer keeps
records ready; worker processes (``num_workers``) are optional because on a
small CPU host they compete with XLA for cores.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from alexnet_jax.data import augment, prepare, records, writer

CROP_SIZE = augment.CROP_SIZE
MEAN_SUBTRACTION_MODES = ("image", "channel")
PCA_STATS_SOURCES = ("prepared", "paper")
DTYPES = ("float32", "bfloat16")


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

    def rgb_eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """RGB eigenvalues (descending) and eigenvectors (columns) of the training set, [0, 1]."""
        return (
            np.asarray(self.metadata["rgb_eigenvalues"], np.float64),
            np.asarray(self.metadata["rgb_eigenvectors"], np.float64),
        )


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


@dataclasses.dataclass(frozen=True)
class TfdsDataset(Dataset):
    """A built tfds dataset (e.g. imagenet2012) read directly, without preparation.

    Every read decodes the full-size JPEG and resizes it (the benchmark's
    "full-size loader" cost, several times the prepared pipeline's), and the
    mean image and RGB PCA are estimated from a sample of training images.
    """

    name: str = ""
    tfds_data_dir: str | None = None
    mean: np.ndarray | None = None

    def source(self, split: str):
        if split not in self.metadata["splits"]:
            raise DatasetMissingError(f"Split {split!r} not in tfds dataset {self.name!r}")
        spec = prepare.SourceSpec("tfds", self.name, self.tfds_data_dir)
        return prepare.open_tfds(spec, split)[1]

    def mean_image(self) -> np.ndarray:
        return self.mean


def open_tfds(
    name: str, *, data_dir: str | None, stats_images: int, how_to_prepare: str
) -> TfdsDataset:
    """Opens a built tfds dataset for direct reading; statistics from ``stats_images`` images.

    ``name`` is a registered tfds name (with ``data_dir``) or a built dataset's
    directory. The sample is evenly spaced over the training split, so the
    statistics are the same on every run and every process.
    """
    spec = prepare.SourceSpec("tfds", os.path.expanduser(name), data_dir or None)
    try:
        builder, train = prepare.open_tfds(spec, "train")
    except prepare.SourceError as e:  # Built, but not readable as it is: the message says why.
        raise DatasetMissingError(str(e)) from None
    except Exception as e:  # tfds raises several types for "not built here".
        raise DatasetMissingError(
            f"Cannot read tfds dataset {name!r} (data_dir={data_dir!r}): {e}\n"
            f"Build it with tfds, or prepare the ILSVRC files instead:\n  {how_to_prepare}"
        ) from e
    splits = {}
    for split in prepare.SPLITS:
        try:
            splits[split] = {"num_examples": len(prepare.open_tfds(spec, split)[1])}
        except Exception:  # A split the dataset does not have.
            continue
    stats = writer.RgbStatistics()
    count = min(stats_images, len(train))
    for index in np.linspace(0, len(train) - 1, count).astype(int):
        image, _ = writer.prepare_image(train[int(index)]["image"])
        stats.add(np.asarray(image))
    values, vectors = stats.eigen()
    metadata = {
        "name": name,
        "classes": [{"id": c, "name": c} for c in builder.info.features["label"].names],
        "splits": splits,
        "rgb_eigenvalues": values.tolist(),
        "rgb_eigenvectors": vectors.tolist(),
        "statistics_from_images": count,
    }
    return TfdsDataset(spec.location, metadata, spec.location, data_dir, stats.mean_image())


def decode_jpeg(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 H x W x 3."""
    with Image.open(io.BytesIO(jpeg)) as image:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)


def decode_record(record: bytes | dict[str, Any]) -> tuple[np.ndarray, int]:
    """A record -> (uint8 256 x 256 x 3 image, label).

    Prepared records (msgpack bytes) hold 256px JPEGs already; tfds records
    (dicts of full-size image bytes) get the paper's resize and central crop
    here, on every read.
    """
    if isinstance(record, bytes):
        example = records.decode_example(record)
        return decode_jpeg(example["image"]), int(example["label"])
    image, _ = writer.prepare_image(record["image"])
    return np.asarray(image), int(record["label"])


def numpy_dtype(name: str) -> np.dtype:
    """ "float32" or "bfloat16" as a NumPy dtype (bfloat16 from ml_dtypes, as JAX uses)."""
    if name == "float32":
        return np.dtype(np.float32)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"dtype {name!r} is not one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How pixels become network inputs: what to subtract, colour noise, scale, dtype."""

    mean: np.ndarray  # 256 x 256 x 3 float32, subtracted from every image.
    eigenvalues: np.ndarray | None  # RGB PCA on the [0, 1] scale; None turns PCA noise off.
    eigenvectors: np.ndarray | None
    pca_std: float = augment.PCA_STD
    scale: float = 1.0  # Multiplies mean-subtracted pixels.
    dtype: str = "float32"
    crop_size: int = CROP_SIZE

    @classmethod
    def paper(cls, dataset: Dataset, scale: float = 1.0) -> Preprocessing:
        """The paper's choices: mean image, PCA noise from the dataset's statistics."""
        eigenvalues, eigenvectors = dataset.rgb_eigen()
        return cls(dataset.mean_image(), eigenvalues, eigenvectors, scale=scale)

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict, dataset: Dataset) -> Preprocessing:
        """Resolves ``config.data``'s choices against ``dataset``'s statistics."""
        mean = augment.mean_for_subtraction(dataset.mean_image(), data.mean_subtraction)
        eigenvalues = eigenvectors = None
        if data.pca_colour:
            if data.pca_stats == "prepared":
                eigenvalues, eigenvectors = dataset.rgb_eigen()
            else:
                eigenvalues, eigenvectors = augment.PAPER_EIGENVALUES, augment.PAPER_EIGENVECTORS
        return cls(
            mean=mean,
            eigenvalues=eigenvalues,
            eigenvectors=eigenvectors,
            pca_std=data.pca_std,
            scale=data.input_scale,
            dtype=data.dtype,
        )


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """Sec. 4.1: random patch, mirror, mean subtraction, PCA colour noise."""

    preprocessing: Preprocessing

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
        p = self.preprocessing
        pixels, label = decode_record(record)
        image = augment.train_augment(
            pixels,
            rng,
            mean=p.mean,
            eigenvalues=p.eigenvalues,
            eigenvectors=p.eigenvectors,
            pca_std=p.pca_std,
            crop_size=p.crop_size,
            scale=p.scale,
            dtype=numpy_dtype(p.dtype),
        )
        return {"images": image, "labels": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """The central patch (crop x crop x 3) or, with ``ten_crop``, the paper's ten test
    patches (10 x crop x crop x 3, in augment.TEN_CROP_POSITIONS order), mean-subtracted."""

    preprocessing: Preprocessing
    ten_crop: bool = False

    def map(self, record: bytes) -> dict[str, Any]:
        p = self.preprocessing
        pixels, label = decode_record(record)
        crops = augment.ten_crop if self.ten_crop else augment.center_crop
        image = crops(
            pixels,
            mean=p.mean,
            crop_size=p.crop_size,
            scale=p.scale,
            dtype=numpy_dtype(p.dtype),
        )
        return {"images": image, "labels": np.int32(label)}


def _batched_iter(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    drop_remainder: bool,
    num_workers: int,
    num_threads: int,
    prefetch: int,
) -> grain.IterDataset:
    """Threads decode single records into a prefetch buffer; batches are stacked after.

    Parallelism over records (not whole batches) keeps every thread busy for
    any batch size. ``num_workers`` > 0 moves the work to processes that each
    build whole batches. ``prefetch`` counts records; 0 means two batches' worth.
    """
    buffer = prefetch if prefetch > 0 else 2 * batch_size
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(buffer, num_threads))
    if num_workers == 0:
        return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)
    # Workers take whole batches in turn (k, k + num_workers, ...), so batches are
    # the same as without workers; batching inside each worker would regroup them.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)
    it = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(read)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (defaults suffice).
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


class _ProcessBlocks(grain.MapDataset):
    """Process ``index``'s contiguous block of every global batch of ``parent``.

    With ``count`` processes and a global batch of ``B``, local element ``k`` is
    global element ``(k // b) * B + index * b + k % b`` where ``b = B / count``:
    the processes' local batches, concatenated in process order, are exactly the
    single-process batch (same images, same order, so same dropout masks).
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
        super().__init__(parent)
        self._global_batch = global_batch
        self._local_batch = global_batch // count
        self._offset = index * self._local_batch

    def __len__(self) -> int:
        return len(self._parents[0]) // self._global_batch * self._local_batch

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        batch, within = divmod(k, self._local_batch)
        return self._parents[0][batch * self._global_batch + self._offset + within]


def train_records(
    dataset: Dataset,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    batch_size: int = 1,
) -> grain.MapDataset:
    """This process's endless stream of raw training records, in the global shuffled order.

    The whole training set is reshuffled every epoch from ``seed``; process
    ``p`` reads the ``p``-th of ``process_count`` contiguous blocks of every
    global batch of ``batch_size``.
    """
    ds = grain.MapDataset.source(dataset.source("train")).seed(seed).shuffle().repeat(None)
    return _blocks(ds, batch_size, process_index, process_count)


def _blocks(ds: grain.MapDataset, batch_size: int, index: int, count: int) -> grain.MapDataset:
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {count} processes")
    return ds if count == 1 else _ProcessBlocks(ds, batch_size, index, count)


def train_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    preprocessing: Preprocessing | None = None,
    input_scale: float = 1.0,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of host-local training batches.

    The whole training set is reshuffled every epoch from ``seed``. Each
    record's random crop, flip and colour noise are drawn from its position in
    that global order, before the order is split between processes, so the
    global batch (the processes' blocks in process order) is identical for any
    number of processes. ``batch_size`` is global. Without ``preprocessing``,
    the paper's (``Preprocessing.paper``) at ``input_scale``.
    """
    preprocessing = preprocessing or Preprocessing.paper(dataset, input_scale)
    ds = grain.MapDataset.source(dataset.source("train")).seed(seed).shuffle().repeat(None)
    ds = ds.random_map(TrainTransform(preprocessing))
    ds = _blocks(ds, batch_size, process_index, process_count)
    it = _batched_iter(
        ds,
        batch_size=batch_size // process_count,
        drop_remainder=True,
        num_workers=num_workers,
        num_threads=num_threads,
        prefetch=prefetch,
    )
    return iter(it)


def eval_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    preprocessing: Preprocessing | None = None,
    input_scale: float = 1.0,
    ten_crop: bool = False,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 0,
    split: str = "val",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """One pass over ``split`` in order; the last batch may be short.

    Images are B x crop x crop x 3 (centre patch), or with ``ten_crop``
    B x 10 x crop x crop x 3; average the softmax over axis 1 with
    ``augment.average_crop_softmax``. Without ``preprocessing``, the paper's
    at ``input_scale`` (PCA noise is never applied in evaluation).
    """
    preprocessing = preprocessing or Preprocessing.paper(dataset, input_scale)
    ds = grain.MapDataset.source(dataset.source(split))[process_index::process_count]
    ds = ds.map(EvalTransform(preprocessing, ten_crop=ten_crop))
    if ten_crop and prefetch == 0:
        prefetch = min(2 * (batch_size // process_count), 64)  # Each record is 10 crops.
    it = _batched_iter(
        ds,
        batch_size=batch_size // process_count,
        drop_remainder=False,
        num_workers=num_workers,
        num_threads=num_threads,
        prefetch=prefetch,
    )
    return iter(it)
