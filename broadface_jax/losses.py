"""Margin softmax losses on L2-normalised embeddings and classifier rows.

One family covers the paper's losses (insightface's "combined margin"):

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

All functions are written with a one-hot mask rather than gathers along the
class axis, so that they run unchanged when the classifier is sharded over
classes (the softmax normaliser becomes a cross-shard reduction under jit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

EPS = 1e-7  # floor of sin^2(theta): bounds the margin's gradient at theta -> 0 or pi


@dataclasses.dataclass(frozen=True)
class MarginConfig:
    """Static parameters of the combined margin s * (cos(m1*theta + m2) - m3)."""

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    @classmethod
    def from_config(cls, loss_config: Any) -> "MarginConfig":
        """Builds the margin from `config.loss` (name: arcface | cosface | combined)."""
        name = loss_config.name
        s = float(loss_config.s)
        if name == "arcface":
            return cls(s=s, m1=1.0, m2=float(loss_config.m2), m3=0.0)
        if name == "cosface":
            return cls(s=s, m1=1.0, m2=0.0, m3=float(loss_config.m3))
        if name == "combined":
            return cls(s=s, m1=float(loss_config.m1), m2=float(loss_config.m2),
                       m3=float(loss_config.m3))
        raise ValueError(
            f"config.loss.name={name!r} is not a known loss; expected one of "
            "'arcface', 'cosface', 'combined'")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, safe at x = 0 (returns 0 there, with a finite gradient)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


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
    e = l2_normalize(embeddings.astype(jnp.float32))
    cos = e @ kernel_normalized.T  # [N, C]
    classes = jnp.arange(kernel_normalized.shape[0])
    onehot = labels[:, None] == classes[None, :]
    cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=-1)
    tgt = target_logit(cos_y, margin)
    logits = margin.s * jnp.where(onehot, tgt[:, None], cos)
    if num_classes is not None and num_classes < kernel_normalized.shape[0]:
        logits = jnp.where(classes[None, :] < num_classes, logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1) - margin.s * tgt


@jax.custom_vjp
def scale_gradient(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Identity in the forward pass; multiplies the incoming gradient by `factor`."""
    return x


def _scale_gradient_fwd(x, factor):
    return x, factor


def _scale_gradient_bwd(factor, g):
    return (g * factor.astype(g.dtype), jnp.zeros_like(factor))


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)
