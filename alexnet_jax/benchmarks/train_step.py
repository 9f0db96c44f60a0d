"""Train-step speed of a config's network: JAX against PyTorch and against the chip's peak.

    python -m alexnet_jax.benchmarks.train_step          # configs/imagenet.py, batch 128 and 64
    python -m alexnet_jax.benchmarks.train_step --config=configs/imagenet.py \
        --config.model.width=0.25 --batch_sizes=128,64
    python -m alexnet_jax.benchmarks.train_step --config.model.compute_dtype=bfloat16
    python -m alexnet_jax.benchmarks.train_step --framework=torch --batch_sizes=128  # its own RSS

The network, its compute dtype, the optimizer and the mesh are the config's
(``--config`` plus ``--config.*`` overrides, as ``launch.py`` takes them), so
the step timed is the one that config trains; only ``batch_size`` is replaced
by each of ``--batch_sizes``. In one process it prints the host CPU and the
peak (``peak.py``); per batch size, the trainer's jitted step (built as
``train.py`` builds it, state donated) with compile time, images/s, GFLOP/s,
fraction of the peak and memory, and the same network in PyTorch
(``torch_reference.py``, eager and under ``torch.compile``, on JAX's chip) in
alternating turns with it, and the ratios; then the eval rates and the
per-layer table (``layer_times.py``). Peak resident and JAX's device memory
are per process: ``--framework=jax`` (or ``torch``, ``torch_compile``) times
one framework alone, so its peaks are its own. ``--kernels`` and
``--kernel_options`` (``tuning.KernelOptions``) pick how the JAX model
computes; ``kernel_choices.py`` times several in one process.

The machine may be shared: each number is the median of ``--steps`` timed
calls, and A/B comparisons belong in one run, where the frameworks take turns
under the same load. ``gpu_train_step.sh`` runs one framework per process: a
GPU is not shared, so turns cancel no drift, and JAX reserves most of its
memory at start.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

import configs
from alexnet_jax import allocator, config_lib, inference, tuning
from alexnet_jax.benchmarks import command, layer_times, peak, torch_reference
from alexnet_jax.flops import CHIP_PEAK_TFLOPS, forward_flops_per_image

IMAGE_SIZE = 224
DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "imagenet.py")
FRAMEWORKS = ("jax", "torch", "torch_compile")
# The learning-rate schedule is a function of the step; a nominal epoch length lets the
# step-based schedules build (their values do not change what a step costs).
NOMINAL_STEPS_PER_EPOCH = 1000
NOMINAL_TOTAL_STEPS = 100_000


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def selected_frameworks(
    framework: str, *, skip_torch: bool = False, skip_torch_compile: bool = False
) -> tuple[str, ...]:
    """What to time: ``framework`` alone (its own peak memory) or "all", less the skipped."""
    if framework != "all" and framework not in FRAMEWORKS:
        raise ValueError(f"framework {framework!r} is not 'all' or one of {FRAMEWORKS}")
    chosen = FRAMEWORKS if framework == "all" else (framework,)
    skipped = {"torch": skip_torch, "torch_compile": skip_torch_compile}
    chosen = tuple(f for f in chosen if not skipped.get(f, False))
    if not chosen:
        raise ValueError(f"--framework={framework} with its skip flag leaves nothing to time")
    return chosen


def with_batch_size(
    config: ml_collections.ConfigDict, batch_size: int
) -> ml_collections.ConfigDict:
    """A copy of ``config`` training at ``batch_size`` (the config itself is left alone)."""
    copy = config.copy_and_resolve_references()
    copy.batch_size = batch_size
    return copy


def build_model(
    config: ml_collections.ConfigDict,
    kernels: str = "auto",
    mesh: Any = None,
    options: tuning.KernelOptions | None = None,
):
    """``inference.build_model(config, mesh)`` with the ``kernels`` choice and kernel ``options``.

    ``tuning.kernels``' arguments: None ``options`` are the backend's own.
    """
    chosen = tuning.kernels(
        conv_chunk_size=config.model.conv_chunk_size, choice=kernels, options=options
    )
    return inference.build_model(config, mesh).clone(kernels=chosen)


def random_batch(
    batch_size: int, num_classes: int, seed: int = 0, dtype: str = "float32"
) -> dict[str, Any]:
    """Images and labels shaped (and typed, ``config.data.dtype``) as the pipeline yields them."""
    import numpy as np

    from alexnet_jax.data import pipeline

    rng = np.random.default_rng(seed)
    images = rng.normal(0, 50, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return {
        "images": images.astype(pipeline.numpy_dtype(dtype)),
        "labels": rng.integers(0, num_classes, batch_size).astype(np.int32),
    }


@dataclasses.dataclass
class JaxStep:
    """The trainer's compiled step with its own state, a fixed batch and what XLA says of it."""

    compiled: Any
    state: Any
    batch: dict[str, Any]
    mesh: Any
    compile_s: float
    xla_flops: float
    memory: Any  # XLA's CompiledMemoryStats of the step.

    def dispatch(self, batch: dict[str, Any]) -> Any:
        """Starts one step on ``batch`` (a global batch) and returns its metrics, unfetched."""
        self.state, step_metrics = self.compiled(self.state, batch)
        return step_metrics

    def __call__(self) -> None:
        """One step on the fixed batch, run to completion."""
        import jax

        jax.block_until_ready(self.dispatch(self.batch))


