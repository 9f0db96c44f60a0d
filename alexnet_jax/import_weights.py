"""Published AlexNet weights as a workdir that every tool reads; nothing is downloaded.

    python -m alexnet_jax.import_weights --source=alexnet-owt-7be5be79.pth --format=torchvision \
        --workdir=~/runs/torchvision_alexnet
    python -m alexnet_jax.import_weights --source=bvlc_alexnet.caffemodel --format=caffe \
        --workdir=~/runs/bvlc_alexnet                  # --variant=caffenet for CaffeNet
    python -m alexnet_jax.predict --workdir=~/runs/torchvision_alexnet photo.jpg

The file given is read from disk: a torchvision ``state_dict`` (a ``.pth``
through torch, or a ``.safetensors`` file read here), or a Caffe
``.caffemodel`` read with a small protobuf wire-format reader of the few
fields it needs (no Caffe or protobuf install). The workdir gets one
checkpoint, step 0: the params and a config naming the variant, its crop
size and the input normalization the weights were trained with
(``data.rgb_mean``/``data.rgb_std``). Class names: a prepared dataset
(``--data_dir``, stored as ``config.data.dir``), else a class list written
into ``WORKDIR/classes``: the 1000 ILSVRC-2012 wnids in the standard order
(the order of both projects' outputs; from the tfds package), named from
``--class_names_file`` (``wnid name`` lines) or by wnid. predict, visualize
filters and export read the workdir as they read a trained one; evaluate
needs ``--data_dir`` (images).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from alexnet_jax import checkpoint, cli, config_lib, errors, inference, model, tuning
from alexnet_jax.data import pipeline, records, sources

CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
LAYERS = (*CONVS, "fc6", "fc7", "fc8")
# torchvision.models.alexnet's state_dict names of those layers.
TORCHVISION_KEYS = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3": "features.6",
    "conv4": "features.8",
    "conv5": "features.10",
    "fc6": "classifier.1",
    "fc7": "classifier.4",
    "fc8": "classifier.6",
}
CLASSES_DIR = "classes"  # WORKDIR/classes: the class list, when no --data_dir is given.
IMPORTED_STEP = 0


class WeightsFormatError(errors.UsageError, ValueError):
    """The file is not the format asked for, or not an AlexNet this project can run."""


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """What weights of one origin expect: variants, crop and normalization (0-255 RGB)."""

    variants: tuple[str, ...]  # The first is the default.
    crop_size: int
    rgb_mean: tuple[float, float, float]
    rgb_std: tuple[float, float, float]


FORMATS = {
    # torchvision's transforms: [0, 1] pixels, Normalize((0.485, 0.456, 0.406),
    # (0.229, 0.224, 0.225)); here on the 0-255 scale (255 x each).
    "torchvision": SourceFormat(
        ("torchvision",), 224, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    ),
    # Caffe's 227 crops of 0-255 pixels minus its ILSVRC-2012 mean (per channel, RGB order).
    "caffe": SourceFormat(
        ("bvlc_alexnet", "caffenet"),
        227,
        (122.67891434, 116.66876762, 104.00698793),
        (1.0, 1.0, 1.0),
    ),
}


# --- torchvision: a state_dict as .pth (torch) or .safetensors ---

_SAFETENSORS_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 31


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file (u64 header length, JSON header, raw little-endian data) as arrays."""
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    arrays = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry["dtype"]
        if dtype == "BF16":
            import ml_dtypes

            numpy_dtype: Any = ml_dtypes.bfloat16
        elif dtype in _SAFETENSORS_DTYPES:
            numpy_dtype = _SAFETENSORS_DTYPES[dtype]
        else:
            raise WeightsFormatError(f"{path}: tensor {name} has dtype {dtype}, not a float")
        begin, end = entry["data_offsets"]
        array = np.frombuffer(body[begin:end], numpy_dtype).reshape(entry["shape"])
        arrays[name] = array.astype(np.float32)
    return arrays


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A saved PyTorch state_dict as float32 arrays (``module.`` prefixes dropped)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head):
        state = read_safetensors(path)
    else:
        try:
            import torch
        except ImportError:
            raise WeightsFormatError(
                f"{path} is a PyTorch pickle: reading it needs torch (a CPU wheel is enough), "
                "or give the same weights as a .safetensors file"
            ) from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file.
            raise WeightsFormatError(f"{path} is not a PyTorch state_dict: {e}") from None
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]  # A training checkpoint holding one.
        if not isinstance(loaded, Mapping):
            raise WeightsFormatError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
        state = {
            k: v.detach().to(torch.float32).numpy() for k, v in loaded.items() if torch.is_tensor(v)
        }
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_layers(state: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (weight, bias)} in PyTorch's layouts, from a torchvision AlexNet state_dict."""
    wanted = [f"{key}.{p}" for key in TORCHVISION_KEYS.values() for p in ("weight", "bias")]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsFormatError(
            f"not a torchvision AlexNet state_dict: no {', '.join(missing[:4])} "
            f"(it has {', '.join(sorted(state)[:6])}{', ...' if len(state) > 6 else ''})"
        )
    return {n: (state[f"{k}.weight"], state[f"{k}.bias"]) for n, k in TORCHVISION_KEYS.items()}


