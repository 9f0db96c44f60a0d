"""The input's arithmetic on the device, for hosts that ship uint8 pixels.

On a GPU or TPU the host's float work (mean subtraction, colour noise, scale,
mirror, over 150k values per image) would set the pace; the host instead
crops, draws the same random choices as ``augment.train_augment``
(``augment.train_draws``) and ships uint8 patches with them: a quarter of
the bytes of float32. ``finish_training_batch`` then gives the batch the
host would have made, inside a jitted function. Evaluation ships uint8 too:
the central patch, or for the ten test patches the whole image, which
``finish_eval_batch`` cuts, subtracts and scales as ``augment.eval_views`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax.data import augment

# The fields a host-cropped batch carries besides "images" (uint8) and "labels".
DRAW_FIELDS = ("crop_top", "crop_left", "mirror", "colour_offset")


def finish_training_batch(
    batch: dict[str, jax.Array],
    mean_HxWx3: jax.Array,
    *,
    scale: float | np.ndarray,
    dtype: jnp.dtype,
) -> dict[str, jax.Array]:
    """uint8 patches + draws -> (patch - mean patch + colour offset) * scale, mirrored."""
    patches = batch["images"]
    size = patches.shape[1]

    def mean_patch(top, left):
        return jax.lax.dynamic_slice(mean_HxWx3, (top, left, 0), (size, size, 3))

    means = jax.vmap(mean_patch)(batch["crop_top"], batch["crop_left"])
    images = patches.astype(jnp.float32) - means
    images = images + batch["colour_offset"][:, None, None, :]
    if np.any(np.not_equal(scale, 1.0)):  # A number, or one per RGB channel.
        images = images * jnp.asarray(scale, jnp.float32)
    mirror = batch["mirror"][:, None, None, None]
    images = jnp.where(mirror, images[:, :, ::-1, :], images)
    return {"images": images.astype(dtype), "labels": batch["labels"]}


def ten_views(images_BxHxWx3: jax.Array, crop_size: int) -> jax.Array:
    """The paper's ten test patches of each image: B x 10 x crop x crop x 3.

    In ``augment.TEN_CROP_POSITIONS`` order, as ``augment.ten_crops`` cuts them.
    """
    h, w = images_BxHxWx3.shape[1:3]
    patches = [
        images_BxHxWx3[:, top : top + crop_size, left : left + crop_size]
        for top, left in augment.ten_crop_windows(h, w, crop_size)
    ]
    return jnp.stack(patches + [p[:, :, ::-1] for p in patches], axis=1)


def finish_eval_batch(
    batch: dict[str, jax.Array],
    mean_HxWx3: jax.Array,
    *,
    crop_size: int,
    scale: float | np.ndarray,
    dtype: jnp.dtype,
    ten_crop: bool = False,
) -> dict[str, jax.Array]:
    """uint8 pixels -> (views - mean's views) * scale: what ``augment.eval_views`` gives.

    ``batch["images"]`` is the central patch (B x crop x crop x 3), or with
    ``ten_crop`` the whole image, whose ten patches come out as B x 10 x crop
    x crop x 3. Other fields (labels, mask) pass through.
    """
    if ten_crop:
        pixels = ten_views(batch["images"], crop_size)
        mean = ten_views(mean_HxWx3[None], crop_size)[0]
    else:
        pixels = batch["images"]
        top, left = augment.center_crop_window(*mean_HxWx3.shape[:2], crop_size)
        mean = mean_HxWx3[top : top + crop_size, left : left + crop_size]
    images = pixels.astype(jnp.float32) - mean
    if np.any(np.not_equal(scale, 1.0)):
        images = images * jnp.asarray(scale, jnp.float32)
    return {**batch, "images": images.astype(dtype)}
