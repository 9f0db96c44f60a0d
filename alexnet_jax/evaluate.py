"""Top-1 and top-5 error on the validation split, laid out like the paper's Tables 1 and 2.

    python -m alexnet_jax.evaluate --workdir=/tmp/alexnet_demo
    python -m alexnet_jax.evaluate --workdir=/tmp/alexnet_demo --ten_crop
    python -m alexnet_jax.evaluate --workdir=RUN1 --ten_crop RUN2 RUN3 RUN4 RUN5  # 5 CNNs

Each workdir's checkpoint (``--checkpoint=latest``, ``best`` by validation
error, or a step number) is restored with the config saved in it. Every
model sees the same images: the centre 224x224 patch, and with
``--ten_crop`` also the paper's ten patches (four corners, centre, and their
mirror images) whose softmax outputs are averaged (Sec. 4.1). With several
workdirs the models' softmax outputs are averaged as well, as the paper's
ensembles do (Table 2), and each model is also reported alone.

Images are decoded once for all models; each model then subtracts its own
mean image and applies its own input scale on the device. Progress and an
ETA go to the log; the table goes to stdout and everything to a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from alexnet_jax import checkpoint, cli, errors, inference, metrics, progress, sharding, tuning
from alexnet_jax.data import augment, device_augment, pipeline, writer

CENTRE_VIEW = augment.TEN_CROP_POSITIONS.index("centre")  # The centre patch among the ten.
# The paper's Table 2 (ILSVRC-2012 validation set): shown beside 1000-class results.
PAPER_ROWS = (
    ("Paper (Table 2): 1 CNN", 0.407, 0.182),
    ("Paper (Table 2): 5 CNNs averaged", 0.381, 0.164),
)


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of the evaluation: its trained weights and how its inputs are prepared."""

    workdir: str
    trained: inference.TrainedModel

    @property
    def name(self) -> str:
        return f"{os.path.basename(self.workdir.rstrip('/'))}@{self.trained.step}"


def resolve_step(workdir: str, which: str) -> int | None:
    """ "latest" -> None (load_trained's default), "best" -> the lowest-val-error step, "N" -> N."""
    if which == "latest":
        return None
    if which.isdigit():
        return int(which)
    if which != "best":
        raise errors.UsageError(
            f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}"
        )
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        best = ckpt.best_step()
    finally:
        ckpt.close()
    if best is None:
        raise ValueError(
            f"No checkpoint in {workdir} was saved with a validation error, so none is 'best'; "
            "use --checkpoint=latest"
        )
    return best


def load_members(
    workdirs: Sequence[str], *, which: str = "latest", data_dir: str | None = None
) -> list[Member]:
    """Restores each workdir's params; all must predict the same classes."""
    members = []
    for workdir in workdirs:
        workdir = os.path.abspath(os.path.expanduser(workdir))
        trained = inference.load_trained(
            workdir, step=resolve_step(workdir, which), data_dir=data_dir
        )
        members.append(Member(workdir, trained))
    first = members[0].trained
    for m in members[1:]:
        if m.trained.classes != first.classes:
            raise ValueError(
                f"{m.workdir} predicts different classes from {members[0].workdir}: "
                "an ensemble needs models trained on the same class list"
            )
    return members


def _mean_views(member: Member, *, ten_crop: bool) -> np.ndarray:
    """The member's mean image cut into the same views as the images (V x crop x crop x 3).

    Cropping commutes with subtracting, so (views - mean views) * scale equals
    the pipeline's crops of (image - mean) * scale, bit for bit.
    """
    p = member.trained.preprocessing
    if ten_crop:
        return augment.ten_crops(p.mean, p.crop_size)
    top, left = augment.center_crop_window(*p.mean.shape[:2], p.crop_size)
    return augment.crop(p.mean, top, left, p.crop_size)[None]


def make_batch_fn(members: Sequence[Member], *, ten_crop: bool):
    """Jitted (params, mean views, batch) -> summed top-1/top-5 errors of every row of the table.

    ``batch["images"]`` is uint8: B x 1 x crop x crop x 3 centre patches, or with
    ``ten_crop`` the whole B x H x W x 3 images, cut into the ten views here.
    Result keys: "<member index>/<crops>/<k>" and "ensemble/<crops>/<k>",
    with crops "centre" or "ten", plus "count".
    """
    models = [m.trained.model for m in members]
    scales = [np.asarray(m.trained.preprocessing.scale, np.float32) for m in members]

    # One program for all members: the first member's config picks the XLA options.
    @jax.jit
    def batch_errors(params_list, means_list, batch):
        views = batch["images"]
        if ten_crop:
            views = device_augment.ten_views(views, means_list[0].shape[-2])
        views = views.astype(jnp.float32)
        b, v = views.shape[:2]
        labels, mask = batch["labels"], batch["mask"]
        probabilities: dict[str, list[jax.Array]] = {"centre": [], "ten": []}
        for model, scale, params, means in zip(
            models, scales, params_list, means_list, strict=True
        ):
            x = (views - means[None]) * scale
            logits = model.apply({"params": params}, x.reshape(b * v, *x.shape[2:]), train=False)
            logits = logits.reshape(b, v, -1)
            centre = logits[:, CENTRE_VIEW] if ten_crop else logits[:, 0]
            probabilities["centre"].append(jax.nn.softmax(centre.astype(jnp.float32), axis=-1))
            if ten_crop:
                probabilities["ten"].append(
                    augment.average_crop_softmax(logits.astype(jnp.float32))
                )
        sums = {"count": jnp.sum(mask)}
        for crops, per_model in probabilities.items():
            if not per_model:
                continue
            rows = {str(i): p for i, p in enumerate(per_model)}
            if len(per_model) > 1:
                rows["ensemble"] = jnp.mean(jnp.stack(per_model), axis=0)
            for row, p in rows.items():
                for k in (1, 5):
                    errors = metrics.topk_errors(p, labels, k)
                    sums[f"{row}/{crops}/{k}"] = jnp.sum(errors * mask)
        return sums

    return batch_errors


