"""Who may run in a workdir, and when a run must stop: the workdir lock, SIGTERM and SIGINT.

Both are process-level guards around the training loop (``train.train_and_evaluate``),
independent of what is saved; ``checkpoint`` does the saving.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging
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
    """SIGTERM (preemption) or SIGINT (Ctrl-C): save and stop at the next step boundary.

    A second one stops the process at once, without saving, with exit code
    128 + the signal's number, as a second Ctrl-C does in most tools: a run
    stuck in a collective or a slow step never reaches the boundary. Python
    runs signal handlers only when the main thread is between bytecodes, so a
    watcher thread reads the signals from ``signal.set_wakeup_fd``'s pipe.

    With several JAX processes, JAX's preemption sync point (which all
    processes reach at the same step) decides instead of the local signal,
    and JAX's own SIGTERM handler stays in place.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, multi_process: bool, resume_note: Callable[[], str] = lambda: ""):
        self._multi_process = multi_process
        self._resume_note = resume_note  # Where a relaunch resumes from, said on the second.
        self._event = threading.Event()
        self.reason = "SIGTERM"  # The signal that asked to stop (the preemption service: SIGTERM).
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int, int] | None = None  # (read fd, write fd, previous fd)
        self._watcher: threading.Thread | None = None
        if not multi_process and threading.current_thread() is threading.main_thread():
            self._install()

    def _install(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wakeup = (read_fd, write_fd, previous_fd)
        self._watcher = threading.Thread(
            target=self._watch, args=(read_fd,), name="StopSignal", daemon=True
        )
        self._watcher.start()

    def _handle(self, signum, frame) -> None:
        # The watcher counts the signals; this only makes the request visible at once.
        del frame
        if not self._event.is_set():
            self.reason = signal.Signals(signum).name
        self._event.set()

    def _watch(self, read_fd: int) -> None:
        received = 0
        while data := os.read(read_fd, 64):
            for signum in (s for s in data if s in self.SIGNALS):
                received += 1
                name = signal.Signals(signum).name
                if received == 1:
                    if not self._event.is_set():
                        self.reason = name
                    self._event.set()
                    logging.warning(
                        "%s: saving at the next step boundary, then stopping (send it again to "
                        "stop at once without saving)",
                        name,
                    )
                    continue
                print(
                    f"error: a second {name} stopped the run at once, without saving. "
                    f"{self._resume_note()}".rstrip(),
                    file=sys.stderr,
                    flush=True,
                )
                logging.flush()
                os._exit(errors.EXIT_SIGNAL_BASE + signum)

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
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self._wakeup is not None:
            read_fd, write_fd, previous_fd = self._wakeup
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # The watcher reads the end of the pipe and returns.
            if self._watcher is not None:
                self._watcher.join()
            os.close(read_fd)
            self._wakeup, self._watcher = None, None
