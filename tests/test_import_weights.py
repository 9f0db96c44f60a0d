"""import_weights: torchvision and Caffe weights made here (random), imported, run against torch.

The source nets are built in the test: torchvision's AlexNet (or the same
layers in torch.nn when torchvision is missing) saved as a state_dict, and
Caffe's two reference nets written as .caffemodel files by a small protobuf
writer below, with a torch reference of the Caffe net (groups=2 convs,
Caffe's LRN, ceil-mode pooling, BGR input).
"""

import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import config_lib, errors, export, import_weights, inference, predict, visualize
from alexnet_jax.data import records, sources
from tests.conftest import ROOT

TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406])  # torchvision's Normalize, on [0, 1].
TORCHVISION_STD = np.array([0.229, 0.224, 0.225])

# --- the source files ---


def _torchvision_alexnet(torch):
    """torchvision.models.alexnet(weights=None), or the same layers and names in torch.nn."""
    try:
        import torchvision

        return torchvision.models.alexnet(weights=None)
    except Exception:  # noqa: BLE001 - missing, or built for another torch.
        pass
    nn = torch.nn

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, stride=4, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(384, 256, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(3, 2),
            )
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(),
                nn.Linear(9216, 4096),
                nn.ReLU(),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(),
                nn.Linear(4096, 1000),
            )

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return AlexNet()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:  # A length-delimited field (wire type 2).
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _number(number: int, value: int) -> bytes:  # A varint field (wire type 0).
    return _varint(number << 3) + _varint(value)


def _blob(array: np.ndarray, *, legacy: bool) -> bytes:
    """BlobProto: packed data (5) and shape (7: dim = 1), or the older num/channels/height/width."""
    if legacy:
        shape = (1,) * (4 - array.ndim) + array.shape
        dims = b"".join(_number(n, d) for n, d in zip((1, 2, 3, 4), shape, strict=True))
    else:
        dims = _message(7, _message(1, b"".join(_varint(d) for d in array.shape)))
    return dims + _message(5, np.ascontiguousarray(array, "<f4").tobytes())


# (name, type, V1 type enum) of Caffe's reference nets' layers, bvlc_alexnet's order.
_CAFFE_LAYERS = [
    ("conv1", "Convolution", 4),
    ("relu1", "ReLU", 18),
    ("norm1", "LRN", 15),
    ("pool1", "Pooling", 17),
    ("conv2", "Convolution", 4),
    ("conv3", "Convolution", 4),
    ("conv4", "Convolution", 4),
    ("conv5", "Convolution", 4),
    ("fc6", "InnerProduct", 14),
    ("drop6", "Dropout", 6),
    ("fc7", "InnerProduct", 14),
    ("fc8", "InnerProduct", 14),
    ("prob", "Softmax", 20),
]


def _write_caffemodel(path, weights, *, v1: bool) -> None:
    """A NetParameter with ``layer`` (100: name 1, type 2, blobs 7) or V1 ``layers``
    (2: name 4, type enum 5, blobs 6)."""
    net = [_message(1, b"AlexNet")]
    for name, kind, enum in _CAFFE_LAYERS:
        blobs = [_blob(a, legacy=v1) for a in weights.get(name, ())]
        if v1:
            layer = _message(4, name.encode()) + _number(5, enum)
            layer += b"".join(_message(6, b) for b in blobs)
            net.append(_message(2, layer))
        else:
            layer = _message(1, name.encode()) + _message(2, kind.encode())
            layer += b"".join(_message(7, b) for b in blobs)
            net.append(_message(100, layer))
    with open(path, "wb") as f:
        f.write(b"".join(net))


# Caffe's reference AlexNet: (out, in per group, kernel) of conv1..conv5, groups of 2.
_CAFFE_CONVS = {
    "conv1": (96, 3, 11),
    "conv2": (256, 48, 5),
    "conv3": (384, 256, 3),
    "conv4": (384, 192, 3),
    "conv5": (256, 192, 3),
}