def jax_train_step(
    config: ml_collections.ConfigDict,
    kernels: str = "auto",
    options: tuning.KernelOptions | None = None,
) -> JaxStep:
    """The project's train step for ``config``, set up as ``train.train_and_evaluate`` does.

    The mesh from ``config.mesh_shape``, the model from ``inference.build_model``,
    the optimizer and schedule from ``optim``, the state initialized under jit with
    the trainer's shardings and donated to ``train.jit_train_step``.
    """
    import jax

    from alexnet_jax import optim, sharding, train

    mesh = sharding.make_mesh(config.mesh_shape)
    model = build_model(config, kernels, mesh, options)
    optimizer = optim.make_optimizer(config.optim)
    learning_rate_fn = optim.learning_rate_schedule(
        config.optim,
        batch_size=config.batch_size,
        steps_per_epoch=NOMINAL_STEPS_PER_EPOCH,
        total_steps=NOMINAL_TOTAL_STEPS,
    )
    init_fn = functools.partial(train.init_state, model, optimizer, config.seed)
    state_shardings = sharding.state_shardings(mesh, jax.eval_shape(init_fn))
    step_fn = train.jit_train_step(
        model,
        optimizer,
        learning_rate_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )
    state = jax.jit(init_fn, out_shardings=state_shardings)()
    local = random_batch(config.batch_size, config.model.num_classes, dtype=config.data.dtype)
    batch = sharding.global_batch(mesh, local)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    return JaxStep(
        compiled=compiled,
        state=state,
        batch=batch,
        mesh=mesh,
        compile_s=compile_s,
        xla_flops=_xla_flops(compiled),
        memory=compiled.memory_analysis(),
    )


