"""Towers on their own devices, data parallelism, and multi-process runs (sharding.py).

Multi-device checks run in subprocesses with fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX
starts): ``tests/sharding_worker.py`` for one step on 1, 2 and 4 devices, and
two or three ``launch.py`` processes joined by ``jax.distributed`` (gloo) for
multi-host runs, one of them killed, or with validation shards of unequal size.
"""

import functools
import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alexnet_jax import checkpoint, config_lib, inference, optim, sharding, train
from configs import imagenet_pod
from tests.conftest import ROOT, tiny_config, tiny_launch_flags

WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")


def _subprocess_env(num_devices: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    # Keeps the XLA flags this process runs with (tuning.configure_process), adds devices.
    devices = f"--xla_force_host_platform_device_count={num_devices}"
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {devices}".strip()
    return env


def _run_worker(mode: str, out_dir) -> dict:
    out = os.path.join(out_dir, f"{mode}.json")
    result = subprocess.run(
        [sys.executable, WORKER, mode, out],
        env=_subprocess_env(4),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    """One SGD step on meshes 1x1, 1x2 and 2x2 (see tests/sharding_worker.py)."""
    return _run_worker("meshes", tmp_path_factory.mktemp("sharding"))


def test_each_tower_lives_only_on_its_device(mesh_results):
    shards = mesh_results["shards"]
    # conv1..conv5, fc6, fc7: kernel and bias each, in params and in the momentum.
    assert len(shards) == 2 * 7 * 2
    assert any("trace" in row["path"] or "[1]" in row["path"] for row in shards)
    tower_of_device = {d: t for t, d in enumerate(mesh_results["mesh_tower_devices"])}
    for row in shards:
        assert not row["fully_replicated"], row["path"]
        assert row["shape"][0] == 2, row["path"]
        assert sorted(s["tower"] for s in row["shards"]) == [0, 1], row["path"]
        for shard in row["shards"]:
            assert shard["shape"] == [1, *row["shape"][1:]], row["path"]  # One tower, not both.
            assert shard["tower"] == tower_of_device[shard["device"]], row["path"]
            # After one step it still equals that tower's slice of the 1-device state.
            assert shard["max_diff"] < 1e-6, (row["path"], shard)
    assert mesh_results["fc8_kernel_replicated"]


# chunked/...: conv1-pool5 on one-image chunks (2 per data shard on 2x2, 4 on 1x1).
@pytest.mark.parametrize("name", ["sgd/1x2", "sgd/2x2", "chunked/1x1", "chunked/2x2"])
def test_one_step_equals_the_one_device_step(mesh_results, name):
    reference = mesh_results["cases"]["sgd/1x1"]
    case = mesh_results["cases"][name]
    assert case["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert case["params_max_diff"] < 1e-6
    assert case["opt_state_max_diff"] < 1e-6


@pytest.mark.parametrize("mesh", ["1x2", "2x2"])
def test_compiled_step_all_gathers_activations_never_kernels(mesh_results, mesh):
    gathered = mesh_results["cases"][f"sgd/{mesh}"]["all_gather_shapes"]
    kernels = mesh_results["kernel_shapes"]
    tower_slices = [[1, *k[1:]] for k in kernels] + [k[1:] for k in kernels]
    for shape in gathered:
        assert shape not in kernels and shape not in tower_slices, shape
    # The four exchanges of the paper, with the local batch: into conv3, fc6, fc7, fc8.
    batch = 4 if mesh == "1x2" else 2
    width = 1 / 16
    c2, c5, f = round(128 * width), round(128 * width), round(2048 * width)
    expected = [[2, batch, 13, 13, c2], [2, batch, 6, 6, c5], [2, batch, f], [2, batch, f]]
    assert sorted(gathered) == sorted(expected)


def test_conv_chunks_on_a_mesh_gather_per_chunk(mesh_results):
    # Each data shard's 2 examples run conv1-pool5 as 2 chunks of 1: the merges into
    # conv3 and fc6 happen per chunk, with no example leaving its data shard.
    c2, c5, f = round(128 / 16), round(128 / 16), round(2048 / 16)
    expected = [[2, 1, 13, 13, c2]] * 2 + [[2, 1, 6, 6, c5]] * 2 + [[2, 2, f]] * 2
    gathered = mesh_results["cases"]["chunked/2x2"]["all_gather_shapes"]
    assert sorted(gathered) == sorted(expected)


@pytest.fixture(scope="module")
def variant_results(tmp_path_factory):
    """One SGD step of torchvision's and Caffe's variants on 1x1 and 2x1 meshes."""
    return _run_worker("variants", tmp_path_factory.mktemp("variants"))


@pytest.mark.slow  # Two more networks compiled on 1 and 2 fake devices: ~2 minutes.
@pytest.mark.parametrize("variant", ["torchvision", "bvlc_alexnet"])
def test_other_variants_step_data_parallel_as_on_one_device(variant_results, variant):
    cases = variant_results["cases"]
    reference, case = cases[f"{variant}/1x1"], cases[f"{variant}/2x1"]
    assert case["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert case["params_max_diff"] < 1e-6 and case["opt_state_max_diff"] < 1e-6


@pytest.mark.slow
def test_lars_and_bfloat16_on_two_devices(tmp_path):
    results = _run_worker("extras", tmp_path)
    reference, case = results["cases"]["lars/1x1"], results["cases"]["lars/1x2"]
    assert case["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert case["params_max_diff"] < 1e-6 and case["opt_state_max_diff"] < 1e-6
    assert len(case["all_gather_shapes"]) == 4  # LARS's layer norms reduce, never gather.
    bf16 = results["bf16"]
    assert bf16["param_dtypes"] == ["float32"]
    assert bf16["loss"] == pytest.approx(bf16["f32_loss"], rel=2e-2)
    assert bf16["loss"] != bf16["f32_loss"]  # It did compute in bfloat16.


def test_state_shardings_split_tower_layers_and_their_momentum():
    config = tiny_config("unused")
    mesh = sharding.make_mesh((1, 1))
    optimizer = optim.make_optimizer(config.optim)
    init_fn = functools.partial(train.init_state, inference.build_model(config), optimizer, 0)
    shardings = sharding.state_shardings(mesh, jax.eval_shape(init_fn))
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    specs = {jax.tree_util.keystr(p): s.spec for p, s in flat}
    replicated = jax.sharding.PartitionSpec()
    for layer in sharding.TOWER_LOCAL_LAYERS:
        assert specs[f".params['{layer}']['kernel']"] == sharding.TOWERS
        assert specs[f".params['{layer}']['bias']"] == sharding.TOWERS
    assert specs[".params['fc8']['kernel']"] == replicated
    momentum = {p: s for p, s in specs.items() if p.startswith(".opt_state") and "trace" in p}
    assert len(momentum) == 16
    assert all((s == sharding.TOWERS) == ("fc8" not in p) for p, s in momentum.items())
    assert specs[".step"] == specs[".rng"] == replicated


def test_make_mesh_and_data_shards_on_one_device():
    mesh = sharding.make_mesh((-1, 1))
    assert dict(mesh.shape) == {"data": 1, "tower": 1}
    assert sharding.process_data_shard(mesh) == (0, 1)
    with pytest.raises(ValueError, match="needs 2 devices"):
        sharding.make_mesh((1, 2))
    with pytest.raises(ValueError, match="more than one -1"):
        sharding.make_mesh((-1, -1))


def test_pod_config_scales_the_learning_rate_linearly_after_warmup():
    config = imagenet_pod.get_config()
    config_lib.validate(config)
    assert tuple(config.mesh_shape) == (-1, 2) and config.optim.name == "lars"
    steps_per_epoch = 1_281_167 // config.batch_size
    schedule = optim.learning_rate_schedule(
        config.optim,
        batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        total_steps=90 * steps_per_epoch,
    )
    peak = config.optim.learning_rate * config.batch_size / config.optim.lr_reference_batch_size
    assert float(schedule(0)) == 0.0
    assert float(schedule(5 * steps_per_epoch)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(5 * steps_per_epoch // 2)) == pytest.approx(peak / 2, rel=1e-2)
    assert config.model.compute_dtype == "bfloat16"


# --- Two processes on localhost, one device each, joined by jax.distributed (gloo). ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_args(data_dir, workdir, mesh_shape: str, *extra: str):
    flags = tiny_launch_flags(
        data_dir, workdir, checkpoint_every_steps=2, max_steps=2, mesh_shape=mesh_shape
    )
    return [sys.executable, os.path.join(ROOT, "launch.py"), *flags, *extra]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=_subprocess_env(1),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run_single_and_pair(data_dir, tmp_path, pair_mesh: str, *extra: str):
    """Trains 2 steps in one process and in two (one device each) at once; returns the workdirs."""
    single_dir, pair_dir = tmp_path / "single", tmp_path / "pair"
    port = _free_port()
    processes = [_start(_launch_args(data_dir, single_dir, "(-1, 1)", *extra))] + [
        _start(
            _launch_args(
                data_dir,
                pair_dir,
                pair_mesh,
                *extra,
                "--config.distributed.initialize=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            )
        )
        for i in range(2)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-4000:]
    return single_dir, pair_dir


def _train_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _restore_in_one_process(workdir, config, step):
    optimizer = optim.make_optimizer(config.optim)
    init_fn = functools.partial(train.init_state, inference.build_model(config), optimizer, 0)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), jax.eval_shape(init_fn)
    )
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    manager.close()
    return restored.state


def _assert_same_run(single_dir, pair_dir, config):
    # Process 0 logged for the pair: the same losses as the single process.
    single_losses, pair_losses = _train_losses(single_dir), _train_losses(pair_dir)
    assert sorted(pair_losses) == sorted(single_losses) == [1, 2]
    for step, loss in single_losses.items():
        assert pair_losses[step] == pytest.approx(loss, rel=1e-5), step
    # The pair's checkpoint restores in this single process, equal to the single run's.
    single_state = _restore_in_one_process(single_dir, config, 2)
    pair_state = _restore_in_one_process(pair_dir, config, 2)
    assert int(pair_state.step) == 2
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        (pair_state.params, pair_state.opt_state),
        (single_state.params, single_state.opt_state),
    )
    assert max(jax.tree.leaves(diffs)) < 1e-5


def test_two_processes_one_tower_each_train_like_one(tiny_demo_dir, tmp_path):
    """The paper's two GPUs as two hosts: mesh (1, 2), tower t on process t."""
    single_dir, pair_dir = _run_single_and_pair(tiny_demo_dir, tmp_path, "(1, 2)")
    _assert_same_run(single_dir, pair_dir, tiny_config(tiny_demo_dir))


@pytest.mark.slow
def test_two_processes_data_parallel_train_like_one(tiny_demo_dir, tmp_path):
    """Mesh (2, 1): each process reads its half of every global batch."""
    # Augmentation is drawn on the global order and process p reads the p-th contiguous
    # half of each global batch, so the global batch (and its dropout masks) is the
    # single process's, dropout included.
    single_dir, pair_dir = _run_single_and_pair(tiny_demo_dir, tmp_path, "(2, 1)")
    _assert_same_run(single_dir, pair_dir, tiny_config(tiny_demo_dir))


# --- When part of a multi-process job dies, or the processes' validation shards differ. ---


def _start_job(data_dir, workdir, logs, mesh_shape: str, processes: int, **fields):
    """``processes`` launch.py processes joined by jax.distributed (gloo), each logging to
    a file in ``logs``."""
    port = _free_port()
    flags = tiny_launch_flags(data_dir, workdir, mesh_shape=mesh_shape, **fields)
    jobs = []
    for i in range(processes):
        args = [
            sys.executable,
            os.path.join(ROOT, "launch.py"),
            *flags,
            "--config.distributed.initialize=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={processes}",
            f"--config.distributed.process_id={i}",
        ]
        with open(logs / f"{i}.log", "w") as log:  # The child keeps its own descriptor.
            jobs.append(
                subprocess.Popen(
                    args, cwd=ROOT, env=_subprocess_env(1), stdout=log, stderr=subprocess.STDOUT
                )
            )
    return jobs


def _finish_job(jobs, logs, timeout=600) -> list[tuple[int, str]]:
    """Each process's exit code and log; kills what still runs ``timeout`` s from now."""
    deadline = time.time() + timeout
    for job in jobs:
        try:
            job.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()
    return [(job.returncode, (logs / f"{i}.log").read_text()) for i, job in enumerate(jobs)]


def _wait_for_step(workdir, step: int, jobs, timeout=600) -> None:
    """Until process 0 has logged ``step`` and a checkpoint is committed."""
    deadline = time.time() + timeout
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        assert all(job.poll() is None for job in jobs), "a process ended early"
        if checkpoint.finished_steps(os.path.join(workdir, "checkpoints")) and os.path.exists(
            metrics_path
        ):
            with open(metrics_path) as f:
                steps = [json.loads(line)["step"] for line in f if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.slow  # Two jobs of two processes: ~2 minutes on 2 cores.
def test_a_killed_process_ends_its_peer_at_once_and_the_relaunch_takes_the_newest_commit(
    tiny_demo_dir, tmp_path
):
    workdir, logs = tmp_path / "pair", tmp_path / "logs"
    logs.mkdir()
    # A save every step, so one is usually in flight (and can never finish) at the kill.
    fields = {"checkpoint_every_steps": 1, "max_steps": 400}
    jobs = _start_job(tiny_demo_dir, workdir, logs, "(1, 2)", 2, **fields)
    try:
        _wait_for_step(workdir, 4, jobs)
    except BaseException:
        _finish_job(jobs, logs, timeout=0)  # Kills both.
        raise
    jobs[1].kill()
    killed = time.time()
    (rc, log), _ = _finish_job(jobs, logs, timeout=30)
    assert time.time() - killed < 30
    assert rc == 75, log[-3000:]  # errors.EXIT_RELAUNCH, not SIGABRT (-6) after 60 s.
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, log[-3000:]
    directory = os.path.join(workdir, "checkpoints")
    match = re.fullmatch(
        r"error: Process 0 of 2 stopped at step (\d+): another process of the job is gone \(a "
        r"collective failed: .+\)\. The newest committed checkpoint is step (\d+) \("
        + re.escape(directory)
        + r"/\d+\); relaunching every process of the job \(the same command on each\) resumes "
        r"from it\.",
        errors[0],
    )
    assert match, errors[0]
    assert errors[0] == log.rstrip().splitlines()[-1]  # The last thing shown.
    assert "Traceback" not in log and "Fatal Python error" not in log
    committed = int(match[2])
    assert 1 <= committed < int(match[1])  # Saves lag the steps: later ones never committed.
    assert checkpoint.finished_steps(directory)[-1] == committed

    # The relaunch restores the newest committed step (a half-written one, if any, is ignored).
    fields["max_steps"] = committed + 2
    relaunched = _finish_job(_start_job(tiny_demo_dir, workdir, logs, "(1, 2)", 2, **fields), logs)
    for rc, log in relaunched:
        assert rc == 0, log[-3000:]
        assert f"Resumed from the checkpoint at step {committed} " in log
    assert checkpoint.finished_steps(directory)[-1] == committed + 2


@pytest.mark.slow  # Three processes and one: ~1.5 minutes on 2 cores.
def test_uneven_validation_shards_finish_with_the_error_over_every_image(tiny_demo_dir, tmp_path):
    """20 validation images over 3 processes are 7/7/6, in local batches of 6: 2/2/1 batches.

    Before the padding, process 2 finished its pass while 0 and 1 waited for it in
    their second batch's collective until killed.
    """
    fields = {"batch_size": 15, "eval_batch_size": 18, "max_steps": 1, "mesh_shape": "(-1, 1)"}
    single = tmp_path / "single"
    single_run = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "launch.py")]
        + tiny_launch_flags(tiny_demo_dir, single, **fields),
        cwd=ROOT,
        env=_subprocess_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    del fields["mesh_shape"]
    job = _start_job(tiny_demo_dir, tmp_path / "three", logs, "(3, 1)", 3, **fields)
    for rc, log in _finish_job(job, logs, timeout=300):
        assert rc == 0, log[-3000:]
    _, stderr = single_run.communicate(timeout=300)
    assert single_run.returncode == 0, stderr[-3000:]

    def validation(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if r["split"] == "val"]

    [three], [one] = validation(tmp_path / "three"), validation(single)
    assert three["step"] == one["step"] == 1
    # Each image counted once: errors are multiples of 1/20, equal to one process's.
    assert one["top1_error"] * 20 == pytest.approx(round(one["top1_error"] * 20))
    assert three["top1_error"] == one["top1_error"]
    assert three["top5_error"] == one["top5_error"]
    assert three["loss"] == pytest.approx(one["loss"], rel=1e-5)
