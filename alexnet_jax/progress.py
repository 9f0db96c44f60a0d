"""Progress on long work (preparing, evaluating, training): done/total, rate and ETA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from absl import logging


def format_duration(seconds: float) -> str:
    """12m05s, 3h02m09s; "?" when unknown (no rate yet)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Logs "done/total unit (pct), rate unit/s, ETA" at most every ``every_seconds``.

    The rate counts only work done since this object was made, so a resumed
    job (``done`` > 0 at the start) gets an honest ETA.
    """

    def __init__(
        self,
        total: int,
        *,
        unit: str,
        done: int = 0,
        every_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.done, self.unit, self.every = total, done, unit, every_seconds
        self._clock = clock
        self._start, self._start_done, self._last = clock(), done, -math.inf

    @property
    def rate(self) -> float:
        """Units per second since the start (0 before any work)."""
        return (self.done - self._start_done) / max(self._clock() - self._start, 1e-9)

    @property
    def eta_seconds(self) -> float:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else math.inf

    def line(self, prefix: str = "") -> str:
        return (
            f"{prefix}{self.done}/{self.total} {self.unit} "
            f"({100.0 * self.done / max(self.total, 1):.0f}%), {self.rate:.1f} {self.unit}/s, "
            f"ETA {format_duration(self.eta_seconds)}"
        )

    def update(self, done_now: int, *, prefix: str = "", force: bool = False) -> str | None:
        """Adds ``done_now`` units; logs and returns the line when one is due (or ``force``)."""
        self.done += done_now
        now = self._clock()
        if not force and now - self._last < self.every and self.done < self.total:
            return None
        self._last = now
        text = self.line(prefix)
        logging.info("%s", text)
        return text
