"""The grain pipeline (alexnet_jax/data/pipeline.py): determinism, resume, sharding, dtypes."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest

from alexnet_jax import config_lib, inference, tuning
from alexnet_jax.data import augment, pipeline, records
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def dataset(tiny_demo_dir):
    return pipeline.open_dataset(tiny_demo_dir, how_to_prepare="(test data)")


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _train(dataset, *, num_threads=1, num_workers=0, preprocessing=None, **kwargs):
    """The training iterator with the paper's preprocessing, batch 16 and one thread."""
    return pipeline.train_iterator(
        dataset,
        **{"batch_size": 16, "seed": 0, **kwargs},
        preprocessing=preprocessing or pipeline.Preprocessing.paper(dataset),
        loading=pipeline.Loading(num_workers=num_workers, num_threads=num_threads),
    )


def train_records(dataset, seed, n):
    """The first ``n`` raw records of the global training order."""
    ds = pipeline.shuffled_records(dataset, seed)
    return [ds[i] for i in range(n)]


def test_same_seed_same_batches_whatever_the_threads(dataset):
    a = _take(_train(dataset, num_threads=1), 3)
    b = _take(_train(dataset, num_threads=2), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    c = next(_train(dataset, seed=1))
    assert not np.array_equal(a[0]["images"], c["images"])
    assert a[0]["images"].shape == (16, 224, 224, 3) and a[0]["images"].dtype == np.float32


# 1 worker: test_checkpoint's B2 run; 3 workers: slow (the auto setting runs 2 here).
@pytest.mark.parametrize("workers", [pytest.param(3, marks=pytest.mark.slow), "auto"])
def test_worker_processes_give_the_same_batches_and_restore_on_any_count(dataset, workers):
    if workers == "auto":  # What an accelerator host of 3 cores runs: 2 workers.
        workers = tuning.input_workers(-1, backend="gpu", cores=3)
        assert workers == 2
    expected = _take(_train(dataset), 5)
    with_workers = _train(dataset, num_workers=workers)
    first = _take(with_workers, 2)
    state = with_workers.get_state()
    with_workers.close()
    assert json.loads(state) == {"next_batch": 2}  # No worker count in the state.
    restored = [_train(dataset, num_workers=n) for n in (workers, 0, 2)]
    for r in restored:
        r.set_state(state)
    rest = [_take(r, 3) for r in restored]
    for r in restored:
        r.close()
    for i, x in enumerate(expected):
        for y in [first[i]] if i < 2 else [r[i - 2] for r in rest]:
            np.testing.assert_array_equal(x["images"], y["images"])
            np.testing.assert_array_equal(x["labels"], y["labels"])


def test_an_older_iterator_state_is_refused_by_name(dataset):
    it = _train(dataset)
    legacy = json.dumps({"next_index": 32}).encode()  # grain's own state, from before.
    with pytest.raises(pipeline.IteratorStateError, match="older alexnet_jax"):
        it.set_state(legacy)


def test_each_image_is_its_records_crop_at_the_draws_of_its_position(dataset):
    """The batch, rebuilt record by record from the shuffle order and ``train_draws``."""
    p = pipeline.Preprocessing.paper(dataset)
    shipped = dataclasses.replace(p, finish_on_device=True)
    batches = _take(_train(dataset, seed=5, preprocessing=shipped), 2)
    host = next(_train(dataset, seed=5, preprocessing=p))
    for position, record in enumerate(train_records(dataset, 5, 32)):
        batch, i = batches[position // 16], position % 16
        pixels, label = pipeline.decode_record(record)
        rng = np.random.Generator(np.random.Philox(key=[5, position]))
        d = augment.train_draws(
            rng, 256, 256, eigenvalues=p.eigenvalues, eigenvectors=p.eigenvectors
        )
        np.testing.assert_array_equal(
            batch["images"][i], pixels[d.top : d.top + 224, d.left : d.left + 224]
        )
        assert (batch["labels"][i], batch["crop_top"][i], batch["crop_left"][i]) == (
            label,
            d.top,
            d.left,
        )
        assert batch["mirror"][i] == d.mirror
        np.testing.assert_array_equal(batch["colour_offset"][i], d.colour_offset)
        if position < 16:  # The host path applies the same draws.
            expected = augment.train_augment(
                pixels, np.random.Generator(np.random.Philox(key=[5, position])),
                mean=p.mean, eigenvalues=p.eigenvalues, eigenvectors=p.eigenvectors,
            )  # fmt: skip
            np.testing.assert_array_equal(host["images"][i], expected)


def test_restored_iterator_continues_with_exactly_the_next_batch(dataset):
    original = _train(dataset)
    _take(original, 2)
    state = original.get_state()
    expected = _take(original, 2)
    restored = _train(dataset)
    restored.set_state(state)
    for x, y in zip(expected, _take(restored, 2), strict=True):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])


