"""visualize.py: Fig. 3 filter grid, Fig. 4 neighbours, training curves, the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import inference, visualize
from alexnet_jax.model import AlexNet, scaled
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def trained(tiny_trained_workdir):
    return inference.load_trained(tiny_trained_workdir)


def test_paper_net_has_96_conv1_kernels_and_width_w_has_2_round_48w():
    for width in (1.0, 0.25, 1 / 16):
        abstract = jax.eval_shape(
            lambda w=width: AlexNet(width=w).init(
                jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32), train=False
            )["params"]
        )
        towers, *_, per_tower = abstract["conv1"]["kernel"].shape
        assert towers * per_tower == 2 * round(48 * width) == 2 * scaled(48, width)
    assert 2 * scaled(48, 1.0) == 96


def test_filter_grid_of_96_kernels_has_the_papers_layout():
    rng = np.random.default_rng(0)
    kernels = rng.normal(size=(2, 48, 11, 11, 3)).astype(np.float32)
    kernels[1, 5] *= 1000.0  # A strong kernel must not wash out the others.
    grid = visualize.filter_grid(kernels, columns=16, scale=4, pad=2, gap=8)
    # 16 kernels of 44 px per row with 2-px gutters; 3 rows per tower, 8 px between towers.
    assert grid.shape == (2 + 2 * 3 * 46 + 8, 2 + 16 * 46, 3) == (286, 738, 3)
    assert visualize.filter_grid_size(2, 48, 11, columns=16, scale=4, pad=2, gap=8) == (738, 286)
    for t, n in ((0, 0), (0, 47), (1, 5), (1, 20)):
        top = 2 + t * (3 * 46 + 8) + (n // 16) * 46
        left = 2 + (n % 16) * 46
        cell = grid[top : top + 44, left : left + 44].astype(np.float64)
        k = kernels[t, n]
        expected = (k - k.min()) / (k.max() - k.min()) * 255
        np.testing.assert_allclose(cell[::4, ::4], expected, atol=0.5)
        assert cell.min() == 0 and cell.max() == 255  # Each kernel stretched on its own.
    assert (grid[:2] == 255).all() and (grid[2 + 3 * 46 : 2 + 3 * 46 + 8] == 255).all()


def test_filters_cli_writes_the_png_of_the_trained_kernels(tiny_trained_workdir, tmp_path):
    out = tmp_path / "filters.png"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.visualize",
            "filters",
            f"--workdir={tiny_trained_workdir}",
            f"--output={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert run.returncode == 0, run.stderr
    per_tower = scaled(48, 1 / 16)  # 3 kernels per tower at the tiny width
    image = np.asarray(Image.open(out))
    assert image.shape == (2 + 2 * 46 + 8, 2 + per_tower * 46, 3)
    trained = inference.load_trained(tiny_trained_workdir)
    expected = visualize.filter_grid(visualize.conv1_kernels(trained.params))
    np.testing.assert_array_equal(image, expected)


def test_nearest_training_image_of_a_training_image_is_itself_at_distance_0(trained):
    indices = [0, 13, 57]
    images, keys, labels = visualize.split_images(trained.dataset, "train", indices)
    found = visualize.find_neighbours(
        trained,
        query_images=images,
        query_names=keys,
        query_labels=labels,
        k=4,
        gallery_split="train",
        batch_size=16,
    )
    assert found.indices.shape == found.distances.shape == (3, 4)
    np.testing.assert_array_equal(found.indices[:, 0], indices)
    np.testing.assert_array_equal(found.distances[:, 0], 0.0)
    assert (np.diff(found.distances, axis=1) >= 0).all()
    assert (found.distances[:, 1:] > 0).all()

    # The same top-k from all 80 fc7 vectors at once, computed another way.
    all_images, _, _ = visualize.split_images(trained.dataset, "train", range(80))
    views = np.stack([trained.views(im, ten_crop=False)[0] for im in all_images])
    _, fc7 = trained.model.apply({"params": trained.params}, views, train=False, with_features=True)
    fc7 = np.asarray(fc7, np.float64)
    d = np.linalg.norm(fc7[indices][:, None] - fc7[None], axis=-1)
    np.testing.assert_array_equal(np.sort(found.indices[:, 1:]), np.sort(np.argsort(d)[:, 1:4]))
    np.testing.assert_allclose(found.distances, np.sort(d)[:, :4], rtol=1e-4, atol=1e-5)

    rows = found.to_json(trained.dataset)
    assert rows[0]["neighbours"][0]["key"] == keys[0]
    grid = visualize.neighbours_grid(found, trained.dataset, thumb=32, pad=4, gap=12)
    assert grid.shape == (4 + 3 * 36, 4 + 5 * 36 + 12, 3)


def test_gallery_stride_searches_every_nth_image(trained):
    images, keys, labels = visualize.split_images(trained.dataset, "train", [0, 5])
    found = visualize.find_neighbours(
        trained,
        query_images=images,
        query_names=keys,
        query_labels=labels,
        k=3,
        gallery_stride=5,
        batch_size=16,
    )
    assert (found.indices % 5 == 0).all()
    np.testing.assert_array_equal(found.indices[:, 0], [0, 5])


def test_read_metrics_keeps_the_resumed_runs_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 10, "split": "train", "loss": 2.0, "learning_rate": 0.01},
        {"step": 20, "split": "train", "loss": 1.5, "learning_rate": 0.01},
        {"step": 20, "split": "val", "loss": 1.6, "top1_error": 0.5, "top5_error": 0.2},
        # Killed after step 20 and resumed from the step-10 checkpoint:
        {"step": 20, "split": "train", "loss": 1.4, "learning_rate": 0.01},
        {"step": 30, "split": "train", "loss": 1.2, "learning_rate": 0.001},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 40, "spl')
    curves = visualize.read_metrics(str(path))
    steps, loss = curves["train"]["loss"]
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_array_equal(loss, [2.0, 1.4, 1.2])
    assert visualize.learning_rate_drops(curves["train"]["learning_rate"]) == [30]
    smooth = (np.arange(100), np.linspace(0.1, 0.0, 100))
    assert visualize.learning_rate_drops(smooth) == []


def test_curves_png_from_the_trained_workdir(tiny_trained_workdir, tmp_path):
    curves = visualize.read_metrics(os.path.join(tiny_trained_workdir, "metrics.jsonl"))
    assert {"train", "val"} <= set(curves)
    assert curves["val"]["top1_error"][0].tolist() == [2]
    spe = visualize.steps_per_epoch(tiny_trained_workdir)
    assert spe == 80 // 16
    out = visualize.plot_curves(curves, str(tmp_path / "curves.png"), steps_per_epoch=spe)
    assert Image.open(out).size == visualize.CURVES_SIZE


def test_cli_without_a_checkpoint_exits_3_naming_the_workdir(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.visualize", "filters", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert run.returncode == 3, run.stderr  # cli.EXIT_NO_CHECKPOINT, as predict and evaluate.
    assert f"No checkpoint in {tmp_path}" in run.stderr and "Traceback" not in run.stderr
