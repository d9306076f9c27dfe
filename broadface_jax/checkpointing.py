"""Orbax checkpoints of the whole train state.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/``, written by an
``orbax.checkpoint.CheckpointManager`` with ``ocp.args.StandardSave``. The
saved tree is the whole ``TrainState``: encoder parameters and batch
statistics, the classifier, both optimizer states, the BroadFace queue, the
step and the RNG key, so a restored run continues exactly where it stopped.

Restoring goes into an *abstract* target (``jax.ShapeDtypeStruct`` leaves that
carry the target shardings), so every array is read straight into its place
on the current mesh; when that mesh differs from the one that wrote the
checkpoint (another device count, another partitioning) orbax reshards.
Reading uses ``ocp.args.PyTreeRestore`` (the format ``StandardSave`` writes),
which adds ``partial_restore`` for warm starts that load only the encoder and
classifier of another run.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key
data and wrapped again on restore, so checkpoints hold plain arrays only.
Zero-size arrays (e.g. the queue of a run with BroadFace off) cannot be
written by orbax; they are stored as empty leaves and re-created from the
target's shape, dtype and sharding on restore.

Every failure names the directory at fault: a path that does not exist, a
folder without checkpoints, a step that is absent, a checkpoint that cannot
be read (corrupt or incomplete), or a leaf whose shape differs from the model.
"""

from __future__ import annotations

import logging as py_logging
import math
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class _QuietOrbax(py_logging.Filter):
    """Drops orbax's INFO chatter (dozens of lines per checkpoint)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or (
            "/orbax/" not in record.pathname.replace("\\", "/"))


def quiet_orbax_logging() -> None:
    """Keeps orbax's warnings and errors in the absl log but not its INFO lines."""
    from absl import logging

    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
        handler.addFilter(_QuietOrbax())


# ----------------------------------------------------------------- locations


def absolute(path: str | os.PathLike) -> str:
    """Local paths made absolute (orbax refuses relative ones); gs:// etc. as given."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """The folder that holds a run's numbered checkpoints (an absolute path)."""
    return os.fspath(epath.Path(absolute(workdir)) / CHECKPOINT_SUBDIR)


def _is_dir(path: str) -> bool:
    return epath.Path(path).is_dir()


def _numeric_children(path: str) -> list[int]:
    """Step numbers of the finished checkpoints directly under ``path``.

    Orbax writes a step into a temporary folder and renames it when done, so
    only finished checkpoints have a purely numeric name.
    """
    try:
        children = list(epath.Path(path).iterdir())
    except (OSError, ValueError):
        return []
    return sorted(int(c.name) for c in children
                  if c.name.isdigit() and c.is_dir())


def resolve(path: str | os.PathLike,
            step: Optional[int] = None) -> tuple[str, int]:
    """Finds the checkpoint a user means by ``path``.

    Accepts a run's workdir (``<workdir>/checkpoints`` is used), a
    checkpoints folder, or one step folder (``.../checkpoints/1200``). Without
    ``step`` the latest checkpoint is chosen.

    Returns:
      ``(checkpoints_folder, step)``.

    Raises:
      FileNotFoundError: ``path`` does not exist or holds no checkpoint, or
        ``step`` is not among its checkpoints.
    """
    path = absolute(path).rstrip("/")
    if not _is_dir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    base = os.path.basename(path)
    if _is_dir(checkpoint_dir(path)):
        folder = checkpoint_dir(path)
    elif base.isdigit() and not _numeric_children(path):
        # One step folder: the step is its name.
        if step is not None and step != int(base):
            raise FileNotFoundError(
                f"{path!r} is the checkpoint of step {base}, not step {step}")
        folder, step = os.fspath(epath.Path(path).parent), int(base)
    else:
        folder = path
    steps = _numeric_children(folder)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint found in {folder!r} (expected numbered step "
            f"folders written by broadface_jax, e.g. {folder}/1000)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"checkpoint step {step} not found in {folder!r}; "
            f"available steps: {steps}")
    return folder, step


def latest_step(workdir: str | os.PathLike) -> Optional[int]:
    """The newest finished checkpoint step of a run, or None if it has none."""
    steps = _numeric_children(checkpoint_dir(workdir))
    return steps[-1] if steps else None


# ------------------------------------------------------------------ managers


def create_manager(workdir: str | os.PathLike, *, max_to_keep: Optional[int],
                   save_interval_steps: int = 1) -> ocp.CheckpointManager:
    """A manager that writes ``<workdir>/checkpoints/<step>``.

    Args:
      workdir: the run's working directory (created if missing).
      max_to_keep: how many recent checkpoints to keep (None or 0: all).
      save_interval_steps: ``save`` without ``force`` only writes at multiples
        of this.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None,
        save_interval_steps=max(1, int(save_interval_steps)),
        create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _reader(folder: str) -> ocp.CheckpointManager:
    """A read-only manager for a folder of checkpoints (not necessarily ours)."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0)
    # StandardSave writes the PyTree format; reading it with the PyTree handler
    # also allows partial restores (warm starts).
    return ocp.CheckpointManager(folder, options=options,
                                 item_handlers=ocp.PyTreeCheckpointHandler())


