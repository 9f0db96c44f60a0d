"""evaluate: centre and 10-crop errors, ensembles averaging softmax outputs, the CLI."""

import functools
import json
import os
import subprocess
import sys
import types

import grain
import jax
import numpy as np
import pytest

from alexnet_jax import checkpoint, errors, evaluate, inference, optim, predict, train
from alexnet_jax.data import pipeline, records
from tests.conftest import ROOT, tiny_config


@pytest.fixture(scope="module")
def second_workdir(tiny_trained_workdir, tiny_demo_dir, tmp_path_factory):
    """Another "model": the tiny run's state with perturbed params, at steps 2 (best) and 3."""
    config = tiny_config(tiny_demo_dir)
    config.max_steps = 2
    model = inference.build_model(config)
    abstract = jax.eval_shape(
        functools.partial(train.init_state, model, optim.make_optimizer(config.optim), 0)
    )
    source = checkpoint.Checkpointer(tiny_trained_workdir, read_only=True)
    state = source.restore(2, abstract)
    source.close()
    workdir = str(tmp_path_factory.mktemp("second_model"))
    ckpt = checkpoint.Checkpointer(workdir)
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    rng = np.random.default_rng(0)
    for step, error in ((2, 0.5), (3, 0.9)):
        params = jax.tree.map(
            lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape).astype(np.float32),
            state.params,
        )
        ckpt.maybe_save(
            step,
            state.replace(params=params),
            it,
            config=config,
            metrics={"val_top1_error": error},
            force=True,
        )
    ckpt.wait()
    ckpt.close()
    return workdir


def _val_images(data_dir):
    dataset = pipeline.open_dataset(data_dir, how_to_prepare="(test data)")
    source = dataset.source("val")
    examples = [records.decode_example(source[i]) for i in range(len(source))]
    images = np.stack([pipeline.decode_jpeg(e["image"]) for e in examples])
    return images, np.array([e["label"] for e in examples])


def _errors(probabilities_NxK, labels_N):
    """Top-1 and top-5 error by hand: rank of the label's probability."""
    label_p = probabilities_NxK[np.arange(len(labels_N)), labels_N]
    rank = (probabilities_NxK > label_p[:, None]).sum(axis=1)
    return float(np.mean(rank >= 1)), float(np.mean(rank >= 5))


def test_ensemble_and_ten_crop_equal_a_hand_computation(
    tiny_trained_workdir, second_workdir, tiny_demo_dir
):
    members = evaluate.load_members([tiny_trained_workdir, second_workdir], which="best")
    assert [m.trained.step for m in members] == [2, 2]
    # Batches of 8 over 20 images: the last one is padded, and padding must not count.
    report = evaluate.evaluate_members(members, ten_crop=True, batch_size=8, num_threads=1)
    assert report["num_examples"] == 20
    got = {
        (r["name"].split(",")[0], r["crops"]): (r["top1_error"], r["top5_error"])
        for r in report["results"]
    }

    images, labels = _val_images(tiny_demo_dir)
    expected = {}
    for crops, ten in (("centre", False), ("ten", True)):
        per_model = [
            predict.predict_probabilities(m.trained, images, ten_crop=ten) for m in members
        ]
        for m, p in zip(members, per_model, strict=True):
            expected[(f"1 CNN ({m.name})", crops)] = _errors(p, labels)
        expected[("2 CNNs averaged", crops)] = _errors(np.mean(per_model, axis=0), labels)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # The two models' outputs differ, so the ensemble rows test a real average.
    assert np.abs(per_model[0] - per_model[1]).max() > 1e-3


def test_checkpoint_choice_resolves_latest_best_and_steps(second_workdir):
    assert evaluate.resolve_step(second_workdir, "latest") is None
    assert evaluate.resolve_step(second_workdir, "best") == 2
    assert evaluate.resolve_step(second_workdir, "3") == 3
    with pytest.raises(errors.UsageError, match="'latest', 'best' or a step"):
        evaluate.resolve_step(second_workdir, "newest")


def test_table_shows_the_papers_rows_for_imagenet_only():
    report = {
        "split": "val",
        "data_dir": "/data/imagenet",
        "num_examples": 50000,
        "num_classes": 1000,
        "results": [
            {"name": "1 CNN (run@450000), 10 crops", "top1_error": 0.4123, "top5_error": 0.1876}
        ],
    }
    table = evaluate.format_table(report)
    assert "1 CNN (run@450000), 10 crops" in table and "41.2%" in table and "18.8%" in table
    assert "Paper (Table 2): 1 CNN" in table and "40.7%" in table and "18.2%" in table
    assert "Paper" not in evaluate.format_table({**report, "num_classes": 10})


def test_cli_prints_the_table_and_writes_json(tiny_trained_workdir, second_workdir, tmp_path):
    output = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.evaluate",
            f"--workdir={tiny_trained_workdir}",
            "--ten_crop",
            "--checkpoint=best",
            "--batch_size=8",
            f"--output={output}",
            second_workdir,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ETA" in result.stderr  # Progress goes to the log.
    report = json.loads(output.read_text())
    assert [m["step"] for m in report["models"]] == [2, 2]
    assert [(r["crops"], r["name"].split(",")[0]) for r in report["results"]][2::3] == [
        ("centre", "2 CNNs averaged"),
        ("ten", "2 CNNs averaged"),
    ]
    for row in report["results"]:
        line = next(t for t in result.stdout.splitlines() if t.startswith(row["name"]))
        assert (
            f"{100 * row['top1_error']:.1f}%" in line and f"{100 * row['top5_error']:.1f}%" in line
        )


def test_cli_names_a_missing_workdir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.evaluate", f"--workdir={tmp_path / 'nothing'}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3  # cli.EXIT_NO_CHECKPOINT
    assert "No checkpoint in" in result.stderr and str(tmp_path / "nothing") in result.stderr


def test_reports_are_named_after_what_was_evaluated_and_never_replaced(tmp_path):
    def member(step):
        return types.SimpleNamespace(trained=types.SimpleNamespace(step=step))

    one, three = [member(690)], [member(690), member(700), member(710)]
    name = evaluate.report_filename
    assert name(one, ten_crop=False, split="val", max_examples=0) == (
        "evaluation_step690_val_centre.json"
    )
    assert name(three, ten_crop=True, split="val", max_examples=500) == (
        "evaluation_step690_val_10crop_first500_ensemble3.json"
    )
    first = tmp_path / "evaluation_step690_val_centre.json"
    assert evaluate.unused_path(str(first)) == str(first)
    first.write_text("{}")
    second = evaluate.unused_path(str(first))
    assert second == str(tmp_path / "evaluation_step690_val_centre.2.json")
    open(second, "w").close()
    assert evaluate.unused_path(str(first)).endswith("centre.3.json")
    assert first.read_text() == "{}"
