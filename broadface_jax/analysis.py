"""What the BroadFace queue changes, measured directly (paper sections 3.2-3.3, 4.4).

Pure functions on arrays (NumPy in, Python floats / NumPy out), used by
``benchmarks/paper_analyses.py`` on checkpoints of real runs:

* :func:`classifier_top1` - the classifier's top-1 accuracy on the current
  embeddings of the whole training set: the "optimality on the entire
  dataset" the paper says a queue improves (section 3.2, step 3).
* :func:`center_alignment` - mean over classes of cos(W_y, mean of the
  L2-normalised current embeddings of class y): how well each
  identity-representative vector matches Eq. 3 (Ŵ_y = E[ê | y]).
* :func:`queue_coverage` - how many distinct classes the queue holds (each
  gets a positive-class gradient from the queue at the next step) and how
  many each enqueued batch brought.
* :func:`rows_at_lag` - the queue rows written ``lag`` steps ago (ring
  buffer layout of :mod:`broadface_jax.queue`).
* :func:`compensation_errors` - the Fig. 5a quantity: mean cosine error
  1 - cos(e, e⁻) between current and queued embeddings of the same images,
  stale and compensated by Eq. 7.

All cosines are computed in float64 (the inputs are small: a training set
of a few thousand embeddings, a queue of a few thousand rows).
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n < 1e-12, 1.0, n)


def _check_rows(emb: np.ndarray, kernel: np.ndarray, labels: np.ndarray,
                num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    emb, kernel, labels = np.asarray(emb), np.asarray(kernel), np.asarray(labels)
    if emb.ndim != 2 or kernel.ndim != 2 or emb.shape[1] != kernel.shape[1]:
        raise ValueError(f"embeddings {emb.shape} and classifier {kernel.shape} must be "
                         "[N, D] and [C, D] with the same D")
    if labels.shape != (emb.shape[0],):
        raise ValueError(f"labels {labels.shape} must be [N] for {emb.shape[0]} embeddings")
    if not 1 <= num_classes <= kernel.shape[0]:
        raise ValueError(f"num_classes={num_classes} must be in [1, {kernel.shape[0]}] "
                         "(the classifier's rows, padding included)")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return emb, kernel[:num_classes], labels.astype(np.int64)


def classifier_top1(emb: np.ndarray, kernel: np.ndarray, labels: np.ndarray,
                    num_classes: int) -> float:
    """Fraction of rows whose nearest classifier row (cosine, no margin) is their label.

    Args:
      emb: f[N, D] embeddings (not normalised).
      kernel: f[C_pad, D] classifier rows; rows >= ``num_classes`` are padding.
      labels: int[N] in [0, num_classes).
    """
    emb, kernel, labels = _check_rows(emb, kernel, labels, num_classes)
    pred = np.argmax(_unit(emb) @ _unit(kernel).T, axis=1)
    return float(np.mean(pred == labels))


def class_means(emb: np.ndarray, labels: np.ndarray, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(mean of the L2-normalised embeddings per class f64[C, D], count per class int[C])."""
    labels = np.asarray(labels, np.int64)
    unit = _unit(emb)
    sums = np.zeros((num_classes, unit.shape[1]), np.float64)
    np.add.at(sums, labels, unit)
    counts = np.bincount(labels, minlength=num_classes)
    return sums / np.maximum(counts, 1)[:, None], counts


def center_alignment(emb: np.ndarray, kernel: np.ndarray, labels: np.ndarray,
                     num_classes: int) -> float:
    """Mean over the classes present of cos(W_y, mean_i ê_i of class y)."""
    emb, kernel, labels = _check_rows(emb, kernel, labels, num_classes)
    means, counts = class_means(emb, labels, num_classes)
    present = counts > 0
    cos = np.sum(_unit(means[present]) * _unit(kernel[present]), axis=1)
    return float(np.mean(cos))


