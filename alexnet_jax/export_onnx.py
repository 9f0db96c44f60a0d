"""A trained model as an ONNX graph for onnxruntime, TensorRT, OpenVINO or Netron.

    python -m alexnet_jax.export --workdir=DIR --format=onnx  # -> DIR/export/alexnet.onnx

The same function as the StableHLO export (``export.probabilities_fn``): uint8
centre patches ``b x S x S x 3`` (NHWC, symbolic batch ``b``) in, mean
subtraction and input scale inside, softmax probabilities ``b x K`` out. The
graph is written node by node with ``onnx.helper`` from the model's parameters
and its ``model.Variant``, in standard ops of opset ``OPSET``, float32 throughout:

- two towers are one tensor of both towers' channels (tower 0's first, as
  ``model.merge_towers``): conv2, conv4 and conv5, where each tower sees only
  its own maps, are ``Conv`` with ``group=2``; conv3, fc6 and fc7, where each
  tower sees both, are one ``Conv``/``Gemm`` with the towers' kernels side by
  side along the output axis (a branch per tower would compute the same slices).
- ONNX's ``LRN`` scales the window sum by ``alpha / size`` (as Caffe and PyTorch):
  the model's constants are written as ``alpha * size`` and ``bias = k``, so the
  paper's ``k=2, alpha=1e-4`` becomes ``alpha=5e-4, bias=2``. The paper's net
  normalizes each tower's maps on their own (``Split``, ``LRN``, ``Concat``);
  Caffe's nets normalize both groups' maps as one.
- torchvision's adaptive average pool to 6x6 is nothing at a 224 crop (pool5 is
  already 6x6); at other crops it is two ``MatMul`` with constant averaging
  matrices, cell i of an axis of n averaging inputs floor(i n / 6) to
  ceil((i + 1) n / 6) - 1, as ``model.adaptive_average_pool``.
- dropout is absent (inference), and fc6's rows are reordered from the model's
  H x W x C flattening of pool5 to ``Flatten``'s C x H x W.

Node and parameter names are the model's (``conv1``, ``conv1/kernel``, ``pool5``,
``fc8``); the graph's doc_string names the variant, crop and normalization; the
class list is written beside the file (``export.metadata_path``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from absl import logging
from onnx import TensorProto, helper, numpy_helper

from alexnet_jax import inference, model

# Every op used here has had its present definition since opset 14 at the latest; 17 (ONNX 1.12,
# 2022) is old enough for any current runtime to read.
OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
FORMAT = "ONNX"

# Geometry common to every variant (``model.Variant``'s docstring; conv1's padding is the
# variant's): layer -> (stride, padding). Kernel sizes come from the parameters.
CONV_GEOMETRY = {
    "conv1": (4, None),
    "conv2": (1, 2),
    "conv3": (1, 1),
    "conv4": (1, 1),
    "conv5": (1, 1),
}
POOL_WINDOW, POOL_STRIDE = 3, 2


def lrn_attributes(convention: str) -> dict[str, float | int]:
    """``model.lrn_constants(convention)`` as ONNX LRN attributes (alpha times the window)."""
    constants = model.lrn_constants(convention)
    size = 2 * constants["depth_radius"] + 1
    return {
        "size": size,
        "alpha": constants["alpha"] * size,
        "beta": model.LRN_BETA,
        "bias": constants["bias"],
    }


def averaging_matrix(n: int, size: int) -> np.ndarray:
    """size x n: row i averages inputs floor(i n / size) to ceil((i + 1) n / size) - 1."""
    matrix = np.zeros((size, n), np.float32)
    for i in range(size):
        start, stop = i * n // size, -(-(i + 1) * n // size)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def conv_output_size(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


class _Graph:
    """Nodes and initializers accumulated in order; each node's output is named as the node."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attributes))
        return name

    def split(self, x: str, parts: int, name: str) -> list[str]:
        outputs = [f"{name}/tower{t}" for t in range(parts)]
        self.nodes.append(helper.make_node("Split", [x], outputs, name=f"{name}/split", axis=1))
        return outputs


def _as_float32(a: Any) -> np.ndarray:
    return np.asarray(a, np.float32)


def _conv(
    g: _Graph, x: str, params: Any, name: str, *, padding: int, stride: int, shared_input: bool
) -> str:
    """A TowerConv: T x kh x kw x Cin x Cout kernels -> one Conv of T*Cout output maps."""
    kernel_T, bias_T = _as_float32(params[name]["kernel"]), _as_float32(params[name]["bias"])
    towers, k = kernel_T.shape[0], kernel_T.shape[1]
    weight = np.concatenate([kernel.transpose(3, 2, 0, 1) for kernel in kernel_T])  # OIHW
    return g.node(
        "Conv",
        [x, g.constant(f"{name}/kernel", weight), g.constant(f"{name}/bias", bias_T.reshape(-1))],
        name,
        kernel_shape=[k, k],
        strides=[stride, stride],
        pads=[padding] * 4,
        group=1 if shared_input else towers,
    )


