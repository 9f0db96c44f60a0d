"""predict.py on a tiny trained workdir: restore, preprocessing, top-5, bad files, the CLI."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import inference, predict
from alexnet_jax.data import augment, pipeline, records, writer
from tests.conftest import ROOT, SHARED_SAMPLES


@pytest.fixture(scope="module")
def trained(tiny_trained_workdir):
    return inference.load_trained(tiny_trained_workdir)


@pytest.fixture(scope="module")
def val_pngs(trained, tmp_path_factory):
    """Four prepared validation images saved losslessly, with their records."""
    out = tmp_path_factory.mktemp("val_pngs")
    source = trained.dataset.source("val")
    paths, examples = [], []
    for i in range(4):
        example = records.decode_example(source[i])
        path = str(out / f"val_{i}.png")
        Image.fromarray(pipeline.decode_jpeg(example["image"])).save(path)
        paths.append(path)
        examples.append(example)
    return paths, examples


def _reference_probabilities(trained, image_256x256x3, windows):
    """Softmax of the model on hand-cut, hand-normalized patches, averaged over them."""
    mean = trained.dataset.mean_image().astype(np.float32)
    scale = trained.config.data.input_scale
    crops = []
    for top, left, mirror in windows:
        crop = (image_256x256x3.astype(np.float32) - mean)[top : top + 224, left : left + 224]
        crops.append((crop[:, ::-1] if mirror else crop) * scale)
    logits = trained.model.apply({"params": trained.params}, np.stack(crops), train=False)
    return np.asarray(jax.nn.softmax(logits, axis=-1)).mean(axis=0)


def test_load_trained_uses_the_saved_config_and_classes(trained, tiny_demo_dir):
    assert trained.step == 2
    assert trained.config.model.width == 1 / 16
    assert os.path.samefile(trained.dataset.data_dir, tiny_demo_dir)
    assert [c["id"] for c in trained.classes][:3] == ["disc", "square", "triangle"]
    assert trained.params["conv1"]["kernel"].shape == (2, 11, 11, 3, 3)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(inference.CheckpointMissingError, match="(?s)No checkpoint.*launch.py"):
        inference.load_trained(str(tmp_path))
    os.makedirs(tmp_path / "checkpoints")
    with pytest.raises(inference.CheckpointMissingError, match="no finished checkpoint"):
        inference.load_trained(str(tmp_path))


def test_unknown_step_is_a_clear_error(tiny_trained_workdir):
    with pytest.raises(inference.CheckpointMissingError, match="step 999.*has \\[2\\]"):
        inference.load_trained(tiny_trained_workdir, step=999)


def test_centre_crop_predictions_match_the_model_on_hand_cut_crops(trained, val_pngs):
    paths, examples = val_pngs
    results, errors = predict.predict_files(trained, paths, batch_size=3)
    assert errors == []
    assert [r["path"] for r in results] == paths
    for result, example in zip(results, examples, strict=True):
        image = pipeline.decode_jpeg(example["image"])
        expected = _reference_probabilities(trained, image, [(16, 16, False)])
        top = result["top"]
        assert len(top) == 5
        probs = [p["probability"] for p in top]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-6
        np.testing.assert_allclose(probs, np.sort(expected)[::-1][:5], rtol=1e-5, atol=1e-7)
        for p in top:
            assert trained.classes[p["class_index"]] == {"id": p["id"], "name": p["name"]}


def test_ten_crop_averages_the_softmax_of_the_papers_ten_patches(trained, val_pngs):
    paths, examples = val_pngs
    image = pipeline.decode_jpeg(examples[0]["image"])
    got = predict.predict_probabilities(trained, image[None], ten_crop=True, batch_size=2)[0]
    corners = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
    windows = [(t, s, m) for m in (False, True) for t, s in corners]
    np.testing.assert_allclose(got, _reference_probabilities(trained, image, windows), rtol=1e-5)
    assert got.sum() == pytest.approx(1.0, abs=1e-5)
    centre = predict.predict_probabilities(trained, image[None])[0]
    assert not np.allclose(got, centre)
    assert len(augment.ten_crops(np.zeros((256, 256, 3)))) == 10


def test_bad_files_are_reported_by_path_and_the_rest_processed(trained, val_pngs, tmp_path):
    paths, _ = val_pngs
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    full = tmp_path / "full.jpg"
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(full, quality=90)
    truncated.write_bytes(full.read_bytes()[:500])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = str(tmp_path / "missing.jpg")
    order = [str(text), paths[0], str(truncated), missing, str(empty), paths[1], str(tmp_path)]
    results, errors = predict.predict_files(trained, order, batch_size=2)
    assert [r["path"] for r in results] == [paths[0], paths[1]]
    bad = {e["path"]: e["error"] for e in errors}
    assert list(bad) == [str(text), str(truncated), missing, str(empty), str(tmp_path)]
    assert bad[str(text)] == "undecodable: not a recognisable image format"
    assert "truncated" in bad[str(truncated)].lower()
    assert "FileNotFoundError" in bad[missing]


def test_grayscale_and_odd_sizes_become_rgb_256(tmp_path):
    path = tmp_path / "gray.png"
    gray = (np.arange(90 * 500) % 256).astype(np.uint8).reshape(90, 500)
    Image.fromarray(gray).save(path)
    image = inference.read_image(str(path))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_cli_json_reports_results_and_bad_files(tiny_trained_workdir, val_pngs, tmp_path):
    paths, _ = val_pngs
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    cmd = [sys.executable, "-m", "alexnet_jax.predict", f"--workdir={tiny_trained_workdir}"]
    run = subprocess.run(
        [*cmd, "--json", "--ten_crop", "--top_k=3", paths[0], str(bad), paths[1]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["checkpoint_step"] == 2 and report["ten_crop"] is True
    assert [r["path"] for r in report["results"]] == [paths[0], paths[1]]
    assert all(len(r["top"]) == 3 for r in report["results"])
    assert [e["path"] for e in report["errors"]] == [str(bad)]
    assert "1 of 3 files could not be read" in run.stderr

    missing = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.predict", f"--workdir={tmp_path}", paths[0]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert missing.returncode == 3  # cli.EXIT_NO_CHECKPOINT
    assert "No checkpoint in" in missing.stderr and "launch.py" in missing.stderr


@pytest.mark.skipif(not os.path.isdir(SHARED_SAMPLES), reason="../shared/imagenet-samples absent")
def test_real_imagenet_jpegs(trained):
    paths = sorted(glob.glob(os.path.join(SHARED_SAMPLES, "*.JPEG")))
    assert len(paths) == 100
    results, errors = predict.predict_files(trained, paths, batch_size=50)
    assert errors == []
    assert len(results) == 100
    names = {c["name"] for c in trained.classes}
    for r in results:
        probs = [p["probability"] for p in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {p["name"] for p in r["top"]} <= names


def _truncate_state_files(step_dir):
    """Every file of the saved state cut to half: the params cannot be read, wherever they lie.

    (Cutting only the largest file can leave the params whole: the tools read
    only the params, so such a checkpoint is still usable for inference.)
    """
    for d, _, files in os.walk(step_dir / "state"):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_checkpoint_falls_back_as_training_does(tiny_trained_workdir, val_pngs, tmp_path):
    paths, _ = val_pngs
    workdir = tmp_path / "run"
    shutil.copytree(tiny_trained_workdir, workdir)
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / "2", checkpoints / "1")  # An older, intact step.
    _truncate_state_files(checkpoints / "2")
    cmd = [sys.executable, "-m", "alexnet_jax.predict", f"--workdir={workdir}", "--json", paths[0]]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["checkpoint_step"] == 1
    assert "Checkpoint at step 2" in run.stderr and "trying the previous one" in run.stderr
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]  # A tool only reads: nothing moved.

    _truncate_state_files(checkpoints / "1")  # Now none restores.
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 3, run.stderr[-3000:]  # cli.EXIT_NO_CHECKPOINT
    assert "No checkpoint in" in run.stderr and "could be restored" in run.stderr
    assert "step 2:" in run.stderr and "step 1:" in run.stderr
    assert "Traceback" not in run.stderr
    evaluate = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.evaluate", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert evaluate.returncode == 3, evaluate.stderr[-3000:]
    assert "could be restored" in evaluate.stderr and "Traceback" not in evaluate.stderr


def _photo(size=(900, 700)):
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_predict_prepares_a_file_exactly_as_prepare_does(tmp_path):
    rgba = np.zeros((300, 400, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.linspace(0, 255, 400).astype(np.uint8)[None, :]
    gradient = (np.linspace(0, 65535, 400)[None, :] * np.ones((300, 1))).astype(np.uint16)
    cases = {
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "sixteen_bit.png": Image.fromarray(gradient),  # Mode I;16.
        "large.jpg": _photo((2000, 1200)),  # Decoded at a reduced DCT scale.
        "cmyk.jpg": _photo().convert("CMYK"),
    }
    for name, image in cases.items():
        path = tmp_path / name
        image.save(path)
        trained_on, _ = writer.prepare_image(path.read_bytes())  # What prepare stores (pre-JPEG).
        np.testing.assert_array_equal(inference.read_image(str(path)), np.asarray(trained_on))
    # Scaled, not clipped to white: the central crop spans 12.5%-87.5% of the 0-65535 ramp.
    ramp = inference.read_image(str(tmp_path / "sixteen_bit.png"))[..., 0]
    assert 28 <= ramp.min() <= 38 and 217 <= ramp.max() <= 227, (ramp.min(), ramp.max())


def test_predict_honours_exif_orientation_and_training_data_does_not(tmp_path):
    image = _photo((400, 300))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    upright = inference.read_image(str(path))
    as_stored, _ = writer.prepare_image(path.read_bytes())
    rotated, _ = writer.prepare_image(path.read_bytes(), honour_exif_orientation=True)
    np.testing.assert_array_equal(upright, np.asarray(rotated))
    assert np.abs(upright.astype(int) - np.asarray(as_stored).astype(int)).mean() > 20
