"""The prepared on-disk format shared by the demo dataset and ImageNet.

A prepared dataset is a directory::

    metadata.json                      classes, per-split counts and shards, statistics
    train-00000-of-00008.array_record  one msgpack record per image
    val-00000-of-00001.array_record

Each record is ``msgpack({"image": <JPEG bytes>, "label": int, "key": str})``;
``key`` names the source file so reports and Fig. 4 can point back to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import msgpack

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1


def encode_example(jpeg: bytes, label: int, key: str) -> bytes:
    return msgpack.packb({"image": jpeg, "label": int(label), "key": key}, use_bin_type=True)


def decode_example(record: bytes) -> dict[str, Any]:
    return msgpack.unpackb(record, raw=False)


def shard_filename(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


def shard_paths(data_dir: str, split: str, metadata: Mapping[str, Any]) -> list[str]:
    num_shards = metadata["splits"][split]["num_shards"]
    return [os.path.join(data_dir, shard_filename(split, i, num_shards)) for i in range(num_shards)]


def write_metadata(data_dir: str, metadata: Mapping[str, Any]) -> None:
    """Written last and atomically: its presence marks a complete dataset."""
    path = os.path.join(data_dir, METADATA_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **metadata}, f, indent=1)
    os.replace(tmp, path)


def read_metadata(data_dir: str) -> dict[str, Any] | None:
    path = os.path.join(os.path.expanduser(data_dir), METADATA_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
