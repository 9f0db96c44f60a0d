"""The paper's figures for a trained run, and its training curves, as PNG files.

    python -m alexnet_jax.visualize filters --workdir=DIR      # Fig. 3: conv1 kernels
    python -m alexnet_jax.visualize neighbours --workdir=DIR   # Fig. 4: fc7 nearest neighbours
    python -m alexnet_jax.visualize curves --workdir=DIR       # loss and errors from metrics.jsonl

Each writes ``DIR/figures/<command>.png`` unless ``--output`` says otherwise.
``neighbours`` also takes image files as queries (``... neighbours --workdir=DIR a.jpg b.jpg``);
without them it draws ``--num_queries`` validation images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw

from alexnet_jax import (
    checkpoint,
    cli,
    errors,
    inference,
    tuning,
)
from alexnet_jax.data import pipeline, records

COMMANDS = ("filters", "neighbours", "curves")
BACKGROUND = 255  # White between kernels and thumbnails, as in the paper's figures.
SAME_CLASS_COLOUR = (40, 160, 60)
OTHER_CLASS_COLOUR = (200, 40, 40)
QUERY_COLOUR = (40, 40, 40)


# ---------------------------------------------------------------------------
# Fig. 3: the conv1 kernels.


def conv1_kernels(params: Mapping[str, Any]) -> np.ndarray:
    """conv1's kernels as T x N x 11 x 11 x 3 (towers, kernels per tower, h, w, RGB)."""
    kernel_TxHxWxCinxN = np.asarray(params["conv1"]["kernel"], np.float32)
    return np.moveaxis(kernel_TxHxWxCinxN, -1, 1)


def rescale_each(kernels_Nx: np.ndarray) -> np.ndarray:
    """Each kernel (leading axes index kernels; last three are h, w, RGB) stretched to [0, 1].

    The paper shows kernels this way: per kernel, the smallest weight is
    black and the largest white, so weak and strong kernels are both visible.
    """
    lo = kernels_Nx.min(axis=(-3, -2, -1), keepdims=True)
    hi = kernels_Nx.max(axis=(-3, -2, -1), keepdims=True)
    return (kernels_Nx - lo) / np.maximum(hi - lo, 1e-12)


def filter_grid_size(
    num_towers: int,
    per_tower: int,
    kernel_size: int,
    *,
    columns: int,
    scale: int,
    pad: int,
    gap: int,
) -> tuple[int, int]:
    """(width, height) in pixels of ``filter_grid``'s image."""
    cols = min(columns, per_tower)
    rows = math.ceil(per_tower / cols)
    cell = kernel_size * scale
    width = pad + cols * (cell + pad)
    height = pad + num_towers * rows * (cell + pad) + (num_towers - 1) * gap
    return width, height


