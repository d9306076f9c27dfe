"""TAR @ FAR equals scikit-learn's roc_curve under the documented rule (max TPR with FPR <= FAR)."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from broadface_jax.evaluation import tar_far

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.5, 1.0)


def _sk_tar(scores, labels, far):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return tpr[fpr <= far].max()


def _random_scores(rng, n_pos, n_neg, decimals=None):
    pos = rng.normal(1.2, 1.0, n_pos)
    neg = rng.normal(0.0, 1.0, n_neg)
    scores = np.concatenate([pos, neg])
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties, also between classes
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    perm = rng.permutation(scores.size)
    return scores[perm], labels[perm]


@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("n_pos,n_neg", [(300, 20_000), (1000, 1000), (50, 123_457)])
def test_equals_sklearn_roc_curve(n_pos, n_neg, decimals):
    rng = np.random.default_rng()
    scores, labels = _random_scores(rng, n_pos, n_neg, decimals)
    got = tar_far.tar_at_far(scores, labels, FARS)
    for far in FARS:
        assert got[far] == _sk_tar(scores, labels, far), far


def test_exact_far_boundaries():
    # n_neg = 1000: FAR 1e-3 allows exactly one false accept (1/1000 <= 1e-3 in float64).
    rng = np.random.default_rng()
    scores, labels = _random_scores(rng, 200, 1000)
    assert tar_far.allowed_false_accepts(1e-3, 1000) == 1
    assert tar_far.allowed_false_accepts(0.3, 10) == 3
    assert tar_far.allowed_false_accepts(1.0, 7) == 7
    got = tar_far.tar_at_far(scores, labels, (1e-3, 2e-3, 0.3))
    for far, v in got.items():
        assert v == _sk_tar(scores, labels, far)


def test_from_top_negatives_needs_only_the_top_k():
    rng = np.random.default_rng()
    scores, labels = _random_scores(rng, 500, 200_000)
    pos, neg = scores[labels == 1], scores[labels == 0]
    fars = (1e-5, 1e-4, 1e-3)
    k = tar_far.allowed_false_accepts(max(fars), neg.size) + 1
    top = np.sort(neg)[-k:]
    rng.shuffle(top)
    got = tar_far.tar_at_far_from_top_negatives(pos, top, neg.size, fars)
    assert got == tar_far.tar_at_far(scores, labels, fars)
    with pytest.raises(ValueError, match="needs the top"):
        tar_far.tar_at_far_from_top_negatives(pos, top[: k - 1], neg.size, fars)


def test_insightface_nearest_point_rule():
    rng = np.random.default_rng()
    scores, labels = _random_scores(rng, 400, 50_000, decimals=3)
    fars = (1e-4, 1e-3, 1e-2, 1e-1)
    got = tar_far.tar_at_far_insightface(scores, labels, fars)
    # Reference: eval_ijbc.py's table loop, written out.
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    for far in fars:
        _, idx = min(zip(abs(fpr - far), range(len(fpr))))
        assert got[far] == tpr[idx]


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        tar_far.tar_at_far(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="0/1"):
        tar_far.tar_at_far(np.array([0.1, 0.2]), np.array([2, 0]))
    with pytest.raises(ValueError, match="negative"):
        tar_far.tar_at_far(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="positive"):
        tar_far.tar_at_far(np.array([0.1, 0.2]), np.array([0, 0]))
    assert tar_far.format_far(1e-6) == "1e-6" and tar_far.format_far(0.1) == "1e-1"
