"""The train-step benchmark times the config's network and prints every field it promises."""

import os
import re
import subprocess
import sys

import pytest

from alexnet_jax import tuning
from alexnet_jax.benchmarks import train_step
from configs import imagenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"[0-9.]+"


def tiny_config(**model_fields):
    """configs/imagenet.py at 1/16 width with 10 classes (as --config.model.* would set it)."""
    config = imagenet.get_config()
    config.model.width = 1 / 16
    config.model.num_classes = 10
    for k, v in model_fields.items():
        config.model[k] = v
    return config


def test_benchmark_prints_its_fields(capsys):
    config = tiny_config()
    out = train_step.run(
        config, [2], steps=1, frameworks=("jax",), matmul_size=128, skip_layers=True,
        skip_eval=True,
    )  # fmt: skip
    text = capsys.readouterr().out
    for pattern in (
        r"host CPU: .*; avx512f (yes|no), avx512_bf16 (yes|no), amx_tile (yes|no), amx_bf16",
        rf"host allocator: \w+; CPU convolutions: {tuning.cpu_conv_library()}; kernels: "
        r"lrn='lrn_fused_gradient', .*conv_layers=InChunks\(size=8\); kernel options: none",
        r"network: width 0.0625, 10 classes, LRN True, 227,314 parameters, compute float32",
        rf"matmul peak: {NUMBER} GFLOP/s \(float32 128x128",
        rf"peak for fractions: {NUMBER} TFLOP/s \(measured float32 matmul\)",
        rf"model FLOPs: {NUMBER} GFLOP per training image",
        rf"\[jax\] batch 2: {NUMBER} images/s, {NUMBER} GFLOP/s, {NUMBER} of peak, "
        rf"compile {NUMBER} s",
        rf"\[jax\] memory at batch 2: XLA's step buffers: arguments {NUMBER} MiB",
        rf"peak resident memory: {NUMBER} MiB \(process, after batch 2; holds jax;",
        r"\[torch\] batch 2: skipped",
        r"\[torch_compile\] batch 2: skipped",
    ):
        assert re.search(pattern, text), f"missing {pattern!r} in:\n{text}"
    row = out["batches"][2]
    assert row["images_per_s"] > 0 and row["compile_s"] > 0
    assert row["gflops"] == pytest.approx(row["images_per_s"] * out["train_gflop_per_image"])
    assert out["params"] == 227_314  # The 1/16-width net with 10 classes.
    assert config.batch_size == 128  # The caller's config is not changed.


@pytest.mark.slow  # The per-layer table compiles each layer's forward and backward: ~1 minute.
def test_benchmark_prints_the_eval_rates_and_the_per_layer_table(capsys):
    out = train_step.run(tiny_config(), [2], steps=1, frameworks=("jax",), matmul_size=128)
    text = capsys.readouterr().out
    for pattern in (
        rf"\[eval\] centre crop: {NUMBER} images/s .*10 crops: {NUMBER} images/s",
        r"per-layer times, batch 2",
        r"whole train step",
    ):
        assert re.search(pattern, text), f"missing {pattern!r} in:\n{text}"
    layers = [row[0] for row in out["layers"]]
    assert layers == [
        "conv1", "lrn1+pool1", "conv2", "lrn2+pool2", "conv3", "conv4", "conv5", "pool5",
        "fc6", "fc7", "fc8",
    ]  # fmt: skip
    assert all(fwd > 0 and both > 0 for _, _, fwd, both in out["layers"])


