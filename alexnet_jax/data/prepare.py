r"""Prepare a dataset once: the paper's 256x256 images in ArrayRecord shards plus statistics.

    python -m alexnet_jax.data.prepare --source=/data/ilsvrc2012 \
        --output_dir=~/data/imagenet2012_prepared
    python -m alexnet_jax.data.prepare --source=~/my_photos --output_dir=~/my_photos_prepared

``--source`` is one of
  * a directory holding the official ``ILSVRC2012_img_train.tar`` (one tar
    per class inside) and ``ILSVRC2012_img_val.tar``; validation labels and
    the class list come from the copies tensorflow-datasets ships (no devkit);
  * a folder layout ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``
    (for ImageNet, <class> is a wnid, and a flat ``ROOT/val/ILSVRC2012_val_*.JPEG``
    is labelled like the tar);
  * a folder of class folders, ``ROOT/<class>/*.jpg`` (``cat/ dog/ bird/``);
  * ``tfds:imagenet2012`` (with ``--tfds_data_dir``) or the directory of a
    built tfds dataset, read through ``tfds.data_source`` (no TensorFlow).

Class names are the folder names (sorted; the ILSVRC-2012 order when they are
its 1000 wnids). Without a ``val/`` folder, a seeded, stratified share of each
class's images (``--val_fraction``, ``--split_seed``) is held out for
validation, and metadata.json records how (``val_split``). Hidden folders
(``.ipynb_checkpoints``) are never classes.

Each image gets Sec. 2's preprocessing (shorter side to 256, central
256x256 patch) and is stored as a JPEG in ``{split}-NNNNN-of-NNNNN.array_record``
(see ``records.py``). ``metadata.json``, written last, holds the class order
and names, per-split counts, the training set's mean image (``mean_image.npy``)
and RGB eigen-decomposition (for PCA colour augmentation), every file that
could not be used, with the reason (a bad file never stops the run), and how
many files were skipped for not having an image extension.

Shards are prepared in parallel (one process per core), each written
atomically, with its statistics saved beside it; an interrupted run re-run
with the same flags keeps the finished shards and redoes the rest, and the
result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from PIL import Image

from alexnet_jax import cli
from alexnet_jax.data import records, writer
from alexnet_jax.data.sources import (
    SPLITS,
    SourceError,
    SourceSpec,
    ilsvrc2012_validation_wnids,
    ilsvrc2012_wnids,
    open_tfds,
    read_class_names,
)
from alexnet_jax.progress import Progress

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
PROGRESS_DIR = "_progress"
DEFAULT_EXAMPLES_PER_SHARD = 1024
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SKIPPED_EXAMPLES = 10  # Skipped files named in metadata.json; all are counted.
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
WNID = re.compile(r"n\d{8}")
DEFAULT_VAL_FRACTION = 0.2
MIN_IMAGES_TO_SPLIT = 2  # One to train on and one to validate.

# What can happen to one input file. Converted files are kept; bad ones are
# listed in metadata["bad_files"] and left out.
CONVERTED_KINDS = ("grayscale", "cmyk", "other_mode", "high_depth", "not_jpeg")
BAD_KINDS = ("unreadable", "empty", "truncated", "undecodable", "unknown_label")


class WorkerError(RuntimeError):
    """A worker process failed on a whole task: a bug or a broken machine, not a bad file."""


# ---------------------------------------------------------------------------
# Class list and validation labels shipped inside tensorflow-datasets.


def _all_wnids(names: Sequence[str]) -> bool:
    return bool(names) and all(WNID.fullmatch(n) for n in names)


def class_order(names: Sequence[str]) -> list[str]:
    """The classes' label order: ILSVRC-2012's when they are that set, else sorted."""
    if _all_wnids(names):
        standard = ilsvrc2012_wnids()
        if set(names) == set(standard):
            return standard
        logging.warning(
            "%d classes that are not the ILSVRC-2012 1000: labels follow sorted class names",
            len(set(names)),
        )
    else:  # The user's own classes: nothing to warn about.
        logging.info("%d classes from the folder names: %s", len(set(names)), sorted(set(names)))
    return sorted(set(names))


# ---------------------------------------------------------------------------
# Sources: each lists its images as lightweight references in a fixed order.
# A reference is a tuple whose first element says how to read it:
#   ("file", path, label, key)  ("tar", path, offset, size, label, key)
#   ("tfds", index)             (label and key come from the record)


@dataclasses.dataclass
class SourceListing:
    spec: SourceSpec
    classes: list[str]  # Class ids (wnids, folder names) in label order.
    items: dict[str, list[tuple]]  # split -> references
    unknown_label: dict[str, list[tuple[str, str]]]  # split -> [(key, reason)]
    # split -> keys of entries left out for not being images (notes.txt, a stray folder).
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    val_split: dict[str, Any] | None = None  # How val was held out of train, if it was.


def detect_source(source: str, tfds_data_dir: str | None) -> SourceSpec:
    """Which of the accepted layouts ``source`` is; fails at once, saying what was expected."""
    expected = (
        "expected a folder of class folders (<class>/*.jpg, e.g. cat/ dog/ bird/), a folder "
        "with train/<class>/*.jpg and val/<class>/*.jpg (without val/, --val_fraction of train "
        f"is held out), a directory with {TRAIN_TAR} and {VAL_TAR}, 'tfds:imagenet2012' (with "
        "--tfds_data_dir), or a built tfds dataset directory (with dataset_info.json)"
    )
    if source.startswith("tfds:"):
        return SourceSpec("tfds", source[len("tfds:") :], tfds_data_dir)
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.isdir(path):
        raise SourceError(f"--source={source!r} does not exist or is not a directory: {expected}")
    if os.path.exists(os.path.join(path, TRAIN_TAR)) or os.path.exists(os.path.join(path, VAL_TAR)):
        return SourceSpec("tars", path)
    if os.path.isdir(os.path.join(path, "train")) or os.path.isdir(os.path.join(path, "val")):
        return SourceSpec("folder", path)
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return SourceSpec("tfds", path)
    if _class_folders(path, "", []):
        return SourceSpec("class_folders", path)
    images = [n for n in os.listdir(path) if _is_image_name(n)]
    if images:
        raise SourceError(
            f"--source={source!r} holds {len(images)} images but no class folders: put each "
            f"class's images in a folder of its own, {path}/<class>/*.jpg (the folder names "
            "become the class names), then run this command again"
        )
    raise SourceError(f"--source={source!r} holds none of the accepted layouts: {expected}")


def _val_wnid(name: str, val_wnids: list[str]) -> str | None:
    match = VAL_NUMBER.search(os.path.basename(name))
    if match is None or not 1 <= int(match.group(1)) <= len(val_wnids):
        return None
    return val_wnids[int(match.group(1)) - 1]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(directory: str, prefix: str, skipped: list[str]) -> list[str]:
    """The visible sub-folders of ``directory``, sorted; hidden ones' keys go to skipped."""
    names = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            names.append(entry.name)
        elif entry.is_dir():
            skipped.append(f"{prefix}{entry.name}")
    return names


