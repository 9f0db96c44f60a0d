"""launch.py whose training input fails as a killed input worker does, for tests/test_checkpoint.py.

    python tests/faulty_input_launch.py K LAUNCH_FLAGS...

The K-th batch this process asks of its training input raises
``errors.InputWorkerError`` instead, without advancing the iterator: what the
input pool does when one of its worker processes dies (the OOM killer, say).
"""

from __future__ import annotations

import itertools
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alexnet_jax import errors, feed  # noqa: E402


def fail_at(k: int) -> None:
    """Makes the ``k``-th ``next()`` of any ``feed.TrainInput`` raise as a killed worker's."""
    original = feed.TrainInput.__next__
    calls = itertools.count(1)

    def failing_next(self: feed.TrainInput) -> feed.DeviceBatch:
        if next(calls) == k:
            raise errors.InputWorkerError(
                "Input worker 1 was terminated unexpectedly (SIGKILL)", worker=1, exitcode=-9
            )
        return original(self)

    feed.TrainInput.__next__ = failing_next


if __name__ == "__main__":
    fail_at(int(sys.argv[1]))
    sys.argv = [os.path.join(ROOT, "launch.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