# --- Caffe: a .caffemodel (a binary NetParameter protobuf) ---

# Field numbers of caffe.proto. NetParameter: layer = 100 (LayerParameter), layers = 2
# (the older V1LayerParameter). (name, blobs) of each; BlobProto: data = 5 (packed
# float), double_data = 8, shape = 7 (BlobShape: dim = 1, int64), num/channels/height/
# width = 1-4 (the older 4-d shape).
_NET_LAYER_FIELDS = {100: (1, 7), 2: (4, 6)}
_BLOB_DATA, _BLOB_DOUBLE_DATA, _BLOB_SHAPE, _SHAPE_DIM = 5, 8, 7, 1
_BLOB_LEGACY_SHAPE = (1, 2, 3, 4)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def wire_fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of one protobuf message, in order.

    Varints (type 0) are ints; the others are the field's bytes (a memoryview,
    no copy): 8 (type 1), length-delimited (type 2: strings, messages, packed
    repeated fields) or 4 (type 5).
    """
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise WeightsFormatError(f"protobuf wire type {wire} at byte {pos}")
        if pos > end:
            raise WeightsFormatError("a protobuf field runs past the end of its message")
        yield number, wire, value


def _varints(buf: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def _blob(buf: memoryview) -> np.ndarray:
    """A BlobProto's values as float32 in its shape (``shape``, else num/channels/height/width)."""
    floats, doubles, dims, legacy = [], [], [], {}
    for number, wire, value in wire_fields(buf):
        if number == _BLOB_DATA and wire in (2, 5):  # Packed or not: little-endian float32s.
            floats.append(value)
        elif number == _BLOB_DOUBLE_DATA and wire in (1, 2):
            doubles.append(value)
        elif number == _BLOB_SHAPE and wire == 2:
            for n, w, v in wire_fields(value):
                if n == _SHAPE_DIM:
                    dims.extend(_varints(v) if w == 2 else [v])
        elif number in _BLOB_LEGACY_SHAPE and wire == 0:
            legacy[number] = value
    if floats:
        array = np.frombuffer(b"".join(floats), "<f4")
    else:
        array = np.frombuffer(b"".join(doubles), "<f8").astype(np.float32)
    shape = dims or [legacy.get(n, 0) for n in _BLOB_LEGACY_SHAPE]
    if math.prod(shape) != array.size:
        raise WeightsFormatError(f"a blob of {array.size} values has the shape {shape}")
    return array.reshape(shape)


def read_caffemodel(path: str) -> dict[str, list[np.ndarray]]:
    """{layer name: its blobs} of every layer with weights in a .caffemodel (V1 or current)."""
    with open(path, "rb") as f:
        net = memoryview(f.read())
    layers = {}
    try:
        for number, wire, value in wire_fields(net):
            if number not in _NET_LAYER_FIELDS or wire != 2:
                continue
            name_field, blobs_field = _NET_LAYER_FIELDS[number]
            name, blobs = "", []
            for n, w, v in wire_fields(value):
                if n == name_field and w == 2:
                    name = bytes(v).decode("utf-8", "replace")
                elif n == blobs_field and w == 2:
                    blobs.append(_blob(v))
            if blobs:
                layers[name] = blobs
    except (IndexError, WeightsFormatError) as e:
        raise WeightsFormatError(f"{path} is not a readable .caffemodel ({e})") from None
    return layers


