"""Pair verification, 10-fold, as insightface ``arcface_torch/eval/verification.py``.

Protocol (identical to insightface's ``evaluate`` / ``calculate_roc`` /
``calculate_val``):

1. Each image's embedding is ``e(x) + e(flip(x))``, L2-normalised (the caller
   or :func:`evaluate_embeddings` normalises).
2. Pair distance: squared L2 distance of the two normalised embeddings
   (in [0, 4]). A pair is predicted "same" when ``dist < threshold``.
3. Accuracy: thresholds ``np.arange(0, 4, 0.01)``; for each fold the threshold
   with the best accuracy on the other 9 folds (first one on ties, as
   ``np.argmax``) is applied to this fold. Reported: mean and std (population,
   ``np.std``) of the 10 fold accuracies, and the mean chosen threshold.
4. VAL @ FAR = 1e-3: thresholds ``np.arange(0, 4, 0.001)``; on the 9 training
   folds the FAR of each threshold is computed and the threshold reaching the
   target FAR is interpolated linearly (insightface's
   ``interp1d(far_train, thresholds, kind='slinear')``, see
   :func:`threshold_at_far` for the exact rule with repeated FAR values);
   VAL and FAR of that threshold on the held-out fold, mean over folds.
   When no training threshold reaches the target FAR, the threshold is 0.
5. The ROC curve is the mean over folds of the held-out folds' (FPR, TPR) at
   each accuracy threshold.

Folds: insightface uses ``KFold(n_splits=10, shuffle=False)`` over the pairs
in file order (:func:`kfold_ids`). Protocols with official folds (CFP, LFW
View 2) pass their fold ids instead; for LFW View 2 files and insightface
``.bin`` files the two coincide. VAL @ FAR needs a same and a different pair
in every held-out fold (and a different pair in the training folds); a
``.bin`` too small or too unevenly ordered for KFold(10) to give that gets
balanced folds instead (:func:`bin_fold_ids`, the rule and why).

Counting is vectorised (``np.searchsorted`` on sorted distances) instead of
insightface's loop over thresholds; the counts are the same integers.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from broadface_jax.evaluation.common import l2_normalize
from broadface_jax.evaluation.tar_far import format_far

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
DEFAULT_FAR_TARGET = 1e-3


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """Results of the 10-fold protocol (arrays are per fold or per threshold)."""

    accuracy: float
    accuracy_std: float
    best_threshold: float
    val: float
    val_std: float
    far: float
    far_target: float
    fold_accuracy: np.ndarray
    fold_threshold: np.ndarray
    tpr: np.ndarray
    fpr: np.ndarray
    num_pairs: int

    def metrics(self) -> dict[str, float]:
        """Scalar metrics, insightface's names where it has them."""
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.best_threshold,
            f"val@far={format_far(self.far_target)}": self.val,
            "val_std": self.val_std,
            "far": self.far,
        }


def kfold_ids(num_pairs: int, nfolds: int = 10) -> np.ndarray:
    """Fold id of each pair under ``sklearn.model_selection.KFold(nfolds, shuffle=False)``."""
    from sklearn.model_selection import KFold

    if num_pairs < nfolds:
        raise ValueError(f"{num_pairs} pairs cannot be split into {nfolds} folds")
    folds = np.empty(num_pairs, np.int64)
    for fold, (_, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(np.arange(num_pairs))):
        folds[test] = fold
    return folds


