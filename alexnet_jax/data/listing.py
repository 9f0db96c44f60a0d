"""Listing a source: which accepted layout it is, its classes in label order, each split's images.

Each image is listed as a lightweight reference, in a fixed order; a reference
is a tuple whose first element says how to read it (``reading.py``):
  ("file", path, label, key)  ("tar", path, offset, size, label, key)
  ("tfds", index)             (label and key come from the record)
A folder without ``val/`` gets a seeded, stratified validation split held out
of its training images.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging

from alexnet_jax.data.sources import (
    SourceError,
    SourceSpec,
    ilsvrc2012_validation_wnids,
    ilsvrc2012_wnids,
    open_tfds,
    read_class_names,
)

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
WNID = re.compile(r"n\d{8}")
DEFAULT_VAL_FRACTION = 0.2
MIN_IMAGES_TO_SPLIT = 2  # One to train on and one to validate.


def all_wnids(names: Sequence[str]) -> bool:
    return bool(names) and all(WNID.fullmatch(n) for n in names)


def class_order(names: Sequence[str]) -> list[str]:
    """The classes' label order: ILSVRC-2012's when they are that set, else sorted."""
    if all_wnids(names):
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
        and all_wnids(classes)
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


def names_beside(spec: SourceSpec) -> dict[str, str]:
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