def caffe_layers(blobs: Mapping[str, Sequence[np.ndarray]]) -> dict[str, tuple[Any, Any]]:
    """{layer: (weight, bias)} in PyTorch's layouts (which are Caffe's), conv1 made RGB.

    Caffe's reference nets name their layers as the paper does (conv1..fc8)
    and read BGR images: conv1's input channels are reversed here, so the
    model reads RGB like every other variant.
    """
    missing = [n for n in LAYERS if len(blobs.get(n, ())) < 2]
    if missing:
        raise WeightsFormatError(
            f"no weights and biases for {', '.join(missing)} (layers with weights: "
            f"{', '.join(blobs) or 'none'}); the Caffe reference AlexNets name them conv1..fc8"
        )
    layers: dict[str, tuple[Any, Any]] = {}
    for name in LAYERS:
        weight, bias = blobs[name][0], blobs[name][1].reshape(-1)
        if name in CONVS:
            weight = weight.reshape(weight.shape[-4:])
        else:  # The older 4-d blobs hold an fc weight as 1 x 1 x out x in.
            weight = weight.reshape(weight.shape[-2], weight.shape[-1])
        layers[name] = (weight, bias)
    layers["conv1"] = (layers["conv1"][0][:, ::-1], layers["conv1"][1])  # BGR -> RGB inputs.
    return layers


# --- Both: PyTorch/Caffe layouts -> the model's params ---


def to_params(layers: Mapping[str, tuple[np.ndarray, np.ndarray]], towers: int) -> dict[str, Any]:
    """PyTorch/Caffe layouts -> AlexNet's params, ``towers`` per-tower blocks.

    Conv weights are out x in x kh x kw (OIHW, a group's inputs only) and
    become kh x kw x in x out (HWIO); fc weights are out x in and become
    in x out. Group g's outputs are the g-th block of the output axis, which
    becomes tower g. pool5 is flattened channels-first (C x H x W) there and
    channels-last (H x W x C) here, so fc6's input rows are permuted.
    """

    def towers_of(a: np.ndarray) -> np.ndarray:  # The last (output) axis into T blocks, stacked.
        return np.stack(np.split(a, towers, axis=-1))

    params: dict[str, Any] = {}
    for name in CONVS:
        weight, bias = layers[name]
        params[name] = {"kernel": towers_of(weight.transpose(2, 3, 1, 0)), "bias": towers_of(bias)}
    weight, bias = layers["fc6"]
    channels = layers["conv5"][0].shape[0]
    side = math.isqrt(weight.shape[1] // channels)
    if side * side * channels != weight.shape[1]:
        raise WeightsFormatError(
            f"fc6 has {weight.shape[1]} inputs, not a square map of conv5's {channels} channels"
        )
    weight = weight.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(-1, len(bias))
    params["fc6"] = {"kernel": towers_of(weight), "bias": towers_of(bias)}
    weight, bias = layers["fc7"]
    params["fc7"] = {"kernel": towers_of(weight.T), "bias": towers_of(bias)}
    weight, bias = layers["fc8"]
    params["fc8"] = {"kernel": weight.T, "bias": bias}
    return jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), params)


def check_shapes(params: Any, expected: Any, variant: str) -> None:
    """Raises WeightsFormatError naming each array whose shape is not the variant's."""
    wrong = [
        f"{jax.tree_util.keystr(path)}: {np.shape(a)} in the file, {e.shape} in {variant}"
        for (path, a), e in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected), strict=True
        )
        if np.shape(a) != e.shape
    ]
    if wrong:
        raise WeightsFormatError(
            f"the weights are not model.variant={variant!r}'s:\n  " + "\n  ".join(wrong)
        )


# --- The workdir ---


def imported_config(
    source: SourceFormat, variant: str, num_classes: int, data_dir: str
) -> ml_collections.ConfigDict:
    """The config saved with imported weights: the variant and the input they expect."""
    config = config_lib.defaults()
    config.model.variant = variant
    config.model.num_classes = num_classes
    config.data.dir = data_dir
    config.data.crop_size = source.crop_size
    config.data.mean_subtraction = "channel"
    config.data.rgb_mean = source.rgb_mean
    config.data.rgb_std = source.rgb_std
    config.data.pca_colour = False  # No training-set statistics come with the weights.
    config_lib.validate(config)
    return config


def write_class_list(directory: str, wnids: Sequence[str], names: Mapping[str, str]) -> str:
    """A dataset directory holding only the class list (metadata.json, no images)."""
    os.makedirs(directory, exist_ok=True)
    records.write_metadata(
        directory,
        {
            "name": "ILSVRC-2012 class list (imported weights; no images)",
            "classes": [{"id": w, "name": names.get(w, w)} for w in wnids],
            "splits": {},
        },
    )
    return directory


