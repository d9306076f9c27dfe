"""Elastic resume: restore a checkpoint written on another number of devices.

Everything in the train state but the BroadFace queue has the same shape on
any mesh (orbax reshards it on restore). The queue does not: it holds
``config.queue.size_per_device`` rows per device, laid out as one ring buffer
per device, so a run saved on 8 devices has 8x the rows of a run resumed on 1.

`restore` reads the saved queue's shape from the checkpoint's metadata. When
it matches the current layout this is a plain `checkpointing.restore`. When
it does not, the queue leaves are restored with their saved shapes
(replicated on the new mesh), `queue.relayout` carries the newest valid rows
into the new layout (host-side, once), the result is placed with the queue's
sharding, and the change is logged.

The saved number of ring buffers is the saved row count divided by the rows
per device, so ``config.queue.size_per_device`` must be the one the
checkpoint was written with (an error says so otherwise).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from broadface_jax import checkpointing, queue as queue_lib

_QUEUE_ARRAYS = ("embeddings", "weights", "labels", "valid")


def saved_queue_rows(path: str | os.PathLike, step: Optional[int] = None) -> int:
    """Rows of the queue stored in a checkpoint (0 for a run without a queue)."""
    folder, step = checkpointing.resolve(path, step)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    reader = ocp.CheckpointManager(folder, options=options,
                                   item_handlers=ocp.PyTreeCheckpointHandler())
    try:
        metadata = reader.item_metadata(step)
    except Exception as e:  # orbax raises several types for unreadable metadata
        raise checkpointing.UnreadableCheckpointError(
            f"checkpoint {folder}/{step} cannot be read (corrupt or incomplete?): "
            f"{type(e).__name__}: {e}") from e
    finally:
        reader.close()
    tree = getattr(metadata, "tree", metadata)
    try:
        labels = tree["queue"]["labels"]
    except (KeyError, TypeError) as e:
        raise checkpointing.CheckpointError(
            f"checkpoint {folder}/{step} has no queue/labels entry: not a broadface_jax "
            "train state") from e
    return 0 if labels is None or not hasattr(labels, "shape") else int(labels.shape[0])


def restore(path: str | os.PathLike, target: Any, step: Optional[int] = None
            ) -> tuple[Any, Optional[str]]:
    """Restores a whole train state, re-laying the queue out if the device count changed.

    Args:
      path: workdir, checkpoints folder or step folder (`checkpointing.resolve`).
      target: the abstract train state for the current mesh
        (`checkpointing.abstract_like(state, shardings)`).
      step: a specific step; default the latest.

    Returns:
      ``(state, note)``; ``note`` describes the queue relayout, or is None when
      the saved queue already had the current layout.
    """
    folder, step = checkpointing.resolve(path, step)
    new_q = target.queue
    saved_rows = saved_queue_rows(folder, step)
    if saved_rows == new_q.capacity:
        return checkpointing.restore(folder, target, step), None

    per_device = new_q.shard_capacity if new_q.capacity else 0
    if new_q.capacity and saved_rows % per_device:
        raise checkpointing.CheckpointError(
            f"checkpoint {folder}/{step} holds a queue of {saved_rows} rows, not a multiple "
            f"of config.queue.size_per_device={per_device}: resume with the "
            "size_per_device the run was saved with")
    old_shards = saved_rows // per_device if (saved_rows and per_device) else 1
    replicated = jax.sharding.NamedSharding(new_q.labels.sharding.mesh,
                                            jax.sharding.PartitionSpec())
    dim = new_q.embeddings.shape[1]
    saved_shapes = {"embeddings": (saved_rows, dim), "weights": (saved_rows, dim),
                    "labels": (saved_rows,), "valid": (saved_rows,)}
    old_target = target.replace(queue=new_q.replace(
        num_shards=old_shards,
        **{k: jax.ShapeDtypeStruct(saved_shapes[k], getattr(new_q, k).dtype,
                                   sharding=replicated) for k in _QUEUE_ARRAYS}))
    state = checkpointing.restore(folder, old_target, step)

    old_q = jax.device_get(state.queue)
    moved = queue_lib.relayout(old_q, new_q.capacity, new_q.num_shards)
    placed = moved.replace(**{
        k: _place(np.asarray(getattr(moved, k)), getattr(new_q, k).sharding)
        for k in _QUEUE_ARRAYS + ("position",)})
    kept = int(np.sum(np.asarray(moved.valid)))
    note = (f"elastic resume: queue re-laid out from {saved_rows} rows in {old_shards} "
            f"device shards to {new_q.capacity} rows in {new_q.num_shards}; kept the "
            f"newest {kept} of {int(np.sum(np.asarray(old_q.valid)))} valid rows")
    logging.info("%s (checkpoint %s/%d)", note, folder, step)
    return state.replace(queue=placed), note


def _place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same in every process) as a global array with `sharding`."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