def _caffe_weights(seed: int) -> dict[str, list[np.ndarray]]:
    """Random He-scaled weights (conv1 reads BGR), so activations and LRN stay large."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (out, inputs, k) in _CAFFE_CONVS.items():
        std = np.sqrt(2 / (inputs * k * k))
        weights[name] = [rng.normal(0, std, (out, inputs, k, k)), rng.normal(0, 0.1, out)]
    for name, (out, inputs) in {
        "fc6": (4096, 9216),
        "fc7": (4096, 4096),
        "fc8": (1000, 4096),
    }.items():
        weights[name] = [rng.normal(0, np.sqrt(2 / inputs), (out, inputs)), rng.normal(0, 0.1, out)]
    return {k: [a.astype(np.float32) for a in v] for k, v in weights.items()}


def _caffe_reference(torch, weights, images_bgr_NCHW, *, pool_first: bool):
    """The Caffe net in torch: grouped convs, Caffe's LRN (k=1, alpha/n), ceil-mode pooling."""
    F = torch.nn.functional
    t = {k: [torch.from_numpy(a) for a in v] for k, v in weights.items()}

    def conv(x, name, stride=1, pad=0, groups=1):
        return F.relu(F.conv2d(x, *t[name], stride=stride, padding=pad, groups=groups))

    def pool(x):
        return F.max_pool2d(x, 3, 2, ceil_mode=True)

    def norm(x):  # Caffe's LRN layer: x / (1 + alpha / n * window sum of x^2)^beta.
        return F.local_response_norm(x, 5, alpha=1e-4, beta=0.75, k=1.0)

    def block(x):
        return norm(pool(x)) if pool_first else pool(norm(x))

    x = block(conv(images_bgr_NCHW, "conv1", stride=4))
    x = block(conv(x, "conv2", pad=2, groups=2))
    x = conv(x, "conv3", pad=1)
    x = conv(x, "conv4", pad=1, groups=2)
    x = pool(conv(x, "conv5", pad=1, groups=2))
    x = F.relu(F.linear(torch.flatten(x, 1), *t["fc6"]))
    x = F.relu(F.linear(x, *t["fc7"]))
    return F.linear(x, *t["fc8"]).numpy()


def _lax_reference(weights, images_NCHW, *, caffe: bool, pool_first: bool = False):
    """Either net in its source's layouts (NCHW maps, OIHW grouped convs, fc out x in) with
    jax.lax, no code of alexnet_jax: torch's stand-in where torch is not installed."""
    import jax.numpy as jnp
    from jax import lax

    def conv(x, name, stride=1, pad=0, groups=1):
        w, b = (jnp.asarray(a) for a in weights[name][:2])
        y = lax.conv_general_dilated(
            x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=groups, precision=lax.Precision.HIGHEST,
        )  # fmt: skip
        return jnp.maximum(y + b[None, :, None, None], 0)

    def pool(x):  # At these sizes (55, 27, 13) Caffe's ceil rounding is exact too.
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2), "VALID")

    def norm(x):  # Caffe's LRN across channels: x / (1 + 1e-4 / 5 * window sum of x^2)^0.75.
        padded = jnp.pad(jnp.square(x), ((0, 0), (2, 2), (0, 0), (0, 0)))
        window = sum(padded[:, i : i + x.shape[1]] for i in range(5))
        return x / (1 + 1e-4 / 5 * window) ** 0.75

    def block(x):
        if not caffe:
            return pool(x)
        return norm(pool(x)) if pool_first else pool(norm(x))

    groups = 2 if caffe else 1
    x = block(conv(jnp.asarray(images_NCHW), "conv1", stride=4, pad=0 if caffe else 2))
    x = block(conv(x, "conv2", pad=2, groups=groups))
    x = conv(x, "conv3", pad=1)
    x = conv(x, "conv4", pad=1, groups=groups)
    x = pool(conv(x, "conv5", pad=1, groups=groups))
    assert x.shape[2:] == (6, 6)  # torchvision's adaptive average pool is the identity here.
    x = x.reshape(x.shape[0], -1)  # C, H, W order.
    for name in ("fc6", "fc7", "fc8"):
        w, b = (jnp.asarray(a) for a in weights[name][:2])
        x = jnp.dot(x, w.T, precision=lax.Precision.HIGHEST) + b
        x = jnp.maximum(x, 0) if name != "fc8" else x
    return np.asarray(x)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 300x400 picture (smooth colours and edges), saved losslessly."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:300, 0:400] / 40.0
    pixels = (
        np.stack([np.sin(xx + 1.3 * c) * np.cos(yy * (c + 1) / 2) for c in range(3)], axis=-1) * 100
        + 128
        + rng.normal(0, 10, (300, 400, 3))
    )
    path = str(tmp_path_factory.mktemp("photo") / "photo.png")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def _centre(image, size):
    top = (image.shape[0] - size) // 2
    return image[top : top + size, top : top + size].astype(np.float32)


