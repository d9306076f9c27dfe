"""IResNet-18/34/50/100/200 as in insightface's arcface_torch (``backbones/iresnet.py``).

Layout (channels at width 1):

* stem: conv3x3 (stride 1, no bias) -> BN -> per-channel PReLU, 64 channels;
* four stages of ``IBasicBlock`` with 64/128/256/512 channels; the first
  block of every stage has stride 2 (112x112 -> 7x7);
* block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a
  1x1 conv(stride) + BN shortcut when the shape changes; no activation after
  the sum;
* head: BN -> dropout -> flatten -> FC(embedding_dim) -> BN with fixed scale 1
  (:class:`~broadface_jax.models.head.EmbeddingHead`).

Initialisation follows insightface: every conv kernel ~ N(0, 0.1^2), BN
scale 1 / bias 0, PReLU 0.25, FC as PyTorch's ``nn.Linear``. Submodule names
follow the PyTorch attribute names (``conv1``, ``bn1``, ``prelu``,
``layer1_0``, ``bn2`` is ``head/bn``, ``fc`` and ``features`` are in
``head``) so that a checkpoint converter is a renaming plus transposes.

The width multiplier scales every channel count (tests and CPU demos use e.g.
width 0.125: 8/16/32/64 channels); the layer counts stay those of the depth.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from broadface_jax.models import layers
from broadface_jax.models.head import Encoder

#: insightface's conv initialisation: ``nn.init.normal_(m.weight, 0, 0.1)``.
CONV_INIT = nn.initializers.normal(stddev=0.1)


class IBasicBlock(layers.ResidualBlock):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = layers.batch_norm(train, self.dtype, self.bn_groups)
        conv = lambda k, s, name: nn.Conv(  # noqa: E731 (a local shorthand)
            self.features, (k, k), strides=(s, s), padding=layers.pad(k // 2),
            use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=CONV_INIT, name=name)

        y = bn(name="bn1")(x)
        y = conv(3, 1, "conv1")(y)
        y = bn(name="bn2")(y)
        y = layers.PReLU(name="prelu")(y)
        y = conv(3, self.strides, "conv2")(y)
        y = bn(name="bn3")(y)

        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(1, self.strides, "downsample_conv")(x)
            shortcut = bn(name="downsample_bn")(shortcut)
        return y + shortcut


class IResNet(Encoder):
    """IResNet encoder (module docstring); its fields are
    :class:`~broadface_jax.models.head.Encoder`'s (``width`` 1 = insightface's
    channels) and ``stage_sizes``, the ``IBasicBlock`` count of each stage (per
    depth: ``models.REGISTRY``)."""

    stage_sizes: Sequence[int] = dataclasses.field(kw_only=True)  # required, after Encoder's

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        x = nn.Conv(
            layers.scale_channels(64, self.width), (3, 3), strides=(1, 1),
            padding=layers.pad(1), use_bias=False, dtype=self.dtype,
            param_dtype=jnp.float32, kernel_init=CONV_INIT, name="conv1")(x)
        x = layers.batch_norm(train, self.dtype, self.bn_groups)(name="bn1")(x)
        x = layers.PReLU(name="prelu")(x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            features = layers.scale_channels(64 * 2**stage, self.width)
            for block in range(num_blocks):
                x = IBasicBlock(
                    features, strides=2 if block == 0 else 1, dtype=self.dtype,
                    bn_groups=self.bn_groups, name=f"layer{stage + 1}_{block}")(x, train)
        return self.head(x, train, fc_bias=True, learn_feature_scale=False)
