"""The train state, the pure train and eval steps, the run's setup, and the loop with its periodic
parts (the log window, evaluation with the plateau rule, checkpoint or stop)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from alexnet_jax import (
    checkpoint,
    config_lib,
    diagnostics,
    errors,
    feed,
    finetune,
    flops,
    inference,
    metrics,
    optim,
    progress,
    run_control,
    sharding,
)
from alexnet_jax.data import demo, pipeline
from alexnet_jax.model import AlexNet

PREPARE_COMMAND = (
    "python -m alexnet_jax.data.prepare --source=<ILSVRC tars | folder | tfds> "
    "--output_dir={data_dir}"
)


@flax.struct.dataclass
class TrainState:
    """Everything that changes from one step to the next (the data iterator aside)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # Base key; step t uses fold_in(rng, t).
    schedule: optim.ScheduleState  # The plateau rule's memory (learning-rate scale, best error).


def init_state(
    model: AlexNet,
    optimizer: optax.GradientTransformation,
    seed: int,
    crop_size: int = pipeline.CROP_SIZE,
) -> TrainState:
    """A fresh state; pure, so it can run under jit with sharded outputs.

    ``crop_size`` is ``config.data.crop_size`` (fc6's input follows it).
    """
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    images = jnp.zeros((1, crop_size, crop_size, 3), jnp.float32)
    # Parameters do not depend on placement; jit's out_shardings place them.
    params = model.clone(mesh=None).init({"params": init_rng}, images, train=False)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=train_rng,
        schedule=optim.init_schedule_state(),
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: AlexNet,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on the mean softmax cross-entropy of ``batch``."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits = model.apply(
            {"params": params}, batch["images"], train=True, rngs={"dropout": dropout_rng}
        )
        return metrics.cross_entropy(logits, batch["labels"]).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    learning_rate = optim.scaled_learning_rate(learning_rate_fn, state.step, state.schedule)
    opt_state = optim.with_learning_rate(state.opt_state, learning_rate)
    updates, opt_state = optimizer.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = {
        "loss": loss,
        "top1_error": metrics.topk_errors(logits, batch["labels"], 1).mean(),
        "top5_error": metrics.topk_errors(logits, batch["labels"], 5).mean(),
        "learning_rate": learning_rate,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, step_metrics


def jit_train_step(
    model: AlexNet,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    **jit_kwargs: Any,
) -> Any:
    """``train_step`` jit-compiled with the state donated; ``jit_kwargs`` add shardings."""
    step = functools.partial(
        train_step, model=model, optimizer=optimizer, learning_rate_fn=learning_rate_fn
    )
    return jax.jit(step, donate_argnums=0, **jit_kwargs)


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: AlexNet) -> dict[str, jax.Array]:
    """Sums over the batch's real (``mask`` = 1) examples, so padded batches count right."""
    logits = model.apply({"params": params}, batch["images"], train=False)
    mask = batch["mask"]
    return {
        "loss": jnp.sum(metrics.cross_entropy(logits, batch["labels"]) * mask),
        "top1_error": jnp.sum(metrics.topk_errors(logits, batch["labels"], 1) * mask),
        "top5_error": jnp.sum(metrics.topk_errors(logits, batch["labels"], 5) * mask),
        "count": jnp.sum(mask),
    }


