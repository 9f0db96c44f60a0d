"""The config schema: each field once, with its default, what it accepts and what it does.

Experiment files in ``configs/`` start from ``defaults()`` and override what
differs; ``validate`` checks every field against its declaration and names
the first bad one with what it accepts. A field marked ``defines_model``
may not change when a run resumes (``checkpoint`` enforces it), nor may one
marked ``fixed_on_resume`` (it shapes the optimizer state). Adding a
knob means one ``Field`` here and its use where it acts.

    python -m alexnet_jax.config_lib     # every field, its default and what it accepts
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from alexnet_jax import errors


class ConfigError(errors.UsageError, ValueError):
    """A config field holds a value the trainer cannot use."""


@dataclasses.dataclass(frozen=True)
class Accepts:
    """A test on a field's value, and the words that tell a user what passes it."""

    test: Callable[[Any], bool]
    description: str


def one_of(*choices: Any) -> Accepts:
    return Accepts(lambda v: v in choices, f"one of {choices}")


def integer(minimum: int, note: str = "") -> Accepts:
    return Accepts(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
        f"an integer >= {minimum}{note}",
    )


def number(
    low: float, high: float | None = None, *, low_open: bool = False, note: str = ""
) -> Accepts:
    """A number in [low, high) (or (low, high) with ``low_open``; no upper bound without high)."""

    def test(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        above = v > low if low_open else v >= low
        return above and (high is None or v < high)

    left = "(" if low_open else "["
    words = (
        f"a number {'>' if low_open else '>='} {low}"
        if high is None
        else f"a number in {left}{low}, {high})"
    )
    return Accepts(test, words + note)


BOOLEAN = Accepts(lambda v: isinstance(v, bool), "True or False")
ANY_TEXT = Accepts(lambda v: isinstance(v, str), "a string")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str  # Dotted path, e.g. "data.source".
    default: Any
    accepts: Accepts
    doc: str  # One line: what the field does.
    defines_model: bool = False  # The network or what it sees: a resumed run may not change it.
    fixed_on_resume: bool = False  # Shapes the optimizer state: a resumed run may not change it.


def _mesh_shape_ok(v: Any) -> bool:
    return (
        len(v) == 2
        and all(isinstance(d, int) and (d == -1 or d >= 1) for d in v)
        and v[1] in (1, NUM_TOWERS)
    )


def _epochs_ok(v: Any) -> bool:
    return all(e > 0 for e in v) and list(v) == sorted(v)


def _numbers(v: Any, count: int, test: Callable[[float], bool]) -> bool:
    return (
        isinstance(v, tuple | list)
        and len(v) == count
        and all(isinstance(x, int | float) and not isinstance(x, bool) and test(x) for x in v)
    )


def _rgb_mean_ok(v: Any) -> bool:
    return tuple(v) == () or _numbers(v, 3, lambda x: 0 <= x <= 255)


# The variants of model.VARIANTS (a test keeps them equal); only the paper's splits its
# towers over devices.
VARIANTS = ("paper", "torchvision", "bvlc_alexnet", "caffenet")
MIN_CROP_SIZE = 67  # The smallest input whose pool5 keeps one position (conv1 unpadded).


NUM_TOWERS = 2  # The paper's two GPUs; model.NUM_TOWERS (a test keeps them equal).
# The model's layers, input to output (its parameter names; a test keeps them equal).
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _layers_ok(v: Any) -> bool:
    return isinstance(v, tuple | list) and all(x in LAYERS for x in v) and len(set(v)) == len(v)


FIELDS: tuple[Field, ...] = (
    Field("seed", 0, integer(0), "Seeds parameters, dropout and the data order."),
    # Data: where the images come from and what the network sees (alexnet_jax/data/).
    Field(
        "data.source",
        "prepared",
        one_of("demo", "prepared", "tfds"),
        "demo (generated into data.dir), prepared (ArrayRecord from prepare) or tfds.",
    ),
    Field("data.dir", "~/data/imagenet2012_prepared", ANY_TEXT, "The prepared dataset's folder."),
    Field("data.tfds_name", "imagenet2012", ANY_TEXT, "tfds: registered name or a build's dir."),
    Field("data.tfds_data_dir", "", ANY_TEXT, 'tfds: its data_dir ("" = tfds\'s default).'),
    Field(
        "data.tfds_stats_images",
        2000,
        integer(1),
        "tfds: images sampled for the mean image and PCA (cached in data.dir).",
    ),
    Field("data.demo_train_per_class", 300, integer(1), "demo: training images per class."),
    Field("data.demo_val_per_class", 50, integer(1), "demo: validation images per class."),
    Field(
        "data.num_workers",
        -1,
        integer(-1, note=" (-1: auto)"),
        "Worker processes decoding; 0 = in-process; -1 = auto: none on CPU, cores - 1 on GPU/TPU.",
    ),
    Field("data.num_threads", 2, integer(1), "Threads per process, each building whole batches."),
    Field("data.prefetch", 0, integer(0), "Records decoded ahead per process; 0 = two batches."),
    Field(
        "data.input_scale",
        1.0,
        number(0, low_open=True),
        "Multiplies mean-subtracted pixels; the paper feeds 0-255 (1.0).",
        defines_model=True,
    ),
    Field(
        "data.mean_subtraction",
        "image",
        one_of("image", "channel"),
        "image (the paper's mean image) or channel (per-RGB mean).",
        defines_model=True,
    ),
    Field(
        "data.rgb_mean",
        (),
        Accepts(_rgb_mean_ok, "() or three numbers in [0, 255], e.g. (123.675, 116.28, 103.53)"),
        "channel: these RGB means (0-255) instead of the dataset's; () = the dataset's.",
        defines_model=True,
    ),
    Field(
        "data.rgb_std",
        (1.0, 1.0, 1.0),
        Accepts(lambda v: _numbers(v, 3, lambda x: x > 0), "three numbers > 0"),
        "Divides mean-subtracted pixels per RGB channel (torchvision: 255 x its std).",
        defines_model=True,
    ),
    Field(
        "data.crop_size",
        224,
        Accepts(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and MIN_CROP_SIZE <= v <= 256,
            f"an integer in [{MIN_CROP_SIZE}, 256] (the paper 224, Caffe 227)",
        ),
        "Side of the square patch the network sees, cut from the 256x256 image.",
        defines_model=True,
    ),
    Field("data.pca_colour", True, BOOLEAN, "PCA colour augmentation on training images (4.1)."),
    Field(
        "data.pca_stats",
        "prepared",
        one_of("prepared", "paper"),
        "prepared (the dataset's RGB PCA) or paper (published ImageNet constants).",
    ),
    Field(
        "data.pca_std",
        0.1,
        number(0, note=" (the paper: 0.1)"),
        "Standard deviation of the PCA coefficients alpha.",
    ),
    Field("data.dtype", "float32", one_of("float32", "bfloat16"), "Batch image dtype."),
    Field(
        "data.augment_on",
        "auto",
        one_of("auto", "host", "device"),
        "Where crops get mean, colour noise, scale, mirror; auto: device on GPU/TPU.",
    ),
    # Model: the network (alexnet_jax/model.py; every field but conv_chunk_size is AlexNet's).
    Field(
        "model.num_classes",
        1000,
        integer(2),
        "Outputs; must match the dataset's class count.",
        defines_model=True,
    ),
    Field(
        "model.width",
        1.0,
        number(0, low_open=True, note=" (1.0 is the paper's width)"),
        "Multiplies every layer's channel count.",
        defines_model=True,
    ),
    Field(
        "model.init_scheme",
        "paper",
        one_of("paper", "he"),
        "paper (N(0, 0.01), bias 1) or he (variance scaling, bias 0.1).",
        defines_model=True,
    ),
    Field(
        "model.dropout_rate",
        0.5,
        number(0, 1),
        "Dropout on fc6 and fc7 outputs while training.",
        defines_model=True,
    ),
    Field(
        "model.use_lrn",
        True,
        BOOLEAN,
        "Local response normalization after conv1 and conv2 (where the variant has it).",
        defines_model=True,
    ),
    Field(
        "model.variant",
        "paper",
        one_of(*VARIANTS),
        "Which published AlexNet: the paper's two towers, torchvision's, Caffe's two.",
        defines_model=True,
    ),
    Field(
        "model.lrn_convention",
        "auto",
        one_of("auto", "paper", "caffe"),
        "LRN constants: paper (k=2, alpha), caffe (k=1, alpha/n); auto = the variant's.",
        defines_model=True,
    ),
    Field(
        "model.compute_dtype",
        "float32",
        one_of("float32", "bfloat16"),
        "Matmul and conv precision (bfloat16 on GPU/TPU); params stay float32.",
    ),
    Field(
        "model.conv_chunk_size",
        -1,
        integer(-1, note=" (examples per conv chunk; 0 = whole batch; -1 = auto)"),
        "Schedule of conv1-pool5 (same result; alexnet_jax/tuning.py); -1: CPU 8.",
    ),
    # Training length and batches (alexnet_jax/train.py).
    Field("batch_size", 128, integer(1), "Global batch, split over the mesh's data axis."),
    Field("eval_batch_size", 256, integer(1), "Global batch for validation."),
    Field("num_epochs", 90.0, number(0, low_open=True), "Training length in epochs."),
    Field("max_steps", -1, integer(-1), "Stop after this many steps if > 0 (beats num_epochs)."),
    # Fine-tuning: where a new run's parameters come from (alexnet_jax/finetune.py).
    Field(
        "init_from",
        "",
        ANY_TEXT,
        'A trained workdir whose params start a new run (fc8 new if classes differ); "" = none.',
    ),
    Field(
        "init_from_step",
        -1,
        integer(-1, note=" (-1 = its newest usable checkpoint)"),
        "init_from: the checkpoint step to start from.",
    ),
    # Optimizer and learning-rate schedule (alexnet_jax/optim.py).
    Field(
        "optim.name",
        "sgd",
        one_of("sgd", "lars"),
        "sgd (the paper's rule) or lars (big batch).",
        fixed_on_resume=True,
    ),
    Field("optim.learning_rate", 0.01, number(0, low_open=True), "Base learning rate."),
    Field(
        "optim.lr_reference_batch_size",
        0,
        integer(0, note=" (0 = no scaling; else the batch learning_rate is for, e.g. 256)"),
        "> 0: learning_rate is per this batch, scaled linearly with batch_size.",
    ),
    Field(
        "optim.schedule",
        "constant",
        one_of("constant", "plateau", "step", "warmup_cosine"),
        "plateau is the paper's (/10 when validation stops improving).",
    ),
    Field(
        "optim.lr_decay_factor",
        0.1,
        number(0, 1, low_open=True),
        "plateau, step: multiplies the rate per drop.",
    ),
    Field("optim.plateau_patience", 3, integer(1), "plateau: evaluations without a new best."),
    Field("optim.plateau_max_reductions", 3, integer(0), "plateau: at most this many drops."),
    Field(
        "optim.plateau_min_delta", 0.0, number(0), "plateau: a new best must beat the old by it."
    ),
    Field(
        "optim.lr_step_epochs",
        (30, 60, 80),
        Accepts(_epochs_ok, "increasing epochs > 0, e.g. (30, 60, 80)"),
        "step: epochs at which the rate drops.",
    ),
    Field("optim.warmup_epochs", 5.0, number(0), "warmup_cosine: linear warmup, then cosine to 0."),
    Field("optim.momentum", 0.9, number(0, 1), "Momentum of the velocity."),
    Field(
        "optim.lars_trust_coefficient",
        0.001,
        number(0, low_open=True, note=" (0.001 in You et al.)"),
        "lars: a layer's step is this times ||w|| / ||g||.",
    ),
    Field("optim.weight_decay", 5e-4, number(0), "Applied to all weights, as in the paper."),
    Field(
        "optim.weight_decay_on_biases",
        True,
        BOOLEAN,
        "The paper decays biases too.",
        fixed_on_resume=True,
    ),
    Field(
        "optim.frozen_layers",
        (),
        Accepts(_layers_ok, f"a tuple of distinct layer names from {LAYERS}, e.g. ('conv1',)"),
        "Layers whose params never change (and have no optimizer state), for fine-tuning.",
        fixed_on_resume=True,
    ),
    # Devices and hosts (alexnet_jax/sharding.py, launch.py).
    Field(
        "mesh_shape",
        (-1, 1),
        Accepts(
            _mesh_shape_ok,
            f"(data, tower) with positive sizes or -1 and a tower axis of 1 or {NUM_TOWERS}, "
            "e.g. (-1, 1) or (1, 2)",
        ),
        "(data, tower) device mesh; -1 takes the remaining devices.",
    ),
    Field("distributed.initialize", False, BOOLEAN, "Call jax.distributed.initialize first."),
    Field("distributed.coordinator_address", "", ANY_TEXT, '"host:port" of process 0; "" = auto.'),
    Field(
        "distributed.num_processes",
        -1,
        Accepts(lambda v: v == -1 or v >= 1, "-1 (auto-detect) or an integer >= 1"),
        "Processes in the job; -1 = auto-detect.",
    ),
    Field(
        "distributed.process_id",
        -1,
        integer(-1, note=" (-1 = auto-detect)"),
        "This process's index (0 = coordinator); -1 = auto-detect.",
    ),
    Field(
        "distributed.heartbeat_timeout_seconds",
        20,
        integer(1),
        "Seconds without heartbeats before a process counts as dead (JAX's default: 100).",
    ),
    # Diagnostics (alexnet_jax/diagnostics.py).
    Field(
        "diagnostics.stuck_after_steps",
        2000,
        integer(0, note=" (0 = off)"),
        "Warn if the loss is still near chance (ln classes) from this step on.",
    ),
    Field(
        "diagnostics.stuck_loss_margin",
        0.02,
        number(0, 1),
        "Near chance: less than this fraction below ln(num_classes).",
    ),
    Field(
        "diagnostics.stuck_eval_patience",
        5,
        integer(0, note=" (0 = off)"),
        "Warn after this many evaluations without a new best val error.",
    ),
    Field("diagnostics.stop_when_stuck", False, BOOLEAN, "Stop (exit 2) instead of warning."),
    Field(
        "diagnostics.profile_start_step",
        0,
        integer(0, note=" (0 = off)"),
        "Write a jax.profiler trace of steps from this one into workdir/profile.",
    ),
    Field("diagnostics.profile_num_steps", 5, integer(1), "Steps in the profiled window."),
    Field(
        "diagnostics.peak_tflops",
        0.0,
        number(0, note=" (0 = the datasheet peak of a known GPU, else no MFU)"),
        "Per-device peak for the logged model-FLOP utilization (mfu).",
    ),
    # Logging, evaluation, checkpoints (alexnet_jax/train.py, alexnet_jax/checkpoint.py).
    Field("log_every_steps", 50, integer(1), "A progress line (and metrics) this often."),
    Field("eval_every_epochs", 1.0, number(0, low_open=True), "Validation this often (and last)."),
    Field("checkpoint_every_steps", 1000, integer(1), "A checkpoint this often (and at the end)."),
    Field("keep_checkpoints", 3, integer(1), "Latest checkpoints kept (plus the best)."),
)

BY_NAME: Mapping[str, Field] = {f.name: f for f in FIELDS}
MODEL_DEFINING_FIELDS = tuple(f.name for f in FIELDS if f.defines_model)
RESUME_FIXED_FIELDS = tuple(f.name for f in FIELDS if f.defines_model or f.fixed_on_resume)

# Fields that moved: old name -> new name. Old workdirs' saved configs are read with them,
# and an override that uses an old name is told the new one.
RENAMED: Mapping[str, str] = {
    "optimizer": "optim.name",
    **{
        name: f"optim.{name}"
        for name in (
            "learning_rate",
            "lr_reference_batch_size",
            "schedule",
            "lr_decay_factor",
            "plateau_patience",
            "plateau_max_reductions",
            "plateau_min_delta",
            "lr_step_epochs",
            "warmup_epochs",
            "momentum",
            "lars_trust_coefficient",
            "weight_decay",
            "weight_decay_on_biases",
        )
    },
}


def defaults() -> ml_collections.ConfigDict:
    """Every field at its default; an experiment config overrides what differs."""
    config = ml_collections.ConfigDict()
    for f in FIELDS:
        *parents, leaf = f.name.split(".")
        node = config
        for p in parents:
            if p not in node:
                node[p] = ml_collections.ConfigDict()
            node = node[p]
        node[leaf] = f.default
    return config


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 1}} -> {"model.width": 1}; tuples become lists (as in JSON)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def upgrade(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flattened config saved by an older version, with moved fields under their new names."""
    return {RENAMED.get(name, name): value for name, value in flat.items()}


def from_saved(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A config saved with a run (JSON), on today's defaults.

    Moved fields are read under their new names; fields added since take their
    defaults (which reproduce the old behaviour); fields since removed are dropped.
    """
    config = defaults()
    known = flatten(config.to_dict())
    config.update_from_flattened_dict(
        {
            k: tuple(v) if isinstance(known[k], tuple) else v
            for k, v in upgrade(flatten(saved)).items()
            if k in known
        }
    )
    return config


def _fail(field: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"config.{field} = {value!r} is not valid: expected {accepted}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first field outside its accepted values."""
    flat = flatten(config.to_dict())
    for f in FIELDS:
        value = flat[f.name]
        checked = tuple(value) if isinstance(value, list) else value
        if not f.accepts.test(checked):
            _fail(f.name, checked, f.accepts.description)
    if config.model.variant != "paper" and config.mesh_shape[1] != 1:
        _fail(
            "mesh_shape",
            tuple(config.mesh_shape),
            f"a tower axis of 1 for model.variant = {config.model.variant!r} (only the "
            "paper's variant splits its towers over devices), e.g. (-1, 1)",
        )
    if tuple(config.data.rgb_mean) and config.data.mean_subtraction != "channel":
        _fail(
            "data.rgb_mean",
            tuple(config.data.rgb_mean),
            '() unless data.mean_subtraction = "channel" (fixed means replace the dataset\'s '
            "per-channel mean)",
        )
    if config.init_from_step != -1 and not config.init_from:
        _fail(
            "init_from_step",
            config.init_from_step,
            "-1 unless config.init_from names the workdir to start from",
        )
    d = config.distributed
    if d.process_id != -1 and d.process_id >= max(d.num_processes, 1):
        _fail(
            "distributed.process_id",
            d.process_id,
            "-1 (auto-detect) or an integer in [0, distributed.num_processes)",
        )


def describe() -> str:
    """The schema as a table: what ``python -m alexnet_jax.config_lib`` prints."""
    width = max(len(f.name) for f in FIELDS)
    lines = []
    for f in FIELDS:
        mark = "  [defines the model]" if f.defines_model else ""
        mark += "  [fixed on resume]" if f.fixed_on_resume else ""
        lines.append(f"{f.name:<{width}}  = {f.default!r}\n{'':<{width}}    {f.doc}{mark}")
        lines.append(f"{'':<{width}}    accepts {f.accepts.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
    sys.exit(0)
