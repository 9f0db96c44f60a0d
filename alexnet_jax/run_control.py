"""Who may run in a workdir, and when a run must stop: the workdir lock and SIGTERM.

Both are process-level guards around the training loop (``train.train_and_evaluate``),
independent of what is saved; ``checkpoint`` does the saving.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
import time

from jax.experimental import multihost_utils

from alexnet_jax import errors


class WorkdirInUseError(errors.RunStoppedError, RuntimeError):
    """Another process is already training in this workdir."""


class WorkdirLock:
    """An exclusive ``flock`` on ``workdir/.lock.<process>``, released when the process dies.

    A second launch into the same workdir fails at once, naming the holder;
    a SIGKILLed run leaves no stale lock behind (the kernel drops it).
    """

    def __init__(self, workdir: str, process_index: int = 0):
        self.path = os.path.join(os.path.abspath(workdir), f".lock.{process_index}")
        self._file = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime.
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            f.close()
            raise WorkdirInUseError(
                f"Another run is already training in {os.path.dirname(self.path)} ({holder}). "
                "Wait for it to finish or stop it, or use another --workdir."
            ) from None
        f.seek(0)
        f.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StopSignal:
    """Turns SIGTERM (preemption) into a request to save and stop at the next step boundary.

    With several JAX processes, JAX's preemption sync point (which all
    processes reach at the same step) decides instead of the local signal.
    """

    def __init__(self, *, multi_process: bool):
        self._multi_process = multi_process
        self._event = threading.Event()
        self._previous = None
        if not multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if self._multi_process:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # The preemption service is off (no jax.distributed).
                return False
        return self._event.is_set()

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