def test_every_epoch_is_a_fresh_permutation_of_the_whole_set(dataset):
    n = dataset.num_examples("train")  # 80
    keys = [records.decode_example(r)["key"] for r in train_records(dataset, 0, 2 * n)]
    first, second = keys[:n], keys[n:]
    assert sorted(first) == sorted(second) and len(set(first)) == n
    assert first != second


def test_processes_read_disjoint_halves_of_the_global_order(dataset):
    whole = [pipeline.decode_record(r)[1] for r in train_records(dataset, 0, 32)]
    single = _take(_train(dataset), 2)
    assert [b["labels"].tolist() for b in single] == [whole[:16], whole[16:]]
    parts = [_take(_train(dataset, process_index=p, process_count=2), 2) for p in range(2)]
    assert parts[1][0]["images"].shape[0] == 8  # The global batch of 16, halved.
    # Process p reads the p-th half of every global batch, with the same draws.
    for b in range(2):
        for key in ("images", "labels"):
            halves = [parts[p][b][key] for p in range(2)]
            np.testing.assert_array_equal(np.concatenate(halves), single[b][key])


def test_pca_noise_is_a_per_image_rgb_offset_in_the_pipeline(dataset):
    with_pca = pipeline.Preprocessing.paper(dataset)
    without = pipeline.Preprocessing(with_pca.mean, None, None)
    a = next(_train(dataset, preprocessing=with_pca))["images"]
    b = next(_train(dataset, preprocessing=without))["images"]
    offsets = (a - b).reshape(16, -1, 3)
    np.testing.assert_allclose(offsets, np.broadcast_to(offsets[:, :1], offsets.shape), atol=1e-3)
    assert np.abs(offsets[:, 0]).max() > 0.01
    assert len({tuple(np.round(o, 4)) for o in offsets[:, 0]}) == 16  # Drawn per image.


def test_bfloat16_batches_match_float32(dataset):
    config = tiny_config(dataset.data_dir)
    config.data.dtype = "bfloat16"
    p16 = pipeline.Preprocessing.from_config(config.data, dataset)
    config.data.dtype = "float32"
    p32 = pipeline.Preprocessing.from_config(config.data, dataset)
    a = next(_train(dataset, preprocessing=p16))["images"]
    b = next(_train(dataset, preprocessing=p32))["images"]
    assert a.dtype == ml_dtypes.bfloat16 and a.nbytes == b.nbytes // 2
    np.testing.assert_allclose(a.astype(np.float32), b, rtol=1 / 128, atol=1e-2)


def test_preprocessing_from_config_options(dataset):
    config = tiny_config(dataset.data_dir)
    p = pipeline.Preprocessing.from_config(config.data, dataset)
    np.testing.assert_array_equal(p.mean, dataset.mean_image())
    np.testing.assert_array_equal(p.eigenvalues, dataset.metadata["rgb_eigenvalues"])
    assert p.scale == config.data.input_scale
    config.data.mean_subtraction = "channel"
    config.data.pca_stats = "paper"
    p = pipeline.Preprocessing.from_config(config.data, dataset)
    np.testing.assert_allclose(p.mean[0, 0], p.mean[100, 200])
    np.testing.assert_array_equal(p.eigenvectors, augment.PAPER_EIGENVECTORS)
    config.data.pca_colour = False
    assert pipeline.Preprocessing.from_config(config.data, dataset).eigenvalues is None
    config.data.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match=r"config.data.dtype = 'float16'.*bfloat16"):
        config_lib.validate(config)


