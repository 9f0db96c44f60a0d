r"""Does the input keep up? Pipeline vs full-size loader vs the train step, in one run.

    python -m alexnet_jax.benchmarks.input_pipeline       # configs/imagenet.py: batch 128
    python -m alexnet_jax.benchmarks.input_pipeline --config.batch_size=64 \
        --config.data.num_threads=2 --config.model.width=0.25

The batch size, the decoding threads and workers, the batch dtype, the
augmentation and the network are the config's (``--config`` plus
``--config.*`` overrides, as ``launch.py`` takes them). Measures, on the same
machine in the same run:
  1. the grain training pipeline's images/s on prepared 256px data (decode,
     random crop, mirror, mean image, PCA colour, batch), as ``config.data``
     sets it up;
  2. a torchvision-style per-image loader on the original full-size JPEGs
     (PIL decode, resize the shorter side to 256, random crop, mirror, the
     same mean subtraction), with ``config.data.num_threads`` threads;
  3. the config's jitted train step (``train_step.jax_train_step``: set up as
     the trainer sets it up) on a batch already on the device, in images/s;
  4. the same step fed by the pipeline as the training loop feeds it (the
     next batch is read while the device runs the step), and its ratio to 3.
Pipeline and loader are timed in alternating rounds and the medians reported,
so load from other processes affects both alike.

Images: ``../shared/imagenet-samples`` (100 real ImageNet JPEGs, class in the
file name) when present, prepared into a temporary directory with
``alexnet_jax.data.prepare`` first; otherwise synthetic camera-sized JPEGs.
The pipeline repeats them endlessly, so any batch size works.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from alexnet_jax import allocator, cli, config_lib, sharding, tuning
from alexnet_jax.benchmarks import train_step
from alexnet_jax.data import augment, pipeline, prepare, writer

DEFAULT_SAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "..",
    "shared",
    "imagenet-samples",
)


def samples_as_folder(samples_dir: str, root: str) -> dict[str, str]:
    """Lays ``<wnid>_<name>.JPEG`` files out as ``root/{train,val}/<wnid>/`` (symlinks).

    Also writes ``root/LOC_synset_mapping.txt`` so preparation picks up the
    class names. Returns {wnid: name}.
    """
    names = {}
    for file in sorted(os.listdir(samples_dir)):
        if not file.upper().endswith(".JPEG"):
            continue
        wnid, _, rest = file.partition("_")
        names[wnid] = os.path.splitext(rest)[0].replace("_", " ")
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            os.symlink(
                os.path.abspath(os.path.join(samples_dir, file)),
                os.path.join(root, split, wnid, file),
            )
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{wnid} {name}\n" for wnid, name in names.items())
    return names


def synthetic_folder(root: str, num_images: int, num_classes: int = 10) -> None:
    """Smooth random JPEGs at typical ImageNet sizes (about 500x375, some larger)."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        wnid = f"n{i % num_classes:08d}"
        w, h = (int(v) for v in rng.choice([(500, 375), (375, 500), (640, 480), (1024, 768)]))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 8, (h, w, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            image.save(os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG"), quality=90)


class FullSizeLoader:
    """The usual per-image loader: full JPEG decode, resize, crop, flip (threads, like workers)."""

    def __init__(self, files: list[str], mean_image: np.ndarray, num_threads: int, seed: int = 0):
        self.files, self.mean = files, mean_image
        self.pool = ThreadPoolExecutor(num_threads)
        self.seed, self.step = seed, 0

    def load(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        with Image.open(self.files[index % len(self.files)]) as image:
            image = writer.resize_and_center_crop(image.convert("RGB"))
        pixels = np.asarray(image)
        top, left, mirror = augment.random_crop_window(rng, 256, 256)
        patch = np.subtract(
            augment.crop(pixels, top, left, 224),
            augment.crop(self.mean, top, left, 224),
            dtype=np.float32,
        )
        return augment.flip_left_right(patch) if mirror else patch

    def batch(self, batch_size: int) -> np.ndarray:
        indices = range(self.step, self.step + batch_size)
        self.step += batch_size
        return np.stack(list(self.pool.map(self.load, indices)))

    def close(self) -> None:
        self.pool.shutdown()


def _rate(next_batch: Callable[[], object], batch_size: int, num_batches: int) -> float:
    start = time.perf_counter()
    for _ in range(num_batches):
        next_batch()
    return batch_size * num_batches / (time.perf_counter() - start)


WARMUP_STEPS = 3  # The first compiles; the host allocator's pool grows over a few.


def bare_step_rate(step: train_step.JaxStep, batch_size: int, steps: int) -> float:
    """Images/s of the compiled step on its fixed device batch, median over ``steps``."""
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def fed_step_rate(step: train_step.JaxStep, train_iter, batch_size: int, steps: int) -> float:
    """Images/s of the step fed from ``train_iter`` the way the training loop feeds it.

    Each host batch becomes a global array and the step is dispatched without
    waiting, so reading batch t+1 overlaps step t on the device; only the last
    step's metrics are fetched (the loop fetches them at log steps).
    """
    import jax

    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(step.dispatch(sharding.global_batch(step.mesh, next(train_iter))))
    start = time.perf_counter()
    for _ in range(steps):
        step_metrics = step.dispatch(sharding.global_batch(step.mesh, next(train_iter)))
    jax.block_until_ready(step_metrics)
    return batch_size * steps / (time.perf_counter() - start)


def _source_images(tmp: str, samples_dir: str | None, synthetic_images: int) -> tuple[str, str]:
    """Original JPEGs laid out in ``tmp/source``; returns (folder, one-line description)."""
    source = os.path.join(tmp, "source")
    if samples_dir and os.path.isdir(samples_dir):
        samples_as_folder(samples_dir, source)
        count = len(os.listdir(os.path.join(source, "train")))
        return source, f"{count} real JPEGs from {os.path.normpath(samples_dir)}"
    synthetic_folder(source, synthetic_images)
    return source, f"{synthetic_images} synthetic JPEGs (no samples directory)"


def run(
    config: ml_collections.ConfigDict,
    *,
    samples_dir: str | None,
    synthetic_images: int = 100,
    rounds: int = 5,
    batches_per_round: int = 4,
    train_steps: int = 3,
) -> dict[str, float]:
    """Runs the four measurements on ``config``'s pipeline and network; prints, returns them."""
    config_lib.validate(config)
    batch_size, data = config.batch_size, config.data
    with tempfile.TemporaryDirectory() as tmp:
        source, described = _source_images(tmp, samples_dir, synthetic_images)
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(os.path.join(source, "train"))
            for f in names
        )
        start = time.perf_counter()
        prepare.prepare(source, os.path.join(tmp, "prepared"), splits=("train",), num_workers=0)
        prepare_rate = len(files) / (time.perf_counter() - start)

        dataset = pipeline.open_dataset(os.path.join(tmp, "prepared"), how_to_prepare="-")
        new_iterator = functools.partial(
            pipeline.train_iterator,
            dataset,
            batch_size=batch_size,
            seed=config.seed,
            preprocessing=pipeline.Preprocessing.from_config(data, dataset),
            loading=pipeline.Loading.from_config(data),
        )
        train_iter = new_iterator()
        loader = FullSizeLoader(files, dataset.mean_image(), data.num_threads)
        next(train_iter), loader.batch(batch_size)  # Warm up both.
        pipeline_rates, loader_rates = [], []
        next_pipeline_batch = functools.partial(next, train_iter)
        next_loader_batch = functools.partial(loader.batch, batch_size)
        for _ in range(rounds):
            pipeline_rates.append(_rate(next_pipeline_batch, batch_size, batches_per_round))
            loader_rates.append(_rate(next_loader_batch, batch_size, batches_per_round))
        loader.close()
        del train_iter

        step = train_step.jax_train_step(config)
        step_rate = bare_step_rate(step, batch_size, train_steps)
        fed_rate = fed_step_rate(step, new_iterator(), batch_size, train_steps)
        del step

    pipeline_rate = statistics.median(pipeline_rates)
    loader_rate = statistics.median(loader_rates)
    results = {
        "prepare_images_per_sec": prepare_rate,
        "pipeline_images_per_sec": pipeline_rate,
        "full_size_loader_images_per_sec": loader_rate,
        "pipeline_over_loader": pipeline_rate / loader_rate,
        "train_step_images_per_sec": step_rate,
        "pipeline_over_train_step": pipeline_rate / step_rate,
        "fed_train_step_images_per_sec": fed_rate,
        "fed_over_train_step": fed_rate / step_rate,
    }
    m = config.model
    network = f"width {m.width:g}, {m.compute_dtype}, batch {batch_size}"
    rows = [
        ("preparation, full-size JPEG -> 256px shard", prepare_rate, "images/s"),
        (f"grain train pipeline, prepared 256px, {data.dtype}", pipeline_rate, "images/s"),
        ("full-size per-image loader (PIL)", loader_rate, "images/s"),
        ("pipeline / full-size loader", results["pipeline_over_loader"], "x"),
        (f"train step, {network}", step_rate, "images/s"),
        ("pipeline / train step", results["pipeline_over_train_step"], "x"),
        ("train step fed by the pipeline", fed_rate, "images/s"),
        ("fed / bare train step", results["fed_over_train_step"], "x"),
    ]
    print(
        f"Input pipeline benchmark: {described}; batch {batch_size}, {data.num_threads} "
        f"threads, {data.num_workers} workers"
    )
    for label, value, unit in rows:
        print(f"  {label + ':':47s} {value:9.2f} {unit}")
    keeps_up = "yes" if results["pipeline_over_train_step"] >= 1 else "NO"
    print(f"  input keeps up with the train step: {keeps_up}")
    return results


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (no clashes on import)."""
    config_flags.DEFINE_config_file(
        "config",
        train_step.DEFAULT_CONFIG,
        "Experiment config: batch size, config.data's pipeline, the network.",
        lock_config=True,
    )
    flags.DEFINE_string(
        "samples_dir", DEFAULT_SAMPLES, "Real JPEGs (<wnid>_<name>.JPEG); '' = synthetic."
    )
    flags.DEFINE_integer("synthetic_images", 100, "Synthetic images when there is no samples_dir.")
    flags.DEFINE_integer("rounds", 5, "Alternating timing rounds (medians reported).")
    flags.DEFINE_integer("batches_per_round", 4, "Batches timed per round.")
    flags.DEFINE_integer("train_steps", 3, "Timed train steps, bare and fed, after warm-up.")


def main(argv: Sequence[str]) -> int:
    """A bad flag or config value, or a missing path, is one ``error:`` line and exit 2."""
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config_lib.validate(FLAGS.config)
    tuning.configure_process()  # As launch.py does, before JAX starts its backends.
    allocator.use(tuning.host_allocator())  # May restart this command once.
    run(
        FLAGS.config,
        samples_dir=FLAGS.samples_dir or None,
        synthetic_images=FLAGS.synthetic_images,
        rounds=FLAGS.rounds,
        batches_per_round=FLAGS.batches_per_round,
        train_steps=FLAGS.train_steps,
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
