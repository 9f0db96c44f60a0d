"""export_onnx: every variant's ONNX graph, run by onnxruntime (CPU), gives predict's probabilities.

Small nets (1/8 width, 10 classes, random params, logits of std 5) on images
of the tiny demo dataset; the full-size nets are a slow test.

How close is close enough. onnxruntime and XLA round the same float32 sums in
another order, so each logit z differs by some dz, and log p_i = z_i -
logsumexp(z) by dz_i - sum_j p_j dz_j: at most 2 max|dz|, the same for every
class however improbable. dz is a few ulp of the largest logits (measured ~8
ulp): with logits up to ~12 (ulp 9.5e-7) the probabilities agree to ~1.3e-5
relative, the most probable and the 1e-11 ones alike; the full-size nets'
logits reach ~20 (ulp 1.9e-6) and agree to ~3e-5. So 1e-5 relative is not a
float32 bound for a confident net, and an absolute tolerance would say nothing
about the improbable classes. Every probability is held to
``probability_rtol``: 2 x 16 ulp at the logits' range, no absolute slack.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import config_lib, export, import_weights, inference, model, predict
from alexnet_jax.data import pipeline, records
from tests.conftest import ROOT

onnx = pytest.importorskip("onnx", reason="ONNX export (requirements-export.txt)")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests (requirements-export.txt)")
from alexnet_jax import export_onnx  # noqa: E402 - needs onnx.

VARIANTS = tuple(model.VARIANTS)
# The ops the issue allows (standard ONNX), plus the preprocessing's Cast/Sub/Mul/Transpose and
# the glue (Split/Concat for per-tower LRN, Flatten before fc6).
STANDARD_OPS = {
    "Cast", "Sub", "Mul", "Transpose", "Conv", "Relu", "LRN", "Split", "Concat", "MaxPool",
    "MatMul", "Flatten", "Gemm", "Softmax",
}  # fmt: skip
LOGIT_STD = 5.0  # Of the random nets' logits (random_trained).
LOGIT_ULPS = 16  # The rounding of a logit allowed for, in ulp of the largest (module docstring).


def probability_rtol(expected: np.ndarray) -> float:
    """2 max|dz| for dz of ``LOGIT_ULPS`` ulp at the logits' range (max - min of log p).

    The random nets' logits straddle zero, so none is larger than the range:
    ~6e-5 for the small nets (range ~25), ~1.2e-4 for the full-size ones (~40).
    """
    log_p = np.log(expected)
    logit_range = np.max(log_p.max(axis=-1) - log_p.min(axis=-1))
    return float(2 * LOGIT_ULPS * np.spacing(np.float32(logit_range)))


def assert_same_probabilities(got, expected):
    """Every probability within ``probability_rtol`` relative, no absolute tolerance."""
    assert got.shape == expected.shape and got.dtype == np.float32
    assert expected.min() > 1e-30  # Far from float32's underflow: relative error is meaningful.
    np.testing.assert_allclose(got, expected, rtol=probability_rtol(expected), atol=0)


@pytest.fixture(scope="module")
def dataset(tiny_demo_dir):
    return pipeline.open_dataset(tiny_demo_dir, how_to_prepare="tests/conftest.py")


@pytest.fixture(scope="module")
def images(dataset):
    """Five prepared uint8 256x256 validation images."""
    source = dataset.source("val")
    examples = [records.decode_example(source[i]) for i in range(5)]
    return np.stack([pipeline.decode_jpeg(e["image"]) for e in examples])


def variant_config(variant: str, data_dir: str, *, width: float = 1 / 8, num_classes: int = 10):
    """The variant with the input its published weights expect (the paper's: the config's)."""
    if variant == "paper":  # The mean image of the dataset, input scale 1.
        config = config_lib.defaults()
        config.data.dir, config.model.num_classes = data_dir, num_classes
    else:
        source = "torchvision" if variant == "torchvision" else "caffe"
        config = import_weights.imported_config(
            import_weights.FORMATS[source], variant, num_classes, data_dir
        )
    config.model.width = width
    return config


def random_trained(config, dataset, images, seed: int = 0) -> inference.TrainedModel:
    """Random params: kernels N(0, 2 / fan-in) ("he"), biases U(-0.1, 0.1); logits of std 5.

    fc8 is scaled so that the logits of ``images`` have std ``LOGIT_STD``: they
    span about +-15, as a confident classifier's do, whatever the variant's
    input scale (the softmax neither one-hot nor uniform). At input scale 1
    (paper, Caffe) the activations keep the pixels' size (tens), so the LRN's
    alpha * sum is of order 1: its constants matter. Drawn in NumPy from the
    parameter shapes (an XLA-compiled init takes seconds).
    """
    net = inference.build_model(config)
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if path[-1].key == "bias":
            return rng.uniform(-0.1, 0.1, shape.shape).astype(np.float32)
        fan_in = np.prod(shape.shape[-4:-1] if len(shape.shape) == 5 else shape.shape[-2])
        return (rng.normal(size=shape.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

    shapes = inference.abstract_params(net, crop_size=config.data.crop_size)
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    trained = inference.TrainedModel(config, net, params, 0, dataset)
    views = np.concatenate([trained.views(im, ten_crop=False) for im in images])
    plain = net.clone(kernels=model.Kernels())  # Same values; compiles faster than CPU's.
    logits = jax.jit(lambda p, x: plain.apply({"params": p}, x, train=False))(params, views)
    factor = np.float32(LOGIT_STD / np.std(logits))
    fc8 = {k: v * factor for k, v in params["fc8"].items()}
    return dataclasses.replace(trained, params={**params, "fc8": fc8})


def run_onnx(model_file: bytes | ort.InferenceSession, crops_BxSxSx3: np.ndarray) -> np.ndarray:
    """Probabilities from onnxruntime's CPU provider, for a serialized model or its session."""
    session = model_file
    if not isinstance(session, ort.InferenceSession):
        session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    return session.run(None, {export_onnx.INPUT_NAME: crops_BxSxSx3})[0]