def test_ten_crop_eval_batches(dataset):
    preprocessing = pipeline.Preprocessing.paper(dataset)
    kwargs = {"batch_size": 8, "loading": pipeline.Loading(num_threads=1)}
    kwargs["preprocessing"] = preprocessing
    ten = list(pipeline.eval_iterator(dataset, ten_crop=True, **kwargs))
    centre = list(pipeline.eval_iterator(dataset, **kwargs))
    assert [b["images"].shape for b in ten] == [(8, 10, 224, 224, 3)] * 2 + [(4, 10, 224, 224, 3)]
    for t, c in zip(ten, centre, strict=True):
        np.testing.assert_allclose(t["images"][:, 4], c["images"], atol=1e-4)  # Crop 4: centre.
        np.testing.assert_allclose(t["images"][:, 9], c["images"][:, :, ::-1], atol=1e-4)
        np.testing.assert_array_equal(t["labels"], c["labels"])


def test_tfds_source_reads_full_size_images_directly(tmp_path):
    from alexnet_jax import train
    from tests.test_prepare import build_tiny_tfds

    tfds_dir = build_tiny_tfds(str(tmp_path / "tfds"))
    config = tiny_config(str(tmp_path / "unused"))
    config.data.source = "tfds"
    config.data.tfds_name = tfds_dir
    config.data.tfds_stats_images = 4
    config.model.num_classes = 2
    dataset = train.load_dataset(config)
    assert dataset.num_examples("train") == 6 and dataset.num_examples("val") == 2
    assert dataset.mean_image().shape == (256, 256, 3)
    preprocessing = pipeline.Preprocessing.from_config(config.data, dataset)
    batch = next(_train(dataset, batch_size=4, preprocessing=preprocessing))
    assert batch["images"].shape == (4, 224, 224, 3) and set(batch["labels"]) <= {0, 1}
    val = list(pipeline.eval_iterator(dataset, batch_size=2, preprocessing=preprocessing))
    assert [b["labels"].tolist() for b in val] == [[0, 1]]
    with pytest.raises(pipeline.DatasetMissingError, match="prepare"):
        pipeline.open_tfds(
            str(tmp_path / "nothing"),
            data_dir=None,
            stats_images=1,
            how_to_prepare="prepare it",
            cache_dir=str(tmp_path / "cache"),
        )


def test_tfds_statistics_are_computed_once_and_cached_beside_the_data(tmp_path, monkeypatch):
    from tests.test_prepare import build_tiny_tfds

    tfds_dir = build_tiny_tfds(str(tmp_path / "tfds"))
    cache = tmp_path / "stats"
    kwargs = {"data_dir": None, "how_to_prepare": "(x)", "cache_dir": str(cache)}
    first = pipeline.open_tfds(tfds_dir, stats_images=4, **kwargs)
    assert (cache / pipeline.TFDS_STATISTICS_FILE).is_file()
    reads = []
    monkeypatch.setattr(
        pipeline.writer, "prepare_image", lambda *a, **k: reads.append(1) or (None, [])
    )
    again = pipeline.open_tfds(tfds_dir, stats_images=4, **kwargs)  # From the cache: no reads.
    assert reads == []
    np.testing.assert_array_equal(again.mean_image(), first.mean_image())
    assert again.metadata["rgb_eigenvalues"] == first.metadata["rgb_eigenvalues"]
    with pytest.raises(TypeError):  # Another sample size is recomputed (here: by the stub).
        pipeline.open_tfds(tfds_dir, stats_images=3, **kwargs)
    assert reads


