"""A trained model as one portable file: serialized StableHLO (``jax.export``) or ONNX.

    python -m alexnet_jax.export --workdir=/tmp/alexnet_demo  # -> DIR/export/alexnet.jax_exported
    python -m alexnet_jax.export --workdir=DIR --output=F --platforms=cpu
    python -m alexnet_jax.export --workdir=DIR --format=onnx  # -> DIR/export/alexnet.onnx

The file holds predict's centre-crop computation, from the pixels of the
central 224x224 patch of a prepared image (uint8, any batch size) to the
class probabilities: the mean image's central patch subtracted, times
``config.data.input_scale``, the network, softmax. The params are constants
in the program, so the file alone runs it (no checkpoint, dataset or this
package's model code); ``F.json`` beside it names the classes, the input and
the preprocessing. By default it is lowered for CPU and CUDA (lowering needs
no GPU), so a file made on a CPU host runs on a GPU. Run it back with
``load`` (a jax program; docs/export.md)::

    probabilities = export.load("alexnet.jax_exported")(crops_Bx224x224x3_uint8)

Serialization needs the ``flatbuffers`` package (``requirements-export.txt``).
``--format=onnx`` writes the same function as an ONNX graph instead
(``alexnet_jax/export_onnx.py``; needs the ``onnx`` package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from alexnet_jax import cli, errors, inference, tuning
from alexnet_jax.data import augment

DEFAULT_PLATFORMS = ("cpu", "cuda")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for.
INPUT_DTYPE = "uint8"
FORMAT = "jax.export serialized StableHLO"
# --format values -> the default file name under WORKDIR/export/.
FORMATS = {"stablehlo": "alexnet.jax_exported", "onnx": "alexnet.onnx"}


class ExportError(RuntimeError):
    """The model could not be lowered for the asked-for platforms."""


def metadata_path(path: str) -> str:
    """Where the description of the exported file ``path`` is written: ``path.json``."""
    return path + ".json"


def probabilities_fn(trained: inference.TrainedModel) -> Callable[[jax.Array], jax.Array]:
    """Bx224x224x3 pixels of centre patches -> B x K, the same values as predict's centre crop.

    predict subtracts the mean image's central patch and scales in NumPy, then
    runs the net; here both steps are in the program, in the same float32
    order, so a consumer needs only the pixels. The net is rebuilt without a
    mesh (one device, unsharded) and with the plain kernels: the CPU schedules
    compute the same values, but split the batch in chunks, which a batch of
    unknown size cannot be.
    """
    p = trained.preprocessing
    mean_patch = np.ascontiguousarray(inference.centre_patch(p.mean, p.crop_size), np.float32)
    scale = np.asarray(p.scale, np.float32)  # One number, or one per RGB channel.
    model = trained.model.clone(mesh=None, kernels=tuning.plain_kernels(0))
    params = trained.params

    def probabilities(pixels_BxHxWxC: jax.Array) -> jax.Array:
        images = pixels_BxHxWxC.astype(jnp.float32) - mean_patch
        if np.any(scale != 1.0):
            images = images * scale
        logits = model.apply({"params": params}, images, train=False)
        return augment.average_crop_softmax(logits[:, None])  # One view, as predict's.

    return probabilities


def input_spec(crop_size: int = inference.CROP_SIZE) -> jax.ShapeDtypeStruct:
    """b x 224 x 224 x 3 uint8 with a symbolic batch size ``b``."""
    shape = jax.export.symbolic_shape(f"b, {crop_size}, {crop_size}, 3")
    return jax.ShapeDtypeStruct(shape, jnp.dtype(INPUT_DTYPE))


def export_model(
    trained: inference.TrainedModel, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> jax.export.Exported:
    """``probabilities_fn`` lowered for ``platforms``, any batch size; raises ``ExportError``."""
    fn = jax.jit(probabilities_fn(trained))
    spec = input_spec(trained.preprocessing.crop_size)
    try:
        return jax.export.export(fn, platforms=tuple(platforms))(spec)
    except (NotImplementedError, ValueError) as e:  # A primitive without a lowering there.
        raise ExportError(f"Cannot lower the model for {', '.join(platforms)}: {e}") from e


def export_with_fallback(
    trained: inference.TrainedModel, platforms: Sequence[str] | None
) -> jax.export.Exported:
    """For ``platforms``; when none are given, CPU and CUDA, else (with a warning) CPU alone."""
    if platforms:
        return export_model(trained, platforms)
    try:
        return export_model(trained, DEFAULT_PLATFORMS)
    except ExportError as e:
        logging.warning("%s; exporting for cpu only (pass --platforms to choose)", e)
        return export_model(trained, ("cpu",))


def describe(trained: inference.TrainedModel, exported: jax.export.Exported) -> dict[str, Any]:
    """What a consumer of the file must know: classes, input, preprocessing, platforms."""
    return {
        "format": FORMAT,
        "load": "alexnet_jax.export.load(path), or jax.export.deserialize(bytes).call(pixels)",
        "platforms": list(exported.platforms),
        "calling_convention_version": exported.calling_convention_version,
        "jax_version": jax.__version__,
        **describe_model(trained),
    }


def describe_model(trained: inference.TrainedModel) -> dict[str, Any]:
    """What every format's description says: step, input, what is inside, output, classes."""
    config, p = trained.config, trained.preprocessing
    crop, full = p.crop_size, p.mean.shape[0]
    return {
        "checkpoint_step": trained.step,
        "input": {
            "shape": ["b", crop, crop, 3],
            "dtype": INPUT_DTYPE,
            "layout": "batch, height, width, RGB channels; pixel values 0-255",
            "preprocessing": (
                f"each image prepared as the training data: decoded to RGB, shorter side "
                f"resized to {full}, central {full}x{full} (alexnet_jax.inference.read_image); "
                f"then its central {crop}x{crop} patch (rows and columns "
                f"{(full - crop) // 2}:{(full + crop) // 2}). Mean subtraction and input scale "
                "are inside the program: pass raw pixels."
            ),
        },
        "inside": {
            "mean_subtraction": config.data.mean_subtraction,
            "mean": (
                f"RGB {list(config.data.rgb_mean)} at every pixel"
                if tuple(config.data.rgb_mean)
                else f"central {crop}x{crop} patch of the training set's mean image"
            ),
            "input_scale": np.asarray(p.scale, np.float32).tolist(),  # A number or one per RGB.
            "model": {
                k: config.model[k] for k in ("variant", "width", "num_classes", "compute_dtype")
            },
        },
        "output": {
            "shape": ["b", len(trained.classes)],
            "dtype": "float32",
            "meaning": "softmax probabilities; index i is classes[i]",
        },
        "classes": trained.classes,
    }


