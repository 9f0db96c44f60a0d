"""The grain input pipeline: records -> shuffle -> decode -> augment -> batch.

Every random choice comes from a generator keyed by the config seed and the
record's position in the global order (``record_rng``), so batches are the
same whatever the number of processes, worker processes or threads, and the
iterator's state is the next batch's index: a restored iterator continues
with exactly the next batch, on any host.

grain's unit of work is a whole batch (``_Batches``): a thread or worker
process reads a batch's records, decodes them and writes each crop straight
into the batch's arrays. Worker processes (``Loading.num_workers``, sized
from the host's cores by ``tuning.input_workers``) are what scales: per
record, the Python work holds the GIL, so threads in one process do not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import simplejpeg
from absl import logging
from PIL import Image

from alexnet_jax import errors
from alexnet_jax.data import augment, records, sources, workers, writer

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
    # Ship uint8 pixels (and training's draws); device_augment finishes them.
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


def record_rng(seed: int, position: int) -> np.random.Generator:
    """The random generator of the record at ``position`` of the global training order.

    Keyed by (seed, position) alone, so an image's crop, mirror and colour noise
    are the same whichever process, worker or thread draws them.
    """
    return np.random.Generator(np.random.Philox(key=[seed % 2**64, position]))


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Sec. 4.1 for a batch of records: random patch, mirror, mean subtraction, PCA colour.

    With ``preprocessing.finish_on_device`` the batch holds the uint8 patches and
    the draws (``device_augment.DRAW_FIELDS``) instead, for the device to finish.
    """

    preprocessing: Preprocessing
    seed: int

    def layout(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each field's shape and dtype in a batch of ``n``."""
        p = self.preprocessing
        size = p.crop_size
        if not p.finish_on_device:
            images = ((n, size, size, 3), numpy_dtype(p.dtype))
            return {"images": images, "labels": ((n,), np.dtype(np.int32))}
        return {
            "images": ((n, size, size, 3), np.dtype(np.uint8)),
            "labels": ((n,), np.dtype(np.int32)),
            "crop_top": ((n,), np.dtype(np.int32)),
            "crop_left": ((n,), np.dtype(np.int32)),
            "mirror": ((n,), np.dtype(np.bool_)),
            "colour_offset": ((n, 3), np.dtype(np.float32)),
        }

    def batch(
        self,
        records: Sequence[Any],
        positions: Sequence[int],
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The batch of ``records``, written into ``out``'s first rows (new arrays if None)."""
        p = self.preprocessing
        n, size = len(records), p.crop_size
        out = _rows(out, n) if out is not None else _allocate(self.layout(n))
        pca = {"eigenvalues": p.eigenvalues, "eigenvectors": p.eigenvectors, "pca_std": p.pca_std}
        for i, (record, position) in enumerate(zip(records, positions, strict=True)):
            pixels, out["labels"][i] = decode_record(record)
            rng = record_rng(self.seed, position)
            if not p.finish_on_device:
                out["images"][i] = augment.train_augment(pixels, rng, **pca, **p.crop_options())
                continue
            d = augment.train_draws(rng, *pixels.shape[:2], crop_size=size, **pca)
            out["images"][i] = augment.crop(pixels, d.top, d.left, size)
            out["crop_top"][i], out["crop_left"][i], out["mirror"][i] = d.top, d.left, d.mirror
            out["colour_offset"][i] = 0.0 if d.colour_offset is None else d.colour_offset
        return out


def _allocate(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    return {name: np.empty(shape, dtype) for name, (shape, dtype) in layout.items()}


def _rows(out: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {name: array[:n] for name, array in out.items()}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """The test views of a record, mean-subtracted and scaled on the host.

    The central patch (crop x crop x 3) or, with ``ten_crop``, the paper's ten
    test patches (10 x crop x crop x 3, in augment.TEN_CROP_POSITIONS order).
    With ``preprocessing.finish_on_device`` the host ships uint8 pixels instead:
    the central patch, or for ``ten_crop`` the whole 256 x 256 image, and
    ``device_augment.finish_eval_batch`` subtracts, scales and cuts the views.
    """

    preprocessing: Preprocessing
    ten_crop: bool = False

    def map(self, record: bytes) -> dict[str, Any]:
        pixels, label = decode_record(record)
        return {"images": self._views(pixels), "labels": np.int32(label)}

    def _views(self, pixels: np.ndarray) -> np.ndarray:
        p = self.preprocessing
        if p.finish_on_device:
            if self.ten_crop:
                return pixels
            top, left = augment.center_crop_window(*pixels.shape[:2], p.crop_size)
            return augment.crop(pixels, top, left, p.crop_size)
        views = augment.eval_views(pixels, ten_crop=self.ten_crop, **p.crop_options())
        return views if self.ten_crop else views[0]

    def layout(self, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each field's shape and dtype in a batch of ``n`` (prepared, 256 x 256, records)."""
        p = self.preprocessing
        if p.finish_on_device:
            size = writer.PREPARED_SIZE if self.ten_crop else p.crop_size
            images = ((n, size, size, 3), np.dtype(np.uint8))
        else:
            views = (10,) if self.ten_crop else ()
            images = ((n, *views, p.crop_size, p.crop_size, 3), numpy_dtype(p.dtype))
        return {"images": images, "labels": ((n,), np.dtype(np.int32))}

    def batch(
        self,
        records: Sequence[Any],
        positions: Sequence[int],
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The views of ``records``, written into ``out``'s first rows (new arrays if None)."""
        del positions  # Evaluation draws nothing.
        n = len(records)
        out = _rows(out, n) if out is not None else _allocate(self.layout(n))
        for i, record in enumerate(records):
            pixels, out["labels"][i] = decode_record(record)
            views = self._views(pixels)
            if views.shape != out["images"].shape[1:]:
                raise ValueError(
                    f"record {i} of an evaluation batch decodes to {pixels.shape[:2]} pixels; "
                    f"prepared images are all {writer.PREPARED_SIZE}x{writer.PREPARED_SIZE}"
                )
            out["images"][i] = views
        return out


class _Batches(grain.MapDataset):
    """Item ``k``: this process's block of global batch ``k``, transformed as one batch.

    Whole batches are the unit of work (and, with worker processes, of transfer),
    so grain handles one item per batch rather than one per image, and each
    image is written straight into the batch's arrays (``write``: a worker
    process's shared-memory slot). With ``process_count`` processes of a global
    batch of ``B``, process ``i`` takes the records at ``k * B + i * b ... k * B +
    (i + 1) * b - 1`` (``b = B / process_count``): the processes' batches
    concatenated in process order are the one-process batch.
    """

    def __init__(
        self,
        records: grain.MapDataset,
        transform: TrainTransform | EvalTransform,
        *,
        global_batch: int,
        local_batch: int,
        offset: int,
        drop_remainder: bool,
    ):
        super().__init__(records)
        self._transform = transform
        self._global_batch, self.local_batch, self._offset = global_batch, local_batch, offset
        self._drop_remainder = drop_remainder

    def __len__(self) -> int:
        full, rest = divmod(len(self._parents[0]), self._global_batch)
        if self._drop_remainder:
            return full
        return full + (rest > self._offset)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        return self.write(k, None)

    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """A full batch's fields: their shapes and dtypes."""
        return self._transform.layout(self.local_batch)

    def write(self, k: int, out: dict[str, np.ndarray] | None) -> Any:
        """Batch ``k`` written into ``out`` (returns its row count), or new arrays (returned)."""
        k %= len(self)  # As grain's own datasets do: ``repeat`` passes indices on as they are.
        records = self._parents[0]
        start = k * self._global_batch + self._offset
        positions = range(start, min(start + self.local_batch, len(records)))
        batch = self._transform.batch([records[i] for i in positions], positions, out)
        return batch if out is None else len(positions)


@dataclasses.dataclass(frozen=True)
class Loading:
    """How batches are read and decoded (``config.data``): it never changes the batches."""

    num_workers: int = 0  # Worker processes, each building whole batches; 0 = in-process.
    num_threads: int = 2  # In-process only: threads, each building whole batches.
    prefetch: int = 0  # Records decoded ahead per process (worker); 0 = two batches.

    @classmethod
    def from_config(cls, data_config: ml_collections.ConfigDict, num_workers: int) -> Loading:
        """``num_workers`` is ``config.data.num_workers`` resolved for this host
        (``tuning.input_workers``)."""
        d = data_config
        return cls(num_workers=num_workers, num_threads=d.num_threads, prefetch=d.prefetch)


class BatchIterator:
    """Batches in order, checkpointable by the index of the next batch alone.

    The state names no worker or thread, so a run saved on one host resumes
    with the same batches on a host with another number of cores. grain's
    checkpoint handler saves ``get_state()``'s bytes as they are and calls
    ``start_prefetch`` after ``set_state``.

    A batch is the caller's: it stays valid however long the caller keeps it.
    With worker processes its arrays are views of a shared-memory slot that
    goes back to its worker once the last of them is dropped
    (``workers.WorkerPool``); on the CPU backend a JAX array made from them
    may share their memory, and keeps the slot until it is gone too.
    """

    def __init__(
        self, batches: _Batches, loading: Loading, *, endless: bool = False, what: str = "input"
    ):
        self._batches, self._loading, self._endless, self._what = batches, loading, endless, what
        self._next_batch = 0
        self._iterator: Any = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self.start_prefetch()
        batch = next(self._iterator)
        self._next_batch += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"next_batch": self._next_batch}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        if not isinstance(saved, dict) or not isinstance(saved.get("next_batch"), int):
            raise IteratorStateError(
                "The data iterator's saved state is not a batch position ("
                f"{bytes(state[:120]).decode(errors='replace')!r}): it was written by an "
                "older alexnet_jax, whose iterator states this one cannot continue"
            )
        self.close()
        self._next_batch = saved["next_batch"]

    def start_prefetch(self) -> None:
        """Starts reading (and the worker processes) from the next batch on."""
        if self._iterator is None:
            self._iterator = self._open(self._next_batch)

    def _open(self, first: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches from ``first`` on: from worker processes, or threads in this process."""
        ahead = batches_ahead(self._loading, self._batches.local_batch)
        if self._loading.num_workers > 0:
            # One more slot than the batches ahead: the one the consumer holds.
            return workers.WorkerPool(
                self._batches,
                first,
                None if self._endless else len(self._batches),
                num_workers=self._loading.num_workers,
                slots_per_worker=ahead + 1,
                what=self._what,
            )
        remaining = (self._batches.repeat() if self._endless else self._batches)[first:]
        threads = self._loading.num_threads
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(ahead, threads))
        return iter(remaining.to_iter_dataset(read))

    def slot_owners(self) -> list[dict[int, str]]:
        """With worker processes, who holds each batch slot (``WorkerPool.slot_owners``)."""
        return self._iterator.slot_owners() if hasattr(self._iterator, "slot_owners") else []

    def close(self) -> None:
        """Stops the worker processes, if any; iterating again restarts them."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None


class IteratorStateError(errors.UsageError, ValueError):
    """A checkpoint's data iterator state that this version cannot continue."""


def batches_ahead(loading: Loading, local_batch: int) -> int:
    """Batches each worker process (or the threads) builds ahead of the consumer."""
    return -(-loading.prefetch // local_batch) if loading.prefetch > 0 else 2


def shuffled_records(dataset: Dataset, seed: int) -> grain.MapDataset:
    """The endless training order: the whole set reshuffled every epoch from ``seed``."""
    return grain.MapDataset.source(dataset.source("train")).seed(seed).shuffle().repeat(None)


def train_iterator(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    preprocessing: Preprocessing,
    loading: Loading = Loading(),
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """Endless, checkpointable iterator of host-local training batches.

    Each record's random crop, flip and colour noise are drawn from its
    position in the global order (``record_rng``), so the global batch (the
    processes' blocks in process order) is identical for any number of
    processes, workers and threads. ``batch_size`` is global.
    """
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    local_batch = batch_size // process_count
    batches = _Batches(
        shuffled_records(dataset, seed),
        TrainTransform(preprocessing, seed),
        global_batch=batch_size,
        local_batch=local_batch,
        offset=process_index * local_batch,
        drop_remainder=True,
    )
    return BatchIterator(batches, loading, what="training input")


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
    endless: bool = False,
) -> BatchIterator:
    """One pass over ``split`` in order; the last batch may be short.

    Images are B x crop x crop x 3 (centre patch), or with ``ten_crop``
    B x 10 x crop x crop x 3; average the softmax over axis 1 with
    ``augment.average_crop_softmax``. With ``preprocessing.finish_on_device``
    they are uint8 pixels (see ``EvalTransform``). PCA noise is never applied.
    ``endless`` repeats the pass without end (``inference.shard_images`` images
    each), so a training run's validation workers start once, not every pass.
    """
    local_batch = batch_size // process_count
    records = grain.MapDataset.source(dataset.source(split))[process_index::process_count]
    batches = _Batches(
        records,
        EvalTransform(preprocessing, ten_crop=ten_crop),
        global_batch=local_batch,
        local_batch=local_batch,
        offset=0,
        drop_remainder=False,
    )
    if ten_crop and loading.prefetch == 0 and not preprocessing.finish_on_device:
        # Ten float crops an image: two batches ahead of at most 64 images.
        loading = dataclasses.replace(loading, prefetch=min(2 * local_batch, 64))
    what = "validation input" if endless else "evaluation input"
    return BatchIterator(batches, loading, endless=endless, what=what)