def test_jpeg_decoding_gives_pillows_pixels(tmp_path):
    import io

    from PIL import Image

    from alexnet_jax.data import writer

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-3, 4, (256, 256, 3)), axis=1) % 256
    for array in (smooth.astype(np.uint8), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)):
        jpeg = writer.encode_jpeg(Image.fromarray(array))
        with Image.open(io.BytesIO(jpeg)) as image:
            expected = np.asarray(image.convert("RGB"))
        decoded = pipeline.decode_jpeg(jpeg)
        assert decoded.dtype == np.uint8 and decoded.shape == (256, 256, 3)
        # Both are libjpeg-turbo with its default (exact integer) IDCT; another build's
        # chroma upsampling may round one step differently, never more.
        assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1
    gray = io.BytesIO()
    Image.fromarray(smooth[..., 0].astype(np.uint8), "L").save(gray, format="JPEG")
    assert pipeline.decode_jpeg(gray.getvalue()).shape == (256, 256, 3)  # Grey -> RGB.


@pytest.mark.parametrize("ten_crop", [False, True])
def test_uint8_evaluation_batches_finished_on_the_device_equal_the_host_views(dataset, ten_crop):
    import jax
    import jax.numpy as jnp

    from alexnet_jax.data import device_augment

    scale = np.array([0.5, 0.25, 1 / 64], np.float32)  # One per RGB, as torchvision's.
    host = dataclasses.replace(pipeline.Preprocessing.paper(dataset), scale=scale)
    shipped = dataclasses.replace(host, finish_on_device=True)
    kwargs = {"batch_size": 8, "ten_crop": ten_crop, "loading": pipeline.Loading(num_threads=1)}
    floats = list(pipeline.eval_iterator(dataset, preprocessing=host, **kwargs))
    pixels = list(pipeline.eval_iterator(dataset, preprocessing=shipped, **kwargs))
    finish = jax.jit(
        lambda b, m: device_augment.finish_eval_batch(
            b, m, crop_size=224, scale=scale, dtype=jnp.float32, ten_crop=ten_crop
        )
    )
    mean = jnp.asarray(host.mean, jnp.float32)
    for f, u in zip(floats, pixels, strict=True):
        assert u["images"].dtype == np.uint8
        # A quarter of the bytes, and for ten crops the image itself instead of ten views.
        assert u["images"].shape[1:] == ((256, 256, 3) if ten_crop else (224, 224, 3))
        out = jax.device_get(finish(u, mean))
        np.testing.assert_array_equal(out["labels"], f["labels"])
        # (pixel - mean) * scale in float32 on both sides: equal but for a fused multiply.
        np.testing.assert_allclose(out["images"], f["images"], rtol=2e-7, atol=1e-6)


def test_input_workers_auto_is_none_on_cpu_and_all_cores_but_one_on_accelerators():
    assert tuning.input_workers(-1, backend="cpu", cores=16) == 0
    assert tuning.input_workers(-1, backend="gpu", cores=16) == 15
    assert tuning.input_workers(-1, backend="tpu", cores=1) == 1
    assert tuning.input_workers(3, backend="cpu", cores=16) == 3  # Set: taken as it is.
    assert tuning.input_workers(0, backend="gpu", cores=16) == 0


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_an_endless_evaluation_iterator_repeats_the_pass(dataset, process_index, process_count):
    kwargs = {
        "batch_size": 8,
        "preprocessing": dataclasses.replace(
            pipeline.Preprocessing.paper(dataset), finish_on_device=True
        ),
        "loading": pipeline.Loading(num_threads=1),
        "process_index": process_index,
        "process_count": process_count,
    }
    one = list(pipeline.eval_iterator(dataset, **kwargs))
    images = inference.shard_images(dataset.num_examples("val"), process_index, process_count)
    n = -(-images // (8 // process_count))
    assert n == len(one) and len(one[-1]["labels"]) < len(one[0]["labels"])  # A short last one.
    endless = pipeline.eval_iterator(dataset, endless=True, **kwargs)
    passes = [next(endless) for _ in range(2 * n)]
    for expected, got in zip(one + one, passes, strict=True):
        np.testing.assert_array_equal(expected["images"], got["images"])
        np.testing.assert_array_equal(expected["labels"], got["labels"])
