"""Top-5 predictions of a trained AlexNet for image files.

    python -m alexnet_jax.predict --workdir=/tmp/alexnet_demo photo1.jpg photo2.png
    python -m alexnet_jax.predict --workdir=DIR --ten_crop --json *.JPEG > predictions.json

Each image is prepared as the training data was (shorter side to 256, central
256x256 patch, mean image subtracted, times ``config.data.input_scale``), then
classified from its central 224x224 patch or, with ``--ten_crop``, from the
average of the softmax outputs of the paper's ten patches (Sec. 4.1).
A file that is not a readable image is reported by path; the others are still
classified, and the exit status is 1.

Also the one place that loads a trained model (config, params, class names,
mean image) for ``visualize.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from alexnet_jax import checkpoint, train, tuning
from alexnet_jax.data import augment, pipeline, writer
from alexnet_jax.model import AlexNet
from configs import common

CROP_SIZE = pipeline.CROP_SIZE
TOP_K = 5
# Errors PIL raises for files that are missing, not images, truncated or corrupt.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class CheckpointMissingError(FileNotFoundError):
    """The workdir holds no checkpoint to load."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A restored checkpoint with everything needed to feed it images and name its outputs."""

    config: ml_collections.ConfigDict
    model: AlexNet
    params: Any
    step: int
    dataset: pipeline.Dataset  # The prepared data it was trained on: classes, mean image.

    @property
    def classes(self) -> list[dict[str, str]]:
        """One ``{"id", "name"}`` per output, in output order (wnid and name for ImageNet)."""
        return self.dataset.metadata["classes"]

    @functools.cached_property
    def preprocessing(self) -> pipeline.Preprocessing:
        """The run's evaluation preprocessing (mean subtraction, input scale)."""
        return pipeline.Preprocessing.from_config(self.config.data, self.dataset)

    def views(self, image_256x256x3: np.ndarray, *, ten_crop: bool) -> np.ndarray:
        """A prepared uint8 image -> V x 224 x 224 x 3 float32 inputs (V = 1 or 10)."""
        p = self.preprocessing
        if ten_crop:
            return augment.ten_crop(
                image_256x256x3, mean=p.mean, crop_size=p.crop_size, scale=p.scale
            )
        crop = augment.center_crop(
            image_256x256x3, mean=p.mean, crop_size=p.crop_size, scale=p.scale
        )
        return crop[None]