def _stable_number(text: str) -> int:
    """A number that depends on ``text`` only (unlike ``hash``, the same in every process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def hold_out_validation(
    refs: Sequence[tuple],
    classes: Sequence[str],
    *,
    val_fraction: float,
    seed: int,
    class_dir: Callable[[str], str],
    held_out_from: str,
) -> tuple[list[tuple], list[tuple], dict[str, Any]]:
    """(train, val, record): ``val_fraction`` of each class's ("file", path, label, key) refs.

    Stratified (every class keeps at least one image on each side) and seeded
    per class name, so adding a class leaves the other classes' splits alone.
    A class with fewer than MIN_IMAGES_TO_SPLIT images cannot be split: all such
    classes are named, with their folders, in one SourceError.
    """
    by_label: dict[int, list[tuple]] = collections.defaultdict(list)
    for ref in refs:
        by_label[ref[2]].append(ref)
    counts = [len(by_label[label]) for label in range(len(classes))]
    too_few = [
        f"{class_dir(name)} ({n} image{'' if n == 1 else 's'})"
        for name, n in zip(classes, counts, strict=True)
        if n < MIN_IMAGES_TO_SPLIT
    ]
    if too_few:
        raise SourceError(
            f"cannot hold out validation images (--val_fraction={val_fraction}): each class "
            f"needs at least {MIN_IMAGES_TO_SPLIT} images, one to train on and one to validate, "
            f"but {len(too_few)} {'has' if len(too_few) == 1 else 'have'} fewer: "
            f"{', '.join(too_few)}. Add images to those folders "
            "or remove them, or give validation images of your own (ROOT/train/<class>/ and "
            "ROOT/val/<class>/)"
        )
    train, val, per_class = [], [], {}
    for label, name in enumerate(classes):
        class_refs = by_label[label]
        n = len(class_refs)
        num_val = min(n - 1, max(1, int(n * val_fraction + 0.5)))
        rng = np.random.default_rng([seed, _stable_number(name)])
        chosen = set(rng.permutation(n)[:num_val].tolist())
        val += [r for i, r in enumerate(class_refs) if i in chosen]
        train += [r for i, r in enumerate(class_refs) if i not in chosen]
        per_class[name] = {"train": n - num_val, "val": num_val}
    record = {
        "held_out_from": held_out_from,
        "val_fraction": val_fraction,
        "seed": seed,
        "stratified": True,
        "per_class": per_class,
    }
    logging.info(
        "No val/ folder: held out %d of %d images for validation (%.0f%% of each class, seed %d)",
        len(val),
        len(refs),
        100 * val_fraction,
        seed,
    )
    return train, val, record


def _image_names(directory: str, prefix: str, skipped: list[str]) -> list[str]:
    """The image-named entries of ``directory``, sorted; every other entry's key goes to skipped."""
    names = []
    for name in sorted(os.listdir(directory)):
        if _is_image_name(name):
            names.append(name)
        else:
            skipped.append(f"{prefix}/{name}")
    return names