def evaluate(params: Any, eval_fn: Any, validation: feed.ValidationInput) -> dict[str, float]:
    """Mean loss and top-1/top-5 error over the validation split (centre crop)."""
    totals: dict[str, float] = {}
    for batch in validation.one_pass():
        sums = jax.device_get(eval_fn(params, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in totals.items()}


def load_dataset(config: ml_collections.ConfigDict) -> pipeline.Dataset:
    """The config's dataset, generated first for the demo; fails clearly when absent."""
    data_dir = os.path.expanduser(config.data.dir)
    if config.data.source == "demo":
        try:
            demo.ensure(
                data_dir,
                train_per_class=config.data.demo_train_per_class,
                val_per_class=config.data.demo_val_per_class,
                seed=0,
            )
        except demo.ForeignDirectoryError as e:
            raise config_lib.ConfigError(
                f"config.data.source = 'demo' generates its dataset in config.data.dir, but "
                f"{e}; nothing there was changed. To train on the dataset in that folder: "
                f"--config.data.source=prepared. To generate the demo: --config.data.dir=<a new "
                "or empty folder> (a demo folder from an older alexnet_jax has no marker: delete "
                "it yourself to regenerate it)."
            ) from None
        except OSError as e:
            raise config_lib.ConfigError(
                f"config.data.dir = {data_dir!r}: cannot write the demo dataset there ({e}). "
                "Choose a writable folder: --config.data.dir=<folder>."
            ) from None
    how_to_prepare = PREPARE_COMMAND.format(data_dir=data_dir)
    if config.data.source == "tfds":
        dataset = pipeline.open_tfds(
            config.data.tfds_name,
            data_dir=config.data.tfds_data_dir,
            stats_images=config.data.tfds_stats_images,
            how_to_prepare=how_to_prepare,
            cache_dir=data_dir,
        )
    else:
        dataset = pipeline.open_dataset(data_dir, how_to_prepare=how_to_prepare)
    if dataset.num_classes != config.model.num_classes:
        raise config_lib.ConfigError(
            f"config.model.num_classes = {config.model.num_classes} but the dataset in "
            f"{data_dir} has {dataset.num_classes} classes: pass "
            f"--config.model.num_classes={dataset.num_classes}"
        )
    return dataset


def _last_good(ckpt: checkpoint.Checkpointer) -> str:
    """Where a relaunch would resume from, in words."""
    step = ckpt.latest_step()
    if step is None:
        return (
            f"No checkpoint was saved before it ({ckpt.directory} is empty): a relaunch "
            "starts from scratch."
        )
    return (
        f"The last good checkpoint (step {step}) is kept in {ckpt.directory}; a relaunch "
        "resumes from it."
    )


def _stop_if_not_finite(
    losses: list[float], first_step: int, ckpt: checkpoint.Checkpointer
) -> None:
    """Raises NotFiniteError naming the first step whose loss is NaN or inf."""
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            ckpt.wait()  # Saves already under way hold finite states: let them finish.
            raise diagnostics.NotFiniteError(
                f"Loss is {loss} at step {first_step + i}: stopping. {_last_good(ckpt)} "
                "Consider a lower config.optim.learning_rate, or check the input data."
            )


def _save_finite(
    step: int,
    state: TrainState,
    pending: list[dict[str, jax.Array]],
    s: Setup,
    val: dict[str, float] | None = None,
) -> None:
    """Saves ``state`` and the input position at ``step`` in the background, never a
    non-finite state (``pending``: the steps' metrics not yet checked)."""
    losses = jax.device_get([m["loss"] for m in pending])
    _stop_if_not_finite([float(x) for x in losses], step - len(pending) + 1, s.ckpt)
    if not bool(metrics.all_finite(state.params)):
        s.ckpt.wait()
        raise diagnostics.NotFiniteError(
            f"Parameters are not finite after step {step}: stopping. {_last_good(s.ckpt)}"
        )
    s.ckpt.maybe_save(step, state, s.train_input.iterator, config=s.config, metrics=val, force=True)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "ended"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _stop_for_input_worker(
    error: errors.InputWorkerError,
    which: str,
    step: int,
    state: TrainState,
    pending: list[dict[str, jax.Array]],
    s: Setup,
) -> errors.InputWorkerError:
    """Saves the intact state and the input position at ``step``; returns the error to raise.

    The batch the worker was building was never handed out, so the saved
    position is the next batch and the relaunch continues exactly.
    """
    ckpt = s.ckpt
    if step not in ckpt.finished_steps() and ckpt.latest_step() != step:
        _save_finite(step, state, pending, s)
    ckpt.wait()  # The forced save and any save in flight.
    skipped = f"; the evaluation at step {step} is skipped" if which == "validation" else ""
    message = (
        f"{which.capitalize()} input worker {error.worker} {_how_it_ended(error.exitcode)} "
        f"at step {step}, so training stopped after saving the train state and the input "
        f"position at step {step} in {ckpt.directory}{skipped}. Relaunch the same command to "
        "continue from there. If the kernel's OOM killer ended it (dmesg), try fewer "
        "workers (--config.data.num_workers), a smaller --config.data.prefetch, or more memory."
    )
    return errors.InputWorkerError(message, worker=error.worker, exitcode=error.exitcode)


# What a failed collective (gloo on CPU, NCCL on GPU) or the coordination service says
# when another process of the job is gone.
_PEER_LOSS_MARKERS = ("gloo", "nccl", "connection closed by peer", "heartbeat", "coordination")


def _is_peer_loss(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _PEER_LOSS_MARKERS)


def _peer_lost(error: Exception, step: int, directory: str) -> errors.PeerLostError:
    """The one line a survivor prints when a collective failed because a process is gone."""
    logging.debug("The collective failed with: %s", error)
    reason = " ".join((getattr(error, "reason", "") or str(error)).split())[:160]
    return errors.PeerLostError(
        f"Process {jax.process_index()} of {jax.process_count()} stopped at step {step}: "
        f"another process of the job is gone (a collective failed: {reason}). "
        + checkpoint.resume_note(
            directory, "relaunching every process of the job (the same command on each)"
        )
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from ``workdir`` if it holds a checkpoint); returns the last eval metrics.

    Holds the workdir's lock throughout (a second run into it fails at once),
    and turns SIGTERM or SIGINT into "save at the next step boundary and return"
    (a second one ends the process at once). A killed input worker saves, then
    raises InputWorkerError; a lost peer process raises PeerLostError.
    """
    config_lib.validate(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    with (
        run_control.WorkdirLock(workdir, jax.process_index()),
        run_control.StopSignal(
            multi_process=jax.process_count() > 1,
            resume_note=functools.partial(
                checkpoint.resume_note, os.path.join(workdir, "checkpoints")
            ),
        ) as stop_signal,
    ):
        return train_loop(setup(config, workdir), stop_signal)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the training loop needs, built once by ``setup``."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    steps_per_epoch: int
    total_steps: int
    train_fn: Any  # (state, batch) -> (state, step metrics), the state donated.
    eval_fn: Any  # (params, batch) -> sums over the batch's real examples.
    observe_validation_error: Any  # (schedule, top-1 error) -> schedule: the plateau rule.
    train_input: feed.TrainInput
    validation: feed.ValidationInput
    ckpt: checkpoint.Checkpointer
    state: TrainState  # Restored from the workdir, or new (or fine-tuned from a source).

    @property
    def eval_every_steps(self) -> int:
        return max(1, round(self.config.eval_every_epochs * self.steps_per_epoch))


def _make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """``config.mesh_shape``'s mesh, whose data axis divides both batch sizes."""
    try:
        mesh = sharding.make_mesh(config.mesh_shape)
    except ValueError as e:
        raise config_lib.ConfigError(
            f"config.mesh_shape = {tuple(config.mesh_shape)}: {e} ({jax.device_count()} "
            f"{jax.default_backend()} devices in this job). Use -1 for the data axis to take "
            "what there is, e.g. --config.mesh_shape='(-1, 1)'."
        ) from None
    data_size = mesh.shape[sharding.DATA_AXIS]
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % data_size:
            raise config_lib.ConfigError(
                f"config.{field} = {config[field]} must be divisible by the mesh's data axis "
                f"({data_size} devices)"
            )
    return mesh


def _steps(config: ml_collections.ConfigDict, dataset: pipeline.Dataset) -> tuple[int, int]:
    """(steps per epoch, total steps) of ``config`` on ``dataset``."""
    steps_per_epoch = dataset.num_examples("train") // config.batch_size
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"config.batch_size = {config.batch_size} exceeds the "
            f"{dataset.num_examples('train')} training images"
        )
    total_steps = (
        config.max_steps if config.max_steps > 0 else math.ceil(config.num_epochs * steps_per_epoch)
    )
    return steps_per_epoch, total_steps


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    """The mesh, dataset, schedule, model, optimizer, jitted steps, inputs and first state."""
    mesh = _make_mesh(config)
    dataset = load_dataset(config)
    steps_per_epoch, total_steps = _steps(config, dataset)
    model = inference.build_model(config, mesh)
    learning_rate_fn = optim.learning_rate_schedule(
        config.optim,
        batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    optimizer = optim.make_optimizer(config.optim)
    init_fn = functools.partial(init_state, model, optimizer, config.seed, config.data.crop_size)
    abstract_state = jax.eval_shape(init_fn)
    state_shardings = sharding.state_shardings(mesh, abstract_state)
    batch_shardings = sharding.batch_sharding(mesh)
    train_fn = jit_train_step(
        model,
        optimizer,
        learning_rate_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(state_shardings.params, batch_shardings),
        out_shardings=sharding.replicated(mesh),
    )
    observe_validation_error = jax.jit(
        lambda schedule, error: optim.observe_validation_error(schedule, error, config.optim),
        out_shardings=state_shardings.schedule,
    )
    train_input = feed.train_input(config, dataset, mesh)
    validation = feed.validation_input(config, dataset, mesh)
    _log_input(config, train_input)
    ckpt = checkpoint.Checkpointer(
        workdir, save_every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
    )
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_shardings,
    )
    new_state = jax.jit(init_fn, out_shardings=state_shardings)
    state = _first_state(config, ckpt, train_input.iterator, abstract_sharded, new_state)
    return Setup(
        config=config,
        workdir=workdir,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        train_fn=train_fn,
        eval_fn=eval_fn,
        observe_validation_error=observe_validation_error,
        train_input=train_input,
        validation=validation,
        ckpt=ckpt,
        state=state,
    )


