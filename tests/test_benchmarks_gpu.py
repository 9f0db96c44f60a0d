"""The GPU benchmark script: its smoke path runs every stage on the CPU, and a hang is reported."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "alexnet_jax", "benchmarks", "gpu.sh")
STAGES = ("install", "environment", "train_step_f32", "train_step_bf16", "input_pipeline")


def _summary(stdout: str) -> dict[str, str]:
    lines = stdout.split("== summary", 1)[1].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if ": " in line)


@pytest.mark.slow  # Every stage of gpu.sh, compiles included: about a minute on 2 cores.
def test_smoke_runs_every_stage_on_cpu(tmp_path):
    result = subprocess.run(
        ["bash", SCRIPT, "--smoke", f"--log_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = _summary(result.stdout)
    assert list(summary) == list(STAGES), result.stdout[-3000:]
    assert all(status.startswith("ok") for status in summary.values()), summary
    for dtype in ("f32", "bf16"):
        out = json.loads((tmp_path / f"train_step_{dtype}.json").read_text())
        assert out["batches"]["4"]["images_per_s"] > 0 and out["frameworks"] == ["jax"]
    assert "compute bfloat16" in (tmp_path / "train_step_bf16.log").read_text()
    assert "train step fed by the pipeline" in (tmp_path / "input_pipeline.log").read_text()


def test_a_hanging_stage_is_reported_and_the_rest_still_run(tmp_path):
    """A stand-in interpreter: no package importable, train steps hang, the rest succeed."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        "  *benchmarks.train_step*) exec sleep 60 ;;\n"
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
        timeout=60,
        env={**os.environ, "PYTHON": str(fake)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    summary = _summary(result.stdout)
    assert summary["install"] == "FAILED (wheels missing)"
    assert "grain==0.2.18" in result.stdout and "gpu.sh download" in result.stdout
    assert summary["train_step_f32"].startswith("TIMED OUT after 1 s")
    assert summary["train_step_bf16"].startswith("TIMED OUT after 1 s")
    assert summary["environment"].startswith("ok") and summary["input_pipeline"].startswith("ok")
