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
m2, m3) in ``losses.REGISTRY``: the family is used, like every loss, through
``losses.build(config.loss)``. :func:`target_logit` is the building block
CurricularFace's target shares.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EPS = 1e-7  # floor of sin^2(theta): bounds the margin's gradient at theta -> 0 or pi


def target_logit(cos_y: jax.Array, *, m1: float, m2: float, m3: float) -> jax.Array:
    """cos(m1*theta + m2) - m3 for the true class, with the insightface fallback."""
    c = jnp.clip(cos_y, -1.0, 1.0)
    if m1 == 1.0:
        if m2 == 0.0:
            out = c
        else:
            sin = jnp.sqrt(jnp.maximum(1.0 - c * c, EPS))
            cos_m = c * math.cos(m2) - sin * math.sin(m2)
            # theta + m2 > pi  <=>  cos(theta) < cos(pi - m2)
            threshold = math.cos(math.pi - m2)
            fallback = c - math.sin(math.pi - m2) * m2
            out = jnp.where(c > threshold, cos_m, fallback)
    else:
        bound = 1.0 - EPS  # |d arccos / d c| <= 1/sqrt(2 EPS)
        theta = jnp.arccos(jnp.clip(c, -bound, bound))
        out = jnp.cos(m1 * theta + m2)
    return out - m3


# ---- registered logits functions (see the package docstring for the contract)

def combined(cos, onehot, cos_y, state, *, s: float, m1: float, m2: float, m3: float):
    """s * cos for other classes, s * target_logit at the label: f32[N, C]."""
    del state  # stateless
    tgt = target_logit(cos_y, m1=m1, m2=m2, m3=m3)
    return s * jnp.where(onehot, tgt[:, None], cos)


def arcface(cos, onehot, cos_y, state, *, s: float, m2: float):
    return combined(cos, onehot, cos_y, state, s=s, m1=1.0, m2=m2, m3=0.0)


def cosface(cos, onehot, cos_y, state, *, s: float, m3: float):
    return combined(cos, onehot, cos_y, state, s=s, m1=1.0, m2=0.0, m3=m3)
