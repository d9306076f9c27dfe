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
be read (corrupt or incomplete: :class:`UnreadableCheckpointError`, which a
resume skips for an older one), or a leaf whose shape differs from the model.

Checksums: each save writes ``<step>/broadface_checksums.json`` (size and
CRC-32 of every file of the checkpoint) from orbax's
``post_finalization_callback``, i.e. on the primary process, once every
process has written its files and before orbax renames the temporary folder
to ``<step>``: a step counts as finished (``all_steps``) only with its
manifest. :func:`verify` checks a step against it before a restore reads it;
a flipped bit, a file overwritten with garbage, truncated or deleted raises
:class:`CorruptCheckpointError` (unreadable: a resume sets it aside) naming
the file. Checkpoints written before manifests existed restore unverified,
with a warning.

Writing: a save that fails (disk full, permissions, a lost bucket) is raised
as :class:`CheckpointWriteError`, one line naming the step, the folder and
the cause ("no space left on device"), at the first save or check after it
failed (``check_saves`` is cheap enough to call every step). Checkpoints that
cannot be used are never deleted: ``set_aside`` moves them out of the
checkpoints folder into ``<workdir>/checkpoints_set_aside/``.
"""

from __future__ import annotations

import errno
import json
import logging as py_logging
import math
import os
import time
import weakref
import zlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

CHECKPOINT_SUBDIR = "checkpoints"
SET_ASIDE_SUBDIR = "checkpoints_set_aside"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are corrupt or incomplete (not a model mismatch)."""


class LayoutMismatchError(CheckpointError):
    """A readable checkpoint whose leaves differ from the state the config builds.

    Not :class:`UnreadableCheckpointError`: the files are fine, the config
    changed. A resume stops on it and never sets the checkpoint aside.
    """


class CorruptCheckpointError(UnreadableCheckpointError):
    """A checkpoint's files do not match the checksum manifest written with it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message is one readable line."""


