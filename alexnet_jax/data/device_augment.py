"""The training augmentation's arithmetic on the device, for hosts that ship uint8 patches.

On a GPU or TPU the host's float work (mean subtraction, colour noise, scale,
mirror, over 150k values per image) would set the pace; the host instead
crops, draws the same random choices as ``augment.train_augment``
(``augment.train_draws``) and ships uint8 patches with them: a quarter of
the bytes of float32. ``finish_training_batch`` then gives the batch the
host would have made, inside a jitted function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
