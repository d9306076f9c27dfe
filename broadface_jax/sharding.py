"""Mesh, partition rules and batch placement.

The mesh has two axes, ('data', 'model'). The batch and the BroadFace queue are
sharded on their leading axis over every device (both axes, `BATCH_AXES`), so
each device holds its local batch and its own queue shard; with a 'model' axis
of size 1 that is plain data parallelism over 'data'. Parameters are
replicated, except the classifier W[C, D], which `config.classifier_sharding`
may shard over classes (the batch embeddings are then gathered over 'model'
for the logits, as in PartialFC, by the compiler):

* 'replicated': W on every device (the paper's setting).
* 'model': W split over the 'model' axis (data × model meshes).
* 'all': W split over every device ('data' and 'model' together).

Rules are (regex over the '/'-joined leaf path, PartitionSpec) pairs; the first
match wins and unmatched leaves are replicated. Optimizer state leaves carry
their parameter's path (e.g. .../trace/classifier/kernel), so they follow it.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
BATCH_AXES = (DATA, MODEL)  # the batch and the queue are split over every device


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh; `data = -1` takes every device not used by 'model'."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    model = int(mesh_config.model)
    data = int(mesh_config.data)
    if model < 1 or n % model:
        raise ValueError(f"config.mesh.model={model} does not divide the {n} devices")
    if data == -1:
        data = n // model
    if data * model != n:
        raise ValueError(
            f"config.mesh data={mesh_config.data} x model={model} does not match the "
            f"{n} devices")
    return jax.make_mesh((data, model), (DATA, MODEL),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def classifier_spec(mode: str) -> P:
    if mode == "replicated":
        return P()
    if mode == "model":
        return P(MODEL, None)
    if mode == "all":
        return P((DATA, MODEL), None)
    raise ValueError(
        f"config.classifier_sharding={mode!r}; expected 'replicated', 'model' or 'all'")


def classifier_shards(mesh: Mesh, mode: str) -> int:
    """How many pieces the classifier's class axis is cut into."""
    spec = classifier_spec(mode)
    if not spec:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return int(np.prod([mesh.shape[a] for a in axes]))


def partition_rules(config: Any) -> list[tuple[str, P]]:
    return [
        (r"(^|/)classifier/kernel$", classifier_spec(config.classifier_sharding)),
        (r"^queue/(embeddings|weights|labels|valid)$", P(BATCH_AXES)),
    ]


def tree_shardings(tree: Any, mesh: Mesh, rules: list[tuple[str, P]]) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
    compiled = [(re.compile(r), spec) for r, spec in rules]

    def one(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        for rx, spec in compiled:
            if rx.search(name) and len(spec) <= np.ndim(leaf):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def global_batch_size(config: Any) -> int:
    """Images per step over all devices (batch sizes in the config are per device)."""
    return int(config.per_device_batch_size) * jax.device_count()


def local_batch_size(config: Any) -> int:
    """Images per step fed by this process: its share of :func:`global_batch_size`."""
    return int(config.per_device_batch_size) * jax.local_device_count()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Per-process numpy batch -> global jax.Arrays sharded over every device.

    Each process passes its own rows; `jax.make_array_from_process_local_data`
    stitches them into one global array (a no-op reshuffle on one process).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch)
