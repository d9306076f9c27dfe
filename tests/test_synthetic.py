"""Tests for the synthetic identities (broadface_jax.datasets.synthetic)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from broadface_jax.datasets import synthetic
from tests.tiny_config import tiny_config


def _config(size=48, ids=20, heldout=10, samples=4):
    return tiny_config("default", image_size=size, dataset__name="synthetic",
                       dataset__synthetic__num_identities=ids,
                       dataset__synthetic__heldout_identities=heldout,
                       dataset__synthetic__samples_per_identity=samples)


def test_render_is_deterministic_and_batch_independent():
    ids, samples = np.array([3, 3, 9, 1]), np.array([0, 1, 0, 5])
    a = synthetic.render(ids, samples, seed=4, size=40)
    b = synthetic.render(ids, samples, seed=4, size=40)
    assert a.dtype == np.uint8 and a.shape == (4, 40, 40, 3)
    np.testing.assert_array_equal(a, b)
    # Each sample is a function of (seed, identity, sample index) only, not of its batch.
    np.testing.assert_array_equal(synthetic.render([9], [0], 4, 40)[0], a[2])
    assert not np.array_equal(synthetic.render(ids, samples, seed=5, size=40), a)
    assert not np.array_equal(a[0], a[1])  # same identity, another sample
    assert a.std() > 20  # not blank


def test_affine_cos_matches_direct_float64():
    rng = np.random.default_rng(0)
    n, h = 3, 17
    ax, ay, c = rng.normal(0, 4, n), rng.normal(0, 4, n), rng.uniform(0, 6, n)
    lin = np.linspace(-1, 1, h)
    got = synthetic._affine_cos(ax, ay, c, lin, lin)
    ref = np.cos(ax[:, None, None] * lin[None, None, :] + ay[:, None, None] * lin[None, :, None]
                 + c[:, None, None])
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_training_examples_labels_and_range():
    spec = synthetic.spec_from_config(_config())
    images, labels = synthetic.training_examples(spec, np.array([0, 3, 4, 79]), seed=0)
    assert labels.tolist() == [0, 0, 1, 19]
    np.testing.assert_array_equal(images[3], synthetic.render([19], [3], 0, 48)[0])
    with pytest.raises(ValueError, match="out of range"):
        synthetic.training_examples(spec, np.array([80]), seed=0)
    with pytest.raises(ValueError, match="num_identities"):
        synthetic.training_examples(synthetic.SyntheticSpec(48, 0, 0, 0), np.array([0]), seed=0)


def test_verification_pairs_are_heldout_balanced_and_deterministic():
    c = _config(ids=20, heldout=10)
    ids_a, ids_b, samples, issame, _ = synthetic.verification_pair_ids(c, 101, seed=3)
    for ids in (ids_a, ids_b):
        assert ids.min() >= 20 and ids.max() < 30  # held out: never a training identity
    assert issame.sum() == 50 and (~issame).sum() == 51
    np.testing.assert_array_equal(issame, ids_a == ids_b)
    assert len(set(zip(ids_a[issame], samples[0][issame], samples[1][issame]))) == 50
    assert np.all(samples[0][issame] != samples[1][issame])
    a, b, same = synthetic.verification_pairs(c, 20, seed=3)
    a2, b2, same2 = synthetic.verification_pairs(c, 20, seed=3)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(same, same2)
    assert a.shape == (20, 48, 48, 3) and same.dtype == bool
    with pytest.raises(ValueError, match="heldout_identities"):
        synthetic.verification_pairs(_config(heldout=1), 10, 0)


def test_verification_is_learnable_but_not_trivial():
    """Raw pixels separate same/different pairs a little: signal exists, the task is not solved."""
    a, b, same = synthetic.verification_pairs(_config(size=32, ids=50, heldout=40), 240, seed=1)
    fa = a.reshape(len(a), -1).astype(np.float64)
    fb = b.reshape(len(b), -1).astype(np.float64)
    auc = roc_auc_score(same, -np.linalg.norm(fa - fb, axis=1))
    assert 0.55 < auc < 0.9, auc
