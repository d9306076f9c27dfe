"""Small building blocks shared by the backbones.

PyTorch conventions are kept on purpose (insightface's arcface_torch is the
reference): BatchNorm with eps 1e-5 and PyTorch momentum 0.1 (Flax
``momentum=0.9``), per-channel PReLU initialised to 0.25, explicit symmetric
convolution padding (Flax's ``'SAME'`` pads a stride-2 convolution on an even
input as (0, 1), PyTorch's ``padding=1`` as (1, 1)), and PyTorch's default
``nn.Linear`` initialisation.

One known difference: Flax updates the running variance with the biased
batch variance, PyTorch with the unbiased one (a factor n/(n-1), n = values
per channel in the batch: negligible for conv maps, 1/127 for the 512-d
feature BN at batch 128). Forward values in both modes are the same.

Train-mode statistics are over the whole (global) batch by default; with
``groups > 1`` (``config.model.batch_norm = 'per_device'``) each block of
``B / groups`` consecutive rows, i.e. each device's shard of the batch, is
normalised with its own statistics (:class:`GroupedBatchNorm`), as
arcface_torch's plain ``nn.BatchNorm2d`` under DDP does per GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

#: BatchNorm epsilon of PyTorch / insightface.
BN_EPS = 1e-5
#: Flax momentum equal to PyTorch's BatchNorm momentum 0.1.
BN_MOMENTUM = 0.9


def scale_channels(channels: int, width: float, multiple_of: int = 1) -> int:
    """Scales a channel count by the width multiplier.

    Rounds half up to the nearest multiple of ``multiple_of`` and never goes
    below ``multiple_of``: width 0.125 maps 64/128/256/512 to 8/16/32/64.
    """
    if width <= 0:
        raise ValueError(f"width multiplier must be > 0, got {width}")
    units = math.floor(channels * width / multiple_of + 0.5)
    return max(1, units) * multiple_of


def batch_norm(train: bool, dtype: Dtype, groups: int | None = 1,
               **kwargs: Any) -> Callable[..., nn.Module]:
    """A BatchNorm constructor with PyTorch's eps and momentum.

    Running statistics go to the ``batch_stats`` collection; parameters stay
    float32 whatever the compute ``dtype``.

    Args:
      train: batch statistics (and a running-statistics update) when true,
        running statistics when false.
      dtype: compute dtype.
      groups: train mode only: how many equal blocks of consecutive batch
        rows get their own statistics. 1 = the whole batch (``nn.BatchNorm``);
        more = :class:`GroupedBatchNorm`; ``None`` = not known (an encoder
        built without ``batch_shards`` in per-device mode): fine for eval,
        an error in train mode. Eval mode is ``nn.BatchNorm`` whatever the
        groups, so evaluation cannot depend on the choice.
      **kwargs: further ``nn.BatchNorm`` fields (``use_scale``, ``use_bias``).
    """
    common = dict(momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                  param_dtype=jnp.float32, **kwargs)
    if not train or groups == 1:
        return functools.partial(nn.BatchNorm, use_running_average=not train, **common)
    if groups is None:
        raise ValueError(
            "config.model.batch_norm='per_device' needs the number of batch shards to "
            "train: build the encoder with models.build_encoder(config.model, "
            "batch_shards=N) (train_step.build_train_step passes its mesh's)")
    return functools.partial(GroupedBatchNorm, groups=groups, **common)


class GroupedBatchNorm(nn.Module):
    """Train-mode BatchNorm with statistics per group of consecutive batch rows.

    The batch ``(B, ..., C)`` is viewed as ``(groups, B / groups, ..., C)``
    and each group is normalised with its own mean and (biased) variance over
    every axis but the channels, exactly as ``groups`` separate
    ``nn.BatchNorm`` calls on the blocks would (float32 statistics,
    ``E[x^2] - E[x]^2`` clipped at 0, as Flax). With the batch sharded over
    ``groups`` devices on its leading axis, group g is device g's rows, so the
    forward and backward passes need no collective: the per-GPU statistics of
    arcface_torch (``nn.BatchNorm2d`` under DDP, no SyncBN).

    Running statistics move towards the **mean over groups** of the group
    means and variances (momentum as ``nn.BatchNorm``). arcface_torch keeps
    each GPU's own running statistics and saves rank 0's; here every device
    holds the same ``batch_stats`` (they are replicated), so one value is
    needed, and a broadcast of group 0's would cost the same one small
    all-reduce per layer as the mean, which has the same expected value as
    any one device's and less noise, and does not depend on device order.
    Note that the mean of group variances is the average within-device
    variance, not the global-batch variance (smaller by the spread of the
    group means), i.e. the running statistic of what training normalised with.

    Variables are named and shaped as ``nn.BatchNorm``'s (params ``scale``,
    ``bias``; batch_stats ``mean``, ``var``), so checkpoints and the
    arcface_torch importers are the same in both modes. Only used in train
    mode (:func:`batch_norm` returns ``nn.BatchNorm`` for eval).
    """

    groups: int
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    use_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x`` (B, ..., C) per group; updates the running statistics."""
        batch, channels = x.shape[0], x.shape[-1]
        if self.groups < 1 or batch % self.groups:
            raise ValueError(
                f"BatchNorm {self.name!r}: a batch of {batch} rows does not split into "
                f"groups={self.groups} equal groups (config.model.batch_norm='per_device' "
                f"uses one group per batch shard: the batch must be a multiple of {self.groups})")
        rows = batch // self.groups
        per_group = rows * math.prod(x.shape[1:-1])
        if per_group < 2:
            raise ValueError(
                f"BatchNorm {self.name!r}: {rows} row(s) of shape {x.shape[1:]} per group "
                f"(batch {batch} / groups={self.groups}) give {per_group} value per channel; "
                "per-group statistics need at least 2 (PyTorch: 'Expected more than 1 value "
                "per channel when training')")
        ra_mean = self.variable("batch_stats", "mean",
                                lambda s: jnp.zeros(s, jnp.float32), (channels,))
        ra_var = self.variable("batch_stats", "var",
                               lambda s: jnp.ones(s, jnp.float32), (channels,))

        xg = x.reshape((self.groups, rows) + x.shape[1:])
        axes = tuple(range(1, xg.ndim - 1))
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xf = xg.astype(stats_dtype)
        mean = xf.mean(axes)  # (groups, C)
        var = jnp.maximum(0.0, (xf * xf).mean(axes) - mean * mean)
        if not self.is_initializing():
            # One (2, C) mean over groups: a single small all-reduce per layer.
            group_mean = jnp.stack([mean, var]).mean(axis=1)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean[0]
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_mean[1]

        shape = (self.groups,) + (1,) * len(axes) + (channels,)
        y = xg - mean.reshape(shape)
        mul = jax.lax.rsqrt(var.reshape(shape) + self.epsilon)
        if self.use_scale:
            mul = mul * self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        y = y * mul
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        return y.reshape(x.shape).astype(self.dtype or y.dtype)


