"""Metrics: losses and errors from logits, finiteness, and writers for JSONL and TensorBoard."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def topk_errors(logits_BxK: jax.Array, labels_B: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is not among the k highest logits, else 0.0 (per example)."""
    k = min(k, logits_BxK.shape[-1])
    label_logit = jnp.take_along_axis(logits_BxK, labels_B[:, None], axis=-1)
    # Rank = number of classes scoring strictly higher than the label.
    rank = jnp.sum(logits_BxK > label_logit, axis=-1)
    # A NaN logit compares false everywhere: count it as an error, not a hit.
    return ((rank >= k) | jnp.isnan(label_logit[:, 0])).astype(jnp.float32)


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)


class MetricWriter:
    """Appends scalars to ``metrics.jsonl`` and TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite: training saves no state that is not."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))
