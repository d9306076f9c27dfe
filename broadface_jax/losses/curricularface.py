"""CurricularFace (Huang et al., CVPR 2020): an adaptive curriculum on hard negatives.

With cos_j = cos(theta_j) of an embedding against class j and y its label:

    target logit   s * T(cos_y),  T(cos_y) = cos(theta_y + m)   (ArcFace's, with
                   insightface's fallback cos_y - m sin(m) where theta_y + m > pi)
    other logits   s * N(t, cos_j) = s * cos_j                 if T(cos_y) >= cos_j (easy)
                                     s * cos_j (t + cos_j)     if T(cos_y) <  cos_j (hard)

``t`` is an exponential moving average of r, the mean target cosine of the
batch: ``t <- 0.01 * r + 0.99 * t`` with t = 0 at the start (the paper's
momentum 0.99, as weighted in the authors' released code, head/metrics.py).
Early in training r, and so t, is small: hard negatives are damped
(|cos_j (t + cos_j)| < |cos_j|) and easy samples dominate; as the positives
grow, hard negatives get the weight t + 2 cos_j > 1 on their gradient.

Faithful to the released code: cosines clamped to [-1, 1]; hardness compares
cos_j with cos(theta_y + m) (no fallback), and t and the hardness mask carry
no gradient; t is updated from this step's batch before the logits are
computed, so the step uses the updated t. The target's margin has its true
gradient, as in the released code (sin theta is floored as in ``margin.py``).

BroadFace: t is updated from the batch only (the mean over the global batch,
where the released code uses each GPU's batch) and the same t scores the
compensated queue rows of that step, each row against its own T(cos_y).

The state is one scalar, ``TrainState.loss_state == {'t': f32[]}``, saved and
restored with the checkpoint, so a resumed run continues with the same t (a
warm start from another run begins again at t = 0, like its momentum).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from broadface_jax.losses.margin import EPS, target_logit

T_NEW_WEIGHT = 0.01  # weight of the batch's mean target cosine in the EMA of t


def init_state() -> dict[str, jax.Array]:
    return {"t": jnp.zeros((), jnp.float32)}


def update_state(state: dict[str, jax.Array], cos_y: jax.Array) -> dict[str, jax.Array]:
    r = jnp.mean(jnp.clip(cos_y, -1.0, 1.0))
    return {"t": T_NEW_WEIGHT * r + (1.0 - T_NEW_WEIGHT) * state["t"]}


def logits(cos, onehot, cos_y, state, *, s: float, m2: float):
    c = jnp.clip(cos, -1.0, 1.0)
    cy = jnp.clip(cos_y, -1.0, 1.0)
    t = jax.lax.stop_gradient(state["t"])
    sin = jnp.sqrt(jnp.maximum(1.0 - cy * cy, EPS))
    cos_m = jax.lax.stop_gradient(cy * math.cos(m2) - sin * math.sin(m2))  # cos(theta_y + m)
    hard = c > cos_m[:, None]
    negative = jnp.where(hard, c * (t + c), c)
    target = target_logit(cos_y, m1=1.0, m2=m2, m3=0.0)
    return s * jnp.where(onehot, target[:, None], negative)