class _QuietOrbax(py_logging.Filter):
    """Drops orbax's INFO chatter (dozens of lines per checkpoint) and storage tracebacks.

    A failed save (disk full, say) makes orbax log the same traceback from each
    of its background threads; the run reports the failure itself in one line
    (:class:`CheckpointWriteError`), so for storage errors orbax's records keep
    their one-line message and lose the traceback. Other errors keep theirs.
    """

    def filter(self, record: py_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        if record.levelno < py_logging.WARNING:
            return False
        if record.exc_info and describe_io_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


class _StorageTracebacks(py_logging.Filter):
    """Keeps asyncio's one-line reports of a failed save's writes, without tracebacks.

    When a write of a save fails (disk full), the other writes of that save fail
    too and asyncio logs each as "exception was never retrieved" with its
    traceback; the run reports the failure itself in one line.
    """

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.exc_info and describe_io_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_orbax_logging() -> None:
    """Keeps orbax's warnings and errors in the log but not its INFO lines or storage noise.

    Installs, once per process: the orbax filter on the absl logger (orbax logs
    through absl.logging), the storage-traceback filter on asyncio's logger, and
    the ``sys.excepthook`` wrapper of :func:`_drop_closed_loop_tracebacks`. They
    are installed before a run starts because a failed save's background threads
    report before the main thread learns of the failure.
    """
    for name, kind in (("absl", _QuietOrbax), ("asyncio", _StorageTracebacks)):
        logger = py_logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    _drop_closed_loop_tracebacks()


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


def _steps_in(path: str) -> list[int]:
    """Step numbers of the finished checkpoints directly under ``path``, oldest first.

    Listed by orbax's own (read-only) ``CheckpointManager``, so a step counts
    exactly when orbax would restore it: a save still in flight (orbax's
    temporary folder) or a folder with another name does not.
    """
    if not _is_dir(path):
        return []
    reader = _reader(path)
    try:
        return sorted(int(s) for s in reader.all_steps())
    except (OSError, ValueError):
        return []
    finally:
        reader.close()


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
    elif base.isdigit() and not _steps_in(path):
        # One step folder: the step is its name.
        if step is not None and step != int(base):
            raise FileNotFoundError(
                f"{path!r} is the checkpoint of step {base}, not step {step}")
        folder, step = os.fspath(epath.Path(path).parent), int(base)
    else:
        folder = path
    steps = _steps_in(folder)
    if not steps:
        example = (f"{checkpoint_dir(path)}/1000" if folder == path
                   and base != CHECKPOINT_SUBDIR else f"{folder}/1000")
        raise FileNotFoundError(
            f"no checkpoint found in {folder!r} (expected numbered step "
            f"folders written by broadface_jax, e.g. {example})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"checkpoint step {step} not found in {folder!r}; "
            f"available steps: {steps}")
    return folder, step


def latest_step(workdir: str | os.PathLike) -> Optional[int]:
    """The newest finished checkpoint step of a run, or None if it has none."""
    steps = all_steps(workdir)
    return steps[-1] if steps else None


def all_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps of a run, oldest first."""
    return _steps_in(checkpoint_dir(workdir))


def set_aside(workdir: str | os.PathLike, step: int, reason: str) -> str:
    """Moves checkpoint ``step`` to ``<workdir>/checkpoints_set_aside/<step>.<reason>``.

    Nothing is deleted: an unreadable checkpoint stays there for inspection,
    a rolled-back one can be moved back by hand. Returns the new path.
    """
    source = epath.Path(checkpoint_dir(workdir)) / str(step)
    aside = epath.Path(absolute(workdir)) / SET_ASIDE_SUBDIR
    aside.mkdir(parents=True, exist_ok=True)
    dest = aside / f"{step}.{reason}"
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
    n = 0
    while dest.exists():  # never replace what an earlier move put there
        n += 1
        dest = aside / f"{step}.{reason}.{stamp}" if n == 1 else (
            aside / f"{step}.{reason}.{stamp}.{n}")
    source.rename(dest)
    return os.fspath(dest)


# ------------------------------------------------------------------ checksums

MANIFEST_FILE = "broadface_checksums.json"
_CHUNK = 8 << 20


def _crc32(path: epath.Path) -> tuple[int, int]:
    """(size, CRC-32) of one file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


#: Files a manifest does not list: itself, and orbax's step metadata, which orbax
#: rewrites when it commits the step (after the manifest is written).
_UNLISTED = (MANIFEST_FILE, "_CHECKPOINT_METADATA")


def _files(step_dir: epath.Path) -> list[str]:
    """Relative paths of the files under a step folder that a manifest lists, sorted."""
    out, todo = [], [step_dir]
    while todo:  # epath's rglob refuses '**' (object stores): walk folder by folder
        for path in todo.pop().iterdir():
            if path.is_dir():
                todo.append(path)
            else:
                rel = os.fspath(path.relative_to(step_dir))
                if rel not in _UNLISTED:
                    out.append(rel)
    return sorted(out)


def write_manifest(step_dir: str | os.PathLike) -> str:
    """Writes ``<step_dir>/broadface_checksums.json``: size and CRC-32 of every file.

    Returns the manifest's path. Called from the save's finalisation (see the
    module doc); usable on a finished step folder too.
    """
    step_dir = epath.Path(step_dir)
    entries = {}
    for rel in _files(step_dir):
        size, crc = _crc32(step_dir / rel)
        entries[rel] = {"size": size, "crc32": f"{crc:08x}"}
    path = step_dir / MANIFEST_FILE
    tmp = step_dir / f"{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"algorithm": "crc32", "files": entries}, indent=0,
                              sort_keys=True))
    tmp.replace(path)
    return os.fspath(path)


