"""The peak a benchmark's fractions are taken of, and what the host can do in bfloat16.

A known accelerator's peak is its datasheet's (``flops.CHIP_PEAK_TFLOPS``); a
CPU has no datasheet figure that XLA reaches, so there the ceiling is the
matmul rate XLA reaches on this host. Whether bfloat16 can be fast on a CPU
depends on its instructions (AVX512-BF16, AMX), read from /proc/cpuinfo.
"""

from __future__ import annotations

import platform
import time
from typing import Any

from alexnet_jax.flops import chip_peak_tflops

# CPU flags (/proc/cpuinfo) that say how fast bfloat16 can be on this host.
CPU_BF16_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features(cpuinfo: str) -> dict[str, Any]:
    """The CPU's model name and which of ``CPU_BF16_FLAGS`` it has, from /proc/cpuinfo text.

    bfloat16 on CPU is fast only with AVX512-BF16 or AMX; printing them says
    what a bfloat16 number on this host can mean.
    """
    model, cpu_flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not cpu_flags:
            cpu_flags = set(value.split())
    return {"model": model, "flags": {f: f in cpu_flags for f in CPU_BF16_FLAGS}}


def host_cpu() -> dict[str, Any]:
    """``cpu_features`` of this host (empty flags where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            return cpu_features(f.read())
    except OSError:
        return {"model": platform.processor(), "flags": {}}


def matmul_peak_gflops(size: int, steps: int, dtype: str = "float32") -> float:
    """GFLOP/s of a ``size x size`` matmul in ``dtype`` under XLA: the best of ``steps`` calls."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(max(steps, 3)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def resolve_peak(
    peak_tflops: float,
    device_kind: str,
    compute_dtype: str,
    measured_gflops: float,
    matmul_precision: str | None = None,
) -> tuple[float, str]:
    """The peak (GFLOP/s) that fractions are taken of, and where it comes from.

    ``--peak_tflops`` if given; else a known accelerator's datasheet peak; else
    the matmul peak measured on this machine (the CPU's practical ceiling).
    """
    if peak_tflops > 0:
        return peak_tflops * 1e3, "--peak_tflops"
    chip = chip_peak_tflops(device_kind, compute_dtype, matmul_precision)
    if chip is not None:
        return chip[0] * 1e3, chip[1]
    return measured_gflops, f"measured {compute_dtype} matmul"