def queue_coverage(labels: np.ndarray, valid: np.ndarray, num_shards: int,
                   local_batch: int) -> dict[str, float]:
    """Distinct classes in the queue, overall and per enqueued step.

    The queue is ``num_shards`` ring buffers of ``Q / num_shards`` rows; one
    step writes ``local_batch`` rows at the same offset of every shard, so
    the rows of a step are that offset's slot in every shard.

    Returns:
      ``queue_rows`` (valid rows), ``queue_classes`` (distinct labels among
      them), ``queue_steps`` (steps held) and ``classes_per_step`` (mean
      distinct labels per held step, i.e. per global batch).
    """
    labels, valid = np.asarray(labels), np.asarray(valid, bool)
    q = labels.shape[0]
    if valid.shape != (q,):
        raise ValueError(f"valid {valid.shape} must match labels {labels.shape}")
    if q == 0:
        return dict(queue_rows=0.0, queue_classes=0.0, queue_steps=0.0, classes_per_step=0.0)
    if num_shards < 1 or q % num_shards or (q // num_shards) % local_batch:
        raise ValueError(f"queue of {q} rows is not {num_shards} shards of whole batches of "
                         f"{local_batch} rows")
    slots = (q // num_shards) // local_batch
    lab = labels.reshape(num_shards, slots, local_batch).transpose(1, 0, 2).reshape(slots, -1)
    val = valid.reshape(num_shards, slots, local_batch).transpose(1, 0, 2).reshape(slots, -1)
    per_step = [len(np.unique(lab[i][val[i]])) for i in range(slots) if val[i].any()]
    return dict(queue_rows=float(valid.sum()),
                queue_classes=float(len(np.unique(labels[valid]))),
                queue_steps=float(len(per_step)),
                classes_per_step=float(np.mean(per_step)) if per_step else 0.0)


def rows_at_lag(position: int, shard_capacity: int, num_shards: int, local_batch: int,
                lag: int) -> np.ndarray:
    """Global indices of the queue rows written ``lag`` steps ago (lag 1 = the last write).

    The ring buffer of each shard is written at ``position`` and advances by
    ``local_batch`` (:func:`broadface_jax.queue.enqueue`), so the write of
    ``lag`` steps ago starts at ``position - lag * local_batch`` (mod the
    shard capacity). Rows are ordered shard by shard, i.e. as the global batch
    of that step was laid out.
    """
    if lag < 1 or lag * local_batch > shard_capacity:
        raise ValueError(f"lag {lag} outside [1, {shard_capacity // max(local_batch, 1)}] "
                         f"(a shard holds {shard_capacity} rows of {local_batch} per step)")
    start = (int(position) - lag * local_batch) % shard_capacity
    offs = start + np.arange(local_batch)
    return (np.arange(num_shards)[:, None] * shard_capacity + offs[None, :]).reshape(-1)


def compensate64(stale: np.ndarray, w_old: np.ndarray, w_cur: np.ndarray) -> np.ndarray:
    """Eq. 7 in float64: e* = e⁻ + ‖e⁻‖ / ‖W⁻‖ · (W − W⁻), row by row."""
    stale, w_old, w_cur = (np.asarray(x, np.float64) for x in (stale, w_old, w_cur))
    scale = (np.linalg.norm(stale, axis=1, keepdims=True)
             / np.maximum(np.linalg.norm(w_old, axis=1, keepdims=True), 1e-12))
    return stale + scale * (w_cur - w_old)


def compensation_errors(current: np.ndarray, stale: np.ndarray, w_old: np.ndarray,
                        w_cur: np.ndarray) -> dict[str, float]:
    """Mean cosine errors 1 - cos(e, ·) of the stale and the compensated embeddings.

    Args:
      current: e, f[N, D] the current embeddings of the queued images.
      stale: e⁻, f[N, D] the embeddings stored in the queue.
      w_old: W⁻_y, f[N, D] the classifier rows stored with them.
      w_cur: W_y, f[N, D] the current classifier rows of the same labels.

    Returns:
      ``stale`` and ``compensated`` mean errors, and ``drift_w`` = mean
      1 - cos(W⁻_y, W_y) (how far the classifier moved meanwhile).
    """
    shapes = {np.shape(x) for x in (current, stale, w_old, w_cur)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"current, stale, w_old, w_cur must all be [N, D]; got shapes "
                         f"{[np.shape(x) for x in (current, stale, w_old, w_cur)]}")
    e = _unit(current)

    def err(x):
        return float(np.mean(1.0 - np.sum(e * _unit(x), axis=1)))

    return dict(stale=err(stale), compensated=err(compensate64(stale, w_old, w_cur)),
                drift_w=float(np.mean(1.0 - np.sum(_unit(w_old) * _unit(w_cur), axis=1))))


def paired_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95
                    ) -> dict[str, float]:
    """Mean of the paired differences a - b over seeds with a t-distribution interval.

    Returns ``diff`` (mean difference), ``lo`` / ``hi`` (the two-sided
    ``confidence`` interval, ``nan`` with fewer than 2 pairs), ``n`` and
    ``sd`` (sample std of the differences, ddof 1).
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples must be equal-length vectors, got {a.shape}, {b.shape}")
    d = a - b
    n = d.size
    if n == 0:
        raise ValueError("no pairs")
    mean = float(d.mean())
    if n < 2:
        return dict(diff=mean, lo=float("nan"), hi=float("nan"), n=1.0, sd=float("nan"))
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
    return dict(diff=mean, lo=mean - half, hi=mean + half, n=float(n), sd=sd)


# ------------------------------------------------------------------ the regime (issue 18)
# BroadFace matters when a class's classifier row goes stale between two visits of
# that class by the batch. These measure it: the embedding's rotation θ(k) over k
# steps, the steps between visits T_visit, S = θ(T_visit) / m, the classifier's
# staleness against the steps since the class's last visit, and what a per-class
# shift of the queued embeddings could at best recover (the oracle of Eq. 7).


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise angle (radians, float64) between a[i] and b[i]; f[N, D] each."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"angles needs two [N, D] arrays of one shape, got {a.shape}, {b.shape}")
    cos = np.sum(_unit(a) * _unit(b), axis=1)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def theta(now: np.ndarray, before: np.ndarray) -> dict[str, float]:
    """θ(k): mean angle (radians and degrees) and mean 1 - cos between each image's
    embedding now and k steps before (the same images, same order, same mode)."""
    ang = angles(now, before)
    return dict(rad=float(ang.mean()), deg=float(np.degrees(ang.mean())),
                one_minus_cos=float(np.mean(1.0 - np.cos(ang))))


def visit_steps(step_labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Steps (1-based) at which each class is in the batch: one int array per class.

    Args:
      step_labels: int[T, B], the labels of training steps 1..T (row t-1 is step t).
    """
    step_labels = np.asarray(step_labels)
    if step_labels.ndim != 2:
        raise ValueError(f"step_labels must be [T, B], got shape {step_labels.shape}")
    if step_labels.size and (step_labels.min() < 0 or step_labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got "
                         f"[{step_labels.min()}, {step_labels.max()}]")
    t_idx = np.repeat(np.arange(1, step_labels.shape[0] + 1), step_labels.shape[1])
    lab = step_labels.reshape(-1)
    order = np.lexsort((t_idx, lab))
    lab, t_idx = lab[order], t_idx[order]
    out = []
    bounds = np.searchsorted(lab, np.arange(num_classes + 1))
    for c in range(num_classes):
        out.append(np.unique(t_idx[bounds[c]:bounds[c + 1]]))
    return out


def visit_intervals(step_labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """T_visit: steps between two batch visits of a class.

    Per class, the mean gap between consecutive steps that hold the class
    (classes seen at most once in the window have no gap). Returns the mean
    over all gaps (``mean_gap``: ≈ C / B), the median over classes of the
    per-class mean gap (``median_class``), the expected C / B
    (``classes_per_batch_ratio``: num_classes / batch), the number of classes
    with a gap (``classes_with_gap``) and those never in a batch (``never``).
    """
    visits = visit_steps(step_labels, num_classes)
    gaps = [np.diff(v) for v in visits if v.size >= 2]
    all_gaps = np.concatenate(gaps) if gaps else np.zeros(0)
    per_class = np.array([g.mean() for g in gaps]) if gaps else np.zeros(0)
    return dict(mean_gap=float(all_gaps.mean()) if all_gaps.size else float("nan"),
                median_class=float(np.median(per_class)) if per_class.size else float("nan"),
                classes_per_batch_ratio=float(num_classes / np.asarray(step_labels).shape[1]),
                classes_with_gap=float(len(gaps)),
                never=float(sum(v.size == 0 for v in visits)))


def steps_since_visit(step_labels: np.ndarray, num_classes: int, step: int) -> np.ndarray:
    """For each class, ``step`` minus the last step <= ``step`` that held it (0 = in the
    batch of ``step`` itself); -1 for a class not in any of steps 1..``step``."""
    step_labels = np.asarray(step_labels)
    if not 0 <= step <= step_labels.shape[0]:
        raise ValueError(f"step {step} outside the {step_labels.shape[0]} steps given")
    out = np.full(num_classes, -1, np.int64)
    for c, v in enumerate(visit_steps(step_labels[:step], num_classes)):
        if v.size:
            out[c] = step - v[-1]
    return out


def class_staleness(emb: np.ndarray, kernel: np.ndarray, labels: np.ndarray,
                    num_classes: int) -> np.ndarray:
    """Per class, angle (radians) between W_c and the mean of class c's L2-normalised
    current embeddings; nan for a class with no embedding. f64[C]."""
    emb, kernel, labels = _check_rows(emb, kernel, labels, num_classes)
    means, counts = class_means(emb, labels, num_classes)
    out = np.full(num_classes, np.nan)
    present = counts > 0
    out[present] = angles(means[present], kernel[present])
    return out


def staleness_by_visit(stale: np.ndarray, since: np.ndarray,
                       edges: tuple[int, ...] = (0, 8, 32, 64, 128, 256)) -> list[dict[str, float]]:
    """Mean staleness (degrees) of the classes per bin of steps since their last visit.

    Bins are [edges[i], edges[i+1]) and [edges[-1], ∞); classes never visited
    (``since`` < 0) and without embeddings (nan) are left out.
    """
    stale, since = np.asarray(stale, np.float64), np.asarray(since)
    out = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        sel = (since >= lo) & np.isfinite(stale) & (since >= 0)
        if hi is not None:
            sel &= since < hi
        out.append(dict(lo=float(lo), hi=float("inf") if hi is None else float(hi),
                        classes=float(sel.sum()),
                        deg=float(np.degrees(stale[sel].mean())) if sel.any() else float("nan")))
    return out


def staleness_slope(stale: np.ndarray, since: np.ndarray) -> dict[str, float]:
    """Least-squares slope of staleness (degrees) on steps since the last visit, over the
    visited classes, and the Spearman rank correlation (does staleness grow with time?)."""
    from scipy import stats

    stale, since = np.asarray(stale, np.float64), np.asarray(since, np.float64)
    sel = (since >= 0) & np.isfinite(stale)
    x, y = since[sel], np.degrees(stale[sel])
    if x.size < 3 or np.ptp(x) == 0:
        return dict(slope_deg_per_100_steps=float("nan"), spearman=float("nan"), n=float(x.size))
    slope = np.polyfit(x, y, 1)[0]
    return dict(slope_deg_per_100_steps=float(100 * slope),
                spearman=float(stats.spearmanr(x, y).statistic), n=float(x.size))


def compensate_normalized64(stale: np.ndarray, w_old: np.ndarray, w_cur: np.ndarray
                            ) -> np.ndarray:
    """Eq. 7 with unit classifier rows: e* = e⁻ + ‖e⁻‖ · (Ŵ − Ŵ⁻), float64."""
    stale = np.asarray(stale, np.float64)
    return stale + np.linalg.norm(stale, axis=1, keepdims=True) * (_unit(w_cur) - _unit(w_old))


def oracle_shift64(current: np.ndarray, stale: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The best per-class shift the data allow, leave-one-out, float64.

    Like Eq. 7, a shift shared by the class: ê* = ê⁻_i + d_y with d_y the
    mean of (ê_j − ê⁻_j) over the *other* images j of class y (the
    least-squares shift of unit vectors, estimated without image i, so a
    class's only image gets no shift). Returns the unit-scale compensated
    embeddings f64[N, D].
    """
    cur, old = _unit(current), _unit(stale)
    labels = np.asarray(labels, np.int64)
    if cur.shape != old.shape or labels.shape != (cur.shape[0],):
        raise ValueError(f"current {cur.shape}, stale {old.shape}, labels {labels.shape} "
                         "must be [N, D], [N, D], [N]")
    n_cls = int(labels.max()) + 1 if labels.size else 0
    diff = cur - old
    sums = np.zeros((n_cls, cur.shape[1]))
    np.add.at(sums, labels, diff)
    counts = np.bincount(labels, minlength=n_cls)
    others = (counts[labels] - 1)[:, None]
    loo = (sums[labels] - diff) / np.maximum(others, 1)
    return old + np.where(others > 0, loo, 0.0)


def regime_errors(current: np.ndarray, stale: np.ndarray, w_old: np.ndarray,
                  w_cur: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean 1 - cos(e, ·) of the stale e⁻, Eq. 7, Eq. 7 with unit W, and the oracle shift.

    Rows are images; ``w_old`` / ``w_cur`` are their classes' rows then and now.
    """
    e = _unit(current)

    def err(x):
        return float(np.mean(1.0 - np.sum(e * _unit(x), axis=1)))

    return dict(stale=err(stale), eq7=err(compensate64(stale, w_old, w_cur)),
                eq7_unit_w=err(compensate_normalized64(stale, w_old, w_cur)),
                oracle=err(oracle_shift64(current, stale, labels)))


def paper_rotation_estimate(lr: float, weight_decay: float, momentum: float, steps: float,
                            margin: float) -> dict[str, float]:
    """The equilibrium angular update per step of a scale-invariant (BN-followed) weight
    under SGD + momentum + weight decay, √(2ηλ / (1 + μ)) radians, and what it gives over
    ``steps``: coherent (``steps`` × per step, an upper bound) and random-walk
    (√steps × per step), each also as S = angle / margin."""
    per_step = float(np.sqrt(2.0 * lr * weight_decay / (1.0 + momentum)))
    coherent, walk = per_step * steps, per_step * np.sqrt(steps)
    return dict(per_step_rad=per_step, coherent_rad=coherent, random_walk_rad=float(walk),
                s_coherent=coherent / margin, s_random_walk=float(walk / margin))
