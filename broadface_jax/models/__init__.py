"""Encoders: ``build_encoder(config.model)``, ``init_variables`` and ``count_params(params)``.

Every encoder is a Flax Linen module called as
``module.apply(variables, x, train=bool, mutable=['batch_stats'], rngs={'dropout': key})``
on NHWC float images normalised to ``(x/255 - 0.5)/0.5`` and returns the
(B, embedding_dim) float32 **unnormalised** embedding. BatchNorm statistics
live in ``batch_stats``; the FC layer infers its input size, so any input
resolution works.

``model.batch_norm`` chooses the train-mode BatchNorm statistics: 'global'
(over the whole global batch; under data parallelism XLA all-reduces them in
every BN layer, forward and backward) or 'per_device' (over each device's
shard of the batch, as arcface_torch's per-GPU BatchNorm under DDP; see
:class:`layers.GroupedBatchNorm`). Eval mode (running statistics) is the
same code in both.

Adding a backbone = one file in this package + one line in :data:`REGISTRY`.
Backbone modules are imported on first use, so importing this package is cheap.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

#: name -> (module in this package, class name, fixed constructor arguments).
REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "iresnet18": ("iresnet", "IResNet", {"stage_sizes": (2, 2, 2, 2)}),
    "iresnet34": ("iresnet", "IResNet", {"stage_sizes": (3, 4, 6, 3)}),
    "iresnet50": ("iresnet", "IResNet", {"stage_sizes": (3, 4, 14, 3)}),
    "iresnet100": ("iresnet", "IResNet", {"stage_sizes": (3, 13, 30, 3)}),
    "iresnet200": ("iresnet", "IResNet", {"stage_sizes": (6, 26, 60, 6)}),
    "mobilefacenet": ("mobilefacenet", "MobileFaceNet", {"blocks": (1, 4, 6, 2), "scale": 1}),
    "mbf": ("mobilefacenet", "MobileFaceNet", {"blocks": (1, 4, 6, 2), "scale": 2}),
    "resnet50": ("resnet", "ResNet", {"stage_sizes": (3, 4, 6, 3)}),
}

#: Smallest input side each backbone reduces to >= 1x1 (its total stride); others: 16.
MIN_IMAGE_SIZE: dict[str, int] = {"resnet50": 32}
DEFAULT_MIN_IMAGE_SIZE = 16


def min_image_size(name: str) -> int:
    """The smallest ``config.image_size`` the encoder ``name`` takes (``config_check``)."""
    return MIN_IMAGE_SIZE.get(name, DEFAULT_MIN_IMAGE_SIZE) if isinstance(name, str) else (
        DEFAULT_MIN_IMAGE_SIZE)


#: ``model.dtype`` values: the encoder's compute dtype (parameters stay float32).
DTYPES = ("float32", "bfloat16")
#: ``model.batch_norm`` values (see the module docstring).
BATCH_NORM_MODES = ("global", "per_device")


def build_encoder(model_config: Any, batch_shards: int | None = None) -> Any:
    """Builds the encoder ``flax.linen.Module`` named by ``model_config``.

    Args:
      model_config: ``config.model`` (a ConfigDict or a mapping) with the
        fields of ``configs/default.py``: ``name`` (a key of
        :data:`REGISTRY`), ``embedding_dim``, ``width`` (channel multiplier
        > 0), ``dropout`` (in [0, 1)), ``dtype`` (one of :data:`DTYPES`: the
        compute dtype; parameters are always float32) and ``batch_norm`` (one
        of :data:`BATCH_NORM_MODES`). They are checked by ``config_check``
        (the one place of these rules).
      batch_shards: how many devices the train batch is split over (its
        leading axis, in device order): the number of BatchNorm groups in
        'per_device' mode; ignored in 'global' mode. Without it a
        'per_device' encoder still initialises and evaluates (eval mode does
        not group) but refuses to train.

    Raises:
      config_check.ConfigError (a ValueError): naming the field and value at fault.
    """
    import jax.numpy as jnp  # noqa: PLC0415 (kept out of import time)

    from broadface_jax import config_check  # noqa: PLC0415 (it imports this package)

    config_check.check({"model": model_config}, only=("model",))
    if batch_shards is not None and (not isinstance(batch_shards, int)
                                     or isinstance(batch_shards, bool) or batch_shards < 1):
        raise ValueError(f"batch_shards must be a positive int, got {batch_shards!r}")
    bn_groups = 1 if model_config["batch_norm"] == "global" else batch_shards

    module_name, class_name, fixed = REGISTRY[model_config["name"]]
    cls = getattr(importlib.import_module(f"{__name__}.{module_name}"), class_name)
    return cls(embedding_dim=model_config["embedding_dim"], width=float(model_config["width"]),
               dropout=float(model_config["dropout"]), dtype=jnp.dtype(model_config["dtype"]),
               bn_groups=bn_groups, **fixed)


def init_variables(model: Any, image_size: int, rng: Any) -> Any:
    """``model.init`` on one zero ``(1, S, S, 3)`` image in eval mode.

    The one dummy initialisation of an encoder: ``{'params': ...,
    'batch_stats': ...}`` (the FC layer infers its input size from the
    image). Traceable: wrap it in ``jax.eval_shape`` for the shapes only
    (restore targets) or in ``jax.jit``.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    return model.init({"params": rng, "dropout": rng},
                      jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ``ShapeDtypeStruct``).

    Pass the ``params`` collection only: BatchNorm running statistics live in
    ``batch_stats`` and are not parameters (as PyTorch buffers are not).
    """
    import jax  # noqa: PLC0415

    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


__all__ = ["BATCH_NORM_MODES", "DTYPES", "MIN_IMAGE_SIZE", "REGISTRY", "build_encoder",
           "count_params", "init_variables", "min_image_size"]
