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

from alexnet_jax import cli, inference, tuning
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


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (tools never clash on import)."""
    cli.define_checkpoint_flags()
    flags.DEFINE_bool(
        "ten_crop",
        False,
        "Average the softmax over the paper's 10 patches, not the centre one.",
    )
    flags.DEFINE_bool("json", False, "Print the results as JSON instead of text.")
    flags.DEFINE_integer("top_k", TOP_K, "How many classes to list per image.")
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")


def main(argv: Sequence[str]) -> int:
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    cli.quiet_library_logs()
    paths = list(argv[1:])
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not paths:
        raise app.UsageError("Give one or more image files after the flags")
    if FLAGS.top_k < 1 or FLAGS.batch_size < 1:
        raise app.UsageError("--top_k and --batch_size must be >= 1")
    tuning.configure_process()  # Before JAX starts its backends.
    trained = inference.load_trained(
        FLAGS.workdir, config=FLAGS.config, data_dir=FLAGS.data_dir, step=FLAGS.step
    )
    logging.info(
        "Restored step %d from %s (%d classes)", trained.step, FLAGS.workdir, len(trained.classes)
    )
    results, errors = predict_files(
        trained, paths, ten_crop=FLAGS.ten_crop, batch_size=FLAGS.batch_size, k=FLAGS.top_k
    )
    if FLAGS.json:
        report = {
            "workdir": FLAGS.workdir,
            "checkpoint_step": trained.step,
            "ten_crop": FLAGS.ten_crop,
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
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
