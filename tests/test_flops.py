"""Model FLOPs counted from the model's own layers, and the accelerators' datasheet peaks."""

import pytest

from alexnet_jax import flops
from configs import imagenet

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
    config = imagenet.get_config()
    assert flops.forward_flops_per_image(config) == 2 * PAPER_FORWARD_MACS
    assert flops.train_flops_per_image(config) == pytest.approx(4.346e9, rel=1e-3)


def test_flops_follow_the_width():
    config = imagenet.get_config()
    config.model.width = 0.5
    assert flops.forward_flops_per_image(config) < 0.3 * 2 * PAPER_FORWARD_MACS


def test_chip_peaks_follow_dtype_and_precision():
    peak = flops.chip_peak_tflops
    assert peak("NVIDIA H200", "bfloat16") == (989.5, "H200 datasheet, dense bfloat16")
    assert peak("NVIDIA H200", "float32")[0] == 494.5  # JAX's default: TF32 tensor cores.
    assert peak("NVIDIA H200", "float32", "highest")[0] == 67.0
    assert peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.5
    assert peak("cpu", "float32") is None
