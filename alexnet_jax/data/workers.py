"""Worker processes that build whole batches into shared-memory slots mapped once and reused.

One shared-memory file holds ``slots_per_worker`` batch slots for each worker.
It is reserved in full when the pool starts (a /dev/shm too small for it is one
clear error before the first batch, not a SIGBUS mid-run) and each process
maps it once, so no batch pays for fresh pages or for freeing them. Once every
worker has mapped it, its name is removed: however the run ends, nothing is
left in /dev/shm.

Who owns a slot is explicit: a worker fills only slots it was sent through
its ``free`` pipe, and the main process sends a slot back only when nothing
reads it any more. A batch handed out is a set of NumPy views of its slot;
when the last of them is garbage (the caller dropped the batch, and JAX let go
of it: on the CPU backend a device array may alias the views, elsewhere JAX
holds them until the host-to-device copy is done), the slot goes back to its
worker. So a batch is the caller's to keep for as long as it likes. Should a
caller keep so many that a worker would be left without a slot, the next
batches from that worker are handed out as copies instead, so the pool never
waits on its consumer.

Worker w builds batches ``start + w``, ``start + w + num_workers``, ... with its
``writer`` (``layout()``: a full batch's fields; ``write(k, out)``: batch ``k``
into ``out``'s arrays, returning its rows), so the batches and their order do
not depend on the number of workers.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import mmap
import multiprocessing
import os
import pickle
import secrets
import signal
import traceback
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from alexnet_jax import errors

SHM_DIR = "/dev/shm"
ALIGNMENT = 64  # Bytes: each field of a slot starts on a cache line.
JOIN_SECONDS = 5.0  # What a worker gets to finish its batch at close before it is killed.

Layout = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # field -> (full-batch shape, dtype)


class SharedMemoryTooSmallError(errors.UsageError, OSError):
    """The shared-memory filesystem cannot hold the pool's slots."""


