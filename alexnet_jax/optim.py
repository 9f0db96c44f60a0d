"""The paper's SGD update and learning-rate schedules, built from optax parts."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("constant",)


def paper_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    weight_decay: float,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """Sec. 5: v <- momentum * v - weight_decay * lr * w - lr * grad;  w <- w + v.

    The velocity accumulates lr-scaled steps (decay, then scale by lr, then the
    momentum trace), so a learning-rate change acts on new gradients only, as
    in the paper; ``optax.sgd`` would instead rescale the whole velocity.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=False),
    )


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the step."""
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    raise ValueError(f"config.schedule must be one of {SCHEDULES}, got {config.schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    mask = None
    if not config.weight_decay_on_biases:
        mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: getattr(path[-1], "key", None) != "bias", params
        )
    return paper_sgd(
        learning_rate_schedule(config),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        weight_decay_mask=mask,
    )
