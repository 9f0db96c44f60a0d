"""Errors from logits (top-k, NaN-safe), cross-entropy, finiteness and the metric files."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import metrics


def test_topk_errors_count_ranks_by_hand():
    logits = jnp.array([[0.1, 0.5, 0.2, 0.9], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 1.0, 2.0]])
    labels = jnp.array([1, 3, 2])  # Ranks 1, 3 and 1 (0 = highest logit).
    np.testing.assert_array_equal(metrics.topk_errors(logits, labels, 1), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(metrics.topk_errors(logits, labels, 2), [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(metrics.topk_errors(logits, labels, 4), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(metrics.topk_errors(logits, labels, 5), [0.0, 0.0, 0.0])


def test_ties_with_the_label_count_in_its_favour_and_nan_counts_as_an_error():
    logits = jnp.array([[1.0, 1.0, 0.0], [jnp.nan, 0.0, 0.0]])
    np.testing.assert_array_equal(metrics.topk_errors(logits, jnp.array([1, 0]), 1), [0.0, 1.0])


def test_cross_entropy_is_minus_log_softmax_of_the_label():
    logits = jnp.array([[1.0, 2.0, 3.0]])
    expected = -(1.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))
    assert float(metrics.cross_entropy(logits, jnp.array([0]))[0]) == pytest.approx(expected)


def test_all_finite_looks_at_every_float_leaf_and_ignores_integers():
    tree = {"w": jnp.ones((3, 3)), "step": jnp.int32(7), "nested": [jnp.zeros(2)]}
    assert bool(metrics.all_finite(tree))
    assert not bool(metrics.all_finite({**tree, "nested": [jnp.array([0.0, jnp.inf])]}))
    assert not bool(metrics.all_finite({**tree, "w": tree["w"].at[1, 1].set(jnp.nan)}))
    assert bool(metrics.all_finite({"step": jnp.int32(1)}))  # No float leaf at all.


def test_metric_writer_appends_one_json_row_per_call(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(1, "train", {"loss": jnp.float32(2.5)})
    writer.write(2, "val", {"loss": 1.5, "top1_error": 0.25})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [
        {"step": 1, "split": "train", "loss": 2.5},
        {"step": 2, "split": "val", "loss": 1.5, "top1_error": 0.25},
    ]
    assert list((tmp_path / "tensorboard").iterdir())


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, "train", {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "w").exists()
