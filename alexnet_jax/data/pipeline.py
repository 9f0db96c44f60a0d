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
import simplejpeg
from absl import flags, logging
from PIL import Image

from alexnet_jax import errors
from alexnet_jax.data import augment, records, sources, writer

CROP_SIZE = augment.CROP_SIZE
MEAN_SUBTRACTION_MODES = ("image", "channel")
PCA_STATS_SOURCES = ("prepared", "paper")
DTYPES = ("float32", "bfloat16")


class DatasetMissingError(errors.UsageError, FileNotFoundError):
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
    "full-size loader" cost, several times the prepared pipeline's). The
    mean image and RGB PCA come from an evenly spaced sample of training
    images, computed once with ``prepare``'s statistics and cached beside
    the run's data (``TFDS_STATISTICS_FILE`` in ``config.data.dir``).
    """

    name: str = ""
    tfds_data_dir: str | None = None
    mean: np.ndarray | None = None

    def source(self, split: str):
        if split not in self.metadata["splits"]:
            raise DatasetMissingError(f"Split {split!r} not in tfds dataset {self.name!r}")
        spec = sources.SourceSpec("tfds", self.name, self.tfds_data_dir)
        return sources.open_tfds(spec, split)[1]

    def mean_image(self) -> np.ndarray:
        return self.mean


TFDS_STATISTICS_FILE = "tfds_statistics.npz"


def _tfds_statistics(train: Any, count: int, cache_dir: str, build: str) -> dict[str, np.ndarray]:
    """Mean image and RGB eigen-decomposition of ``count`` training images, cached by build."""
    path = os.path.join(cache_dir, TFDS_STATISTICS_FILE)
    key = np.asarray(f"{build}|{len(train)}|{count}")
    if os.path.isfile(path):
        with np.load(path) as cached:
            if cached["key"] == key:
                return dict(cached)
    stats = writer.RgbStatistics()
    for index in np.linspace(0, len(train) - 1, count).astype(int):
        image, _ = writer.prepare_image(train[int(index)]["image"])
        stats.add(np.asarray(image))
    values, vectors = stats.eigen()
    result = {"key": key, "mean": stats.mean_image(), "values": values, "vectors": vectors}
    try:  # Atomic, so processes computing the same statistics at once cannot tear the file.
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(partial, **result)
        os.replace(partial, path)
    except OSError as e:
        logging.warning("Could not cache the tfds statistics in %s (%s)", cache_dir, e)
    return result


def open_tfds(
    name: str,
    *,
    data_dir: str | None,
    stats_images: int,
    how_to_prepare: str,
    cache_dir: str,
) -> TfdsDataset:
    """Opens a built tfds dataset for direct reading; statistics from ``stats_images`` images.

    ``name`` is a registered tfds name (with ``data_dir``) or a built dataset's
    directory. The sample is evenly spaced over the training split, so the
    statistics are the same on every run and every process; they are cached
    in ``cache_dir`` and recomputed only for another build or sample size.
    """
    spec = sources.SourceSpec("tfds", os.path.expanduser(name), data_dir or None)
    try:
        builder, train = sources.open_tfds(spec, "train")
    except sources.SourceError as e:  # Built, but not readable as it is: the message says why.
        raise DatasetMissingError(str(e)) from None
    except Exception as e:  # tfds raises several types for "not built here".
        raise DatasetMissingError(
            f"Cannot read tfds dataset {name!r} (data_dir={data_dir!r}): {e}\n"
            f"Build it with tfds, or prepare the ILSVRC files instead:\n  {how_to_prepare}"
        ) from e
    splits = {}
    for split in sources.SPLITS:
        try:
            splits[split] = {"num_examples": len(sources.open_tfds(spec, split)[1])}
        except Exception:  # A split the dataset does not have.
            continue
    count = min(stats_images, len(train))
    build = sources.tfds_build_dir(spec) or spec.location
    stats = _tfds_statistics(train, count, os.path.expanduser(cache_dir), build)
    metadata = {
        "name": name,
        "classes": [{"id": c, "name": c} for c in builder.info.features["label"].names],
        "splits": splits,
        "rgb_eigenvalues": stats["values"].tolist(),
        "rgb_eigenvectors": stats["vectors"].tolist(),
        "statistics_from_images": count,
    }
    return TfdsDataset(spec.location, metadata, spec.location, data_dir, stats["mean"])


def decode_jpeg(jpeg: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 H x W x 3.

    simplejpeg (libjpeg-turbo) gives Pillow's pixels in less time (README,
    "Input pipeline"); Pillow decodes what it declines.
    """
    try:
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    except ValueError:
        pass
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
    scale: float | np.ndarray = 1.0  # Multiplies mean-subtracted pixels (or one per RGB).
    dtype: str = "float32"
    crop_size: int = CROP_SIZE
    # Training only: ship uint8 patches and the draws; device_augment finishes them.
    finish_on_device: bool = False

    def crop_options(self) -> dict[str, Any]:
        """What every crop function of ``augment`` takes: mean, crop size, scale, dtype."""
        return {
            "mean": self.mean,
            "crop_size": self.crop_size,
            "scale": self.scale,
            "dtype": numpy_dtype(self.dtype),
        }

    @classmethod
    def paper(cls, dataset: Dataset, scale: float = 1.0) -> Preprocessing:
        """The paper's choices: mean image, PCA noise from the dataset's statistics."""
        eigenvalues, eigenvectors = dataset.rgb_eigen()
        return cls(dataset.mean_image(), eigenvalues, eigenvectors, scale=scale)

    @classmethod
    def from_config(
        cls, data: ml_collections.ConfigDict, dataset: Dataset, *, finish_on_device: bool = False
    ) -> Preprocessing:
        """Resolves ``config.data``'s choices against ``dataset``'s statistics.

        Fixed ``rgb_mean`` and ``rgb_std`` (imported weights: torchvision's
        normalization) never read the dataset's mean, so the input stays the
        one the weights were trained on whatever dataset is evaluated.
        ``finish_on_device`` is ``config.data.augment_on`` resolved for the backend
        (``tuning.finish_augmentation_on_device``).
        """
        if tuple(data.rgb_mean):
            shape = (writer.PREPARED_SIZE, writer.PREPARED_SIZE, 3)
            mean = np.broadcast_to(np.asarray(data.rgb_mean, np.float32), shape)
        else:
            mean = augment.mean_for_subtraction(dataset.mean_image(), data.mean_subtraction)
        scale = data.input_scale
        if any(s != 1.0 for s in data.rgb_std):
            scale = (data.input_scale / np.asarray(data.rgb_std, np.float64)).astype(np.float32)
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
            scale=scale,
            dtype=data.dtype,
            crop_size=data.crop_size,
            finish_on_device=finish_on_device,
        )


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """Sec. 4.1: random patch, mirror, mean subtraction, PCA colour noise."""

    preprocessing: Preprocessing

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, Any]:
        p = self.preprocessing
        pixels, label = decode_record(record)
        pca = {"eigenvalues": p.eigenvalues, "eigenvectors": p.eigenvectors, "pca_std": p.pca_std}
        if p.finish_on_device:
            return _patch_and_draws(pixels, label, rng, p, pca)
        image = augment.train_augment(pixels, rng, **pca, **p.crop_options())
        return {"images": image, "labels": np.int32(label)}


