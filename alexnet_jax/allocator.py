"""Which malloc serves host memory: the mechanism (``tuning.host_allocator`` chooses).

XLA:CPU allocates each train step's temporary buffers when the step starts
and frees them when it ends. glibc serves blocks that large with a fresh
``mmap`` every time, so the kernel zeroes and maps them anew each step;
mimalloc hands the same pages to the next step. It is told never to return
freed memory to the OS (``MIMALLOC_PURGE_DELAY=-1``), since purging and
re-faulting cost the same again; the price is that the process keeps its
peak memory. docs/performance.md has the measurements.

An allocator can only be chosen when a process starts, so ``use`` re-executes
the current command with ``LD_PRELOAD`` set, once, before any work is done.
The library comes from the ``cmeel-mimalloc`` wheel (requirements.txt).
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

from absl import logging

ALLOCATORS = ("mimalloc", "system")

# Set in the re-executed process: never re-execute twice, whatever happens.
_REEXEC_MARK = "ALEXNET_JAX_ALLOCATOR"
# How long mimalloc keeps freed memory before returning it to the OS (ms); -1: never.
PURGE_DELAY_MS = "-1"


def mimalloc_library() -> str | None:
    """Path of the installed libmimalloc.so, or None (not Linux, wheel not installed)."""
    if not sys.platform.startswith("linux"):
        return None
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    for root in sorted(r for r in roots if r and os.path.isdir(r)):
        found = sorted(glob.glob(os.path.join(root, "cmeel.prefix", "lib", "libmimalloc.so*")))
        if found:
            return found[0]
    return None


def active() -> str:
    """The allocator this process runs with: "mimalloc" if its library is mapped."""
    try:
        with open("/proc/self/maps") as maps:
            return "mimalloc" if "libmimalloc" in maps.read() else "system"
    except OSError:
        return "system"


def use(name: str) -> None:
    """Makes this process run with allocator ``name``, re-executing it if needed.

    Returns without doing anything when ``name`` is already active, when it is
    "system", or (with a warning) when mimalloc is not installed. Otherwise
    this call does not return: the process is replaced by the same command
    (``sys.orig_argv``) with mimalloc preloaded.
    """
    if name not in ALLOCATORS:
        raise ValueError(f"host allocator must be one of {ALLOCATORS}, got {name!r}")
    if name == "system" or active() == name or os.environ.get(_REEXEC_MARK):
        return
    library = mimalloc_library()
    if library is None:
        logging.warning(
            "The host allocator is mimalloc but libmimalloc.so was not found (pip install "
            "cmeel-mimalloc, Linux only); using the system allocator (slower CPU steps)."
        )
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD")) if p)
    env.setdefault("MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS)
    env[_REEXEC_MARK] = name
    logging.info("Restarting with LD_PRELOAD=%s (host allocator: mimalloc)", library)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
