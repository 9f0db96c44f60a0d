"""The train step learns; launch.py trains, checkpoints, resumes and rejects bad overrides."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import inference, train
from tests.conftest import ROOT, tiny_launch_flags


def test_train_step_lowers_the_loss_on_a_fixed_batch(fixed_batch_fit):
    # Asserted: the loss falls steadily, averaged over the last steps, and never blows up.
    losses = fixed_batch_fit["losses"]
    assert fixed_batch_fit["step"] == 12
    assert np.isclose(losses[0], np.log(10), rtol=0.2), losses  # Starts near chance.
    assert np.mean(losses[-3:]) < 0.6 * losses[0], losses
    assert max(losses) < 1.2 * losses[0], losses
    assert fixed_batch_fit["learning_rate"] == pytest.approx(
        fixed_batch_fit["configured_learning_rate"]
    )


def test_eval_step_ignores_padding():
    batch = {"images": np.ones((3, 2, 2, 3), np.float32), "labels": np.arange(3, dtype=np.int32)}
    padded = inference.pad_batch(batch, 5)
    assert padded["images"].shape == (5, 2, 2, 3)
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(padded["labels"][:3], [0, 1, 2])


def test_a_validation_pass_runs_as_many_batches_in_every_process():
    """20 images over 3 processes (7/7/6) in local batches of 6: 2 batches each, masks 7/7/6."""

    def endless_shard(process: int):  # The eval iterator's order: image i to process i mod 3.
        shard = np.arange(process, 20, 3, dtype=np.int32)
        while True:
            for start in range(0, len(shard), 6):
                labels = shard[start : start + 6]
                yield {"images": np.ones((len(labels), 2, 2, 3), np.float32), "labels": labels}

    seen = []
    for process in range(3):
        assert inference.batches_per_pass(20, 6, 3) == 2
        images = inference.shard_images(20, process, 3)
        shard = endless_shard(process)
        for _ in range(2):  # Two passes: the second starts again at the shard's first image.
            batches = list(
                inference.padded_pass(shard, images=images, local_batch=6, num_batches=2)
            )
            assert [b["labels"].shape for b in batches] == [(6,), (6,)]
            assert [b["images"].shape for b in batches] == [(6, 2, 2, 3)] * 2
            masks = np.concatenate([b["mask"] for b in batches])
            labels = np.concatenate([b["labels"] for b in batches])
            assert masks.sum() == images == (7 if process < 2 else 6)
            seen.append(sorted(labels[masks == 1].tolist()))
    # Every image counted once a pass: process 2's second batch is all padding.
    assert sorted(seen[0] + seen[2] + seen[4]) == list(range(20))
    assert seen[4] == seen[5] == list(range(2, 20, 3))


def test_a_failed_collective_with_a_gone_process_is_told_apart_from_other_runtime_errors():
    # What the survivor's step raised when its peer was SIGKILLed (gloo on CPU, jax 0.10.2).
    gone = (
        "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
        "Connection closed by peer [127.0.0.1]:7553"
    )
    assert train._is_peer_loss(RuntimeError(gone))
    assert not train._is_peer_loss(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))


def _launch(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _rows(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_launch_trains_checkpoints_and_resumes(tiny_demo_dir, tmp_path):
    workdir = str(tmp_path / "run")
    first = _launch(
        *tiny_launch_flags(tiny_demo_dir, workdir, checkpoint_every_steps=3, max_steps=3)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    train_rows = _rows(workdir, "train")
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and 0 <= r["top1_error"] <= 1 for r in train_rows)
    assert _rows(workdir, "val"), "no validation metrics written"
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    second = _launch(
        *tiny_launch_flags(tiny_demo_dir, workdir, checkpoint_every_steps=3, max_steps=5)
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from the checkpoint at step 3" in second.stderr
    # The second launch's first step is step 4, not a restart at 1.
    assert [r["step"] for r in _rows(workdir, "train")] == [1, 2, 3, 4, 5]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.batch_szie=3", "batch_szie"),
        ("--config.batch_size=abc", "batch_size"),
        ("--config.model.init_scheme=xavier", "model.init_scheme"),
        # A field that moved names its new place.
        (
            "--config.learning_rate=0.1",
            "--config.learning_rate is now --config.optim.learning_rate",
        ),
    ],
)
def test_bad_override_fails_at_once_naming_the_field(override, named, tmp_path):
    result = _launch("--config=configs/demo.py", f"--workdir={tmp_path}", override, timeout=120)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_misspelt_field_names_the_likely_one_in_one_line(tmp_path):
    result = _launch("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.batch_szie=3")
    assert result.stderr.strip().splitlines() == [
        "error: unknown config field in a --config.* override: batch_szie. Did you mean "
        '"batch_size" instead of "batch_szie"? (`python -m alexnet_jax.config_lib` lists every '
        "field with its default)"
    ]


@pytest.mark.parametrize("problem", ["workdir_is_a_file", "mesh_needs_more_devices"])
def test_environment_problems_are_one_message_naming_the_flag(problem, tiny_demo_dir, tmp_path):
    workdir = tmp_path / "run"
    overrides = {}
    if problem == "workdir_is_a_file":
        workdir.write_text("")
        named = f"--workdir={workdir} is a file"
    else:
        overrides["mesh_shape"] = "(1, 2)"  # 2 devices; this process has 1.
        named = "config.mesh_shape = (1, 2): mesh_shape (1, 2) needs 2 devices, found 1"
    result = _launch(*tiny_launch_flags(tiny_demo_dir, workdir, **overrides), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert named in result.stderr and "Traceback" not in result.stderr


def test_a_loss_that_is_not_finite_before_any_checkpoint_says_so(tiny_demo_dir, tmp_path):
    workdir = tmp_path / "run"
    flags = tiny_launch_flags(
        tiny_demo_dir,
        workdir,
        max_steps=4,
        checkpoint_every_steps=100,
        **{"optim.learning_rate": 1e12},
    )
    result = _launch(*flags, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Loss is nan at step" in result.stderr or "not finite after step" in result.stderr
    assert "No checkpoint was saved before it" in result.stderr
    assert "step None" not in result.stderr and "Traceback" not in result.stderr


def test_missing_prepared_data_names_the_prepare_command(tmp_path):
    result = _launch(
        "--config=configs/imagenet.py",
        f"--workdir={tmp_path / 'w'}",
        f"--config.data.dir={tmp_path / 'nowhere'}",
        timeout=120,
    )
    assert result.returncode == 2
    assert "alexnet_jax.data.prepare" in result.stderr
    assert str(tmp_path / "nowhere") in result.stderr


def test_epoch_fields_take_fractions_in_a_locked_config():
    from configs import demo

    config = demo.get_config()
    config.lock()
    config.num_epochs, config.eval_every_epochs = 0.5, 0.25  # An int field would refuse these.
    assert (config.num_epochs, config.eval_every_epochs) == (0.5, 0.25)
