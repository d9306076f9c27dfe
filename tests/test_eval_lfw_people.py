"""The ``lfw_people_test`` target on the real LFW peopleDevTest faces, against float64 NumPy + sklearn.

The image list and labels are rebuilt here from ``peopleDevTest.txt``; the
scores of every pair are recomputed in float64 from the flip-sum features of
a fixed random projection, and TAR @ FAR is read off ``sklearn``'s ROC
(``tpr[fpr <= far].max()``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from broadface_jax import align, cli, evaluation
from broadface_jax.evaluation import face_targets

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = 20261201


def _config(data_root):
    c = cli.config_from_file(REPO / "configs" / "default.py")
    c.eval.data_root = str(data_root)
    c.eval.batch_size = 256
    c.image_size = 32
    return c


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))


def test_all_pairs_scores_small_case():
    rng = np.random.default_rng(SEED)
    f = rng.normal(size=(7, 5))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.array([0, 1, 0, 2, 1, 0, 3])
    pos, neg = face_targets.all_pairs_scores(f, labels, block=3)
    want_pos = sorted(f[i] @ f[j] for i in range(7) for j in range(i + 1, 7) if labels[i] == labels[j])
    want_neg = sorted(f[i] @ f[j] for i in range(7) for j in range(i + 1, 7) if labels[i] != labels[j])
    np.testing.assert_allclose(np.sort(pos), want_pos, atol=1e-6)
    np.testing.assert_allclose(np.sort(neg), want_neg, atol=1e-6)
    assert pos.size == 4 and neg.size == 17  # 3 + 1 genuine of 21 pairs


def test_lfw_people_test_on_real_faces(shared_data):
    from sklearn.metrics import roc_curve

    lfw = shared_data / "lfw"
    lines = (lfw / "peopleDevTest.txt").read_text().split("\n")[1:]
    people = [(ln.split("\t")[0], int(ln.split("\t")[1])) for ln in lines if ln.strip()]
    paths = [f"{n}/{n}_{i:04d}.jpg" for n, k in people for i in range(1, min(k, 10) + 1)]
    labels = np.array([p for p, (n, k) in enumerate(people) for _ in range(min(k, 10))])
    assert len(paths) == 3118 and len(people) == 1711

    proj = np.random.default_rng(SEED).normal(size=(8 * 8 * 3, 24))

    def features64(x):
        n = x.shape[0]
        pooled = x.astype(np.float64).reshape(n, 8, 4, 8, 4, 3).mean(axis=(2, 4)) / 255.0 - 0.5
        return pooled.reshape(n, -1) @ proj

    def embed(x):
        return features64(x).astype(np.float32)

    config = _config(shared_data)
    evaluator = evaluation.build_evaluator("lfw_people_test", config)
    data = evaluator.data()
    np.testing.assert_array_equal(data.labels, labels)
    for i in (0, 1234, len(paths) - 1):  # the crops are the target's own, at config.image_size
        want = align.lfw_center_crop(align.read_rgb(lfw / "images_deepfunneled" / paths[i]), size=32)
        np.testing.assert_array_equal(data.images[i], want)

    metrics = evaluator.run(embed)

    x = data.images
    f = (embed(x) + embed(np.ascontiguousarray(x[:, :, ::-1]))).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    iu, ju = np.triu_indices(len(f), k=1)
    scores = (f @ f.T)[iu, ju]
    same = labels[iu] == labels[ju]
    assert metrics["num_genuine"] == same.sum() == sum(min(k, 10) * (min(k, 10) - 1) // 2
                                                      for _, k in people)
    assert metrics["num_impostor"] == (~same).sum()
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    for far, key in ((1e-2, "tar@far=1e-2"), (1e-3, "tar@far=1e-3"), (1e-4, "tar@far=1e-4")):
        want = tpr[fpr <= far].max()
        # float32 vs float64 scores may reorder a near-tie: at most a pair or two
        assert metrics[key] == pytest.approx(want, abs=2.5 / same.sum()), key
    assert 0.0 < metrics["tar@far=1e-4"] <= metrics["tar@far=1e-3"] <= metrics["tar@far=1e-2"] < 1.0
