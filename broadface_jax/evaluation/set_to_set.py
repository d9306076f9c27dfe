"""Set-to-set verification (YouTube Faces style: a set = the frames of a video).

A set's feature is the mean of its members' L2-normalised features (frames
flip-summed by the caller); set pairs then go through exactly the 10-fold
pair protocol of :mod:`broadface_jax.evaluation.verification` (which
L2-normalises the set means and thresholds squared L2 distances). YTF's
``splits.txt`` gives 10 official folds of 500 pairs: pass them as ``folds``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from broadface_jax.evaluation import verification
from broadface_jax.evaluation.common import l2_normalize


def set_features(feats: np.ndarray, set_ids: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique set ids, f64[S, D] mean of the L2-normalised member features)."""
    feats = np.asarray(feats, np.float64)
    set_ids = np.asarray(set_ids)
    if feats.ndim != 2 or set_ids.shape != (feats.shape[0],):
        raise ValueError(f"feats {feats.shape} must be [N, D] with one set id per row (got {set_ids.shape})")
    unique, inverse = np.unique(set_ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((unique.shape[0], feats.shape[1]))
    np.add.at(sums, inverse, l2_normalize(feats))
    counts = np.bincount(inverse, minlength=unique.shape[0])
    return unique, sums / counts[:, None]


def evaluate_set_pairs(feats: np.ndarray, set_ids: Sequence | np.ndarray,
                       pairs_a: Sequence | np.ndarray, pairs_b: Sequence | np.ndarray,
                       issame: np.ndarray, folds: np.ndarray | None = None, nfolds: int = 10,
                       far_target: float = verification.DEFAULT_FAR_TARGET) -> verification.VerificationResult:
    """10-fold verification of set pairs ``(pairs_a[i], pairs_b[i])`` given as set ids."""
    unique, means = set_features(feats, set_ids)

    def rows(ids) -> np.ndarray:
        ids = np.asarray(ids)
        idx = np.minimum(np.searchsorted(unique, ids), unique.shape[0] - 1)
        missing = unique[idx] != ids
        if np.any(missing):
            raise ValueError(f"set id {ids[missing][0]!r} of the pair list has no features")
        return idx

    return verification.evaluate_embeddings(means[rows(pairs_a)], means[rows(pairs_b)], issame,
                                            folds, nfolds, far_target)