class ResidualBlock(nn.Module):
    """Fields of a residual block (IResNet's ``IBasicBlock``, ResNet's ``Bottleneck``).

    Attributes:
      features: output channels (a bottleneck's inner channels).
      strides: stride of the block's strided conv and of its shortcut.
      dtype: compute dtype (parameters are float32).
      bn_groups: train-mode BatchNorm statistics per this many equal groups of
        batch rows (see :func:`batch_norm`).
    """

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    bn_groups: int | None = 1


def pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric spatial padding of ``p`` pixels, as PyTorch's ``padding=p``."""
    return ((p, p), (p, p))


class PReLU(nn.Module):
    """Per-channel PReLU (PyTorch ``nn.PReLU(num_parameters=C)``).

    ``y = x`` where ``x >= 0`` else ``alpha[c] * x``; ``alpha`` has one value
    per channel (last axis) and starts at 0.25 as in PyTorch. Flax's own
    ``nn.PReLU`` has a single scalar slope, which is not what insightface uses.
    """

    init_value: float = 0.25
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param(
            "alpha",
            nn.initializers.constant(self.init_value),
            (x.shape[-1],),
            self.param_dtype,
        )
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


def torch_linear_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default ``nn.Linear`` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default ``nn.Linear`` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


#: Kaiming normal, fan_out, ReLU gain (PyTorch ``kaiming_normal_(mode='fan_out')``),
#: used by torchvision's ResNet and by insightface's MobileFaceNet.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