def filter_grid(
    kernels_TxNxHxWx3: np.ndarray, *, columns: int = 16, scale: int = 4, pad: int = 2, gap: int = 8
) -> np.ndarray:
    """The paper's Fig. 3: one block of rows per tower, each kernel rescaled, enlarged ``scale``x.

    Returns a uint8 H x W x 3 image; tower 0's block is on top.
    """
    towers, per_tower, k = kernels_TxNxHxWx3.shape[:3]
    width, height = filter_grid_size(
        towers, per_tower, k, columns=columns, scale=scale, pad=pad, gap=gap
    )
    cols = min(columns, per_tower)
    rows = math.ceil(per_tower / cols)
    cell = k * scale
    pixels = (rescale_each(kernels_TxNxHxWx3) * 255.0).round().astype(np.uint8)
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    grid = np.full((height, width, 3), BACKGROUND, np.uint8)
    for t in range(towers):
        block_top = pad + t * (rows * (cell + pad) + gap)
        for n in range(per_tower):
            top = block_top + (n // cols) * (cell + pad)
            left = pad + (n % cols) * (cell + pad)
            grid[top : top + cell, left : left + cell] = pixels[t, n]
    return grid


def save_png(image_HxWx3: np.ndarray, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image_HxWx3).save(path, optimize=True)
    return path


# ---------------------------------------------------------------------------
# Fig. 4: nearest neighbours in fc7 space.


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """For Q queries, the k nearest gallery images (nearest first)."""

    query_names: list[str]  # Record key or file path of each query.
    query_labels: list[int | None]  # None for image files (label unknown).
    query_images: np.ndarray  # Q x 256 x 256 x 3 uint8, as the network's crop was cut from.
    indices: np.ndarray  # Q x k gallery indices into ``gallery_split``.
    distances: np.ndarray  # Q x k Euclidean distances between fc7 vectors.
    gallery_split: str

    def to_json(self, dataset: pipeline.Dataset) -> list[dict[str, Any]]:
        source = dataset.source(self.gallery_split)
        rows = []
        for q, name in enumerate(self.query_names):
            found = []
            for index, distance in zip(self.indices[q], self.distances[q], strict=True):
                example = records.decode_example(source[int(index)])
                found.append(
                    {
                        "index": int(index),
                        "key": example["key"],
                        "label": int(example["label"]),
                        "class": dataset.metadata["classes"][example["label"]]["name"],
                        "distance": float(distance),
                    }
                )
            rows.append({"query": name, "label": self.query_labels[q], "neighbours": found})
        return rows


def make_features_and_distances_fn(model):
    """Jitted (params, images B x 224 x 224 x 3, queries Q x D) -> (fc7 B x D, distances B x Q).

    One program serves the queries and the gallery, so an image's fc7 vector
    is computed the same way in both roles. Distances are taken directly,
    ||f - q||, not from ||f||^2 + ||q||^2 - 2 f.q, so an image is at exactly
    the distance 0 from itself.
    """

    @jax.jit
    def features_and_distances(params, images_BxHxWxC, queries_QxD):
        _, fc7_BxD = model.apply(
            {"params": params}, images_BxHxWxC, train=False, with_features=True
        )
        diff_BxQxD = fc7_BxD[:, None, :] - queries_QxD[None, :, :]
        return fc7_BxD, jnp.sqrt(jnp.sum(jnp.square(diff_BxQxD), axis=-1))

    return features_and_distances


def _pad_to(array_NxS: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate(
        [array_NxS, np.zeros((size - len(array_NxS), *array_NxS.shape[1:]), array_NxS.dtype)]
    )


def split_images(
    dataset: pipeline.Dataset, split: str, indices: Sequence[int]
) -> tuple[np.ndarray, list[str], list[int]]:
    """Prepared 256-px images, record keys and labels of ``indices`` in ``split``."""
    source = dataset.source(split)
    images, keys, labels = [], [], []
    for i in indices:
        example = records.decode_example(source[int(i)])
        images.append(pipeline.decode_jpeg(example["image"]))
        keys.append(example["key"])
        labels.append(int(example["label"]))
    return np.stack(images), keys, labels


def find_neighbours(
    trained: inference.TrainedModel,
    *,
    query_images: np.ndarray,
    query_names: Sequence[str],
    query_labels: Sequence[int | None],
    k: int = 6,
    gallery_split: str = "train",
    gallery_stride: int = 1,
    batch_size: int = 64,
) -> Neighbours:
    """The ``k`` gallery images nearest to each query in fc7 space (the paper's Fig. 4).

    The gallery (every ``gallery_stride``-th image of ``gallery_split``) is
    streamed through the network in batches; only a running top-k per query is
    kept, so any gallery size fits in memory. Progress is logged.
    """
    fn = make_features_and_distances_fn(trained.model)
    views = np.stack([trained.views(im, ten_crop=False)[0] for im in query_images])
    num_queries = len(views)
    dim = jax.eval_shape(
        lambda p, x: trained.model.apply({"params": p}, x, train=False, with_features=True)[1],
        trained.params,
        jax.ShapeDtypeStruct((1, *views.shape[1:]), jnp.float32),
    ).shape[-1]
    no_queries = np.zeros((num_queries, dim), np.float32)
    query_features = []
    for start in range(0, num_queries, batch_size):
        chunk = views[start : start + batch_size]
        fc7, _ = fn(trained.params, _pad_to(chunk, batch_size), no_queries)
        query_features.append(np.asarray(fc7)[: len(chunk)])
    queries_QxD = np.concatenate(query_features)

    source = trained.dataset.source(gallery_split)
    total = math.ceil(len(source) / gallery_stride)
    ds = grain.MapDataset.source(source)[::gallery_stride]
    ds = ds.map(pipeline.EvalTransform(trained.preprocessing))
    threads = trained.config.data.num_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * batch_size, threads))
    batches = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=False)

    k = min(k, total)
    best_d = np.full((num_queries, k), np.inf, np.float32)
    best_i = np.full((num_queries, k), -1, np.int64)
    seen, start_time, last_log = 0, time.time(), 0.0
    logging.info("Finding neighbours among %d %s images...", total, gallery_split)
    for batch in batches:
        n = len(batch["images"])
        _, d = fn(trained.params, _pad_to(batch["images"], batch_size), queries_QxD)
        d_QxB = np.asarray(d)[:n].T
        idx = (seen + np.arange(n)) * gallery_stride
        cat_d = np.concatenate([best_d, d_QxB], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(idx, (num_queries, n))], axis=1)
        order = np.argsort(cat_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(cat_d, order, axis=1)
        best_i = np.take_along_axis(cat_i, order, axis=1)
        seen += n
        now = time.time()
        if now - last_log > 10 or seen == total:
            rate = seen / max(now - start_time, 1e-9)
            logging.info(
                "gallery %d/%d  %.0f img/s  ETA %.0fs", seen, total, rate, (total - seen) / rate
            )
            last_log = now
    return Neighbours(
        query_names=list(query_names),
        query_labels=list(query_labels),
        query_images=np.asarray(query_images),
        indices=best_i,
        distances=best_d,
        gallery_split=gallery_split,
    )


def _thumbnail(
    image_HxWx3: np.ndarray, size: int, frame: tuple[int, int, int] | None
) -> Image.Image:
    """The central 224 crop (what the network saw), resized to ``size``, optionally framed."""
    h, w = image_HxWx3.shape[:2]
    c = pipeline.CROP_SIZE
    top, left = (h - c) // 2, (w - c) // 2
    thumb = Image.fromarray(image_HxWx3[top : top + c, left : left + c]).resize(
        (size, size), Image.BILINEAR
    )
    if frame is not None:
        width = max(2, size // 32)
        ImageDraw.Draw(thumb).rectangle((0, 0, size - 1, size - 1), outline=frame, width=width)
    return thumb


def neighbours_grid_size(
    num_queries: int, k: int, *, thumb: int, pad: int, gap: int
) -> tuple[int, int]:
    """(width, height) in pixels of ``neighbours_grid``'s image."""
    return pad + (k + 1) * (thumb + pad) + gap, pad + num_queries * (thumb + pad)


def neighbours_grid(
    found: Neighbours, dataset: pipeline.Dataset, *, thumb: int = 96, pad: int = 4, gap: int = 12
) -> np.ndarray:
    """The paper's Fig. 4: one row per query, the query in the first column, then its neighbours.

    Neighbours of the query's class are framed green, others red (queries from
    image files have no class: no frames).
    """
    num_queries, k = found.indices.shape
    width, height = neighbours_grid_size(num_queries, k, thumb=thumb, pad=pad, gap=gap)
    canvas = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    source = dataset.source(found.gallery_split)
    for q in range(num_queries):
        top = pad + q * (thumb + pad)
        label = found.query_labels[q]
        canvas.paste(
            _thumbnail(found.query_images[q], thumb, None if label is None else QUERY_COLOUR),
            (pad, top),
        )
        for j, index in enumerate(found.indices[q]):
            example = records.decode_example(source[int(index)])
            frame = None
            if label is not None:
                frame = SAME_CLASS_COLOUR if example["label"] == label else OTHER_CLASS_COLOUR
            image = pipeline.decode_jpeg(example["image"])
            canvas.paste(
                _thumbnail(image, thumb, frame), (pad + gap + (j + 1) * (thumb + pad), top)
            )
    return np.asarray(canvas)


# ---------------------------------------------------------------------------
# Training curves.


def read_metrics(path: str) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """metrics.jsonl -> {split: {metric: (steps, values)}}, steps ascending.

    A resumed run logs again the steps after its checkpoint; the last
    value written for a step wins, as it belongs to the run that continued.
    """
    rows: dict[str, dict[int, dict[str, float]]] = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logging.warning(
                    "%s:%d is not JSON (a run killed mid-write?): skipped", path, line_number
                )
                continue
            split, step = row.pop("split"), int(row.pop("step"))
            rows.setdefault(split, {})[step] = row
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for split, by_step in rows.items():
        steps = np.array(sorted(by_step))
        names = sorted({name for r in by_step.values() for name in r})
        curves[split] = {}
        for name in names:
            have = [s for s in steps if name in by_step[s]]
            curves[split][name] = (
                np.array(have),
                np.array([by_step[s][name] for s in have], np.float64),
            )
    return curves


CURVES_SIZE = (1100, 420)  # Pixels of the curves PNG.
CURVES_DPI = 100


def learning_rate_drops(
    learning_rate: tuple[np.ndarray, np.ndarray] | None, *, max_drops: int = 10
) -> list[int]:
    """Steps where a step-wise schedule changed the rate by over 1%; none for smooth schedules."""
    if learning_rate is None or len(learning_rate[0]) < 2:
        return []
    steps, values = learning_rate
    changed = np.abs(np.diff(values)) > 0.01 * np.abs(values[:-1])
    drops = steps[1:][changed].tolist()
    return drops if len(drops) <= max_drops else []


def plot_curves(
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: str,
    *,
    steps_per_epoch: float | None = None,
    title: str = "",
) -> str:
    """Loss (left) and top-1/top-5 error in % (right) against epoch (or step), train and val.

    Dotted vertical lines mark learning-rate changes. Uses matplotlib's
    object API (no pyplot state), so it is safe to call from any thread.
    """
    from matplotlib.figure import Figure

    x_label = "epoch" if steps_per_epoch else "step"
    to_x = (lambda s: s / steps_per_epoch) if steps_per_epoch else (lambda s: s)
    fig = Figure(figsize=(CURVES_SIZE[0] / CURVES_DPI, CURVES_SIZE[1] / CURVES_DPI), dpi=CURVES_DPI)
    loss_ax, error_ax = fig.subplots(1, 2)
    styles = {"train": {"alpha": 0.5, "linewidth": 1.0}, "val": {"marker": "o", "markersize": 3}}
    colours = {"loss": "tab:blue", "top1_error": "tab:blue", "top5_error": "tab:orange"}
    for split, metrics in curves.items():
        style = styles.get(split, {})
        if "loss" in metrics:
            steps, values = metrics["loss"]
            loss_ax.plot(to_x(steps), values, label=split, color=colours["loss"], **style)
        for name, dash in (("top1_error", "-"), ("top5_error", "--")):
            if name in metrics:
                steps, values = metrics[name]
                label = f"{split} top-{name[3]}"
                error_ax.plot(
                    to_x(steps), 100 * values, dash, label=label, color=colours[name], **style
                )
    for s in learning_rate_drops(curves.get("train", {}).get("learning_rate")):
        for ax in (loss_ax, error_ax):
            ax.axvline(to_x(s), color="grey", linestyle=":", linewidth=1)
    loss_ax.set(xlabel=x_label, ylabel="cross-entropy loss", title="loss")
    error_ax.set(xlabel=x_label, ylabel="error (%)", title="top-1 / top-5 error", ylim=(0, 100))
    for ax in (loss_ax, error_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=CURVES_DPI)
    return path


def steps_per_epoch(workdir: str, fallback_config=None) -> float | None:
    """Training steps per epoch of the run in ``workdir``, if its config and data can be found."""
    try:
        ckpt = checkpoint.Checkpointer(workdir, read_only=True)
        try:
            config = inference.run_config(ckpt, ckpt.all_steps()[-1], fallback_config)
        finally:
            ckpt.close()
    except Exception as e:  # noqa: BLE001 - the curves are still drawn, against steps.
        if fallback_config is None:
            logging.warning("No config for %s (%s): plotting against steps", workdir, e)
            return None
        config = fallback_config
    metadata = records.read_metadata(config.data.dir)
    if metadata is None:
        logging.warning("No dataset at %s: plotting against steps", config.data.dir)
        return None
    return int(metadata["splits"]["train"]["num_examples"]) // config.batch_size


# ---------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (tools never clash on import)."""
    cli.define_checkpoint_flags()
    flags.DEFINE_integer("batch_size", 32, "neighbours: images per forward pass.")
    flags.DEFINE_string("output", None, "PNG to write; default WORKDIR/figures/<command>.png.")
    flags.DEFINE_integer("columns", 16, "filters: kernels per row (the paper: 16).")
    flags.DEFINE_integer("scale", 4, "filters: screen pixels per kernel weight.")
    flags.DEFINE_integer("num_queries", 5, "neighbours: random query images (the paper: 5).")
    flags.DEFINE_string("query_split", "val", "neighbours: split the queries come from.")
    flags.DEFINE_list("query_indices", None, "neighbours: these query indices instead.")
    flags.DEFINE_string("gallery_split", "train", "neighbours: split searched.")
    flags.DEFINE_integer(
        "gallery_size", 0, "neighbours: search about this many evenly spaced images; 0 = all."
    )
    flags.DEFINE_integer("neighbours", 6, "neighbours: per query (the paper: 6).")
    flags.DEFINE_integer("thumb_size", 96, "neighbours: thumbnail side in pixels.")
    flags.DEFINE_integer("seed", 0, "neighbours: picks the random queries.")


def _load() -> inference.TrainedModel:
    trained = inference.load_trained(
        FLAGS.workdir,
        config=FLAGS.config,
        data_dir=FLAGS.data_dir,
        step=FLAGS.step,
    )
    logging.info("Restored step %d from %s", trained.step, FLAGS.workdir)
    return trained


def run_filters() -> str:
    trained = _load()
    grid = filter_grid(conv1_kernels(trained.params), columns=FLAGS.columns, scale=FLAGS.scale)
    return save_png(grid, _output_path("filters"))


def run_neighbours(image_paths: Sequence[str]) -> str:
    trained = _load()
    if image_paths:
        images, names = [], []
        for path in image_paths:
            try:
                images.append(inference.read_image(path))
                names.append(path)
            except inference.IMAGE_ERRORS as e:
                logging.warning("Skipping query %s: %s", path, e)
        if not images:
            raise errors.UsageError("None of the query images could be read")
        query_images, labels = np.stack(images), [None] * len(images)
    else:
        n = trained.dataset.num_examples(FLAGS.query_split)
        if FLAGS.query_indices:
            indices = [int(i) for i in FLAGS.query_indices]
            bad = [i for i in indices if not 0 <= i < n]
            if bad:
                raise errors.UsageError(
                    f"--query_indices {bad} outside the {n} {FLAGS.query_split} images"
                )
        else:
            rng = np.random.default_rng(FLAGS.seed)
            indices = sorted(rng.choice(n, min(FLAGS.num_queries, n), replace=False).tolist())
        query_images, names, labels = split_images(trained.dataset, FLAGS.query_split, indices)
    gallery_n = trained.dataset.num_examples(FLAGS.gallery_split)
    stride = max(1, gallery_n // FLAGS.gallery_size) if FLAGS.gallery_size > 0 else 1
    found = find_neighbours(
        trained,
        query_images=query_images,
        query_names=names,
        query_labels=labels,
        k=FLAGS.neighbours,
        gallery_split=FLAGS.gallery_split,
        gallery_stride=stride,
        batch_size=FLAGS.batch_size,
    )
    for row in found.to_json(trained.dataset):
        print(row["query"])
        for nb in row["neighbours"]:
            print(f"  {nb['distance']:10.3f}  {nb['class']:<24s} {nb['key']}")
    grid = neighbours_grid(found, trained.dataset, thumb=FLAGS.thumb_size)
    return save_png(grid, _output_path("neighbours"))


def run_curves() -> str:
    workdir = FLAGS.workdir
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise errors.UsageError(
            f"No {path}: train first (python launch.py ... --workdir={workdir})"
        )
    curves = read_metrics(path)
    return plot_curves(
        curves,
        _output_path("curves"),
        steps_per_epoch=steps_per_epoch(workdir, FLAGS.config),
        title=os.path.basename(os.path.abspath(workdir)),
    )


def _output_path(command: str) -> str:
    return FLAGS.output or os.path.join(FLAGS.workdir, "figures", f"{command}.png")


def main(argv: Sequence[str]) -> int:
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    cli.quiet_library_logs()
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Give a command: one of {COMMANDS}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    command, rest = argv[1], list(argv[2:])
    if rest and command != "neighbours":
        raise app.UsageError(f"Unexpected arguments for {command}: {rest}")
    tuning.configure_process()  # Before JAX starts its backends.
    if command == "filters":
        path = run_filters()
    elif command == "neighbours":
        path = run_neighbours(rest)
    else:
        path = run_curves()
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
