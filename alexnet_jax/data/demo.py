"""A built-in, ImageNet-shaped demo dataset: generated, never downloaded.

Ten visually distinct classes of drawn shapes and textures on noisy
backgrounds, in random colours, positions and sizes. Each image is first
encoded as a JPEG of a random size (as camera images arrive), then put
through the same 256x256 preparation as ImageNet and written in the same
ArrayRecord format, so the demo exercises the real input pipeline.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from alexnet_jax.data import records, writer

CLASSES = (
    ("disc", "filled disc"),
    ("square", "filled square"),
    ("triangle", "filled triangle"),
    ("ring", "hollow ring"),
    ("cross", "plus-shaped cross"),
    ("hstripes", "horizontal stripes"),
    ("vstripes", "vertical stripes"),
    ("checker", "checkerboard"),
    ("dstripes", "diagonal stripes"),
    ("dots", "grid of dots"),
)
DEMO_VERSION = 1
SPLIT_SEEDS = {"train": 0, "val": 1}
# Written into every folder the demo generates: the files it wrote there. Only a folder with
# this marker is ever regenerated, and only the files it lists are removed.
MARKER_FILE = "alexnet_jax_demo.json"


class ForeignDirectoryError(FileExistsError):
    """The folder holds files the demo did not create: it is never written to or deleted."""

    def __init__(self, data_dir: str, entries: list[str]):
        self.data_dir, self.entries = data_dir, entries
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        super().__init__(
            f"{data_dir} holds files the demo did not create ({shown}) and no {MARKER_FILE}"
        )


def _marker_path(data_dir: str) -> str:
    return os.path.join(data_dir, MARKER_FILE)


def _claim(data_dir: str) -> set[str]:
    """Makes ``data_dir`` the demo's own, removing only what an earlier demo wrote there.

    Returns the entries left in it (the marker aside). Raises ForeignDirectoryError,
    touching nothing, when the folder is not empty and carries no marker.
    """
    os.makedirs(data_dir, exist_ok=True)
    marker = _marker_path(data_dir)
    if os.path.isfile(marker):
        with open(marker) as f:
            written = json.load(f).get("files", [])
        for name in written:
            path = os.path.join(data_dir, name)
            # Plain file names only: a marker can never point outside its folder.
            if (
                name == os.path.basename(name)
                and name not in ("", ".", "..")
                and (os.path.isfile(path) or os.path.islink(path))
            ):
                os.remove(path)
    elif os.listdir(data_dir):
        raise ForeignDirectoryError(data_dir, sorted(os.listdir(data_dir)))
    _write_marker(data_dir, [])
    return set(os.listdir(data_dir)) - {MARKER_FILE}


def _write_marker(data_dir: str, files: list[str]) -> None:
    with open(_marker_path(data_dir), "w") as f:
        json.dump({"generator": "alexnet_jax.data.demo", "files": files}, f, indent=1)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _distinct_colours(rng: np.random.Generator) -> tuple[tuple, tuple]:
    """A foreground/background pair far enough apart to see the shape."""
    while True:
        a, b = _colour(rng), _colour(rng)
        if np.abs(np.subtract(a, b)).sum() > 180:
            return a, b


def draw_example(label: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label`` at a random size between 160 and 400 px."""
    w, h = (int(v) for v in rng.integers(160, 401, 2))
    fg, bg = _distinct_colours(rng)
    image = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(image)
    name = CLASSES[label][0]
    side = min(w, h)
    r = int(side * rng.uniform(0.2, 0.35))
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    period = int(side * rng.uniform(0.08, 0.18))
    if name == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(3, r // 4))
    elif name == "cross":
        t = max(3, r // 3)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fg)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fg)
    elif name == "hstripes":
        for y in range(0, h, period):
            draw.rectangle((0, y, w, y + period // 2), fill=fg)
    elif name == "vstripes":
        for x in range(0, w, period):
            draw.rectangle((x, 0, x + period // 2, h), fill=fg)
    elif name == "checker":
        for y in range(0, h, period):
            for x in range((y // period) % 2 * period, w, 2 * period):
                draw.rectangle((x, y, x + period - 1, y + period - 1), fill=fg)
    elif name == "dstripes":
        for d in range(-h, w, period):
            draw.line((d, 0, d + h, h), fill=fg, width=max(2, period // 2))
    elif name == "dots":
        dot = max(2, period // 4)
        for y in range(period // 2, h, period):
            for x in range(period // 2, w, period):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=fg)
    pixels = np.asarray(image, np.float32)
    pixels += rng.normal(0.0, 12.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _source_jpeg(label: int, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    draw_example(label, rng).save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
    return buffer.getvalue()


def generate(
    data_dir: str, *, train_per_class: int = 300, val_per_class: int = 50, seed: int = 0
) -> dict:
    """Writes the demo dataset to ``data_dir`` (deterministic in ``seed``).

    ``data_dir`` must be new, empty, or an earlier demo's (``MARKER_FILE``);
    otherwise ForeignDirectoryError is raised and nothing is written.
    """
    data_dir = os.path.expanduser(data_dir)
    kept = _claim(data_dir)
    start = time.time()
    stats = writer.RgbStatistics()
    splits = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        examples = []
        for index in range(per_class * len(CLASSES)):
            label = index % len(CLASSES)
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
            source = _source_jpeg(label, rng)
            prepared = writer.resize_and_center_crop(Image.open(io.BytesIO(source)))
            if split == "train":
                stats.add(np.asarray(prepared))
            key = f"{split}/{CLASSES[label][0]}_{index:06d}.jpg"
            examples.append((writer.encode_jpeg(prepared), label, key))
        path = os.path.join(data_dir, records.shard_filename(split, 0, 1))
        writer.write_shard(path, examples)
        splits[split] = {"num_examples": len(examples), "num_shards": 1}
    metadata = {
        "name": "demo",
        "demo_version": DEMO_VERSION,
        "seed": seed,
        "image_size": writer.PREPARED_SIZE,
        "classes": [{"id": cid, "name": name} for cid, name in CLASSES],
        "splits": splits,
        **stats.to_metadata(data_dir),
        "bad_files": [],
    }
    records.write_metadata(data_dir, metadata)
    _write_marker(data_dir, sorted(set(os.listdir(data_dir)) - kept - {MARKER_FILE}))
    logging.info(
        "Generated demo dataset in %s (%s) in %.1fs",
        data_dir,
        ", ".join(f"{s}: {v['num_examples']}" for s, v in splits.items()),
        time.time() - start,
    )
    return metadata


def ensure(data_dir: str, *, train_per_class: int, val_per_class: int, seed: int) -> dict:
    """Returns the demo metadata, generating the dataset first if it is absent or stale.

    A stale dataset is regenerated only in a folder the demo made (``generate``).
    """
    data_dir = os.path.expanduser(data_dir)
    metadata = records.read_metadata(data_dir)
    wanted = {
        "demo_version": DEMO_VERSION,
        "seed": seed,
        "train": train_per_class * len(CLASSES),
        "val": val_per_class * len(CLASSES),
    }
    if metadata is not None:
        found = {
            "demo_version": metadata.get("demo_version"),
            "seed": metadata.get("seed"),
            "train": metadata["splits"]["train"]["num_examples"],
            "val": metadata["splits"]["val"]["num_examples"],
        }
        if found == wanted:
            return metadata
        if os.path.isfile(_marker_path(data_dir)):
            logging.info(
                "Demo dataset in %s is stale (%s != %s): regenerating", data_dir, found, wanted
            )
    logging.info("Generating the demo dataset in %s (first use only)...", data_dir)
    return generate(
        data_dir, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed
    )
