"""10-fold verification vs an independent float64 loop reimplementation of insightface's code."""

import os

import numpy as np
import pytest
from scipy.interpolate import BSpline

from broadface_jax.evaluation import common, set_to_set, verification


# ----------------------------------------------------------------- reference
def _ref_accuracy(threshold, dist, issame):
    """insightface calculate_accuracy, written out."""
    tp = fp = tn = fn = 0
    for d, s in zip(dist, issame):
        pred = d < threshold
        if pred and s:
            tp += 1
        elif pred and not s:
            fp += 1
        elif not pred and not s:
            tn += 1
        else:
            fn += 1
    tpr = 0.0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0.0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / len(dist)


def _ref_val_far(threshold, dist, issame):
    ta = sum(1 for d, s in zip(dist, issame) if d < threshold and s)
    fa = sum(1 for d, s in zip(dist, issame) if d < threshold and not s)
    return ta / sum(issame), fa / sum(1 for s in issame if not s)


def _ref_slinear(x, y, target):
    """interp1d(x, y, kind='slinear')(target) as SciPy <= 1.8 computed it (x sorted, repeats allowed)."""
    order = np.argsort(x, kind="mergesort")
    x, y = np.asarray(x)[order], np.asarray(y)[order]
    return float(BSpline(np.r_[x[0], x, x[-1]], y, 1)(target))


def _ref_protocol(emb1, emb2, issame, folds, far_target=1e-3):
    """insightface calculate_roc + calculate_val with plain loops, float64."""
    e1 = np.asarray(emb1, np.float64)
    e2 = np.asarray(emb2, np.float64)
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = [float(np.sum((a - b) ** 2)) for a, b in zip(e1, e2)]
    thresholds = np.arange(0, 4, 0.01)
    accs, thrs, vals = [], [], []
    for f in sorted(set(folds.tolist())):
        tr = [i for i in range(len(dist)) if folds[i] != f]
        te = [i for i in range(len(dist)) if folds[i] == f]
        d_tr, s_tr = [dist[i] for i in tr], [bool(issame[i]) for i in tr]
        d_te, s_te = [dist[i] for i in te], [bool(issame[i]) for i in te]
        acc_train = [_ref_accuracy(t, d_tr, s_tr)[2] for t in thresholds]
        best = int(np.argmax(acc_train))
        accs.append(_ref_accuracy(thresholds[best], d_te, s_te)[2])
        thrs.append(thresholds[best])
        vthr = np.arange(0, 4, 0.001)
        far_train = [_ref_val_far(t, d_tr, s_tr)[1] for t in vthr]
        thr = _ref_slinear(far_train, vthr, far_target) if max(far_train) >= far_target else 0.0
        vals.append(_ref_val_far(thr, d_te, s_te)[0])
    return np.mean(accs), np.std(accs), np.mean(thrs), np.mean(vals), np.array(accs)


def _planted_pairs(rng, n_pairs, dim=24, noise=1.1):
    """Same pairs share an identity vector plus noise; different pairs are independent."""
    issame = rng.permutation(np.arange(n_pairs) % 2 == 0)
    base = rng.normal(size=(n_pairs, dim))
    emb1 = base + noise * rng.normal(size=(n_pairs, dim))
    other = np.where(issame[:, None], base, rng.normal(size=(n_pairs, dim)))
    emb2 = other + noise * rng.normal(size=(n_pairs, dim))
    return emb1.astype(np.float32), emb2.astype(np.float32), issame


# --------------------------------------------------------------------- tests
def test_kfold_protocol_matches_loop_reference():
    rng = np.random.default_rng()
    emb1, emb2, issame = _planted_pairs(rng, 400)
    folds = verification.kfold_ids(400)
    res = verification.evaluate_embeddings(emb1, emb2, issame)
    acc, std, thr, val, fold_acc = _ref_protocol(emb1, emb2, issame, folds)
    assert 0.6 < res.accuracy < 0.99  # planted structure: informative but not perfect
    np.testing.assert_array_equal(res.fold_accuracy, fold_acc)
    assert res.accuracy == pytest.approx(acc, abs=1e-12)
    assert res.accuracy_std == pytest.approx(std, abs=1e-12)
    assert res.best_threshold == pytest.approx(thr, abs=1e-12)
    assert res.val == pytest.approx(val, abs=1e-12)


