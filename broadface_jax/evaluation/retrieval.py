"""Recall@K for image retrieval (the metric of the BroadFace paper's SOP / In-Shop tables).

Recall@K = the fraction of queries with at least one item of their own
class among their K nearest gallery items (cosine similarity of
L2-normalised features).

* SOP style (Stanford Online Products, also CUB / Cars): ``gallery=None``,
  every item queries all the *other* items (itself excluded).
* In-Shop style: a query set against a separate gallery set.

Computed without sorting: a query's best same-class item ranks at position
``1 + #{other-class items scoring >= it}`` (ties counted against the
query: conservative), so Recall@K is the fraction of queries for which that
count is below K. Queries are processed in chunks of ``chunk_size`` rows, so
memory is ``chunk_size x gallery size`` scores. A query with no same-class
item in the gallery counts as a miss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from broadface_jax.evaluation.common import l2_normalize

DEFAULT_KS = (1, 10, 100, 1000)


def recall_at_k(query_feats: np.ndarray, query_labels: np.ndarray,
                gallery_feats: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024) -> dict[int, float]:
    """``{K: Recall@K}`` (module docstring); SOP style when no gallery is given."""
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    queries = l2_normalize(np.asarray(query_feats, np.float32))
    query_labels = np.asarray(query_labels)
    if query_labels.shape != (queries.shape[0],):
        raise ValueError(f"query_labels {query_labels.shape} must give one label per query ({queries.shape[0]})")
    same_set = gallery_feats is None
    if same_set:
        gallery, gallery_labels = queries, query_labels
    else:
        gallery = l2_normalize(np.asarray(gallery_feats, np.float32))
        gallery_labels = np.asarray(gallery_labels)
        if gallery_labels.shape != (gallery.shape[0],):
            raise ValueError(f"gallery_labels {gallery_labels.shape} must give one label per gallery row")
        if gallery.shape[1] != queries.shape[1]:
            raise ValueError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    if not (np.all(np.isfinite(queries)) and np.all(np.isfinite(gallery))):
        raise ValueError("features hold NaN or inf")
    rank_above = np.empty(queries.shape[0], np.int64)  # other-class items scoring >= the best match
    for start in range(0, queries.shape[0], chunk_size):
        s = queries[start:start + chunk_size] @ gallery.T
        rows = np.arange(s.shape[0])
        same = query_labels[start:start + chunk_size, None] == gallery_labels[None, :]
        if same_set:
            s[rows, start + rows] = -np.inf  # exclude the query itself
            same[rows, start + rows] = False
        best = np.where(same, s, -np.inf).max(axis=1)
        above = np.sum((s >= best[:, None]) & ~same, axis=1)
        above[best == -np.inf] = np.iinfo(np.int64).max  # no same-class item: a miss at every K
        rank_above[start:start + s.shape[0]] = above
    return {k: float(np.mean(rank_above < k)) for k in ks}
