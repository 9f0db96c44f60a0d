"""Shared fixtures: a tiny generated dataset and a tiny config, so tests need no downloads."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_SAMPLES = os.path.join(ROOT, "..", "shared", "imagenet-samples")

# One persistent compilation cache for the session, its subprocesses included (they inherit
# the environment): many tests and launch.py runs compile the same tiny networks, and XLA:CPU
# compiles dominate the suite's time. Fresh per session, so no run reads another's entries.
# Set before JAX is imported, which reads it once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="alexnet_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

# The same process-level XLA settings as every command, before any test starts JAX.
from alexnet_jax import tuning  # noqa: E402

tuning.configure_process()


@pytest.fixture(scope="session")
def tiny_demo_dir(tmp_path_factory):
    """A 10-class demo dataset with 8 training and 2 validation images per class."""
    from alexnet_jax.data import demo

    data_dir = str(tmp_path_factory.mktemp("demo_data"))
    demo.generate(data_dir, train_per_class=8, val_per_class=2, seed=0)
    return data_dir


def tiny_config(data_dir: str):
    """The demo config at 1/16 width on a tiny dataset: seconds per step on CPU."""
    from configs import demo as demo_config

    config = demo_config.get_config()
    config.data.dir = data_dir
    config.data.demo_train_per_class = 8
    config.data.demo_val_per_class = 2
    config.data.num_threads = 1
    config.model.width = 1 / 16
    config.batch_size = 16
    config.eval_batch_size = 20
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    return config


@pytest.fixture(scope="session")
def tiny_trained_workdir(tiny_demo_dir, tmp_path_factory):
    """A workdir holding a 2-step ``tiny_config`` run (checkpoint, config, metrics.jsonl)."""
    from alexnet_jax import train

    workdir = str(tmp_path_factory.mktemp("tiny_trained"))
    config = tiny_config(tiny_demo_dir)
    config.max_steps = 2
    train.train_and_evaluate(config, workdir)
    return workdir


def tiny_launch_flags(data_dir: str, workdir, **overrides) -> list[str]:
    """launch.py flags for a tiny demo run on ``tiny_demo_dir`` (1/16 width, batch 16).

    ``overrides`` are further config fields, e.g. ``max_steps=3`` or ``mesh_shape="(1, 2)"``.
    """
    fields = {
        "data.dir": data_dir,
        "data.demo_train_per_class": 8,
        "data.demo_val_per_class": 2,
        "data.num_threads": 1,
        "model.width": 0.0625,
        "batch_size": 16,
        "eval_batch_size": 20,
        "log_every_steps": 1,
        **overrides,
    }
    return ["--config=configs/demo.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in fields.items()
    ]


@pytest.fixture(scope="session")
def fixed_batch_fit(tiny_demo_dir):
    """12 train steps of the demo's net on one fixed batch: losses, final step and lr.

    No dropout, and a learning rate low enough that the fit is smooth (at the demo's
    0.01 the first steps are chaotic: float rounding on another CPU changes where they go).
    """
    from alexnet_jax import inference, optim, train
    from alexnet_jax.data import pipeline

    config = tiny_config(tiny_demo_dir)
    config.model.dropout_rate = 0.0
    config.optim.learning_rate = 0.003
    net = inference.build_model(config)
    optimizer = optim.make_optimizer(config.optim)
    state = train.init_state(net, optimizer, seed=0)
    dataset = pipeline.open_dataset(tiny_demo_dir, how_to_prepare="(test data)")
    batch = next(
        pipeline.train_iterator(
            dataset,
            batch_size=16,
            seed=0,
            preprocessing=pipeline.Preprocessing.paper(dataset, 1 / 64),
            loading=pipeline.Loading(num_threads=1),
        )
    )
    # The demo's schedule is in epochs; 12 steps stay before its drop.
    schedule = optim.learning_rate_schedule(
        config.optim, batch_size=16, steps_per_epoch=100, total_steps=1000
    )
    step = train.jit_train_step(net, optimizer, schedule)
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return {
        "losses": losses,
        "step": int(state.step),
        "learning_rate": float(metrics["learning_rate"]),
        "configured_learning_rate": config.optim.learning_rate,
    }
