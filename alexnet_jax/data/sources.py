"""What datasets are, shared at run time: the tfds source and ImageNet's class list.

``prepare`` (the offline command), the training pipeline and ``import_weights``
read these; nothing here writes. ``open_tfds`` opens a built tfds dataset; the
ILSVRC-2012 class order and validation labels are data files of this package
(``ilsvrc2012/``), equal to the copies tensorflow-datasets ships (tested).
"""

from __future__ import annotations

import dataclasses
import json
import os

from alexnet_jax import errors

SPLITS = ("train", "val")
TFDS_SPLITS = {"train": "train", "val": "validation"}


class SourceError(errors.UsageError, ValueError):
    """The --source path is missing or is not one of the accepted layouts."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What worker processes need to open the source (picklable, small)."""

    kind: str  # "tars", "folder" (train/ and val/), "class_folders" (<class>/) or "tfds"
    location: str  # The directory, or the tfds dataset name.
    tfds_data_dir: str | None = None


def tfds_build_dir(spec: SourceSpec) -> str | None:
    """The directory of the tfds build ``spec`` names (newest version), if it exists."""
    if os.path.isdir(spec.location):
        return spec.location
    root = os.path.join(
        os.path.expanduser(
            spec.tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        ),
        spec.location,
    )
    if not os.path.isdir(root):
        return None
    versions = sorted(v for v in os.listdir(root) if os.path.isdir(os.path.join(root, v)))
    return os.path.join(root, versions[-1]) if versions else None


def check_tfds_file_format(spec: SourceSpec) -> None:
    """SourceError for a TFRecord build: random access (tfds.data_source) needs array_record."""
    build = tfds_build_dir(spec)
    info = os.path.join(build, "dataset_info.json") if build else ""
    if not os.path.isfile(info):
        return
    with open(info) as f:
        file_format = json.load(f).get("fileFormat", "tfrecord")  # tfds's historical default.
    if file_format == "array_record":
        return
    name = os.path.basename(os.path.dirname(build.rstrip("/")))
    raise SourceError(
        f"The tfds dataset in {build} is built as {file_format} files, but alexnet_jax reads tfds "
        "datasets by random access (tfds.data_source, no TensorFlow), which needs an array_record "
        f"build. Rebuild it once with `tfds build {name} --file_format=array_record` (or "
        "builder.download_and_prepare(file_format='array_record')), or prepare the ILSVRC tars "
        "instead: python -m alexnet_jax.data.prepare --source=<dir with the ILSVRC2012 tars> "
        "--output_dir=<prepared dir>."
    )


def open_tfds(spec: SourceSpec, split: str):
    """A tfds random-access source yielding raw image bytes (no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    check_tfds_file_format(spec)

    decoders = {"image": tfds.decode.SkipDecoding()}
    if os.path.isdir(spec.location):
        builder = tfds.builder_from_directory(spec.location)
        return builder, builder.as_data_source(split=TFDS_SPLITS[split], decoders=decoders)
    builder = tfds.builder(spec.location, data_dir=spec.tfds_data_dir)
    source = tfds.data_source(
        spec.location,
        split=TFDS_SPLITS[split],
        data_dir=spec.tfds_data_dir,
        download=False,
        decoders=decoders,
    )
    return builder, source


# The ILSVRC-2012 class order and validation labels, shipped with the package (as
# tensorflow-datasets ships them) so that no run needs tensorflow-datasets for them.
ILSVRC2012_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ilsvrc2012")


def _read_words(filename: str) -> list[str]:
    with open(os.path.join(ILSVRC2012_DIR, filename)) as f:
        return f.read().split()


def ilsvrc2012_wnids() -> list[str]:
    """The standard 1000-class ILSVRC-2012 order (sorted wnids)."""
    return _read_words("wnids.txt")


def ilsvrc2012_validation_wnids() -> list[str]:
    """Wnid of each validation image, line i for ILSVRC2012_val_{i+1:08d}.JPEG."""
    return _read_words("validation_wnids.txt")


def read_class_names(path: str | None) -> dict[str, str]:
    """``wnid name...`` lines (e.g. LOC_synset_mapping.txt) -> {wnid: name}."""
    if not path:
        return {}
    names = {}
    with open(os.path.expanduser(path)) as f:
        for line in f:
            parts = line.strip().split(maxsplit=1)
            if parts:
                names[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
    return names
