"""The benchmark's PyTorch reference is the JAX model's network, on the chip JAX runs on."""

import jax
import numpy as np
import pytest

from alexnet_jax import config_lib, import_weights, model
from alexnet_jax.benchmarks import torch_reference

torch = pytest.importorskip("torch")


def _model_config(**fields):
    m = config_lib.defaults().model
    for k, v in fields.items():
        m[k] = v
    return m


@pytest.mark.parametrize(
    "variant, parameters",
    [("paper", 60_965_224), ("torchvision", 61_100_840)],  # torchvision.models.alexnet's count.
)
def test_torch_reference_has_the_networks_parameter_count(variant, parameters):
    net = torch_reference.torch_alexnet(1000, 1.0, True, variant=variant)
    assert sum(p.numel() for p in net.parameters()) == parameters
    abstract = jax.eval_shape(
        lambda: model.AlexNet(variant=variant).init(
            jax.random.PRNGKey(0), jax.numpy.zeros((1, 224, 224, 3)), train=False
        )
    )
    assert model.count_params(abstract["params"]) == parameters


@pytest.mark.parametrize("variant", list(model.VARIANTS))
def test_torch_reference_logits_equal_the_jax_models(variant):
    """The torch net's weights, read as ``import_weights`` reads torchvision's, give JAX's logits.

    Both sum the same float32 products in other orders: 1e-4 of the logits'
    scale, as the weight-import tests. Inputs of magnitude ~50 (the pipeline's
    0-255 scale) make the LRN's window term large, so a wrong LRN would show.
    """
    torch.manual_seed(0)
    width, size = 1 / 16, 100
    net = torch_reference.torch_alexnet(10, width, True, variant=variant, image_size=size)
    net.eval()
    images = np.random.default_rng(0).normal(0, 50, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
    towers = model.VARIANTS[variant].towers
    params = import_weights.to_params(torch_reference.torch_layers(net), towers)
    jax_net = model.AlexNet(num_classes=10, width=width, variant=variant)
    ours = np.asarray(jax_net.apply({"params": params}, images, train=False))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * scale)
    if model.VARIANTS[variant].lrn != "none":  # The comparison sees the LRN.
        no_lrn = jax_net.clone(use_lrn=False).apply({"params": params}, images, train=False)
        assert np.abs(np.asarray(no_lrn) - expected).max() > 1e-2 * scale


def test_pool5_side_follows_the_crop_and_conv1_padding():
    assert torch_reference.pool5_side(model.VARIANTS["paper"], 224) == 6
    assert torch_reference.pool5_side(model.VARIANTS["bvlc_alexnet"], 227) == 6  # Caffe's crop.
    assert torch_reference.pool5_side(model.VARIANTS["bvlc_alexnet"], 224) == 5


def test_torch_runs_on_jax_s_chip_or_says_why_not(monkeypatch):
    assert torch_reference.torch_device("cpu") == ("cpu", "")
    device, why = torch_reference.torch_device("tpu")
    assert device is None and "no device for JAX's tpu" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, why = torch_reference.torch_device("gpu")
    assert device is None and "sees no GPU; JAX runs on gpu" in why
    assert torch_reference.torch_unavailable(("jax", "torch"), "gpu") == why
    assert torch_reference.torch_unavailable(("jax",), "gpu") is None  # No torch asked for.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_reference.torch_device("gpu") == ("cuda", "")
    assert torch_reference.torch_unavailable(("jax", "torch"), "gpu") is None


def test_the_torchvision_variant_names_the_net_it_runs():
    m = _model_config(variant="torchvision", num_classes=10)
    net, source = torch_reference.reference_net(m, 224)
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - not installed, or built for another torch.
        assert source.startswith("built from model.VARIANTS['torchvision']; torchvision does not")
        assert sum(p.numel() for p in net.parameters()) == 57_044_810  # 10 classes.
    else:
        assert source == f"torchvision {torchvision.__version__} models.alexnet"
        reference = torchvision.models.alexnet(num_classes=10)
        shapes = [p.shape for p in reference.parameters()]
        assert [p.shape for p in net.parameters()] == shapes
        built = torch_reference.torch_alexnet(10, 1.0, True, variant="torchvision")
        assert [p.shape for p in built.parameters()] == shapes  # The built one is the same.
    # Below width 1 torchvision has no such net: the built one, at that width.
    _, source = torch_reference.reference_net(_model_config(variant="torchvision", width=0.5), 224)
    assert source.startswith("built from")


def test_one_cpu_step_is_sgd_on_the_cross_entropy():
    """The step's update is SGD with the paper's momentum and decay on the batch's loss."""
    config = config_lib.defaults()
    config.model.width, config.model.num_classes, config.model.dropout_rate = 1 / 16, 10, 0.0
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.normal(0, 50, (2, 224, 224, 3)).astype(np.float32),
        "labels": np.array([3, 7], np.int32),
    }
    torch.manual_seed(0)
    step, info = torch_reference.torch_train_step(config, batch, device="cpu")
    assert (info["device"], info["layout"], info["precision"]) == ("cpu", "NCHW", "float32")
    assert "threads" in torch_reference.describe(info)
    # The same net and weights, its gradient by hand: the first SGD step is -lr (g + wd w).
    torch.manual_seed(0)
    twin, _ = torch_reference.reference_net(config.model, 224)
    images = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
    loss = torch.nn.functional.cross_entropy(twin(images), torch.tensor([3, 7]))
    loss.backward()
    before = [p.detach().clone() for p in twin.parameters()]
    step()
    sgd = torch_reference.TORCH_SGD
    after = list(step.net.parameters())
    for w, w_after, p in zip(before, after, twin.parameters(), strict=True):
        expected = w - sgd["lr"] * (p.grad + sgd["weight_decay"] * w)
        torch.testing.assert_close(w_after.detach(), expected, rtol=1e-4, atol=1e-6)