def _list_tars(spec: SourceSpec, splits: Sequence[str]) -> SourceListing:
    train_tar, val_tar = (
        os.path.join(spec.location, TRAIN_TAR),
        os.path.join(spec.location, VAL_TAR),
    )
    if not os.path.exists(train_tar):
        raise SourceError(f"{train_tar} is missing: the class list and statistics come from it")
    logging.info("Indexing %s (reads tar headers only)...", train_tar)
    by_class: dict[str, list[tuple[str, int, int]]] = {}
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    with tarfile.open(train_tar, mode="r:") as outer:
        for member in outer:
            if not member.isfile() or not member.name.endswith(".tar"):
                if member.isfile():
                    skipped["train"].append(f"train/{member.name}")
                continue
            wnid = os.path.basename(member.name)[: -len(".tar")]
            entries = []
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                for image in inner:
                    if image.isfile():
                        offset = member.offset_data + image.offset_data
                        entries.append((image.name, offset, image.size))
            by_class[wnid] = sorted(entries)
    if not by_class:
        raise SourceError(f"{train_tar} holds no class tars (<wnid>.tar)")
    classes = class_order(list(by_class))
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    items: dict[str, list[tuple]] = {}
    unknown: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    if "train" in splits:
        items["train"] = [
            ("tar", train_tar, offset, size, label_of[wnid], f"train/{wnid}/{name}")
            for wnid in classes
            for name, offset, size in by_class[wnid]
        ]
    if "val" in splits:
        if not os.path.exists(val_tar):
            raise SourceError(f"{val_tar} is missing (or leave 'val' out of --splits)")
        val_wnids = ilsvrc2012_validation_wnids()
        entries = []
        with tarfile.open(val_tar, mode="r:") as tar:
            entries = sorted((m.name, m.offset_data, m.size) for m in tar if m.isfile())
        items["val"] = []
        for name, offset, size in entries:
            key = f"val/{os.path.basename(name)}"
            wnid = _val_wnid(name, val_wnids)
            if wnid in label_of:
                items["val"].append(("tar", val_tar, offset, size, label_of[wnid], key))
            else:
                unknown["val"].append((key, f"validation label {wnid!r} is not a training class"))
    return SourceListing(spec, classes, items, dict(unknown), dict(skipped))


def _list_folder(
    spec: SourceSpec, splits: Sequence[str], val_fraction: float, split_seed: int
) -> SourceListing:
    train_dir = os.path.join(spec.location, "train")
    expected = "expected train/<class>/*.jpg (and val/<class>/*.jpg, or none: --val_fraction)"
    if not os.path.isdir(train_dir):
        raise SourceError(f"{train_dir} is missing: {expected}")
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    wnids = _class_folders(train_dir, "train/", [])  # Hidden ones are reported below.
    if not wnids:
        raise SourceError(f"{train_dir} has no class folders: {expected}")
    classes = class_order(wnids)
    label_of = {wnid: i for i, wnid in enumerate(classes)}
    items: dict[str, list[tuple]] = {}
    unknown: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    hold_out = "val" in splits and not os.path.isdir(os.path.join(spec.location, "val"))
    for split in splits:
        if split == "val" and hold_out:
            continue
        root = os.path.join(spec.location, split)
        if not os.path.isdir(root):
            raise SourceError(f"{root} is missing (or leave {split!r} out of --splits)")
        items[split] = []
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        subdirs = _class_folders(root, f"{split}/", skipped[split])
        if subdirs:
            skipped[split] += [f"{split}/{e.name}" for e in entries if not e.is_dir()]
            for wnid in subdirs:
                directory = os.path.join(root, wnid)
                for name in _image_names(directory, f"{split}/{wnid}", skipped[split]):
                    key = f"{split}/{wnid}/{name}"
                    if wnid not in label_of:
                        unknown[split].append(
                            (key, f"class folder {wnid!r} is not a training class")
                        )
                        continue
                    path = os.path.join(root, wnid, name)
                    items[split].append(("file", path, label_of[wnid], key))
        else:  # A flat folder of ILSVRC2012_val_*.JPEG, labelled from the tfds copy.
            val_wnids = ilsvrc2012_validation_wnids()
            for name in _image_names(root, split, skipped[split]):
                key, wnid = f"{split}/{name}", _val_wnid(name, val_wnids)
                if wnid in label_of:
                    items[split].append(("file", os.path.join(root, name), label_of[wnid], key))
                else:
                    unknown[split].append((key, f"no known label for {name!r} ({wnid})"))
    val_split = None
    if hold_out:
        items["train"], items["val"], val_split = hold_out_validation(
            items["train"],
            classes,
            val_fraction=val_fraction,
            seed=split_seed,
            class_dir=lambda c: os.path.join(train_dir, c),
            held_out_from="train/",
        )
    return SourceListing(spec, classes, items, dict(unknown), dict(skipped), val_split)


