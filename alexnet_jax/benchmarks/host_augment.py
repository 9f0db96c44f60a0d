r"""Host work per training image, per core: what an accelerator's input needs from the host.

    python -m alexnet_jax.benchmarks.host_augment
    python -m alexnet_jax.benchmarks.host_augment --target_images_per_sec=25000

One thread, in alternating rounds on the same prepared 256px JPEG records
(``../shared/imagenet-samples`` prepared in memory, or synthetic images):
  1. Pillow decode + the full host augmentation (``augment.train_augment``);
  2. the pipeline's decoder (``pipeline.decode_jpeg``, simplejpeg) + the same;
  3. the pipeline's decoder + what the host does when the device finishes the
     augmentation (``config.data.augment_on=device``): the uint8 patch and the
     draws (``augment.train_draws``);
then the ratios 2/1 and 3/1, and how many such cores feed
``--target_images_per_sec`` with 3 (the rest of the host work, batching and
the copy to the device, is not counted).
"""

from __future__ import annotations

import glob
import io
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags
from PIL import Image

from alexnet_jax import cli
from alexnet_jax.data import augment, pipeline, writer

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "imagenet-samples")


def prepared_jpegs(samples_dir: str, synthetic: int) -> list[bytes]:
    """The samples as prepare stores them (256x256 JPEG), or ``synthetic`` noise images."""
    files = sorted(glob.glob(os.path.join(samples_dir, "*.JPEG")))
    if files:
        return [writer.encode_jpeg(writer.prepare_image(open(f, "rb").read())[0]) for f in files]
    rng = np.random.default_rng(0)
    smooth = [np.cumsum(rng.integers(-4, 5, (256, 256, 3)), 1) % 256 for _ in range(synthetic)]
    return [writer.encode_jpeg(Image.fromarray(a.astype(np.uint8))) for a in smooth]


def _pillow_decode(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


def _rate(work: Callable[[bytes, np.random.Generator], object], jpegs: list[bytes]) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for jpeg in jpegs:
        work(jpeg, rng)
    return len(jpegs) / (time.perf_counter() - start)


def run(samples_dir: str, synthetic: int, rounds: int, repeat: int, target: float) -> dict:
    jpegs = prepared_jpegs(samples_dir, synthetic) * repeat
    mean = np.full((256, 256, 3), 120.0, np.float32)
    eig = {"eigenvalues": augment.PAPER_EIGENVALUES, "eigenvectors": augment.PAPER_EIGENVECTORS}

    def full(decode):
        return lambda j, rng: augment.train_augment(decode(j), rng, mean=mean, **eig)

    def patch_and_draws(j, rng):
        pixels = pipeline.decode_jpeg(j)
        d = augment.train_draws(rng, 256, 256, **eig)
        return np.ascontiguousarray(augment.crop(pixels, d.top, d.left, augment.CROP_SIZE))

    works = {
        "pillow + host augmentation": full(_pillow_decode),
        "pipeline decoder + host augmentation": full(pipeline.decode_jpeg),
        "pipeline decoder + uint8 patch and draws": patch_and_draws,
    }
    rates: dict[str, list[float]] = {k: [] for k in works}
    for _ in range(rounds):
        for name, work in works.items():
            rates[name].append(_rate(work, jpegs))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    names = list(works)
    for name in names:
        print(f"{name:<42} {medians[name]:8.0f} images/s per core")
    print(f"ratio decoder (2/1): {medians[names[1]] / medians[names[0]]:.2f}x")
    print(f"ratio device-finished host work (3/1): {medians[names[2]] / medians[names[0]]:.2f}x")
    cores = target / medians[names[2]]
    print(f"cores for {target:.0f} images/s with 3: {cores:.1f} (decode and crop only)")
    return {"images_per_sec": medians, "cores_for_target": cores, "images": len(jpegs)}


def define_flags() -> None:
    flags.DEFINE_string("samples_dir", SAMPLES, "Real JPEGs to prepare in memory (if present).")
    flags.DEFINE_integer("synthetic_images", 100, "Synthetic images when samples_dir is empty.")
    flags.DEFINE_integer("rounds", 5, "Alternating timing rounds (medians reported).")
    flags.DEFINE_integer("repeat", 3, "Passes over the images per round.")
    flags.DEFINE_float("target_images_per_sec", 25000, "Images/s the accelerator should get.")


def main(argv) -> int:
    del argv
    return cli.run_reporting_errors(_run)


def _run() -> int:
    f = flags.FLAGS
    run(f.samples_dir, f.synthetic_images, f.rounds, f.repeat, f.target_images_per_sec)
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
