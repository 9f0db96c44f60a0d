"""The workdir lock, and SIGTERM or SIGINT: a stop request, then (twice) a stop at once."""

import os
import signal
import subprocess
import sys
import time

import pytest

from alexnet_jax import run_control, train
from tests.conftest import ROOT, tiny_config


def test_workdir_lock_refuses_a_second_holder(tmp_path):
    with (
        run_control.WorkdirLock(str(tmp_path)),
        pytest.raises(run_control.WorkdirInUseError, match=f"pid {os.getpid()}"),
    ):
        run_control.WorkdirLock(str(tmp_path)).acquire()
    run_control.WorkdirLock(str(tmp_path)).acquire().release()  # Free again after release.


def test_second_training_launch_into_a_busy_workdir_refuses(tiny_demo_dir, tmp_path):
    config = tiny_config(tiny_demo_dir)
    with (
        run_control.WorkdirLock(str(tmp_path)),  # Stands in for a run already training there.
        pytest.raises(run_control.WorkdirInUseError, match="already training in"),
    ):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_workdir_lock_names_its_holder_in_the_lock_file(tmp_path):
    with run_control.WorkdirLock(str(tmp_path), process_index=3) as lock:
        assert lock.path == os.path.join(str(tmp_path), ".lock.3")
        with open(lock.path) as f:
            assert f.read().startswith(f"pid {os.getpid()} on ")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_first_signal_becomes_a_stop_request_and_the_old_handlers_return(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    wakeup_before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_before)
    with run_control.StopSignal(multi_process=False) as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signum)  # Handled: the process goes on.
        assert stop.should_stop(2) and stop.should_stop(3)  # Stays set until the loop stops.
        assert stop.reason == signum.name
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(wakeup_before) == wakeup_before


# The main thread sleeps in C (as in a collective that never returns) when the second
# signal comes: the watcher thread, not the main thread, ends the process.
SECOND_SIGNAL = """
import os, signal, sys, time
from alexnet_jax import run_control
with run_control.StopSignal(multi_process=False, resume_note=lambda: "Resume note.") as stop:
    os.kill(os.getpid(), signal.{name})
    time.sleep(0.5)
    print("asked to stop:", stop.should_stop(1), flush=True)
    os.kill(os.getpid(), signal.{name})
    time.sleep(60)
print("not stopped")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once_saying_nothing_was_saved(signum):
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL.format(name=signum.name)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 128 + signum, result.stderr[-2000:]
    assert time.time() - start < 30
    assert result.stdout == "asked to stop: True\n"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: a second {signum.name} stopped the run at once, without saving. Resume note."
    ]
    assert f"{signum.name}: saving at the next step boundary" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_jax_distributed_a_multi_process_stop_signal_never_fires():
    with run_control.StopSignal(multi_process=True) as stop:
        assert not stop.should_stop(1)
