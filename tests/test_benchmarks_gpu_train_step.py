"""The GPU train-step script: its smoke path runs every stage on the CPU, its table and profile
read what the stages wrote, and a hanging stage is reported."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from alexnet_jax.benchmarks import gpu_table, step_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "alexnet_jax", "benchmarks", "gpu_train_step.sh")
STAGES = (
    "install", "environment", "profile_paper_bf16",
    "jax_paper_bf16", "torch_paper_bf16", "torch_compile_paper_bf16",
    "kernel_choices_paper_bf16",
    "jax_torchvision_bf16", "torch_torchvision_bf16", "torch_compile_torchvision_bf16",
    "jax_paper_f32", "torch_paper_f32", "table",
)  # fmt: skip


def _summary(stdout: str) -> dict[str, str]:
    lines = stdout.split("== summary", 1)[1].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if ": " in line)


@pytest.mark.slow  # Eleven processes, seven compiles on 2 cores: about 4 minutes.
def test_smoke_runs_every_stage_on_cpu(tmp_path):
    pytest.importorskip("torch")
    result = subprocess.run(
        ["bash", SCRIPT, "--smoke", "--skip_torch_compile", f"--log_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = _summary(result.stdout)
    assert list(summary) == [s for s in STAGES if not s.startswith("torch_compile")], summary
    assert all(status.startswith("ok") for status in summary.values()), summary
    rows = gpu_table.step_rows(str(tmp_path))
    ran = [r for r in rows if "torch.compile" not in r["label"]]
    assert all(r["images_per_s"] > 0 and r["batch"] == "2" for r in ran), rows
    assert rows[1]["net"] == "built from model.VARIANTS['paper']"
    choices = json.loads((tmp_path / gpu_table.KERNEL_CHOICES_FILE).read_text())["choices"]
    assert [c["options"] for c in choices] == [
        "none", "lrn=compute_dtype,max_pool=sliced,tower_convs=grouped,pad_input_channels=8"
    ]  # fmt: skip
    assert choices[0]["speed_vs_first"] == 1.0 and choices[1]["images_per_s"] > 0
    profile = json.loads((tmp_path / gpu_table.PROFILE_FILE).read_text())
    assert profile["top"] and 0 < sum(r["share"] for r in profile["top"]) <= 1.0 + 1e-9
    table = (tmp_path / "table.md").read_text()
    assert "| alexnet_jax, paper net, bfloat16 |" in table and "### Kernel options" in table


def test_a_hanging_stage_is_reported_and_the_rest_still_run(tmp_path):
    """A stand-in interpreter: no package importable, the profile hangs, the rest succeed."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        "  *benchmarks.step_profile*) exec sleep 60 ;;\n"
        "  -c*) exit 1 ;;\n"
        "  *) echo fake ;;\n"
        "esac\n"
    )
    fake.chmod(0o755)
    result = subprocess.run(
        ["bash", SCRIPT, "--smoke", f"--log_dir={tmp_path}", "--stage_timeout_s=1",
         f"--wheels={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": str(fake)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    summary = _summary(result.stdout)
    assert list(summary) == list(STAGES)
    assert summary["install"] == "FAILED (wheels missing)"
    assert "grain==0.2.18" in result.stdout and "gpu_train_step.sh download" in result.stdout
    assert summary["profile_paper_bf16"].startswith("TIMED OUT after 1 s")
    assert all(summary[s].startswith("ok") for s in STAGES[3:]), summary


def _write(path, out):
    path.write_text(json.dumps(out))


def test_the_table_reads_each_stage_and_checks_the_targets(tmp_path):
    def row(prefix, images, compile_s, memory, net=None):
        r = {f"{prefix}images_per_s": images, f"{prefix}compile_s": compile_s}
        r["device_peak_mib" if prefix == "" else "torch_device_peak_mib"] = memory
        if net:
            r[f"{prefix}net"] = net
        return {"batches": {"512": r}}

    _write(tmp_path / "jax_paper_bf16.json", row("", 32000.0, 20.0, 4400.0))
    _write(
        tmp_path / "torch_compile_paper_bf16.json",
        row("torch_compile_", 20000.0, 41.0, 4300.0, "built from model.VARIANTS['paper']"),
    )
    _write(tmp_path / "jax_torchvision_bf16.json", row("", 47000.0, 15.0, 3000.0))
    _write(
        tmp_path / "torch_compile_torchvision_bf16.json",
        row("torch_compile_", 40000.0, 30.0, 2500.0, "torchvision 0.26.0 models.alexnet"),
    )
    # torch_paper_bf16, the f32 rows and the torchvision eager row did not run.
    _write(tmp_path / gpu_table.KERNEL_CHOICES_FILE, {
        "variant": "paper", "compute_dtype": "bfloat16", "batch_size": 512,
        "device_kind": "NVIDIA H200",
        "choices": [
            {"options": "none", "images_per_s": 25000.0, "speed_vs_first": 1.0,
             "compile_s": 20.0, "xla_temporaries_mib": 3000.0},
            {"options": "lrn=compute_dtype", "images_per_s": 30000.0, "speed_vs_first": 1.2,
             "compile_s": 21.0, "xla_temporaries_mib": 2500.0},
        ],
    })  # fmt: skip
    _write(tmp_path / gpu_table.PROFILE_FILE, {
        "ms_per_step": 20.0, "source": "device kernels",
        "top": [{"op": "fusion.1", "share": 0.25, "ms_per_step": 5.0, "what": "a|b"}],
    })  # fmt: skip
    table = gpu_table.build_table(str(tmp_path))
    assert "### Train step, batch 512" in table
    assert "| alexnet_jax, paper net, bfloat16 | 32,000 | 20.0 | 4,400 | alexnet_jax |" in table
    assert "| PyTorch eager, same net, bf16 autocast | n/a | n/a | n/a | n/a |" in table
    assert "torchvision 0.26.0 models.alexnet |" in table
    assert "- paper net: JAX / torch.compile: 1.60x (target >= 1.5x): met" in table
    assert "- torchvision variant: JAX / torch.compile: 1.18x (target >= 1.2x): NOT met" in table
    assert "JAX <= torch.compile: 4,400 vs 4,300 MiB: NOT met" in table
    assert "| lrn=compute_dtype | 30,000 | 1.200 | 21.0 | 2,500 |" in table
    assert "| 25.0% | 5.000 | fusion.1 | a/b |" in table  # A "|" cannot break the table.
    assert "n/a" in gpu_table.build_table(str(tmp_path / "absent"))


def test_the_profile_reader_finds_the_traced_ops_and_what_they_compute(tmp_path):
    def f(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.tanh(y) ** 2)

    step = jax.jit(jax.grad(f))
    x, w = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8))
    compiled = step.lower(x, w).compile()
    jax.block_until_ready(compiled(x, w))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready(compiled(x, w))
    profile = jax.profiler.ProfileData.from_file(step_profile.trace_file(str(tmp_path)))
    events, source = step_profile._timed_events(profile)
    ops = step_profile.top_ops(events)
    assert ops and source
    assert sum(op.total_ns for op in ops) == pytest.approx(sum(d for _, d in events))
    assert [op.total_ns for op in ops] == sorted((op.total_ns for op in ops), reverse=True)
    metadata = step_profile.hlo_metadata(compiled.as_text())
    described = [step_profile.describe_op(metadata.get(op.name)) for op in ops]
    # The convolutions are traced and named by the JAX operation and line they came from.
    convs = [d for d in described if "conv_general_dilated" in d]
    assert convs and all("test_benchmarks_gpu_train_step.py:" in d for d in convs), described
    with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb"):
        step_profile.trace_file(str(tmp_path / "empty"))