# ------------------------------------------------------------- tree helpers


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: PyTree) -> PyTree:
    """Replaces typed PRNG keys by their raw uint32 data (concrete arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x,
                        tree)


def _is_empty(x: Any) -> bool:
    return hasattr(x, "shape") and math.prod(x.shape) == 0


def _storable(tree: PyTree) -> PyTree:
    """What is written: key data instead of keys, None instead of empty arrays."""
    return jax.tree.map(lambda x: None if _is_empty(x) else x, _keys_to_data(tree))


def _make_empty(x: Any) -> jax.Array:
    """A zero-size array with the target leaf's shape, dtype and sharding."""
    sharding = getattr(x, "sharding", None)
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.random.wrap_key_data(
            jax.device_put(jnp.zeros(data.shape, data.dtype), sharding),
            impl=_key_impl(x))
    return jax.device_put(jnp.zeros(x.shape, x.dtype), sharding)


def _abstract_key_data(x: Any) -> Any:
    """The abstract uint32 key-data leaf that stands for an abstract key."""
    data = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _key_impl(x: Any) -> Any:
    """The PRNG implementation of an abstract or concrete typed key."""
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)),
                   jax.ShapeDtypeStruct(x.shape, x.dtype))
    return found[0]


def _from_storable(restored: PyTree, target: PyTree) -> PyTree:
    """Typed keys and empty arrays back where the target has them."""
    def one(t: Any, r: Any) -> Any:
        if _is_empty(t):
            return _make_empty(t)
        if _is_key(t):
            return jax.random.wrap_key_data(r, impl=_key_impl(t))
        return r

    return jax.tree.map(one, target, restored, is_leaf=lambda x: x is None)


def abstract_like(state: PyTree, shardings: PyTree) -> PyTree:
    """``ShapeDtypeStruct`` leaves with the given shardings (the restore target).

    Args:
      state: a concrete or abstract state (e.g. from ``jax.eval_shape``).
      shardings: a matching tree of ``jax.sharding.Sharding``.
    """
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state, shardings)


def _path_str(path: Sequence[Any]) -> str:
    """``('params', 'encoder', 0)``-like key path as a dotted name."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _stored_shapes(reader: ocp.CheckpointManager, step: int,
                   where: str) -> dict[str, tuple[int, ...]]:
    """Dotted leaf name -> stored shape, from the checkpoint's metadata."""
    try:
        metadata = reader.item_metadata(step)
    except Exception as e:  # orbax raises several types for unreadable metadata
        raise CheckpointError(
            f"checkpoint {where} cannot be read (corrupt or incomplete?): "
            f"{type(e).__name__}: {e}") from e
    tree = getattr(metadata, "tree", metadata)
    if tree is None:
        raise CheckpointError(
            f"checkpoint {where} has no readable metadata (corrupt or "
            "incomplete?)")
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {_path_str(p): tuple(m.shape) for p, m in flat if hasattr(m, "shape")}


def _check_shapes(stored: dict[str, tuple[int, ...]], target: PyTree,
                  where: str) -> None:
    """Raises a CheckpointError naming every leaf that is absent or differs."""
    problems = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        if _is_empty(leaf):
            continue  # stored as an empty leaf, re-created from the target
        name = _path_str(path)
        want = tuple(jax.eval_shape(jax.random.key_data, leaf).shape
                     if _is_key(leaf) else leaf.shape)
        if name not in stored:
            problems.append(f"{name}: missing from the checkpoint")
        elif stored[name] != want:
            problems.append(
                f"{name}: checkpoint has shape {stored[name]}, model needs "
                f"{want}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"checkpoint {where} does not fit the model "
            f"({len(problems)} leaves):\n  {shown}{more}")


# -------------------------------------------------------------- save/restore


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, *,
         force: bool = False) -> bool:
    """Saves ``state`` as checkpoint ``step`` (asynchronously).

    Returns whether a save was started (``save_interval_steps`` may skip it
    unless ``force``). Call ``manager.wait_until_finished()`` before exiting.
    """
    return manager.save(int(step), args=ocp.args.StandardSave(_storable(state)),
                        force=force)


def restore(path: str | os.PathLike, target: PyTree,
            step: Optional[int] = None) -> PyTree:
    """Restores a whole state into ``target``'s structure and shardings.

    Args:
      path: workdir, checkpoints folder or step folder (see ``resolve``).
      target: abstract state (``abstract_like``) or concrete state; leaves'
        shardings say where each array goes (orbax reshards if needed).
      step: a specific step; default the latest.

    Returns:
      The restored state, same tree type as ``target``.
    """
    folder, step = resolve(path, step)
    return _restore(folder, step, target, partial=False)


def restore_partial(path: str | os.PathLike, target: PyTree,
                    step: Optional[int] = None) -> PyTree:
    """Restores only the leaves named in ``target`` (a nested dict).

    Used for warm starts: ``target`` is e.g. ``{'params': {'encoder': ...},
    'batch_stats': ...}`` and the other parts of the checkpoint (optimizer
    state, queue) are not read. Shapes must match exactly.
    """
    folder, step = resolve(path, step)
    return _restore(folder, step, target, partial=True)


def _restore(folder: str, step: int, target: PyTree, partial: bool) -> PyTree:
    where = os.fspath(epath.Path(folder) / str(step))
    abstract = jax.tree.map(
        lambda x: None if _is_empty(x) else _abstract_key_data(x) if _is_key(x)
        else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=getattr(x, "sharding", None)),
        target)
    reader = _reader(folder)
    try:
        _check_shapes(_stored_shapes(reader, step, where), target, where)
        try:
            restored = reader.restore(step, args=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial))
        except Exception as e:  # corrupt files surface as many exception types
            raise CheckpointError(
                f"checkpoint {where} cannot be restored (corrupt or "
                f"incomplete?): {type(e).__name__}: {e}") from e
    finally:
        reader.close()
    return _from_storable(restored, target)
