"""Telling a user what is wrong with a run: a stuck-training guard and a profiler window.

A run whose training loss stays at chance (ln of the class count) for many
steps, or whose validation error stops improving, is usually one of a few
known mistakes; the guard names them and the config fields to change.
"""

from __future__ import annotations

import math
import os

import jax
from absl import logging

from alexnet_jax import errors, flops

STUCK_CAUSES = (
    "likely causes: the paper's init (config.model.init_scheme='paper': N(0, 0.01) weights "
    "and bias 1 sit at chance for a long time from scratch; 'he' learns at once), a learning "
    "rate too high or too low (config.optim.learning_rate), or labels that do not match the "
    "images (check config.data.dir)"
)


class NotFiniteError(errors.RunStoppedError, FloatingPointError):
    """The loss or the parameters became NaN or inf: the run stops with its last good checkpoint."""


class StuckError(errors.RunStoppedError, RuntimeError):
    """Training stopped because it is stuck (``config.diagnostics.stop_when_stuck``)."""


class StuckGuard:
    """Warns once when the loss stays near chance, or validation stops improving.

    ``after_steps``: the loss (mean of a log window) is checked from this step on;
    "near chance" means less than ``margin`` (a fraction) below ln(num_classes), or
    above it (a net at chance fluctuates around ln K).
    ``eval_patience``: evaluations in a row without a new best validation error.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        after_steps: int,
        margin: float,
        eval_patience: int,
        stop: bool,
    ):
        self.chance_loss = math.log(num_classes)
        self.after_steps, self.margin = after_steps, margin
        self.eval_patience, self.stop = eval_patience, stop
        self.best_error, self.evals_since_best = math.inf, 0
        self.warned: list[str] = []

    def _report(self, message: str) -> str:
        if self.stop:
            raise StuckError(f"{message}; stopping (config.diagnostics.stop_when_stuck)")
        if message.split(":")[0] not in (w.split(":")[0] for w in self.warned):
            logging.warning("%s", message)
            self.warned.append(message)
        return message

    def observe_loss(self, step: int, loss: float) -> str | None:
        if self.after_steps <= 0 or step < self.after_steps:
            return None
        if loss > (1 - self.margin) * self.chance_loss:
            return self._report(
                f"Training looks stuck: the loss is {loss:.4f} at step {step}, not "
                f"{100 * self.margin:.0f}% below chance (ln {round(math.exp(self.chance_loss))} = "
                f"{self.chance_loss:.4f}); {STUCK_CAUSES}"
            )
        return None

    def observe_validation_error(self, step: int, error: float) -> str | None:
        if error < self.best_error:
            self.best_error, self.evals_since_best = error, 0
            return None
        self.evals_since_best += 1
        if self.eval_patience > 0 and self.evals_since_best >= self.eval_patience:
            return self._report(
                f"Validation stopped improving: no new best top-1 error in "
                f"{self.evals_since_best} evaluations (best {self.best_error:.4f}, now "
                f"{error:.4f} at step {step}); if the training loss still falls this is "
                "overfitting (more data or augmentation), else a learning rate to lower "
                "(config.optim.schedule='plateau' does it) or raise"
            )
        return None


class ProfilerWindow:
    """Writes a ``jax.profiler`` trace of steps [start, start + count) to ``workdir/profile``."""

    def __init__(self, workdir: str, start: int, count: int):
        self.directory = os.path.join(workdir, "profile")
        self.start, self.stop_at = start, start + count
        self.active = False

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run (1-based)."""
        if self.start > 0 and step == self.start and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True
            logging.info(
                "Profiling steps %d..%d into %s", self.start, self.stop_at - 1, self.directory
            )

    def after_step(self, step: int, outputs) -> None:
        if self.active and step >= self.stop_at - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info(
                "Wrote the profile to %s (open it with TensorBoard or xprof)", self.directory
            )


def peak_tflops(config_peak: float, compute_dtype: str) -> float | None:
    """The whole job's peak TFLOP/s for MFU: the config's per-device figure, or the chip's."""
    devices = jax.devices()
    if config_peak > 0:
        return config_peak * len(devices)
    chip = flops.chip_peak_tflops(
        devices[0].device_kind, compute_dtype, jax.config.jax_default_matmul_precision
    )
    return None if chip is None else chip[0] * len(devices)
