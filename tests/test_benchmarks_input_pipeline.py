"""The input-pipeline benchmark command runs on a tiny config and prints every number."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_input_pipeline_benchmark_command_prints_its_fields():
    command = [
        sys.executable,
        "-m",
        "alexnet_jax.benchmarks.input_pipeline",
        "--samples_dir=",
        "--synthetic_images=8",
        "--records=48",
        "--val_records=6",
        "--max_workers=2",
        "--rounds=1",
        "--batches_per_round=1",
        "--train_steps=1",
        "--config.batch_size=4",
        "--config.eval_batch_size=4",
        "--config.data.num_threads=1",
        "--config.data.augment_on=device",
        "--config.model.width=0.0625",
    ]
    env = {**os.environ, "ALEXNET_JAX_HOST_ALLOCATOR": "system"}  # No restart: a quicker test.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers, cpu = {}, []  # cpu: (label, us) in order; rows under a worker count repeat.
    for line in result.stdout.splitlines():
        match = re.match(r"\s+(.+):\s+([\d.]+) (images/s|x|us)$", line)
        if match and match.group(3) == "us":
            cpu.append((match.group(1).strip(), float(match.group(2))))
        elif match and "/ floor" not in line:
            numbers[match.group(1).strip()] = float(match.group(2))
    assert all(v > 0 for v in numbers.values()), result.stdout
    # The floor's CPU an image, then for each of in-process, 1 and 2 workers: all, main.
    floor, *per_count = cpu
    assert floor[0] == "host CPU per image" and floor[1] > 0
    assert [label for label, _ in per_count] == 3 * [
        "host CPU per image, all processes",
        "host CPU per image, main process",
    ]
    assert all(
        all_ >= main for (_, all_), (_, main) in zip(per_count[::2], per_count[1::2], strict=True)
    )
    # Host input in-process (the config's -1 is none on CPU), with 1 and 2 workers.
    inproc = numbers["host input, in-process (the config's: data.num_workers = -1)"]
    one, two = numbers["host input, 1 worker process"], numbers["host input, 2 worker processes"]
    loader = numbers["full-size per-image loader (PIL)"]
    step = numbers["train step, width 0.0625, float32, batch 4"]
    fed = numbers["train step fed by the training input"]
    assert numbers["validation pass, centre crops, batch 4"] > 0
    # Every printed ratio is the ratio of the printed rates (to the printed rounding).
    expected = {
        "2 workers / 1 worker": two / one,
        "configured input / full-size loader": inproc / loader,
        "configured input / train step": inproc / step,
        "fed / bare train step": fed / step,
    }
    for label, ratio in expected.items():
        assert numbers[label] == pytest.approx(ratio, rel=0.01, abs=0.01), label
    assert "uint8 crops + draws (finished on the device)" in result.stdout
    assert "batch 4, 1 threads per process" in result.stdout
    assert "synthetic" in result.stdout and "keeps up" in result.stdout


def test_host_augment_benchmark_prints_rates_ratios_and_cores():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.benchmarks.host_augment", "--rounds=1", "--repeat=1",
         "--samples_dir=/nonexistent", "--synthetic_images=8", "--target_images_per_sec=1000"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rates = [float(r) for r in re.findall(r"(\d+) images/s per core", result.stdout)]
    ratios = [float(r) for r in re.findall(r"\(\d/1\): ([\d.]+)x", result.stdout)]
    cores = float(re.search(r"cores for 1000 images/s with 3: ([\d.]+)", result.stdout)[1])
    assert len(rates) == 3 and all(r > 0 for r in rates)
    # Printed ratios and cores are the printed rates' (rounded to what is shown).
    assert ratios == pytest.approx([rates[1] / rates[0], rates[2] / rates[0]], rel=0.02, abs=0.01)
    assert cores == pytest.approx(1000 / rates[2], rel=0.02, abs=0.1)