def class_source(
    workdir: str, num_classes: int, data_dir: str | None, class_names_file: str | None
) -> str:
    """The ``config.data.dir`` that names the outputs: ``data_dir``, else a class list."""
    if data_dir:
        dataset = pipeline.open_dataset(
            data_dir, how_to_prepare="python -m alexnet_jax.data.prepare ..."
        )
        if dataset.num_classes != num_classes:
            raise errors.UsageError(
                f"the weights have {num_classes} outputs but {data_dir} has "
                f"{dataset.num_classes} classes"
            )
        ids = [c["id"] for c in dataset.metadata["classes"]]
        if num_classes == 1000 and ids != sources.ilsvrc2012_wnids():
            raise errors.UsageError(
                f"{data_dir}'s classes are not in the ILSVRC-2012 order of the weights' outputs "
                "(sorted wnids)"
            )
        return os.path.abspath(os.path.expanduser(data_dir))
    if num_classes != 1000:
        raise errors.UsageError(
            f"the weights have {num_classes} outputs, not ILSVRC-2012's 1000: pass "
            "--data_dir=the prepared dataset whose classes they predict"
        )
    names = sources.read_class_names(class_names_file)
    return write_class_list(os.path.join(workdir, CLASSES_DIR), sources.ilsvrc2012_wnids(), names)


def read_layers(path: str, source_format: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (weight, bias)} in PyTorch's layouts, from a file of ``source_format``."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise errors.UsageError(f"--source={path}: no such file")
    if source_format == "torchvision":
        return torchvision_layers(read_state_dict(path))
    return caffe_layers(read_caffemodel(path))


def import_weights(
    path: str,
    source_format: str,
    workdir: str,
    *,
    variant: str | None = None,
    data_dir: str | None = None,
    class_names_file: str | None = None,
) -> ml_collections.ConfigDict:
    """Writes ``path``'s weights into ``workdir`` as checkpoint step 0; returns its config."""
    if source_format not in FORMATS:
        raise errors.UsageError(f"--format={source_format!r}; accepted: one of {tuple(FORMATS)}")
    source = FORMATS[source_format]
    variant = variant or source.variants[0]
    if variant not in source.variants:
        raise errors.UsageError(
            f"--variant={variant!r}: {source_format} weights are {source.variants}"
        )
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise errors.UsageError(
            f"{workdir} already holds checkpoints: import into an empty --workdir"
        )
    layers = read_layers(path, source_format)
    num_classes = len(layers["fc8"][1])
    params = to_params(layers, model.VARIANTS[variant].towers)
    config = imported_config(source, variant, num_classes, data_dir="")
    net = inference.build_model(config)
    check_shapes(params, inference.abstract_params(net, crop_size=config.data.crop_size), variant)
    os.makedirs(workdir, exist_ok=True)
    config.data.dir = class_source(workdir, num_classes, data_dir, class_names_file)
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        ckpt.save_params(IMPORTED_STEP, params, config=config)
    finally:
        ckpt.close()
    return config


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (tools never clash on import)."""
    flags.DEFINE_string("source", None, "The weights file (.pth, .safetensors or .caffemodel).")
    flags.DEFINE_enum("format", None, list(FORMATS), "Where the weights come from.")
    flags.DEFINE_string("workdir", None, "Empty directory to write the checkpoint into.")
    flags.DEFINE_string(
        "variant", None, "caffe: bvlc_alexnet (default) or caffenet (pooling before LRN)."
    )
    flags.DEFINE_string(
        "data_dir", None, "A prepared dataset naming the outputs (default: the ILSVRC-2012 list)."
    )
    flags.DEFINE_string(
        "class_names_file", None, "'wnid name' lines (e.g. LOC_synset_mapping.txt) for the names."
    )


def main(argv: Sequence[str]) -> int:
    return cli.run_flags_only_command(argv, _run)


def _run() -> int:
    for name in ("source", "format", "workdir"):
        if not FLAGS[name].value:
            raise app.UsageError(f"--{name} is required")
    tuning.configure_process()  # Before JAX starts its backends.
    config = import_weights(
        FLAGS.source,
        FLAGS.format,
        FLAGS.workdir,
        variant=FLAGS.variant,
        data_dir=FLAGS.data_dir,
        class_names_file=FLAGS.class_names_file,
    )
    logging.info(
        "Imported %s (%s, %d classes, %dx%d crops) into %s; classes from %s",
        FLAGS.source,
        config.model.variant,
        config.model.num_classes,
        config.data.crop_size,
        config.data.crop_size,
        FLAGS.workdir,
        config.data.dir,
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
