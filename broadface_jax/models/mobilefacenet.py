"""MobileFaceNet as in insightface's arcface_torch (``backbones/mobilefacenet.py``).

``MobileFaceNet(blocks=(1, 4, 6, 2), scale=1)`` ("mobilefacenet") is the
network of the MobileFaceNets paper (Chen et al., CCBR 2018, Table 1), for
which the paper reports 0.99M parameters with a 128-d embedding. Its PyTorch
count (conv/FC weights, BN affine, PReLU slopes) at 112x112 and 128-d is
1,003,136 (976,000 weights + 19,584 BN affine + 7,552 PReLU), 0.46 GFLOPs.
``scale=2`` ("mbf") is arcface_torch's default ``get_mbf``: it doubles the
64/128 trunk widths but keeps the expansion widths 128/256/512; at 512-d it
has 2,059,520 parameters and 0.90 GFLOPs (arcface_torch's "mobilefacenet-0.45G"
counts multiply-adds). See ``tests/test_models.py``.

Layout at width 1, scale s (C1 = 64s, C2 = 128s):

* ConvBlock 3x3 s2 3->C1; ConvBlock 3x3 grouped (64 groups) C1->C1
  (depthwise for s = 1); or a Residual stage when ``blocks[0] > 1``;
* DepthWise C1->C1 s2 (expansion 128), Residual x blocks[1] (expansion 128);
* DepthWise C1->C2 s2 (expansion 256), Residual x blocks[2] (expansion 256);
* DepthWise C2->C2 s2 (expansion 512), Residual x blocks[3] (expansion 256);
* ConvBlock 1x1 C2->512 ("conv_sep");
* GDC: a global depthwise conv (kernel = the whole 7x7 map, valid) -> BN ->
  flatten -> FC(no bias) -> BN (learned scale): the shared
  :class:`~broadface_jax.models.head.EmbeddingHead` with ``fc_bias=False``,
  ``learn_feature_scale=True``.

ConvBlock = conv (no bias) -> BN -> PReLU; LinearBlock = conv -> BN;
DepthWise = ConvBlock 1x1 -> depthwise ConvBlock kxk(stride) -> LinearBlock
1x1, plus the input when residual.

The global depthwise conv's kernel equals the spatial size of the last
feature map, so that any input size works (7x7 at 112x112, as insightface).
Conv and FC kernels are Kaiming-normal (fan_out, ReLU gain), as insightface.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from broadface_jax.models import layers
from broadface_jax.models.head import Encoder


def _conv(features: int, kernel: int, strides: int, padding: int, groups: int,
          dtype: layers.Dtype, name: str) -> nn.Conv:
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides),
        padding=layers.pad(padding), feature_group_count=groups, use_bias=False,
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=layers.kaiming_normal_fan_out, name=name)


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU, or conv -> BN when ``linear``."""

    features: int
    kernel: int = 1
    strides: int = 1
    padding: int = 0
    groups: int = 1
    linear: bool = False
    dtype: layers.Dtype = jnp.float32
    bn_groups: int | None = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = _conv(self.features, self.kernel, self.strides, self.padding,
                  self.groups, self.dtype, "conv")(x)
        x = layers.batch_norm(train, self.dtype, self.bn_groups)(name="bn")(x)
        if not self.linear:
            x = layers.PReLU(name="prelu")(x)
        return x


class DepthWise(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise(stride) -> 1x1 linear project."""

    features: int
    expansion: int
    strides: int = 1
    residual: bool = False
    dtype: layers.Dtype = jnp.float32
    bn_groups: int | None = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dt, g = self.dtype, self.bn_groups
        y = ConvBlock(self.expansion, dtype=dt, bn_groups=g, name="expand")(x, train)
        y = ConvBlock(self.expansion, kernel=3, strides=self.strides, padding=1,
                      groups=self.expansion, dtype=dt, bn_groups=g, name="depthwise")(y, train)
        y = ConvBlock(self.features, linear=True, dtype=dt, bn_groups=g, name="project")(y, train)
        return x + y if self.residual else y


class MobileFaceNet(Encoder):
    """MobileFaceNet encoder: NHWC images in [-1, 1] -> (B, embedding_dim) float32.

    Attributes (and :class:`~broadface_jax.models.head.Encoder`'s):
      embedding_dim: 128 by default (the paper's; arcface_torch uses 512).
      blocks: residual blocks per stage (arcface_torch ``blocks``).
      scale: trunk width factor of arcface_torch (1 = the paper's network);
        ``width`` multiplies every channel count on top of it.
    """

    embedding_dim: int = 128
    blocks: Sequence[int] = (1, 4, 6, 2)
    scale: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        w, dt, g = self.width, self.dtype, self.bn_groups
        # The trunk widths are `scale` times a width-scaled base, so that the
        # grouped conv below (64 groups at width 1) always divides evenly.
        base1 = layers.scale_channels(64, w)
        c1 = self.scale * base1
        c2 = self.scale * layers.scale_channels(128, w)
        e1, e2, e3 = (layers.scale_channels(c, w) for c in (128, 256, 512))
        c_sep = layers.scale_channels(512, w)

        def stage(x: jax.Array, features: int, expansion: int, n: int, name: str) -> jax.Array:
            for i in range(n):
                x = DepthWise(features, expansion, residual=True, dtype=dt, bn_groups=g,
                              name=f"{name}_{i}")(x, train)
            return x

        x = x.astype(dt)
        x = ConvBlock(c1, kernel=3, strides=2, padding=1, dtype=dt, bn_groups=g,
                      name="conv1")(x, train)
        if self.blocks[0] == 1:
            x = ConvBlock(c1, kernel=3, padding=1, groups=base1, dtype=dt, bn_groups=g,
                          name="conv2_dw")(x, train)
        else:
            x = stage(x, c1, e1, self.blocks[0], "stage0")
        x = DepthWise(c1, e1, strides=2, dtype=dt, bn_groups=g, name="down1")(x, train)
        x = stage(x, c1, e1, self.blocks[1], "stage1")
        x = DepthWise(c2, e2, strides=2, dtype=dt, bn_groups=g, name="down2")(x, train)
        x = stage(x, c2, e2, self.blocks[2], "stage2")
        x = DepthWise(c2, e3, strides=2, dtype=dt, bn_groups=g, name="down3")(x, train)
        x = stage(x, c2, e2, self.blocks[3], "stage3")
        x = ConvBlock(c_sep, dtype=dt, bn_groups=g, name="conv_sep")(x, train)
        # Global depthwise conv (GDConv): one kernel tap per spatial position.
        height, width = x.shape[1], x.shape[2]
        x = nn.Conv(
            c_sep, (height, width), padding="VALID", feature_group_count=c_sep,
            use_bias=False, dtype=dt, param_dtype=jnp.float32,
            kernel_init=layers.kaiming_normal_fan_out, name="gdc_conv")(x)
        return self.head(x, train, fc_bias=False, learn_feature_scale=True,
                         fc_kernel_init=layers.kaiming_normal_fan_out)
