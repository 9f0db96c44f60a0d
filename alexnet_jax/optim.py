"""The paper's SGD update and learning-rate schedules, built from optax parts.

The learning rate used at step t is ``base_schedule(t) * schedule_state.lr_scale``:

- ``base_schedule`` is a pure function of the step (constant, step drops at
  fixed epochs, or linear warmup + cosine decay, from ``optax.schedules``);
- ``ScheduleState`` is the paper's plateau rule (Sec. 5: divide by 10 when the
  validation error stops improving, three times in all). It changes only
  when ``observe_validation_error`` is called after an evaluation, lives in
  the train state and so is saved in every checkpoint.

The train step writes that learning rate into the optimizer state (an
``optax.inject_hyperparams`` hyperparameter), so every schedule has the same
optimizer-state structure and the step stays a pure function of the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "plateau", "step", "warmup_cosine")
OPTIMIZERS = ("sgd", "lars")


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


def lars(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformation:
    """LARS (You et al., 2017), the rule that trained AlexNet with batches of 8k-32k.

    Each weight tensor's step is scaled by ``trust_coefficient * ||w|| / ||g + wd * w||``
    (a two-tower kernel counts as one layer), so the step is a fixed fraction of
    the weights whatever the batch; biases skip the trust ratio (their norms
    start near zero). Momentum accumulates lr-scaled steps, as in ``paper_sgd``.
    """
    return optax.lars(
        learning_rate,
        weight_decay=weight_decay,
        weight_decay_mask=True if weight_decay_mask is None else weight_decay_mask,
        trust_coefficient=trust_coefficient,
        trust_ratio_mask=bias_mask,
        momentum=momentum,
    )


def base_learning_rate(optim_config: ml_collections.ConfigDict, batch_size: int) -> float:
    """``config.optim.learning_rate``, scaled linearly with the global batch (Goyal et al., 2017).

    With ``lr_reference_batch_size`` > 0 the rate is
    ``learning_rate * batch_size / lr_reference_batch_size``, so a pod preset states
    the rate per reference batch.
    """
    if optim_config.lr_reference_batch_size > 0:
        return optim_config.learning_rate * batch_size / optim_config.lr_reference_batch_size
    return optim_config.learning_rate


@flax.struct.dataclass
class ScheduleState:
    """The plateau rule's memory; scalars, checkpointed with the rest of the state."""

    lr_scale: jax.Array  # Multiplies the base schedule; 1, then 0.1, 0.01, ...
    best_error: jax.Array  # Lowest validation error seen (inf before the first evaluation).
    evals_since_best: jax.Array  # Evaluations since best_error last improved (or the last drop).
    num_reductions: jax.Array  # Drops made so far.


def init_schedule_state() -> ScheduleState:
    return ScheduleState(
        lr_scale=jnp.ones((), jnp.float32),
        best_error=jnp.full((), jnp.inf, jnp.float32),
        evals_since_best=jnp.zeros((), jnp.int32),
        num_reductions=jnp.zeros((), jnp.int32),
    )


def plateau_update(
    state: ScheduleState,
    validation_error: jax.Array | float,
    *,
    factor: float,
    patience: int,
    max_reductions: int,
    min_delta: float = 0.0,
) -> ScheduleState:
    """One evaluation's worth of the plateau rule; pure, so it can run under jit.

    An evaluation improves when its error is below the best by more than
    ``min_delta``. After ``patience`` evaluations in a row without improvement
    the learning rate is multiplied by ``factor`` (at most ``max_reductions``
    times) and the count starts again, so the new rate gets ``patience``
    evaluations of its own.
    """
    error = jnp.asarray(validation_error, jnp.float32)
    improved = error < state.best_error - min_delta
    best = jnp.where(improved, error, state.best_error)
    since = jnp.where(improved, 0, state.evals_since_best + 1)
    reduce = (since >= patience) & (state.num_reductions < max_reductions)
    return ScheduleState(
        lr_scale=jnp.where(reduce, state.lr_scale * factor, state.lr_scale).astype(jnp.float32),
        best_error=best,
        evals_since_best=jnp.where(reduce, 0, since).astype(jnp.int32),
        num_reductions=(state.num_reductions + reduce).astype(jnp.int32),
    )


