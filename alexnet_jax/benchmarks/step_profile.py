"""Where the train step's time goes: a ``jax.profiler`` trace of it and its top operations.

    python -m alexnet_jax.benchmarks.step_profile --config=configs/imagenet.py \
        --config.model.compute_dtype=bfloat16 --config.diagnostics.profile_start_step=4 \
        --config.diagnostics.profile_num_steps=5 --batch_size=512 --workdir=/tmp/step_profile

The trainer's step (``train_step.jax_train_step``) runs until the profiled
window is over; ``diagnostics.ProfilerWindow`` traces the steps
``config.diagnostics.profile_start_step`` .. + ``profile_num_steps`` - 1
into WORKDIR/profile, as a training run with those fields does (open it with
TensorBoard or xprof for the timeline). The trace is then read back
(``jax.profiler.ProfileData``) and the XLA operations that took the most time
are printed, each with its share of the traced operations' time, its time
per step, and what it computes: the JAX operation and source line XLA
recorded for it (the compiled HLO's metadata). Times come from the device's
lines where the trace has a device (GPU kernels, TPU ops), else from
XLA:CPU's threads (summed over threads, so shares, not wall time).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from alexnet_jax import config_lib, diagnostics, tuning
from alexnet_jax.benchmarks import command, train_step

DEFAULT_START_STEP = 4  # When config.diagnostics.profile_start_step is 0 (off): after warm-up.
# The compiled module's text: computation headers, instructions, their metadata and callees.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s+=\s")
_METADATA = re.compile(r"metadata=\{([^}]*)\}")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_META_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One XLA operation's time in the trace."""

    name: str
    total_ns: float
    count: int


def _stats(event) -> dict[str, Any]:
    try:
        return dict(event.stats)
    except Exception:  # noqa: BLE001 - a stat of a type the reader cannot convert.
        return {}


def _op_key(name: str) -> str:
    """An HLO instruction's name from an event's ("%fusion.3 = ..." or "fusion.3")."""
    return name.split(" = ", 1)[0].strip().lstrip("%")


def _timed_events(profile) -> tuple[list[tuple[str, float]], str]:
    """(op name, duration ns) of every XLA operation event, and which lines they came from.

    Device planes' "XLA Ops" lines if any; else their other lines' events
    (GPU kernels, named by their ``hlo_op`` stat where present); else host
    events that carry an ``hlo_op`` stat (XLA:CPU's thunks).
    """
    device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
    ops_lines, kernels = [], []
    for plane in device_planes:
        for line in plane.lines:
            if line.name == "XLA Ops":
                ops_lines += [(_op_key(e.name), e.duration_ns) for e in line.events]
            elif not line.name.startswith("XLA"):  # Streams: the kernels themselves.
                for e in line.events:
                    kernels.append((_stats(e).get("hlo_op") or e.name, e.duration_ns))
    if ops_lines:
        return ops_lines, "device XLA Ops lines"
    if kernels:
        return kernels, "device kernels"
    host = []
    for plane in profile.planes:
        for line in plane.lines:
            for e in line.events:
                op = _stats(e).get("hlo_op")
                if op:
                    host.append((str(op), e.duration_ns))
    return host, "host threads (XLA:CPU thunks)"


def top_ops(events: Iterable[tuple[str, float]]) -> list[OpTime]:
    """Per-op totals, most time first."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for name, duration in events:
        totals[name][0] += float(duration)
        totals[name][1] += 1
    ops = [OpTime(name, total, count) for name, (total, count) in totals.items()]
    return sorted(ops, key=lambda op: -op.total_ns)


def _source_locations(hlo_text: str) -> dict[str, str]:
    """{stack frame id: "file:line (function)"} from the module's stack-frame tables."""
    tables: dict[str, dict[str, str]] = collections.defaultdict(dict)
    section = ""
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif not line.strip() or not line[0].isdigit():
            section = "" if not line.strip() or line.startswith(("%", "ENTRY")) else section
        elif section:
            key, _, value = line.partition(" ")
            tables[section][key] = value.strip().strip('"')

    def fields(text: str) -> dict[str, str]:
        return dict(_META_FIELD.findall(text.strip("{}")))

    located = {}
    for frame, text in tables["StackFrames"].items():
        location = fields(tables["FileLocations"].get(fields(text).get("file_location_id"), ""))
        file = tables["FileNames"].get(location.get("file_name_id", ""), "?")
        function = tables["FunctionNames"].get(location.get("function_name_id", ""), "?")
        located[frame] = f"{os.path.basename(file)}:{location.get('line', '?')} ({function})"
    return located