def _list_class_folders(
    spec: SourceSpec, splits: Sequence[str], val_fraction: float, split_seed: int
) -> SourceListing:
    """ROOT/<class>/*: every image is listed under train, then val is held out of it."""
    root = spec.location
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    folders = _class_folders(root, "", skipped["train"])
    loose = sorted(e.name for e in os.scandir(root) if not e.is_dir())
    skipped["train"] += [n for n in loose if not _is_image_name(n)]
    outside = "an image outside the class folders: move it into ROOT/<class>/ to use it"
    unknown = {"train": [(n, outside) for n in loose if _is_image_name(n)]}
    classes = class_order(folders)
    refs = [
        ("file", os.path.join(root, name, image), label, f"{name}/{image}")
        for label, name in enumerate(classes)
        for image in _image_names(os.path.join(root, name), name, skipped["train"])
    ]
    items, val_split = {"train": refs}, None
    if "val" in splits:
        items["train"], items["val"], val_split = hold_out_validation(
            refs,
            classes,
            val_fraction=val_fraction,
            seed=split_seed,
            class_dir=lambda c: os.path.join(root, c),
            held_out_from="class folders",
        )
    return SourceListing(spec, classes, items, unknown, dict(skipped), val_split)


def _list_tfds(spec: SourceSpec, splits: Sequence[str]) -> SourceListing:
    try:
        builder, _ = open_tfds(spec, "train")
    except SourceError:
        raise
    except Exception as e:  # tfds raises several types for "not built here".
        raise SourceError(
            f"Could not open tfds dataset {spec.location!r} "
            f"(data_dir={spec.tfds_data_dir!r}): {e}. "
            "Build it first with tfds (manual_dir holding the ILSVRC tars), or pass its directory."
        ) from e
    classes = list(builder.info.features["label"].names)
    if set(classes) == set(ilsvrc2012_wnids()) and classes != ilsvrc2012_wnids():
        raise SourceError("the tfds dataset's classes are the ILSVRC-2012 set in another order")
    items = {}
    for split in splits:
        _, source = open_tfds(spec, split)
        items[split] = [("tfds", i) for i in range(len(source))]
    return SourceListing(spec, classes, items, {})


