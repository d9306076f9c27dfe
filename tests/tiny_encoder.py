"""A tiny encoder for fast core tests: conv -> BN -> dense (has params, batch stats, dropout)."""

import flax.linen as nn
import jax.numpy as jnp


class TinyEncoder(nn.Module):
    embedding_dim: int = 8
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), strides=(2, 2), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = jnp.tanh(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.embedding_dim)(x)
