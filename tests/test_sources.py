"""The ILSVRC-2012 class list and validation labels that ship with the package."""

import os

import pytest

from alexnet_jax.data import sources


def test_the_shipped_class_order_is_the_1000_sorted_wnids():
    wnids = sources.ilsvrc2012_wnids()
    assert len(wnids) == 1000 == len(set(wnids)) and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"  # Tench; toilet tissue.
    labels = sources.ilsvrc2012_validation_wnids()
    assert len(labels) == 50_000 and set(labels) == set(wnids)
    assert all(labels.count(w) == 50 for w in wnids[:20])  # 50 validation images a class.
    assert labels[0] == "n01751748"  # ILSVRC2012_val_00000001.JPEG: a sea snake.


def test_the_shipped_lists_equal_tensorflow_datasets_copies():
    tfds = pytest.importorskip("tensorflow_datasets")
    folder = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
    with open(os.path.join(folder, "labels.txt")) as f:
        assert f.read().split() == sources.ilsvrc2012_wnids()
    with open(os.path.join(folder, "validation_labels.txt")) as f:
        assert f.read().split() == sources.ilsvrc2012_validation_wnids()


def test_reading_the_lists_needs_no_tensorflow_datasets(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "tensorflow_datasets.py"
    blocker.write_text("raise ImportError('tensorflow_datasets is not installed here')\n")
    code = (
        "from alexnet_jax.data import sources; "
        "print(len(sources.ilsvrc2012_wnids()), len(sources.ilsvrc2012_validation_wnids()))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1000", "50000"]
