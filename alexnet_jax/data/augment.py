"""The paper's augmentations as pure NumPy functions on H x W x 3 images.

Sec. 4.1 of the paper: random 224x224 patches of the 256x256 image and their
horizontal reflections, the mean image subtracted, and PCA colour noise; at
test time the softmax averaged over ten patches (four corners, centre, and
their reflections). Nothing here knows about grain or JAX, so each step can
be tested alone; ``pipeline.py`` composes them. ``device_augment.py`` applies
the same draws (``train_draws``) to uint8 patches on an accelerator.

Scales: images are on the 0-255 scale. The PCA eigenvalues are those of the
RGB covariance on the [0, 1] scale (the scale of the commonly quoted
constants), so the colour offset added to 0-255 pixels is
``255 * sum_i alpha_i * lambda_i * p_i`` with ``alpha_i ~ N(0, std)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CROP_SIZE = 224
PCA_STD = 0.1  # The paper's standard deviation of alpha.

# The commonly used ImageNet RGB eigen-decomposition (pixels on the [0, 1]
# scale), for when a dataset's own statistics are not wanted.
PAPER_EIGENVALUES = np.array([0.2175, 0.0188, 0.0045])
PAPER_EIGENVECTORS = np.array(  # Columns are the eigenvectors.
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)

# The ten test patches, in this order: the four corners, the centre, then the
# horizontal reflections of those five in the same order.
TEN_CROP_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
NUM_TEN_CROPS = 2 * len(TEN_CROP_POSITIONS)


def crop(image_HxWxC: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """The ``size`` x ``size`` patch whose top-left pixel is (top, left); a view."""
    h, w = image_HxWxC.shape[:2]
    if not (0 <= top <= h - size and 0 <= left <= w - size):
        raise ValueError(f"A {size}px patch at ({top}, {left}) does not fit a {h}x{w} image")
    return image_HxWxC[top : top + size, left : left + size]


def flip_left_right(image_HxWxC: np.ndarray) -> np.ndarray:
    """The horizontal reflection, as a new contiguous array.

    Each pixel's C channels are moved as one opaque item: reversing the W
    axis of an H x W x C array directly is about 4x slower in NumPy.
    """
    image = np.ascontiguousarray(image_HxWxC)
    pixel = np.dtype((np.void, image.shape[-1] * image.itemsize))
    pixels_HxW = image.view(pixel).reshape(image.shape[:-1])
    return np.ascontiguousarray(pixels_HxW[:, ::-1]).view(image.dtype).reshape(image.shape)


def random_crop_window(
    rng: np.random.Generator, height: int, width: int, size: int = CROP_SIZE
) -> tuple[int, int, bool]:
    """Top, left of a uniformly random ``size`` patch, and whether to mirror it."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left, bool(rng.random() < 0.5)


def center_crop_window(height: int, width: int, size: int = CROP_SIZE) -> tuple[int, int]:
    return (height - size) // 2, (width - size) // 2


def ten_crop_windows(height: int, width: int, size: int = CROP_SIZE) -> list[tuple[int, int]]:
    """(top, left) of the corner and centre patches, in ``TEN_CROP_POSITIONS`` order."""
    bottom, right = height - size, width - size
    return [
        (0, 0),
        (0, right),
        (bottom, 0),
        (bottom, right),
        center_crop_window(height, width, size),
    ]