def _dense(g: _Graph, x: str, kernel_DxF: np.ndarray, bias_F: np.ndarray, name: str) -> str:
    kernel = g.constant(f"{name}/kernel", kernel_DxF)
    return g.node("Gemm", [x, kernel, g.constant(f"{name}/bias", bias_F)], name)


def _tower_dense(g: _Graph, x: str, params: Any, name: str, *, rows=None) -> str:
    """A TowerDense: T x D x F kernels side by side -> one Gemm of T*F outputs."""
    kernel_T, bias_T = _as_float32(params[name]["kernel"]), _as_float32(params[name]["bias"])
    kernel = np.concatenate(list(kernel_T), axis=1)
    if rows is not None:
        kernel = kernel[rows]
    return _dense(g, x, kernel, bias_T.reshape(-1), name)


def network_graph(
    net: model.AlexNet,
    params: Any,
    *,
    crop_size: int,
    mean_patch_SxSx3: np.ndarray,
    scale: float | np.ndarray,
    name: str = "alexnet",
    doc_string: str = "",
) -> onnx.GraphProto:
    """uint8 pixels b x S x S x 3 -> softmax probabilities b x K, as ``export.probabilities_fn``.

    ``net`` gives the variant, LRN use and convention; ``params`` its float32
    parameters (any width); ``mean_patch_SxSx3`` and ``scale`` are the
    preprocessing that the graph applies to the pixels.
    """
    v = model.VARIANTS[net.variant]
    convention = v.lrn_convention if net.lrn_convention == "auto" else net.lrn_convention
    order = v.lrn if net.use_lrn else "none"
    g = _Graph()

    # Preprocessing, in predict's float32 order: pixel - mean, then times scale.
    x = g.node("Cast", [INPUT_NAME], "pixels/float", to=TensorProto.FLOAT)
    mean = _as_float32(mean_patch_SxSx3)
    if np.all(mean == mean[:1, :1]):  # A per-channel mean: three numbers, the same values.
        mean = mean[0, 0]
    x = g.node("Sub", [x, g.constant("mean", mean)], "pixels/minus_mean")
    scale = _as_float32(scale)
    if np.any(scale != 1.0):
        x = g.node("Mul", [x, g.constant("input_scale", scale)], "pixels/scaled")
    x = g.node("Transpose", [x], "pixels/nchw", perm=[0, 3, 1, 2])

    lrn = lrn_attributes(convention)

    def normalize(x: str, name: str) -> str:
        if v.lrn_across_towers or v.towers == 1:
            return g.node("LRN", [x], name, **lrn)
        parts = [g.node("LRN", [t], f"{t}/lrn", **lrn) for t in g.split(x, v.towers, name)]
        return g.node("Concat", parts, name, axis=1)

    def pool(x: str, name: str) -> str:
        window, stride = [POOL_WINDOW] * 2, [POOL_STRIDE] * 2
        return g.node("MaxPool", [x], name, kernel_shape=window, strides=stride)

    side = crop_size
    for i, shared_input in zip(range(1, 6), (True, False, True, False, False), strict=True):
        layer = f"conv{i}"
        stride, padding = CONV_GEOMETRY[layer]
        padding = v.conv1_padding if padding is None else padding
        x = _conv(g, x, params, layer, padding=padding, stride=stride, shared_input=shared_input)
        side = conv_output_size(side, params[layer]["kernel"].shape[1], stride, padding)
        x = g.node("Relu", [x], f"{layer}/relu")
        if i in (1, 2):  # norm and pool after conv1 and conv2, in the variant's order.
            if order == "before_pool":
                x = normalize(x, f"norm{i}")
            x = pool(x, f"pool{i}")
            if order == "after_pool":
                x = normalize(x, f"norm{i}")
            side = conv_output_size(side, POOL_WINDOW, POOL_STRIDE, 0)
    x = pool(x, "pool5")
    side = conv_output_size(side, POOL_WINDOW, POOL_STRIDE, 0)
    if v.average_pool and side != model.AVERAGE_POOL_SIZE:
        cells = averaging_matrix(side, model.AVERAGE_POOL_SIZE)
        x = g.node("MatMul", [x, g.constant("avgpool/columns", cells.T)], "avgpool/width")
        x = g.node("MatMul", [g.constant("avgpool/rows", cells), x], "avgpool")
        side = model.AVERAGE_POOL_SIZE

    # fc6 reads pool5 flattened as H x W x C (model.merge_towers, reshape); Flatten gives
    # C x H x W: the kernel's rows are reordered to match.
    channels = int(np.prod(params["conv5"]["bias"].shape))
    hwc = np.arange(side * side * channels).reshape(side, side, channels)
    x = g.node("Flatten", [x], "pool5/flat", axis=1)
    x = _tower_dense(g, x, params, "fc6", rows=hwc.transpose(2, 0, 1).ravel())
    x = g.node("Relu", [x], "fc6/relu")
    x = g.node("Relu", [_tower_dense(g, x, params, "fc7")], "fc7/relu")
    fc8 = params["fc8"]
    x = _dense(g, x, _as_float32(fc8["kernel"]), _as_float32(fc8["bias"]), "fc8")
    g.node("Softmax", [x], OUTPUT_NAME, axis=-1)

    num_classes = int(np.shape(fc8["bias"])[0])
    inputs = [
        helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["b", crop_size, crop_size, 3])
    ]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["b", num_classes])]
    return helper.make_graph(
        g.nodes, name, inputs, outputs, initializer=g.initializers, doc_string=doc_string
    )


