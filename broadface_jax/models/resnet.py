"""ResNet-50 (bottleneck, torchvision layout) for image retrieval.

The BroadFace paper's retrieval experiments (section 4.3, In-Shop and SOP)
use an ImageNet-pretrained ResNet-50. Layout at width 1:

* stem: conv7x7 stride 2 (no bias) -> BN -> ReLU -> max-pool 3x3 stride 2;
* four stages of bottlenecks ([3, 4, 6, 3] for ResNet-50) with 64/128/256/512
  inner channels and 4x expansion (256/512/1024/2048 out); stride 2 in the
  3x3 conv of the first block of stages 2-4 (torchvision's "v1.5");
  shortcut = 1x1 conv(stride) + BN when the shape changes; ReLU after the sum;
* **global average pooling** over the final map (2048 channels), then the
  shared head BN -> dropout -> FC(embedding_dim) -> BN (fixed scale 1). Pooling
  before the head (instead of insightface's flatten) is the usual retrieval
  design: it keeps the FC small (2048 x D instead of 2048*7*7 x D) and makes
  the embedding independent of the input resolution (retrieval crops are
  224x224 or larger).

The backbone without the head has 23,508,032 parameters at width 1, i.e.
torchvision's ``resnet50`` (25,557,032) minus its 1000-way FC (2,049,000).
Conv kernels are Kaiming-normal (fan_out, ReLU gain), as torchvision.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from broadface_jax.models import layers
from broadface_jax.models.head import Encoder

EXPANSION = 4


def _conv(features: int, kernel: int, strides: int, dtype: layers.Dtype, name: str) -> nn.Conv:
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides),
        padding=layers.pad(kernel // 2), use_bias=False, dtype=dtype,
        param_dtype=jnp.float32, kernel_init=layers.kaiming_normal_fan_out, name=name)


class Bottleneck(layers.ResidualBlock):
    """conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1(4x) -> BN, + shortcut, ReLU.

    ``features`` are the inner channels; the block outputs ``EXPANSION`` times as many.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = layers.batch_norm(train, self.dtype, self.bn_groups)
        out_features = self.features * EXPANSION
        y = nn.relu(bn(name="bn1")(_conv(self.features, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(bn(name="bn2")(_conv(self.features, 3, self.strides, self.dtype, "conv2")(y)))
        y = bn(name="bn3")(_conv(out_features, 1, 1, self.dtype, "conv3")(y))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_features:
            shortcut = _conv(out_features, 1, self.strides, self.dtype, "downsample_conv")(x)
            shortcut = bn(name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(Encoder):
    """Bottleneck ResNet (module docstring). ``stage_sizes`` is required: how many
    bottlenecks each stage has (per depth: ``models.REGISTRY``); the other
    fields are :class:`~broadface_jax.models.head.Encoder`'s, with ``width`` 1 =
    torchvision's channels."""

    stage_sizes: Sequence[int] = dataclasses.field(kw_only=True)  # required, after Encoder's

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        x = _conv(layers.scale_channels(64, self.width), 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(layers.batch_norm(train, self.dtype, self.bn_groups)(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=layers.pad(1))
        for stage, num_blocks in enumerate(self.stage_sizes):
            features = layers.scale_channels(64 * 2**stage, self.width)
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(features, strides=strides, dtype=self.dtype,
                               bn_groups=self.bn_groups,
                               name=f"layer{stage + 1}_{block}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling -> (B, C)
        return self.head(x, train, fc_bias=True, learn_feature_scale=False)
