"""The embedding head shared by every backbone: BN -> dropout -> flatten -> FC -> BN.

This is the block the BroadFace paper puts after ``res5c`` ("a block of batch
normalization, fully-connected and batch normalization layers", section 4.1)
and insightface's ``IResNet`` ends with (``bn2``, ``dropout``, ``fc``,
``features``).

* The FC layer infers its input size from the flattened feature map, so any
  input resolution works (112x112 gives 7x7x512 = 25,088 inputs for IResNet).
* Flattening is in NHWC order (H, W, C); PyTorch flattens NCHW as (C, H, W),
  so converting an insightface ``fc.weight`` means permuting its input axis.
* The final ("features") BatchNorm has a fixed scale of 1 in insightface
  (``features.weight`` is constant 1 with ``requires_grad=False``): here it
  simply has no scale parameter. MobileFaceNet's GDC head learns that scale
  and has no FC bias; both are options.
* The FC and the last BN always run in float32 (as insightface's fp16 mode
  does: ``self.fc(x.float())``), so the embedding is float32 whatever the
  backbone's compute dtype.

:class:`Encoder` is the base of every backbone: the fields
``models.build_encoder`` sets on each (``embedding_dim``, ``width``,
``dropout``, ``dtype``, ``bn_groups``) and :meth:`Encoder.head`, which ends
the backbone's ``__call__`` with this head as its submodule ``head`` (so every
backbone's head parameters live at ``head/bn``, ``head/fc``,
``head/features``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from broadface_jax.models import layers


class EmbeddingHead(nn.Module):
    """BN -> dropout -> flatten -> Dense(embedding_dim) -> BN.

    Attributes:
      embedding_dim: size D of the output embedding.
      dropout: dropout rate on the normalised feature map (``dropout`` RNG).
      fc_bias: whether the FC layer has a bias (insightface IResNet: yes;
        MobileFaceNet's GDC: no).
      learn_feature_scale: whether the last BN learns a scale (IResNet: no,
        fixed at 1; MobileFaceNet: yes).
      dtype: compute dtype of the first BN and dropout (the backbone's).
      fc_kernel_init: FC kernel initialiser; ``None`` = PyTorch's ``nn.Linear``
        default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
      bn_groups: train-mode BatchNorm statistics per this many equal groups of
        batch rows (1 = the whole batch; see :func:`layers.batch_norm`).
    """

    embedding_dim: int
    dropout: float = 0.0
    fc_bias: bool = True
    learn_feature_scale: bool = False
    dtype: layers.Dtype = jnp.float32
    fc_kernel_init: nn.initializers.Initializer | None = None
    bn_groups: int | None = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps features (B, ...) with channels last to (B, embedding_dim) float32."""
        x = layers.batch_norm(train, self.dtype, self.bn_groups)(name="bn")(x)
        x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        fan_in = x.shape[-1]
        x = nn.Dense(
            self.embedding_dim,
            use_bias=self.fc_bias,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=self.fc_kernel_init or layers.torch_linear_kernel_init(),
            bias_init=layers.torch_linear_bias_init(fan_in),
            name="fc",
        )(x)
        return layers.batch_norm(train, jnp.float32, self.bn_groups,
                                 use_scale=self.learn_feature_scale)(name="features")(x)


class Encoder(nn.Module):
    """Base of every backbone: the shared fields and the embedding head.

    A backbone subclasses it, adds its own fields and ends its
    ``@nn.compact __call__(x, train)`` (NHWC images normalised to
    ``(x/255 - 0.5)/0.5`` -> (B, embedding_dim) float32) with
    ``return self.head(features, train, ...)``.

    Attributes:
      embedding_dim: output size D.
      width: channel multiplier (1.0 = the reference network).
      dropout: dropout rate in the head.
      dtype: compute dtype of the backbone (parameters are float32).
      bn_groups: train-mode BatchNorm statistics per this many equal groups of
        batch rows (1 = the whole batch; see :func:`layers.batch_norm`).
    """

    embedding_dim: int = 512
    width: float = 1.0
    dropout: float = 0.0
    dtype: layers.Dtype = jnp.float32
    bn_groups: int | None = 1

    def head(self, x: jax.Array, train: bool, *, fc_bias: bool = True,
             learn_feature_scale: bool = False,
             fc_kernel_init: nn.initializers.Initializer | None = None) -> jax.Array:
        """The :class:`EmbeddingHead` named ``head`` on the backbone's features (call it
        from the compact ``__call__``)."""
        return EmbeddingHead(
            self.embedding_dim, dropout=self.dropout, fc_bias=fc_bias,
            learn_feature_scale=learn_feature_scale, dtype=self.dtype, bn_groups=self.bn_groups,
            fc_kernel_init=fc_kernel_init, name="head")(x, train)

