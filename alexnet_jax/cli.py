"""What every command shares: the same log filtering and the same exit codes."""

from __future__ import annotations

import logging as std_logging

from absl import logging

# Exit codes of every command (README, "Checkpoints and faults").
EXIT_OK = 0
EXIT_PARTIAL = 1  # Finished, but some inputs were reported (e.g. unreadable images).
EXIT_USAGE = 2  # A user or environment mistake: a flag, a config field, a path.
EXIT_NO_CHECKPOINT = 3  # The workdir holds no checkpoint that can be restored.


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


def quiet_library_logs() -> None:
    """Installs ``QuietLibraryLogs`` on absl's handler (call at the start of ``main``)."""
    logging.get_absl_handler().addFilter(QuietLibraryLogs())
