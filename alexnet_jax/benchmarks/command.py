"""What every benchmark command does around its measurement: the process set up as
``launch.py`` sets it up, the numbers optionally written as JSON, and a user's mistake
reported as one ``error:`` line with its exit code."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app

from alexnet_jax import allocator, cli, config_lib, tuning


def start(argv: Sequence[str], config: ml_collections.ConfigDict) -> None:
    """Refuses stray arguments, validates ``config``, then sets the process up (XLA flags
    before JAX starts its backends; the host allocator, which may restart the command once)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config_lib.validate(config)
    tuning.configure_process()
    allocator.use(tuning.host_allocator())


def finish(out: Any, json_path: str) -> None:
    """Writes ``out`` to ``json_path`` (unless empty) and flushes what was printed."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1, default=str)
    sys.stdout.flush()


def main(
    argv: Sequence[str],
    config: ml_collections.ConfigDict,
    measure: Callable[[], Any],
    json_path: str,
) -> int:
    """``start``, then ``measure()``, then ``finish`` with what it returned; a bad flag, config
    value or path is one ``error:`` line and its exit code (``cli.run_reporting_errors``)."""

    def body() -> int:
        start(argv, config)
        finish(measure(), json_path)
        return cli.EXIT_OK

    return cli.run_reporting_errors(body)


def launch(define_flags: Callable[[], None], main: Callable[[Sequence[str]], int]) -> None:
    """Runs ``main`` as the program (``python -m``): flags defined first, its code the exit's."""
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
