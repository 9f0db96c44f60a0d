"""The GPU benchmark script: what it installs covers what its commands import, its smoke path runs
every stage (on the CPU here, and in a venv shaped like the GPU image), a hang is reported, and
its training-run stages read and check what the loop wrote."""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image

from alexnet_jax.benchmarks import loop_report, synthetic_imagenet
from alexnet_jax.data import pipeline, records, sources, writer
from tests.conftest import ROOT

BENCHMARKS = os.path.join(ROOT, "alexnet_jax", "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "gpu.sh")
GPU_SCRIPTS = ("gpu.sh", "gpu_train_step.sh")
LOOP_STAGES = ("loop_data", "loop_train", "loop_resume", "loop_evaluate", "loop_report")
STAGES = (
    "install", "environment", "train_step_f32", "train_step_bf16", "input_pipeline", *LOOP_STAGES
)  # fmt: skip
# Imported by alexnet_jax, but never by a command the GPU scripts run: (module, why).
OPTIONAL_IMPORTS = {
    "tensorflow_datasets": "only data.source=tfds and prepare --source=tfds:... read it",
}
GPU_IMAGE_VENV = os.path.join(ROOT, "..", "shared", "tools", "gpu-image-venv.sh")


def _summary(stdout: str) -> dict[str, str]:
    lines = stdout.split("== summary", 1)[1].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if ": " in line)


def _bash_list(name: str) -> list[str]:
    """A bash array of gpu_common.sh, as the scripts see it."""
    script = f'source alexnet_jax/benchmarks/gpu_common.sh; printf "%s\\n" "${{{name}[@]}}"'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _entry_modules() -> set[str]:
    """The Python commands the GPU scripts run: ``-m alexnet_jax...`` and ``launch.py``."""
    modules = set()
    for script in GPU_SCRIPTS:
        with open(os.path.join(BENCHMARKS, script)) as f:
            text = f.read()
        modules |= set(re.findall(r"-m[\s\\]+(alexnet_jax(?:\.\w+)+)", text))
        if re.search(r"\blaunch\.py\b", text):
            modules.add("launch")
    return modules


def _module_file(module: str) -> str | None:
    base = os.path.join(ROOT, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _third_party_imports(entries: set[str]) -> dict[str, str]:
    """{top-level module: a project module importing it} over every project module the entries
    import, followed through the project's own imports, at any depth (a function's too: the
    lazily imported tensorboardX counts)."""
    todo, seen, found = sorted(entries), set(), {}
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in ("alexnet_jax", "launch", "configs"):
                    todo.append(name)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, module)
    return found


# Requirement markers as the GPU image evaluates them (Python 3.12, Linux, x86-64).
GPU_IMAGE_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
}  # fmt: skip


