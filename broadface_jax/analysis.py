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