def _log_input(config: ml_collections.ConfigDict, train_input: feed.TrainInput) -> None:
    logging.info(
        "Input: %s, %d worker process(es) x %d thread(s)%s",
        "uint8 crops finished on the device"
        if train_input.preprocessing.finish_on_device
        else "augmented on the host",
        train_input.loading.num_workers,
        train_input.loading.num_threads,
        " (data.num_workers = -1: auto)" if config.data.num_workers < 0 else "",
    )


def _first_state(
    config: ml_collections.ConfigDict,
    ckpt: checkpoint.Checkpointer,
    train_iter: pipeline.BatchIterator,
    abstract_sharded: TrainState,
    new_state: Any,
) -> TrainState:
    """The newest checkpoint that restores (with the input position), else ``new_state()``.

    Restoring checks first that the config does not change the model and falls
    back to older checkpoints when the newest is damaged; a fresh fine-tuning run
    starts from another run's params (checked before the init).
    """
    restored = ckpt.restore_latest_usable(abstract_sharded, train_iter, config)
    if restored is not None:
        latest, state = restored
        logging.info("Resumed from the checkpoint at step %d in %s", latest, ckpt.directory)
        return state
    source = finetune.load_source(config, abstract_sharded.params) if config.init_from else None
    state = new_state()
    if source is not None:
        return state.replace(params=finetune.initial_params(source, state.params, config))
    logging.info("Initialized a new model (%s init)", config.model.init_scheme)
    if config.optim.frozen_layers:
        logging.warning(
            "config.optim.frozen_layers = %s without config.init_from: those layers "
            "stay at their random init",
            tuple(config.optim.frozen_layers),
        )
    return state