def verify(step_dir: str | os.PathLike) -> bool:
    """Checks a step folder against its manifest.

    Returns:
      True when verified, False when the step has no manifest (written before
      manifests existed: restored unverified).

    Raises:
      CorruptCheckpointError: naming the first file that is missing, of
        another size or another checksum, or an unreadable manifest.
    """
    step_dir = epath.Path(step_dir)
    path = step_dir / MANIFEST_FILE
    if not path.exists():
        return False
    try:
        entries = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {step_dir} is corrupt: checksum manifest {path} cannot be read ({e})") from e
    for rel, want in sorted(entries.items()):
        file = step_dir / rel
        if not file.exists():
            raise CorruptCheckpointError(
                f"checkpoint {step_dir} is corrupt: file {file} is missing (listed in {MANIFEST_FILE})")
        try:
            size, crc = _crc32(file)
        except OSError as e:
            raise CorruptCheckpointError(f"checkpoint {step_dir} is corrupt: file {file} cannot be "
                                         f"read ({e})") from e
        if size != want["size"]:
            raise CorruptCheckpointError(
                f"checkpoint {step_dir} is corrupt: file {file} has {size} bytes, {want['size']} were "
                "written (truncated or overwritten)")
        if f"{crc:08x}" != want["crc32"]:
            raise CorruptCheckpointError(
                f"checkpoint {step_dir} is corrupt: file {file} does not match its checksum (CRC-32 "
                f"{crc:08x}, written {want['crc32']}): its data changed on disk")
    return True


class _ManifestWriter:
    """orbax's ``post_finalization_callback``: the manifest of the save in flight.

    Runs on the primary process after every process has written its files and
    before orbax renames ``<step>.orbax-checkpoint-tmp`` to ``<step>``; writes
    the manifest into whichever of the two folders holds the step.
    """

    def __init__(self, folder: str):
        self.folder = epath.Path(folder)
        self.step: Optional[int] = None

    def __call__(self) -> None:
        if self.step is None:
            return
        candidates = sorted(self.folder.glob(f"{self.step}.orbax-checkpoint-tmp*"))
        step_dir = candidates[-1] if candidates else self.folder / str(self.step)
        write_manifest(step_dir)


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
    folder = checkpoint_dir(workdir)
    writer = _ManifestWriter(folder)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None,
        save_interval_steps=max(1, int(save_interval_steps)),
        # Left-over *.orbax-checkpoint-tmp-* folders of a killed or failed save
        # (the caller holds the workdir lock: no other writer can own them).
        cleanup_tmp_directories=True,
        create=True,
        # The checksum manifest, written before the step counts as finished.
        async_options=ocp.AsyncOptions(post_finalization_callback=writer))
    manager = ocp.CheckpointManager(folder, options=options)
    _MANIFESTS[manager] = writer
    return manager


def _reader(folder: str) -> ocp.CheckpointManager:
    """A read-only manager for a folder of checkpoints (not necessarily ours)."""
    # No barrier: a reader may be created on one process and not another (a
    # step listing that finds the folder on one process only because process 0
    # just created it), and orbax's root-metadata save is a global barrier
    # even when read-only; a barrier on one process pairs with another barrier
    # elsewhere ("sync_global_devices name mismatch") or hangs.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0, save_root_metadata=False)
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
    return jax.tree_util.keystr(tuple(path), simple=True, separator=".")


#: Top-level entries every broadface_jax train state checkpoint has.
_STATE_KEYS = ("step", "params", "opt_state", "queue")


def _metadata_tree(reader: ocp.CheckpointManager, step: int, where: str) -> Any:
    """The checkpoint's metadata tree; UnreadableCheckpointError if absent or unreadable."""
    try:
        metadata = reader.item_metadata(step)
    except Exception as e:  # orbax raises several types for unreadable metadata
        raise UnreadableCheckpointError(
            f"checkpoint {where} cannot be read (corrupt or incomplete?): "
            f"{type(e).__name__}: {e}") from e
    tree = getattr(metadata, "tree", metadata)
    if not tree:
        # e.g. default/_METADATA deleted: orbax returns None
        raise UnreadableCheckpointError(
            f"checkpoint {where} has no readable metadata (default/_METADATA missing "
            "or corrupt?)")
    return tree