def ten_crops(image_HxWxC: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The paper's ten test patches as 10 x size x size x C (see ``TEN_CROP_POSITIONS``)."""
    h, w = image_HxWxC.shape[:2]
    patches = [crop(image_HxWxC, top, left, size) for top, left in ten_crop_windows(h, w, size)]
    return np.stack(patches + [flip_left_right(p) for p in patches])


def mean_for_subtraction(mean_image_HxWx3: np.ndarray, mode: str) -> np.ndarray:
    """The mean to subtract: the mean image itself, or its per-channel mean broadcast.

    ``mode`` is "image" (the paper: each pixel minus the mean at that pixel)
    or "channel" (each pixel minus the training set's mean RGB).
    """
    mean = np.asarray(mean_image_HxWx3, np.float32)
    if mode == "image":
        return mean
    if mode == "channel":
        return np.broadcast_to(
            mean.mean(axis=(0, 1), dtype=np.float64).astype(np.float32), mean.shape
        )
    raise ValueError(f"mean subtraction mode {mode!r} is not 'image' or 'channel'")


def pca_colour_offset(
    rng: np.random.Generator,
    eigenvalues: np.ndarray,
    eigenvectors: np.ndarray,
    std: float = PCA_STD,
) -> np.ndarray:
    """One image's RGB offset on the 0-255 scale: 255 * P @ (alpha * lambda).

    ``eigenvalues`` (3,) and ``eigenvectors`` (3x3, columns) describe the RGB
    covariance on the [0, 1] scale; alpha ~ N(0, std) is drawn once per call,
    i.e. once per image per presentation.
    """
    alpha = rng.normal(0.0, std, size=3)
    return (255.0 * (np.asarray(eigenvectors) @ (alpha * np.asarray(eigenvalues)))).astype(
        np.float32
    )


@dataclasses.dataclass(frozen=True)
class TrainDraws:
    """One training presentation's random choices, drawn in this order from one rng."""

    top: int
    left: int
    mirror: bool
    colour_offset: np.ndarray | None  # RGB, 0-255 scale; None without PCA noise.


def train_draws(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    eigenvalues: np.ndarray | None,
    eigenvectors: np.ndarray | None,
    pca_std: float = PCA_STD,
    crop_size: int = CROP_SIZE,
) -> TrainDraws:
    """The patch, the mirror and the PCA colour offset: the same draws wherever they are applied."""
    top, left, mirror = random_crop_window(rng, height, width, crop_size)
    offset = None
    if eigenvalues is not None:
        offset = pca_colour_offset(rng, eigenvalues, eigenvectors, pca_std)
    return TrainDraws(top, left, mirror, offset)


def train_augment(
    image_HxWx3: np.ndarray,
    rng: np.random.Generator,
    *,
    mean: np.ndarray,
    eigenvalues: np.ndarray | None,
    eigenvectors: np.ndarray | None,
    pca_std: float = PCA_STD,
    crop_size: int = CROP_SIZE,
    scale: float | np.ndarray = 1.0,
    dtype: Any = np.float32,
) -> np.ndarray:
    """Random patch, mirror, minus the mean, plus PCA colour noise, times ``scale``.

    ``image_HxWx3`` is uint8 and ``mean`` has its shape. Cropping first and
    subtracting the mean's same patch is the same as subtracting first, but
    touches 23% fewer pixels.
    PCA noise is skipped when ``eigenvalues`` is None.
    """
    h, w = image_HxWx3.shape[:2]
    d = train_draws(
        rng, h, w, eigenvalues=eigenvalues, eigenvectors=eigenvectors, pca_std=pca_std,
        crop_size=crop_size,
    )  # fmt: skip
    pixels = crop(image_HxWx3, d.top, d.left, crop_size)
    mean_patch = crop(mean, d.top, d.left, crop_size)
    image = np.subtract(pixels, mean_patch, dtype=np.float32)  # One pass: cast and subtract.
    if d.colour_offset is not None:
        # Added row-wise: broadcasting a length-3 vector over H x W x 3 is ~8x slower.
        rows = image.reshape(crop_size, -1)  # A view: adds in place.
        rows += np.tile(d.colour_offset, crop_size)
    image = _scaled(image, scale, np.float32)
    if d.mirror:
        image = flip_left_right(image)
    return image.astype(dtype, copy=False)


def _scaled(image: np.ndarray, scale: float | np.ndarray, dtype: Any) -> np.ndarray:
    """``image * scale`` in place (float32), as ``dtype``; ``scale``: a number or one per RGB."""
    if np.any(np.not_equal(scale, 1.0)):
        image *= np.asarray(scale, np.float32)
    return image.astype(dtype, copy=False)


def eval_views(
    image_HxWx3: np.ndarray,
    *,
    ten_crop: bool,
    mean: np.ndarray,
    crop_size: int = CROP_SIZE,
    scale: float | np.ndarray = 1.0,
    dtype: Any = np.float32,
) -> np.ndarray:
    """(image - mean) * scale at the test patches: V x crop x crop x 3.

    V = 1 (the central patch, single-crop evaluation) or, with ``ten_crop``, the
    paper's ten (``TEN_CROP_POSITIONS`` order).
    """
    if ten_crop:
        image = _scaled(np.subtract(image_HxWx3, mean, dtype=np.float32), scale, np.float32)
        return ten_crops(image, crop_size).astype(dtype)
    top, left = center_crop_window(*image_HxWx3.shape[:2], crop_size)
    pixels, mean_patch = crop(image_HxWx3, top, left, crop_size), crop(mean, top, left, crop_size)
    return _scaled(np.subtract(pixels, mean_patch, dtype=np.float32), scale, dtype)[None]


def average_crop_softmax(logits_BxNxK: Any) -> Any:
    """Mean over the N crops of each crop's softmax: B x N x K logits -> B x K probabilities.

    The paper averages the predictions (softmax outputs), not the logits.
    Works on NumPy and JAX arrays alike (also under ``jax.jit``), through the
    array-API namespace of its input.
    """
    xp = logits_BxNxK.__array_namespace__()
    shifted = logits_BxNxK - xp.max(logits_BxNxK, axis=-1, keepdims=True)
    exp = xp.exp(shifted)
    probabilities = exp / xp.sum(exp, axis=-1, keepdims=True)
    return xp.mean(probabilities, axis=1)
