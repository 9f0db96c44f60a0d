"""Checkpoints survive SIGKILL, SIGTERM, a killed input worker, damaged files, bad relaunches,
NaNs and a second launch.

The end-to-end tests share one set of launch.py runs (a module fixture), so
the train step compiles in as few processes as possible:

  A   uninterrupted, 20 steps (the reference)        } run side by side
  B1  same config, SIGKILLed after step 5 is logged  }
  B2  relaunch into B's workdir, SIGTERMed a few steps after it resumes
  B3  relaunch into B's workdir whose one input worker process is SIGKILLed (as the
      OOM killer does) a few steps after it resumes: saves, exits 75  } side by side
  B4  relaunch into B's workdir up to step 20                         }  with C

A reads its input in-process; B1, B2, B3 and B4 with 2, 1, 1 and 1 worker
processes (``data.num_workers``): a resume on another number of workers
continues the same batches, so B ends bitwise equal to A.
  C   learning rate 1e30: the loss becomes NaN       }
"""

import functools
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alexnet_jax import checkpoint, train
from alexnet_jax.data import workers
from tests.conftest import ROOT, tiny_config, tiny_launch_flags

TOTAL_STEPS = 20


# ---------------------------------------------------------------------------------------------
# Unit level: the Checkpointer on a small state, no model.


def _small_config(width=1.0):
    return ml_collections.ConfigDict(
        {"model": {"width": width, "num_classes": 10}, "num_epochs": 1}
    )


def _small_state(step):
    return {"w": jnp.arange(500, dtype=jnp.float32) + step, "step": jnp.int32(step)}


def _iterator():
    return iter(grain.MapDataset.range(1000).batch(2).to_iter_dataset())


def _save_steps(workdir, steps, errors=None, keep=10):
    """Saves steps with the iterator advanced once per step; returns the Checkpointer."""
    ckpt = checkpoint.Checkpointer(workdir, save_every_steps=1, keep=keep)
    it = _iterator()
    for i, step in enumerate(steps):
        next(it)
        metrics = {"val_top1_error": errors[i]} if errors else None
        ckpt.maybe_save(step, _small_state(step), it, config=_small_config(), metrics=metrics)
    ckpt.wait()
    return ckpt


def _largest_state_file(step_dir):
    files = [
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
    ]
    return pathlib.Path(max(files, key=os.path.getsize))


def _flip_bytes(step_dir):
    path = _largest_state_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # One bit: only the saved fingerprint notices.
    path.write_bytes(bytes(data))


def _truncate(step_dir):
    path = _largest_state_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _garbage_iterator_state(step_dir):
    (pathlib.Path(step_dir) / "data_iter" / "process_0-of-1.json").write_text("{not json")


@pytest.mark.parametrize(
    "damage", [_flip_bytes, _truncate, _delete_metadata, _garbage_iterator_state]
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, tmp_path, caplog):
    _save_steps(str(tmp_path), [1, 2, 3]).close()
    damage(str(tmp_path / "checkpoints" / "3"))

    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every_steps=1, keep=10)
    it = _iterator()
    abstract = jax.eval_shape(lambda: _small_state(0))
    step, state = ckpt.restore_latest_usable(abstract, it, _small_config())

    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(500) + 2)
    np.testing.assert_array_equal(next(it), [4, 5])  # The iterator is at step 2's position.
    assert "Checkpoint at step 3" in caplog.text and "Fell back" in caplog.text
    # The damaged step is moved aside (kept for inspection), so step 3 can be saved again.
    assert ckpt.all_steps() == [1, 2]
    assert [n.split("-")[0] for n in os.listdir(tmp_path / checkpoint.QUARANTINE_DIR)] == ["3"]
    assert ckpt.maybe_save(3, _small_state(3), it, config=_small_config(), force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]


def test_half_written_checkpoint_is_ignored(tmp_path):
    """An async save cut off by SIGKILL leaves an orbax tmp directory; it is not a step."""
    _save_steps(str(tmp_path), [1, 2]).close()
    shutil.copytree(
        tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123"
    )
    _truncate(str(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123"))
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every_steps=1, keep=10)
    step, _ = ckpt.restore_latest_usable(
        jax.eval_shape(lambda: _small_state(0)), _iterator(), _small_config()
    )
    assert step == 2


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _save_steps(str(tmp_path), [1, 2]).close()
    for step in (1, 2):
        _truncate(str(tmp_path / "checkpoints" / str(step)))
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every_steps=1, keep=10)
    with pytest.raises(checkpoint.NoUsableCheckpointError, match="(?s)step 2: .*step 1: "):
        ckpt.restore_latest_usable(
            jax.eval_shape(lambda: _small_state(0)), _iterator(), _small_config()
        )
    assert ckpt.all_steps() == [1, 2]  # Nothing moved: the user decides.