def list_source(
    spec: SourceSpec,
    splits: Sequence[str],
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> SourceListing:
    """The source's images per split; folders without val/ get a held-out one."""
    if spec.kind == "folder":
        return _list_folder(spec, splits, val_fraction, split_seed)
    if spec.kind == "class_folders":
        return _list_class_folders(spec, splits, val_fraction, split_seed)
    lister = {"tars": _list_tars, "tfds": _list_tfds}[spec.kind]
    return lister(spec, splits)


def default_name(spec: SourceSpec, classes: Sequence[str]) -> str:
    """The dataset's name in metadata.json: imagenet2012 for ILSVRC, else the source's name."""
    if spec.kind == "tars" or (
        spec.kind in ("folder", "class_folders")
        and len(classes) == 1000
        and _all_wnids(classes)
        and set(classes) == set(ilsvrc2012_wnids())
    ):
        return "imagenet2012"
    if spec.kind == "tfds" and not os.path.isdir(spec.location):
        return spec.location  # The registered name, e.g. imagenet2012.
    info = os.path.join(spec.location, "dataset_info.json")
    if spec.kind == "tfds" and os.path.exists(info):
        with open(info) as f:
            return json.load(f).get("name") or os.path.basename(spec.location.rstrip("/"))
    return os.path.basename(spec.location.rstrip("/"))


# ---------------------------------------------------------------------------
# One image: decode whatever it is, convert to RGB, the paper's 256x256 patch.


# ---------------------------------------------------------------------------
# One shard: read, convert, write atomically, then its statistics and report.


def _read_regular_file(path: str) -> bytes:
    """The file's bytes; OSError for anything but a regular file (a pipe would block forever)."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # Opening a pipe returns at once.
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | nonblocking)) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device or socket"
            raise OSError(f"not a regular file but {kind}")
        return f.read()


class _Reader:
    """Reads referenced images, keeping files and tfds sources open across reads."""

    def __init__(self, spec: SourceSpec, split: str):
        self.spec, self.split = spec, split
        self._files: dict[str, Any] = {}
        self._tfds = None

    def read(self, ref: tuple) -> tuple[bytes, int, str]:
        if ref[0] == "file":
            _, path, label, key = ref
            return _read_regular_file(path), label, key
        if ref[0] == "tar":
            _, path, offset, size, label, key = ref
            if path not in self._files:
                self._files[path] = open(path, "rb")  # noqa: SIM115 (closed in close())
            f = self._files[path]
            f.seek(offset)
            return f.read(size), label, key
        if self._tfds is None:
            self._tfds = open_tfds(self.spec, self.split)[1]
        example = self._tfds[ref[1]]
        name = example.get("file_name", b"")
        name = name.decode() if isinstance(name, bytes) else str(name)
        key = f"{self.split}/{name or ref[1]}"
        return example["image"], int(example["label"]), key

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _ref_key(ref: tuple, split: str) -> str:
    """The key a reference is reported under when it cannot even be read."""
    return f"{split}/{ref[1]}" if ref[0] == "tfds" else ref[-1]


def _read_error_reason(ref: tuple, error: OSError) -> str:
    """Why a referenced file could not be read, in words (a directory, a broken link...)."""
    path = ref[1] if ref[0] in ("file", "tar") else None
    if path and os.path.islink(path) and not os.path.exists(path):
        return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
    detail = f"{type(error).__name__}: {error.strerror or error}"
    if isinstance(error, IsADirectoryError):
        return f"a directory, not an image file ({detail})"
    if isinstance(error, PermissionError):
        return f"no permission to read it ({detail})"
    return f"cannot be read ({detail})"


def _read(reader: _Reader, ref: tuple) -> tuple[bytes, int, str]:
    """``reader.read``, with an OS error (a directory, a broken link, no permission) a bad file."""
    try:
        return reader.read(ref)
    except OSError as e:
        raise writer.BadImageError("unreadable", _read_error_reason(ref, e)) from None


def _prepare_file(data: bytes, key: str) -> tuple[Image.Image, list[str]]:
    """``prepare_image``, with any error decoding or converting one file a bad file, never fatal."""
    try:
        return writer.prepare_image(data)
    except writer.BadImageError:
        raise
    except Exception as e:  # e.g. a mode PIL cannot convert ('La'); logged in case it is a bug.
        logging.warning("%s could not be prepared", key, exc_info=True)
        raise writer.BadImageError("undecodable", f"{type(e).__name__}: {e}") from None


@dataclasses.dataclass(frozen=True)
class ShardTask:
    spec: SourceSpec
    split: str
    index: int
    num_shards: int
    refs: list[tuple]
    output_dir: str
    with_statistics: bool


def _shard_path(task: ShardTask) -> str:
    return os.path.join(
        task.output_dir, records.shard_filename(task.split, task.index, task.num_shards)
    )


def _report_path(output_dir: str, split: str, index: int, num_shards: int) -> str:
    name = records.shard_filename(split, index, num_shards)
    return os.path.join(output_dir, PROGRESS_DIR, name + ".json")


def _atomic_write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def prepare_shard(task: ShardTask) -> tuple[str, int, dict[str, Any]]:
    """Writes one shard and, last, its report (counts, bad files, statistics file)."""
    reader = _Reader(task.spec, task.split)
    stats = writer.RgbStatistics() if task.with_statistics else None
    counts = collections.Counter()
    bad_files = []

    def examples() -> Iterator[tuple[bytes, int, str]]:
        for ref in task.refs:
            key = _ref_key(ref, task.split)
            try:
                data, label, key = _read(reader, ref)
                image, conversions = _prepare_file(data, key)
            except writer.BadImageError as e:  # One file's fault: listed, never fatal.
                counts[e.kind] += 1
                bad_files.append({"key": key, "kind": e.kind, "reason": e.reason})
                continue
            counts.update(conversions)
            jpeg = writer.encode_jpeg(image)
            if stats is not None:
                # Statistics of the pixels the pipeline will decode, not the pre-JPEG ones.
                with Image.open(io.BytesIO(jpeg)) as stored:
                    stats.add(np.asarray(stored))
            yield jpeg, label, key

    try:
        count = writer.write_shard(_shard_path(task), examples())
    finally:
        reader.close()
    report = {"count": count, "counts": dict(sorted(counts.items())), "bad_files": bad_files}
    report_path = _report_path(task.output_dir, task.split, task.index, task.num_shards)
    if stats is not None:
        stats_file = os.path.basename(report_path)[: -len(".json")] + ".stats.npz"
        tmp = os.path.join(os.path.dirname(report_path), stats_file + ".tmp.npz")
        np.savez_compressed(tmp, **stats.state())
        os.replace(tmp, os.path.join(os.path.dirname(report_path), stats_file))
        report["statistics_file"] = stats_file
    _atomic_write_json(report_path, report)
    return task.split, task.index, report


def _load_report(output_dir: str, split: str, index: int, num_shards: int) -> dict | None:
    """A finished shard's report, or None when the shard must be (re)done."""
    path = _report_path(output_dir, split, index, num_shards)
    shard = os.path.join(output_dir, records.shard_filename(split, index, num_shards))
    if not (os.path.exists(path) and os.path.exists(shard)):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# Worker processes.


def _call_reporting_errors(fn: Callable[[Any], Any], task: Any) -> tuple[bool, Any]:
    """Runs in a worker: (True, fn(task)), or (False, the traceback as text) if it raised.

    Errors come back as plain results, so an exception that does not pickle
    cannot break the pool and the parent always learns what went wrong.
    """
    try:
        return True, fn(task)
    except Exception:
        return False, traceback.format_exc()


def map_unordered(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    num_workers: int,
    describe: Callable[[Any], str] = repr,
) -> Iterator[Any]:
    """Yields fn(task) for every task, as each finishes, from ``num_workers`` spawned processes.

    The first task that fails cancels every task not yet started and raises
    WorkerError naming it, once the running ones return (each is one shard,
    kept for a resume). A ProcessPoolExecutor, not multiprocessing.Pool:
    Pool.terminate() can deadlock against the pool's task-feeder thread.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as executor:
        try:
            futures = {executor.submit(_call_reporting_errors, fn, t): t for t in tasks}
            for future in concurrent.futures.as_completed(futures):
                task = futures[future]
                try:
                    ok, value = future.result()
                except concurrent.futures.BrokenExecutor as e:  # A worker process died.
                    raise WorkerError(
                        f"a worker process died while preparing {describe(task)} "
                        f"(killed, out of memory, or crashed): {e}"
                    ) from None
                if not ok:
                    raise WorkerError(f"preparing {describe(task)} failed:\n{value}")
                yield value
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def _describe_task(task: ShardTask) -> str:
    return f"{task.split} shard {task.index + 1} of {task.num_shards} ({_shard_path(task)})"


# ---------------------------------------------------------------------------
# The whole run.


def _fingerprint(listing: SourceListing, examples_per_shard: int) -> str:
    """Identifies the plan (inputs, order, sharding), so a resume never mixes two plans."""
    h = hashlib.sha256()
    h.update(json.dumps([listing.spec.kind, examples_per_shard, listing.classes]).encode())
    if listing.val_split is not None:  # Only then: older fingerprints stay valid.
        h.update(json.dumps(listing.val_split, sort_keys=True).encode())
    for split in sorted(listing.items):
        h.update(split.encode())
        for ref in listing.items[split]:
            h.update(repr(ref[-1] if ref[0] != "tfds" else ref[1]).encode())
    return h.hexdigest()[:16]


def prepare(
    source: str,
    output_dir: str,
    *,
    splits: Sequence[str] = SPLITS,
    examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD,
    num_workers: int | None = None,
    class_names_file: str | None = None,
    tfds_data_dir: str | None = None,
    name: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = 0,
) -> dict[str, Any]:
    """Prepares ``source`` into ``output_dir``; returns the metadata (with the summary).

    ``num_workers`` processes prepare shards in parallel (None: one per core;
    0: in this process). Finished shards from an earlier run with the same
    plan are kept. ``name`` (None: ``default_name``) is the dataset's name in
    metadata.json; ``val_fraction`` and ``split_seed`` apply to folders without val/.
    """
    if "train" not in splits:
        raise SourceError("--splits must include 'train': the statistics come from it")
    unknown_splits = set(splits) - set(SPLITS)
    if unknown_splits:
        raise SourceError(f"--splits has {sorted(unknown_splits)}; accepted: {SPLITS}")
    if examples_per_shard < 1:
        raise ValueError(f"examples_per_shard = {examples_per_shard} must be >= 1")
    if not 0 < val_fraction < 1:
        raise SourceError(
            f"--val_fraction={val_fraction} must be in (0, 1), e.g. 0.2; to prepare no "
            "validation split, pass --splits=train"
        )
    if split_seed < 0:
        raise SourceError(f"--split_seed={split_seed} must be >= 0")
    start = time.time()
    spec = detect_source(source, tfds_data_dir)
    listing = list_source(spec, splits, val_fraction=val_fraction, split_seed=split_seed)
    name = name or default_name(spec, listing.classes)
    fingerprint = _fingerprint(listing, examples_per_shard)
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    existing = records.read_metadata(output_dir)
    if existing is not None and existing.get("preparation", {}).get("fingerprint") == fingerprint:
        logging.info("%s is already prepared from this source: nothing to do", output_dir)
        return existing
    os.makedirs(os.path.join(output_dir, PROGRESS_DIR), exist_ok=True)
    plan_path = os.path.join(output_dir, PROGRESS_DIR, "plan.json")
    plan = {"fingerprint": fingerprint, "source": source, "examples_per_shard": examples_per_shard}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f)
        if previous["fingerprint"] != fingerprint:
            raise SourceError(
                f"{output_dir} holds a partial preparation of another source or shard size "
                f"({previous}); use another --output_dir or delete this one"
            )
    elif existing is not None:
        raise SourceError(f"{output_dir} already holds a different prepared dataset")
    _atomic_write_json(plan_path, plan)

    tasks, reports = [], {}
    for split in splits:
        refs = listing.items[split]
        num_shards = max(1, -(-len(refs) // examples_per_shard))
        for index in range(num_shards):
            report = _load_report(output_dir, split, index, num_shards)
            if report is not None:
                reports[(split, index)] = report
                continue
            chunk = refs[index * examples_per_shard : (index + 1) * examples_per_shard]
            tasks.append(
                ShardTask(spec, split, index, num_shards, chunk, output_dir, split == "train")
            )
    total_images = sum(len(listing.items[s]) for s in splits)
    done_images = sum(r["count"] + len(r["bad_files"]) for r in reports.values())
    total_shards = len(tasks) + len(reports)
    logging.info(
        "Preparing %s (%s) into %s: %d shards to do, %d already done, %s workers",
        source,
        ", ".join(f"{s}: {len(listing.items[s])} images" for s in splits),
        output_dir,
        len(tasks),
        len(reports),
        "no" if num_workers == 0 else (num_workers or os.cpu_count()),
    )
    progress = Progress(total_images, unit="images", done=done_images)
    if num_workers == 0:
        results = (prepare_shard(task) for task in tasks)
    else:
        workers = num_workers or os.cpu_count() or 1
        results = map_unordered(prepare_shard, tasks, workers, _describe_task)
    with contextlib.closing(results):  # Closing map_unordered stops its workers.
        for split, index, report in results:
            reports[(split, index)] = report
            shards = f"{len(reports)}/{total_shards} shards, "
            progress.update(report["count"] + len(report["bad_files"]), prefix=shards)
    progress.update(0, prefix=f"{len(reports)}/{total_shards} shards, ", force=True)
    class_names = read_class_names(class_names_file) or _names_beside(spec)
    metadata = _finish(
        listing, reports, output_dir, fingerprint, examples_per_shard, name, class_names
    )
    metadata["seconds"] = round(time.time() - start, 1)  # Returned, not stored: runs match.
    _log_summary(metadata)
    return metadata


def _names_beside(spec: SourceSpec) -> dict[str, str]:
    """Class names from a LOC_synset_mapping.txt next to the source, if there is one."""
    if spec.kind == "tfds":
        return {}
    return read_class_names(
        next(
            (
                os.path.join(spec.location, n)
                for n in ("LOC_synset_mapping.txt", "synset_words.txt")
                if os.path.exists(os.path.join(spec.location, n))
            ),
            None,
        )
    )


def _finish(
    listing: SourceListing,
    reports: dict[tuple[str, int], dict],
    output_dir: str,
    fingerprint: str,
    examples_per_shard: int,
    name: str,
    class_names: dict[str, str],
) -> dict[str, Any]:
    """Merges shard reports and statistics into metadata.json (written last)."""
    stats = writer.RgbStatistics()
    splits, bad_files, summary = {}, [], {}
    for split in listing.items:
        shard_reports = [reports[k] for k in sorted(reports) if k[0] == split]
        counts = collections.Counter()
        for report in shard_reports:
            counts.update(report["counts"])
            bad_files.extend({"split": split, **b} for b in report["bad_files"])
            if "statistics_file" in report:
                with np.load(
                    os.path.join(output_dir, PROGRESS_DIR, report["statistics_file"])
                ) as z:
                    stats.merge(writer.RgbStatistics.from_state(dict(z)))
        for key, reason in listing.unknown_label.get(split, []):
            counts["unknown_label"] += 1
            bad_files.append(
                {"split": split, "key": key, "kind": "unknown_label", "reason": reason}
            )
        written = sum(r["count"] for r in shard_reports)
        splits[split] = {"num_examples": written, "num_shards": len(shard_reports)}
        summary[split] = {
            "written": written,
            **{k: counts.get(k, 0) for k in CONVERTED_KINDS + BAD_KINDS},
            "skipped": len(listing.skipped.get(split, [])),
        }
    skipped = [key for split in listing.items for key in listing.skipped.get(split, [])]
    metadata = {
        "name": name,
        "source_kind": listing.spec.kind,
        "image_size": writer.PREPARED_SIZE,
        "jpeg_quality": writer.JPEG_QUALITY,
        "classes": [{"id": wnid, "name": class_names.get(wnid, wnid)} for wnid in listing.classes],
        "standard_ilsvrc2012_order": len(listing.classes) == 1000
        and _all_wnids(listing.classes)
        and listing.classes == ilsvrc2012_wnids(),
        "splits": splits,
        **({"val_split": listing.val_split} if listing.val_split is not None else {}),
        **stats.to_metadata(output_dir),
        "bad_files": bad_files,
        # Not image files by their extension, so never read: how many, and a few of them.
        "skipped_files": {"count": len(skipped), "examples": skipped[:SKIPPED_EXAMPLES]},
        "summary": summary,
        "preparation": {"fingerprint": fingerprint, "examples_per_shard": examples_per_shard},
    }
    records.write_metadata(output_dir, metadata)
    shutil.rmtree(os.path.join(output_dir, PROGRESS_DIR), ignore_errors=True)
    return metadata


def _log_summary(metadata: dict[str, Any]) -> None:
    lines = [f"Prepared {metadata['name']} in {metadata['seconds']}s:"]
    for split, counts in metadata["summary"].items():
        converted = ", ".join(f"{k} {counts[k]}" for k in CONVERTED_KINDS)
        bad = ", ".join(f"{k} {counts[k]}" for k in BAD_KINDS)
        lines.append(
            f"  {split}: {counts['written']} written; converted: {converted}; bad: {bad}; "
            f"skipped (not an image extension): {counts['skipped']}"
        )
    for bad in metadata["bad_files"][:20]:
        lines.append(f"  bad file {bad['key']}: {bad['kind']} ({bad['reason']})")
    if len(metadata["bad_files"]) > 20:
        lines.append(f"  ... and {len(metadata['bad_files']) - 20} more in metadata.json")
    skipped = metadata["skipped_files"]
    if skipped["count"]:
        more = skipped["count"] - len(skipped["examples"])
        lines.append(
            f"  skipped {skipped['count']} files, e.g. {', '.join(skipped['examples'])}"
            + (f" and {more} more" if more else "")
        )
    print("\n".join(lines), flush=True)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (no clashes on import)."""
    flags.DEFINE_string("source", None, "ILSVRC tars directory, folder layout, or tfds:<name>.")
    flags.DEFINE_string("output_dir", None, "Where the prepared dataset is written.")
    flags.DEFINE_list("splits", list(SPLITS), "Splits to prepare.")
    flags.DEFINE_integer("examples_per_shard", DEFAULT_EXAMPLES_PER_SHARD, "Images per shard.")
    flags.DEFINE_integer("num_workers", None, "Worker processes (default: one per core; 0: none).")
    flags.DEFINE_string("class_names_file", None, "Optional 'wnid name' lines for class names.")
    flags.DEFINE_string("tfds_data_dir", None, "tfds data_dir for --source=tfds:<name>.")
    flags.DEFINE_string(
        "name", None, "Dataset name in metadata.json (default: imagenet2012, or the folder's name)."
    )
    flags.DEFINE_float(
        "val_fraction",
        DEFAULT_VAL_FRACTION,
        "Without a val/ folder: this share of each class is held out for validation.",
    )
    flags.DEFINE_integer("split_seed", 0, "Seed of that held-out split (recorded in metadata).")


def main(argv: Sequence[str]) -> int:
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    del argv
    if not FLAGS.source or not FLAGS.output_dir:
        raise app.UsageError("--source and --output_dir are required")
    try:
        prepare(
            FLAGS.source,
            FLAGS.output_dir,
            splits=FLAGS.splits,
            examples_per_shard=FLAGS.examples_per_shard,
            num_workers=FLAGS.num_workers,
            class_names_file=FLAGS.class_names_file,
            tfds_data_dir=FLAGS.tfds_data_dir,
            name=FLAGS.name,
            val_fraction=FLAGS.val_fraction,
            split_seed=FLAGS.split_seed,
        )
    except WorkerError as e:  # A broken worker: the run stops with what it knows.
        sys.exit(f"error: {e}")
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
