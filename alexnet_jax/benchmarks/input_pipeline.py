r"""Does the input keep up? Pipeline vs full-size loader vs the train step, in one run.

    python -m alexnet_jax.benchmarks.input_pipeline

Measures, on the same machine in the same run:
  1. the grain training pipeline's images/s on prepared 256px data (decode,
     random crop, mirror, mean image, PCA colour, batch);
  2. a torchvision-style per-image loader on the original full-size JPEGs
     (PIL decode, resize the shorter side to 256, random crop, mirror, the
     same mean subtraction), with the same number of threads;
  3. the real jitted train step from ``alexnet_jax.train`` (the paper's width,
     batch 64 by default) in images/s.
Pipeline and loader are timed in alternating rounds and the medians reported,
so load from other processes affects both alike.

Images: ``../shared/imagenet-samples`` (100 real ImageNet JPEGs, class in the
file name) when present, prepared into a temporary directory with
``alexnet_jax.data.prepare`` first; otherwise synthetic camera-sized JPEGs.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import app, flags
from PIL import Image

from alexnet_jax import allocator, inference, tuning
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


WARMUP_STEPS = 3


def train_step_rate(width: float, batch_size: int, steps: int) -> float:
    """Images/s of the real jitted train step (after compilation), median over ``steps``."""
    import jax
    import jax.numpy as jnp

    from alexnet_jax import optim, train
    from configs import imagenet

    config = imagenet.get_config()
    config.model.width = width
    config.batch_size = batch_size
    model = inference.build_model(config)
    optimizer = optim.make_optimizer(config)
    step_fn = train.jit_train_step(model, optimizer, optim.learning_rate_schedule(config))
    state = jax.jit(functools.partial(train.init_state, model, optimizer, 0))()
    rng = np.random.default_rng(0)
    batch = {
        "images": jnp.asarray(rng.normal(0, 50, (batch_size, 224, 224, 3)), jnp.float32),
        "labels": jnp.asarray(rng.integers(0, config.model.num_classes, batch_size), jnp.int32),
    }
    for _ in range(WARMUP_STEPS):  # The first compiles; the allocator's pool grows over a few.
        state, step_metrics = step_fn(state, batch)
        jax.block_until_ready(step_metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, step_metrics = step_fn(state, batch)
        jax.block_until_ready(step_metrics)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def run(
    *,
    samples_dir: str | None,
    synthetic_images: int = 100,
    batch_size: int = 64,
    num_threads: int = 2,
    rounds: int = 5,
    batches_per_round: int = 4,
    train_width: float = 1.0,
    train_steps: int = 3,
    dtype: str = "float32",
) -> dict[str, float]:
    """Runs the three measurements and prints them; returns the numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "source")
        if samples_dir and os.path.isdir(samples_dir):
            samples_as_folder(samples_dir, source)
            described = f"{len(os.listdir(os.path.join(source, 'train')))} real JPEGs"
            described += f" from {os.path.normpath(samples_dir)}"
        else:
            synthetic_folder(source, synthetic_images)
            described = f"{synthetic_images} synthetic JPEGs (no samples directory)"
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(os.path.join(source, "train"))
            for f in names
        )
        start = time.perf_counter()
        prepare.prepare(source, os.path.join(tmp, "prepared"), splits=("train",), num_workers=0)
        prepare_rate = len(files) / (time.perf_counter() - start)

        dataset = pipeline.open_dataset(os.path.join(tmp, "prepared"), how_to_prepare="-")
        preprocessing = pipeline.Preprocessing(
            mean=dataset.mean_image(),
            eigenvalues=dataset.rgb_eigen()[0],
            eigenvectors=dataset.rgb_eigen()[1],
            dtype=dtype,
        )
        train_iter = pipeline.train_iterator(
            dataset,
            batch_size=batch_size,
            seed=0,
            preprocessing=preprocessing,
            num_threads=num_threads,
        )
        loader = FullSizeLoader(files, dataset.mean_image(), num_threads)
        next(train_iter), loader.batch(batch_size)  # Warm up both.
        pipeline_rates, loader_rates = [], []
        next_pipeline_batch = functools.partial(next, train_iter)
        next_loader_batch = functools.partial(loader.batch, batch_size)
        for _ in range(rounds):
            pipeline_rates.append(_rate(next_pipeline_batch, batch_size, batches_per_round))
            loader_rates.append(_rate(next_loader_batch, batch_size, batches_per_round))
        loader.close()
        del train_iter

    pipeline_rate = statistics.median(pipeline_rates)
    loader_rate = statistics.median(loader_rates)
    step_rate = train_step_rate(train_width, batch_size, train_steps)
    results = {
        "prepare_images_per_sec": prepare_rate,
        "pipeline_images_per_sec": pipeline_rate,
        "full_size_loader_images_per_sec": loader_rate,
        "pipeline_over_loader": pipeline_rate / loader_rate,
        "train_step_images_per_sec": step_rate,
        "pipeline_over_train_step": pipeline_rate / step_rate,
    }
    rows = [
        ("preparation, full-size JPEG -> 256px shard", prepare_rate, "images/s"),
        (f"grain train pipeline, prepared 256px, {dtype}", pipeline_rate, "images/s"),
        ("full-size per-image loader (PIL)", loader_rate, "images/s"),
        ("pipeline / full-size loader", results["pipeline_over_loader"], "x"),
        (f"train step, width {train_width:g}, batch {batch_size}", step_rate, "images/s"),
        ("pipeline / train step", results["pipeline_over_train_step"], "x"),
    ]
    print(f"Input pipeline benchmark: {described}; batch {batch_size}, {num_threads} threads")
    for label, value, unit in rows:
        print(f"  {label + ':':47s} {value:9.2f} {unit}")
    keeps_up = "yes" if results["pipeline_over_train_step"] >= 1 else "NO"
    print(f"  input keeps up with the train step: {keeps_up}")
    return results


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (no clashes on import)."""
    flags.DEFINE_string(
        "samples_dir", DEFAULT_SAMPLES, "Real JPEGs (<wnid>_<name>.JPEG); '' = synthetic."
    )
    flags.DEFINE_integer("synthetic_images", 100, "Synthetic images when there is no samples_dir.")
    flags.DEFINE_integer("batch_size", 64, "Batch size for the pipeline, the loader and the step.")
    flags.DEFINE_integer("num_threads", 2, "Decoding threads (grain threads; loader workers).")
    flags.DEFINE_integer("rounds", 5, "Alternating timing rounds (medians reported).")
    flags.DEFINE_integer("batches_per_round", 4, "Batches timed per round.")
    flags.DEFINE_float("train_width", 1.0, "Model width for the train step (1.0 = the paper's).")
    flags.DEFINE_integer("train_steps", 3, "Timed train steps after compilation.")
    flags.DEFINE_enum("dtype", "float32", list(pipeline.DTYPES), "Pipeline batch dtype.")


def main(argv) -> None:
    del argv
    tuning.configure_process()  # As launch.py does, before JAX starts its backends.
    allocator.use(tuning.host_allocator())  # May restart this command once.
    run(
        samples_dir=FLAGS.samples_dir or None,
        synthetic_images=FLAGS.synthetic_images,
        batch_size=FLAGS.batch_size,
        num_threads=FLAGS.num_threads,
        rounds=FLAGS.rounds,
        batches_per_round=FLAGS.batches_per_round,
        train_width=FLAGS.train_width,
        train_steps=FLAGS.train_steps,
        dtype=FLAGS.dtype,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
