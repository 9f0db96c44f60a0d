"""Top-5 predictions of a trained AlexNet for image files.

    python -m alexnet_jax.predict --workdir=/tmp/alexnet_demo photo1.jpg photo2.png
    python -m alexnet_jax.predict --workdir=DIR --ten_crop --json *.JPEG > predictions.json

Each image is prepared as the training data was (shorter side to 256, central
256x256 patch, mean image subtracted, times ``config.data.input_scale``), then
classified from its central 224x224 patch or, with ``--ten_crop``, from the
average of the softmax outputs of the paper's ten patches (Sec. 4.1).
A file that is not a readable image is reported by path; the others are still
classified, and the exit status is 1 (``cli.EXIT_PARTIAL``). The model is
loaded by ``inference.load_trained``: the newest usable checkpoint, or ``--step``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import checkpoint, cli, inference, tuning
from alexnet_jax.data import writer

TOP_K = 5


def predict_probabilities(
    trained: inference.TrainedModel,
    images_Nx256x256x3: np.ndarray,
    *,
    ten_crop: bool = False,
    batch_size: int = 32,
    probabilities_fn=None,
) -> np.ndarray:
    """Class probabilities (N x num_classes) for prepared uint8 256-px images.

    Batches are padded to ``batch_size`` so the network compiles once.
    """
    probabilities_fn = probabilities_fn or inference.make_probabilities_fn(trained.model)
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
    trained: inference.TrainedModel,
    paths: Sequence[str],
    *,
    ten_crop: bool = False,
    batch_size: int = 32,
    k: int = TOP_K,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Top-k predictions per readable file, and ``{"path", "error"}`` for each unreadable one.

    Files are read one batch at a time, so any number of them fits in memory.
    """
    probabilities_fn = inference.make_probabilities_fn(trained.model)
    results, errors = [], []
    start_time = time.time()
    for start in range(0, len(paths), batch_size):
        batch_paths, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(inference.read_image(path))
                batch_paths.append(path)
            except inference.IMAGE_ERRORS as e:
                logging.warning("Skipping %s: %s", path, e)
                errors.append({"path": path, "error": describe_image_error(e)})
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


def describe_image_error(error: Exception) -> str:
    """``undecodable: not a recognisable image format``, ``FileNotFoundError: ...``."""
    if isinstance(error, writer.BadImageError):
        return f"{error.kind}: {error.reason}"
    return f"{type(error).__name__}: {error}"


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


def main(argv: Sequence[str]) -> int:
    cli.quiet_library_logs()
    paths = list(argv[1:])
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not paths:
        raise app.UsageError("Give one or more image files after the flags")
    if _TOP_K.value < 1 or _BATCH_SIZE.value < 1:
        raise app.UsageError("--top_k and --batch_size must be >= 1")
    try:
        tuning.configure_process()  # Before JAX starts its backends.
        trained = inference.load_trained(
            _WORKDIR.value, config=_CONFIG.value, data_dir=_DATA_DIR.value, step=_STEP.value
        )
    except (inference.CheckpointMissingError, checkpoint.NoUsableCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_NO_CHECKPOINT
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return cli.EXIT_USAGE
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
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