def balanced_fold_ids(issame: np.ndarray, nfolds: int = 10) -> np.ndarray:
    """Folds with the same share of positive and negative pairs each.

    The positives (in order) are cut into ``nfolds`` contiguous nearly equal
    blocks, and so are the negatives; block f of each forms fold f. This is
    how LFW View 2 lays out its folds, and what a list given as "all same
    pairs, then all different pairs" (LFW View 1) needs: plain KFold over such
    a list would give folds holding one class only.
    """
    issame = np.asarray(issame, bool)
    folds = np.empty(issame.shape[0], np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(issame == cls)
        if idx.size < nfolds:
            raise ValueError(
                f"only {idx.size} {'same' if cls else 'different'} pairs: "
                f"cannot make {nfolds} folds with both kinds in each")
        folds[idx] = np.arange(idx.size) * nfolds // idx.size
    return folds


def bin_fold_ids(issame: np.ndarray, nfolds: int = 10, source: str = "") -> np.ndarray:
    """Folds for pairs in file order (a ``.bin``): insightface's KFold if it works, else balanced.

    The rule:

    1. KFold(``nfolds``) in file order (:func:`kfold_ids`), exactly as
       insightface, when every fold it makes holds at least one same and one
       different pair. The published files (lfw, cfp_fp, agedb_30, ...: blocks
       of 300 or 350 same then different pairs) always get these folds, so
       their numbers stay comparable with insightface's.
    2. Otherwise (a small file such as 10 pairs, where KFold(10) gives one pair
       per fold, or a file sorted by class), :func:`balanced_fold_ids` with
       ``k = min(nfolds, #same, #different)`` folds: each fold holds a share of
       both kinds, so VAL @ FAR has a threshold to train (different pairs in
       the other folds) and a same and a different pair to test on. insightface
       itself would divide by zero there (VAL / FAR of NaN, or a crash). A
       warning says which folds were used; with fewer than 10 folds accuracy
       and VAL are averaged over ``k`` folds, so they are noisier and not
       comparable with 10-fold numbers.
    3. Fewer than 2 same or 2 different pairs: no held-out fold can be paired
       with a training set holding both kinds; :class:`ValueError` naming
       ``source`` and the counts.
    """
    issame = np.asarray(issame, bool)
    n_same, n_diff = int(np.sum(issame)), int(np.sum(~issame))
    where = f"{source}: " if source else ""
    if min(n_same, n_diff) < 2:
        raise ValueError(
            f"{where}{n_same} same and {n_diff} different pairs: the verification protocol needs at "
            f"least 2 of each (cross-validation needs >= 2 folds, each holding a same and a "
            f"different pair; folds are KFold({nfolds}) in file order, else balanced folds)")
    if issame.shape[0] >= nfolds:
        folds = kfold_ids(issame.shape[0], nfolds)
        same_per_fold = np.bincount(folds, weights=issame, minlength=nfolds)
        diff_per_fold = np.bincount(folds, weights=~issame, minlength=nfolds)
        if np.all(same_per_fold > 0) and np.all(diff_per_fold > 0):
            return folds
        bad = int(np.flatnonzero((same_per_fold == 0) | (diff_per_fold == 0))[0])
        why = (f"KFold({nfolds}) in file order leaves fold {bad} with "
               f"{int(same_per_fold[bad])} same / {int(diff_per_fold[bad])} different pairs")
    else:
        why = f"{issame.shape[0]} pairs cannot make {nfolds} KFold folds"
    k = min(nfolds, n_same, n_diff)
    logging.warning("%s%s; using %d balanced folds instead (each holds same and different pairs; "
                    "%d same, %d different in all). With fewer pairs or folds than the published "
                    "files, accuracy and VAL are not comparable with insightface's 10-fold numbers.",
                    where, why, k, n_same, n_diff)
    return balanced_fold_ids(issame, k)


def squared_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared L2 distance between paired rows, float64."""
    emb1 = np.asarray(emb1, np.float64)
    emb2 = np.asarray(emb2, np.float64)
    if emb1.shape != emb2.shape or emb1.ndim != 2:
        raise ValueError(f"paired embeddings must both be [N, D], got {emb1.shape} and {emb2.shape}")
    return np.sum(np.square(emb1 - emb2), axis=1)


def _count_less(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: how many values are < t (values sorted ascending)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold insightface's ``calculate_val`` interpolates for ``far_target``.

    ``far`` is nondecreasing in ``thresholds`` (FAR of ``dist < t``). The
    rule is that of ``scipy.interpolate.interp1d(far, thresholds,
    kind='slinear')`` as it behaved when insightface wrote the code (SciPy <=
    1.8; newer SciPy refuses repeated x values): with i the last index where
    ``far[i] <= far_target``, interpolate linearly between points i and i+1.
    If no FAR reaches the target, 0. If the target equals the largest FAR,
    the threshold of its last occurrence.
    """
    far = np.asarray(far, np.float64)
    if far.max() < far_target:
        return 0.0
    i = int(np.searchsorted(far, far_target, side="right")) - 1
    if i < 0:  # far[0] > target: SciPy would refuse (below the range); insightface's far[0] is 0.
        raise ValueError(f"FAR at the smallest threshold ({far[0]}) is above the target {far_target}")
    if i == far.shape[0] - 1:
        return float(thresholds[i])
    x0, x1 = far[i], far[i + 1]
    y0, y1 = float(thresholds[i]), float(thresholds[i + 1])
    return y0 + (far_target - x0) * (y1 - y0) / (x1 - x0)


def evaluate_distances(dist: np.ndarray, issame: np.ndarray, folds: np.ndarray | None = None,
                       nfolds: int = 10, far_target: float = DEFAULT_FAR_TARGET) -> VerificationResult:
    """The 10-fold protocol on precomputed squared distances.

    Args:
      dist: f[N] squared L2 distances of normalised embeddings.
      issame: bool[N] ground truth.
      folds: int[N] fold id of each pair (official folds); default
        :func:`kfold_ids` (insightface's KFold without shuffling).
      nfolds: number of folds when ``folds`` is None.
      far_target: the FAR at which VAL is reported.
    """
    dist = np.asarray(dist, np.float64)
    issame = np.asarray(issame)
    if issame.dtype != bool:
        if not np.all(np.isin(issame, (0, 1))):
            raise ValueError("issame must hold booleans (or 0/1)")
        issame = issame.astype(bool)
    if dist.ndim != 1 or dist.shape != issame.shape:
        raise ValueError(f"dist {dist.shape} and issame {issame.shape} must be equal-length vectors")
    if not np.all(np.isfinite(dist)):
        raise ValueError("distances contain NaN or inf")
    folds = kfold_ids(dist.shape[0], nfolds) if folds is None else np.asarray(folds)
    if folds.shape != dist.shape:
        raise ValueError(f"folds {folds.shape} must match the {dist.shape[0]} pairs")
    fold_values = np.unique(folds)
    if fold_values.size < 2:
        raise ValueError("need at least 2 folds")

    n_acc = ACC_THRESHOLDS.shape[0]
    fold_acc = np.zeros(fold_values.size)
    fold_thr = np.zeros(fold_values.size)
    tprs = np.zeros((fold_values.size, n_acc))
    fprs = np.zeros((fold_values.size, n_acc))
    vals = np.zeros(fold_values.size)
    fars = np.zeros(fold_values.size)

    for k, fold in enumerate(fold_values):
        test = folds == fold
        train = ~test
        # --- accuracy (calculate_roc)
        tr_same = np.sort(dist[train & issame])
        tr_diff = np.sort(dist[train & ~issame])
        tp = _count_less(tr_same, ACC_THRESHOLDS)
        fp = _count_less(tr_diff, ACC_THRESHOLDS)
        acc_train = (tp + (tr_diff.size - fp)) / (tr_same.size + tr_diff.size)
        best = int(np.argmax(acc_train))
        te_same = np.sort(dist[test & issame])
        te_diff = np.sort(dist[test & ~issame])
        tp = _count_less(te_same, ACC_THRESHOLDS)
        fp = _count_less(te_diff, ACC_THRESHOLDS)
        tprs[k] = tp / te_same.size if te_same.size else 0.0
        fprs[k] = fp / te_diff.size if te_diff.size else 0.0
        fold_acc[k] = (tp[best] + te_diff.size - fp[best]) / (te_same.size + te_diff.size)
        fold_thr[k] = ACC_THRESHOLDS[best]
        # --- VAL @ FAR (calculate_val)
        if tr_diff.size == 0 or te_same.size == 0 or te_diff.size == 0:
            raise ValueError(
                f"fold {fold}: VAL@FAR needs different pairs in the training folds and both "
                f"kinds in the held-out fold (train diff={tr_diff.size}, test same={te_same.size}, "
                f"test diff={te_diff.size}); use balanced folds (balanced_fold_ids, or "
                f"bin_fold_ids for pairs in file order)")
        far_train = _count_less(tr_diff, VAL_THRESHOLDS) / tr_diff.size
        threshold = threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
        vals[k] = np.sum(te_same < threshold) / te_same.size
        fars[k] = np.sum(te_diff < threshold) / te_diff.size

    return VerificationResult(
        accuracy=float(np.mean(fold_acc)), accuracy_std=float(np.std(fold_acc)),
        best_threshold=float(np.mean(fold_thr)), val=float(np.mean(vals)),
        val_std=float(np.std(vals)), far=float(np.mean(fars)), far_target=far_target,
        fold_accuracy=fold_acc, fold_threshold=fold_thr, tpr=np.mean(tprs, 0),
        fpr=np.mean(fprs, 0), num_pairs=int(dist.shape[0]))


def evaluate_embeddings(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray,
                        folds: np.ndarray | None = None, nfolds: int = 10,
                        far_target: float = DEFAULT_FAR_TARGET) -> VerificationResult:
    """L2-normalises paired embeddings (float64) and runs :func:`evaluate_distances`."""
    emb1 = l2_normalize(np.asarray(emb1, np.float64))
    emb2 = l2_normalize(np.asarray(emb2, np.float64))
    return evaluate_distances(squared_distances(emb1, emb2), issame, folds, nfolds, far_target)



def plot_roc(result: VerificationResult, path: str | os.PathLike, title: str) -> str:
    """Writes the mean held-out ROC curve as a PNG (matplotlib, Agg backend); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        ax.plot(result.fpr, result.tpr, lw=1.5,
                label=f"acc {result.accuracy:.4f} ± {result.accuracy_std:.4f}")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("False accept rate")
        ax.set_ylabel("True accept rate")
        ax.set_title(title)
        ax.grid(True, which="both", ls=":", lw=0.5)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return str(path)
