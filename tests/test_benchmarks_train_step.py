"""The train-step benchmark runs on a tiny network and prints every field it promises."""

import re

import pytest

from alexnet_jax import tuning
from alexnet_jax.benchmarks import train_step

# Multiply-adds of the paper's layers per 224x224 image (conv1..conv5, fc6..fc8), x2 for FLOPs.
PAPER_FORWARD_MACS = (
    55 * 55 * 96 * 11 * 11 * 3
    + 27 * 27 * 256 * 5 * 5 * 48
    + 13 * 13 * 384 * 3 * 3 * 256
    + 13 * 13 * 384 * 3 * 3 * 192
    + 13 * 13 * 256 * 3 * 3 * 192
    + 9216 * 4096
    + 4096 * 4096
    + 4096 * 1000
)


def test_forward_flops_match_the_papers_layers():
    config = train_step._config(1.0, 1000, True, 1)
    assert train_step.forward_flops_per_image(config) == 2 * PAPER_FORWARD_MACS
    assert pytest.approx(4.346e9, rel=1e-3) == 3 * 2 * PAPER_FORWARD_MACS


def test_benchmark_prints_its_fields(capsys):
    out = train_step.run(
        [2], steps=1, width=1 / 16, num_classes=10, skip_torch=True, matmul_size=128
    )
    text = capsys.readouterr().out
    number = r"[0-9.]+"
    for pattern in (
        rf"host allocator: \w+; CPU convolutions: {tuning.cpu_conv_library()}; kernels: "
        r"lrn='lrn_fused_gradient', .*conv_layers=InChunks\(size=8\)",
        rf"matmul peak: {number} GFLOP/s",
        rf"model FLOPs: {number} GFLOP per training image",
        rf"\[jax\] batch 2: {number} images/s, {number} GFLOP/s, {number} of matmul peak, "
        rf"compile {number} s",
        rf"peak resident memory: {number} MiB",
        r"\[torch\] batch 2: skipped",
        rf"\[eval\] centre crop: {number} images/s .*10 crops: {number} images/s",
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
    row = out["batches"][2]
    assert row["images_per_s"] > 0 and row["compile_s"] > 0
    assert row["gflops"] == pytest.approx(row["images_per_s"] * out["train_gflop_per_image"])
    assert out["params"] == 227_314  # The 1/16-width net with 10 classes.


def test_torch_reference_is_the_same_network():
    pytest.importorskip("torch")
    net = train_step.torch_alexnet(num_classes=1000, width=1.0, use_lrn=True)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224
