"""Writing a preparation's shards: each atomically with its report, in worker processes, resumable.

A shard's report (its counts, bad files and statistics file) is written after
the shard itself, so a shard with a report is finished; a re-run of the same
plan (``fingerprint``, recorded in ``_progress/plan.json``) keeps those and
writes the rest, and its output is the same as an uninterrupted run's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from alexnet_jax.data import reading, records, writer
from alexnet_jax.data.listing import SourceListing
from alexnet_jax.data.sources import SourceError, SourceSpec

PROGRESS_DIR = "_progress"


class WorkerError(RuntimeError):
    """A worker process failed on a whole task: a bug or a broken machine, not a bad file."""


@dataclasses.dataclass(frozen=True)
class ShardTask:
    spec: SourceSpec
    split: str
    index: int
    num_shards: int
    refs: list[tuple]
    output_dir: str
    with_statistics: bool


def _shard_path(task: ShardTask) -> str:
    return os.path.join(
        task.output_dir, records.shard_filename(task.split, task.index, task.num_shards)
    )


def _report_path(output_dir: str, split: str, index: int, num_shards: int) -> str:
    name = records.shard_filename(split, index, num_shards)
    return os.path.join(output_dir, PROGRESS_DIR, name + ".json")


def _atomic_write_json(path: str, value: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def prepare_shard(task: ShardTask) -> tuple[str, int, dict[str, Any]]:
    """Writes one shard and, last, its report (counts, bad files, statistics file)."""
    reader = reading.Reader(task.spec, task.split)
    stats = writer.RgbStatistics() if task.with_statistics else None
    counts = collections.Counter()
    bad_files = []

    def examples() -> Iterator[tuple[bytes, int, str]]:
        for ref in task.refs:
            key = reading.ref_key(ref, task.split)
            try:
                data, label, key = reading.read_reference(reader, ref)
                image, conversions = reading.prepare_file(data, key)
            except writer.BadImageError as e:  # One file's fault: listed, never fatal.
                counts[e.kind] += 1
                bad_files.append({"key": key, "kind": e.kind, "reason": e.reason})
                continue
            counts.update(conversions)
            jpeg = writer.encode_jpeg(image)
            if stats is not None:
                # Statistics of the pixels the pipeline will decode, not the pre-JPEG ones.
                with Image.open(io.BytesIO(jpeg)) as stored:
                    stats.add(np.asarray(stored))
            yield jpeg, label, key

    try:
        count = writer.write_shard(_shard_path(task), examples())
    finally:
        reader.close()
    report = {"count": count, "counts": dict(sorted(counts.items())), "bad_files": bad_files}
    report_path = _report_path(task.output_dir, task.split, task.index, task.num_shards)
    if stats is not None:
        stats_file = os.path.basename(report_path)[: -len(".json")] + ".stats.npz"
        tmp = os.path.join(os.path.dirname(report_path), stats_file + ".tmp.npz")
        np.savez_compressed(tmp, **stats.state())
        os.replace(tmp, os.path.join(os.path.dirname(report_path), stats_file))
        report["statistics_file"] = stats_file
    _atomic_write_json(report_path, report)
    return task.split, task.index, report


def _load_report(output_dir: str, split: str, index: int, num_shards: int) -> dict | None:
    """A finished shard's report, or None when the shard must be (re)done."""
    path = _report_path(output_dir, split, index, num_shards)
    shard = os.path.join(output_dir, records.shard_filename(split, index, num_shards))
    if not (os.path.exists(path) and os.path.exists(shard)):
        return None
    with open(path) as f:
        return json.load(f)


def _call_reporting_errors(fn: Callable[[Any], Any], task: Any) -> tuple[bool, Any]:
    """Runs in a worker: (True, fn(task)), or (False, the traceback as text) if it raised.

    Errors come back as plain results, so an exception that does not pickle
    cannot break the pool and the parent always learns what went wrong.
    """
    try:
        return True, fn(task)
    except Exception:
        return False, traceback.format_exc()


