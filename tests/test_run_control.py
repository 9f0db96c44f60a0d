"""The workdir lock and the SIGTERM-to-stop request."""

import os
import signal

import pytest

from alexnet_jax import run_control, train
from tests.conftest import tiny_config


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


def test_sigterm_becomes_a_stop_request_and_the_old_handler_returns():
    before = signal.getsignal(signal.SIGTERM)
    with run_control.StopSignal(multi_process=False) as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # Handled: the process goes on.
        assert stop.should_stop(2) and stop.should_stop(3)  # Stays set until the loop stops.
    assert signal.getsignal(signal.SIGTERM) is before


def test_without_jax_distributed_a_multi_process_stop_signal_never_fires():
    with run_control.StopSignal(multi_process=True) as stop:
        assert not stop.should_stop(1)
