"""Input worker processes (alexnet_jax/data/workers.py): slots reused, never under a reader.

Every batch from a pool is compared on receipt with the in-process batch of the
same index, over three times as many batches as the pool has slots, so slots
are reused many times over.
"""

import gc
import glob
import multiprocessing
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from alexnet_jax import errors
from alexnet_jax.data import pipeline, workers
from tests.conftest import ROOT, tiny_launch_flags

BATCH = 16
SLOTS = 3  # Per worker: the two batches ahead and the one the consumer holds (pipeline._read).


@pytest.fixture(scope="module")
def dataset(tiny_demo_dir):
    return pipeline.open_dataset(tiny_demo_dir, how_to_prepare="(test data)")


def _prep(dataset):
    """The paper's preprocessing, shipped as uint8 patches and draws (as to an accelerator)."""
    eigenvalues, eigenvectors = dataset.rgb_eigen()
    return pipeline.Preprocessing(
        dataset.mean_image(), eigenvalues, eigenvectors, finish_on_device=True
    )


def _train(dataset, num_workers):
    return pipeline.train_iterator(
        dataset,
        batch_size=BATCH,
        seed=0,
        preprocessing=_prep(dataset),
        loading=pipeline.Loading(num_workers=num_workers, num_threads=1),
    )


@pytest.fixture(scope="module")
def reference(dataset):
    """The first 3 * 3 workers * SLOTS batches, built in this process."""
    it = _train(dataset, 0)
    batches = [next(it) for _ in range(3 * 3 * SLOTS)]
    it.close()
    return batches


def _assert_equal(batch, expected):
    assert batch.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(batch[name], expected[name], err_msg=name)


def _our_segments():
    return glob.glob(os.path.join(workers.SHM_DIR, f"alexnet_jax_{os.getpid()}_*"))


@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_batches_equal_the_in_process_ones_over_three_times_the_slots(
    dataset, reference, num_workers
):
    it = _train(dataset, num_workers)
    for expected in reference[: 3 * num_workers * SLOTS]:
        _assert_equal(next(it), expected)  # Compared on receipt, then dropped.
    assert it.slot_owners() == [
        {s: "worker" for s in range(w * SLOTS, (w + 1) * SLOTS)} for w in range(num_workers)
    ]
    # Every worker has mapped the slots' file, so its name is gone already, mid-run.
    assert not _our_segments()
    it.close()


def test_kept_batches_never_change_and_the_pool_copies_rather_than_waits(dataset, reference):
    it = _train(dataset, 1)
    kept = [next(it) for _ in range(3 * SLOTS)]  # The contract: a batch is the caller's.
    # The worker keeps one slot to build into; the rest of the batches came as copies.
    assert it.slot_owners() == [{0: "caller", 1: "caller", 2: "worker"}]
    for _ in range(3 * SLOTS):
        next(it)
    for batch, expected in zip(kept, reference, strict=False):
        _assert_equal(batch, expected)
    del kept, batch
    gc.collect()
    assert it.slot_owners() == [{0: "worker", 1: "worker", 2: "worker"}]
    it.close()


def test_a_jax_array_over_a_batch_keeps_its_slot_from_reuse(dataset, reference):
    it = _train(dataset, 1)
    batch = next(it)
    images = jax.device_put(batch["images"])  # On the CPU backend this may alias the slot.
    aliased = images.unsafe_buffer_pointer() == batch["images"].ctypes.data
    del batch
    gc.collect()
    assert it.slot_owners()[0][0] == "caller"  # Held by the JAX array alone.
    for expected in reference[1 : 3 * SLOTS]:
        _assert_equal(next(it), expected)
    np.testing.assert_array_equal(np.asarray(images), reference[0]["images"])
    del images
    gc.collect()
    assert it.slot_owners() == [{0: "worker", 1: "worker", 2: "worker"}]
    it.close()
    if jax.default_backend() == "cpu":
        assert aliased, "expected XLA:CPU to alias an aligned host array (no copy)"


def test_a_killed_worker_is_one_error_naming_it_and_no_memory_is_left(dataset, reference):
    it = _train(dataset, 2)
    _assert_equal(next(it), reference[0])
    (victim,) = [p for p in multiprocessing.active_children() if p.name.endswith("worker 1")]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    with pytest.raises(errors.InputWorkerError) as raised:
        for _ in range(SLOTS + 1):  # Worker 1's batches built before its death come first.
            next(it)
    assert raised.value.worker == 1 and raised.value.exitcode == -signal.SIGKILL
    assert "Input worker process 1 died (signal SIGKILL" in str(raised.value)
    assert errors.InputWorkerError.exit_code == errors.EXIT_RELAUNCH
    assert not _our_segments()
    # The position is the batch that never came: a restart continues exactly there.
    state = it.get_state()
    it.close()
    again = _train(dataset, 2)
    again.set_state(state)
    k = int(state.decode().split(":")[1].strip(" }"))
    _assert_equal(next(again), reference[k])
    again.close()


class _FailsAtBatch:
    """A batch writer whose batch ``k`` raises (what a bug in a transform looks like)."""

    def __init__(self, k):
        self.k = k

    def layout(self):
        return {"x": ((2,), np.dtype(np.int64))}

    def write(self, k, out):
        if k == self.k:
            raise ZeroDivisionError(f"batch {k}")
        out["x"][:] = k
        return 2


def test_an_exception_in_a_worker_is_raised_with_its_traceback():
    pool = workers.WorkerPool(_FailsAtBatch(2), 0, None, num_workers=2, slots_per_worker=2)
    assert [int(next(pool)["x"][0]) for _ in range(2)] == [0, 1]
    with pytest.raises(ZeroDivisionError, match="batch 2") as raised:
        next(pool)
    assert "in input worker 0 (batch 2)" in str(raised.value.__cause__)
    assert "_FailsAtBatch" not in str(raised.value) and "line" in str(raised.value.__cause__)
    assert not _our_segments()


def test_too_little_shared_memory_is_one_error_before_the_first_batch():
    with pytest.raises(workers.SharedMemoryTooSmallError) as raised:
        workers.WorkerPool(
            _FailsAtBatch(-1), 0, 10, num_workers=3, slots_per_worker=2, free_bytes=lambda _: 300
        )
    message = str(raised.value)
    for part in [
        "need 384 B",
        "(128 B each",
        "/dev/shm has 300 B free",
        "--shm-size",
        "--ipc=host",
    ]:
        assert part in message, message
    assert "data.num_workers=2 (fits)" in message and "data.num_workers=0" in message
    assert not _our_segments() and not multiprocessing.active_children()


def _can_mount_a_small_dev_shm():
    if os.geteuid() != 0:
        return False
    probe = "mount -t tmpfs -o size=1m tmpfs /dev/shm"
    return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_dev_shm(), reason="needs root and unshare -m")
def test_a_container_sized_dev_shm_stops_launch_before_the_first_step(tiny_demo_dir, tmp_path):
    """As Docker's 64 MB /dev/shm for a batch of 512, scaled down to a batch of 16 and 8 MB."""
    flags = tiny_launch_flags(tiny_demo_dir, tmp_path / "run", **{"data.num_workers": 2})
    launch = " ".join([sys.executable, os.path.join(ROOT, "launch.py"), *flags])
    script = f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {launch}"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == errors.EXIT_USAGE, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # The validation input starts first; on CPU its batches of 20 are float32.
    assert lines[0].startswith("error: The validation input's 2 worker processes need 69 MB")
    assert "/dev/shm has 8 MB free" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
