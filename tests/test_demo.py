"""The generated demo dataset: it writes only into folders it made, and never deletes others."""

import hashlib
import os
import subprocess
import sys

import pytest

from alexnet_jax import config_lib, train
from alexnet_jax.data import demo, records
from tests.conftest import ROOT, tiny_config


def _snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def users_dataset(tmp_path):
    """A prepared dataset the demo did not create (no marker), with an unrelated file in it."""
    folder = tmp_path / "my_prepared_dataset"
    demo.generate(str(folder), train_per_class=2, val_per_class=1, seed=3)
    os.remove(folder / demo.MARKER_FILE)  # As `prepare` writes it: no demo marker.
    (folder / "notes.txt").write_text("my notes\n")
    return folder


def test_launch_with_the_demo_source_on_a_users_dataset_changes_nothing(users_dataset, tmp_path):
    before = _snapshot(users_dataset)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/demo.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data.dir={users_dataset}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert _snapshot(users_dataset) == before  # Byte for byte, the extra file included.
    message = result.stderr
    assert "config.data.source = 'demo'" in message and str(users_dataset) in message
    assert "--config.data.source=prepared" in message
    assert "Traceback" not in message


def test_load_dataset_refuses_a_foreign_folder_naming_the_fields(users_dataset):
    config = tiny_config(str(users_dataset))
    before = _snapshot(users_dataset)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.dir.*notes\.txt"):
        train.load_dataset(config)
    assert _snapshot(users_dataset) == before


def test_a_stale_demo_is_regenerated_removing_only_its_own_files(tmp_path):
    folder = tmp_path / "demo"
    demo.generate(str(folder), train_per_class=2, val_per_class=1, seed=0)
    (folder / "keep.txt").write_text("mine\n")  # Put there by the user later.
    own = set(os.listdir(folder)) - {"keep.txt", demo.MARKER_FILE}
    assert own and records.METADATA_FILE in own
    metadata = demo.ensure(str(folder), train_per_class=3, val_per_class=1, seed=0)
    assert metadata["splits"]["train"]["num_examples"] == 3 * len(demo.CLASSES)
    assert (folder / "keep.txt").read_text() == "mine\n"
    # Unchanged counts: nothing regenerated.
    stamp = os.stat(folder / records.METADATA_FILE).st_mtime_ns
    demo.ensure(str(folder), train_per_class=3, val_per_class=1, seed=0)
    assert os.stat(folder / records.METADATA_FILE).st_mtime_ns == stamp


def test_a_marker_cannot_point_outside_its_folder(tmp_path):
    folder, outside = tmp_path / "demo", tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    folder.mkdir()
    (folder / demo.MARKER_FILE).write_text('{"files": ["../precious.txt", "/etc/hostname", ".."]}')
    demo.generate(str(folder), train_per_class=1, val_per_class=1, seed=0)
    assert outside.read_text() == "keep me\n"
    assert records.read_metadata(str(folder))["splits"]["val"]["num_examples"] == 10


def test_an_unwritable_demo_folder_names_the_field(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # A folder cannot be made under a file, even by root.
    config = tiny_config(str(blocker / "demo"))
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.dir.*a_file.*writable"):
        train.load_dataset(config)
