"""What a training run and its resume did, from the workdir's metrics.jsonl (``gpu.sh``'s report).

    python -m alexnet_jax.benchmarks.loop_report --workdir=DIR --first_steps=200 \
        --resume_log=LOG --json=OUT.json

Reads the train and val rows the loop wrote (``train.py``: one train row per
log window with ``images_per_sec`` and ``data_wait_fraction``), and checks
that the run did what ``gpu.sh`` asked of it: the first launch trained to
``--first_steps`` and evaluated there, the second resumed from that step's
checkpoint (its log says so, and no step was trained twice) and evaluated at
its end. Prints the loop's own rate and the fraction of its time spent
waiting for the input: the median over the log windows after each launch's
first (that window holds the input's start-up). Exit 1 if a check fails.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from alexnet_jax import cli, errors

RESUMED = re.compile(r"Resumed from the checkpoint at step (\d+)")


class MetricsMissingError(errors.UsageError, FileNotFoundError):
    """The workdir holds no metrics.jsonl: the run did not start."""


def read_rows(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl``, in the order they were written."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MetricsMissingError(f"No metrics.jsonl in {workdir}: did the training run start?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(
    rows: list[dict[str, Any]], first_steps: int, resume_log: str | None = None
) -> dict[str, Any]:
    """The loop's rates and the checks' outcomes (``problems`` lists what failed)."""
    train = [r for r in rows if r["split"] == "train"]
    val_steps = [r["step"] for r in rows if r["split"] == "val"]
    launches = [
        [r for r in train if r["step"] <= first_steps],
        [r for r in train if r["step"] > first_steps],
    ]
    steady = [r for launch in launches for r in launch[1:]]
    problems = []
    steps = [r["step"] for r in train]
    if steps != sorted(set(steps)):
        problems.append(f"train steps not increasing (a step trained twice?): {steps}")
    if not launches[0] or launches[0][-1]["step"] != first_steps:
        problems.append(f"the first launch did not log step {first_steps}")
    if not launches[1]:
        problems.append(f"no train rows after step {first_steps}: the resumed run did not train")
    if first_steps not in val_steps or not train or train[-1]["step"] not in val_steps:
        problems.append(f"no evaluation at the end of each launch (val rows at {val_steps})")
    resumed_from = None
    if resume_log is not None and not os.path.isfile(resume_log):
        problems.append(f"no log of the second launch at {resume_log}: did it run?")
    elif resume_log is not None:
        with open(resume_log, errors="replace") as f:
            found = RESUMED.findall(f.read())
        resumed_from = int(found[-1]) if found else None
        if resumed_from != first_steps:
            problems.append(f"the second launch resumed from {resumed_from}, not {first_steps}")
    if not steady:
        problems.append("no log window after each launch's first: nothing to time")
    return {
        "last_step": train[-1]["step"] if train else None,
        "resumed_from_step": resumed_from,
        "val_steps": val_steps,
        "windows": len(steady),
        "images_per_sec": statistics.median(r["images_per_sec"] for r in steady)
        if steady
        else None,
        "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in steady)
        if steady
        else None,
        "last_val": {k: v for k, v in rows[-1].items() if k not in ("split",)}
        if rows and rows[-1]["split"] == "val"
        else None,
        "problems": problems,
    }


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs."""
    flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
    flags.DEFINE_integer("first_steps", None, "max_steps of the first launch.", required=True)
    flags.DEFINE_string("resume_log", "", "The second launch's output (checked: it resumed).")
    flags.DEFINE_string("json", "", "Also write the summary to this JSON file.")


def main(argv: Sequence[str]) -> int:
    return cli.run_flags_only_command(argv, _run)


def _run() -> int:
    summary = summarize(read_rows(FLAGS.workdir), FLAGS.first_steps, FLAGS.resume_log or None)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(summary, f, indent=1)
    if summary["images_per_sec"] is not None:
        print(
            f"training loop: {summary['images_per_sec']:.1f} img/s, data_wait_fraction "
            f"{summary['data_wait_fraction']:.3f} (medians of {summary['windows']} log windows "
            f"after each launch's first)"
        )
    print(
        f"resumed from step {summary['resumed_from_step']}, trained to step "
        f"{summary['last_step']}, evaluated at steps {summary['val_steps']}"
    )
    for problem in summary["problems"]:
        print(f"FAILED: {problem}")
    return errors.EXIT_PARTIAL if summary["problems"] else cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
