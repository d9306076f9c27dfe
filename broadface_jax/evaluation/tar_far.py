"""TAR @ FAR (true accept rate at a false accept rate) from similarity scores.

Convention: higher score = more similar; a pair is accepted when
``score >= t``. This is the ROC of ``sklearn.metrics.roc_curve(labels, scores)``
(thresholds at the distinct scores, plus +inf).

Rule (:func:`tar_at_far`): **TAR @ FAR = f is the largest TPR among the ROC
points whose FPR <= f**, i.e. the best TAR of any threshold whose false
accept rate does not exceed the target. No interpolation. Equivalently, with
``k = max{c : c / n_neg <= f}`` false accepts allowed and ``s_k`` the
(k+1)-th largest negative score, TAR = fraction of positives with score
``> s_k`` (TAR = 1 when k >= n_neg). So it equals

    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)
    tpr[fpr <= f].max()

exactly, and only the top ``k + 1`` negative scores are needed
(:func:`tar_at_far_from_top_negatives`), which is what lets the 1:N
identification keep a bounded running top-k over a billion impostor scores.

insightface's IJB script instead reads the ROC point whose FPR is *nearest*
to f (possibly above it) after ``roc_curve``'s default
``drop_intermediate=True``; :func:`tar_at_far_insightface` reproduces that
to compare with its tables. On large, tie-free score sets the two agree to
about 1 / n_pos.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def allowed_false_accepts(far: float, n_neg: int) -> int:
    """``max{c >= 0 : c / n_neg <= far}`` with the float64 division roc_curve uses."""
    if n_neg <= 0:
        raise ValueError("need at least one negative (impostor) score")
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"FAR must be in [0, 1], got {far}")
    k = min(int(np.floor(far * n_neg)), n_neg)
    while k < n_neg and (k + 1) / n_neg <= far:
        k += 1
    while k > 0 and k / n_neg > far:
        k -= 1
    return k


def _check_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contain NaN or inf")
    return scores


def _tar_from_order_stats(pos_scores: np.ndarray, neg_desc: dict[int, float], n_neg: int,
                          fars: Sequence[float]) -> dict[float, float]:
    """TAR per FAR given ``neg_desc[k]`` = the (k+1)-th largest negative score for each needed k."""
    pos = np.sort(pos_scores)
    if pos.size == 0:
        raise ValueError("need at least one genuine (positive) score")
    out = {}
    for far in fars:
        k = allowed_false_accepts(far, n_neg)
        if k >= n_neg:
            out[far] = 1.0
        else:
            accepted = pos.size - np.searchsorted(pos, neg_desc[k], side="right")
            out[far] = float(accepted) / pos.size
    return out


def tar_at_far_from_top_negatives(pos_scores: np.ndarray, top_neg_scores: np.ndarray,
                                  n_neg: int, fars: Sequence[float] = DEFAULT_FARS) -> dict[float, float]:
    """TAR @ FAR when only the largest negative scores are kept.

    Args:
      pos_scores: all genuine scores.
      top_neg_scores: the largest negative scores, at least
        ``allowed_false_accepts(max(fars), n_neg) + 1`` of them (or all),
        in any order.
      n_neg: the total number of negative scores.
    """
    pos = _check_scores(pos_scores, "genuine scores")
    top = -np.sort(-_check_scores(top_neg_scores, "impostor scores"))
    if top.size > n_neg:
        raise ValueError(f"{top.size} top impostor scores but n_neg={n_neg}")
    needed = {}
    for far in fars:
        k = allowed_false_accepts(far, n_neg)
        if k < n_neg:
            if k >= top.size:
                raise ValueError(f"FAR {far} needs the top {k + 1} impostor scores, only {top.size} kept")
            needed[k] = float(top[k])
    return _tar_from_order_stats(pos, needed, n_neg, fars)


def tar_at_far(scores: np.ndarray, labels: np.ndarray,
               fars: Sequence[float] = DEFAULT_FARS) -> dict[float, float]:
    """TAR at each FAR (module docstring rule) from scores and 0/1 labels."""
    scores = _check_scores(scores, "scores")
    labels = np.asarray(labels)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("labels must be 0/1 (or bool)")
    labels = labels.astype(bool)
    neg = scores[~labels]
    if neg.size == 0:
        raise ValueError("need at least one negative label")
    ks = sorted({allowed_false_accepts(f, neg.size) for f in fars} - {neg.size})
    needed: dict[int, float] = {}
    if ks:
        # The (k+1)-th largest of n values is the (n-1-k)-th smallest: one partial sort for all FARs.
        kth = [neg.size - 1 - k for k in ks]
        part = np.partition(neg, kth)
        needed = {k: float(part[i]) for k, i in zip(ks, kth)}
    return _tar_from_order_stats(scores[labels], needed, neg.size, fars)


def tar_at_far_insightface(scores: np.ndarray, labels: np.ndarray,
                           fars: Sequence[float] = DEFAULT_FARS) -> dict[float, float]:
    """insightface ``eval_ijbc.py``'s reading: the ROC point with FPR nearest to each FAR.

    ``roc_curve`` with its default ``drop_intermediate=True``; points reversed
    (largest threshold last); on equal distance the first point in that
    reversed order wins (the larger TPR at equal FPR).
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), _check_scores(scores, "scores"))
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {f: float(tpr[int(np.argmin(np.abs(fpr - f)))]) for f in fars}


def format_far(far: float) -> str:
    """1e-06 -> '1e-6' (metric-name friendly)."""
    mant, exp = f"{far:.0e}".split("e")
    return f"{mant}e{int(exp)}"
