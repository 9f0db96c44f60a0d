"""The GPU comparison table from ``gpu_train_step.sh``'s stage results (JSON files in its log dir).

    python -m alexnet_jax.benchmarks.gpu_table --stage_dir=DIR

Each framework ran in its own process (``train_step.py`` says why), so the
ratios here are of medians from separate processes, and device memory is
each process's own peak: JAX's ``peak_bytes_in_use``, PyTorch's
``max_memory_allocated``. Prints markdown (also written to DIR/table.md):
the train steps, the issue's targets met or not, the kernel options timed
against each other in one process, and the profile's top operations. A
stage that did not run or failed shows as "n/a".
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

# (row label, stage JSON file, key prefix of train_step's row). The files are the stages' --json.
ROWS = (
    ("alexnet_jax, paper net, bfloat16", "jax_paper_bf16.json", ""),
    ("PyTorch eager, same net, bf16 autocast", "torch_paper_bf16.json", "torch_"),
    ("PyTorch torch.compile, same net, bf16 autocast", "torch_compile_paper_bf16.json",
     "torch_compile_"),
    ("alexnet_jax, paper net, float32 (TF32)", "jax_paper_f32.json", ""),
    ("PyTorch eager, same net, TF32", "torch_paper_f32.json", "torch_"),
    ("alexnet_jax, model.variant=torchvision, bfloat16", "jax_torchvision_bf16.json", ""),
    ("PyTorch eager, torchvision variant, bf16 autocast", "torch_torchvision_bf16.json", "torch_"),
    ("PyTorch torch.compile, torchvision variant, bf16 autocast",
     "torch_compile_torchvision_bf16.json", "torch_compile_"),
)  # fmt: skip
KERNEL_CHOICES_FILE = "kernel_choices_paper_bf16.json"
PROFILE_FILE = "profile_paper_bf16.json"
# The issue's targets (H200, bf16, batch 512): (what, numerator row, denominator row, at least).
SPEED_TARGETS = (
    ("paper net: JAX / torch.compile", 0, 2, 1.5),
    ("torchvision variant: JAX / torch.compile", 5, 7, 1.2),
)
MEMORY_TARGET = ("paper net device memory: JAX <= torch.compile", 0, 2)


def _load(log_dir: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(log_dir, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def step_rows(log_dir: str) -> list[dict[str, Any]]:
    """One dict per ROWS entry: label, images_per_s, compile_s, device_mib, net (None if absent)."""
    rows = []
    for label, file, prefix in ROWS:
        out = _load(log_dir, file)
        batches = (out or {}).get("batches") or {}
        batch, row = next(iter(batches.items()), (None, {}))
        device_key = "device_peak_mib" if prefix == "" else "torch_device_peak_mib"
        rows.append({
            "label": label,
            "batch": batch,
            "images_per_s": row.get(f"{prefix}images_per_s"),
            "compile_s": row.get(f"{prefix}compile_s"),
            "device_mib": row.get(device_key),
            "net": row.get(f"{prefix}net", "alexnet_jax" if prefix == "" else None),
        })  # fmt: skip
    return rows


def _number(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def _ratio(rows: list[dict[str, Any]], top: int, bottom: int) -> float | None:
    a, b = rows[top]["images_per_s"], rows[bottom]["images_per_s"]
    return a / b if a and b else None


def build_table(log_dir: str) -> str:
    """The markdown report of one ``gpu_train_step.sh`` run."""
    rows = step_rows(log_dir)
    batch = next((r["batch"] for r in rows if r["batch"] is not None), "?")
    lines = [
        f"### Train step, batch {batch} (one process per row; median step)",
        "",
        "| train step | images/s | compile s | device memory MiB | net |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {_number(r['images_per_s'], ',.0f')} | "
            f"{_number(r['compile_s'], '.1f')} | {_number(r['device_mib'], ',.0f')} | "
            f"{r['net'] or 'n/a'} |"
        )
    lines += ["", "### Targets", ""]
    for what, top, bottom, least in SPEED_TARGETS:
        ratio = _ratio(rows, top, bottom)
        verdict = "n/a" if ratio is None else ("met" if ratio >= least else "NOT met")
        lines.append(f"- {what}: {_number(ratio, '.2f')}x (target >= {least}x): {verdict}")
    what, ours, theirs = MEMORY_TARGET
    a, b = rows[ours]["device_mib"], rows[theirs]["device_mib"]
    verdict = "n/a" if a is None or b is None else ("met" if a <= b else "NOT met")
    lines.append(f"- {what}: {_number(a, ',.0f')} vs {_number(b, ',.0f')} MiB: {verdict}")
    lines += _kernel_choice_lines(_load(log_dir, KERNEL_CHOICES_FILE))
    lines += _profile_lines(_load(log_dir, PROFILE_FILE))
    return "\n".join(lines) + "\n"


def _kernel_choice_lines(out: dict[str, Any] | None) -> list[str]:
    lines = ["", "### Kernel options (tuning.KernelOptions), timed in turns in one process", ""]
    if not out:
        return lines + ["n/a"]
    lines += [
        f"{out['variant']} net, {out['compute_dtype']}, batch {out['batch_size']}, "
        f"{out['device_kind']}; x first > 1 is faster than the first row.",
        "",
        "| options | images/s | x first | compile s | XLA temporaries MiB |",
        "|---|---|---|---|---|",
    ]
    for c in out["choices"]:
        lines.append(
            f"| {c['options']} | {c['images_per_s']:,.0f} | {c['speed_vs_first']:.3f} | "
            f"{c['compile_s']:.1f} | {c['xla_temporaries_mib']:,.0f} |"
        )
    return lines


def _profile_lines(out: dict[str, Any] | None, count: int = 12) -> list[str]:
    lines = ["", "### Profile: top operations of the JAX step", ""]
    if not out:
        return lines + ["n/a"]
    lines += [
        f"{out['ms_per_step']:.2f} ms per step in XLA operations ({out['source']}).",
        "",
        "| share | ms/step | operation | what it computes |",
        "|---|---|---|---|",
    ]
    for r in out["top"][:count]:
        what = r["what"].replace("|", "/")
        lines.append(f"| {100 * r['share']:.1f}% | {r['ms_per_step']:.3f} | {r['op']} | {what} |")
    return lines


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command."""
    flags.DEFINE_string("stage_dir", None, "gpu_train_step.sh's --log_dir.", required=True)


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not os.path.isdir(FLAGS.stage_dir):
        print(f"error: --stage_dir={FLAGS.stage_dir} is not a directory", file=sys.stderr)
        return 2
    table = build_table(FLAGS.stage_dir)
    with open(os.path.join(FLAGS.stage_dir, "table.md"), "w") as f:
        f.write(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