def centre_patches(trained, images):
    return np.stack([inference.centre_patch(im, trained.preprocessing.crop_size) for im in images])


@pytest.fixture(scope="module")
def exported(dataset, images):
    """Per variant: (trained, ONNX model); built once each."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            trained = random_trained(variant_config(variant, dataset.data_dir), dataset, images)
            cache[variant] = trained, export_onnx.build(trained)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_gives_predicts_probabilities_for_two_batch_sizes(variant, exported, images):
    trained, onnx_model = exported(variant)
    serialized = onnx_model.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(serialized), full_check=True)
    crops = centre_patches(trained, images)
    expected = predict.predict_probabilities(trained, images, batch_size=5)
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    for n in (5, 1):  # One file and session, one symbolic batch dimension.
        assert_same_probabilities(run_onnx(session, crops[:n]), expected[:n])


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_is_standard_ops_named_as_the_model(variant, exported):
    trained, onnx_model = exported(variant)
    v, crop = model.VARIANTS[variant], trained.preprocessing.crop_size
    graph = onnx_model.graph
    nodes = {node.name: node for node in graph.node}
    assert [(o.domain, o.version) for o in onnx_model.opset_import] == [("", export_onnx.OPSET)]
    assert {node.op_type for node in graph.node} <= STANDARD_OPS
    # Input: uint8 NHWC with a symbolic batch; output: b x K.
    (pixels,) = graph.input
    dims = [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim]
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims == ["b", crop, crop, 3]
    dims = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["b", 10]
    # Towers: group=2 where each tower sees only its own maps.
    groups = {
        f"conv{i}": onnx.helper.get_attribute_value(
            next(a for a in nodes[f"conv{i}"].attribute if a.name == "group")
        )
        for i in range(1, 6)
    }
    t = v.towers
    assert groups == {"conv1": 1, "conv2": t, "conv3": 1, "conv4": t, "conv5": t}
    for name in ("conv1", "conv5", "fc6", "fc7", "fc8"):
        assert nodes[name].input[1] == f"{name}/kernel"
    # LRN: alpha x window, bias k; per tower for the paper's net, across groups for Caffe's.
    lrn_nodes = [node for node in graph.node if node.op_type == "LRN"]
    if v.lrn == "none":
        assert not lrn_nodes
    else:
        expected = {"paper": (5e-4, 2.0), "caffe": (1e-4, 1.0)}[v.lrn_convention]
        for node in lrn_nodes:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["size"] == 5 and attributes["beta"] == pytest.approx(0.75)
            assert (attributes["alpha"], attributes["bias"]) == pytest.approx(expected)
        assert len(lrn_nodes) == (2 * t if not v.lrn_across_towers else 2)
        assert ("norm1/split" in nodes) == (not v.lrn_across_towers)
    assert f"variant {variant}" in graph.doc_string and f"{crop} x {crop}" in graph.doc_string
    props = {p.key: p.value for p in onnx_model.metadata_props}
    assert props["variant"] == variant and props["crop_size"] == str(crop)


@pytest.mark.parametrize(
    "wrong",
    [
        {"lrn_across_towers": True},  # Caffe's normalization across the towers' maps.
        {"lrn_convention": "caffe"},  # Caffe's k=1, alpha/n.
    ],
    ids=["across_towers", "caffe_constants"],
)
def test_the_paper_nets_lrn_as_caffes_is_far_off(wrong, exported, images, monkeypatch):
    """The agreement above holds the LRN mapping: another one is off by far more."""
    trained, _ = exported("paper")
    expected = predict.predict_probabilities(trained, images, batch_size=5)
    variants = {**model.VARIANTS, "paper": dataclasses.replace(model.VARIANTS["paper"], **wrong)}
    monkeypatch.setattr(model, "VARIANTS", variants)  # The model's too: predict ran before.
    serialized = export_onnx.build(trained).SerializeToString()
    got = run_onnx(serialized, centre_patches(trained, images))
    assert np.abs(got / expected - 1).max() > 100 * probability_rtol(expected)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 7, 13])
def test_averaging_matrix_is_the_models_adaptive_average_pool(n):
    x = np.random.default_rng(n).normal(size=(2, n, n, 3)).astype(np.float32)
    cells = export_onnx.averaging_matrix(n, model.AVERAGE_POOL_SIZE)
    pooled = np.einsum("ih,bhwc,jw->bijc", cells, x, cells)
    expected = model.adaptive_average_pool(jnp.asarray(x), model.AVERAGE_POOL_SIZE)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("crop_size", [195, 256])  # pool5 5x5 and 7x7: averaged to 6x6.
def test_torchvision_at_other_crops_pools_as_the_model(crop_size, dataset, images):
    config = variant_config("torchvision", dataset.data_dir)
    config.data.crop_size = crop_size
    trained = random_trained(config, dataset, images)
    onnx_model = export_onnx.build(trained)
    assert "avgpool" in {node.name for node in onnx_model.graph.node}
    expected = predict.predict_probabilities(trained, images, batch_size=5)
    got = run_onnx(onnx_model.SerializeToString(), centre_patches(trained, images))
    assert_same_probabilities(got, expected)


def test_command_writes_onnx_and_its_description(tiny_trained_workdir, tmp_path, images):
    path = str(tmp_path / "tiny.onnx")
    cmd = [
        sys.executable, "-m", "alexnet_jax.export", f"--workdir={tiny_trained_workdir}",
        f"--output={path}", "--format=onnx",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    trained = inference.load_trained(tiny_trained_workdir)
    with open(export.metadata_path(path)) as f:
        meta = json.load(f)
    assert meta["format"] == "ONNX" and meta["opset"] == export_onnx.OPSET
    assert meta["classes"] == trained.classes and meta["checkpoint_step"] == trained.step
    assert meta["input"]["name"] == "pixels" and meta["input"]["shape"] == ["b", 224, 224, 3]
    with open(path, "rb") as f:
        serialized = f.read()
    expected = predict.predict_probabilities(trained, images, batch_size=5)
    assert_same_probabilities(run_onnx(serialized, centre_patches(trained, images)), expected)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_nets_give_predicts_probabilities(variant, dataset, images):
    """The published sizes (1000 classes, width 1); random params as above."""
    config = variant_config(variant, dataset.data_dir, width=1.0, num_classes=1000)
    trained = random_trained(config, dataset, images)
    serialized = export_onnx.build(trained).SerializeToString()
    crops = centre_patches(trained, images)
    expected = predict.predict_probabilities(trained, images, batch_size=5)
    session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    for n in (5, 1):  # One file and session, one symbolic batch dimension.
        assert_same_probabilities(run_onnx(session, crops[:n]), expected[:n])
