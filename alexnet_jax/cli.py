"""What every command shares: log filtering, exit codes, error reporting, checkpoint flags."""

from __future__ import annotations

import logging as std_logging
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from alexnet_jax import errors

# The exit codes, re-exported: the commands return cli.EXIT_*.
from alexnet_jax.errors import EXIT_NO_CHECKPOINT, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE  # noqa: F401


class QuietLibraryLogs(std_logging.Filter):
    """Keeps this package's INFO progress; from libraries warnings, from orbax only errors.

    Orbax's errors lose their tracebacks: the failures they describe (a save that
    hit a full disk, a damaged checkpoint) reach the user as this package's own
    one-paragraph messages.
    """

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/alexnet_jax/" in record.pathname or record.pathname.endswith("launch.py"):
            return True
        if "/orbax/" in record.pathname:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            return record.levelno >= std_logging.ERROR
        return record.levelno >= std_logging.WARNING


def _from_orbax_leftovers(exc_traceback: Any, exc_value: BaseException | None) -> bool:
    """Whether an exception is orbax's async machinery cleaning up after a failed restore."""
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc_traceback)]
    closed_loop = isinstance(exc_value, RuntimeError) and "Event loop is closed" in str(exc_value)
    return closed_loop or any("/orbax/" in f for f in files)


def _quiet_unraisable(unraisable: Any, default: Any = sys.unraisablehook) -> None:
    if _from_orbax_leftovers(unraisable.exc_traceback, unraisable.exc_value):
        logging.debug("orbax left an exception behind: %s", unraisable.exc_value)
        return
    default(unraisable)


def _quiet_thread_exceptions(args: Any, default: Any = threading.excepthook) -> None:
    if _from_orbax_leftovers(args.exc_traceback, args.exc_value):
        logging.debug("orbax thread ended with: %s", args.exc_value)
        return
    default(args)


def quiet_library_logs() -> None:
    """Installs ``QuietLibraryLogs`` on absl's handler (call at the start of ``main``).

    Also keeps orbax's left-over exceptions out of the output: after a failed
    restore its pending coroutines and threads end with tracebacks ("Exception
    ignored in", "Event loop is closed") that say nothing the user's one-line
    message does not already say.
    """
    logging.get_absl_handler().addFilter(QuietLibraryLogs())
    sys.unraisablehook = _quiet_unraisable
    threading.excepthook = _quiet_thread_exceptions


def exit_code(error: BaseException) -> int | None:
    """The exit code of a user or environment error (its kind's); None for a bug.

    The one mapping for every command: by the error's kind (``errors.py``)
    alone, so a ValueError the project did not raise on purpose keeps its
    traceback.
    """
    return error.exit_code if isinstance(error, errors.UserError) else None


def run_reporting_errors(body: Callable[[], int]) -> int:
    """``body()``; a user or environment error is one ``error:`` line on stderr and its code."""
    try:
        return body()
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return code


def run_flags_only_command(argv: Sequence[str], body: Callable[[], int]) -> int:
    """A command that takes flags and no arguments: quiet logs, then ``body`` reporting errors."""
    from absl import app

    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return run_reporting_errors(body)


def define_checkpoint_flags() -> None:
    """--workdir, --step, --data_dir, --config: how every tool names the model it loads."""
    flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoints.")
    flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the newest usable).")
    flags.DEFINE_string(
        "data_dir", None, "Prepared dataset (class names, mean image); default: the run's config."
    )
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file of the run (e.g. configs/demo.py), only for checkpoints saved without one.",
        lock_config=True,
    )
