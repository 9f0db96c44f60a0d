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
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from alexnet_jax import cli
from alexnet_jax.data import reading, records, shards, writer
from alexnet_jax.data.listing import (
    DEFAULT_VAL_FRACTION,
    SourceListing,
    all_wnids,
    default_name,
    detect_source,
    list_source,
    names_beside,
)
from alexnet_jax.data.sources import (
    SPLITS,
    SourceError,
    ilsvrc2012_wnids,
    read_class_names,
)
from alexnet_jax.progress import Progress

DEFAULT_EXAMPLES_PER_SHARD = 1024
SKIPPED_EXAMPLES = 10  # Skipped files named in metadata.json; all are counted.


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
        raise SourceError(f"examples_per_shard = {examples_per_shard} must be >= 1")
    if not 0 < val_fraction < 1:
        raise SourceError(
            f"--val_fraction={val_fraction} must be in (0, 1), e.g. 0.2; to prepare no "
            "validation split, pass --splits=train"
        )
    if split_seed < 0:
        raise SourceError(f"--split_seed={split_seed} must be >= 0")
    if class_names_file and not os.path.isfile(os.path.expanduser(class_names_file)):
        raise SourceError(f"--class_names_file={class_names_file!r}: no such file")
    start = time.time()
    spec = detect_source(source, tfds_data_dir)
    listing = list_source(spec, splits, val_fraction=val_fraction, split_seed=split_seed)
    name = name or default_name(spec, listing.classes)
    fingerprint = shards.fingerprint(listing, examples_per_shard)
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    existing = records.read_metadata(output_dir)
    if existing is not None and existing.get("preparation", {}).get("fingerprint") == fingerprint:
        logging.info("%s is already prepared from this source: nothing to do", output_dir)
        return existing
    shards.record_plan(
        output_dir,
        fingerprint=fingerprint,
        source=source,
        examples_per_shard=examples_per_shard,
        existing=existing,
    )
    tasks, reports = shards.plan_tasks(spec, listing.items, splits, output_dir, examples_per_shard)
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
    results = shards.write_shards(tasks, num_workers)
    with contextlib.closing(results):  # Closing map_unordered stops its workers.
        for split, index, report in results:
            reports[(split, index)] = report
            done = f"{len(reports)}/{total_shards} shards, "
            progress.update(report["count"] + len(report["bad_files"]), prefix=done)
    progress.update(0, prefix=f"{len(reports)}/{total_shards} shards, ", force=True)
    class_names = read_class_names(class_names_file) or names_beside(spec)
    metadata = _finish(
        listing, reports, output_dir, fingerprint, examples_per_shard, name, class_names
    )
    metadata["seconds"] = round(time.time() - start, 1)  # Returned, not stored: runs match.
    _log_summary(metadata)
    return metadata


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
                    os.path.join(output_dir, shards.PROGRESS_DIR, report["statistics_file"])
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
            **{k: counts.get(k, 0) for k in reading.CONVERTED_KINDS + reading.BAD_KINDS},
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
        and all_wnids(listing.classes)
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
    shutil.rmtree(os.path.join(output_dir, shards.PROGRESS_DIR), ignore_errors=True)
    return metadata


def _log_summary(metadata: dict[str, Any]) -> None:
    lines = [f"Prepared {metadata['name']} in {metadata['seconds']}s:"]
    for split, counts in metadata["summary"].items():
        converted = ", ".join(f"{k} {counts[k]}" for k in reading.CONVERTED_KINDS)
        bad = ", ".join(f"{k} {counts[k]}" for k in reading.BAD_KINDS)
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
    except shards.WorkerError as e:  # A broken worker: the run stops with what it knows.
        sys.exit(f"error: {e}")
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
