"""Host allocator choice (allocator.py): mimalloc preloaded by re-executing, once."""

import os
import subprocess
import sys

import pytest

from alexnet_jax import allocator
from tests.conftest import ROOT

_PROBE = (
    "import os, sys; from alexnet_jax import allocator; allocator.use(sys.argv[1]); "
    "print(allocator.active(), os.environ.get('MIMALLOC_PURGE_DELAY'), sys.argv[1:])"
)


def _probe(name: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY")}
    env["PYTHONPATH"] = ROOT
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, name, "--extra=1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mimalloc is preloaded on Linux")
def test_mimalloc_is_installed_and_preloaded_by_one_restart():
    library = allocator.mimalloc_library()
    assert library is not None and os.path.exists(library), "pip install cmeel-mimalloc"
    # The restarted process runs the same command (its arguments intact) with mimalloc mapped.
    assert _probe("mimalloc") == f"mimalloc {allocator.PURGE_DELAY_MS} ['mimalloc', '--extra=1']"
    assert _probe("system") == "system None ['system', '--extra=1']"


def test_unknown_allocator_names_the_choices():
    with pytest.raises(ValueError, match="system"):
        allocator.use("jemalloc")
