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


def batch_norm(train: bool, dtype: Dtype, **kwargs: Any) -> Callable[..., nn.BatchNorm]:
    """A BatchNorm constructor with PyTorch's eps and momentum.

    Running statistics go to the ``batch_stats`` collection; parameters stay
    float32 whatever the compute ``dtype``.
    """
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        **kwargs,
    )


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
