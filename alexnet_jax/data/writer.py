"""Writing prepared datasets: the paper's 256x256 preprocessing, shards, statistics.

Used by the demo generator and by ImageNet preparation, so both produce the
same format (see ``records.py``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image, ImageOps, UnidentifiedImageError

from alexnet_jax.data import records

PREPARED_SIZE = 256
JPEG_QUALITY = 90
# Single-channel modes holding more than 8 bits: PIL's convert("RGB") clips
# them to 0-255 instead of scaling, which turns a 16-bit image white.
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
HIGH_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "F")


def to_8_bits(image: Image.Image) -> Image.Image:
    """A high-depth grayscale image as mode L, scaled (not clipped) to 0-255.

    16-bit and ``I`` values (PIL opens 16-bit PNG, TIFF and PGM as these) map
    v -> round(v / 257), so 65535 is 255. ``F`` is taken as 0-1 when it fits
    there (the float convention) and as 0-255 otherwise; NaN is black.
    Other modes are returned unchanged.
    """
    if image.mode not in HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        values = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8))


def resize_and_center_crop(image: Image.Image, size: int = PREPARED_SIZE) -> Image.Image:
    """Sec. 2: rescale the shorter side to ``size``, then cut the central square."""
    image = to_8_bits(image).convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shard(path: str, examples: Iterable[tuple[bytes, int, str]]) -> int:
    """Writes (jpeg, label, key) examples to one ArrayRecord file atomically."""
    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    for jpeg, label, key in examples:
        writer.write(records.encode_example(jpeg, label, key))
        count += 1
    writer.close()
    os.replace(tmp, path)
    return count


class RgbStatistics:
    """Streaming mean image and RGB covariance, for mean subtraction and PCA colour.

    Sums are kept as exact integers of the uint8 pixels, so partial statistics
    (one per shard, from any number of processes, in any order) merge to the
    same bits. The covariance is reported on the [0, 1] scale (the scale the
    paper's PCA constants are quoted on); the mean image on the 0-255 scale.
    """

    def __init__(self, size: int = PREPARED_SIZE):
        self.count = 0
        self.pixel_count = 0
        self.sum_image = np.zeros((size, size, 3), np.int64)
        self.sum_rgb = np.zeros(3, np.int64)
        self.sum_outer = np.zeros((3, 3), np.int64)

    def add(self, image_HxWx3: np.ndarray) -> None:
        if image_HxWx3.dtype != np.uint8:
            raise TypeError(f"RgbStatistics takes uint8 images, got {image_HxWx3.dtype}")
        self.sum_image += image_HxWx3
        flat = image_HxWx3.reshape(-1, 3).astype(np.float64)
        self.sum_rgb += flat.sum(0).astype(np.int64)
        # Exact: every partial sum is an integer below 2**53.
        self.sum_outer += (flat.T @ flat).astype(np.int64)
        self.count += 1
        self.pixel_count += flat.shape[0]

    def merge(self, other: RgbStatistics) -> None:
        self.count += other.count
        self.pixel_count += other.pixel_count
        self.sum_image += other.sum_image
        self.sum_rgb += other.sum_rgb
        self.sum_outer += other.sum_outer

    def state(self) -> dict[str, np.ndarray]:
        """The sums as arrays, for saving beside a finished shard."""
        return {
            "count": np.int64(self.count),
            "pixel_count": np.int64(self.pixel_count),
            "sum_image": self.sum_image,
            "sum_rgb": self.sum_rgb,
            "sum_outer": self.sum_outer,
        }

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> RgbStatistics:
        stats = cls(state["sum_image"].shape[0])
        stats.count, stats.pixel_count = int(state["count"]), int(state["pixel_count"])
        stats.sum_image = np.asarray(state["sum_image"], np.int64)
        stats.sum_rgb = np.asarray(state["sum_rgb"], np.int64)
        stats.sum_outer = np.asarray(state["sum_outer"], np.int64)
        return stats

    def mean_image(self) -> np.ndarray:
        return (self.sum_image / max(self.count, 1)).astype(np.float32)

    def covariance(self) -> np.ndarray:
        """The 3x3 RGB covariance over all pixels, on the [0, 1] scale."""
        n = max(self.pixel_count, 1)
        mean = self.sum_rgb / n
        return (self.sum_outer / n - np.outer(mean, mean)) / 255.0**2

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance."""
        covariance = self.covariance()
        values, vectors = np.linalg.eigh(covariance)
        order = np.argsort(values)[::-1]
        return values[order], vectors[:, order]

    def to_metadata(self, data_dir: str) -> dict:
        mean_file = "mean_image.npy"
        np.save(os.path.join(data_dir, mean_file), self.mean_image())
        values, vectors = self.eigen()
        return {
            "mean_image_file": mean_file,
            "mean_rgb": (self.sum_rgb / max(self.pixel_count, 1)).tolist(),
            "rgb_eigenvalues": values.tolist(),
            "rgb_eigenvectors": vectors.tolist(),
        }


class BadImageError(Exception):
    """An input file that cannot be used; ``kind`` is one of reading.BAD_KINDS."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def prepare_image(
    data: bytes, size: int = PREPARED_SIZE, *, honour_exif_orientation: bool = False
) -> tuple[Image.Image, list[str]]:
    """Source file bytes -> the prepared RGB image and what had to be converted.

    The one decode for training data (``prepare``) and for a user's images
    (``inference.read_image``): same mode conversion, alpha, resize and crop.
    ``honour_exif_orientation`` turns phone photos upright first; the training
    data keeps the stored orientation, as the paper's did.
    Raises BadImageError for empty, truncated and undecodable files. A JPEG
    much larger than ``size`` is decoded at a reduced DCT scale (``draft``),
    never below ``size`` on its shorter side, which is several times faster.
    """
    if not data:
        raise BadImageError("empty", "zero-byte file")
    conversions = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the pixels are fine.
            image = Image.open(io.BytesIO(data))
            if image.format != "JPEG":
                conversions.append("not_jpeg")
            elif min(image.size) >= 2 * size:
                image.draft(image.mode, (size, size))
            image.load()
            if honour_exif_orientation:
                image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise BadImageError("undecodable", "not a recognisable image format") from None
    except Image.DecompressionBombError as e:
        raise BadImageError("undecodable", f"too many pixels: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        message = str(e) or type(e).__name__
        truncated = "truncated" in message.lower() or isinstance(e, EOFError)
        kind = "truncated" if truncated else "undecodable"
        raise BadImageError(kind, f"{type(e).__name__}: {message}") from None
    if image.mode in HIGH_DEPTH_MODES:
        conversions.append("high_depth")  # Scaled to 8 bits by resize_and_center_crop.
    if image.mode in ("L", "LA", "1", *HIGH_DEPTH_MODES):
        conversions.append("grayscale")
    elif image.mode == "CMYK":
        conversions.append("cmyk")
    elif image.mode != "RGB":
        conversions.append("other_mode")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels composite onto white, as an image viewer shows them.
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return resize_and_center_crop(image, size), conversions