def slot_nbytes(layout: Layout) -> int:
    return sum(
        _aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize) for shape, dtype in layout.values()
    )


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _slot_views(slot: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """The fields of a slot (its bytes as a uint8 array), as arrays over it.

    Every view's ``base`` is ``slot`` itself (NumPy collapses a chain of views
    down to the first array over a non-array buffer), so ``slot`` lives as long
    as any view of it does.
    """
    views, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        views[name] = slot[offset : offset + nbytes].view(dtype).reshape(shape)
        offset += _aligned(nbytes)
    return views


def _map(path: str, nbytes: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n:,} B"


def _fixes(fewer: str = "") -> str:
    return (
        "Give the container more (docker run --shm-size=<size>, or --ipc=host; Kubernetes: an "
        f"emptyDir of medium Memory on /dev/shm), or set {fewer}data.prefetch=1 (one batch "
        "ahead), a smaller batch_size, or data.num_workers=0 (in-process)"
    )


def check_room(
    need: int, per_worker: int, workers: int, free: int, directory: str, what: str = "input"
) -> None:
    """Fails with the fixes when ``need`` bytes of slots exceed ``free`` bytes of ``directory``."""
    if need <= free:
        return
    fits = free // per_worker
    fewer = f"data.num_workers={fits} (fits), " if 0 < fits < workers else ""
    raise SharedMemoryTooSmallError(
        f"The {what}'s {workers} worker processes need {_megabytes(need)} of shared memory "
        f"({_megabytes(per_worker)} each: their batch slots) but {directory} has "
        f"{_megabytes(free)} free. " + _fixes(fewer)
    )


def free_bytes(directory: str) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


class _Segment:
    """A file in the shared-memory filesystem, reserved in full; unlinked once every worker has
    mapped it (or at close)."""

    def __init__(self, nbytes: int, directory: str):
        if not os.path.isdir(directory):
            raise SharedMemoryTooSmallError(
                f"Input worker processes need a shared-memory filesystem at {directory}, which "
                "this host lacks: set data.num_workers=0 (in-process)"
            )
        self.path = os.path.join(directory, f"alexnet_jax_{os.getpid()}_{secrets.token_hex(4)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _register_for_crash_cleanup(self.path)
            try:  # Reserves every page now, so no write can fail later for want of room.
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                self.unlink()
                raise SharedMemoryTooSmallError(
                    f"Reserving {_megabytes(nbytes)} for the input's batch slots in {directory} "
                    f"failed ({e.strerror}). " + _fixes()
                ) from None
        finally:
            os.close(fd)
        # Never closed explicitly: a batch a caller keeps holds the mapping until it is dropped.
        self.mapping = _map(self.path, nbytes)

    def unlink(self) -> None:
        """Removes the name; the memory goes once the last mapping (a kept batch's) is gone."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        _register_for_crash_cleanup(self.path, unregister=True)


def _register_for_crash_cleanup(path: str, unregister: bool = False) -> None:
    """multiprocessing's resource tracker unlinks the file if this process is killed."""
    from multiprocessing import resource_tracker

    name = "/" + os.path.basename(path)  # shm_unlink's name for a file of /dev/shm.
    (resource_tracker.unregister if unregister else resource_tracker.register)(
        name, "shared_memory"
    )


def _work(writer: Any, batches: range, path: str, slots: range, size: int, free, ready):
    """A worker: for each of its batches, take a free slot, fill it, say which."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The main process decides when workers stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mapping = _map(path, slots.stop * size)
    layout = writer.layout()
    views = {
        s: _slot_views(np.frombuffer(mapping, np.uint8, size, s * size), layout) for s in slots
    }
    k = batches.start
    try:
        ready.send(("mapped",))  # Once every worker has mapped the file, its name can go.
        for k in batches:
            slot = free.recv()
            ready.send((k, slot, writer.write(k, views[slot])))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # The pool closed (or the main process died).
    except Exception as e:  # noqa: BLE001 - sent on, raised in the main process.
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling.
            e = RuntimeError(repr(e))
        ready.send(("error", k, e, traceback.format_exc()))


class _WorkerTracebackError(Exception):
    """Shown as the cause of an exception raised in a worker: its traceback there."""


class WorkerPool:
    """Batches ``start, start + 1, ...`` (before ``stop``, or without end) from worker processes.

    ``next()`` raises ``errors.InputWorkerError`` for a worker that died (the
    batch it owed was never handed out, so the position is still that batch),
    the worker's own exception for one that failed, and StopIteration after
    ``stop``. ``what`` names the input in messages ("training input"); ``free_bytes``
    reads a directory's free space (tests stand in).
    """

    def __init__(
        self,
        writer: Any,
        start: int,
        stop: int | None,
        *,
        num_workers: int,
        slots_per_worker: int,
        what: str = "input",
        shm_dir: str = SHM_DIR,
        free_bytes: Any = free_bytes,
    ):
        self._layout = writer.layout()
        self._size, self._slots = slot_nbytes(self._layout), slots_per_worker
        per_worker = self._size * slots_per_worker
        if os.path.isdir(shm_dir):
            free = free_bytes(shm_dir)
            check_room(per_worker * num_workers, per_worker, num_workers, free, shm_dir, what)
        self._segment = _Segment(per_worker * num_workers, shm_dir)
        self._start, self._stop, self._next, self._mapped = start, stop, start, 0
        self._leased: list[set[int]] = [set() for _ in range(num_workers)]
        self._returned: collections.deque[tuple[int, int]] = collections.deque()
        self._workers: list[Any] = []
        self._free: list[Any] = []
        self._ready: list[Any] = []
        atexit.register(self.close)  # Runs before multiprocessing's exit handler joins them.
        context = multiprocessing.get_context("spawn")
        end = stop if stop is not None else 2**62
        for w in range(num_workers):
            free_out, free_in = context.Pipe(duplex=False)
            ready_out, ready_in = context.Pipe(duplex=False)
            slots = range(w * slots_per_worker, (w + 1) * slots_per_worker)
            args = (writer, range(start + w, end, num_workers), self._segment.path, slots)
            process = context.Process(
                target=_work,
                args=(*args, self._size, free_out, ready_in),
                name=f"alexnet_jax input worker {w}",
            )
            process.start()
            free_out.close()
            ready_in.close()
            self._workers.append(process)
            self._free.append(free_in)
            self._ready.append(ready_out)
            for slot in slots:
                free_in.send(slot)

    def __iter__(self) -> WorkerPool:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._stop is not None and self._next >= self._stop:
            raise StopIteration
        if not self._workers:
            raise RuntimeError("the input worker pool is closed")
        self._give_back_returned()
        w = (self._next - self._start) % len(self._workers)
        message = self._receive(w)
        if message[0] == "error":
            _, k, exception, remote = message
            self.close()
            raise exception from _WorkerTracebackError(
                f"in input worker {w} (batch {k}):\n{remote}"
            )
        k, slot, rows = message
        assert k == self._next, (k, self._next)
        self._next += 1
        # A fresh array over the slot: every view handed out keeps it, and so the slot, alive.
        memory = np.frombuffer(self._segment.mapping, np.uint8, self._size, slot * self._size)
        batch = {name: view[:rows] for name, view in _slot_views(memory, self._layout).items()}
        if len(self._leased[w]) + 1 < self._slots:
            self._leased[w].add(slot)
            weakref.finalize(memory, self._returned.append, (w, slot))
            return batch
        # The caller keeps all the worker's other slots: this batch is a copy, its slot goes back.
        batch = {name: np.array(view) for name, view in batch.items()}
        self._free[w].send(slot)
        return batch

    def _receive(self, w: int) -> Any:
        """Worker ``w``'s next message; InputWorkerError if it died before sending it.

        Only the worker holds its pipe's sending end, so its death is the end of the pipe.
        """
        try:
            message = self._ready[w].recv()
            while message[0] == "mapped":
                self._mapped += 1
                if self._mapped == len(self._workers):
                    # Every process has it mapped: its name can go now, so no way this process
                    # ends (a SIGKILL, an os._exit) can leave it behind in /dev/shm.
                    self._segment.unlink()
                message = self._ready[w].recv()
            return message
        except EOFError:
            process = self._workers[w]
            process.join()
            self.close()
            raise errors.InputWorkerError(
                _death(w, process.exitcode, self._next), worker=w, exitcode=process.exitcode
            ) from None

    def _give_back_returned(self) -> None:
        """Sends the slots whose batches were dropped back to their workers."""
        while self._returned:
            w, slot = self._returned.popleft()
            self._leased[w].discard(slot)
            if self._workers:
                with contextlib.suppress(OSError):  # A worker that built all its batches.
                    self._free[w].send(slot)

    def slot_owners(self) -> list[dict[int, str]]:
        """Per worker, who holds each slot now: "worker", or "caller" (a batch still referenced)."""
        self._give_back_returned()
        return [
            {
                s: "caller" if s in leased else "worker"
                for s in range(w * self._slots, (w + 1) * self._slots)
            }
            for w, leased in enumerate(self._leased)
        ]

    def close(self) -> None:
        """Stops the workers and removes the shared-memory file (kept batches stay readable)."""
        atexit.unregister(self.close)
        for conn in self._free + self._ready:
            conn.close()
        for process in self._workers:
            process.join(JOIN_SECONDS)
            if process.is_alive():
                process.kill()
                process.join()
        self._workers, self._free, self._ready = [], [], []
        self._segment.unlink()


def _death(worker: int, exitcode: int | None, batch: int) -> str:
    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        how = f"signal {name}" + (
            ", as the out-of-memory killer sends" if name == "SIGKILL" else ""
        )
    return f"Input worker process {worker} died ({how}) while building batch {batch}"