def map_unordered(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    num_workers: int,
    describe: Callable[[Any], str] = repr,
) -> Iterator[Any]:
    """Yields fn(task) for every task, as each finishes, from ``num_workers`` spawned processes.

    The first task that fails cancels every task not yet started and raises
    WorkerError naming it, once the running ones return (each is one shard,
    kept for a resume). A ProcessPoolExecutor, not multiprocessing.Pool:
    Pool.terminate() can deadlock against the pool's task-feeder thread.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as executor:
        try:
            futures = {executor.submit(_call_reporting_errors, fn, t): t for t in tasks}
            for future in concurrent.futures.as_completed(futures):
                task = futures[future]
                try:
                    ok, value = future.result()
                except concurrent.futures.BrokenExecutor as e:  # A worker process died.
                    raise WorkerError(
                        f"a worker process died while preparing {describe(task)} "
                        f"(killed, out of memory, or crashed): {e}"
                    ) from None
                if not ok:
                    raise WorkerError(f"preparing {describe(task)} failed:\n{value}")
                yield value
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def _describe_task(task: ShardTask) -> str:
    return f"{task.split} shard {task.index + 1} of {task.num_shards} ({_shard_path(task)})"


def fingerprint(listing: SourceListing, examples_per_shard: int) -> str:
    """Identifies the plan (inputs, order, sharding), so a resume never mixes two plans."""
    h = hashlib.sha256()
    h.update(json.dumps([listing.spec.kind, examples_per_shard, listing.classes]).encode())
    if listing.val_split is not None:  # Only then: older fingerprints stay valid.
        h.update(json.dumps(listing.val_split, sort_keys=True).encode())
    for split in sorted(listing.items):
        h.update(split.encode())
        for ref in listing.items[split]:
            h.update(repr(ref[-1] if ref[0] != "tfds" else ref[1]).encode())
    return h.hexdigest()[:16]


def record_plan(
    output_dir: str,
    *,
    fingerprint: str,
    source: str,
    examples_per_shard: int,
    existing: dict[str, Any] | None,
) -> None:
    """Writes ``_progress/plan.json``; fails if ``output_dir`` holds another plan's work.

    ``existing`` is the metadata of a dataset already finished there, if any.
    """
    os.makedirs(os.path.join(output_dir, PROGRESS_DIR), exist_ok=True)
    plan_path = os.path.join(output_dir, PROGRESS_DIR, "plan.json")
    plan = {"fingerprint": fingerprint, "source": source, "examples_per_shard": examples_per_shard}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f)
        if previous["fingerprint"] != fingerprint:
            raise SourceError(
                f"{output_dir} holds a partial preparation of another source or shard size "
                f"({previous}); use another --output_dir or delete this one"
            )
    elif existing is not None:
        raise SourceError(f"{output_dir} already holds a different prepared dataset")
    _atomic_write_json(plan_path, plan)


def plan_tasks(
    spec: SourceSpec,
    items: dict[str, list[tuple]],
    splits: Sequence[str],
    output_dir: str,
    examples_per_shard: int,
) -> tuple[list[ShardTask], dict[tuple[str, int], dict]]:
    """(the shards still to write, the reports of those an earlier run of the plan finished)."""
    tasks, reports = [], {}
    for split in splits:
        refs = items[split]
        num_shards = max(1, -(-len(refs) // examples_per_shard))
        for index in range(num_shards):
            report = _load_report(output_dir, split, index, num_shards)
            if report is not None:
                reports[(split, index)] = report
                continue
            chunk = refs[index * examples_per_shard : (index + 1) * examples_per_shard]
            tasks.append(
                ShardTask(spec, split, index, num_shards, chunk, output_dir, split == "train")
            )
    return tasks, reports


def write_shards(tasks: Sequence[ShardTask], num_workers: int | None) -> Iterator[Any]:
    """Each task's (split, index, report) as it finishes, from ``num_workers`` processes.

    None: one per core; 0: in this process. Close the iterator to stop the workers.
    """
    if num_workers == 0:
        return (prepare_shard(task) for task in tasks)
    workers = num_workers or os.cpu_count() or 1
    return map_unordered(prepare_shard, tasks, workers, _describe_task)
