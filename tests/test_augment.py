"""The paper's augmentations (alexnet_jax/data/augment.py), checked with real numbers."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from alexnet_jax.data import augment


def _image(size=256, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_flip_left_right_equals_reversed_columns():
    for dtype in (np.uint8, np.float32):
        image = _image(31).astype(dtype)[:, 3:20]  # Not contiguous, odd width.
        np.testing.assert_array_equal(augment.flip_left_right(image), image[:, ::-1])


def test_train_augment_is_a_shifted_mirrored_patch_minus_mean():
    image, mean = _image(seed=1), np.random.default_rng(2).uniform(0, 255, (256, 256, 3))
    mean = mean.astype(np.float32)
    seen_mirrors, seen_tops = set(), set()
    for seed in range(40):
        out = augment.train_augment(
            image, np.random.default_rng(seed), mean=mean, eigenvalues=None, eigenvectors=None
        )
        # Replay the same draws to know where the patch came from.
        top, left, mirror = augment.random_crop_window(np.random.default_rng(seed), 256, 256)
        expected = image[top : top + 224, left : left + 224].astype(np.float32)
        expected = expected - mean[top : top + 224, left : left + 224]
        if mirror:
            expected = expected[:, ::-1]
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-4)
        seen_mirrors.add(mirror)
        seen_tops.add(top)
    assert seen_mirrors == {True, False}
    assert len(seen_tops) > 20  # Positions vary over the 33 possible rows.


def test_train_augment_pca_offset_is_per_image_constant():
    image, mean = _image(seed=3), np.zeros((256, 256, 3), np.float32)
    kwargs = dict(mean=mean, eigenvectors=augment.PAPER_EIGENVECTORS)
    plain = augment.train_augment(
        image, np.random.default_rng(7), eigenvalues=None, **{**kwargs, "eigenvectors": None}
    )
    noisy = augment.train_augment(
        image, np.random.default_rng(7), eigenvalues=augment.PAPER_EIGENVALUES, **kwargs
    )
    difference = (noisy - plain).reshape(-1, 3)
    # Same window (the crop draws come first), one RGB offset added to every pixel.
    np.testing.assert_allclose(
        difference, np.broadcast_to(difference[0], difference.shape), atol=1e-3
    )
    assert np.abs(difference[0]).max() > 0


def test_pca_noise_covariance_matches_theory():
    """Over many draws, Cov(offset / 255) = sum_i (0.1 lambda_i)^2 p_i p_i^T."""
    rng = np.random.default_rng(0)
    values, vectors = augment.PAPER_EIGENVALUES, augment.PAPER_EIGENVECTORS
    offsets = np.stack([augment.pca_colour_offset(rng, values, vectors) for _ in range(20000)])
    measured = np.cov(offsets.T / 255.0)
    expected = sum(
        (0.1 * values[i]) ** 2 * np.outer(vectors[:, i], vectors[:, i]) for i in range(3)
    )
    np.testing.assert_allclose(measured, expected, atol=0.03 * expected.max())
    np.testing.assert_allclose(offsets.mean(0) / 255.0, 0.0, atol=0.02 * np.sqrt(expected.max()))


def test_ten_crops_are_the_corners_centre_and_their_mirrors():
    image = _image(seed=4)
    crops = augment.ten_crops(image)
    assert crops.shape == (10, 224, 224, 3)
    expected = [
        image[:224, :224],  # top left
        image[:224, 32:],  # top right
        image[32:, :224],  # bottom left
        image[32:, 32:],  # bottom right
        image[16:240, 16:240],  # centre
    ]
    for i, patch in enumerate(expected):
        np.testing.assert_array_equal(crops[i], patch, err_msg=augment.TEN_CROP_POSITIONS[i])
        np.testing.assert_array_equal(crops[5 + i], patch[:, ::-1])


def test_ten_crop_and_center_crop_subtract_mean_and_scale():
    image = _image(seed=5)
    mean = np.full((256, 256, 3), 100.0, np.float32)
    crops = augment.eval_views(image, ten_crop=True, mean=mean, scale=0.5, dtype=ml_dtypes.bfloat16)
    assert crops.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(
        crops[4].astype(np.float32), (image[16:240, 16:240] - 100.0) * 0.5, rtol=1e-2, atol=0.5
    )
    centre = augment.eval_views(image, ten_crop=False, mean=mean, scale=0.5)[0]
    np.testing.assert_array_equal(centre, (image[16:240, 16:240].astype(np.float32) - 100) * 0.5)


def test_mean_for_subtraction_channel_mode():
    mean = np.random.default_rng(6).uniform(0, 255, (256, 256, 3)).astype(np.float32)
    np.testing.assert_array_equal(augment.mean_for_subtraction(mean, "image"), mean)
    per_channel = augment.mean_for_subtraction(mean, "channel")
    assert per_channel.shape == mean.shape
    np.testing.assert_allclose(
        per_channel[7, 9], mean.reshape(-1, 3).astype(np.float64).mean(0), rtol=1e-6
    )
    np.testing.assert_array_equal(per_channel[0, 0], per_channel[255, 255])
    with pytest.raises(ValueError, match="pixel"):
        augment.mean_for_subtraction(mean, "pixel")


def test_average_crop_softmax_averages_probabilities_not_logits():
    logits = np.array([[[10.0, 0.0], [0.0, 1.0]]])  # One image, two crops, two classes.
    averaged = augment.average_crop_softmax(logits)
    p1 = np.exp([10.0, 0.0]) / np.exp([10.0, 0.0]).sum()
    p2 = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    np.testing.assert_allclose(averaged, [(p1 + p2) / 2], rtol=1e-6)
    # Averaging logits first would give a different answer.
    from_mean_logits = np.exp([5.0, 0.5]) / np.exp([5.0, 0.5]).sum()
    assert not np.allclose(averaged[0], from_mean_logits, atol=1e-3)
    # The same function works on JAX arrays under jit.
    jitted = jax.jit(augment.average_crop_softmax)(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(np.asarray(jitted), averaged, rtol=1e-5)
    np.testing.assert_allclose(averaged.sum(-1), 1.0)
