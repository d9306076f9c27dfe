"""The one encoder restore: a run's checkpoint or a weights file -> encoder parameters.

    enc = restore.restore_encoder("runs/demo", config)              # NumPy, on the host
    enc = restore.restore_encoder("runs/demo", config, sharding=replicated)
    enc = restore.restore_encoder("backbone.pth", config)           # an imported file
    variables = {"params": enc.params, "batch_stats": enc.batch_stats}

Used by every command that needs an encoder (``evaluate``, ``embed``,
``export``) and by training's warm start (``config.init_from``: encoder, and
the classifier rows when asked, straight into the train state's shardings).
``workdir_or_file`` is a run's workdir, its checkpoints folder or one step
folder (:func:`checkpointing.resolve`), or weights files that
:func:`interop.is_model_file` recognises (``.pth`` / ``.pt`` / ``.onnx``, a
comma list or glob of arcface_torch rank files): those are imported for
``config.model`` (:func:`interop.import_model`). Only the encoder (and the
classifier when asked) is read from a checkpoint: never the optimizer state
or the queue.

The workdir side: :func:`workdir_config` reads the config a workdir records
(``config.json``: written by training at its first start and by ``convert``),
and :func:`model_differences` lists the fields that give the encoder its
shape (:data:`MODEL_FIELDS`) where a given config and the workdir's differ,
one ``'model.width: workdir 0.125, given 1.0'`` line each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional

import numpy as np
from absl import logging

#: Dotted config fields that decide the encoder's parameter shapes (and its forward).
MODEL_FIELDS = ("model", "image_size")


@dataclasses.dataclass(frozen=True)
class RestoredEncoder:
    """What :func:`restore_encoder` read.

    Attributes:
      params, batch_stats: the encoder's Flax trees (NumPy arrays, or placed
        as asked).
      classifier: the classifier's tree (``{'kernel': f32[C, D]}``) when
        ``with_classifier`` (placed like the target's), else None (a weights
        file's rows unplaced when there is no target).
      step: the checkpoint's step (None for a weights file).
      source: what was read, for messages (``'runs/demo step 400'``, a file).
    """

    params: Any
    batch_stats: Any
    classifier: Any
    step: Optional[int]
    source: str


def _place(value: np.ndarray, like: Any, sharding: Any, where: str) -> Any:
    """A global array with ``like``'s shape and dtype on ``sharding`` (every process holds ``value``)."""
    import jax  # noqa: PLC0415

    from broadface_jax.interop import InteropError  # noqa: PLC0415

    if tuple(value.shape) != tuple(like.shape):
        raise InteropError(f"{where}: imported shape {value.shape} differs from the train "
                           f"state's {tuple(like.shape)}")
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _sharding_of(x: Any, default: Any) -> Any:
    return getattr(x, "sharding", None) or default


def _from_file(spec: str, config: Any, target: Any, sharding: Any,
               with_classifier: bool) -> RestoredEncoder:
    import jax  # noqa: PLC0415

    from broadface_jax import interop  # noqa: PLC0415

    if config is None:
        raise ValueError(f"restoring the weights file {spec!r} needs the config "
                         "(its model.name says how to read the file)")
    imported = interop.import_model(spec, config, with_classifier=with_classifier)
    if with_classifier and imported.classifier is None:
        raise interop.InteropError(
            f"{spec!r} has no classifier rows (a backbone file or ONNX model holds only the "
            "encoder); set config.init_classifier=False to load the encoder and start the "
            "classifier fresh, or give all rank files of an arcface_torch checkpoint "
            "('DIR/checkpoint_gpu_*.pt')")
    if imported.fresh:
        logging.info("%s: %d encoder leaves have no counterpart in the file and keep their "
                     "initialisation (seed %s): %s", spec, len(imported.fresh), config.seed,
                     ", ".join(imported.fresh))
    if imported.folded:
        logging.info("%s: %d Conv+BatchNorm pairs arrived folded (BatchNorm = identity + "
                     "folded bias)", spec, imported.folded)
    params, batch_stats, classifier = imported.params, imported.batch_stats, imported.classifier
    where = f"{spec!r}"
    if target is not None:
        enc_like, stats_like = target["params"]["encoder"], target["batch_stats"]
        if (jax.tree.structure(params) != jax.tree.structure(enc_like)
                or jax.tree.structure(batch_stats) != jax.tree.structure(stats_like)):
            raise interop.InteropError(
                f"{where}: the imported trees do not have the train state's structure "
                "(is config.model the model being trained?)")
        params = jax.tree.map(lambda v, t: _place(v, t, t.sharding, where), params, enc_like)
        batch_stats = jax.tree.map(lambda v, t: _place(v, t, t.sharding, where),
                                   batch_stats, stats_like)
        if with_classifier:
            like = target["params"]["classifier"]["kernel"]
            classifier = {"kernel": _place(classifier, like, like.sharding,
                                           f"classifier rows of {where}")}
    else:
        if sharding is not None:
            params, batch_stats = jax.device_put((params, batch_stats), sharding)
        classifier = None if classifier is None else {"kernel": classifier}
    return RestoredEncoder(params, batch_stats, classifier, None, imported.source)


def _encoder_target(config: Any, sharding: Any, model: Any) -> dict:
    """``{'params': {'encoder': ...}, 'batch_stats': ...}`` of ``config``'s encoder, abstract."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from broadface_jax import models  # noqa: PLC0415

    model = model if model is not None else models.build_encoder(config.model)
    variables = jax.eval_shape(functools.partial(models.init_variables, model,
                                                 int(config.image_size)), jax.random.PRNGKey(0))
    part = {"params": {"encoder": variables["params"]},
            "batch_stats": variables.get("batch_stats", {})}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), part)


def restore_encoder(workdir_or_file: str, config: Any, *, step: Optional[int] = None,
                    sharding: Any = None, target: Any = None, with_classifier: bool = False,
                    model: Any = None) -> RestoredEncoder:
    """The encoder (+ batch statistics, + classifier kernel if asked) of a run or a weights file.

    Args:
      workdir_or_file: a workdir / checkpoints folder / step folder, or weights files.
      config: the config of the model (``model.*``, ``image_size``; ``seed``
        and ``num_classes`` for files). May be None with a ``target`` and a
        checkpoint.
      step: a checkpoint step (default: the latest).
      sharding: where every leaf goes (e.g. ``sharding.replicated(mesh)``);
        None: NumPy arrays on the host.
      target: instead of ``config``'s abstract encoder, a nested dict
        ``{'params': {'encoder': ..., ['classifier': ...]}, 'batch_stats': ...}``
        of arrays or ``ShapeDtypeStruct`` carrying their shardings (a train
        state's parts: a warm start).
      with_classifier: also read the classifier (``target`` must name it for a
        checkpoint).
      model: the encoder module, when the caller has built it already.

    Raises:
      FileNotFoundError: no such path, no checkpoint, no such step, a missing file.
      checkpointing.CheckpointError: the checkpoint does not fit the model (the
        message says which config fields to check).
      interop.ImportMismatch / InteropError / TorchFileError / OnnxFileError:
        a weights file that does not fit (see ``interop.import_model``).
    """
    import jax  # noqa: PLC0415

    from broadface_jax import checkpointing, interop  # noqa: PLC0415

    spec = os.fspath(workdir_or_file)
    if interop.is_model_file(spec):
        return _from_file(spec, config, target, sharding, with_classifier)
    checkpointing.quiet_orbax_logging()
    folder, step = checkpointing.resolve(spec, step)
    host = sharding is None and target is None
    if target is None:
        if with_classifier:
            raise ValueError("with_classifier needs a target naming the classifier's shape")
        placement = (jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if host
                     else sharding)
        target = _encoder_target(config, placement, model)
    else:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=_sharding_of(x, sharding)), target)
    try:
        loaded = checkpointing.restore_partial(folder, target, step)
    except checkpointing.CheckpointError as e:
        if isinstance(e, checkpointing.UnreadableCheckpointError):
            raise
        raise type(e)(f"{e}\n{_shape_hint(str(e))}") from e
    params, batch_stats = loaded["params"]["encoder"], loaded["batch_stats"]
    if host:
        params, batch_stats = jax.tree.map(np.asarray, (params, batch_stats))
    classifier = loaded["params"]["classifier"] if with_classifier else None
    return RestoredEncoder(params, batch_stats, classifier, step, f"{spec} step {step}")


_MISMATCH = re.compile(r"^\s*(\S+): checkpoint has shape \(([\d, ]*)\), model needs \(([\d, ]*)\)")


def _shapes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def _shape_hint(message: str) -> str:
    """Which config fields to check, from a checkpoint shape mismatch's leaf list."""
    bad = [(m.group(1), _shapes(m.group(2)), _shapes(m.group(3)))
           for m in map(_MISMATCH.match, message.splitlines()) if m]
    if bad and all(".classifier." in f".{name}." for name, _, _ in bad):
        return ("(only the classifier differs: set config.init_classifier=False to load the "
                "encoder alone, or use the run's num_classes / model.embedding_dim)")
    if bad and all(len(old) == len(new) == 2 and old[1] == new[1] for _, old, new in bad):
        return ("(only the embedding FC's input differs, the layers match: check image_size, "
                "which sets the feature map the FC flattens)")
    return ("(check that model.* and image_size are the run's: the workdir's config.json "
            "records them)")


# ------------------------------------------------------------------ the workdir's config


def config_path(workdir: str) -> str:
    from broadface_jax import workdir as workdir_lib  # noqa: PLC0415

    return os.path.join(os.fspath(workdir), workdir_lib.CONFIG_FILE)


def read_recorded(workdir: str) -> dict[str, Any]:
    """The flat ``{dotted field: value}`` a workdir's ``config.json`` records.

    Raises:
      FileNotFoundError: the workdir has no ``config.json`` (naming it).
      ValueError: it cannot be read as JSON (naming it).
    """
    from broadface_jax import workdir as workdir_lib  # noqa: PLC0415

    path = config_path(workdir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the workdir records no config (pass "
                                "--config with the run's model.* and image_size)")
    try:
        with open(path, encoding="utf-8") as f:
            flat = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as the run's config ({e})") from e
    if not isinstance(flat, dict):
        raise ValueError(f"{path} holds a {type(flat).__name__}, not a config")
    flat.pop(workdir_lib.FORMAT_KEY, None)
    return flat


def workdir_config(workdir: str) -> Any:
    """The config a workdir records, as a locked ``ConfigDict`` (lists read back as tuples).

    Raises:
      FileNotFoundError, ValueError: as :func:`read_recorded`.
    """
    import ml_collections  # noqa: PLC0415

    root: dict[str, Any] = {}
    for field, value in read_recorded(workdir).items():
        node = root
        *parents, leaf = field.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tuple(value) if isinstance(value, list) else value
    config = ml_collections.ConfigDict(root)
    config.lock()
    return config


def model_differences(recorded: dict[str, Any], config: Any) -> list[str]:
    """``'<field>: workdir <a>, given <b>'`` for each :data:`MODEL_FIELDS` field that differs."""
    from broadface_jax import workdir as workdir_lib  # noqa: PLC0415

    given = workdir_lib.flatten(config)
    out = []
    for field in sorted(set(recorded) | set(given)):
        if not any(field == p or field.startswith(p + ".") for p in MODEL_FIELDS):
            continue
        old, new = recorded.get(field, "<absent>"), given.get(field, "<absent>")
        if old != new:
            out.append(f"{field}: workdir {old}, given {new}")
    return out