def make_model(graph: onnx.GraphProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """The graph at ``OPSET``, in the oldest IR version that carries it (older runtimes read it)."""
    opset = helper.make_opsetid("", OPSET)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[opset],
        ir_version=helper.find_min_ir_version_for([opset]),
        producer_name="alexnet_jax",
        doc_string=graph.doc_string,
    )
    helper.set_model_props(onnx_model, metadata)
    return onnx_model


def normalization(trained: inference.TrainedModel) -> str:
    """How the pixels are normalized inside the graph, in words."""
    data, p = trained.config.data, trained.preprocessing
    if tuple(data.rgb_mean):
        mean = f"RGB mean {list(data.rgb_mean)}"
    elif data.mean_subtraction == "channel":
        mean = "the training set's mean RGB"
    else:
        mean = f"the central {p.crop_size}x{p.crop_size} patch of the training set's mean image"
    scale = np.asarray(p.scale, np.float32)
    times = f", times {scale.tolist()}" if np.any(scale != 1.0) else ""
    return f"pixels (0-255) minus {mean}{times}"


def describe_graph(trained: inference.TrainedModel) -> str:
    """The graph's doc_string: what it is, what goes in, what comes out."""
    m, crop = trained.config.model, trained.preprocessing.crop_size
    full = trained.preprocessing.mean.shape[0]  # The prepared image's side.
    return (
        f"AlexNet, variant {m.variant} (alexnet_jax), width {m.width}, {m.num_classes} classes, "
        f"checkpoint step {trained.step}. Input '{INPUT_NAME}': b x {crop} x {crop} x 3 uint8 "
        f"RGB, the central {crop}x{crop} patch of an image whose shorter side was resized to "
        f"{full} and centre-cropped to {full}x{full}. Inside: {normalization(trained)}; the "
        f"network in float32 (no dropout). Output '{OUTPUT_NAME}': b x {m.num_classes} softmax "
        "probabilities; the class list is in the .json file written beside this one."
    )


def build(trained: inference.TrainedModel) -> onnx.ModelProto:
    """The trained model's probabilities as an ONNX model, shapes inferred, checked."""
    p = trained.preprocessing
    dtypes = {trained.config.model.compute_dtype, trained.config.data.dtype}
    if dtypes != {"float32"}:
        logging.warning(
            "The ONNX graph computes in float32; this run's predict computes in %s "
            "(model.compute_dtype, data.dtype), so their probabilities differ at that precision",
            "/".join(sorted(dtypes - {"float32"})),
        )
    graph = network_graph(
        trained.model,
        trained.params,
        crop_size=p.crop_size,
        mean_patch_SxSx3=inference.centre_patch(p.mean, p.crop_size),
        scale=p.scale,
        name=f"alexnet_{trained.config.model.variant}",
        doc_string=describe_graph(trained),
    )
    m = trained.config.model
    metadata = {
        "variant": m.variant,
        "width": str(m.width),
        "crop_size": str(p.crop_size),
        "normalization": normalization(trained),
        "checkpoint_step": str(trained.step),
    }
    # Every tensor's shape written into the graph (Netron shows them); strict: fails if any
    # node's shapes do not follow.
    onnx_model = onnx.shape_inference.infer_shapes(make_model(graph, metadata), strict_mode=True)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def describe(onnx_model: onnx.ModelProto, model_description: dict[str, Any]) -> dict[str, Any]:
    """The description of an ONNX file: the runtime call, opset, names, and
    ``model_description`` (``export.describe_model``: input, inside, output, classes)."""
    description = {
        "format": FORMAT,
        "load": (f"onnxruntime.InferenceSession(path).run(None, {{'{INPUT_NAME}': pixels}})[0]"),
        "opset": OPSET,
        "ir_version": onnx_model.ir_version,
        "onnx_version": onnx.__version__,
        "arithmetic": "float32 throughout (whatever the run's model.compute_dtype)",
        **model_description,
    }
    description["input"] = {"name": INPUT_NAME, **description["input"]}
    description["output"] = {"name": OUTPUT_NAME, **description["output"]}
    return description
