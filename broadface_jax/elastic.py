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
per device the checkpoint was written with (``saved_queue_per_device``, from
the workdir's config.json), so a change of ``config.queue.size_per_device``
(allowed with ``allow_resume_changes``) is re-laid out the same way: the
newest valid rows are kept, up to the new capacity.

`restore` also carries a checkpoint over to a new optimizer whose state has
other leaves (see its docstring), and refuses any other layout change.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from broadface_jax import checkpointing, queue as queue_lib

_QUEUE_ARRAYS = ("embeddings", "weights", "labels", "valid")


def saved_queue_rows(path: str | os.PathLike, step: Optional[int] = None) -> int:
    """Rows of the queue stored in a checkpoint (0 for a run without a queue).

    Raises:
      checkpointing.UnreadableCheckpointError: the metadata is missing or unreadable.
    """
    return _queue_rows(checkpointing.stored_leaves(path, step))


def _queue_rows(stored: dict) -> int:
    labels = stored.get("queue.labels")
    return int(labels[0][0]) if labels else 0


def _listed(names: list[str], limit: int = 6) -> str:
    more = f"; and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(names[:limit]) + more


def restore(path: str | os.PathLike, target: Any, step: Optional[int] = None, *,
            fresh: Optional[Callable[[], Any]] = None,
            saved_queue_per_device: Optional[int] = None) -> tuple[Any, Optional[str]]:
    """Restores a whole train state into the layout the current config builds.

    Before anything is read, the checkpoint's metadata is compared with
    ``target`` leaf by leaf (:func:`checkpointing.compare_layout`):

    * the same leaves: a plain restore (orbax reshards onto the current mesh);
    * the queue's row count differs (another device count, or another
      ``queue.size_per_device``): the queue is re-laid out (module doc);
    * only optimizer-state leaves differ (momentum switched on or off,
      gradient clipping or weight decay added or removed: optax transforms
      with or without state): the saved leaves are restored by name into the
      new structure, leaves the new optimizer adds start fresh (``fresh()``),
      leaves it no longer has are dropped; the note lists them;
    * anything else (another model, class count, embedding size, ...):
      :class:`checkpointing.LayoutMismatchError` naming the leaves; nothing is
      read or moved.

    Args:
      path: workdir, checkpoints folder or step folder (`checkpointing.resolve`).
      target: the abstract train state for the current mesh
        (`checkpointing.abstract_like(state, shardings)`).
      step: a specific step; default the latest.
      fresh: returns a freshly initialised concrete state (only called when
        optimizer leaves must be initialised).
      saved_queue_per_device: ``queue.size_per_device`` the checkpoint was
        written with (from the workdir's config.json); default the current one.

    Returns:
      ``(state, note)``; ``note`` describes a queue relayout or optimizer-state
      mapping, or is None for a plain restore.

    Raises:
      checkpointing.UnreadableCheckpointError: metadata or files unreadable
        or failing their checksums.
      checkpointing.LayoutMismatchError: the config builds another layout.
    """
    folder, step = checkpointing.resolve(path, step)
    where = f"{folder}/{step}"
    stored = checkpointing.stored_leaves(folder, step)
    new_q = target.queue
    saved_rows = _queue_rows(stored)
    read_target, old_shards = target, None
    if saved_rows != new_q.capacity:
        per_device = int(saved_queue_per_device or 0) or (
            new_q.shard_capacity if new_q.capacity else 0)
        if per_device and saved_rows % per_device:
            raise checkpointing.LayoutMismatchError(
                f"checkpoint {where} holds a queue of {saved_rows} rows, not a multiple of "
                f"config.queue.size_per_device={per_device}: resume with the size_per_device "
                "the run was saved with")
        old_shards = saved_rows // per_device if (saved_rows and per_device) else 1
        replicated = jax.sharding.NamedSharding(new_q.labels.sharding.mesh,
                                                jax.sharding.PartitionSpec())
        dim = new_q.embeddings.shape[1]
        saved_shapes = {"embeddings": (saved_rows, dim), "weights": (saved_rows, dim),
                        "labels": (saved_rows,), "valid": (saved_rows,)}
        read_target = target.replace(queue=new_q.replace(
            num_shards=old_shards,
            **{k: jax.ShapeDtypeStruct(saved_shapes[k], getattr(new_q, k).dtype,
                                       sharding=replicated) for k in _QUEUE_ARRAYS}))
    differing, only_saved, only_new, moved = checkpointing.compare_layout(
        stored, checkpointing.storable_leaves(read_target))
    layout = differing + [f"{n}: only in the checkpoint" for n in only_saved
                          if not n.startswith("opt_state.")]
    layout += [f"{n}: not in the checkpoint" for n in only_new
               if not n.startswith("opt_state.")]
    if layout:
        raise checkpointing.LayoutMismatchError(
            f"checkpoint {where} does not fit the state this config builds "
            f"({len(layout)} leaves differ): {_listed(layout)}")
    notes = []
    if only_saved or only_new or moved:
        if fresh is None:
            raise checkpointing.LayoutMismatchError(
                f"checkpoint {where}: the optimizer state differs from this config's "
                f"({_listed(only_saved + only_new)})")
        fresh_state = fresh()
        if old_shards is not None:  # the fresh queue must have the saved rows too
            fresh_state = fresh_state.replace(queue=jax.tree.map(
                lambda a: np.zeros(a.shape, a.dtype), read_target.queue))
        state, dropped, initialised = checkpointing.restore_mapped(
            folder, read_target, fresh_state, step)
        del fresh_state
        notes.append("optimizer state mapped to the new optimizer"
                     + (f"; dropped {len(dropped)} saved leaves ({_listed(dropped, 3)})"
                        if dropped else "")
                     + (f"; initialised {len(initialised)} new leaves "
                        f"({_listed(initialised, 3)})" if initialised else ""))
    else:
        state = checkpointing.restore(folder, read_target, step)
    if old_shards is None:
        return state, ("; ".join(notes) or None)

    old_q = jax.device_get(state.queue)
    moved_q = queue_lib.relayout(old_q, new_q.capacity, new_q.num_shards)
    placed = moved_q.replace(**{
        k: _place(np.asarray(getattr(moved_q, k)), getattr(new_q, k).sharding)
        for k in _QUEUE_ARRAYS + ("position",)})
    kept = int(np.sum(np.asarray(moved_q.valid)))
    notes.insert(0, f"elastic resume: queue re-laid out from {saved_rows} rows in {old_shards} shards to "
                    f"{new_q.capacity} rows in {new_q.num_shards}; kept the newest {kept} "
                    f"of {int(np.sum(np.asarray(old_q.valid)))} valid rows")
    note = "; ".join(notes)
    logging.info("%s (checkpoint %s)", note, where)
    return state.replace(queue=placed), note


def _place(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same in every process) as a global array with `sharding`."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