def _is_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _stored_shapes(reader: ocp.CheckpointManager, step: int,
                   where: str) -> dict[str, tuple[int, ...]]:
    """Dotted leaf name -> stored shape, from the checkpoint's metadata."""
    return {k: v[0] for k, v in _stored_leaves(reader, step, where).items()}


def _stored_leaves(reader: ocp.CheckpointManager, step: int,
                   where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        _metadata_tree(reader, step, where), is_leaf=_is_meta)
    return {_path_str(p): (tuple(m.shape), str(m.dtype)) for p, m in flat if _is_meta(m)}


def stored_leaves(path: str | os.PathLike, step: Optional[int] = None,
                  require_state: bool = True) -> dict[str, tuple[tuple[int, ...], str]]:
    """Dotted leaf name -> (shape, dtype name) of a checkpoint, from its metadata only.

    Raises:
      UnreadableCheckpointError: the metadata is missing or unreadable.
      LayoutMismatchError: (``require_state``) it lacks an entry every train
        state has.
    """
    folder, step = resolve(path, step)
    where = os.fspath(epath.Path(folder) / str(step))
    reader = _reader(folder)
    try:
        leaves = _stored_leaves(reader, step, where)
    finally:
        reader.close()
    if require_state:
        tops = {name.split(".")[0] for name in leaves}
        missing = [k for k in _STATE_KEYS if k not in tops]
        if missing:  # readable, but not a train state (e.g. broadface_jax.convert's import)
            raise LayoutMismatchError(
                f"checkpoint {where} is not a broadface_jax train state (its metadata lists "
                f"no {', '.join(missing)} entries; an import written by broadface_jax.convert?)")
    return leaves


def canonical_name(name: str) -> str:
    """A leaf's name with the optimizer state's list positions dropped.

    ``opt_state.inner_states.encoder.inner_state.1.count`` and ``...inner_state.2.count``
    are the same leaf: a transform without state (gradient clipping, weight decay)
    added to or removed from an optax chain shifts the positions, not the leaves.
    """
    parts = name.split(".")
    if parts[0] != "opt_state":
        return name
    return ".".join(p for p in parts if not p.isdigit())


