"""Checkpoints that survive crashes, preemption and a damaged disk (orbax + grain).

A checkpoint step holds three items: ``state`` (the whole train state:
params, optimizer state, step, RNG, schedule state), ``data_iter`` (the grain
iterator position) and ``config`` (the run's config as JSON). Saving is
asynchronous. Kept: the last ``keep`` steps and the step with the lowest
validation top-1 error.

Also here: the check that a relaunch does not change the model (the fields
``config_lib`` marks as defining it). Each saved state carries a per-leaf
fingerprint, checked on restore: orbax notices missing or truncated files,
but not a flipped byte inside an array's data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax import config_lib, errors
from alexnet_jax.data import pipeline

BEST_METRIC = "val_top1_error"
T = TypeVar("T")
QUARANTINE_DIR = "checkpoints_unusable"


class NoUsableCheckpointError(errors.NoCheckpointError, RuntimeError):
    """The workdir holds checkpoints but none of them can be restored."""


class CheckpointSaveError(errors.RunStoppedError, RuntimeError):
    """A background save failed (e.g. the disk is full): training must stop, cleanly.

    ``reason`` is what failed, in one line (the training loop tells a save whose
    collective failed because a process of the job is gone by it).
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class ConfigMismatchError(config_lib.ConfigError):
    """A relaunch changes config fields that define the model."""


class ParamsOnlyCheckpointError(config_lib.ConfigError):
    """A workdir of weights alone (``import_weights``): no training state to resume."""


class OlderIteratorStateError(errors.UsageError):
    """A checkpoint whose data iterator state an older alexnet_jax wrote."""


def _best_metric(metrics: Mapping[str, float]) -> float:
    value = metrics.get(BEST_METRIC) if metrics else None
    return math.inf if value is None else float(value)


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def model_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields a resume must keep whose values differ, as "field: saved -> current" lines.

    Those are the model-defining fields and those that shape the optimizer
    state (``config_lib.RESUME_FIXED_FIELDS``). An optimizer-state field that
    a checkpoint's version did not have yet counts as its default (what that run used).
    """
    defaults = config_lib.flatten(config_lib.defaults().to_dict())
    old = {
        **{f.name: defaults[f.name] for f in config_lib.FIELDS if f.fixed_on_resume},
        **config_lib.upgrade(config_lib.flatten(saved)),
    }
    new = config_lib.flatten(current)
    return [
        f"config.{name}: {old[name]!r} in the checkpoint, {new[name]!r} now"
        for name in config_lib.RESUME_FIXED_FIELDS
        if name in old and name in new and old[name] != new[name]
    ]


@jax.jit
def _leaf_fingerprints(state: Any) -> list[jax.Array]:
    """One uint32 per leaf that changes whenever any bit of any element changes.

    Each element's bits are mixed and multiplied by an odd, position-dependent
    number; the products are summed modulo 2**32. A change to a single element
    therefore always changes the sum. Computed on device, once per save.
    """

    def one(x):
        x = jnp.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            bits = x.astype(jnp.uint32)
        elif x.dtype.itemsize == 4:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize in (1, 2):
            uint = jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16
            bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)
        else:  # 8-byte types: fold both halves.
            halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
            bits = halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B1))
        bits = bits.reshape(-1)
        position = jnp.arange(bits.size, dtype=jnp.uint32)
        multiplier = (position * jnp.uint32(2654435761)) | jnp.uint32(1)
        return jnp.sum((bits ^ (bits >> 15)) * multiplier, dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(state)]


def state_fingerprint(state: Any) -> dict[str, int]:
    """{leaf path: fingerprint}; saved with each checkpoint and checked on restore."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    # Replicated scalars: any local copy holds the value (also with several processes).
    values = [np.asarray(v.addressable_data(0)) for v in _leaf_fingerprints(state)]
    return {p: int(v) for p, v in zip(paths, values, strict=True)}


class CorruptCheckpointError(RuntimeError):
    """A restored checkpoint's contents differ from what was saved."""


def first_usable(
    steps: Sequence[int],
    attempt: Callable[[int], T],
    directory: str,
    *,
    reraise: tuple[type[BaseException], ...] = (),
    advice: str,
) -> tuple[int, T, list[tuple[int, str]]]:
    """(step, attempt(step), failures) for the first of ``steps`` whose attempt succeeds.

    The one fallback rule, for training and for the tools: a step that fails
    (any error but ``reraise``) is skipped with a warning naming it, and the
    next tried; if none succeeds, NoUsableCheckpointError lists each step and
    why, then ``advice``. ``failures`` are the skipped (step, reason) pairs.
    """
    failures: list[tuple[int, str]] = []
    for i, step in enumerate(steps):
        try:
            return step, attempt(step), failures
        except reraise:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable.
            reason = " ".join(str(e).split(" See full TensorStore details")[0].split())
            failures.append((step, f"{type(e).__name__}: {reason[:300]}"))
            logging.warning(
                "Checkpoint at step %d in %s could not be restored (%s)%s",
                step,
                directory,
                failures[-1][1],
                "; trying the previous one" if i + 1 < len(steps) else "",
            )
    details = "\n  ".join(f"step {s}: {why}" for s, why in failures)
    raise NoUsableCheckpointError(
        f"No checkpoint in {directory} could be restored:\n  {details}\n{advice}"
    )