def run_config(
    ckpt: checkpoint.Checkpointer, step: int, fallback: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """The config saved with ``step``, on top of today's defaults; else ``fallback``.

    Defaults fill in fields added since the run; fields since removed are dropped.
    """
    try:
        saved = checkpoint.flatten_config(ckpt.saved_config(step))
    except Exception as e:  # noqa: BLE001 - older checkpoints have no config item.
        if fallback is None:
            raise ValueError(
                f"The checkpoint at step {step} in {ckpt.directory} holds no config "
                f"({type(e).__name__}); pass the config it was trained with, e.g. "
                "--config=configs/demo.py"
            ) from e
        return fallback
    if fallback is not None:
        logging.warning("Using the config saved in the checkpoint; --config is ignored")
    config = common.base_config()
    known = checkpoint.flatten_config(config.to_dict())
    config.update_from_flattened_dict(
        {k: tuple(v) if isinstance(known[k], tuple) else v for k, v in saved.items() if k in known}
    )
    return config


def load_trained(
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    data_dir: str | None = None,
    step: int | None = None,
) -> TrainedModel:
    """Restores the params of ``workdir``'s latest (or ``step``'s) checkpoint.

    The run's config comes from the checkpoint; ``config`` is used only for
    checkpoints saved without one. ``data_dir`` overrides ``config.data.dir``
    (the prepared dataset gives the class names and the mean image).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    train_command = f"python launch.py --config=configs/demo.py --workdir={workdir}"
    if not os.path.isdir(ckpt_dir):
        raise CheckpointMissingError(
            f"No checkpoint in {workdir} (no {ckpt_dir} directory). Train a model first, "
            f"e.g.:\n  {train_command}"
        )
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointMissingError(
                f"{ckpt_dir} holds no finished checkpoint. Train a model first, e.g.:\n"
                f"  {train_command}"
            )
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointMissingError(
                f"No checkpoint for step {step} in {ckpt_dir}: has {steps}"
            )
        config = run_config(ckpt, step, config)
        if data_dir is not None:
            config = ml_collections.ConfigDict(config.to_dict())
            config.data.dir = data_dir
        model = train.build_model(config)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
            jax.eval_shape(
                lambda: model.init(
                    jax.random.PRNGKey(0), jnp.zeros((1, CROP_SIZE, CROP_SIZE, 3)), train=False
                )["params"]
            ),
        )
        params = ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()
    dataset = pipeline.open_dataset(
        config.data.dir,
        how_to_prepare=(
            f"the prepared dataset the run in {workdir} trained on; pass --data_dir=DIR "
            "if it has moved"
        ),
    )
    if dataset.num_classes != config.model.num_classes:
        raise ValueError(
            f"The dataset in {dataset.data_dir} has {dataset.num_classes} classes but the model "
            f"in {workdir} has {config.model.num_classes} outputs: pass the right --data_dir"
        )
    return TrainedModel(config, model, params, step, dataset)


def read_image(path: str) -> np.ndarray:
    """An image file -> uint8 256x256x3, prepared as the training data (Sec. 2).

    Raises one of ``IMAGE_ERRORS`` for a missing, non-image or broken file.
    """
    with Image.open(path) as image:
        image.load()  # Decode now, so a truncated file fails here.
        return np.asarray(writer.resize_and_center_crop(image), np.uint8)


def make_probabilities_fn(model: AlexNet):
    """Jitted (params, B x V x 224 x 224 x 3 views) -> softmax averaged over the V views."""

    @jax.jit
    def probabilities(params: Any, views_BxVxHxWxC: jax.Array) -> jax.Array:
        b, v = views_BxVxHxWxC.shape[:2]
        images = views_BxVxHxWxC.reshape(b * v, *views_BxVxHxWxC.shape[2:])
        logits = model.apply({"params": params}, images, train=False)
        return augment.average_crop_softmax(logits.reshape(b, v, -1))

    return probabilities


def predict_probabilities(
    trained: TrainedModel,
    images_Nx256x256x3: np.ndarray,
    *,
    ten_crop: bool = False,
    batch_size: int = 32,
    probabilities_fn=None,
) -> np.ndarray:
    """Class probabilities (N x num_classes) for prepared uint8 256-px images.

    Batches are padded to ``batch_size`` so the network compiles once.
    """
    probabilities_fn = probabilities_fn or make_probabilities_fn(trained.model)
    outputs = []
    for start in range(0, len(images_Nx256x256x3), batch_size):
        views = np.stack(
            [
                trained.views(im, ten_crop=ten_crop)
                for im in images_Nx256x256x3[start : start + batch_size]
            ]
        )
        n = len(views)
        views = np.concatenate([views, np.zeros((batch_size - n, *views.shape[1:]), views.dtype)])
        outputs.append(np.asarray(probabilities_fn(trained.params, views))[:n])
    if not outputs:
        return np.zeros((0, trained.config.model.num_classes), np.float32)
    return np.concatenate(outputs)


def top_k(
    probabilities_K: np.ndarray, classes: Sequence[dict[str, str]], k: int = TOP_K
) -> list[dict[str, Any]]:
    """The k most probable classes, most probable first."""
    order = np.argsort(-probabilities_K, kind="stable")[: min(k, len(probabilities_K))]
    return [
        {
            "class_index": int(i),
            "id": classes[i]["id"],
            "name": classes[i]["name"],
            "probability": float(probabilities_K[i]),
        }
        for i in order
    ]


def predict_files(
    trained: TrainedModel,
    paths: Sequence[str],
    *,
    ten_crop: bool = False,
    batch_size: int = 32,
    k: int = TOP_K,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Top-k predictions per readable file, and ``{"path", "error"}`` for each unreadable one.

    Files are read one batch at a time, so any number of them fits in memory.
    """
    probabilities_fn = make_probabilities_fn(trained.model)
    results, errors = [], []
    start_time = time.time()
    for start in range(0, len(paths), batch_size):
        batch_paths, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path))
                batch_paths.append(path)
            except IMAGE_ERRORS as e:
                logging.warning("Skipping %s: %s", path, e)
                errors.append({"path": path, "error": f"{type(e).__name__}: {e}"})
        if images:
            probabilities = predict_probabilities(
                trained,
                np.stack(images),
                ten_crop=ten_crop,
                batch_size=batch_size,
                probabilities_fn=probabilities_fn,
            )
            for path, p in zip(batch_paths, probabilities, strict=True):
                results.append({"path": path, "top": top_k(p, trained.classes, k)})
        done = min(start + batch_size, len(paths))
        if len(paths) > batch_size:
            elapsed = time.time() - start_time
            logging.info(
                "%d/%d images  %.1f img/s  ETA %.0fs",
                done,
                len(paths),
                done / max(elapsed, 1e-9),
                elapsed / done * (len(paths) - done),
            )
    return results, errors


