"""An ImageNet-shaped prepared dataset in seconds, for runs that time the training loop.

    python -m alexnet_jax.benchmarks.synthetic_imagenet --output_dir=DIR \
        --train_records=5120 --val_records=1024

The records are what ``prepare`` writes for ImageNet (256x256 JPEGs, the
ILSVRC-2012 class list, the mean image and RGB PCA in ``metadata.json``),
so the loop reads, decodes and crops them as it would ImageNet's. Only a few
dozen distinct smooth random images are drawn and encoded, then repeated
with labels cycling over the 1000 classes: the data cannot be learnt, and
writing thousands of records takes seconds instead of a ``prepare`` run over
full-size JPEGs. ``gpu.sh``'s training-loop stages run on it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from PIL import Image

from alexnet_jax import cli, errors
from alexnet_jax.data import records, sources, writer

SIZE = writer.PREPARED_SIZE


class DatasetExistsError(errors.UsageError, FileExistsError):
    """The output folder already holds a prepared dataset: it is never overwritten."""


def smooth_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A size x size x 3 uint8 image: a coarse random grid, upsampled, plus a little noise.

    Smooth like a photograph, so its JPEG is about as large and as slow to decode.
    """
    coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float64)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def _repeats(count: int, distinct: int) -> list[int]:
    """How often each distinct image occurs among ``count`` records (record i uses i % distinct)."""
    return [len(range(i, count, distinct)) for i in range(distinct)]


def write(
    output_dir: str,
    *,
    train_records: int,
    val_records: int,
    distinct_images: int = 48,
    seed: int = 0,
) -> dict:
    """Writes the dataset into ``output_dir`` (created; must hold no dataset yet); its metadata.

    Record i of a split is distinct image ``i % distinct_images`` with label
    ``i % 1000``. The mean image and RGB PCA are those of the training records
    (each distinct image counted as often as it occurs).
    """
    output_dir = os.path.expanduser(output_dir)
    if records.read_metadata(output_dir) is not None:
        raise DatasetExistsError(f"{output_dir} already holds a prepared dataset: give a new one")
    os.makedirs(output_dir, exist_ok=True)
    wnids = sources.ilsvrc2012_wnids()
    rng = np.random.default_rng(seed)
    images = [smooth_image(rng) for _ in range(distinct_images)]
    jpegs = [writer.encode_jpeg(Image.fromarray(image)) for image in images]

    stats = writer.RgbStatistics()
    for image, times in zip(images, _repeats(train_records, distinct_images), strict=True):
        single = writer.RgbStatistics()
        single.add(image)
        repeated = {k: v * times for k, v in single.state().items()}
        stats.merge(writer.RgbStatistics.from_state(repeated))

    splits = {}
    for split, count in (("train", train_records), ("val", val_records)):

        def examples(split=split, count=count):
            for i in range(count):
                label = i % len(wnids)
                yield jpegs[i % distinct_images], label, f"{split}/{wnids[label]}_{i:07d}.JPEG"

        path = os.path.join(output_dir, records.shard_filename(split, 0, 1))
        splits[split] = {"num_examples": writer.write_shard(path, examples()), "num_shards": 1}
    metadata = {
        "name": "synthetic_imagenet",
        "seed": seed,
        "distinct_images": distinct_images,
        "image_size": SIZE,
        "classes": [{"id": wnid, "name": wnid} for wnid in wnids],
        "standard_ilsvrc2012_order": True,
        "splits": splits,
        **stats.to_metadata(output_dir),
        "bad_files": [],
    }
    records.write_metadata(output_dir, metadata)
    return metadata


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs."""
    flags.DEFINE_string("output_dir", None, "New folder for the prepared dataset.", required=True)
    flags.DEFINE_integer("train_records", 5120, "Training records.", lower_bound=1)
    flags.DEFINE_integer("val_records", 1024, "Validation records.", lower_bound=1)
    flags.DEFINE_integer("distinct_images", 48, "Distinct images, repeated.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seeds the images.")


def main(argv: Sequence[str]) -> int:
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    metadata = write(
        FLAGS.output_dir,
        train_records=FLAGS.train_records,
        val_records=FLAGS.val_records,
        distinct_images=FLAGS.distinct_images,
        seed=FLAGS.seed,
    )
    splits = ", ".join(f"{s}: {v['num_examples']}" for s, v in metadata["splits"].items())
    print(
        f"Synthetic ImageNet-shaped dataset in {FLAGS.output_dir}: {splits} records of "
        f"{FLAGS.distinct_images} distinct {SIZE}x{SIZE} images, {len(metadata['classes'])} "
        f"classes, written in {time.perf_counter() - start:.1f} s"
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