def evaluate_members(
    members: Sequence[Member],
    *,
    ten_crop: bool = False,
    split: str = "val",
    batch_size: int = 64,
    max_examples: int = 0,
    num_threads: int = 2,
    num_workers: int = -1,
    progress_every_s: float = 10.0,
) -> dict[str, Any]:
    """One pass over ``split``; returns the report (see ``format_table`` and the JSON file)."""
    dataset = members[0].trained.dataset
    mesh = sharding.make_mesh((-1, 1))
    data_size = mesh.shape[sharding.DATA_AXIS]
    batch_size = -(-batch_size // data_size) * data_size  # A multiple of the devices.
    replicated = sharding.replicated(mesh)
    params_list = [jax.device_put(m.trained.params, replicated) for m in members]
    means_list = [jax.device_put(_mean_views(m, ten_crop=ten_crop), replicated) for m in members]
    batch_fn = make_batch_fn(members, ten_crop=ten_crop)

    crop_sizes = {m.trained.preprocessing.crop_size for m in members}
    if len(crop_sizes) > 1:
        raise ValueError(
            f"the models see crops of different sizes ({sorted(crop_sizes)}, "
            "config.data.crop_size): evaluate them one at a time"
        )
    raw_pixels = pipeline.Preprocessing(  # uint8 pixels; each model subtracts its own mean.
        mean=np.zeros((writer.PREPARED_SIZE, writer.PREPARED_SIZE, 3), np.float32),
        eigenvalues=None,
        eigenvectors=None,
        crop_size=crop_sizes.pop(),
        finish_on_device=True,
    )
    splits = sorted(dataset.metadata["splits"])
    if split not in splits:
        raise pipeline.DatasetMissingError(
            f"{dataset.data_dir} has no {split!r} split (it has {splits}): pass "
            "--data_dir=a prepared dataset that has one"
        )
    total = dataset.num_examples(split)
    if max_examples > 0:
        total = min(total, max_examples)
    if total < jax.process_count():
        raise errors.UsageError(
            f"{total} {split} images for {jax.process_count()} processes: every process needs "
            "one (a larger --max_examples, or fewer processes)"
        )
    local_batch = batch_size // jax.process_count()
    iterator = pipeline.eval_iterator(
        dataset,
        batch_size=batch_size,
        preprocessing=raw_pixels,
        ten_crop=ten_crop,
        loading=pipeline.Loading(
            num_workers=tuning.input_workers(num_workers), num_threads=num_threads
        ),
        split=split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    logging.info(
        "Evaluating %d model(s) on %d %s images (%s) in batches of %d",
        len(members),
        total,
        split,
        "centre crop and 10 crops" if ten_crop else "centre crop",
        batch_size,
    )
    totals: dict[str, float] = {}
    start = time.time()
    shown = progress.Progress(total, unit="images", every_seconds=progress_every_s)
    views = (  # B x 1 x H x W x C for the centre crop alone.
        local if ten_crop else {**local, "images": local["images"][:, None]} for local in iterator
    )
    # Every process runs the same number of batches (a short shard pads with masked ones).
    process, processes = jax.process_index(), jax.process_count()
    for local in inference.padded_pass(
        views,
        images=inference.shard_images(total, process, processes),
        local_batch=local_batch,
        num_batches=inference.batches_per_pass(total, local_batch, processes),
    ):
        sums = batch_fn(params_list, means_list, sharding.global_batch(mesh, local))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(np.asarray(value.addressable_data(0)))
        shown.update(int(totals["count"] - shown.done))
    iterator.close()
    count = max(totals.pop("count", 0.0), 1.0)

    rows = []
    crops_list = ["centre", "ten"] if ten_crop else ["centre"]
    crops_name = {"centre": "centre crop", "ten": "10 crops"}
    for crops in crops_list:
        for i, m in enumerate(members):
            rows.append(
                {
                    "name": f"1 CNN ({m.name}), {crops_name[crops]}",
                    "workdirs": [m.workdir],
                    "crops": crops,
                    "top1_error": totals[f"{i}/{crops}/1"] / count,
                    "top5_error": totals[f"{i}/{crops}/5"] / count,
                }
            )
        if len(members) > 1:
            rows.append(
                {
                    "name": f"{len(members)} CNNs averaged, {crops_name[crops]}",
                    "workdirs": [m.workdir for m in members],
                    "crops": crops,
                    "top1_error": totals[f"ensemble/{crops}/1"] / count,
                    "top5_error": totals[f"ensemble/{crops}/5"] / count,
                }
            )
    return {
        "split": split,
        "num_examples": int(count),
        "data_dir": dataset.data_dir,
        "num_classes": dataset.num_classes,
        "models": [{"workdir": m.workdir, "step": m.trained.step} for m in members],
        "results": rows,
        "seconds": time.time() - start,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as the paper's tables lay it out: one row per model, error in percent."""
    lines = [
        f"{report['split']} split of {report['data_dir']}: {report['num_examples']} images, "
        f"{report['num_classes']} classes",
        "",
    ]
    rows = [(r["name"], r["top1_error"], r["top5_error"]) for r in report["results"]]
    if report["num_classes"] == 1000:
        rows += list(PAPER_ROWS)
    width = max(len("Model"), *(len(name) for name, _, _ in rows))
    header = f"{'Model':<{width}}  {'Top-1 error':>11}  {'Top-5 error':>11}"
    lines += [header, "-" * len(header)]
    for name, top1, top5 in rows:
        lines.append(f"{name:<{width}}  {100 * top1:>10.1f}%  {100 * top5:>10.1f}%")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (tools never clash on import)."""
    # evaluate's own flag set: predict (imported for its model loader) defines flags of the
    # same names in absl's global set, which stay unparsed at their defaults.
    flags.DEFINE_multi_string(
        "workdir",
        None,
        "Training workdir(s); more may follow the flags as arguments (an ensemble).",
    )
    flags.DEFINE_bool("ten_crop", False, "Also report the paper's 10-patch softmax average.")
    flags.DEFINE_string(
        "checkpoint",
        "latest",
        "Which checkpoint: 'latest', 'best' (lowest val error) or a step.",
    )
    flags.DEFINE_string(
        "data_dir",
        None,
        "Prepared dataset to evaluate on (default: the one the runs trained on).",
    )
    flags.DEFINE_string("split", "val", "Split of the prepared dataset.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass (all devices).")
    flags.DEFINE_integer("max_examples", 0, "Evaluate only this many images (0: all).")
    flags.DEFINE_integer("num_threads", 2, "Decoding threads per process.")
    flags.DEFINE_integer(
        "num_workers", -1, "Decoding worker processes (-1: auto, none on CPU; 0: in-process)."
    )
    flags.DEFINE_string(
        "output",
        None,
        "JSON report path (default: <first workdir>/evaluation_<what was evaluated>.json, see "
        "report_filename; an existing file is never replaced).",
    )


def report_filename(
    members: Sequence[Member], *, ten_crop: bool, split: str, max_examples: int
) -> str:
    """A name saying what was evaluated: ``evaluation_step690_val_10crop_ensemble3.json``."""
    parts = [f"step{members[0].trained.step}", split, "10crop" if ten_crop else "centre"]
    if max_examples:
        parts.append(f"first{max_examples}")
    if len(members) > 1:
        parts.append(f"ensemble{len(members)}")
    return "evaluation_" + "_".join(parts) + ".json"


def unused_path(path: str) -> str:
    """``path``, or ``stem.2.json``, ``stem.3.json``, ...: the first that does not exist yet."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{stem}.{n}{ext}"
    return candidate


def main(argv: Sequence[str]) -> int:
    return cli.run_reporting_errors(lambda: _run(argv))


def _run(argv: Sequence[str]) -> int:
    cli.quiet_library_logs()
    workdirs = list(FLAGS.workdir or []) + list(argv[1:])
    if not workdirs:
        raise app.UsageError("Give --workdir=DIR (and optionally more workdirs as arguments)")
    if FLAGS.batch_size < 1:
        raise app.UsageError("--batch_size must be >= 1")
    if FLAGS.num_workers < -1:
        raise app.UsageError("--num_workers must be -1 (auto), 0 (in-process) or more")
    tuning.configure_process()  # Before JAX starts its backends.
    members = load_members(workdirs, which=FLAGS.checkpoint, data_dir=FLAGS.data_dir)
    report = evaluate_members(
        members,
        ten_crop=FLAGS.ten_crop,
        split=FLAGS.split,
        batch_size=FLAGS.batch_size,
        max_examples=FLAGS.max_examples,
        num_threads=FLAGS.num_threads,
        num_workers=FLAGS.num_workers,
    )
    output = FLAGS.output or os.path.join(
        members[0].workdir,
        report_filename(
            members, ten_crop=FLAGS.ten_crop, split=FLAGS.split, max_examples=FLAGS.max_examples
        ),
    )
    output = unused_path(output)
    with open(output, "x") as f:
        json.dump(report, f, indent=1)
    print(format_table(report))
    print(f"\nWritten to {output}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
