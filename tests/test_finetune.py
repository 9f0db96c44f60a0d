"""Fine-tuning (alexnet_jax/finetune.py, configs/finetune.py) on a folder dataset made here."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from alexnet_jax import checkpoint, config_lib, inference, predict, train
from alexnet_jax.data import prepare
from configs import finetune as finetune_config

# Three shapes the demo never drew, each in its own range of colours, on any background.
CLASSES = {"crescent": (60, 170, 210), "star": (225, 190, 40), "zigzag": (200, 60, 160)}


def _draw(draw: ImageDraw.ImageDraw, name: str, fill, background, size, rng) -> None:
    r = int(size * rng.uniform(0.22, 0.35))
    cx, cy = (int(v) for v in rng.integers(r, size - r + 1, 2))
    if name == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = 0.55 * r * np.cos(angle), 0.55 * r * np.sin(angle)
        draw.ellipse((cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r), fill=background)
    elif name == "star":
        turn = rng.uniform(0, 2 * np.pi)
        points = [
            (cx + rad * np.cos(turn + k * np.pi / 5), cy + rad * np.sin(turn + k * np.pi / 5))
            for k, rad in enumerate([r, 0.42 * r] * 5)
        ]
        draw.polygon(points, fill=fill)
    else:
        step = int(size * rng.uniform(0.08, 0.14))
        xs = range(-step, size + step, step)
        line = [(x, cy + (r // 2 if i % 2 else -r // 2)) for i, x in enumerate(xs)]
        draw.line(line, fill=fill, width=max(3, size // 20))


def write_class_folders(root: str, per_class: int = 12, seed: int = 0, size: int = 160) -> str:
    """ROOT/<class>/<class>_NNN.jpg: one shape of the class's colour range on a noisy background."""
    rng = np.random.default_rng(seed)
    for name, colour in CLASSES.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            fill = tuple(int(c) for c in np.clip(colour + rng.normal(0, 20, 3), 0, 255))
            background = rng.integers(0, 256, 3)
            if np.abs(background - fill).sum() < 200:  # Keep the shape visible.
                background = 255 - background
            image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
            _draw(ImageDraw.Draw(image), name, fill, tuple(background), size, rng)
            pixels = np.asarray(image, np.float32) + rng.normal(0, 12, (size, size, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(os.path.join(root, name, f"{name}_{i:03d}.jpg"), quality=90)
    return root


def tiny_finetune_config(data_dir: str, init_from: str, **fields):
    """configs/finetune.py:demo at tests' 1/16 width, for ``tiny_trained_workdir``."""
    config = finetune_config.get_config("demo")
    config.model.width = 1 / 16
    config.model.num_classes = len(CLASSES)
    config.data.dir = data_dir
    config.data.num_threads = 1
    config.init_from = init_from
    config.batch_size = 30  # The whole training split: smoother steps.
    config.eval_batch_size = 6
    config.eval_every_epochs = 5.0
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1000
    for name, value in fields.items():  # "optim.learning_rate" -> config.optim.learning_rate
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def prepared_folder(tmp_path_factory):
    source = write_class_folders(str(tmp_path_factory.mktemp("photos")))
    data_dir = str(tmp_path_factory.mktemp("photos_prepared"))
    metadata = prepare.prepare(source, data_dir, num_workers=0)
    return source, data_dir, metadata


@pytest.fixture(scope="module")
def finetuned(prepared_folder, tiny_trained_workdir, tmp_path_factory):
    _, data_dir, _ = prepared_folder
    workdir = str(tmp_path_factory.mktemp("finetuned"))
    # A low rate (the demo trains at 0.01), so the loss falls without swinging.
    config = tiny_finetune_config(
        data_dir, tiny_trained_workdir, max_steps=40, **{"optim.learning_rate": 0.003}
    )
    train.train_and_evaluate(config, workdir)
    return workdir


def test_the_folder_prepares_with_its_class_names_and_a_held_out_split(prepared_folder):
    source, _, metadata = prepared_folder
    assert metadata["name"] == os.path.basename(source)
    assert [c["id"] for c in metadata["classes"]] == ["crescent", "star", "zigzag"]
    assert metadata["val_split"]["per_class"]["star"] == {"train": 10, "val": 2}
    assert metadata["splits"]["train"]["num_examples"] == 30


def test_finetuning_lowers_the_loss_keeps_frozen_layers_and_replaces_the_head(
    finetuned, tiny_trained_workdir
):
    with open(os.path.join(finetuned, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    # Robust, not a trajectory: the last ten steps' mean well below the first five's
    # (0.29-0.42 lower over four seeds).
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.15, losses

    _, _, source, _ = inference.load_params(tiny_trained_workdir)
    run, _, tuned, _ = inference.load_params(finetuned)
    assert run.init_from == tiny_trained_workdir
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for name in ("kernel", "bias"):
            assert np.asarray(tuned[layer][name]).tobytes() == (
                np.asarray(source[layer][name]).tobytes()
            ), f"{layer}/{name} changed"
    for layer in ("fc6", "fc7"):
        assert not np.array_equal(np.asarray(tuned[layer]["kernel"]), source[layer]["kernel"])
    assert source["fc8"]["kernel"].shape == (256, 10)  # fc7's 2 x 128 features, 10 demo classes.
    assert tuned["fc8"]["kernel"].shape == (256, 3) and tuned["fc8"]["bias"].shape == (3,)


def test_predict_names_the_folder_classes(finetuned, prepared_folder):
    source, _, _ = prepared_folder
    trained = inference.load_trained(finetuned)
    assert [c["name"] for c in trained.classes] == ["crescent", "star", "zigzag"]
    paths = [os.path.join(source, c, f"{c}_000.jpg") for c in CLASSES]
    results, errors = predict.predict_files(trained, paths)
    assert errors == []
    for result in results:
        assert sorted(p["name"] for p in result["top"]) == ["crescent", "star", "zigzag"]
        assert abs(sum(p["probability"] for p in result["top"]) - 1) < 1e-5
    text = predict.format_text(results, errors)
    assert "star      [star]" in text and "crescent  [crescent]" in text


def test_another_network_is_refused_naming_the_field_and_its_value(
    prepared_folder, tiny_trained_workdir, tmp_path
):
    _, data_dir, _ = prepared_folder
    config = tiny_finetune_config(
        data_dir, tiny_trained_workdir, max_steps=1, **{"model.width": 0.125}
    )
    with pytest.raises(config_lib.ConfigError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "config.model.width is 0.0625 there and 0.125 here" in str(e.value)
    assert "--config.model.width=0.0625" in str(e.value)
    config = tiny_finetune_config(data_dir, str(tmp_path / "nothing"), max_steps=1)
    with pytest.raises(config_lib.ConfigError, match=r"config.init_from = .*nothing.*checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "run2"))


def test_a_relaunch_resumes_its_own_run_and_keeps_its_frozen_layers(
    finetuned, prepared_folder, tmp_path
):
    _, data_dir, _ = prepared_folder
    # init_from is not read again (it no longer exists), and freezing may not change.
    config = tiny_finetune_config(
        data_dir, str(tmp_path / "gone"), max_steps=41, **{"optim.frozen_layers": ("conv1",)}
    )
    with pytest.raises(checkpoint.ConfigMismatchError, match="config.optim.frozen_layers"):
        train.train_and_evaluate(config, finetuned)
