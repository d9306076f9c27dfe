"""The combined-margin family: ArcFace, CosFace and insightface's "combined margin".

One family covers the paper's losses:

    target logit = s * (cos(m1 * theta_y + m2) - m3),   other logits = s * cos(theta_j)

* ArcFace: m1 = 1, m2 = 0.5, m3 = 0, s = 64.
* CosFace: m1 = 1, m2 = 0,   m3 = 0.35 (or 0.4), s = 64.

Gradients are the true gradients of these expressions. insightface's
arcface_torch `CombinedMarginLoss` applies the angular margin in place under
`torch.no_grad()` (arccos, add m2, cos), so autograd sees the target logit as
if it were `s * cos(theta_y)`: the gradient with respect to cos(theta_y) is `s`
instead of `s * sin(theta_y + m2) / sin(theta_y)`. Here the margin is part of
the graph. Near theta_y = 0 that factor grows like 1/sin(theta_y); sin(theta)
is computed as sqrt(max(1 - cos^2, EPS)), which bounds it (|d sin / d cos| <=
1/sqrt(EPS)) and keeps the value exact to ~1e-7 away from theta = 0 and pi.

When theta_y + m2 > pi, cos(theta_y + m2) stops decreasing in theta_y; as in
insightface (`easy_margin=False`) the target logit then falls back to
`cos(theta_y) - m2 * sin(m2)`. That keeps it decreasing in theta_y over the
whole range, with a small downward jump at the switch (from -1 to
-cos(m2) - m2 sin(m2), about -1.117 for m2 = 0.5), exactly as insightface.

Registered as 'arcface' (uses s, m2), 'cosface' (s, m3) and 'combined' (s, m1,
m2, m3) in ``losses.REGISTRY``. ``MarginConfig`` and ``margin_cross_entropy``
are the family's direct API (tests, benchmarks); the trainer goes through
``losses.build``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from broadface_jax import losses as registry
from broadface_jax.losses import core

EPS = 1e-7  # floor of sin^2(theta): bounds the margin's gradient at theta -> 0 or pi
_FAMILY = ("arcface", "cosface", "combined")


@dataclasses.dataclass(frozen=True)
class MarginConfig:
    """Static parameters of the combined margin s * (cos(m1*theta + m2) - m3)."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    @classmethod
    def from_config(cls, loss_config: Any) -> "MarginConfig":
        """The margin of `config.loss` (name: arcface | cosface | combined).

        Unset (None) fields take the loss's default (``losses.REGISTRY``); a
        field the loss ignores (m1 or m3 for ArcFace, m1 or m2 for CosFace)
        must stay unset: a ValueError names it, its value and the loss.
        """
        name, fields = registry.resolve(loss_config)
        if name not in _FAMILY:
            raise ValueError(f"config.loss.name={name!r} is not a combined-margin loss "
                             f"({', '.join(_FAMILY)}); use losses.build(config.loss)")
        return cls(s=fields["s"], m1=fields.get("m1", 1.0), m2=fields.get("m2", 0.0),
                   m3=fields.get("m3", 0.0))


def target_logit(cos_y: jax.Array, margin: MarginConfig) -> jax.Array:
    """cos(m1*theta + m2) - m3 for the true class, with the insightface fallback."""
    c = jnp.clip(cos_y, -1.0, 1.0)
    if margin.m1 == 1.0:
        if margin.m2 == 0.0:
            out = c
        else:
            sin = jnp.sqrt(jnp.maximum(1.0 - c * c, EPS))
            cos_m = c * math.cos(margin.m2) - sin * math.sin(margin.m2)
            # theta + m2 > pi  <=>  cos(theta) < cos(pi - m2)
            threshold = math.cos(math.pi - margin.m2)
            fallback = c - math.sin(math.pi - margin.m2) * margin.m2
            out = jnp.where(c > threshold, cos_m, fallback)
    else:
        bound = 1.0 - EPS  # |d arccos / d c| <= 1/sqrt(2 EPS)
        theta = jnp.arccos(jnp.clip(c, -bound, bound))
        out = jnp.cos(margin.m1 * theta + margin.m2)
    return out - margin.m3


def margin_logits(cos: jax.Array, onehot: jax.Array, cos_y: jax.Array,
                  margin: MarginConfig) -> jax.Array:
    """s * cos for other classes, s * target_logit at the label: f32[N, C]."""
    tgt = target_logit(cos_y, margin)
    return margin.s * jnp.where(onehot, tgt[:, None], cos)


# ---- registered logits functions (see the package docstring for the contract)

def combined(cos, onehot, cos_y, state, *, s: float, m1: float, m2: float, m3: float):
    del state  # stateless
    return margin_logits(cos, onehot, cos_y, MarginConfig(s, m1, m2, m3))


def arcface(cos, onehot, cos_y, state, *, s: float, m2: float):
    return combined(cos, onehot, cos_y, state, s=s, m1=1.0, m2=m2, m3=0.0)


def cosface(cos, onehot, cos_y, state, *, s: float, m3: float):
    return combined(cos, onehot, cos_y, state, s=s, m1=1.0, m2=0.0, m3=m3)


def margin_cross_entropy(embeddings: jax.Array, kernel_normalized: jax.Array,
                         labels: jax.Array, margin: MarginConfig,
                         num_classes: int | None = None) -> jax.Array:
    """Per-sample margin softmax cross-entropy (Eq. 2 with the margin).

    Args:
      embeddings: f[N, D], not necessarily normalised (they are normalised here).
      kernel_normalized: f32[C, D] classifier rows, already L2-normalised (once
        per step, shared by the batch and every queue chunk).
      labels: int[N] in [0, num_classes).
      margin: the margin parameters.
      num_classes: the real class count when `kernel_normalized` has padding
        rows (class-sharded classifiers pad C to a multiple of the shard
        count); padding classes are excluded from the softmax.

    Returns:
      f32[N] losses.
    """
    cos, onehot, cos_y = core.cosines(embeddings, kernel_normalized, labels)
    return core.softmax_cross_entropy(margin_logits(cos, onehot, cos_y, margin), onehot,
                                      num_classes)
