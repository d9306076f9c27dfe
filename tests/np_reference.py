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