def test_official_folds_are_used_not_kfold():
    rng = np.random.default_rng()
    emb1, emb2, issame = _planted_pairs(rng, 300, noise=1.0)
    folds = rng.integers(0, 5, 300)  # irregular folds, 5 of them
    res = verification.evaluate_embeddings(emb1, emb2, issame, folds=folds)
    acc, std, _, val, fold_acc = _ref_protocol(emb1, emb2, issame, folds)
    assert res.fold_accuracy.shape == (5,)
    np.testing.assert_array_equal(res.fold_accuracy, fold_acc)
    assert res.val == pytest.approx(val, abs=1e-12)


def test_kfold_ids_are_sklearn_contiguous_blocks():
    folds = verification.kfold_ids(1003)
    assert np.all(np.diff(folds) >= 0)
    counts = np.bincount(folds)
    assert counts.tolist() == [101, 101, 101] + [100] * 7


def test_balanced_folds_hold_both_classes_evenly():
    issame = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    folds = verification.balanced_fold_ids(issame)
    for f in range(10):
        assert np.sum(issame[folds == f]) == 50 and np.sum(~issame[folds == f]) == 50


def test_threshold_interpolation_matches_scipy_slinear_semantics():
    rng = np.random.default_rng()
    for _ in range(20):
        thresholds = np.arange(0, 4, 0.001)
        # Nondecreasing FAR with long runs of repeated values, as on real folds.
        steps = rng.integers(0, 2, thresholds.size) * rng.integers(1, 4, thresholds.size)
        far = np.cumsum(steps) / (np.sum(steps) + 7.0)
        target = float(rng.uniform(0.0, far.max() * 0.99))
        got = verification.threshold_at_far(far, thresholds, target)
        assert got == pytest.approx(_ref_slinear(far, thresholds, target), abs=1e-12)
    assert verification.threshold_at_far(np.zeros(5), np.arange(5.0), 1e-3) == 0.0


def test_val_needs_both_classes_per_fold():
    rng = np.random.default_rng()
    emb1, emb2, _ = _planted_pairs(rng, 100)
    issame = np.r_[np.ones(50, bool), np.zeros(50, bool)]  # KFold gives one-class folds
    with pytest.raises(ValueError, match="balanced folds"):
        verification.evaluate_embeddings(emb1, emb2, issame)