def train_loop(s: Setup, stop_signal: run_control.StopSignal) -> dict[str, float]:
    """Steps from the setup's state to ``total_steps``; returns the last evaluation's metrics.

    Each step: the next batch, the train step, then the periodic parts in
    turn (the log window, the evaluation, the checkpoint or stop), each with
    its own state.
    """
    config, ckpt = s.config, s.ckpt
    run_start, state = time.time(), s.state
    step = start_step = int(jax.device_get(state.step))
    _log_plan(s, start_step)
    writer = metrics.MetricWriter(s.workdir, enabled=jax.process_index() == 0)
    guard = _stuck_guard(config)
    d = config.diagnostics
    profiler = diagnostics.ProfilerWindow(s.workdir, d.profile_start_step, d.profile_num_steps)
    window = LogWindow(s, writer, guard, start_step)
    evaluation = Evaluation(s, writer, guard)
    try:
        while step < s.total_steps:
            profiler.before_step(step + 1)
            try:
                batch = window.next_batch(s.train_input)
            except errors.InputWorkerError as e:
                raise _stop_for_input_worker(
                    e, "training", step, state, window.pending, s
                ) from None
            state, step_metrics = s.train_fn(state, batch)
            profiler.after_step(step + 1, step_metrics)
            ckpt.check_saves()  # A failed background save stops the run at this step boundary.
            step += 1
            window.add(step, step_metrics)
            evaluated = evaluation.due(step)
            if evaluated:
                try:
                    state = evaluation.run(step, state, window)
                except errors.InputWorkerError as e:
                    raise _stop_for_input_worker(
                        e, "validation", step, state, window.pending, s
                    ) from None
            if _save_or_stop(s, step, state, window.pending, evaluation, evaluated, stop_signal):
                break
    except (jax.errors.JaxRuntimeError, checkpoint.CheckpointSaveError) as e:
        # A collective in the step, or in a save's synchronization, with a process gone.
        if jax.process_count() == 1 or not _is_peer_loss(e):
            raise
        raise _peer_lost(e, step, ckpt.directory) from None
    finally:
        profiler.close()
        s.train_input.close()  # Stops the input's worker processes.
        s.validation.close()
    ckpt.wait()
    _log_summary(
        step, evaluation.latest, guard, time.time() - run_start, window.rates, ckpt.directory
    )
    ckpt.close()
    writer.close()
    return evaluation.latest