def test_a_workdir_of_imported_weights_is_not_resumed_and_not_moved(tmp_path):
    """Weights alone (import_weights) cannot restart training: the error says how to use them."""
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    params = {"fc8": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    ckpt.save_params(0, params, config=_small_config())
    assert ckpt.holds_params_only(0)
    with pytest.raises(checkpoint.ParamsOnlyCheckpointError, match="init_from=") as raised:
        ckpt.restore_latest_usable(
            jax.eval_shape(lambda: {"params": params, "opt_state": jnp.zeros(3)}),
            _iterator(),
            _small_config(),
        )
    assert str(tmp_path) in str(raised.value) and "configs/finetune.py" in str(raised.value)
    assert ckpt.all_steps() == [0]  # Nothing moved to checkpoints_unusable/.
    assert not (tmp_path / checkpoint.QUARANTINE_DIR).exists()
    # A training checkpoint is not mistaken for one.
    assert not _save_steps(str(tmp_path / "run"), [1]).holds_params_only(1)


def test_keeps_the_last_k_and_the_best_by_validation_error(tmp_path):
    errors = [0.9, 0.5, 0.7, 0.6, 0.8, 0.75]
    ckpt = _save_steps(str(tmp_path), [1, 2, 3, 4, 5, 6], errors=errors, keep=2)
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    ckpt.close()
    # A relaunch still knows which one is best, and keeps it while saving on.
    ckpt = checkpoint.Checkpointer(str(tmp_path), save_every_steps=1, keep=2)
    it = _iterator()
    for step in (7, 8):
        ckpt.maybe_save(step, _small_state(step), it, config=_small_config())
    ckpt.wait()
    assert ckpt.all_steps() == [2, 7, 8] and ckpt.best_step() == 2


def test_config_is_saved_and_model_changes_are_named(tmp_path):
    ckpt = _save_steps(str(tmp_path), [1])
    assert ckpt.saved_config(1) == checkpoint.config_to_json(_small_config())
    abstract = jax.eval_shape(lambda: _small_state(0))
    with pytest.raises(checkpoint.ConfigMismatchError, match=r"config\.model\.width: 1\.0 .* 0\.5"):
        ckpt.restore_latest_usable(abstract, _iterator(), _small_config(width=0.5))
    assert ckpt.all_steps() == [1]  # A mismatch is not damage: nothing is moved.

    saved = tiny_config("/data").to_dict()
    safe = tiny_config("/data")
    safe.num_epochs, safe.log_every_steps, safe.max_steps, safe.optim.learning_rate = 3, 7, 99, 0.1
    assert checkpoint.model_config_changes(saved, json.loads(safe.to_json())) == []
    unsafe = tiny_config("/data")
    unsafe.model.width, unsafe.model.num_classes, unsafe.num_epochs = 0.5, 5, 3
    changes = checkpoint.model_config_changes(saved, json.loads(unsafe.to_json()))
    assert [c.split(":")[0] for c in changes] == ["config.model.num_classes", "config.model.width"]


def test_fingerprint_changes_with_any_single_element():
    state = {"a": jnp.zeros((64, 3)), "b": jnp.arange(7, dtype=jnp.int32)}
    base = checkpoint.state_fingerprint(state)
    assert set(base) == {"['a']", "['b']"}
    nudged = {"a": state["a"].at[63, 2].set(np.float32(1e-45)), "b": state["b"]}  # Lowest bit.
    swapped = {"a": state["a"], "b": state["b"][::-1]}
    assert checkpoint.state_fingerprint(nudged)["['a']"] != base["['a']"]
    assert checkpoint.state_fingerprint(swapped)["['b']"] != base["['b']"]
    assert checkpoint.state_fingerprint(nudged)["['b']"] == base["['b']"]


# ---------------------------------------------------------------------------------------------
# End to end through launch.py (see the module docstring).


def _overrides(data_dir, workdir, **extra):
    fields = {
        "checkpoint_every_steps": 3,
        "max_steps": TOTAL_STEPS,
        # The plateau rule, made to drop after the evaluations at steps 10 and 15 (no
        # evaluation after the first counts as an improvement), so the resumed runs
        # cross learning-rate drops.
        "optim.schedule": "plateau",
        "optim.plateau_patience": 1,
        "optim.plateau_min_delta": 1.0,
    }
    return tiny_launch_flags(data_dir, workdir, **{**fields, **extra})


LAUNCH = os.path.join(ROOT, "launch.py")


def _start(args, log_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    with open(log_path, "w") as log:  # The child keeps its own copy of the descriptor.
        proc = subprocess.Popen(
            [sys.executable, LAUNCH, *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path
    return proc


def _finish(proc, timeout=300):
    proc.wait(timeout=timeout)
    with open(proc.log_path) as f:
        return proc.returncode, f.read()


def _train_rows(workdir, skip=0):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f.read().splitlines() if line.strip()]
    return [r for r in rows[skip:] if r["split"] == "train"]


def _num_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return len(f.read().splitlines())


def _wait_for_resume(proc, timeout=240):
    """The step a relaunched run says it resumed from, once it says so."""
    deadline, log = time.time() + timeout, pathlib.Path(proc.log_path)
    while "Resumed from the checkpoint" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return int(re.search(r"Resumed from the checkpoint at step (\d+)", log.read_text())[1])


def _newest_input_worker(pid):
    """The input worker process of ``pid`` started last: the training input's (the validation
    input's start at set-up, the training input's at its first batch)."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except OSError:
            continue
        if spawned and int(fields[1]) == pid:
            children.append((int(fields[19]), int(entry)))  # (start time, pid)
    return max(children)[1]


def _signal_after(proc, workdir, min_step, signum, skip_rows=0, timeout=240, target=None):
    """Sends ``signum`` once this run has logged a train row with step >= ``min_step``: to the
    run, or to the process ``target()`` names."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {min_step}: {_finish(proc)[1][-3000:]}")
        rows = _train_rows(workdir, skip_rows)
        # Wait for a finished (renamed, not *-tmp-*) checkpoint too: on a loaded machine
        # the first async save can still be in flight at step min_step, and a kill then
        # rightly leaves nothing to resume from.
        ckpt_dir = os.path.join(workdir, "checkpoints")
        finished = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
        if rows and rows[-1]["step"] >= min_step and finished:
            os.kill(target() if target else proc.pid, signum)
            return rows[-1]["step"]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {min_step} within {timeout}s")


def _restore_state(workdir, step):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )


@pytest.fixture(scope="module")
def runs(tiny_demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ref, interrupted, nan_run = str(root / "A"), str(root / "B"), str(root / "C")
    out = {"ref": ref, "interrupted": interrupted, "nan": nan_run}

    a = _start(_overrides(tiny_demo_dir, ref), root / "A.log")
    b1 = _start(
        _overrides(tiny_demo_dir, interrupted, max_steps=400, **{"data.num_workers": 2}),
        root / "B1.log",
    )
    out["killed_after"] = _signal_after(b1, interrupted, 5, signal.SIGKILL)
    out["b1"] = _finish(b1)
    out["worker_runs"] = [b1.pid]

    rows_before_b2 = _num_rows(interrupted)
    b2 = _start(
        _overrides(tiny_demo_dir, interrupted, max_steps=400, **{"data.num_workers": 1}),
        root / "B2.log",
    )
    out["a"] = _finish(a)  # A runs alongside B1 and B2.
    resumed = _wait_for_resume(b2)
    out["b2_resumed"] = resumed
    _signal_after(b2, interrupted, resumed + 2, signal.SIGTERM, skip_rows=rows_before_b2)
    out["b2"] = _finish(b2)
    out["worker_runs"].append(b2.pid)

    b3 = _start(
        # Safe changes; the input in a worker process, so a run that ends as planned is covered.
        _overrides(
            tiny_demo_dir, interrupted, keep_checkpoints=2, num_epochs=50, **{"data.num_workers": 1}
        ),
        root / "B3.log",
    )
    rows_before_b3 = _num_rows(interrupted)
    c = _start(
        _overrides(
            tiny_demo_dir,
            nan_run,
            checkpoint_every_steps=1,
            max_steps=10,
            **{"optim.learning_rate": 1e30},
        ),
        root / "C.log",
    )
    resumed = _wait_for_resume(b3)
    worker = functools.partial(_newest_input_worker, b3.pid)
    _signal_after(b3, interrupted, resumed + 2, signal.SIGKILL, rows_before_b3, target=worker)
    out["b3"] = _finish(b3)
    out["b3_checkpoints"] = checkpoint.finished_steps(os.path.join(interrupted, "checkpoints"))
    # Ends as planned, its input in a worker process (the leak check's third case).
    b4 = _start(_overrides(tiny_demo_dir, interrupted, **{"data.num_workers": 1}), root / "B4.log")
    out["b4"], out["c"] = _finish(b4), _finish(c)
    out["worker_runs"] += [b3.pid, b4.pid]
    return out


def test_sigterm_saves_at_the_next_step_and_exits_zero(runs):
    rc, log = runs["b2"]
    assert rc == 0, log[-3000:]
    match = re.search(r"SIGTERM: saved the checkpoint at step (\d+)", log)
    assert match, log[-3000:]
    stopped = int(match[1])
    assert runs["b2_resumed"] + 2 <= stopped < TOTAL_STEPS
    # The relaunch continued from exactly that checkpoint.
    assert f"Resumed from the checkpoint at step {stopped} " in runs["b3"][1]


def test_runs_with_input_workers_leave_no_shared_memory_killed_or_stopped(runs):
    """B1 (2 workers) was SIGKILLed, B2 (1 worker) stopped by SIGTERM, B3 lost its worker, B4
    (1 worker) finished: none leaves a batch slot file behind, and none of B2-B4 reports leaked
    shared memory."""
    for log in runs["b2"][1], runs["b3"][1], runs["b4"][1]:
        assert "leaked" not in log, log[-3000:]
    for pid in runs["worker_runs"]:
        assert not glob.glob(os.path.join(workers.SHM_DIR, f"alexnet_jax_{pid}_*"))


def test_a_killed_input_worker_saves_where_it_stopped_and_exits_75(runs):
    """B3's one training-input worker was SIGKILLed (as the OOM killer does) a few steps after
    it resumed; the loop saved where it stood and exited 75. B4 resumed from that step, and the
    run stays bitwise equal to A (test_sigkill_then_relaunch_...)."""
    rc, log = runs["b3"]
    assert rc == 75, log[-3000:]  # errors.EXIT_RELAUNCH
    resumed = int(re.search(r"Resumed from the checkpoint at step (\d+)", log)[1])
    reached = int(
        re.search(r"error: Training input worker 0 was killed by SIGKILL at step (\d+)", log)[1]
    )
    assert reached >= resumed + 2
    directory = os.path.join(runs["interrupted"], "checkpoints")
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: Training input worker 0 was killed by SIGKILL at step {reached}, so training "
        f"stopped after saving the train state and the input position at step {reached} in "
        f"{directory}. Relaunch the same command to continue from there. If the kernel's OOM "
        "killer ended it (dmesg), try fewer workers (--config.data.num_workers), a smaller "
        "--config.data.prefetch, or more memory."
    ]
    assert "Traceback" not in log
    assert runs["b3_checkpoints"][-1] == reached  # Saved and committed before the exit.
    assert f"Resumed from the checkpoint at step {reached} " in runs["b4"][1]


def test_sigkill_then_relaunch_is_bitwise_identical_to_an_uninterrupted_run(runs):
    assert runs["b1"][0] == -signal.SIGKILL
    assert runs["a"][0] == 0, runs["a"][1][-3000:]
    assert runs["b4"][0] == 0, runs["b4"][1][-3000:]
    assert runs["b2_resumed"] < TOTAL_STEPS

    ref = _restore_state(runs["ref"], TOTAL_STEPS)
    resumed = _restore_state(runs["interrupted"], TOTAL_STEPS)
    ref_leaves = jax.tree_util.tree_leaves_with_path(ref)
    resumed_leaves = jax.tree_util.tree_leaves(resumed)
    assert len(ref_leaves) == len(resumed_leaves) > 20
    for (path, a), b in zip(ref_leaves, resumed_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), f"{jax.tree_util.keystr(path)} differs"

    # Every logged loss (and error, and learning rate) of the interrupted runs, steps
    # redone after the kill included, equals the uninterrupted run's at that step.
    fields = ("loss", "top1_error", "top5_error", "learning_rate")
    ref_rows = {r["step"]: [r[f] for f in fields] for r in _train_rows(runs["ref"])}
    assert sorted(ref_rows) == list(range(1, TOTAL_STEPS + 1))
    lrs = [ref_rows[s][3] for s in range(1, TOTAL_STEPS + 1)]
    np.testing.assert_allclose(lrs, [0.01] * 10 + [0.001] * 5 + [1e-4] * 5, rtol=1e-6)
    logged = _train_rows(runs["interrupted"])
    assert {r["step"] for r in logged} == set(ref_rows)
    mismatched = [r for r in logged if [r[f] for f in fields] != ref_rows[r["step"]]]
    assert not mismatched, (mismatched, ref_rows)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(runs):
    rc, log = runs["c"]
    assert rc == 2, log[-3000:]
    match = re.search(r"Loss is (nan|inf|-inf) at step (\d+): stopping", log)
    assert match, log[-3000:]
    bad_step = int(match[2])
    steps = sorted(
        int(s) for s in os.listdir(os.path.join(runs["nan"], "checkpoints")) if s.isdigit()
    )
    assert steps and max(steps) < bad_step
    assert f"last good checkpoint (step {max(steps)})" in log
    last_good = _restore_state(runs["nan"], max(steps))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(last_good["params"]))


