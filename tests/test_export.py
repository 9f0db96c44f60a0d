"""export.py on a tiny trained workdir: the file's probabilities are predict's, for any batch."""

import os
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import export, inference, predict
from alexnet_jax.data import pipeline, records
from tests.conftest import ROOT

pytest.importorskip("flatbuffers", reason="jax.export serialization (requirements-export.txt)")

PYTHONPATH = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
ENV = {**os.environ, "PYTHONPATH": PYTHONPATH, "JAX_PLATFORMS": "cpu"}


def _run_export(*flags):
    cmd = [sys.executable, "-m", "alexnet_jax.export", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny_trained_workdir):
    return inference.load_trained(tiny_trained_workdir)


@pytest.fixture(scope="module")
def exported_file(tiny_trained_workdir, tmp_path_factory):
    """The tiny run exported by the command, with its default platforms."""
    path = str(tmp_path_factory.mktemp("export") / "tiny.jax_exported")
    run = _run_export(f"--workdir={tiny_trained_workdir}", f"--output={path}")
    assert run.returncode == 0, run.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def val_images(trained):
    """Five prepared uint8 256x256 validation images."""
    source = trained.dataset.source("val")
    examples = [records.decode_example(source[i]) for i in range(5)]
    return np.stack([pipeline.decode_jpeg(e["image"]) for e in examples])


def test_reloaded_file_gives_predicts_probabilities_for_two_batch_sizes(
    trained, exported_file, val_images
):
    run = export.load(exported_file)
    for n in (5, 2):  # One file, one symbolic batch size.
        expected = predict.predict_probabilities(trained, val_images[:n], batch_size=n)
        got = np.asarray(run(np.stack([inference.centre_patch(im) for im in val_images[:n]])))
        assert got.shape == (n, trained.config.model.num_classes) and got.dtype == np.float32
        # predict runs the CPU schedules (side-by-side convs, chunks), the file the plain
        # forms: the same float32 sums in another order, a few ulp apart. Probabilities are
        # at most 1, whose ulp is 1.2e-7: atol 1e-6 is about 8 ulp, rtol 1e-5 for small ones.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_metadata_names_the_classes_input_and_platforms(trained, exported_file):
    meta = export.load_metadata(exported_file)
    assert meta["classes"] == trained.classes
    assert meta["input"]["shape"] == ["b", 224, 224, 3] and meta["input"]["dtype"] == "uint8"
    assert "16:240" in meta["input"]["preprocessing"]
    assert meta["inside"]["input_scale"] == trained.config.data.input_scale
    assert meta["platforms"] == ["cpu", "cuda"]  # Lowered for CUDA without a GPU.
    assert meta["checkpoint_step"] == trained.step


def test_without_cuda_lowering_the_default_falls_back_to_cpu(trained, monkeypatch):
    lower = export.export_model

    def cpu_only(trained, platforms):
        if "cuda" in platforms:
            raise export.ExportError("Cannot lower the model for cuda: no rule")
        return lower(trained, platforms)

    monkeypatch.setattr(export, "export_model", cpu_only)
    assert export.export_with_fallback(trained, None).platforms == ("cpu",)
    with pytest.raises(export.ExportError, match="for cuda"):
        export.export_with_fallback(trained, ["cuda"])  # Asked for: no fallback.


def test_a_workdir_without_checkpoints_exits_3_with_one_message(tmp_path):
    run = _run_export(f"--workdir={tmp_path}", f"--output={tmp_path / 'f'}")
    assert run.returncode == 3, run.stderr[-3000:]  # cli.EXIT_NO_CHECKPOINT
    assert run.stderr.startswith(f"error: No checkpoint in {tmp_path}")
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "f")


def test_an_unknown_format_exits_2_naming_the_accepted_ones(tmp_path):
    run = _run_export(f"--workdir={tmp_path}", "--format=tflite")
    assert run.returncode == 2, run.stderr[-3000:]  # cli.EXIT_USAGE
    assert run.stderr == "error: --format: unknown 'tflite'; accepted: stablehlo, onnx\n"
    run = _run_export(f"--workdir={tmp_path}", "--format=onnx", "--platforms=cuda")
    assert run.returncode == 2 and run.stderr.startswith("error: --platforms is for --format=")