def device_peak_mib() -> float | None:
    """Peak bytes in use on the first device so far (MiB); None where not reported (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def time_alternating(
    steps_by_name: dict[str, Callable[[], None]], steps: int, rounds: int = 3, warmup: int = 3
) -> dict[str, list]:
    """Wall times of ``steps`` calls of each function, in turns of consecutive calls.

    On a shared machine, load changes over time; taking turns puts the compared
    steps under the same load, so their ratio is fair. Each turn starts with an
    untimed call and then times consecutive calls, as a training loop runs them:
    the other framework's step in between would evict caches and let the
    allocator return the step's buffers to the OS. First, ``warmup`` untimed
    calls of each: the allocator's pool of step-sized buffers grows over the first
    few steps (a new 1.6 GB buffer, ~400k page faults, whenever the previous
    step's is not yet free), and a training run lives in the steady state after.
    """
    for one_step in steps_by_name.values():
        for _ in range(warmup):
            one_step()
    times: dict[str, list] = {name: [] for name in steps_by_name}
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    for count in per_round:
        for name, one_step in steps_by_name.items():
            one_step()
            for _ in range(count):
                start = time.perf_counter()
                one_step()
                times[name].append(time.perf_counter() - start)
    return times


def _xla_flops(compiled) -> float:
    """FLOPs of a compiled computation from XLA's cost analysis (0 when unavailable)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _ratio(times: dict[str, list], slow: str, fast: str = "jax") -> float:
    """Median of per-step time ratios ``slow / fast`` over the alternating turns."""
    return statistics.median(s / f for s, f in zip(times[slow], times[fast], strict=True))


def run(
    config: ml_collections.ConfigDict,
    batch_sizes: Sequence[int],
    *,
    steps: int,
    frameworks: Sequence[str] = FRAMEWORKS,
    skip_layers: bool = False,
    skip_eval: bool = False,
    matmul_size: int = 2048,
    kernels: str = "auto",
    peak_tflops: float = 0.0,
    kernel_options: str | None = None,
) -> dict[str, Any]:
    """Runs every measurement on ``config``'s network, prints the report, returns the numbers.

    ``kernel_options``: ``tuning.parse_kernel_options`` text; None = the backend's options.
    """
    import jax

    from alexnet_jax import model as model_lib

    config_lib.validate(config)
    m = config.model
    device = jax.local_devices()[0]
    out: dict[str, Any] = {"batches": {}, "frameworks": list(frameworks)}
    print(f"jax {jax.__version__} on {jax.devices()} ({tuning.usable_cores()} CPU cores)")
    out["cpu"] = peak.host_cpu()
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in out["cpu"]["flags"].items())
    print(f"host CPU: {out['cpu']['model'] or 'unknown'}; {features or 'flags unknown'}")
    out["host_allocator"] = allocator.active()
    out["cpu_conv_library"] = tuning.cpu_conv_library() if jax.default_backend() == "cpu" else "n/a"
    options = None if kernel_options is None else tuning.parse_kernel_options(kernel_options)
    base = with_batch_size(config, batch_sizes[0])
    base_model = build_model(base, kernels, options=options)
    out["kernels"] = tuning.describe_kernels(base_model.kernels)
    out["kernel_options"] = (options or tuning.backend_options()).describe() or "none"
    print(f"host allocator: {out['host_allocator']}; CPU convolutions: "
          f"{out['cpu_conv_library']}; kernels: {out['kernels']}; "
          f"kernel options: {out['kernel_options']}")  # fmt: skip
    out["params"] = model_lib.count_params(inference.abstract_params(base_model))
    print(f"network: width {m.width}, {m.num_classes} classes, LRN {m.use_lrn}, "
          f"{out['params']:,} parameters, compute {m.compute_dtype}, "
          f"mesh {tuple(config.mesh_shape)}")  # fmt: skip

    out["matmul_peak_gflops"] = peak.matmul_peak_gflops(matmul_size, steps, m.compute_dtype)
    print(f"matmul peak: {out['matmul_peak_gflops']:.1f} GFLOP/s "
          f"({m.compute_dtype} {matmul_size}x{matmul_size} under XLA, best of runs)")  # fmt: skip
    out["peak_gflops"], out["peak_source"] = peak.resolve_peak(
        peak_tflops, device.device_kind, m.compute_dtype, out["matmul_peak_gflops"],
        jax.config.jax_default_matmul_precision,
    )  # fmt: skip
    print(f"peak for fractions: {out['peak_gflops'] / 1e3:.3f} TFLOP/s ({out['peak_source']})")
    out["train_gflop_per_image"] = 3 * forward_flops_per_image(base) / 1e9
    print(f"model FLOPs: {out['train_gflop_per_image']:.3f} GFLOP per training image "
          "(3 x forward: forward, input and weight gradients)")  # fmt: skip

    not_selected = "not selected (--framework, --skip_torch, --skip_torch_compile)"
    skipped = {f: not_selected for f in FRAMEWORKS if f not in frameworks}
    torch_error = torch_reference.torch_unavailable(frameworks, jax.default_backend())
    skipped.update({f: torch_error for f in frameworks if f.startswith("torch") and torch_error})
    out["rss_before_steps_mib"] = peak_rss_mib()
    for batch_size in batch_sizes:
        out["batches"][batch_size] = _time_batch(
            with_batch_size(config, batch_size), frameworks, skipped, steps, (kernels, options), out
        )

    if "jax" in frameworks and not skip_eval:
        eval_batch = batch_sizes[0]
        images = random_batch(eval_batch, 2)["images"]
        out["eval"] = layer_times.eval_rates(base_model, images, steps)
        print(f"[eval] centre crop: {out['eval']['centre']:.1f} images/s (batch {eval_batch}); "
              f"10 crops: {out['eval']['ten_crop']:.1f} images/s "
              f"({max(1, eval_batch // 10)} images x 10 crops per call)")  # fmt: skip
    if "jax" in frameworks and not skip_layers:
        batch_size = batch_sizes[-1]
        out["layers"] = layer_times.layer_table(
            base_model, random_batch(batch_size, 2)["images"], steps
        )
        step_ms = 1e3 * batch_size / out["batches"][batch_size]["images_per_s"]
        layer_times.print_layer_table(out["layers"], batch_size, step_ms)
    out["peak_rss_mib"] = peak_rss_mib()
    print(f"peak resident memory (whole run): {out['peak_rss_mib']:.0f} MiB")
    return out