def test_relaunch_that_changes_the_model_fails_naming_the_fields(runs, tiny_demo_dir):
    config = tiny_config(tiny_demo_dir)
    config.model.width = 0.125
    config.model.use_lrn = False
    config.max_steps = TOTAL_STEPS + 5
    with pytest.raises(checkpoint.ConfigMismatchError) as error:
        train.train_and_evaluate(config, runs["interrupted"])
    assert "config.model.width: 0.0625 in the checkpoint, 0.125 now" in str(error.value)
    assert "config.model.use_lrn: True in the checkpoint, False now" in str(error.value)
    assert "max_steps" not in str(error.value)
    assert (
        max(
            int(s)
            for s in os.listdir(os.path.join(runs["interrupted"], "checkpoints"))
            if s.isdigit()
        )
        == TOTAL_STEPS
    )


@pytest.fixture
def small_filesystem(tmp_path):
    """A 1.5 MB tmpfs: too small for the tiny model's state (params + momentum ~1.8 MB)."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount_point)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[:200]}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_during_a_save_stops_the_run_with_one_message(small_filesystem, tiny_demo_dir):
    workdir = small_filesystem / "run"
    flags = tiny_launch_flags(tiny_demo_dir, workdir, max_steps=8, checkpoint_every_steps=2)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error == [
        f"error: Saving a checkpoint to {workdir}/checkpoints failed, so training stopped: no "
        "space left on the device (OSError ENOSPC). No checkpoint was completed: a relaunch "
        "starts from scratch. Free space or fix the directory first."
    ]
    assert "Traceback" not in result.stderr
    # Noticed at the save after the failed one at the latest (step 4), not 1000 steps later.
    steps = [int(m) for m in re.findall(r"step (\d+)/8", result.stderr)]
    assert max(steps) <= 4, steps


def test_an_older_iterator_state_stops_the_resume_naming_the_way_on_and_moves_nothing(
    tiny_trained_workdir, tiny_demo_dir, tmp_path
):
    import glob
    import shutil

    from alexnet_jax import train

    workdir = tmp_path / "older"
    shutil.copytree(tiny_trained_workdir, workdir)
    states = glob.glob(str(workdir / "checkpoints" / "*" / "data_iter" / "*.json"))
    assert states
    for path in states:  # grain's own iterator state, as alexnet_jax saved it before.
        with open(path, "w") as f:
            f.write('{"next_index": 32}')
    config = tiny_config(tiny_demo_dir)
    config.max_steps = 4
    with pytest.raises(checkpoint.OlderIteratorStateError, match="init_from_step=2 --workdir"):
        train.train_and_evaluate(config, str(workdir))
    assert not (workdir / checkpoint.QUARANTINE_DIR).exists()