def hlo_metadata(hlo_text: str) -> dict[str, dict[str, str]]:
    """{instruction: {"op_name", "source", "fused"}} of the compiled module's instructions.

    ``source`` is file:line (function) from the instruction's metadata;
    a fusion without metadata of its own takes its fused computation's, and
    ``fused`` lists the JAX operations fused into it.
    """
    locations = _source_locations(hlo_text)
    own: dict[str, dict[str, str]] = {}
    calls: dict[str, str] = {}
    body: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    computation = ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header["name"]
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        meta = _METADATA.search(line)
        fields = dict(_META_FIELD.findall(meta[1])) if meta else {}
        fields = {k: v.strip('"') for k, v in fields.items()}
        if "source_file" in fields:
            source = f"{os.path.basename(fields['source_file'])}:{fields.get('source_line', '?')}"
        else:
            source = locations.get(fields.get("stack_frame_id", ""), "")
        entry = {"op_name": fields.get("op_name", ""), "source": source}
        own[match["name"]] = entry
        body[computation].append(entry)
        called = _CALLS.search(line)
        if called:
            calls[match["name"]] = called[1]
    found = {}
    for name, entry in own.items():
        inner = [e for e in body.get(calls.get(name, ""), []) if e["op_name"]]
        fused = list(dict.fromkeys(e["op_name"].rsplit("/", 1)[-1] for e in inner))
        if not entry["op_name"] and inner:
            entry = dict(inner[-1])  # The root's, or the last one with metadata.
        found[name] = {**entry, "fused": ", ".join(fused)}
    return found


def describe_op(metadata: dict[str, str] | None, width: int = 80) -> str:
    """What an operation computes: its JAX op path (tail), fused operations, source line."""
    if not metadata:
        return ""
    text = metadata.get("op_name", "")
    if len(text) > width:
        text = "..." + text[-(width - 3) :]
    if metadata.get("fused"):
        text += f" {{{metadata['fused'][:width]}}}"
    if metadata.get("source"):
        text += f" [{metadata['source']}]"
    return text


def trace_file(profile_dir: str) -> str:
    """The newest ``*.xplane.pb`` under ``profile_dir``."""
    files = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {profile_dir}: the trace was not written")
    return max(files, key=os.path.getmtime)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    top: int = 25,
    kernel_options: str | None = None,
) -> dict[str, Any]:
    """Profiles the config's train step, prints its top operations, returns them."""
    import jax

    config_lib.validate(config)
    start = config.diagnostics.profile_start_step or DEFAULT_START_STEP
    count = config.diagnostics.profile_num_steps
    options = None if kernel_options is None else tuning.parse_kernel_options(kernel_options)
    step = train_step.jax_train_step(config, options=options)
    m = config.model
    print(f"jax {jax.__version__} on {jax.devices()}; variant {m.variant}, width {m.width}, "
          f"compute {m.compute_dtype}, batch {config.batch_size}, kernel options "
          f"{(options or tuning.backend_options()).describe() or 'none'}; "
          f"compiled in {step.compile_s:.1f} s")  # fmt: skip
    window = diagnostics.ProfilerWindow(workdir, start, count)
    outputs = None
    for number in range(1, start + count):
        if number == start:  # The window holds its own steps only.
            jax.block_until_ready(outputs)
        window.before_step(number)
        outputs = step.dispatch(step.batch)
        window.after_step(number, outputs)
    window.close()
    path = trace_file(window.directory)
    profile = jax.profiler.ProfileData.from_file(path)
    events, source = _timed_events(profile)
    ops = top_ops(events)
    total = sum(op.total_ns for op in ops) or 1.0
    metadata = hlo_metadata(step.compiled.as_text())
    print(f"trace: {path}")
    print(f"{len(ops)} operations, {total / 1e6 / count:.2f} ms per step in them "
          f"(from {source}; steps {start}-{start + count - 1})")  # fmt: skip
    print(f"  {'share':>6} {'ms/step':>8} {'calls':>6}  {'operation':<28} what it computes")
    rows = []
    for op in ops[:top]:
        share, per_step = op.total_ns / total, op.total_ns / 1e6 / count
        what = describe_op(metadata.get(op.name))
        rows.append({"op": op.name, "share": share, "ms_per_step": per_step,
                     "calls_per_step": op.count / count, "what": what})  # fmt: skip
        print(f"  {100 * share:>5.1f}% {per_step:>8.3f} {op.count / count:>6.1f}  "
              f"{op.name:<28} {what}")  # fmt: skip
    shown = sum(r["share"] for r in rows)
    print(f"  (the top {len(rows)} hold {100 * shown:.1f}% of the operations' time)")
    return {"trace": path, "source": source, "ms_per_step": total / 1e6 / count, "top": rows}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a command."""
    config_flags.DEFINE_config_file(
        "config", train_step.DEFAULT_CONFIG, "Experiment config whose step is profiled.",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_integer("batch_size", 128, "Train batch size (replaces config.batch_size).")
    flags.DEFINE_string("workdir", None, "The trace goes to WORKDIR/profile.", required=True)
    flags.DEFINE_integer("top", 25, "Operations to print.")
    flags.DEFINE_string(
        "kernel_options", None, "tuning.KernelOptions text (unset: the backend's; '' = none)."
    )
    flags.DEFINE_string("json", "", "Also write the top operations to this JSON file.")


def main(argv: Sequence[str]) -> int:
    """A bad flag or config value is one ``error:`` line and exit 2."""
    config = train_step.with_batch_size(FLAGS.config, FLAGS.batch_size)
    options = FLAGS.kernel_options
    measure = functools.partial(run, config, FLAGS.workdir, top=FLAGS.top, kernel_options=options)
    return command.main(argv, FLAGS.config, measure, FLAGS.json)


if __name__ == "__main__":
    command.launch(define_flags, main)
