"""What every benchmark command does around its measurement: the process set up as
``launch.py`` sets it up, and the numbers optionally written as JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app

from alexnet_jax import allocator, config_lib, tuning


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