def storable_leaves(target: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    """Dotted leaf name -> (shape, dtype name) of what saving ``target`` writes."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        if _is_empty(leaf):
            continue
        if _is_key(leaf):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        out[_path_str(path)] = (tuple(leaf.shape), str(jax.numpy.dtype(leaf.dtype)))
    return out


def compare_layout(stored: dict[str, tuple[tuple[int, ...], str]],
                   wanted: dict[str, tuple[tuple[int, ...], str]]
                   ) -> tuple[list[str], list[str], list[str], bool]:
    """How a checkpoint's leaves differ from those of the state a config builds.

    Leaves are matched by :func:`canonical_name`.

    Returns:
      ``(differing, only_saved, only_new, moved)``: names of leaves in both with
      another shape or dtype (``'name: saved (4,) float32, config builds (8,)
      float32'``), leaves only in the checkpoint, leaves only in the new state,
      and whether some matched leaf has another position (list index) in the tree.
    """
    def by_canonical(leaves):
        out = {}
        for name, v in leaves.items():
            out.setdefault(canonical_name(name), []).append((name, v))
        return out

    saved, new = by_canonical(stored), by_canonical(wanted)
    differing, moved = [], False
    for name in sorted(set(saved) & set(new)):
        if len(saved[name]) > 1 or len(new[name]) > 1:  # ambiguous: compare by position
            a, b = dict(saved[name]), dict(new[name])
            if a != b:
                differing.append(f"{name}: saved {sorted(a.items())}, config builds "
                                 f"{sorted(b.items())}")
            continue
        (s_name, s), (n_name, n) = saved[name][0], new[name][0]
        moved |= s_name != n_name
        if s != n:
            differing.append(f"{n_name}: saved {s[0]} {s[1]}, config builds {n[0]} {n[1]}")
    only_saved = [saved[k][0][0] for k in sorted(set(saved) - set(new))]
    only_new = [new[k][0][0] for k in sorted(set(new) - set(saved))]
    return differing, only_saved, only_new, moved


def restore_mapped(path: str | os.PathLike, target: PyTree, fresh: PyTree,
                   step: Optional[int] = None) -> tuple[PyTree, list[str], list[str]]:
    """Restores a checkpoint into another tree structure, leaf by leaf.

    The checkpoint is read in its own structure (from its metadata); each leaf
    of ``target`` takes the saved leaf of the same :func:`canonical_name` and
    shape, or else ``fresh``'s value. Used when only the optimizer's transforms
    changed (momentum on or off, clipping, weight decay): the saved leaves are
    carried over, and what the new optimizer has in addition starts fresh.

    Args:
      target: abstract target (shardings say where each leaf goes).
      fresh: a concrete state of the same structure (values for new leaves).

    Returns:
      ``(state, dropped, initialised)``: the restored state and the names of
      the saved leaves not used and of the new leaves taken from ``fresh``.
    """
    folder, step = resolve(path, step)
    where = os.fspath(epath.Path(folder) / str(step))
    _verify_or_warn(where)
    abstract = jax.tree.map(
        lambda x: None if _is_empty(x) else _abstract_key_data(x) if _is_key(x)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target)
    flat_abs, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    wanted = {canonical_name(_path_str(p)): leaf for p, leaf in flat_abs}
    mesh = next(leaf.sharding.mesh for _, leaf in flat_abs
                if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def fits(leaf, meta) -> bool:
        return (leaf is not None and tuple(leaf.shape) == tuple(meta.shape)
                and jnp.dtype(leaf.dtype) == jnp.dtype(meta.dtype))

    def item_leaf(path, meta):
        if not _is_meta(meta):
            return meta
        leaf = wanted.get(canonical_name(_path_str(path)))
        sharding_ = leaf.sharding if fits(leaf, meta) else replicated
        return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding_)

    reader = _reader(folder)
    try:
        item = jax.tree_util.tree_map_with_path(
            item_leaf, _metadata_tree(reader, step, where), is_leaf=_is_meta)
        restored = _read(reader, step, item, where)
    finally:
        reader.close()
    got = {canonical_name(_path_str(p)): v
           for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
    fresh_flat = [v for _, v in jax.tree_util.tree_flatten_with_path(_storable(fresh))[0]]
    leaves, used, initialised = [], set(), []
    for (path, leaf), fresh_leaf in zip(flat_abs, fresh_flat):
        name = canonical_name(_path_str(path))
        value = got.get(name)
        if value is not None and fits(leaf, value):
            leaves.append(value)
            used.add(name)
        else:
            leaves.append(fresh_leaf)
            initialised.append(_path_str(path))
    dropped = sorted(n for n in got if n not in used)
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    return _from_storable(state, target), dropped, initialised


def _read(reader: ocp.CheckpointManager, step: int, item: PyTree, where: str,
          partial: bool = False) -> PyTree:
    """``reader.restore`` of ``item`` (abstract leaves); any failure is UnreadableCheckpointError."""
    try:
        return reader.restore(step, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=partial))
    except Exception as e:  # corrupt files surface as many exception types
        raise UnreadableCheckpointError(
            f"checkpoint {where} cannot be restored (corrupt or "
            f"incomplete?): {type(e).__name__}: {e}") from e


def _verify_or_warn(where: str) -> None:
    """:func:`verify`, with a warning for a checkpoint that has no manifest."""
    if not verify(where):
        from absl import logging  # noqa: PLC0415

        logging.warning("checkpoint %s has no %s (written by an older broadface_jax): "
                        "restored without checksum verification", where, MANIFEST_FILE)


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


def describe_io_error(e: Optional[BaseException]) -> Optional[str]:
    """"no space left on device" and the like, from anywhere in an exception chain.

    None when the chain holds no storage error (disk full, quota, permissions,
    read-only file system).
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None)
        text = str(e)
        if code == errno.ENOSPC or "No space left on device" in text or "ENOSPC" in text:
            return "no space left on device"
        if code == errno.EDQUOT or "Disk quota exceeded" in text:
            return "disk quota exceeded"
        if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
            return "permission denied"
        if code == errno.EROFS or "Read-only file system" in text:
            return "read-only file system"
        e = e.__cause__ or e.__context__
    return None


def _drop_closed_loop_tracebacks() -> None:
    """Silences tensorstore's late "Event loop is closed" reports after a failed save.

    When one write of a save fails, orbax ends the save's asyncio loop while
    tensorstore still completes the other writes; each completion reports its
    callback's ``RuntimeError: Event loop is closed`` (a dozen tracebacks that
    bury the one line that matters). The reports that go through
    ``sys.excepthook`` are dropped here; some are printed by tensorstore directly
    to stderr and still appear. Only that error, from asyncio, is dropped; every
    other exception is reported as before.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "_broadface_drops_closed_loop", False):
        return

    def hook(kind, value, tb):
        if (kind is RuntimeError and str(value) == "Event loop is closed"
                and tb is not None and _from_asyncio(tb)):
            return
        previous(kind, value, tb)

    hook._broadface_drops_closed_loop = True
    sys.excepthook = hook


def _from_asyncio(tb) -> bool:
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "asyncio" in tb.tb_frame.f_code.co_filename


def _write_error(e: BaseException, step: Optional[int], folder: str) -> CheckpointWriteError:
    cause = describe_io_error(e)
    if cause is None:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        cause = f"{type(e).__name__}: {first}"
    what = f"checkpoint {step}" if step is not None else "a checkpoint"
    err = CheckpointWriteError(f"{what} could not be written to {folder}: {cause}")
    err.step = step
    return err


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, *,
         force: bool = False) -> bool:
    """Saves ``state`` as checkpoint ``step`` (asynchronously).

    Returns whether a save was started (``save_interval_steps`` may skip it
    unless ``force``). Call ``wait(manager)`` before exiting.

    Raises:
      CheckpointWriteError: this save, or the previous one still in flight,
        failed (the message names the step, the folder and the cause).
    """
    wait(manager)  # a failure of the previous save surfaces here
    if manager in _MANIFESTS:
        _MANIFESTS[manager].step = int(step)
    try:
        started = manager.save(int(step), args=ocp.args.StandardSave(_storable(state)),
                               force=force)
    except Exception as e:
        raise _write_error(e, int(step), os.fspath(manager.directory)) from e
    if started:
        _LAST_SAVE[manager] = int(step)
    return started


#: Each writing manager's manifest callback (told the step of each save).
_MANIFESTS: "weakref.WeakKeyDictionary[ocp.CheckpointManager, _ManifestWriter]" = (
    weakref.WeakKeyDictionary())
#: The step of each manager's newest save, for naming it if it fails in the background.
_LAST_SAVE: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises CheckpointWriteError if a finished background save failed (non-blocking)."""
    try:
        manager.check_for_errors()
    except Exception as e:
        raise _write_error(e, _LAST_SAVE.get(manager), os.fspath(manager.directory)) from e


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; raises CheckpointWriteError if it failed."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _write_error(e, _LAST_SAVE.get(manager), os.fspath(manager.directory)) from e


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
    _verify_or_warn(where)
    reader = _reader(folder)
    try:
        _check_shapes(_stored_shapes(reader, step, where), target, where)
        restored = _read(reader, step, abstract, where, partial=partial)
    finally:
        reader.close()
    return _from_storable(restored, target)
