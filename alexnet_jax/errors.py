"""The kinds of error a user can act on, each carrying the exit code every command gives it.

Every exception the project raises for a user's or the environment's mistake
derives from one kind here, so ``cli`` maps an error to its exit code by its
kind alone. Anything else (a ValueError from deep in NumPy, say) is a bug and
keeps its traceback. This module imports nothing: every layer may use it.
"""

from __future__ import annotations

# Exit codes of every command (docs/faults.md).
EXIT_OK = 0
EXIT_PARTIAL = 1  # Finished, but some inputs were reported (e.g. unreadable images).
EXIT_USAGE = 2  # A user or environment mistake: a flag, a config field, a path.
EXIT_NO_CHECKPOINT = 3  # The workdir holds no checkpoint that can be restored.
# Stopped by a fault outside the run's own code (a killed input worker, a process of the job
# gone): relaunch the same command (every process of the job) to continue. 75 is sysexits'
# EX_TEMPFAIL, "a temporary failure; the user is invited to retry", so a scheduler may retry.
EXIT_RELAUNCH = 75
# A second SIGTERM or SIGINT stops at once without saving: 128 + the signal's number (143 or
# 130), as a shell reports a process the signal ended. No exception carries it (run_control).
EXIT_SIGNAL_BASE = 128


class UserError(Exception):
    """A mistake the message says how to fix: shown as one ``error:`` line, no traceback."""

    exit_code: int = EXIT_USAGE


class UsageError(UserError):
    """A flag, config field, path, file or environment setting the run cannot use as given."""

    exit_code = EXIT_USAGE


class RunStoppedError(UserError):
    """The run stopped itself for a cause it names: a diverged loss, a full disk, a busy workdir."""

    exit_code = EXIT_USAGE


class NoCheckpointError(UserError):
    """The workdir holds no checkpoint that can be restored."""

    exit_code = EXIT_NO_CHECKPOINT


class InputWorkerError(UserError):
    """An input worker process ended without being asked to (killed: the OOM killer, say).

    The batch it was building was never handed out, so the iterator's position
    is still that batch: saving then resuming loses nothing.
    """

    exit_code = EXIT_RELAUNCH

    def __init__(self, message: str, *, worker: int, exitcode: int | None):
        super().__init__(message)
        self.worker, self.exitcode = worker, exitcode


class PeerLostError(UserError):
    """Another process of a multi-process job is gone (a collective with it failed).

    Nothing can be saved without it, and ``jax.distributed``'s shutdown would
    wait for it and then abort: the command ends at once (``os._exit``) after
    its one ``error:`` line.
    """

    exit_code = EXIT_RELAUNCH