def _log_plan(s: Setup, start_step: int) -> None:
    logging.info(
        "Training steps %d..%d (%d steps/epoch of %d images, %.3g epochs) on %s",
        start_step,
        s.total_steps,
        s.steps_per_epoch,
        s.config.batch_size,
        s.total_steps / s.steps_per_epoch,
        dict(s.mesh.shape),
    )


def _stuck_guard(config: ml_collections.ConfigDict) -> diagnostics.StuckGuard:
    d = config.diagnostics
    return diagnostics.StuckGuard(
        config.model.num_classes,
        after_steps=d.stuck_after_steps,
        margin=d.stuck_loss_margin,
        eval_patience=d.stuck_eval_patience,
        stop=d.stop_when_stuck,
    )


class LogWindow:
    """The train log line every ``log_every_steps``: mean metrics, img/s, data wait, MFU, ETA.

    The steps' metrics stay on the device until a log step (fetching each one
    would stall the dispatch of the next). The first step compiles, so the
    rates are timed from the second; evaluations are kept out of img/s.
    """

    def __init__(
        self, s: Setup, writer: metrics.MetricWriter, guard: diagnostics.StuckGuard, step: int
    ):
        self._s, self._writer, self._guard = s, writer, guard
        self._first_step = step + 1
        self.pending: list[dict[str, jax.Array]] = []  # Metrics not yet fetched.
        self.rates: list[float] = []  # img/s of every window, for the summary's median.
        self._data_seconds = 0.0  # Waiting for the next batch (input-bound if large).
        self._start_time, self._start_step = time.time(), step
        self._timed_from: tuple[float, int] = (self._start_time, step)  # For the ETA.
        self._train_flops = flops.train_flops_per_image(s.config)  # For TFLOP/s and MFU.
        d = s.config.diagnostics
        self._peak = diagnostics.peak_tflops(d.peak_tflops, s.config.model.compute_dtype)

    def next_batch(self, train_input: feed.TrainInput) -> feed.DeviceBatch:
        start = time.time()
        batch = next(train_input)
        self._data_seconds += time.time() - start
        return batch

    def exclude(self, seconds: float) -> None:
        """Keeps ``seconds`` (an evaluation) out of the window's rate."""
        self._start_time += seconds

    def add(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Records step ``step``'s metrics; logs the window when ``step`` is a log step."""
        self.pending.append(step_metrics)
        if step == self._first_step:
            jax.block_until_ready(step_metrics)
            logging.info("First step (with compilation) took %.1fs", time.time() - self._start_time)
            self._start_time, self._start_step, self._data_seconds = time.time(), step, 0.0
            self._timed_from = (self._start_time, step)
        if step % self._s.config.log_every_steps == 0 or step == self._s.total_steps:
            self._log(step)

    def _log(self, step: int) -> None:
        s, fetched = self._s, jax.device_get(self.pending)
        self.pending = []
        _stop_if_not_finite([float(m["loss"]) for m in fetched], step - len(fetched) + 1, s.ckpt)
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        now = time.time()
        seconds = max(now - self._start_time, 1e-9)
        images_per_sec = (step - self._start_step) * s.config.batch_size / seconds
        data_fraction = self._data_seconds / seconds
        self._start_time, self._start_step, self._data_seconds = now, step, 0.0
        seconds_per_step = (now - self._timed_from[0]) / max(step - self._timed_from[1], 1)
        means["images_per_sec"] = images_per_sec
        means["data_wait_fraction"] = data_fraction
        means["train_tflops_per_sec"] = images_per_sec * self._train_flops / 1e12
        if self._peak:
            means["mfu"] = means["train_tflops_per_sec"] / self._peak
        self.rates.append(images_per_sec)
        self._writer.write(step, "train", means)
        logging.info(
            "step %d/%d  epoch %.2f  loss %.4f  top1_err %.3f  top5_err %.3f  lr %.2g  "
            "%.1f img/s (%.0f%% waiting for data)  ETA %s",
            step,
            s.total_steps,
            step / s.steps_per_epoch,
            means["loss"],
            means["top1_error"],
            means["top5_error"],
            means["learning_rate"],
            images_per_sec,
            100 * data_fraction,
            progress.format_duration(seconds_per_step * (s.total_steps - step)),
        )
        self._guard.observe_loss(step, means["loss"])


class Evaluation:
    """Validation every ``eval_every_steps`` and at the end, and the plateau rule it feeds."""

    def __init__(self, s: Setup, writer: metrics.MetricWriter, guard: diagnostics.StuckGuard):
        self._s, self._writer, self._guard = s, writer, guard
        self.latest: dict[str, float] = {}  # The last evaluation's metrics.

    def due(self, step: int) -> bool:
        return step % self._s.eval_every_steps == 0 or step == self._s.total_steps

    def run(self, step: int, state: TrainState, window: LogWindow) -> TrainState:
        """Evaluates, logs, and returns ``state`` with the plateau rule's schedule updated."""
        s, start = self._s, time.time()
        self.latest = evaluate(state.params, s.eval_fn, s.validation)
        self._writer.write(step, "val", self.latest)
        old_schedule = jax.device_get(state.schedule)
        state = state.replace(
            schedule=s.observe_validation_error(state.schedule, self.latest["top1_error"])
        )
        new_schedule = jax.device_get(state.schedule)
        optim_config = s.config.optim
        if new_schedule.num_reductions > old_schedule.num_reductions:
            logging.info(
                "Validation error has not improved for %d evaluations: learning rate x%g "
                "(drop %d of at most %d)",
                optim_config.plateau_patience,
                optim_config.lr_decay_factor,
                new_schedule.num_reductions,
                optim_config.plateau_max_reductions,
            )
        logging.info(
            "eval at step %d (epoch %.2f): loss %.4f  top1_err %.4f  top5_err %.4f  (%.1fs)",
            step,
            step / s.steps_per_epoch,
            self.latest["loss"],
            self.latest["top1_error"],
            self.latest["top5_error"],
            time.time() - start,
        )
        window.exclude(time.time() - start)
        self._guard.observe_validation_error(step, self.latest["top1_error"])
        return state


def _save_or_stop(
    s: Setup,
    step: int,
    state: TrainState,
    pending: list[dict[str, jax.Array]],
    evaluation: Evaluation,
    evaluated: bool,
    stop_signal: run_control.StopSignal,
) -> bool:
    """Saves when due; returns whether to stop (a signal asked to: saved first).

    Saves on the interval, after each evaluation (ranked by its error, so the
    best is kept), at the end, and when a signal asked to stop.
    """
    stop = stop_signal.should_stop(step)
    if evaluated or stop or step == s.total_steps or s.ckpt.should_save(step):
        val = {f"val_{k}": v for k, v in evaluation.latest.items()} if evaluated else None
        _save_finite(step, state, pending, s, val)
    if stop:
        s.ckpt.wait()
        logging.warning(
            "%s: saved the checkpoint at step %d and stopped; relaunch to continue",
            stop_signal.reason,
            step,
        )
    return stop


def _log_summary(
    step: int,
    eval_metrics: dict[str, float],
    guard: diagnostics.StuckGuard,
    seconds: float,
    rates: list[float],
    directory: str,
) -> None:
    """One line at the end: where the run got to and where its checkpoints are."""
    final = (
        f"val top1_err {eval_metrics['top1_error']:.4f} top5_err {eval_metrics['top5_error']:.4f}"
        if eval_metrics
        else "no evaluation"
    )
    logging.info(
        "Training ended at step %d: %s, best val top1_err %s, %s wall, median %s img/s; "
        "checkpoints in %s",
        step,
        final,
        f"{guard.best_error:.4f}" if math.isfinite(guard.best_error) else "-",
        progress.format_duration(seconds),
        f"{float(np.median(rates)):.1f}" if rates else "-",
        directory,
    )