def _patch_and_draws(pixels, label, rng, p: Preprocessing, pca: dict[str, Any]) -> dict[str, Any]:
    """The uint8 patch and the random draws that ``device_augment`` finishes."""
    h, w = pixels.shape[:2]
    d = augment.train_draws(rng, h, w, crop_size=p.crop_size, **pca)
    offset = np.zeros(3, np.float32) if d.colour_offset is None else d.colour_offset
    return {
        "images": np.ascontiguousarray(augment.crop(pixels, d.top, d.left, p.crop_size)),
        "labels": np.int32(label),
        "crop_top": np.int32(d.top),
        "crop_left": np.int32(d.left),
        "mirror": np.bool_(d.mirror),
        "colour_offset": offset.astype(np.float32),
    }


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """The central patch (crop x crop x 3) or, with ``ten_crop``, the paper's ten test
    patches (10 x crop x crop x 3, in augment.TEN_CROP_POSITIONS order), mean-subtracted."""

    preprocessing: Preprocessing
    ten_crop: bool = False

    def map(self, record: bytes) -> dict[str, Any]:
        pixels, label = decode_record(record)
        views = augment.eval_views(
            pixels, ten_crop=self.ten_crop, **self.preprocessing.crop_options()
        )
        image = views if self.ten_crop else views[0]
        return {"images": image, "labels": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class Loading:
    """How records are read and decoded (``config.data``): it never changes the batches."""

    num_workers: int = 0  # Worker processes that each build whole batches; 0 = in-process.
    num_threads: int = 2  # Reader threads per process.
    prefetch: int = 0  # Records decoded ahead; 0 = two batches' worth.

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict) -> Loading:
        d = data_config
        return cls(num_workers=d.num_workers, num_threads=d.num_threads, prefetch=d.prefetch)


