"""The PyTorch reference of the train-step benchmark: the config's network in torch, one SGD step.

The network is ``model.VARIANTS[config.model.variant]`` at the config's
width, built in torch: towers as ``groups`` where they see only their own
maps (conv2, conv4, conv5), LRN per tower or across both with the variant's
constants, dropout where the variant drops. For the torchvision variant at
width 1 it is ``torchvision.models.alexnet`` itself when torchvision imports.
``torch_layers`` reads any of them back in ``import_weights``' layouts, which
is how a test holds each equal to the JAX model.

Where it runs follows JAX's backend, so both frameworks use the same chip:
  * CPU (JAX on the CPU): NCHW tensors, CPU autocast for bfloat16, as before.
  * CUDA (JAX on a GPU): parameters and the fixed batch on the device,
    ``channels_last``, bfloat16 autocast or float32 with TF32 convolutions
    and matmuls (what JAX's default precision runs there), and each step ends
    with a synchronize so that timing it times the device's work. Device
    memory is ``torch.cuda.max_memory_allocated`` since ``reset_device_peak``.
  * Any other JAX backend (TPU): no PyTorch device; the reference is skipped
    with that reason.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from alexnet_jax import import_weights
from alexnet_jax import model as model_lib

# The PyTorch reference's SGD: the paper's values. What a step costs does not depend on them,
# so the optimizer fields of the config are read only by the JAX step (optim.make_optimizer).
TORCH_SGD = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
GPU_BACKENDS = ("gpu", "cuda", "rocm")  # JAX backends whose chip torch reaches as "cuda".


class TorchCompileError(RuntimeError):
    """torch.compile could not build the step (inductor needs a working C++ compiler on CPU)."""


def torch_device(backend: str) -> tuple[str | None, str]:
    """(the torch device on JAX's ``backend``'s chip, "") or (None, why there is none)."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install -r requirements-bench.txt)"
    if backend == "cpu":
        return "cpu", ""
    if backend in GPU_BACKENDS:
        if torch.cuda.is_available():
            return "cuda", ""
        return None, f"torch {torch.__version__} sees no GPU; JAX runs on {backend}"
    return None, f"PyTorch has no device for JAX's {backend} backend"


def torch_unavailable(frameworks: Sequence[str], backend: str) -> str | None:
    """Why the PyTorch steps cannot run next to JAX's ``backend``, or None."""
    if not any(f.startswith("torch") for f in frameworks):
        return None
    device, why = torch_device(backend)
    return None if device else why


def pool5_side(variant: model_lib.Variant, image_size: int) -> int:
    """Side of pool5's maps for a square input: conv1 (11, stride 4), then three 3x3/2 pools."""
    side = (image_size + 2 * variant.conv1_padding - 11) // 4 + 1
    for _ in range(3):  # conv2-conv5 keep the size (their padding is half their kernel).
        side = (side - 3) // 2 + 1
    return side