def _time_batch(
    config: ml_collections.ConfigDict,
    frameworks: Sequence[str],
    skipped: dict[str, str],
    steps: int,
    kernels: tuple[str, tuple | None],
    out: dict[str, Any],
) -> dict[str, Any]:
    """Builds each framework's step at ``config.batch_size``, times them in turns, prints.

    ``kernels``: (``--kernels``, ``tuning.KernelOptions`` or None) of the JAX model.
    """
    import jax

    batch_size = config.batch_size
    steps_by_name: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    if "jax" in frameworks:
        jax_step = jax_train_step(config, *kernels)
        steps_by_name["jax"] = jax_step
        info["jax"] = {"compile_s": jax_step.compile_s}
    torch_device = torch_reference.torch_device(jax.default_backend())[0]
    torch_names = [n for n in ("torch", "torch_compile") if n in frameworks and n not in skipped]
    if torch_names:
        batch = random_batch(batch_size, config.model.num_classes)
        torch_steps, torch_info, failed = torch_reference.train_steps(
            config, torch_names, batch, torch_device
        )
        steps_by_name.update(torch_steps)
        info.update(torch_info)
        skipped.update(failed)
    times = time_alternating(steps_by_name, steps)
    row: dict[str, Any] = {}
    for name in FRAMEWORKS:
        if name not in times:
            print(f"[{name}] batch {batch_size}: skipped: {skipped.get(name, 'not run')}")
            continue
        images_per_s = batch_size / statistics.median(times[name])
        gflops = images_per_s * out["train_gflop_per_image"]
        prefix = "" if name == "jax" else f"{name}_"
        row[f"{prefix}images_per_s"] = images_per_s
        row[f"{prefix}gflops"] = gflops
        row[f"{prefix}fraction_of_peak"] = gflops / out["peak_gflops"]
        line = (
            f"[{name}] batch {batch_size}: {images_per_s:.1f} images/s, {gflops:.1f} GFLOP/s, "
            f"{gflops / out['peak_gflops']:.2f} of peak"
        )
        if "compile_s" in info[name]:
            row[f"{prefix}compile_s"] = info[name]["compile_s"]
            line += f", compile {info[name]['compile_s']:.1f} s"
        if name == "jax":
            row["xla_step_gflop"] = jax_step.xla_flops / 1e9
            line += (f", step {1e3 * batch_size / images_per_s:.0f} ms "
                     f"(best {batch_size / min(times['jax']):.1f} images/s)")  # fmt: skip
        else:
            row[f"{prefix}net"], row[f"{prefix}device"] = info[name]["net"], info[name]["device"]
            line += f" ({torch_reference.describe(info[name])})"
        if name == "torch_compile":
            line += "; compile = its first step (dynamo + inductor)"
        print(line)
    for name in ("torch", "torch_compile"):
        if "jax" in times and name in times:
            row[f"ratio_{name}"] = _ratio(times, name)
            print(f"ratio jax/{name} at batch {batch_size}: {row[f'ratio_{name}']:.2f}x "
                  "(median of per-step time ratios over alternating turns)")  # fmt: skip
    if "jax" in times:
        row["ratio"] = row.get("ratio_torch")
        memory = jax_step.memory
        row["xla_arguments_mib"] = memory.argument_size_in_bytes / 2**20
        row["xla_temporaries_mib"] = memory.temp_size_in_bytes / 2**20
        row["device_peak_mib"] = device_peak_mib()
        device_text = (
            "" if row["device_peak_mib"] is None
            else f"device peak in use {row['device_peak_mib']:.0f} MiB (process so far); "
        )  # fmt: skip
        print(f"[jax] memory at batch {batch_size}: {device_text}XLA's step buffers: "
              f"arguments {row['xla_arguments_mib']:.0f} MiB, "
              f"temporaries {row['xla_temporaries_mib']:.0f} MiB")  # fmt: skip
    timed_torch = [n for n in torch_names if n in times]
    row["torch_device_peak_mib"] = torch_reference.device_peak_mib(torch_device)
    if timed_torch and row["torch_device_peak_mib"] is not None:
        print(f"[torch] memory at batch {batch_size}: device peak allocated "
              f"{row['torch_device_peak_mib']:.0f} MiB (tensors of {'+'.join(timed_torch)}; "
              "torch.cuda.max_memory_allocated)")  # fmt: skip
    row["peak_rss_mib"] = peak_rss_mib()
    print(f"peak resident memory: {row['peak_rss_mib']:.0f} MiB (process, after batch "
          f"{batch_size}; holds {'+'.join(times) or 'nothing timed'}; "
          f"{out['rss_before_steps_mib']:.0f} MiB before any step was built)")  # fmt: skip
    return row


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command (other modules import this one)."""
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Experiment config whose network is timed.", lock_config=True
    )
    flags.DEFINE_list("batch_sizes", ["128", "64"], "Train batch sizes to time (replace "
                      "config.batch_size).")  # fmt: skip
    flags.DEFINE_integer("steps", 5, "Timed calls per measurement (the median is reported).")
    flags.DEFINE_enum(
        "framework",
        "all",
        ["all", *FRAMEWORKS],
        "Time all frameworks in turns, or one alone (then the peak resident memory is its own).",
    )
    flags.DEFINE_bool("skip_torch", False, "Do not run the PyTorch eager reference.")
    flags.DEFINE_bool("skip_torch_compile", False, "Do not run the torch.compile reference.")
    flags.DEFINE_bool("skip_layers", False, "Do not print the per-layer table.")
    flags.DEFINE_bool("skip_eval", False, "Do not time eval throughput.")
    flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul peak (compute dtype).")
    flags.DEFINE_float(
        "peak_tflops",
        0.0,
        "Peak TFLOP/s for the fractions; 0 = the datasheet peak of a known GPU "
        f"({', '.join(CHIP_PEAK_TFLOPS)}) for the compute dtype, else the measured matmul peak.",
    )
    flags.DEFINE_enum(
        "kernels",
        "auto",
        list(tuning.KERNEL_CHOICES),
        "How the model computes its operations: the backend's choice, model.py's plain forms, "
        "or the CPU schedules (alexnet_jax/tuning.py).",
    )
    flags.DEFINE_string(
        "kernel_options",
        None,
        "tuning.KernelOptions as NAME=VALUE,... (e.g. lrn=compute_dtype,tower_convs=grouped,"
        f"pad_input_channels=8; accepted: {dict(tuning.KERNEL_OPTION_VALUES)}); unset: the "
        "backend's (tuning.KERNEL_OPTIONS_BY_BACKEND); '' = none.",
    )
    flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")


def main(argv: Sequence[str]) -> int:
    """A bad flag or config value, or a missing path, is one ``error:`` line and exit 2."""
    try:
        frameworks = selected_frameworks(
            FLAGS.framework,
            skip_torch=FLAGS.skip_torch,
            skip_torch_compile=FLAGS.skip_torch_compile,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return command.main(
        argv,
        FLAGS.config,
        lambda: run(
            FLAGS.config,
            [int(b) for b in FLAGS.batch_sizes],
            steps=FLAGS.steps,
            frameworks=frameworks,
            skip_layers=FLAGS.skip_layers,
            skip_eval=FLAGS.skip_eval,
            matmul_size=FLAGS.matmul_size,
            kernels=FLAGS.kernels,
            peak_tflops=FLAGS.peak_tflops,
            kernel_options=FLAGS.kernel_options,
        ),
        FLAGS.json,
    )


if __name__ == "__main__":
    command.launch(define_flags, main)
