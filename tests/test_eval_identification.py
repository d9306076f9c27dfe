"""1:N identification (MegaFace style) and Recall@K vs brute-force NumPy on small random data.

Chunk sizes are smaller than the data so the running top-k / chunking paths
are exercised. Inputs are redrawn if some decision is closer than 1e-6 to a
tie (float32 chunked scores vs float64 reference could then disagree).
"""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from broadface_jax.evaluation import identification, retrieval


def _unit64(x):
    x = np.asarray(x, np.float32)  # the implementation normalises float32 input
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float64)


def _megaface_data(rng, n_ids=8, per_id=5, n_dist=900, dim=16):
    centers = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    probes = centers[labels] + 0.5 * rng.normal(size=(labels.size, dim))
    # Distractors: mostly random, some near identity centres so rank-1 is imperfect.
    dist = rng.normal(size=(n_dist, dim))
    near = rng.integers(0, n_ids, n_dist // 6)
    dist[: near.size] = centers[near] + 0.8 * rng.normal(size=(near.size, dim))
    return probes.astype(np.float32), labels, dist.astype(np.float32)


def _ref_megaface(probes, labels, dist, ranks, fars):
    p, d = _unit64(probes), _unit64(dist)
    s_pp, s_pd = p @ p.T, p @ d.T
    genuine, margins = [], []
    rank_hits = {r: [] for r in ranks}
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j and labels[i] == labels[j]:
                g = s_pp[i, j]
                genuine.append(g)
                n_above = int(np.sum(s_pd[i] >= g))
                for r in ranks:
                    rank_hits[r].append(n_above < r)
                margins.append(np.min(np.abs(s_pd[i] - g)))
    genuine = np.array(genuine)
    scores = np.concatenate([genuine, s_pd.ravel()])
    lab = np.r_[np.ones(genuine.size, int), np.zeros(s_pd.size, int)]
    fpr, tpr, thr = roc_curve(lab, scores, drop_intermediate=False)
    tars = {f: tpr[fpr <= f].max() for f in fars}
    imp_sorted = np.sort(s_pd.ravel())[::-1]
    for f in fars:  # margin of genuine scores to the thresholds used
        k = int(np.floor(f * s_pd.size))
        margins.append(np.min(np.abs(genuine - imp_sorted[min(k, imp_sorted.size - 1)])))
    return {r: np.mean(h) for r, h in rank_hits.items()}, tars, min(margins), genuine.size


def _draw_unambiguous(make, ref):
    rng = np.random.default_rng()
    for _ in range(10):
        data = make(rng)
        out = ref(*data)
        if out[-2] > 1e-6:
            return data, out
    raise AssertionError("could not draw tie-free data")


def test_megaface_matches_brute_force_array_and_stream():
    ranks, fars = (1, 3, 10), (1e-4, 1e-3, 1e-2)
    (probes, labels, dist), (ref_rank, ref_tar, _, n_gen) = _draw_unambiguous(
        _megaface_data, lambda p, l, d: _ref_megaface(p, l, d, ranks, fars))
    assert 0.1 < ref_rank[1] < 0.95  # planted: neither trivial nor hopeless
    res = identification.megaface_identification(probes, labels, dist, ranks=ranks, fars=fars, chunk_size=64)
    assert res.num_genuine == n_gen and res.num_distractors == dist.shape[0]
    for r in ranks:
        assert res.rank_accuracy[r] == ref_rank[r]
    for f in fars:
        assert res.tar[f] == ref_tar[f]
    # The same from a generator of uneven chunks, as a seeded distractor stream would give.
    stream = (dist[a:b] for a, b in [(0, 100), (100, 101), (101, 650), (650, 900)])
    res2 = identification.megaface_identification(probes, labels, stream, num_distractors=900,
                                                  ranks=ranks, fars=fars, chunk_size=128)
    assert res2.rank_accuracy == res.rank_accuracy and res2.tar == res.tar
    assert set(res.metrics()) == {"rank1", "rank3", "rank10", "tar@far=1e-4", "tar@far=1e-3", "tar@far=1e-2"}


def test_megaface_separate_gallery_and_rank1_fast_path():
    rng = np.random.default_rng()
    probes, labels, dist = _megaface_data(rng)
    gallery = probes[::5] + 0.05 * rng.normal(size=probes[::5].shape).astype(np.float32)
    g_labels = labels[::5]
    res = identification.megaface_identification(probes, labels, dist, gallery_feats=gallery,
                                                  gallery_labels=g_labels, ranks=(1,), fars=(1e-3,),
                                                  chunk_size=50)
    p, g, d = _unit64(probes), _unit64(gallery), _unit64(dist)
    hits = []
    for i in range(len(p)):
        j = int(np.flatnonzero(g_labels == labels[i])[0])
        hits.append(np.sum(p[i] @ d.T >= p[i] @ g[j]) < 1)
    assert res.num_genuine == len(p)  # one gallery image per identity, self pairs allowed
    assert res.rank_accuracy[1] == np.mean(hits)


def test_megaface_ties_count_against_the_probe():
    # Vectors with entries +-1/4 in 16-d are exactly unit-norm; all scores exact in float32.
    probes = np.full((2, 16), 0.25, np.float32)
    labels = np.array([0, 0])
    dist = np.full((3, 16), 0.25, np.float32)  # identical to the genuine match: a tie
    dist[1:, :8] = -0.25
    res = identification.megaface_identification(probes, labels, dist, ranks=(1, 2), fars=())
    assert res.rank_accuracy == {1: 0.0, 2: 1.0}


def test_megaface_errors():
    rng = np.random.default_rng()
    probes, labels, dist = _megaface_data(rng)
    with pytest.raises(ValueError, match="num_distractors is required"):
        identification.megaface_identification(probes, labels, iter([dist]))
    with pytest.raises(ValueError, match="chunks held 900"):
        identification.megaface_identification(probes, labels, iter([dist]), num_distractors=1000)
    with pytest.raises(ValueError, match="no genuine pairs"):
        identification.megaface_identification(probes, np.arange(len(probes)), dist)


# ----------------------------------------------------------------- Recall@K
def _retrieval_data(rng, n=300, n_cls=40, dim=12):
    centers = rng.normal(size=(n_cls, dim))
    labels = rng.integers(0, n_cls, n)
    feats = centers[labels] + 1.0 * rng.normal(size=(n, dim))
    return feats.astype(np.float32), labels


def _ref_recall(q, ql, g, gl, ks, exclude_self):
    q, g = _unit64(q), _unit64(g)
    hits = {k: [] for k in ks}
    for i in range(len(q)):
        s = g @ q[i]
        order = np.argsort(-s, kind="stable")
        if exclude_self:
            order = order[order != i]
        for k in ks:
            hits[k].append(bool(np.any(gl[order[:k]] == ql[i])))
    return {k: np.mean(v) for k, v in hits.items()}


def test_recall_at_k_sop_style_matches_argsort():
    rng = np.random.default_rng()
    feats, labels = _retrieval_data(rng)
    ks = (1, 2, 10, 100, 1000)
    got = retrieval.recall_at_k(feats, labels, ks=ks, chunk_size=37)
    ref = _ref_recall(feats, labels, feats, labels, ks, exclude_self=True)
    assert 0.2 < ref[1] < 0.95
    for k in ks:
        assert got[k] == ref[k], k


def test_recall_at_k_inshop_style_matches_argsort():
    rng = np.random.default_rng()
    feats, labels = _retrieval_data(rng, n=500)
    q, ql, g, gl = feats[:200], labels[:200], feats[200:], labels[200:]
    ks = (1, 5, 50)
    got = retrieval.recall_at_k(q, ql, g, gl, ks=ks, chunk_size=64)
    ref = _ref_recall(q, ql, g, gl, ks, exclude_self=False)
    for k in ks:
        assert got[k] == ref[k], k


def test_recall_query_without_match_is_a_miss_and_ties_count_against():
    q = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    got = retrieval.recall_at_k(q, np.array([0, 0, 1]), ks=(1, 2))
    assert got == {1: 2 / 3, 2: 2 / 3}  # the label-1 query has no match: a miss at every K
    # Orthogonal items: the other-class item ties the match (score 0) and ranks above it.
    got = retrieval.recall_at_k(np.eye(3, dtype=np.float32), np.array([0, 0, 1]), ks=(1, 2))
    assert got == {1: 0.0, 2: 2 / 3}