def _requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install with their dependencies (canonical names),
    read from the installed packages' metadata; one this environment lacks adds only itself."""
    todo = [Requirement(r) for r in requirements]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        requirement = todo.pop()
        key = (_canonical(requirement.name), tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        extras = sorted(requirement.extras) or [""]
        for text in requires:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(
                marker.evaluate({**GPU_IMAGE_MARKERS, "extra": e}) for e in extras
            ):
                todo.append(dependency)
    return {name for name, _ in seen}


def test_the_wheels_cover_every_import_of_the_gpu_scripts_commands():
    """What the commands import, and what that requires, is in the GPU image or pinned."""
    pins, modules = _bash_list("GPU_WHEEL_PINS"), _bash_list("GPU_WHEEL_MODULES")
    image = _bash_list("GPU_IMAGE_PACKAGES")
    entries = _entry_modules()
    assert {"launch", "alexnet_jax.evaluate", "alexnet_jax.benchmarks.input_pipeline"} <= entries
    imports = _third_party_imports(entries)
    distributions = importlib.metadata.packages_distributions()
    needed: dict[str, str] = {}
    for top, importer in imports.items():
        if top in OPTIONAL_IMPORTS:
            continue
        for name in distributions.get(top, [top]):
            needed.setdefault(name, f"{top}, imported by {importer}")
    closure = _requirement_closure(list(needed))
    pinned = {_canonical(Requirement(p).name) for p in pins}
    have = _requirement_closure(image) | pinned
    # The known misses of the first GPU run are found (one imported lazily).
    assert {"simplejpeg", "tensorboardx", "grain"} <= closure
    missing = sorted(closure - have)
    why = {_canonical(n): w for n, w in needed.items()}
    assert not missing, (
        f"not in the GPU image and not pinned in gpu_common.sh's GPU_WHEEL_PINS: "
        f"{[(m, why.get(m, 'a dependency')) for m in missing]}"
    )
    # The pins install without dependencies: theirs must be there too.
    assert _requirement_closure(pins) <= have
    # Each pin's module is the one the script checks for importability.
    assert len(modules) == len(pins)
    for module, pin in zip(modules, pins, strict=True):
        owners = distributions.get(module)
        if owners:  # Installed here.
            assert _canonical(Requirement(pin).name) in map(_canonical, owners), (module, pin)


def test_synthetic_imagenet_is_a_prepared_dataset_of_the_1000_classes(tmp_path):
    metadata = synthetic_imagenet.write(
        str(tmp_path / "data"), train_records=37, val_records=11, distinct_images=5
    )
    dataset = pipeline.open_dataset(str(tmp_path / "data"), how_to_prepare="-")
    assert dataset.num_classes == 1000 and metadata["standard_ilsvrc2012_order"]
    assert [c["id"] for c in dataset.metadata["classes"]] == sources.ilsvrc2012_wnids()
    assert (dataset.num_examples("train"), dataset.num_examples("val")) == (37, 11)
    source = dataset.source("train")
    examples = [records.decode_example(source[i]) for i in range(37)]
    assert [e["label"] for e in examples] == list(range(37))
    # Record i is distinct image i % 5: the same JPEG bytes.
    assert examples[7]["image"] == examples[2]["image"] != examples[3]["image"]
    pixels = [pipeline.decode_jpeg(e["image"]) for e in examples]
    assert pixels[0].shape == (256, 256, 3) and pixels[0].dtype == np.uint8
    # The mean image and PCA are the training records' (of the pixels before their JPEG, as
    # prepare computes them): each distinct image counted 7 or 8 times.
    rng = np.random.default_rng(0)  # write's default seed.
    distinct = [synthetic_imagenet.smooth_image(rng) for _ in range(5)]
    originals = np.stack([distinct[i % 5] for i in range(37)]).astype(np.float64)
    np.testing.assert_allclose(dataset.mean_image(), originals.mean(axis=0), rtol=1e-6)
    flat = originals.reshape(-1, 3) / 255
    eigenvalues, _ = dataset.rgb_eigen()
    np.testing.assert_allclose(
        eigenvalues, np.sort(np.linalg.eigvalsh(np.cov(flat.T, bias=True)))[::-1], rtol=1e-6
    )
    # Each record holds its image as prepare encodes one.
    jpeg = writer.encode_jpeg(Image.fromarray(distinct[3]))
    assert examples[3]["image"] == examples[8]["image"] == jpeg
    with pytest.raises(synthetic_imagenet.DatasetExistsError, match="already holds"):
        synthetic_imagenet.write(str(tmp_path / "data"), train_records=1, val_records=1)


def _rows(first: int, last: int, every: int, *, resumed_at: int | None) -> list[dict]:
    rows = []
    for step in range(every, last + 1, every):
        if resumed_at is None and step > first:
            break
        rows.append({"step": step, "split": "train", "images_per_sec": 100.0 * step,
                     "data_wait_fraction": step / 1000})  # fmt: skip
        if step in (first, last):
            rows.append({"step": step, "split": "val", "top1_error": 0.99})
    if resumed_at is not None and resumed_at != first:  # Restarted from scratch instead.
        rows += _rows(first, last, every, resumed_at=None)
    return rows


def test_the_loop_report_reads_the_rates_and_checks_the_resume(tmp_path):
    log = tmp_path / "resume.log"
    log.write_text("I1204 train.py:325] Resumed from the checkpoint at step 6 in /w/checkpoints\n")
    summary = loop_report.summarize(_rows(6, 10, 2, resumed_at=6), 6, str(log))
    assert summary["problems"] == []
    # Windows after each launch's first: steps 4, 6 (first launch) and 10 (resumed).
    assert summary["windows"] == 3 and summary["images_per_sec"] == 600.0
    assert summary["data_wait_fraction"] == 0.006
    assert (summary["resumed_from_step"], summary["last_step"], summary["val_steps"]) == (
        6, 10, [6, 10]
    )  # fmt: skip
    log.write_text("I1204 train.py:330] Initialized a new model (paper init)\n")
    summary = loop_report.summarize(_rows(6, 10, 2, resumed_at=6), 6, str(log))
    assert summary["problems"] == ["the second launch resumed from None, not 6"]
    summary = loop_report.summarize(_rows(6, 10, 2, resumed_at=0), 6, None)
    assert summary["problems"][0].startswith("train steps not increasing")
    summary = loop_report.summarize(_rows(6, 10, 2, resumed_at=None), 6, None)
    assert summary["problems"] == [
        "no train rows after step 6: the resumed run did not train"
    ]  # fmt: skip
    absent = str(tmp_path / "none")
    summary = loop_report.summarize(_rows(6, 10, 2, resumed_at=6), 6, absent)
    assert summary["problems"] == [f"no log of the second launch at {absent}: did it run?"]
    with pytest.raises(loop_report.MetricsMissingError, match="No metrics.jsonl"):
        loop_report.read_rows(str(tmp_path))


def _check_smoke_run(result: subprocess.CompletedProcess, log_dir) -> dict[str, str]:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    summary = _summary(result.stdout)
    assert list(summary) == list(STAGES), result.stdout[-3000:]
    assert all(status.startswith("ok") for status in summary.values()), summary
    for dtype in ("f32", "bf16"):
        out = json.loads((log_dir / f"train_step_{dtype}.json").read_text())
        assert out["batches"]["4"]["images_per_s"] > 0 and out["frameworks"] == ["jax"]
    assert "compute bfloat16" in (log_dir / "train_step_bf16.log").read_text()
    assert "train step fed by the training input" in (log_dir / "input_pipeline.log").read_text()
    loop = json.loads((log_dir / "loop.json").read_text())
    assert (loop["resumed_from_step"], loop["last_step"], loop["val_steps"]) == (6, 9, [6, 9])
    assert loop["images_per_sec"] > 0 and 0 <= loop["data_wait_fraction"] <= 1
    assert "training loop:" in summary["loop_report"] and loop["problems"] == []
    # evaluate on the final checkpoint gives the loop's last validation pass (same step, images
    # and uint8 path; a tie between logits may at most flip one image).
    evaluation = json.loads((log_dir / "loop_evaluation.json").read_text())
    assert evaluation["models"][0]["step"] == 9
    assert [r["crops"] for r in evaluation["results"]] == ["centre", "ten"]
    for key in ("top1_error", "top5_error"):
        assert abs(evaluation["results"][0][key] - loop["last_val"][key]) <= 1.0 / 32, evaluation
    return summary


@pytest.mark.slow  # Every stage of gpu.sh, compiles included: about 3 minutes on 2 cores.
def test_smoke_runs_every_stage_on_cpu(tmp_path):
    result = subprocess.run(
        ["bash", SCRIPT, "--smoke", f"--log_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    _check_smoke_run(result, tmp_path)


def _gpu_image_python(tmp_path) -> str:
    """A venv shaped like the GPU image: $ALEXNET_JAX_GPU_IMAGE_VENV, else built here."""
    venv = os.environ.get("ALEXNET_JAX_GPU_IMAGE_VENV")
    if not venv:
        if not os.path.isfile(GPU_IMAGE_VENV):
            pytest.skip(f"no {GPU_IMAGE_VENV} (the shared tools) to build the venv with")
        venv = str(tmp_path / "gpu_image_venv")
        built = subprocess.run(
            ["bash", GPU_IMAGE_VENV, venv], capture_output=True, text=True, timeout=1200
        )
        if "no Python 3.12" in built.stderr:
            pytest.skip("no Python 3.12 here to build a GPU-image-shaped venv")
        if built.returncode != 0:
            pytest.skip(f"the GPU-image venv could not be built (offline?): {built.stderr[-500:]}")
    python = os.path.join(venv, "bin", "python")
    assert os.path.isfile(python), f"{python} is not there"
    return python


@pytest.mark.slow  # Downloads the wheels, then every stage in the GPU image's packages: ~5 min.
def test_smoke_runs_every_stage_in_a_venv_shaped_like_the_gpu_image(tmp_path):
    """What the first GPU run lacked (simplejpeg, tensorboardX, the class list) is caught here."""
    python = _gpu_image_python(tmp_path)
    lacking = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('grain') is None)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert lacking.stdout.strip() == "True", "the venv has grain: not shaped like the GPU image"
    wheels = tmp_path / "wheels"
    download = subprocess.run(
        ["bash", SCRIPT, "download", f"--wheels={wheels}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if download.returncode != 0 and re.search(
        r"(?i)connection|resolve|network|temporary failure", download.stdout + download.stderr
    ):
        pytest.skip(f"PyPI unreachable: {download.stderr[-300:]}")
    assert download.returncode == 0, download.stdout + download.stderr
    if os.path.isdir(os.path.join(ROOT, "..", "shared", "imagenet-samples")):
        assert len(os.listdir(wheels / "imagenet-samples")) >= 100
    log_dir = tmp_path / "logs"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    result = subprocess.run(
        ["bash", SCRIPT, "--smoke", f"--wheels={wheels}", f"--log_dir={log_dir}"],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**env, "PYTHON": python},
    )
    summary = _check_smoke_run(result, log_dir)
    assert not summary["install"].startswith("ok (every package importable already)")
    assert "real JPEGs" in (log_dir / "input_pipeline.log").read_text() or not os.path.isdir(
        wheels / "imagenet-samples"
    )
    shutil.rmtree(wheels)


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
    assert list(summary) == list(STAGES)
    assert summary["install"] == "FAILED (wheels missing)"
    assert "simplejpeg==1.9.0" in result.stdout and "gpu.sh download" in result.stdout
    assert summary["train_step_f32"].startswith("TIMED OUT after 1 s")
    assert summary["train_step_bf16"].startswith("TIMED OUT after 1 s")
    others = [s for s in STAGES if s not in ("install", "train_step_f32", "train_step_bf16")]
    assert all(summary[s].startswith("ok") for s in others), summary