def observe_validation_error(
    state: ScheduleState,
    validation_error: jax.Array | float,
    optim_config: ml_collections.ConfigDict,
) -> ScheduleState:
    """``config.optim``'s plateau rule; other schedules only keep track of the best error."""
    return plateau_update(
        state,
        validation_error,
        factor=optim_config.lr_decay_factor,
        patience=optim_config.plateau_patience,
        max_reductions=optim_config.plateau_max_reductions
        if optim_config.schedule == "plateau"
        else 0,
        min_delta=optim_config.plateau_min_delta,
    )


def learning_rate_schedule(
    optim_config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
) -> optax.Schedule:
    """``config.optim``'s base learning rate as a function of the step (before the plateau scale).

    ``step`` and ``warmup_cosine`` are defined in epochs, so they need
    ``steps_per_epoch`` (and ``warmup_cosine`` the run's ``total_steps``).
    """
    lr = base_learning_rate(optim_config, batch_size)
    if optim_config.schedule in ("constant", "plateau"):
        return optax.constant_schedule(lr)
    if steps_per_epoch is None or (
        optim_config.schedule == "warmup_cosine" and total_steps is None
    ):
        raise ValueError(
            f"schedule {optim_config.schedule!r} needs steps_per_epoch and total_steps"
        )
    if optim_config.schedule == "step":
        # The drop applies from the first step of each listed epoch on.
        boundaries = jnp.asarray([round(e * steps_per_epoch) for e in optim_config.lr_step_epochs])
        factor = optim_config.lr_decay_factor
        return lambda step: lr * factor ** jnp.sum(step >= boundaries)
    if optim_config.schedule == "warmup_cosine":
        warmup = round(optim_config.warmup_epochs * steps_per_epoch)
        if warmup == 0:  # Cosine from the first step (optax would log about an empty warmup).
            return optax.cosine_decay_schedule(lr, decay_steps=max(total_steps, 1), alpha=0.0)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=0.0,
        )
    raise ValueError(
        f"config.optim.schedule must be one of {SCHEDULES}, got {optim_config.schedule!r}"
    )


def scaled_learning_rate(
    learning_rate_fn: optax.Schedule, step: jax.Array, schedule: ScheduleState
) -> jax.Array:
    """The learning rate for ``step``: the base schedule times the plateau scale."""
    return jnp.asarray(learning_rate_fn(step), jnp.float32) * schedule.lr_scale


def with_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
    """``opt_state`` (from ``make_optimizer``) set to use ``learning_rate`` next update."""
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(learning_rate, hyperparams["learning_rate"].dtype)
    return opt_state._replace(hyperparams=hyperparams)


def bias_mask(params: Any) -> Any:
    """True for every parameter except those named ``bias`` (for weight decay)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "bias", params
    )


def layer_labels(params: Any, frozen_layers: Sequence[str]) -> Any:
    """ "frozen" for every parameter of a layer in ``frozen_layers``, else "trained"."""
    frozen = set(frozen_layers)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if getattr(path[0], "key", None) in frozen else "trained", params
    )


def freeze(
    rule: optax.GradientTransformation, frozen_layers: Sequence[str]
) -> optax.GradientTransformation:
    """``rule`` for all but ``frozen_layers``, whose updates are exactly zero.

    ``optax.multi_transform`` keeps ``rule``'s state (the momentum) for the
    trained parameters only, and a zero update leaves a frozen parameter's
    bits as they were; XLA drops the gradients nothing uses.
    """
    if not frozen_layers:
        return rule
    return optax.multi_transform(
        {"trained": rule, "frozen": optax.set_to_zero()},
        lambda params: layer_labels(params, frozen_layers),
    )


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``config.optim``'s rule with the learning rate as a hyperparameter in the optimizer state.

    The train step sets that hyperparameter each step (``with_learning_rate``);
    until it does, it holds ``config.optim.learning_rate``. Layers in
    ``frozen_layers`` never change (``freeze``).
    """
    mask = None if optim_config.weight_decay_on_biases else bias_mask

    def sgd(learning_rate):
        if optim_config.name == "lars":
            rule = lars(
                learning_rate,
                momentum=optim_config.momentum,
                weight_decay=optim_config.weight_decay,
                trust_coefficient=optim_config.lars_trust_coefficient,
                weight_decay_mask=mask,
            )
        else:
            rule = paper_sgd(
                learning_rate,
                momentum=optim_config.momentum,
                weight_decay=optim_config.weight_decay,
                weight_decay_mask=mask,
            )
        return freeze(rule, tuple(optim_config.frozen_layers))

    return optax.inject_hyperparams(sgd, hyperparam_dtype=jnp.float32)(
        learning_rate=optim_config.learning_rate
    )