def finished_steps(directory: str) -> list[int]:
    """Steps whose checkpoint under ``directory`` is committed (orbax renames it when done).

    Read from the disk alone, so it holds when a save is still in flight or can
    no longer finish (a process of the job is gone).
    """
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def resume_note(directory: str, relaunch: str = "a relaunch") -> str:
    """Where ``relaunch`` resumes from, in words: the newest committed step under ``directory``."""
    steps = finished_steps(directory)
    if not steps:
        return f"No checkpoint was committed in {directory}: {relaunch} starts from scratch."
    return (
        f"The newest committed checkpoint is step {steps[-1]} ({directory}/{steps[-1]}); "
        f"{relaunch} resumes from it."
    )


class Checkpointer:
    """Saves and restores state + data iterator + config; see the module docstring."""

    def __init__(
        self, workdir: str, *, save_every_steps: int = 1, keep: int = 1, read_only: bool = False
    ):
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.directory = os.path.join(self.workdir, "checkpoints")
        best = ocp.checkpoint_managers.BestN(
            get_metric_fn=_best_metric,
            reverse=True,  # Sorted by decreasing error: the last (kept) one is the lowest.
            n=1,
            keep_checkpoints_without_metrics=False,
        )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                [
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_every_steps),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [ocp.checkpoint_managers.LatestN(keep), best]
            ),
            best_fn=_best_metric,  # Makes orbax store each step's metrics beside it.
            best_mode="min",
            enable_async_checkpointing=True,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data_iter", "config", "fingerprint"),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest validation top-1 error among those saved with metrics."""
        scored = [(s, _best_metric(self.manager.metrics(s) or {})) for s in self.all_steps()]
        scored = [(err, s) for s, err in scored if math.isfinite(err)]
        return min(scored)[1] if scored else None

    def should_save(self, step: int) -> bool:
        """Whether the interval (or a multi-process preemption) asks for a save at ``step``."""
        return self.manager.should_save(step)

    def maybe_save(
        self,
        step: int,
        state: Any,
        data_iter: pipeline.BatchIterator,
        *,
        config: ml_collections.ConfigDict,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves (in the background) if the interval says so or ``force``; returns whether it did.

        ``metrics`` (e.g. {"val_top1_error": 0.4}) rank the step for best-checkpoint keeping.
        """
        if not force and not self.manager.should_save(step):
            return False
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data_iter=grain.checkpoint.CheckpointSave(data_iter),
                    config=ocp.args.JsonSave(config_to_json(config)),
                    fingerprint=ocp.args.JsonSave(state_fingerprint(state)),
                ),
                metrics=dict(metrics or {}),  # {}: not ranked (never "best"), and no orbax warning.
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - a failed earlier save surfaces here too.
            raise self._save_error(e) from None
        if saved:
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def save_params(self, step: int, params: Any, *, config: ml_collections.ConfigDict) -> None:
        """Params alone (no optimizer or iterator state) with their config; waits until written.

        For weights made elsewhere (``import_weights``): every tool reads them
        with ``restore_params``, checked against the same per-leaf fingerprint.
        """
        state = {"params": params}
        # Keyed as a TrainState's paths (".params['conv1']..."), which restore_params checks.
        fingerprint = {
            ".params" + k[len("['params']") :]: v for k, v in state_fingerprint(state).items()
        }
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(config_to_json(config)),
                    fingerprint=ocp.args.JsonSave(fingerprint),
                ),
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise several types.
            reason = " ".join(str(e).split())[:300]
            raise CheckpointSaveError(f"Saving to {self.directory} failed: {reason}") from None

    def holds_params_only(self, step: int) -> bool:
        """Whether ``step`` was written by ``save_params`` (from its fingerprint, no arrays)."""
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())
            )
        except Exception:  # noqa: BLE001 - unreadable: the full restore reports it.
            return False
        keys = restored.fingerprint or {}
        return bool(keys) and all(k.startswith(".params") for k in keys)

    def saved_config(self, step: int) -> dict[str, Any]:
        """The config JSON saved with ``step``."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def restore(
        self, step: int, abstract_state: Any, data_iter: pipeline.BatchIterator | None = None
    ) -> Any:
        """Restores the state (with ``abstract_state``'s shardings) and, if given, the iterator.

        Raises CorruptCheckpointError when the restored arrays do not match the
        fingerprint saved with them (flipped or overwritten bytes that the
        file format itself does not notice).
        """
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "fingerprint": ocp.args.JsonRestore(),
        }
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        expected, actual = restored.fingerprint, state_fingerprint(restored.state)
        bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        if bad:
            raise CorruptCheckpointError(
                f"restored arrays differ from what was saved at step {step}: {', '.join(bad[:5])}"
            )
        return restored.state

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only ``state.params`` of ``step`` (for inference), checked like ``restore``.

        ``abstract_params`` gives shapes, dtypes and shardings (ShapeDtypeStructs).
        Reads nothing of the optimizer or schedule state.
        """
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                        {"params": abstract_params}
                    ),
                    partial_restore=True,
                ),
                fingerprint=ocp.args.JsonRestore(),
            ),
        )
        params = restored.state["params"]
        expected = {k: v for k, v in restored.fingerprint.items() if k.startswith(".params")}
        # The saved keys are TrainState paths (".params['conv1']..."); match them.
        prefix = len("['params']")
        actual = {
            ".params" + k[prefix:]: v for k, v in state_fingerprint({"params": params}).items()
        }
        bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
        if bad:
            raise CorruptCheckpointError(
                f"restored params differ from what was saved at step {step}: {', '.join(bad[:5])}"
            )
        return params

    def restore_latest_usable(
        self,
        abstract_state: Any,
        data_iter: pipeline.BatchIterator | None,
        config: ml_collections.ConfigDict,
    ) -> tuple[int, Any] | None:
        """(step, state) from the newest checkpoint that restores; None if there are none.

        A checkpoint that cannot be read is skipped with a warning and the
        previous one tried; once one restores, the unreadable newer ones are
        moved to ``checkpoints_unusable/`` so later saves can reuse their
        step numbers. If none restores, nothing is moved and
        NoUsableCheckpointError says what failed: the run never starts over
        silently. A model-changing config difference raises
        ConfigMismatchError at once.
        """
        current = config_to_json(config)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None

        def attempt(step: int) -> Any:
            if self.holds_params_only(step):
                raise ParamsOnlyCheckpointError(
                    f"The checkpoint at step {step} in {self.directory} holds weights alone "
                    "(imported, no optimizer or data state), so training cannot resume it. "
                    "Train from those weights in a new workdir: python launch.py "
                    f"--config=configs/finetune.py --config.init_from={self.workdir} "
                    f"--config.init_from_step={step} --workdir=NEW_DIR"
                )
            changes = model_config_changes(self.saved_config(step), current)
            if changes:
                raise ConfigMismatchError(
                    "The config changes fields that define the model (or its optimizer state), "
                    "relative to the checkpoint "
                    f"at step {step} in {self.directory}:\n  "
                    + "\n  ".join(changes)
                    + "\nKeep the checkpoint's values, or train the new model in another --workdir."
                )
            try:
                return self.restore(step, abstract_state, data_iter)
            except pipeline.IteratorStateError as e:
                raise OlderIteratorStateError(
                    f"The checkpoint at step {step} in {self.directory}: {e}. Finish that run "
                    "with the alexnet_jax it was started with, or train from its weights in a "
                    f"new workdir: python launch.py --config=<its config> --config.init_from="
                    f"{self.workdir} --config.init_from_step={step} --workdir=NEW_DIR"
                ) from None

        step, state, failures = first_usable(
            steps,
            attempt,
            self.directory,
            reraise=(ConfigMismatchError, ParamsOnlyCheckpointError, OlderIteratorStateError),
            advice="Move the directory away to start a new run, or fix the files.",
        )
        for bad_step, _ in failures:
            self._quarantine(bad_step)
        if failures:
            self.manager.reload()
            logging.warning(
                "Fell back to the checkpoint at step %d; unusable newer steps %s moved to %s",
                step,
                [s for s, _ in failures],
                os.path.join(self.workdir, QUARANTINE_DIR),
            )
        return step, state

    def _quarantine(self, step: int) -> None:
        source = os.path.join(self.directory, str(step))
        if not os.path.exists(source):
            return
        target_dir = os.path.join(self.workdir, QUARANTINE_DIR)
        os.makedirs(target_dir, exist_ok=True)
        shutil.move(source, os.path.join(target_dir, f"{step}-{int(time.time())}"))

    def wait(self) -> None:
        """Blocks until background saves are done; CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(e) from None

    def check_saves(self) -> None:
        """Raises CheckpointSaveError if a background save has failed; call at step boundaries.

        Without it, orbax reports a failed async save only when the next save
        starts, up to ``checkpoint_every_steps`` later.
        """
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise several types.
            raise self._save_error(e) from None

    def finished_steps(self) -> list[int]:
        """Steps whose checkpoint directory is complete on disk (orbax renames it when done)."""
        return finished_steps(self.directory)

    def _save_error(self, error: Exception) -> CheckpointSaveError:
        reason = " ".join(str(error).split())
        if "os_error_code='28'" in reason or "No space left" in reason:
            reason = "no space left on the device (OSError ENOSPC)"
        reason = reason[:300]
        good = self.finished_steps()
        last = (
            f"The last complete checkpoint is step {good[-1]} ({self.directory}/{good[-1]}); a "
            "relaunch of the same command resumes from it."
            if good
            else "No checkpoint was completed: a relaunch starts from scratch."
        )
        return CheckpointSaveError(
            f"Saving a checkpoint to {self.directory} failed, so training stopped: {reason}. "
            f"{last} Free space or fix the directory first.",
            reason,
        )

    def close(self) -> None:
        self.manager.close()
