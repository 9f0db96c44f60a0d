"""The JAX train step with different kernel options, timed against each other in one process.

    python -m alexnet_jax.benchmarks.kernel_choices --config=configs/imagenet.py \
        --config.model.compute_dtype=bfloat16 --batch_size=512 --steps=10 \
        --options= --options=lrn=compute_dtype --options=tower_convs=grouped \
        --options=lrn=compute_dtype,tower_convs=grouped,pad_input_channels=8

Each ``--options`` (``tuning.parse_kernel_options`` text; "" = none) builds
the config's train step (``train_step.jax_train_step``) with those options on
top of the backend's schedule. All are compiled first, then timed in
alternating turns (``train_step.time_alternating``), and each is reported
with its images/s, its speed relative to the first (the median of per-step
time ratios), its compile time and XLA's buffers for the step (arguments and
temporaries: a per-step figure one process can give for every choice, unlike
the device's peak). An option faster than the first on the target chip, with
its equality test passing, belongs in ``tuning.KERNEL_OPTIONS_BY_BACKEND``.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from alexnet_jax import config_lib, tuning
from alexnet_jax.benchmarks import command, train_step


def run(
    config: ml_collections.ConfigDict,
    option_texts: Sequence[str],
    *,
    steps: int,
    kernels: str = "auto",
) -> dict[str, Any]:
    """Builds one step per option text, times them in turns, prints the table, returns it."""
    import jax

    config_lib.validate(config)
    options = [tuning.parse_kernel_options(text) for text in option_texts]
    names = [o.describe() or "none" for o in options]
    if len(set(names)) != len(names):
        raise tuning.SettingError(f"--options repeats a choice: {names}")
    m = config.model
    print(f"jax {jax.__version__} on {jax.devices()}; variant {m.variant}, width {m.width}, "
          f"compute {m.compute_dtype}, batch {config.batch_size}, kernels {kernels}")  # fmt: skip
    built = {}
    for name, chosen in zip(names, options, strict=True):
        built[name] = train_step.jax_train_step(config, kernels, chosen)
        print(f"[{name}] compiled in {built[name].compile_s:.1f} s")
    times = train_step.time_alternating(built, steps)
    first = names[0]
    rows = []
    print(f"{'options':<70}{'images/s':>11}{'x first':>9}{'compile s':>11}"
          f"{'args MiB':>10}{'temps MiB':>11}")  # fmt: skip
    for name in names:
        step = built[name]
        ratio = statistics.median(
            f / s for f, s in zip(times[first], times[name], strict=True)
        )  # > 1: faster than the first.
        row = {
            "options": name,
            "images_per_s": config.batch_size / statistics.median(times[name]),
            "best_images_per_s": config.batch_size / min(times[name]),
            "speed_vs_first": ratio,
            "compile_s": step.compile_s,
            "xla_arguments_mib": step.memory.argument_size_in_bytes / 2**20,
            "xla_temporaries_mib": step.memory.temp_size_in_bytes / 2**20,
        }
        rows.append(row)
        print(f"{name:<70}{row['images_per_s']:>11.1f}{ratio:>9.3f}{row['compile_s']:>11.1f}"
              f"{row['xla_arguments_mib']:>10.0f}{row['xla_temporaries_mib']:>11.0f}")  # fmt: skip
    print(f"(x first: median over alternating turns of the first's step time / this one's; "
          f"{steps} timed steps each)")  # fmt: skip
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "batch_size": config.batch_size,
        "compute_dtype": m.compute_dtype,
        "variant": m.variant,
        "choices": rows,
    }


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command."""
    config_flags.DEFINE_config_file(
        "config", train_step.DEFAULT_CONFIG, "Experiment config whose step is timed.",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_integer("batch_size", 128, "Train batch size (replaces config.batch_size).")
    flags.DEFINE_integer("steps", 10, "Timed steps per choice (the median is reported).")
    flags.DEFINE_multi_string(
        "options",
        [""],
        "tuning.KernelOptions as NAME=VALUE,... (repeat the flag for each choice; the first is "
        f"the baseline; '' = none). Accepted: {dict(tuning.KERNEL_OPTION_VALUES)}.",
    )
    flags.DEFINE_enum("kernels", "auto", list(tuning.KERNEL_CHOICES), "The schedule underneath.")
    flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")


def main(argv: Sequence[str]) -> int:
    """A bad flag or option is one ``error:`` line and exit 2."""
    config = train_step.with_batch_size(FLAGS.config, FLAGS.batch_size)
    measure = functools.partial(
        run, config, FLAGS.options, steps=FLAGS.steps, kernels=FLAGS.kernels
    )
    return command.main(argv, FLAGS.config, measure, FLAGS.json)


if __name__ == "__main__":
    command.launch(define_flags, main)
