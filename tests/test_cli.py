"""Exit codes (alexnet_jax/cli.py, alexnet_jax/errors.py): a user error is one line and its
kind's code; anything else keeps its traceback."""

import ast
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys

import pytest

import alexnet_jax
from alexnet_jax import (
    checkpoint,
    cli,
    config_lib,
    diagnostics,
    errors,
    import_weights,
    inference,
    run_control,
    tuning,
)
from alexnet_jax.data import pipeline, sources
from tests.conftest import ROOT

# Each user error docs/faults.md (and the commands' docs) names, with its documented exit code.
DOCUMENTED = [
    (config_lib.ConfigError("config.batch_size = 0 is not valid: expected an int >= 1"), 2),
    (tuning.SettingError("ALEXNET_JAX_CPU_CONVS='mkl'; accepted: one of ('eigen',)"), 2),
    (run_control.WorkdirInUseError("Another run is already training in /w (pid 7 on h)"), 2),
    (checkpoint.CheckpointSaveError("Saving a checkpoint to /w failed, so training stopped"), 2),
    (diagnostics.StuckError("the loss is at chance; stopping"), 2),
    (diagnostics.NotFiniteError("Loss is nan at step 3: stopping."), 2),
    (sources.SourceError("--source='x' does not exist or is not a directory"), 2),
    (pipeline.DatasetMissingError("No prepared dataset at '/d'"), 2),
    (inference.MissingConfigError("pass --config"), 2),
    (import_weights.WeightsFormatError("w.pth is not a PyTorch state_dict"), 2),
    (checkpoint.NoUsableCheckpointError("No usable checkpoint in /w: step 2: damaged"), 3),
    (inference.CheckpointMissingError("No checkpoint in /w"), 3),
]

# Exceptions that never reach a command as they are, and where they end instead.
INTERNAL = {
    "BadImageError": "one file's fault: listed in metadata.json or predict's report",
    "CorruptCheckpointError": "checkpoint.first_usable tries the next step, then NoUsable...",
    "ForeignDirectoryError": "train.load_dataset turns it into a ConfigError",
    "ExportError": "export._run turns it into a UsageError",
    "TorchCompileError": "the benchmark reports it as a row's note",
    "WorkerError": "a bug or a broken machine: prepare exits 1 with the worker's traceback",
    "_WorkerTracebackError": "only ever the cause of an input worker's own exception, re-raised",
}


@pytest.mark.parametrize("error, code", DOCUMENTED, ids=lambda x: type(x).__name__)
def test_each_user_error_is_one_line_with_its_documented_code(error, code, capsys):
    def body():
        raise error

    assert cli.run_reporting_errors(body) == code
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize(
    "bug, name",
    [("int('seven')", "ValueError"), ("open('/nonexistent/alexnet_jax')", "FileNotFoundError")],
)
def test_an_unexpected_error_keeps_its_traceback_and_exits_1(bug, name):
    program = (
        "import sys\nfrom alexnet_jax import cli\n"
        f"sys.exit(cli.run_reporting_errors(lambda: {bug}))"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"{name}: " in result.stderr and "error: " not in result.stderr


def _project_exceptions() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(alexnet_jax.__path__, "alexnet_jax."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ):
                found[name] = value
    return found


def test_every_project_exception_is_a_user_error_kind_or_named_internal():
    found = _project_exceptions()
    assert set(INTERNAL) <= set(found)  # A renamed one must be renamed here too.
    kinds = (errors.UsageError, errors.RunStoppedError, errors.NoCheckpointError)
    for name, exception in found.items():
        if name in INTERNAL or exception.__module__ == "alexnet_jax.errors":
            continue
        assert issubclass(exception, kinds), f"{exception.__module__}.{name}"
        assert not issubclass(exception, tuple(found[n] for n in INTERNAL)), name


def _project_imports(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax"):
            if node.module == "alexnet_jax":
                names |= {f"alexnet_jax.{a.name}" for a in node.names}
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("alexnet_jax")}
    return names


def test_cli_imports_only_the_error_kinds_which_import_nothing():
    package = os.path.join(ROOT, "alexnet_jax")
    assert _project_imports(os.path.join(package, "cli.py")) == {"alexnet_jax.errors"}
    assert _project_imports(os.path.join(package, "errors.py")) == set()
