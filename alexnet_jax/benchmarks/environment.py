"""What a benchmark ran on: package versions, devices, the GPU as nvidia-smi names it.

    python -m alexnet_jax.benchmarks.environment

Also imports every module the benchmarks use, so a missing package fails here, named,
before any stage spends time compiling.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

PACKAGES = (
    "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "array_record",
    "ml_collections", "numpy", "torch",
)  # fmt: skip


def versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package ("absent" when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def main() -> None:
    import jax

    import alexnet_jax.benchmarks.input_pipeline  # noqa: F401 - fails early, naming the module.
    import alexnet_jax.benchmarks.train_step  # noqa: F401

    print("packages:", ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"devices: {jax.devices()}; kind: {jax.devices()[0].device_kind}")
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,memory.total,driver_version,clocks.max.sm"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, timeout=30
        )
        print(smi.stdout.strip())


if __name__ == "__main__":
    main()
