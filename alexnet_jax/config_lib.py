"""Checks a config before anything runs, naming the bad field and what it accepts."""

from __future__ import annotations

import ml_collections

from alexnet_jax import model, optim
from alexnet_jax.data import pipeline

DATA_SOURCES = ("demo", "prepared", "tfds")
COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field holds a value the trainer cannot use."""


def _check(ok: bool, field: str, value, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field} = {value!r} is not valid: expected {accepted}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first field outside its accepted values."""
    c = config
    _check(c.data.source in DATA_SOURCES, "data.source", c.data.source, f"one of {DATA_SOURCES}")
    _check(c.data.num_workers >= 0, "data.num_workers", c.data.num_workers, "an integer >= 0")
    _check(c.data.num_threads >= 1, "data.num_threads", c.data.num_threads, "an integer >= 1")
    _check(c.data.input_scale > 0, "data.input_scale", c.data.input_scale, "a number > 0")
    _check(c.data.prefetch >= 0, "data.prefetch", c.data.prefetch, "an integer >= 0")
    _check(
        c.data.tfds_stats_images >= 1,
        "data.tfds_stats_images",
        c.data.tfds_stats_images,
        "an integer >= 1",
    )
    for f, accepted in (
        ("mean_subtraction", pipeline.MEAN_SUBTRACTION_MODES),
        ("pca_stats", pipeline.PCA_STATS_SOURCES),
        ("dtype", pipeline.DTYPES),
    ):
        _check(c.data[f] in accepted, f"data.{f}", c.data[f], f"one of {accepted}")
    _check(c.data.pca_std >= 0, "data.pca_std", c.data.pca_std, "a number >= 0 (the paper: 0.1)")
    for f in ("demo_train_per_class", "demo_val_per_class"):
        _check(c.data[f] >= 1, f"data.{f}", c.data[f], "an integer >= 1")
    m = c.model
    _check(m.num_classes >= 2, "model.num_classes", m.num_classes, "an integer >= 2")
    _check(m.width > 0, "model.width", m.width, "a number > 0 (1.0 is the paper's width)")
    _check(
        m.init_scheme in model.INIT_SCHEMES,
        "model.init_scheme",
        m.init_scheme,
        f"one of {model.INIT_SCHEMES}",
    )
    _check(0 <= m.dropout_rate < 1, "model.dropout_rate", m.dropout_rate, "a number in [0, 1)")
    _check(
        m.compute_dtype in COMPUTE_DTYPES,
        "model.compute_dtype",
        m.compute_dtype,
        f"one of {COMPUTE_DTYPES}",
    )
    _check(
        m.conv_chunk_size >= -1,
        "model.conv_chunk_size",
        m.conv_chunk_size,
        "an integer >= 0 (examples per conv chunk; 0 = whole batch) or -1 (auto)",
    )
    _check(c.batch_size >= 1, "batch_size", c.batch_size, "an integer >= 1")
    _check(c.eval_batch_size >= 1, "eval_batch_size", c.eval_batch_size, "an integer >= 1")
    _check(c.num_epochs > 0, "num_epochs", c.num_epochs, "a number > 0")
    _check(c.learning_rate > 0, "learning_rate", c.learning_rate, "a number > 0")
    _check(c.schedule in optim.SCHEDULES, "schedule", c.schedule, f"one of {optim.SCHEDULES}")
    _check(0 < c.lr_decay_factor < 1, "lr_decay_factor", c.lr_decay_factor, "a number in (0, 1)")
    _check(c.plateau_patience >= 1, "plateau_patience", c.plateau_patience, "an integer >= 1")
    _check(
        c.plateau_max_reductions >= 0,
        "plateau_max_reductions",
        c.plateau_max_reductions,
        "an integer >= 0",
    )
    _check(c.plateau_min_delta >= 0, "plateau_min_delta", c.plateau_min_delta, "a number >= 0")
    _check(
        all(e > 0 for e in c.lr_step_epochs) and list(c.lr_step_epochs) == sorted(c.lr_step_epochs),
        "lr_step_epochs",
        c.lr_step_epochs,
        "increasing epochs > 0, e.g. (30, 60, 80)",
    )
    _check(c.warmup_epochs >= 0, "warmup_epochs", c.warmup_epochs, "a number >= 0")
    _check(0 <= c.momentum < 1, "momentum", c.momentum, "a number in [0, 1)")
    _check(c.optimizer in optim.OPTIMIZERS, "optimizer", c.optimizer, f"one of {optim.OPTIMIZERS}")
    _check(
        c.lars_trust_coefficient > 0,
        "lars_trust_coefficient",
        c.lars_trust_coefficient,
        "a number > 0 (0.001 in You et al.)",
    )
    _check(
        c.lr_reference_batch_size >= 0,
        "lr_reference_batch_size",
        c.lr_reference_batch_size,
        "0 (no scaling) or the batch size learning_rate refers to, e.g. 256",
    )
    _check(c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    _check(
        len(c.mesh_shape) == 2 and all(d == -1 or d >= 1 for d in c.mesh_shape),
        "mesh_shape",
        c.mesh_shape,
        "(data, tower) with positive sizes or -1, e.g. (-1, 1) or (1, 2)",
    )
    _check(
        c.mesh_shape[1] in (1, model.NUM_TOWERS),
        "mesh_shape",
        c.mesh_shape,
        f"a tower axis of 1 or {model.NUM_TOWERS}",
    )
    d = c.distributed
    _check(
        d.num_processes == -1 or d.num_processes >= 1,
        "distributed.num_processes",
        d.num_processes,
        "-1 (auto-detect) or an integer >= 1",
    )
    _check(
        d.process_id == -1 or 0 <= d.process_id < max(d.num_processes, 1),
        "distributed.process_id",
        d.process_id,
        "-1 (auto-detect) or an integer in [0, distributed.num_processes)",
    )
    for f in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _check(c[f] >= 1, f, c[f], "an integer >= 1")
    _check(c.eval_every_epochs > 0, "eval_every_epochs", c.eval_every_epochs, "a number > 0")