def write_atomically(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file, so no half file is ever left."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save(trained: inference.TrainedModel, exported: jax.export.Exported, path: str) -> None:
    """The serialized program at ``path``, its description at ``metadata_path(path)``."""
    write_atomically(path, bytes(exported.serialize()))
    save_description(describe(trained, exported), path)


def save_description(description: dict[str, Any], path: str) -> None:
    """``description`` as JSON at ``metadata_path(path)``."""
    write_atomically(metadata_path(path), (json.dumps(description, indent=1) + "\n").encode())


def load(path: str) -> Callable[[Any], jax.Array]:
    """The exported file at ``path`` as a jitted ``pixels_Bx224x224x3 -> probabilities_BxK``.

    Runs on JAX's default device when the file was lowered for its platform.
    """
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return jax.jit(exported.call)


def load_metadata(path: str) -> dict[str, Any]:
    """The description written next to the exported file ``path``."""
    with open(metadata_path(path)) as f:
        return json.load(f)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (tools never clash on import)."""
    cli.define_checkpoint_flags()
    flags.DEFINE_string(
        "format",
        "stablehlo",
        f"What to write, one of {', '.join(FORMATS)}: a jax.export file of StableHLO, or an "
        "ONNX graph (onnxruntime, TensorRT, OpenVINO).",
    )
    flags.DEFINE_string(
        "output",
        None,
        "File to write (default WORKDIR/export/alexnet.jax_exported, or alexnet.onnx); its "
        "description goes to OUTPUT.json.",
    )
    flags.DEFINE_list(
        "platforms",
        None,
        f"Platforms to lower for, of {', '.join(PLATFORMS)} (default: cpu,cuda, or cpu alone if "
        "lowering for cuda fails). StableHLO only.",
    )


def main(argv: Sequence[str]) -> int:
    return cli.run_flags_only_command(argv, _run)


def _run() -> int:
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if FLAGS.format not in FORMATS:
        raise errors.UsageError(
            f"--format: unknown {FLAGS.format!r}; accepted: {', '.join(FORMATS)}"
        )
    unknown = sorted(set(FLAGS.platforms or ()) - set(PLATFORMS))
    if unknown:
        raise errors.UsageError(f"--platforms: unknown {unknown}; accepted: {', '.join(PLATFORMS)}")
    if FLAGS.format == "onnx" and FLAGS.platforms:
        raise errors.UsageError(
            "--platforms is for --format=stablehlo; an ONNX file runs on whatever device its "
            "runtime is given"
        )
    package = {"stablehlo": "flatbuffers", "onnx": "onnx"}[FLAGS.format]
    if importlib.util.find_spec(package) is None:
        raise errors.UsageError(
            f"writing a --format={FLAGS.format} file needs the {package} package: "
            "pip install -r requirements-export.txt"
        )
    output = FLAGS.output or os.path.join(FLAGS.workdir, "export", FORMATS[FLAGS.format])
    tuning.configure_process()  # Before JAX starts its backends.
    trained = inference.load_trained(
        FLAGS.workdir, config=FLAGS.config, data_dir=FLAGS.data_dir, step=FLAGS.step
    )
    if FLAGS.format == "onnx":
        return _write_onnx(trained, output)
    try:
        exported = export_with_fallback(trained, FLAGS.platforms)
        save(trained, exported, output)
    except (ExportError, OSError) as e:
        raise errors.UsageError(str(e)) from None
    logging.info(
        "Exported step %d of %s for %s to %s (%.1f MB) and %s",
        trained.step,
        FLAGS.workdir,
        ", ".join(exported.platforms),
        output,
        os.path.getsize(output) / 1e6,
        metadata_path(output),
    )
    return cli.EXIT_OK


def _write_onnx(trained: inference.TrainedModel, output: str) -> int:
    from alexnet_jax import export_onnx  # onnx is an optional dependency.

    onnx_model = export_onnx.build(trained)
    try:
        write_atomically(output, onnx_model.SerializeToString())
        save_description(export_onnx.describe(onnx_model, describe_model(trained)), output)
    except OSError as e:
        raise errors.UsageError(str(e)) from None
    logging.info(
        "Exported step %d of %s as ONNX (opset %d) to %s (%.1f MB) and %s",
        trained.step,
        FLAGS.workdir,
        export_onnx.OPSET,
        output,
        os.path.getsize(output) / 1e6,
        metadata_path(output),
    )
    return cli.EXIT_OK


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
