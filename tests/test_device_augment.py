"""Augmentation finished on the device equals the host's, draw for draw."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import train, tuning
from alexnet_jax.data import augment, device_augment, pipeline
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def dataset(tiny_demo_dir):
    return pipeline.open_dataset(tiny_demo_dir, how_to_prepare="(test data)")


def _first_batches(dataset, preprocessing, n=2):
    it = pipeline.train_iterator(
        dataset,
        batch_size=8,
        seed=3,
        preprocessing=preprocessing,
        loading=pipeline.Loading(num_threads=1),
    )
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
    "pca, scale, dtype",
    [(True, 1.0, "float32"), (False, 1 / 64, "float32"), (True, 0.5, "bfloat16")],
)
def test_device_finish_equals_host_augmentation_for_the_same_draws(dataset, pca, scale, dtype):
    eig = dataset.rgb_eigen() if pca else (None, None)
    host = pipeline.Preprocessing(
        dataset.mean_image(), *eig, scale=scale, dtype=dtype, finish_on_device=False
    )
    shipped = pipeline.Preprocessing(
        dataset.mean_image(), *eig, scale=scale, dtype=dtype, finish_on_device=True
    )
    finish = jax.jit(
        lambda b, m: device_augment.finish_training_batch(
            b, m, scale=scale, dtype=jnp.dtype(pipeline.numpy_dtype(dtype))
        )
    )
    mean = jnp.asarray(dataset.mean_image(), jnp.float32)
    mirrors = []
    for h, d in zip(_first_batches(dataset, host), _first_batches(dataset, shipped), strict=True):
        assert d["images"].dtype == np.uint8 and d["images"].shape == (8, 224, 224, 3)
        assert d["images"].nbytes * 4 == h["images"].astype(np.float32).nbytes
        assert set(device_augment.DRAW_FIELDS) <= set(d)
        mirrors += list(d["mirror"])
        out = jax.device_get(finish(d, mean))
        np.testing.assert_array_equal(out["labels"], h["labels"])
        assert out["images"].dtype == h["images"].dtype
        # The same float32 operations in the same order; a fused multiply-add or another
        # rounding of the product by scale may move a value by one float32 ulp (~3e-5 at
        # 255), and a bfloat16 cast of such a value by one bfloat16 ulp (2**-7 relative).
        tol = 2**-7 if dtype == "bfloat16" else 1e-6
        np.testing.assert_allclose(
            out["images"].astype(np.float32), h["images"].astype(np.float32), rtol=tol, atol=1e-4
        )
    assert 0 < sum(mirrors) < len(mirrors)  # Both the mirrored and the plain path ran.


def test_the_shipped_draws_are_the_hosts_draws():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mean = np.full((256, 256, 3), 100, np.float32)
    eig = (augment.PAPER_EIGENVALUES, augment.PAPER_EIGENVECTORS)
    host = augment.train_augment(image, rng_a, mean=mean, eigenvalues=eig[0], eigenvectors=eig[1])
    d = augment.train_draws(rng_b, 256, 256, eigenvalues=eig[0], eigenvectors=eig[1])
    by_hand = augment.crop(image, d.top, d.left, 224).astype(np.float32) - 100 + d.colour_offset
    by_hand = by_hand[:, ::-1] if d.mirror else by_hand
    np.testing.assert_array_equal(host, by_hand)


def test_auto_finishes_on_the_device_only_for_accelerators():
    assert not tuning.finish_augmentation_on_device("auto", "cpu")
    assert tuning.finish_augmentation_on_device("auto", "gpu")
    assert tuning.finish_augmentation_on_device("auto", "tpu")
    assert tuning.finish_augmentation_on_device("device", "cpu")
    assert not tuning.finish_augmentation_on_device("host", "gpu")


def test_training_with_augmentation_on_the_device_sees_the_hosts_batches(tiny_demo_dir, tmp_path):
    losses = {}
    for where in ("host", "device"):
        config = tiny_config(tiny_demo_dir)
        config.data.augment_on = where
        config.model.dropout_rate = 0.0
        config.max_steps, config.log_every_steps = 1, 1
        train.train_and_evaluate(config, str(tmp_path / where))
        with open(os.path.join(tmp_path, where, "metrics.jsonl")) as f:
            losses[where] = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    # Same initial params, the same images up to a float32 ulp: the same first loss.
    np.testing.assert_allclose(losses["device"], losses["host"], rtol=1e-5)
