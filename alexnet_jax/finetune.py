"""Starting a new run from a trained model's parameters: fine-tuning on another dataset.

``config.init_from`` names a workdir: a training run's, or any holding a
checkpoint in that format (imported weights). Its params are read with
``inference.load_params`` (params only; the newest usable checkpoint unless
``config.init_from_step``), placed as this run's are. Every layer comes from
it except the head: when ``model.num_classes`` differs, fc8 keeps this run's
fresh initialization (``model.init_scheme``). The network must otherwise be the
same one, so the source's other model-defining fields must equal this run's.
The optimizer and schedule start fresh; ``config.optim.frozen_layers`` keeps
chosen layers as they came. Only a fresh run reads ``init_from``: a
relaunch resumes from its own workdir.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from alexnet_jax import config_lib, inference

HEAD = "fc8"
# May differ from the source: the head's size, and how a new head starts.
HEAD_FIELDS = ("model.num_classes", "model.init_scheme")


def source_differences(
    source: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
    """(field, source's value, this run's) for each model-defining field but the head's."""
    old, new = (config_lib.flatten(c.to_dict()) for c in (source, config))
    return [
        (name, old.get(name), new.get(name))
        for name in config_lib.MODEL_DEFINING_FIELDS
        if name not in HEAD_FIELDS and old.get(name) != new.get(name)
    ]


@dataclasses.dataclass(frozen=True)
class Source:
    """The params a fine-tuning run starts from, and where they came from."""

    params: Any
    config: ml_collections.ConfigDict
    step: int
    workdir: str


def load_source(config: ml_collections.ConfigDict, abstract_params: Any) -> Source:
    """``config.init_from``'s params, placed as ``abstract_params`` (this run's) say.

    Raises ConfigError naming ``config.init_from`` and each field to change
    when the source is missing or is another network; reads no array before
    its config passed.
    """
    workdir = os.path.abspath(os.path.expanduser(config.init_from))
    where = f"config.init_from = {config.init_from!r}"

    def check(source: ml_collections.ConfigDict) -> None:
        differences = source_differences(source, config)
        if differences:
            raise config_lib.ConfigError(
                f"{where}: fine-tuning keeps the source's network, but "
                + "; ".join(f"config.{n} is {a!r} there and {b!r} here" for n, a, b in differences)
                + ". Use the source's values: "
                + " ".join(f"--config.{n}={a}" for n, a, _ in differences)
            )

    step = None if config.init_from_step == -1 else config.init_from_step
    shardings = jax.tree.map(lambda p: p.sharding, abstract_params)
    try:
        source, _, params, step = inference.load_params(
            workdir, step=step, sharding=shardings, check_config=check
        )
    except inference.CheckpointMissingError as e:
        raise config_lib.ConfigError(
            f"{where}: {e}. Point it at a workdir that holds a checkpoint (--config.init_from=DIR)"
            + (", or drop --config.init_from_step to use its newest" if step is not None else "")
        ) from None
    new_head = source.model.num_classes != config.model.num_classes
    for layer, leaves in abstract_params.items():
        for name, leaf in leaves.items():
            if (layer != HEAD or not new_head) and params[layer][name].shape != leaf.shape:
                raise config_lib.ConfigError(  # Only a field missing from the schema gets here.
                    f"{where}: {layer}/{name} is {params[layer][name].shape} there but "
                    f"{leaf.shape} here"
                )
    return Source(params, source, step, workdir)


def initial_params(source: Source, fresh_params: Any, config: ml_collections.ConfigDict) -> Any:
    """``source``'s params, with ``fresh_params``' fc8 when the class count differs."""
    new_head = source.config.model.num_classes != config.model.num_classes
    logging.info(
        "Initialized from step %d of %s: %s",
        source.step,
        source.workdir,
        f"every layer but {HEAD}, which is new ({source.config.model.num_classes} -> "
        f"{config.model.num_classes} classes, {config.model.init_scheme} init)"
        if new_head
        else "every layer",
    )
    if new_head and HEAD in config.optim.frozen_layers:
        logging.warning(
            "config.optim.frozen_layers holds %s, the new head: it stays at its random init",
            HEAD,
        )
    return {**source.params, HEAD: fresh_params[HEAD] if new_head else source.params[HEAD]}