def test_bin_folds_are_insightface_kfold_for_published_layouts():
    # lfw.bin / agedb_30.bin: 6000 pairs in blocks of 300 same then 300 different;
    # cfp_fp.bin: 7000 pairs in blocks of 350 + 350. KFold(10) in file order is kept.
    for n, block in ((6000, 300), (7000, 350)):
        issame = (np.arange(n) // block) % 2 == 0
        np.testing.assert_array_equal(verification.bin_fold_ids(issame), verification.kfold_ids(n))
    rng = np.random.default_rng()
    issame = rng.permutation(np.arange(400) % 2 == 0)  # shuffled: every KFold fold has both kinds
    np.testing.assert_array_equal(verification.bin_fold_ids(issame), verification.kfold_ids(400))


@pytest.mark.parametrize("n_pairs, n_same, sort", [(10, 5, False), (10, 3, False), (7, 4, False),
                                                   (100, 50, True), (23, 20, False)])
def test_small_or_unbalanced_files_evaluate_on_balanced_folds(n_pairs, n_same, sort, caplog):
    """10 pairs (KFold(10): one pair per fold), class-sorted lists: balanced folds, and VAL is computed."""
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    emb1, emb2, _ = _planted_pairs(rng, n_pairs)
    issame = np.arange(n_pairs) < n_same
    if not sort:
        issame = rng.permutation(issame)
    with caplog.at_level("WARNING"):
        folds = verification.bin_fold_ids(issame, source="tiny.bin")
    k = min(10, n_same, n_pairs - n_same)
    assert sorted(np.unique(folds).tolist()) == list(range(k)), seed
    for f in range(k):  # every held-out fold has both kinds
        assert issame[folds == f].any() and (~issame[folds == f]).any(), (seed, f)
    assert "tiny.bin" in caplog.text and f"using {k} balanced folds" in caplog.text
    res = verification.evaluate_embeddings(emb1, emb2, issame, folds=folds)
    acc, std, thr, val, fold_acc = _ref_protocol(emb1, emb2, issame, folds)
    np.testing.assert_array_equal(res.fold_accuracy, fold_acc)
    assert res.fold_accuracy.shape == (k,)
    assert res.accuracy == pytest.approx(acc, abs=1e-12)
    assert res.val == pytest.approx(val, abs=1e-12)
    assert np.isfinite(res.val) and np.isfinite(res.far)


def test_bin_folds_refuse_fewer_than_two_of_a_kind_naming_the_file():
    for issame in ([True] + [False] * 9, [False] * 10, [True, True, False]):
        with pytest.raises(ValueError, match=r"x/tiny\.bin: \d+ same and \d+ different pairs.*at least 2 of each"):
            verification.bin_fold_ids(np.asarray(issame), source="x/tiny.bin")


def test_embed_images_flip_sum_padding_and_xnorm():
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (23, 8, 6, 3), dtype=np.uint8)
    proj = rng.normal(size=(8 * 6 * 3, 5))
    calls = []

    def embed(x):
        calls.append(x.shape[0])
        return (x.reshape(x.shape[0], -1).astype(np.float64) / 255.0) @ proj

    feats, xnorm = common.embed_images(embed, images, batch_size=10)
    flat = images.reshape(23, -1) / 255.0
    flipped = images[:, :, ::-1, :].reshape(23, -1) / 255.0
    np.testing.assert_allclose(feats, flat @ proj + flipped @ proj, rtol=1e-5, atol=1e-5)
    norms = np.r_[np.linalg.norm(flat @ proj, axis=1), np.linalg.norm(flipped @ proj, axis=1)]
    assert xnorm == pytest.approx(np.mean(norms), rel=1e-6)  # insightface: over plain and flipped
    # 3 batches x (plain, flipped); the last chunk (3 images) is passed as is: the encoder's
    # embed fn pads it to a small power of two (embedding.padded_size), not to 10
    assert calls == [10] * 4 + [3] * 2

    def bad(x):
        return np.full((x.shape[0], 3), np.nan)

    with pytest.raises(ValueError, match="non-finite"):
        common.embed_images(bad, images, batch_size=10)


def test_roc_png_written(tmp_path):
    rng = np.random.default_rng()
    emb1, emb2, issame = _planted_pairs(rng, 200)
    res = verification.evaluate_embeddings(emb1, emb2, issame)
    path = verification.plot_roc(res, tmp_path / "roc.png", "test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


def test_set_to_set_matches_reference():
    rng = np.random.default_rng()
    n_sets, dim = 120, 16
    identity = rng.integers(0, 40, n_sets)
    centers = rng.normal(size=(40, dim))
    sizes = rng.integers(1, 6, n_sets)
    set_ids = np.repeat(np.arange(n_sets) * 3 + 1000, sizes)  # arbitrary, non-contiguous ids
    feats = centers[np.repeat(identity, sizes)] + 1.3 * rng.normal(size=(sizes.sum(), dim))
    pa = rng.integers(0, n_sets, 300)
    pb = rng.integers(0, n_sets, 300)
    issame = identity[pa] == identity[pb]
    # Plant enough same pairs: replace half of pb by another set of the same identity where one exists.
    for i in range(0, 300, 2):
        cands = np.flatnonzero((identity == identity[pa[i]]) & (np.arange(n_sets) != pa[i]))
        if cands.size:
            pb[i] = rng.choice(cands)
    issame = identity[pa] == identity[pb]
    folds = verification.balanced_fold_ids(issame)
    res = set_to_set.evaluate_set_pairs(feats, set_ids, set_ids[np.cumsum(sizes) - 1][pa],
                                        set_ids[np.cumsum(sizes) - 1][pb], issame, folds=folds)
    # reference: explicit per-set loops
    means = []
    for s in range(n_sets):
        rows = feats[set_ids == s * 3 + 1000].astype(np.float64)
        means.append(np.mean(rows / np.linalg.norm(rows, axis=1, keepdims=True), axis=0))
    means = np.array(means)
    acc, _, _, val, fold_acc = _ref_protocol(means[pa], means[pb], issame, folds)
    np.testing.assert_array_equal(res.fold_accuracy, fold_acc)
    assert res.val == pytest.approx(val, abs=1e-12)
    with pytest.raises(ValueError, match="no features"):
        set_to_set.evaluate_set_pairs(feats, set_ids, [5], [1000], np.array([True]))