def test_bfloat16_compute_runs_both_frameworks_with_kernel_options(capsys):
    pytest.importorskip("torch")
    out = train_step.run(
        tiny_config(compute_dtype="bfloat16"),
        [2],
        steps=1,
        frameworks=("jax", "torch"),
        skip_layers=True,
        skip_eval=True,
        matmul_size=128,
        kernel_options="lrn=compute_dtype,pad_input_channels=4",
    )
    text = capsys.readouterr().out
    assert "compute bfloat16" in text and "(bfloat16 128x128 under XLA" in text
    assert re.search(
        r"kernels: lrn='lrn_in_compute_dtype', .*PaddedInputChannels\(multiple=4, "
        r"convolve=SideBySideConv\(.*kernel options: lrn=compute_dtype,pad_input_channels=4",
        text,
    ), text
    assert out["kernel_options"] == "lrn=compute_dtype,pad_input_channels=4"
    # On the CPU, torch runs there too, as before: NCHW under CPU autocast.
    assert re.search(
        rf"\[torch\] batch 2: {NUMBER} images/s, .*\(\d+ threads, bfloat16 autocast, "
        r"[0-9,]+ parameters, built from model.VARIANTS\['paper'\]\)",
        text,
    ), text
    assert re.search(rf"ratio jax/torch at batch 2: {NUMBER}x", text), text
    assert out["batches"][2]["torch_images_per_s"] > 0


@pytest.mark.slow  # inductor compiles C++ for minutes on 2 busy cores.
def test_torch_compile_is_timed_with_its_compile_time(capsys):
    pytest.importorskip("torch")
    out = train_step.run(
        tiny_config(),
        [2],
        steps=1,
        frameworks=("jax", "torch_compile"),
        skip_layers=True,
        skip_eval=True,
        matmul_size=128,
    )
    text = capsys.readouterr().out
    row = out["batches"][2]
    if "torch_compile_images_per_s" not in row:
        pytest.skip(f"inductor does not work here: {text}")
    assert row["torch_compile_compile_s"] > 0 and row["ratio_torch_compile"] > 0
    assert re.search(rf"ratio jax/torch_compile at batch 2: {NUMBER}x", text), text


def test_frameworks_one_alone_or_all_less_the_skipped():
    select = train_step.selected_frameworks
    assert select("all") == ("jax", "torch", "torch_compile")
    assert select("all", skip_torch=True) == ("jax", "torch_compile")
    assert select("all", skip_torch=True, skip_torch_compile=True) == ("jax",)
    assert select("torch_compile") == ("torch_compile",)
    with pytest.raises(ValueError, match="nothing to time"):
        select("torch", skip_torch=True)


def test_command_takes_a_config_and_overrides(tmp_path):
    """The command line: --config plus --config.* overrides pick the network; mirrors are gone."""
    command = [
        sys.executable, "-m", "alexnet_jax.benchmarks.train_step",
        "--config=configs/demo.py", "--config.model.width=0.0625", "--batch_sizes=2",
        "--steps=1", "--matmul_size=64", "--framework=jax", "--skip_layers", "--skip_eval",
        f"--json={tmp_path / 'out.json'}",
    ]  # fmt: skip
    env = {**os.environ, "ALEXNET_JAX_HOST_ALLOCATOR": "system"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "width 0.0625, 10 classes" in result.stdout  # configs/demo.py has 10 classes.
    assert (tmp_path / "out.json").exists()
    removed = subprocess.run(
        [*command[:3], "--width=0.5"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert removed.returncode != 0 and "width" in removed.stderr


def test_a_failed_torch_compile_skips_that_step_alone(monkeypatch):
    """The torch turns are built without torch here: the step builder is replaced."""
    from alexnet_jax.benchmarks import torch_reference

    def fake_step(config, batch, *, compiled, device):
        if compiled:
            raise torch_reference.TorchCompileError("torch.compile failed: no compiler")
        return (lambda: None), {"device": device}

    monkeypatch.setattr(torch_reference, "torch_train_step", fake_step)
    steps, info, failed = torch_reference.train_steps(
        tiny_config(), ["torch", "torch_compile"], {}, "cpu"
    )
    assert list(steps) == ["torch"] and info == {"torch": {"device": "cpu"}}
    assert failed == {"torch_compile": "torch.compile failed: no compiler"}