# --- torchvision ---


@pytest.fixture(scope="module")
def torchvision_import(tmp_path_factory):
    """(torch module, workdir) of a random torchvision AlexNet saved as .pth and imported."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = _torchvision_alexnet(torch).eval()
    with torch.no_grad():  # Spread the logits, so the top-5 order is not decided by rounding.
        net.classifier[6].weight.mul_(100)
    out = tmp_path_factory.mktemp("torchvision")
    torch.save(net.state_dict(), out / "alexnet.pth")
    workdir = str(out / "workdir")
    import_weights.import_weights(str(out / "alexnet.pth"), "torchvision", workdir)
    return net, workdir


def test_torchvision_import_names_the_variant_its_input_and_classes(torchvision_import):
    _, workdir = torchvision_import
    trained = inference.load_trained(workdir)
    assert trained.step == 0
    assert trained.config.model.variant == "torchvision"
    assert trained.config.data.crop_size == 224
    assert trained.config.data.rgb_mean == (123.675, 116.28, 103.53)
    assert trained.config.data.rgb_std == (58.395, 57.12, 57.375)
    assert trained.params["conv1"]["kernel"].shape == (1, 11, 11, 3, 64)
    assert trained.params["fc6"]["kernel"].shape == (1, 9216, 4096)
    assert [c["id"] for c in trained.classes] == sources.ilsvrc2012_wnids()
    assert trained.classes[0] == {"id": "n01440764", "name": "n01440764"}


def test_torchvision_logits_equal_torchs(torchvision_import):
    torch = pytest.importorskip("torch")
    net, workdir = torchvision_import
    trained = inference.load_trained(workdir)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    torch_input = (images / 255 - TORCHVISION_MEAN) / TORCHVISION_STD
    torch_input = torch_input.astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = net(torch.from_numpy(torch_input)).numpy()
    ours = trained.model.apply(
        {"params": trained.params}, torch_input.transpose(0, 2, 3, 1), train=False
    )
    np.testing.assert_allclose(
        np.asarray(ours), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )
    assert np.abs(expected).max() > 1e-2  # Not a net of zeros.


def test_predict_top5_equals_torchs_on_a_saved_image(torchvision_import, photo):
    torch = pytest.importorskip("torch")
    net, workdir = torchvision_import
    trained = inference.load_trained(workdir)
    [result], errors = predict.predict_files(trained, [photo])
    assert errors == []
    # torchvision's eval transform of that prepared 256x256 image: centre 224, [0, 1], Normalize.
    crop = _centre(inference.read_image(photo), 224) / 255
    normalized = (crop - TORCHVISION_MEAN) / TORCHVISION_STD
    with torch.no_grad():
        logits = net(torch.from_numpy(normalized.astype(np.float32).transpose(2, 0, 1)[None]))
    probabilities = torch.softmax(logits, -1).numpy()[0]
    top5 = np.argsort(-probabilities)[:5]
    top6 = np.sort(probabilities)[::-1][:6]
    assert (-np.diff(top6) / top6[1:]).min() > 1e-4  # Ranks apart by far more than rounding.
    assert [p["class_index"] for p in result["top"]] == top5.tolist()
    assert [p["id"] for p in result["top"]] == [sources.ilsvrc2012_wnids()[i] for i in top5]
    np.testing.assert_allclose(
        [p["probability"] for p in result["top"]], probabilities[top5], rtol=1e-4
    )


@pytest.mark.slow  # Exports the full-size net (245 MB) and draws its filters.
def test_export_and_visualize_read_the_imported_workdir(torchvision_import, photo):
    _, workdir = torchvision_import
    trained = inference.load_trained(workdir)
    image = inference.read_image(photo)
    exported = jax.jit(export.probabilities_fn(trained))(export.centre_patch(image)[None])
    expected = predict.predict_probabilities(trained, image[None])
    np.testing.assert_allclose(np.asarray(exported), expected, rtol=1e-5, atol=1e-7)
    grid = visualize.filter_grid(visualize.conv1_kernels(trained.params))
    assert grid.dtype == np.uint8 and grid.ndim == 3  # One tower's 64 kernels.


def _write_safetensors(path, arrays):
    """The .safetensors layout: u64 header length, JSON header, raw little-endian float32s."""
    header, body = {}, b""
    for name, a in arrays.items():
        data = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(a.shape),
            "data_offsets": [len(body), len(body) + len(data)],
        }
        body += data
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)


def test_a_safetensors_state_dict_imports_without_torch(tmp_path, photo):
    rng = np.random.default_rng(1)
    shapes = {
        "features.0": (64, 3, 11, 11),
        "features.3": (192, 64, 5, 5),
        "features.6": (384, 192, 3, 3),
        "features.8": (256, 384, 3, 3),
        "features.10": (256, 256, 3, 3),
        "classifier.1": (4096, 9216),
        "classifier.4": (4096, 4096),
        "classifier.6": (1000, 4096),
    }
    state = {}
    for key, shape in shapes.items():
        std = np.sqrt(2 / np.prod(shape[1:]))  # He-scaled: activations stay O(1).
        state[f"module.{key}.weight"] = rng.normal(0, std, shape).astype(np.float32)
        state[f"module.{key}.bias"] = rng.normal(0, 0.1, shape[0]).astype(np.float32)
    _write_safetensors(tmp_path / "alexnet.safetensors", state)
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    import_weights.import_weights(
        str(tmp_path / "alexnet.safetensors"),
        "torchvision",
        str(tmp_path / "w"),
        class_names_file=str(names),
    )
    trained = inference.load_trained(str(tmp_path / "w"))
    assert trained.classes[:2] == [
        {"id": "n01440764", "name": "tench, Tinca tinca"},
        {"id": "n01443537", "name": "goldfish, Carassius auratus"},
    ]
    assert trained.classes[2] == {"id": "n01484850", "name": "n01484850"}  # Not in the file.
    params = trained.params
    w = state["module.features.0.weight"]  # O x I x kh x kw -> kh x kw x I x O.
    np.testing.assert_array_equal(np.asarray(params["conv1"]["kernel"][0]), w.transpose(2, 3, 1, 0))
    fc6 = state["module.classifier.1.weight"].reshape(4096, 256, 6, 6)  # torch flattens C, H, W.
    h, w_, c, o = 2, 5, 77, 1234
    assert params["fc6"]["kernel"][0, (h * 6 + w_) * 256 + c, o] == fc6[o, c, h, w_]
    np.testing.assert_array_equal(
        np.asarray(params["fc8"]["kernel"]), state["module.classifier.6.weight"].T
    )
    # The imported net's logits on predict's input equal the source layout's net.
    views = trained.views(inference.read_image(photo), ten_crop=False)
    ours = np.asarray(trained.model.apply({"params": params}, views, train=False))
    layers = {
        name: (state[f"module.{key}.weight"], state[f"module.{key}.bias"])
        for name, key in import_weights.TORCHVISION_KEYS.items()
    }
    normalized = (
        _centre(inference.read_image(photo), 224) / 255 - TORCHVISION_MEAN
    ) / TORCHVISION_STD
    expected = _lax_reference(
        layers, normalized.transpose(2, 0, 1)[None].astype(np.float32), caffe=False
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# --- Caffe ---


@pytest.mark.parametrize(("variant", "v1"), [("bvlc_alexnet", False), ("caffenet", True)])
def test_caffe_logits_equal_the_caffe_net(tmp_path, photo, variant, v1):
    weights = _caffe_weights(seed=1 if v1 else 0)
    _write_caffemodel(tmp_path / "net.caffemodel", weights, v1=v1)
    workdir = str(tmp_path / "workdir")
    import_weights.import_weights(
        str(tmp_path / "net.caffemodel"), "caffe", workdir, variant=variant
    )
    trained = inference.load_trained(workdir)
    assert trained.config.model.variant == variant and trained.config.data.crop_size == 227
    assert trained.params["conv2"]["kernel"].shape == (2, 5, 5, 48, 128)  # Caffe's group 2.

    crop = _centre(inference.read_image(photo), 227)  # RGB, 0-255.
    caffe_input = (crop - np.array(import_weights.FORMATS["caffe"].rgb_mean))[..., ::-1]  # BGR.
    images = np.stack([caffe_input, caffe_input[::-1]]).astype(np.float32)  # Two pictures.
    images_NCHW = images.transpose(0, 3, 1, 2).copy()
    ours = np.asarray(
        trained.model.apply({"params": trained.params}, images[..., ::-1].copy(), train=False)
    )
    np.testing.assert_allclose(
        trained.views(inference.read_image(photo), ten_crop=False)[0],
        images[0, ..., ::-1],
        atol=1e-4,
    )
    expected = _lax_reference(weights, images_NCHW, caffe=True, pool_first=v1)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The LRN and its place matter at these magnitudes: the other order is far off.
    other = _lax_reference(weights, images_NCHW, caffe=True, pool_first=not v1)
    assert np.abs(other - expected).max() > 100 * np.abs(ours - expected).max()
    try:
        import torch
    except ImportError:
        return
    with torch.no_grad():
        by_torch = _caffe_reference(torch, weights, torch.from_numpy(images_NCHW), pool_first=v1)
    np.testing.assert_allclose(ours, by_torch, rtol=1e-4, atol=1e-4 * np.abs(by_torch).max())


def test_caffe_blobs_packed_or_not_and_both_shapes():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    unpacked = b"".join(_varint(5 << 3 | 5) + struct.pack("<f", v) for v in values.ravel())
    legacy = _number(3, 2) + _number(4, 3) + _number(1, 1) + _number(2, 1) + unpacked
    for blob in (_blob(values, legacy=False), legacy):
        array = import_weights._blob(memoryview(blob))
        np.testing.assert_array_equal(array.reshape(2, 3), values)


def test_a_file_that_is_not_a_caffemodel_is_named(tmp_path):
    path = tmp_path / "notes.caffemodel"
    path.write_bytes(b"\xff\xff\xff\xff\xff\xff\xff")
    with pytest.raises(import_weights.WeightsFormatError, match="not a readable .caffemodel"):
        import_weights.import_weights(str(path), "caffe", str(tmp_path / "w"))
    _write_caffemodel(path, {"conv1": _caffe_weights(0)["conv1"]}, v1=False)
    with pytest.raises(import_weights.WeightsFormatError, match="no weights and biases for conv2"):
        import_weights.import_weights(str(path), "caffe", str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_weights_of_another_shape_are_named_layer_by_layer(tmp_path):
    weights = _caffe_weights(0)
    weights["conv2"][0] = np.zeros((256, 96, 5, 5), np.float32)  # Not grouped.
    _write_caffemodel(tmp_path / "net.caffemodel", weights, v1=False)
    with pytest.raises(
        import_weights.WeightsFormatError, match=r"conv2.*kernel.*\(2, 5, 5, 96, 128\) in the file"
    ):
        import_weights.import_weights(
            str(tmp_path / "net.caffemodel"), "caffe", str(tmp_path / "w")
        )


def test_the_command_reports_a_missing_file_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "alexnet_jax.import_weights", f"--source={tmp_path}/none.pth",
         "--format=torchvision", f"--workdir={tmp_path}/w"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: --source={tmp_path}/none.pth: no such file"
    )


def test_the_imported_config_is_a_valid_locked_config():
    config = import_weights.imported_config(import_weights.FORMATS["caffe"], "caffenet", 1000, "/d")
    config_lib.validate(config)
    assert config.model.variant == "caffenet" and config.data.mean_subtraction == "channel"


def test_a_prepared_dataset_names_the_classes_if_its_order_is_the_weights(tmp_path):
    wnids = sources.ilsvrc2012_wnids()
    data_dir = str(tmp_path / "prepared")
    os.makedirs(data_dir)
    classes = [{"id": w, "name": f"class {i}"} for i, w in enumerate(wnids)]
    records.write_metadata(data_dir, {"classes": classes, "splits": {}})
    assert import_weights.class_source(str(tmp_path / "w"), 1000, data_dir, None) == data_dir
    records.write_metadata(data_dir, {"classes": classes[::-1], "splits": {}})
    with pytest.raises(errors.UsageError, match="not in the ILSVRC-2012 order"):
        import_weights.class_source(str(tmp_path / "w"), 1000, data_dir, None)
    with pytest.raises(errors.UsageError, match="the weights have 10 outputs but .* 1000 classes"):
        import_weights.class_source(str(tmp_path / "w"), 10, data_dir, None)
    no_data_dir = "10 outputs, not ILSVRC-2012's 1000: pass --data_dir"
    with pytest.raises(errors.UsageError, match=no_data_dir):
        import_weights.class_source(str(tmp_path / "w"), 10, None, None)