def _local_batches(
    ds: grain.MapDataset, batch_size: int, *, drop_remainder: bool, loading: Loading
) -> grain.DatasetIterator:
    """Threads decode single records into a prefetch buffer; batches are stacked after.

    Parallelism over records (not whole batches) keeps every thread busy for
    any batch size. With worker processes, each builds whole batches.
    """
    threads = loading.num_threads
    if loading.num_workers == 0:
        buffer = loading.prefetch if loading.prefetch > 0 else 2 * batch_size
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, threads))
        return iter(ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder))
    # Workers take whole batches in turn (k, k + num_workers, ...), so batches are
    # the same as without workers; batching inside each worker would regroup them.
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2)
    it = ds.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset(read)
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (defaults suffice).
    return iter(it.mp_prefetch(grain.MultiprocessingOptions(num_workers=loading.num_workers)))


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


def shuffled_records(dataset: Dataset, seed: int) -> grain.MapDataset:
    """The endless training order: the whole set reshuffled every epoch from ``seed``."""
    return grain.MapDataset.source(dataset.source("train")).seed(seed).shuffle().repeat(None)


def process_block(
    ds: grain.MapDataset, batch_size: int, index: int, count: int
) -> grain.MapDataset:
    """Process ``index``'s contiguous block of every global batch of ``batch_size``."""
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {count} processes")
    return ds if count == 1 else _ProcessBlocks(ds, batch_size, index, count)


def train_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    preprocessing: Preprocessing,
    loading: Loading = Loading(),
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of host-local training batches.

    Each record's random crop, flip and colour noise are drawn from its
    position in the global order (``shuffled_records``), before the order is
    split between processes, so the global batch (the processes' blocks in
    process order) is identical for any number of processes. ``batch_size``
    is global.
    """
    ds = shuffled_records(dataset, seed).random_map(TrainTransform(preprocessing))
    ds = process_block(ds, batch_size, process_index, process_count)
    return _local_batches(ds, batch_size // process_count, drop_remainder=True, loading=loading)


def eval_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    preprocessing: Preprocessing,
    loading: Loading = Loading(),
    ten_crop: bool = False,
    split: str = "val",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """One pass over ``split`` in order; the last batch may be short.

    Images are B x crop x crop x 3 (centre patch), or with ``ten_crop``
    B x 10 x crop x crop x 3; average the softmax over axis 1 with
    ``augment.average_crop_softmax``. PCA noise is never applied here.
    """
    ds = grain.MapDataset.source(dataset.source(split))[process_index::process_count]
    ds = ds.map(EvalTransform(preprocessing, ten_crop=ten_crop))
    if ten_crop and loading.prefetch == 0:  # Each record is 10 crops: a smaller buffer.
        loading = dataclasses.replace(loading, prefetch=min(2 * (batch_size // process_count), 64))
    return _local_batches(ds, batch_size // process_count, drop_remainder=False, loading=loading)
