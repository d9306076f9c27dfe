"""Warm start of a train state from weights files (``config.init_from=backbone.pth``)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from broadface_jax.interop import InteropError, import_model


def _place(value: np.ndarray, like: Any, sharding: Any, where: str) -> jax.Array:
    """A global array with ``like``'s shape and dtype on ``sharding`` (every process holds ``value``)."""
    if tuple(value.shape) != tuple(like.shape):
        raise InteropError(f"{where}: imported shape {value.shape} differs from the train "
                           f"state's {tuple(like.shape)}")
    value = np.asarray(value, like.dtype)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def warm_start(state: Any, shardings: Any, spec: str, init_classifier: bool, config: Any) -> Any:
    """``state`` with the encoder (and, if asked, the classifier rows) from ``spec``.

    The optimizer state, queue, step and RNG stay freshly initialised, as for
    a warm start from a run's checkpoint.

    Raises:
      InteropError: ``init_classifier`` but the file has no softmax rows, or
        their count is not ``config.num_classes``.
      ImportMismatch / TorchFileError / OnnxFileError / FileNotFoundError:
        from reading the file (see ``interop.import_model``).
    """
    imported = import_model(spec, config, with_classifier=init_classifier)
    if init_classifier and imported.classifier is None:
        raise InteropError(
            f"config.init_from={spec!r} has no classifier rows (a backbone file or ONNX model "
            "holds only the encoder); set config.init_classifier=False to load the encoder "
            "and start the classifier fresh, or give all rank files of an arcface_torch "
            "checkpoint ('DIR/checkpoint_gpu_*.pt')")
    enc_like, enc_sh = state.params["encoder"], shardings.params["encoder"]
    want = jax.tree.structure(enc_like)
    if jax.tree.structure(imported.params) != want or (
            jax.tree.structure(imported.batch_stats) != jax.tree.structure(state.batch_stats)):
        raise InteropError(f"config.init_from={spec!r}: the imported trees do not have the train "
                           f"state's structure (is config.model the model being trained?)")
    params = dict(state.params)
    params["encoder"] = jax.tree.map(
        lambda v, t, s: _place(v, t, s, f"config.init_from={spec!r}"),
        imported.params, enc_like, enc_sh)
    batch_stats = jax.tree.map(
        lambda v, t, s: _place(v, t, s, f"config.init_from={spec!r}"),
        imported.batch_stats, state.batch_stats, shardings.batch_stats)
    if init_classifier:
        like = state.params["classifier"]["kernel"]
        params["classifier"] = dict(state.params["classifier"])
        params["classifier"]["kernel"] = _place(
            imported.classifier, like, shardings.params["classifier"]["kernel"],
            f"classifier rows of config.init_from={spec!r}")
    if imported.fresh:
        logging.info("warm start from %s: %d encoder leaves have no counterpart in the file and "
                     "keep their initialisation (seed %s): %s", spec, len(imported.fresh),
                     config.seed, ", ".join(imported.fresh))
    if imported.folded:
        logging.info("warm start from %s: %d Conv+BatchNorm pairs arrived folded (BatchNorm = "
                     "identity + folded bias)", spec, imported.folded)
    return state.replace(params=params, batch_stats=batch_stats)
