"""Reading one listed image and making it the paper's 256x256 patch, or saying why it cannot be.

A bad file never stops a preparation: every failure to read, decode or convert
one file is a ``writer.BadImageError`` with its kind and the reason in words,
and the file is listed in metadata.json.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from absl import logging
from PIL import Image

from alexnet_jax.data import writer
from alexnet_jax.data.sources import SourceSpec, open_tfds

# What can happen to one input file. Converted files are kept; bad ones are
# listed in metadata["bad_files"] and left out.
CONVERTED_KINDS = ("grayscale", "cmyk", "other_mode", "high_depth", "not_jpeg")
BAD_KINDS = ("unreadable", "empty", "truncated", "undecodable", "unknown_label")


def _read_regular_file(path: str) -> bytes:
    """The file's bytes; OSError for anything but a regular file (a pipe would block forever)."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # Opening a pipe returns at once.
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | nonblocking)) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device or socket"
            raise OSError(f"not a regular file but {kind}")
        return f.read()


class Reader:
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


def ref_key(ref: tuple, split: str) -> str:
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


def read_reference(reader: Reader, ref: tuple) -> tuple[bytes, int, str]:
    """``reader.read``, with an OS error (a directory, a broken link, no permission) a bad file."""
    try:
        return reader.read(ref)
    except OSError as e:
        raise writer.BadImageError("unreadable", _read_error_reason(ref, e)) from None


def prepare_file(data: bytes, key: str) -> tuple[Image.Image, list[str]]:
    """``prepare_image``, with any error decoding or converting one file a bad file, never fatal."""
    try:
        return writer.prepare_image(data)
    except writer.BadImageError:
        raise
    except Exception as e:  # e.g. a mode PIL cannot convert ('La'); logged in case it is a bug.
        logging.warning("%s could not be prepared", key, exc_info=True)
        raise writer.BadImageError("undecodable", f"{type(e).__name__}: {e}") from None
