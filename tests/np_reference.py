"""float64 NumPy references for the margin loss and Eq. 7, shared by the core tests."""

import numpy as np


def np_target(c, m1, m2, m3):
    """cos(m1*theta + m2) - m3 with insightface's fallback (theta + m2 > pi) for m1 == 1."""
    c = np.clip(np.asarray(c, np.float64), -1, 1)
    theta = np.arccos(c)
    out = np.cos(m1 * theta + m2)
    if m1 == 1.0 and m2 > 0:
        out = np.where(theta + m2 > np.pi, c - np.sin(np.pi - m2) * m2, out)
    return out - m3


def np_margin_ce(e, w, y, s=64.0, m1=1.0, m2=0.5, m3=0.0):
    """Per-sample margin softmax cross-entropy of embeddings e against classifier rows w."""
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = e @ w.T
    rows = np.arange(len(y))
    logits = s * cos
    logits[rows, y] = s * np_target(cos[rows, y], m1, m2, m3)
    mx = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]
    return lse - logits[rows, y]


def np_compensate(e_old, w_old, w_cur):
    """Eq. 7: e* = e⁻ + ‖e⁻‖/‖W⁻‖ (W − W⁻)."""
    return e_old + (np.linalg.norm(e_old, axis=1, keepdims=True)
                    / np.linalg.norm(w_old, axis=1, keepdims=True)) * (w_cur - w_old)


def np_curricular_ce(e, w, y, t, s=64.0, m=0.5):
    """Per-sample CurricularFace loss (Huang et al. 2020) with a given t, float64.

    Target s*T(cos_y) with T the ArcFace target (insightface fallback); other
    classes s*cos_j if cos_j <= cos(theta_y + m), else s*cos_j*(t + cos_j).
    """
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1, 1)
    rows = np.arange(len(y))
    cos_y = cos[rows, y]
    cos_m = np.cos(np.arccos(cos_y) + m)
    logits = np.where(cos > cos_m[:, None], cos * (t + cos), cos)
    logits[rows, y] = np_target(cos_y, 1.0, m, 0.0)
    logits = s * logits
    mx = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]
    return lse - logits[rows, y]


def np_central_gradient(f, x, h=1e-6):
    """d f / d x by float64 central differences (f: array -> float)."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g