def format_text(results: Sequence[dict[str, Any]], errors: Sequence[dict[str, str]]) -> str:
    """One block per image: its path, then rank, probability, class name and id."""
    lines = []
    for result in results:
        lines.append(result["path"])
        width = max((len(p["name"]) for p in result["top"]), default=0)
        for rank, p in enumerate(result["top"], 1):
            name = f"{p['name']:<{width}}"
            lines.append(f"  {rank}. {100 * p['probability']:6.2f}%  {name}  [{p['id']}]")
    for error in errors:
        lines.append(f"{error['path']}\n  error: {error['error']}")
    return "\n".join(lines)


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
_TEN_CROP = flags.DEFINE_bool(
    "ten_crop", False, "Average the softmax over the paper's 10 patches instead of the centre one."
)
_JSON = flags.DEFINE_bool("json", False, "Print the results as JSON instead of text.")
_TOP_K = flags.DEFINE_integer("top_k", TOP_K, "How many classes to list per image.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Prepared dataset (class names, mean image); default: the run's config."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file of the run (e.g. configs/demo.py), only for checkpoints saved without one.",
    lock_config=True,
)


class QuietLibraryLogs(std_logging.Filter):
    """Keeps this package's INFO progress; from libraries (orbax's chatter) only errors."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/alexnet_jax/" in record.pathname:
            return True
        threshold = std_logging.ERROR if "/orbax/" in record.pathname else std_logging.WARNING
        return record.levelno >= threshold


def main(argv: Sequence[str]) -> int:
    logging.get_absl_handler().addFilter(QuietLibraryLogs())
    paths = list(argv[1:])
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not paths:
        raise app.UsageError("Give one or more image files after the flags")
    if _TOP_K.value < 1 or _BATCH_SIZE.value < 1:
        raise app.UsageError("--top_k and --batch_size must be >= 1")
    try:
        tuning.configure_process()  # Before JAX starts its backends.
        trained = load_trained(
            _WORKDIR.value, config=_CONFIG.value, data_dir=_DATA_DIR.value, step=_STEP.value
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.info(
        "Restored step %d from %s (%d classes)", trained.step, _WORKDIR.value, len(trained.classes)
    )
    results, errors = predict_files(
        trained, paths, ten_crop=_TEN_CROP.value, batch_size=_BATCH_SIZE.value, k=_TOP_K.value
    )
    if _JSON.value:
        report = {
            "workdir": _WORKDIR.value,
            "checkpoint_step": trained.step,
            "ten_crop": _TEN_CROP.value,
            "results": results,
            "errors": errors,
        }
        print(json.dumps(report, indent=1))
    else:
        print(format_text(results, errors))
    if errors:
        print(f"{len(errors)} of {len(paths)} files could not be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
