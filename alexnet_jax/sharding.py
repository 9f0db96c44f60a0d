"""Where arrays live: the ('data', 'tower') mesh and the PartitionSpecs for state and batches.

All placement rules are in this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
TOWER_AXIS = "tower"


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'tower') mesh; a -1 entry takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} has more than one -1")
    known = int(np.prod([d for d in shape if d != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh_shape {tuple(mesh_shape)} needs {int(np.prod(shape))} devices, "
            f"found {len(devices)}"
        )
    return jax.make_mesh(
        tuple(shape),
        (DATA_AXIS, TOWER_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their leading axis over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
    """Shardings for every leaf of the train state (replicated for now)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of the batch -> one global array per field."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
