r"""Does the input keep up? The training input, worker by worker, against the train step.

    python -m alexnet_jax.benchmarks.input_pipeline       # configs/imagenet.py: batch 128
    python -m alexnet_jax.benchmarks.input_pipeline --config.batch_size=256 \
        --config.data.augment_on=device --config.model.width=0.25

Everything is built as a training run builds it (``feed.train_input``,
``feed.validation_input``), from the config (``--config`` plus
``--config.*`` overrides, as ``launch.py`` takes them): the batch size, the
workers and threads, where the augmentation is finished (``augment_on``:
uint8 crops on GPU/TPU), the batch dtype and the network. Measures, in one run:
  1. the host side of the training input (read, decode, crop, draw, batch) in
     images/s: in-process, then with 1, 2, 4, ... worker processes up to the
     cores this process may use, and as the config sets it (``num_workers``
     -1 = ``tuning.input_workers``); with each count's ratio to one worker;
  2. a torchvision-style per-image loader on the original full-size JPEGs
     (PIL decode, resize, random crop, mirror, mean), ``num_threads`` threads;
  3. the config's jitted train step (``train_step.jax_train_step``) on a batch
     already on the device, and the same step fed by the training input as the
     loop feeds it (batch t+1 is read while the device runs step t), and their
     ratio;
  4. the validation pass (centre crops, ``eval_batch_size``) in images/s.
Host rates are medians of ``--rounds`` rounds of ``--batches_per_round``
batches, each count timed on its own after its workers have started and
filled their buffers (timed in turns, one pipeline's workers would fill
their buffers while another is timed).

Images: ``../shared/imagenet-samples`` (100 real ImageNet JPEGs, class in the
file name) when present, prepared with ``alexnet_jax.data.prepare``;
otherwise synthetic camera-sized JPEGs. The prepared records are repeated
to ``--records`` training and ``--val_records`` validation records: grain's
shuffle costs ~0.35 ms a record on a 100-record set and ~5 us on ImageNet's
1.28M, so a tiny set would time the shuffle, not the input.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from alexnet_jax import config_lib, feed, sharding
from alexnet_jax.benchmarks import command, train_step
from alexnet_jax.data import augment, pipeline, prepare, records, writer

DEFAULT_SAMPLES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "..",
    "shared",
    "imagenet-samples",
)


def samples_as_folder(samples_dir: str, root: str) -> dict[str, str]:
    """Lays ``<wnid>_<name>.JPEG`` files out as ``root/{train,val}/<wnid>/`` (symlinks).

    Also writes ``root/LOC_synset_mapping.txt`` so preparation picks up the
    class names. Returns {wnid: name}.
    """
    names = {}
    for file in sorted(os.listdir(samples_dir)):
        if not file.upper().endswith(".JPEG"):
            continue
        wnid, _, rest = file.partition("_")
        names[wnid] = os.path.splitext(rest)[0].replace("_", " ")
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            os.symlink(
                os.path.abspath(os.path.join(samples_dir, file)),
                os.path.join(root, split, wnid, file),
            )
    with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
        f.writelines(f"{wnid} {name}\n" for wnid, name in names.items())
    return names


def synthetic_folder(root: str, num_images: int, num_classes: int = 10) -> None:
    """Smooth random JPEGs at typical ImageNet sizes (about 500x375, some larger)."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        wnid = f"n{i % num_classes:08d}"
        w, h = (int(v) for v in rng.choice([(500, 375), (375, 500), (640, 480), (1024, 768)]))
        coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 8, (h, w, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        for split in ("train", "val"):
            os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
            image.save(os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG"), quality=90)


class FullSizeLoader:
    """The usual per-image loader: full JPEG decode, resize, crop, flip (threads, like workers)."""

    def __init__(self, files: list[str], mean_image: np.ndarray, num_threads: int, seed: int = 0):
        self.files, self.mean = files, mean_image
        self.pool = ThreadPoolExecutor(num_threads)
        self.seed, self.step = seed, 0

    def load(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        with Image.open(self.files[index % len(self.files)]) as image:
            image = writer.resize_and_center_crop(image.convert("RGB"))
        pixels = np.asarray(image)
        top, left, mirror = augment.random_crop_window(rng, 256, 256)
        patch = np.subtract(
            augment.crop(pixels, top, left, 224),
            augment.crop(self.mean, top, left, 224),
            dtype=np.float32,
        )
        return augment.flip_left_right(patch) if mirror else patch

    def batch(self, batch_size: int) -> np.ndarray:
        indices = range(self.step, self.step + batch_size)
        self.step += batch_size
        return np.stack(list(self.pool.map(self.load, indices)))

    def close(self) -> None:
        self.pool.shutdown()


def _rate(next_batch: Callable[[], object], batch_size: int, num_batches: int) -> float:
    start = time.perf_counter()
    for _ in range(num_batches):
        next_batch()
    return batch_size * num_batches / (time.perf_counter() - start)


WARMUP_STEPS = 3  # The first compiles; the host allocator's pool grows over a few.
WARMUP_BATCHES = 2  # Worker processes start and fill their buffers.


def bare_step_rate(step: train_step.JaxStep, batch_size: int, steps: int) -> float:
    """Images/s of the compiled step on its fixed device batch, median over ``steps``."""
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def fed_step_rate(step: train_step.JaxStep, train_input, batch_size: int, steps: int) -> float:
    """Images/s of the step fed by ``train_input`` (a ``feed.TrainInput``) as the loop feeds it.

    Each step is dispatched without waiting, so reading batch t+1 overlaps step
    t on the device; only the last step's metrics are fetched (the loop fetches
    them at log steps).
    """
    import jax

    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(step.dispatch(next(train_input)))
    start = time.perf_counter()
    for _ in range(steps):
        step_metrics = step.dispatch(next(train_input))
    jax.block_until_ready(step_metrics)
    return batch_size * steps / (time.perf_counter() - start)


def validation_rate(config: ml_collections.ConfigDict, dataset, step: train_step.JaxStep) -> float:
    """Images/s of a validation pass as the loop runs it: the second pass of one input (the
    first compiles and starts the workers, which a run starts once)."""
    import jax

    from alexnet_jax import feed, train

    model = train_step.build_model(config, "auto", step.mesh)
    eval_fn = jax.jit(functools.partial(train.eval_step, model=model))
    params = step.state.params
    validation = feed.validation_input(config, dataset, step.mesh)
    for batch in validation.one_pass():
        jax.block_until_ready(eval_fn(params, batch))
    start, count = time.perf_counter(), 0.0
    for batch in validation.one_pass():
        count += float(eval_fn(params, batch)["count"])
    validation.close()
    return count / (time.perf_counter() - start)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker_counts(cores: int, limit: int = 0) -> list[int]:
    """0 (in-process), then 1, 2, 4, ... and the core count itself (at most ``limit``)."""
    counts, n = [0], 1
    while n < cores:
        counts.append(n)
        n *= 2
    counts.append(cores)
    return [c for c in counts if not limit or c <= limit]


def repeat_records(data_dir: str, split: str, count: int) -> None:
    """Rewrites ``split`` of a prepared dataset as its records repeated to ``count``."""
    metadata = records.read_metadata(data_dir)
    dataset = pipeline.Dataset(data_dir, metadata)
    source = dataset.source(split)
    originals = [records.decode_example(source[i]) for i in range(len(source))]
    for path in records.shard_paths(data_dir, split, metadata):
        os.remove(path)

    def examples():
        for i in range(count):
            example = originals[i % len(originals)]
            yield example["image"], example["label"], f"{example['key']}#{i // len(originals)}"

    writer.write_shard(os.path.join(data_dir, records.shard_filename(split, 0, 1)), examples())
    metadata["splits"][split].update(num_examples=count, num_shards=1)
    metadata.pop("format_version", None)
    records.write_metadata(data_dir, metadata)


def _source_images(tmp: str, samples_dir: str | None, synthetic_images: int) -> tuple[str, str]:
    """Original JPEGs laid out in ``tmp/source``; returns (folder, one-line description)."""
    source = os.path.join(tmp, "source")
    if samples_dir and os.path.isdir(samples_dir):
        samples_as_folder(samples_dir, source)
        count = len(os.listdir(os.path.join(source, "train")))
        return source, f"{count} real JPEGs from {os.path.normpath(samples_dir)}"
    synthetic_folder(source, synthetic_images)
    return source, f"{synthetic_images} synthetic JPEGs (no samples directory)"


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds (user + system) of this process and all its descendants, and of this
    process alone, from Linux's /proc; None elsewhere."""
    if not os.path.isdir("/proc/self/task"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    parents, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # Gone meanwhile.
            continue
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier += children
    return sum(used.get(pid, 0.0) for pid in tree), used.get(os.getpid(), 0.0)


def _costs(next_batch: Callable[[], object], batch_size: int, num_batches: int) -> dict:
    """Images/s, and host CPU microseconds an image (all processes; the main one), of a round."""
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(num_batches):
        next_batch()
    wall, after = time.perf_counter() - start, cpu_seconds()
    images = batch_size * num_batches
    out = {"images_per_sec": images / wall}
    if cpu and after:
        out["cpu_us_per_image"] = (after[0] - cpu[0]) / images * 1e6
        out["main_cpu_us_per_image"] = (after[1] - cpu[1]) / images * 1e6
    return out


def _medians(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def host_input_costs(
    config: ml_collections.ConfigDict,
    dataset: pipeline.Dataset,
    mesh: Any,
    num_workers: int,
    *,
    rounds: int,
    batches_per_round: int,
) -> dict:
    """Medians over rounds of the training input's host batches with ``num_workers``: images/s
    and host CPU an image. Each batch is dropped at once, as the loop drops it."""
    config = config.copy_and_resolve_references()
    config.data.num_workers = num_workers
    train_input = feed.train_input(config, dataset, mesh)
    # Past the start and the batches the workers built ahead, so every round is steady state.
    ahead = num_workers * (pipeline.batches_ahead(train_input.loading, config.batch_size) + 1)
    try:
        for _ in range(WARMUP_BATCHES + ahead):
            next(train_input.iterator)
        next_batch = functools.partial(next, train_input.iterator)
        return _medians(
            [_costs(next_batch, config.batch_size, batches_per_round) for _ in range(rounds)]
        )
    finally:
        train_input.close()


def decode_floor(
    dataset: pipeline.Dataset, prep: pipeline.Preprocessing, seed: int, num_images: int
) -> dict:
    """The least a training image can cost the host: one thread reads its record, decodes it
    and cuts its uint8 patch and draws (into one reused array), nothing else."""
    source = pipeline.shuffled_records(dataset, seed)
    patch = np.empty((prep.crop_size, prep.crop_size, 3), np.uint8)
    pca = {"eigenvalues": prep.eigenvalues, "eigenvectors": prep.eigenvectors}
    start_cpu, start = time.thread_time(), time.perf_counter()
    for position in range(num_images):
        pixels, _ = pipeline.decode_record(source[position])
        rng = pipeline.record_rng(seed, position)
        d = augment.train_draws(rng, *pixels.shape[:2], crop_size=prep.crop_size, **pca)
        patch[...] = augment.crop(pixels, d.top, d.left, prep.crop_size)
    wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    return {"images_per_sec": num_images / wall, "cpu_us_per_image": cpu / num_images * 1e6}


def run(
    config: ml_collections.ConfigDict,
    *,
    samples_dir: str | None,
    synthetic_images: int = 100,
    num_records: int = 10_000,
    num_val_records: int = 2_000,
    rounds: int = 5,
    batches_per_round: int = 4,
    train_steps: int = 3,
    max_workers: int = 0,
) -> dict[str, Any]:
    """Runs the measurements on ``config``'s input and network; prints, returns them."""
    config_lib.validate(config)
    batch_size, data = config.batch_size, config.data
    cores = usable_cores()
    results: dict[str, Any] = {"cores": cores}
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        source, described = _source_images(tmp, samples_dir, synthetic_images)
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(os.path.join(source, "train"))
            for f in names
        )
        prepared = os.path.join(tmp, "prepared")
        start = time.perf_counter()
        prepare.prepare(source, prepared, num_workers=0)
        results["prepare_images_per_sec"] = 2 * len(files) / (time.perf_counter() - start)
        repeat_records(prepared, "train", max(num_records, batch_size))
        repeat_records(prepared, "val", max(num_val_records, config.eval_batch_size))
        dataset = pipeline.open_dataset(prepared, how_to_prepare="-")
        mesh = sharding.make_mesh(config.mesh_shape)
        prep = feed.preprocessing(config, dataset)
        configured = feed.loading(config).num_workers
        what = (
            "uint8 crops + draws (finished on the device)"
            if prep.finish_on_device
            else f"augmented on the host ({data.dtype})"
        )

        floor = decode_floor(dataset, prep, config.seed, 2 * batch_size * batches_per_round)
        per_workers = {}
        for workers in sorted({*worker_counts(cores, max_workers), configured}):
            per_workers[workers] = host_input_costs(
                config, dataset, mesh, workers, rounds=rounds, batches_per_round=batches_per_round
            )
        # Timed alone: a pipeline timed in turns with it would fill its buffers meanwhile.
        loader = FullSizeLoader(files, dataset.mean_image(), data.num_threads)
        loader.batch(batch_size)
        next_loader_batch = functools.partial(loader.batch, batch_size)
        loader_rates = [
            _rate(next_loader_batch, batch_size, batches_per_round) for _ in range(rounds)
        ]
        loader.close()
        loader_rate = statistics.median(loader_rates)

        step = train_step.jax_train_step(config)
        step_rate = bare_step_rate(step, batch_size, train_steps)
        train_input = feed.train_input(config, dataset, step.mesh)
        fed_rate = fed_step_rate(step, train_input, batch_size, train_steps)
        train_input.close()
        val_rate = validation_rate(config, dataset, step)
        del step

    one = per_workers.get(1, {}).get("images_per_sec")
    rows.append(
        (
            "floor: one thread decodes, cuts the uint8 patch + draws",
            floor["images_per_sec"],
            "images/s",
        )
    )
    rows.append(("  host CPU per image", floor["cpu_us_per_image"], "us"))
    for workers in sorted(per_workers):
        label = "in-process" if workers == 0 else f"{workers} worker process" + "es" * (workers > 1)
        if workers == configured:
            label += f" (the config's: data.num_workers = {data.num_workers})"
        costs = per_workers[workers]
        rows.append((f"host input, {label}", costs["images_per_sec"], "images/s"))
        if one and workers > 1:
            rows.append((f"  {workers} workers / 1 worker", costs["images_per_sec"] / one, "x"))
        if "cpu_us_per_image" in costs:
            rows.append(("  host CPU per image, all processes", costs["cpu_us_per_image"], "us"))
            rows.append(
                ("  host CPU per image, main process", costs["main_cpu_us_per_image"], "us")
            )
            ratio = costs["cpu_us_per_image"] / floor["cpu_us_per_image"]
            rows.append(("  host CPU per image / floor", ratio, "x"))
    pipeline_rate = per_workers[configured]["images_per_sec"]
    m = config.model
    network = f"width {m.width:g}, {m.compute_dtype}, batch {batch_size}"
    rows += [
        ("full-size per-image loader (PIL)", loader_rate, "images/s"),
        ("configured input / full-size loader", pipeline_rate / loader_rate, "x"),
        (f"train step, {network}", step_rate, "images/s"),
        ("configured input / train step", pipeline_rate / step_rate, "x"),
        ("train step fed by the training input", fed_rate, "images/s"),
        ("fed / bare train step", fed_rate / step_rate, "x"),
        (f"validation pass, centre crops, batch {config.eval_batch_size}", val_rate, "images/s"),
    ]
    results.update(
        {
            "images_per_sec_by_workers": {w: c["images_per_sec"] for w, c in per_workers.items()},
            "host_costs_by_workers": per_workers,
            "decode_floor": floor,
            "images_per_sec_per_worker": one,
            "configured_workers": configured,
            "pipeline_images_per_sec": pipeline_rate,
            "full_size_loader_images_per_sec": loader_rate,
            "train_step_images_per_sec": step_rate,
            "fed_train_step_images_per_sec": fed_rate,
            "fed_over_train_step": fed_rate / step_rate,
            "validation_images_per_sec": val_rate,
        }
    )
    print(
        f"Input pipeline benchmark: {described}, repeated to {max(num_records, batch_size)} "
        f"training records; batch {batch_size}, {data.num_threads} threads per process, "
        f"{cores} cores usable; {what}"
    )
    for label, value, unit in rows:
        print(f"  {label + ':':62s} {value:10.2f} {unit}")
    keeps_up = "yes" if pipeline_rate >= step_rate else "NO"
    print(f"  input keeps up with the train step: {keeps_up}")
    return results


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (no clashes on import)."""
    config_flags.DEFINE_config_file(
        "config",
        train_step.DEFAULT_CONFIG,
        "Experiment config: batch size, config.data's pipeline, the network.",
        lock_config=True,
    )
    flags.DEFINE_string(
        "samples_dir", DEFAULT_SAMPLES, "Real JPEGs (<wnid>_<name>.JPEG); '' = synthetic."
    )
    flags.DEFINE_integer("synthetic_images", 100, "Synthetic images when there is no samples_dir.")
    flags.DEFINE_integer("records", 10_000, "Training records (the images, repeated).")
    flags.DEFINE_integer("val_records", 2_000, "Validation records (the images, repeated).")
    flags.DEFINE_integer("max_workers", 0, "Time worker counts up to this (0: the cores).")
    flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")
    flags.DEFINE_integer("rounds", 5, "Alternating timing rounds (medians reported).")
    flags.DEFINE_integer("batches_per_round", 4, "Batches timed per round.")
    flags.DEFINE_integer("train_steps", 3, "Timed train steps, bare and fed, after warm-up.")


def main(argv: Sequence[str]) -> int:
    """A bad flag or config value, or a missing path, is one ``error:`` line and exit 2."""

    def measure() -> dict[str, Any]:
        return run(
            FLAGS.config,
            samples_dir=FLAGS.samples_dir or None,
            synthetic_images=FLAGS.synthetic_images,
            num_records=FLAGS.records,
            num_val_records=FLAGS.val_records,
            rounds=FLAGS.rounds,
            batches_per_round=FLAGS.batches_per_round,
            train_steps=FLAGS.train_steps,
            max_workers=FLAGS.max_workers,
        )

    return command.main(argv, FLAGS.config, measure, FLAGS.json)


if __name__ == "__main__":
    command.launch(define_flags, main)