def torch_alexnet(
    num_classes: int,
    width: float,
    use_lrn: bool,
    *,
    variant: str = "paper",
    lrn_convention: str = "auto",
    dropout_rate: float = 0.5,
    image_size: int = 224,
):
    """``model.AlexNet`` with these fields, in torch (NCHW; towers as ``groups``).

    ``nn.LocalResponseNorm`` divides alpha by the window size, so it is given
    n times the JAX formula's alpha (``model.lrn_constants``): the paper's
    1e-4 becomes 5e-4, Caffe's 1e-4 / 5 its published 1e-4.
    """
    import torch
    from torch import nn

    v = model_lib.VARIANTS[variant]
    towers = v.towers
    c1, c2, c3, c4, c5 = (towers * model_lib.scaled(n // towers, width) for n in v.conv_features)
    fc = towers * model_lib.scaled(v.fc_features // towers, width)
    convention = v.lrn_convention if lrn_convention == "auto" else lrn_convention
    constants = model_lib.lrn_constants(convention)
    size = 2 * constants["depth_radius"] + 1

    class TowerLRN(nn.Module):
        """LRN over each tower's channels separately (the paper's, one GPU each)."""

        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(
                size, alpha=constants["alpha"] * size, beta=model_lib.LRN_BETA,
                k=constants["bias"],
            )  # fmt: skip

        def forward(self, x):
            if v.lrn_across_towers:
                return self.lrn(x)
            return torch.cat([self.lrn(t) for t in x.chunk(towers, dim=1)], dim=1)

    order = v.lrn if use_lrn else "none"

    def normalize_and_pool() -> list:
        pool = nn.MaxPool2d(3, 2)
        return {"before_pool": [TowerLRN(), pool], "after_pool": [pool, TowerLRN()]}.get(
            order, [pool]
        )

    features = nn.Sequential(
        nn.Conv2d(3, c1, 11, stride=4, padding=v.conv1_padding), nn.ReLU(),
        *normalize_and_pool(),
        nn.Conv2d(c1, c2, 5, padding=2, groups=towers), nn.ReLU(), *normalize_and_pool(),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c4, 3, padding=1, groups=towers), nn.ReLU(),
        nn.Conv2d(c4, c5, 3, padding=1, groups=towers), nn.ReLU(),
        nn.MaxPool2d(3, 2),
    )  # fmt: skip
    side = model_lib.AVERAGE_POOL_SIZE if v.average_pool else pool5_side(v, image_size)
    average = nn.AdaptiveAvgPool2d(side) if v.average_pool else nn.Identity()
    drop = functools.partial(nn.Dropout, dropout_rate)
    if v.dropout_before_fc:  # torchvision: dropout on fc6's and fc7's inputs.
        classifier = [drop(), nn.Linear(c5 * side * side, fc), nn.ReLU(), drop(),
                      nn.Linear(fc, fc), nn.ReLU()]  # fmt: skip
    else:  # The paper: dropout on fc6's and fc7's outputs.
        classifier = [nn.Linear(c5 * side * side, fc), nn.ReLU(), drop(),
                      nn.Linear(fc, fc), nn.ReLU(), drop()]  # fmt: skip
    return nn.Sequential(
        collections.OrderedDict(
            features=features,
            avgpool=average,
            flatten=nn.Flatten(),
            classifier=nn.Sequential(*classifier, nn.Linear(fc, num_classes)),
        )
    )


def reference_net(model_config: ml_collections.ConfigDict, image_size: int) -> tuple[Any, str]:
    """The torch network for ``config.model`` and where it comes from (printed next to its rate).

    ``torchvision.models.alexnet`` for the torchvision variant at width 1 when
    torchvision imports (its own layers: the net torchvision users train);
    ``torch_alexnet`` otherwise.
    """
    m = model_config
    built = f"built from model.VARIANTS[{m.variant!r}]"
    if m.variant == "torchvision" and m.width == 1.0:
        try:
            import torchvision
        except Exception as e:  # noqa: BLE001 - a torchvision built for another torch raises.
            built += f"; torchvision does not import ({type(e).__name__})"
        else:
            net = torchvision.models.alexnet(num_classes=m.num_classes, dropout=m.dropout_rate)
            return net, f"torchvision {torchvision.__version__} models.alexnet"
    net = torch_alexnet(
        m.num_classes, m.width, m.use_lrn, variant=m.variant, lrn_convention=m.lrn_convention,
        dropout_rate=m.dropout_rate, image_size=image_size,
    )  # fmt: skip
    return net, built


def torch_layers(net) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{conv1..fc8: (weight, bias)} of a torch AlexNet in PyTorch's layouts (``import_weights``)."""
    from torch import nn

    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if len(layers) != len(import_weights.LAYERS):
        raise ValueError(f"{len(layers)} conv and linear layers, not AlexNet's 8")
    return {
        name: (m.weight.detach().cpu().numpy(), m.bias.detach().cpu().numpy())
        for name, m in zip(import_weights.LAYERS, layers, strict=True)
    }


def _allow_tf32(torch) -> None:
    """float32 convolutions and matmuls on CUDA in TF32: JAX's default precision on the chip."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(cudnn, "conv"):  # torch >= 2.9: the per-backend precision setting.
        matmul.fp32_precision = "tf32"
        cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        cudnn.allow_tf32 = True


def reset_device_peak(device: str) -> None:
    """Starts ``device_peak_mib``'s count afresh (CUDA only)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def device_peak_mib(device: str) -> float | None:
    """Most MiB torch's tensors held on the device since ``reset_device_peak``; None on CPU."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


@dataclasses.dataclass
class TorchStep:
    """One SGD step of ``net`` on a fixed batch (``forward`` is ``net``, or it compiled)."""

    net: Any
    forward: Callable
    optimizer: Any
    images: Any
    labels: Any
    bfloat16: bool
    device: str

    def __call__(self) -> None:
        """One step, run to completion."""
        import torch
        from torch.nn import functional

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bfloat16):
            loss = functional.cross_entropy(self.forward(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        if self.device == "cuda":
            torch.cuda.synchronize()


def torch_train_step(
    config: ml_collections.ConfigDict,
    batch: Mapping[str, np.ndarray],
    *,
    compiled: bool = False,
    device: str = "cpu",
) -> tuple[TorchStep, dict[str, Any]]:
    """PyTorch train step of the config's network on ``device``, eager or under ``torch.compile``.

    ``batch`` is the JAX step's (NHWC images, int labels); it is moved to the
    device once, as JAX's is. bfloat16 compute (``config.model.compute_dtype``)
    runs the forward and the loss under autocast, as JAX casts inputs and
    weights per layer; the parameters and SGD stay float32 in both. Compiled,
    the first step (which compiles forward and backward) runs here and its
    time is ``compile_s``.
    """
    import torch

    m = config.model
    images_nhwc = np.asarray(batch["images"], np.float32)
    net, source = reference_net(m, image_size=images_nhwc.shape[1])
    cuda = device == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    if cuda:
        _allow_tf32(torch)
    net = net.to(device=device, memory_format=layout)
    optimizer = torch.optim.SGD(net.parameters(), **TORCH_SGD)
    images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    images = images.to(device=device, memory_format=layout)
    labels = torch.from_numpy(np.asarray(batch["labels"])).long().to(device)
    bfloat16 = m.compute_dtype == "bfloat16"
    net.train()
    if compiled:
        torch._dynamo.reset()  # Each batch size compiles afresh, with static shapes.
    forward = torch.compile(net, dynamic=False) if compiled else net
    one_step = TorchStep(net, forward, optimizer, images, labels, bfloat16, device)

    precision = "bfloat16 autocast" if bfloat16 else ("float32 (TF32)" if cuda else "float32")
    info = {
        "params": sum(p.numel() for p in net.parameters()),
        "threads": torch.get_num_threads(),
        "device": device,
        "layout": "channels_last" if cuda else "NCHW",
        "precision": precision,
        "net": source,
    }
    if compiled:
        start = time.perf_counter()
        try:
            one_step()
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds (compiler, codegen).
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TorchCompileError(
                f"torch.compile failed: {type(e).__name__}: {first_line}"
            ) from e
        info["compile_s"] = time.perf_counter() - start
    return one_step, info


def train_steps(
    config: ml_collections.ConfigDict,
    names: Sequence[str],
    batch: Mapping[str, np.ndarray],
    device: str,
) -> tuple[dict[str, TorchStep], dict[str, dict[str, Any]], dict[str, str]]:
    """``torch_train_step`` for each of ``names`` ("torch", "torch_compile"), device peak reset.

    Returns (steps, their info, {name: why} for each that inductor could not compile), so a
    failed compile skips that step and leaves the others to time.
    """
    reset_device_peak(device)
    steps, info, failed = {}, {}, {}
    for name in names:
        try:
            steps[name], info[name] = torch_train_step(
                config, batch, compiled=name == "torch_compile", device=device
            )
        except TorchCompileError as e:
            failed[name] = str(e)
    return steps, info, failed


def describe(info: Mapping[str, Any]) -> str:
    """The words printed after a PyTorch step's rate: where and how it ran, and which net."""
    where = (
        f"{info['threads']} threads" if info["device"] == "cpu"
        else f"{info['device']}, {info['layout']}"
    )  # fmt: skip
    return f"{where}, {info['precision']}, {info['params']:,} parameters, {info['net']}"
