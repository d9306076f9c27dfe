"""The regime metrics of broadface_jax.analysis (issue 18) against float64 NumPy loops
and hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from broadface_jax import analysis


def _rotated(rng, n, d, ang):
    """Unit u[i] and v[i] at exactly ang[i] radians, in random planes, random norms."""
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.normal(size=(n, d))
    w -= np.sum(w * u, axis=1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    v = np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * w
    return u * rng.uniform(0.5, 3, (n, 1)), v * rng.uniform(0.5, 3, (n, 1))


def test_theta_known_angles():
    rng = np.random.default_rng(0)
    ang = rng.uniform(0, 1.2, 50)
    u, v = _rotated(rng, 50, 16, ang)
    np.testing.assert_allclose(analysis.angles(u.astype(np.float32), v.astype(np.float32)),
                               ang, atol=2e-6)
    t = analysis.theta(v, u)
    assert t["rad"] == pytest.approx(ang.mean(), abs=1e-9)
    assert t["deg"] == pytest.approx(np.degrees(ang.mean()), abs=1e-7)
    assert t["one_minus_cos"] == pytest.approx(np.mean(1 - np.cos(ang)), abs=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        analysis.theta(u, v[:3])


def test_visit_intervals_and_steps_since_hand_case():
    # steps 1..6, batch 2, 4 classes; class 3 never seen
    labels = np.array([[0, 1], [0, 0], [2, 1], [0, 2], [1, 1], [2, 0]])
    visits = analysis.visit_steps(labels, 4)
    assert [v.tolist() for v in visits] == [[1, 2, 4, 6], [1, 3, 5], [3, 4, 6], []]
    r = analysis.visit_intervals(labels, 4)
    gaps = [1, 2, 2, 2, 2, 1, 2]  # class 0: 1,2,2; class 1: 2,2; class 2: 1,2
    assert r["mean_gap"] == pytest.approx(np.mean(gaps))
    assert r["median_class"] == pytest.approx(np.median([5 / 3, 2.0, 1.5]))
    assert r["classes_per_batch_ratio"] == 2.0
    assert r["classes_with_gap"] == 3 and r["never"] == 1
    np.testing.assert_array_equal(analysis.steps_since_visit(labels, 4, 5), [1, 0, 1, -1])
    np.testing.assert_array_equal(analysis.steps_since_visit(labels, 4, 2), [0, 1, -1, -1])
    with pytest.raises(ValueError, match="labels must be in"):
        analysis.visit_steps(labels, 2)


def test_visit_interval_random_stream_matches_loop():
    rng = np.random.default_rng(1)
    c, b, t = 40, 4, 300
    labels = rng.integers(0, c, (t, b))
    last, gaps, per_class = {}, [], {}
    for step in range(1, t + 1):
        for k in sorted(set(labels[step - 1].tolist())):
            if k in last:
                gaps.append(step - last[k])
                per_class.setdefault(k, []).append(step - last[k])
            last[k] = step
    r = analysis.visit_intervals(labels, c)
    assert r["mean_gap"] == pytest.approx(np.mean(gaps))
    assert r["median_class"] == pytest.approx(np.median([np.mean(g) for g in per_class.values()]))
    assert abs(r["mean_gap"] - c / b) < 0.15 * c / b  # ≈ C / B (with-replacement draws)
    since = analysis.steps_since_visit(labels, c, 200)
    for k in range(c):
        steps = [s for s in range(1, 201) if k in labels[s - 1]]
        assert since[k] == (200 - steps[-1] if steps else -1)


def test_class_staleness_known_angles_and_bins():
    rng = np.random.default_rng(2)
    c, d, per = 6, 8, 5
    alpha = np.linspace(0.1, 0.6, c)
    mean_dir, w = _rotated(rng, c, d, alpha)
    labels = np.repeat(np.arange(c), per)
    emb = mean_dir[labels] * rng.uniform(0.5, 2, (c * per, 1))  # all of a class on one ray
    kernel = np.concatenate([w, rng.normal(size=(2, d))])  # 2 padding rows
    stale = analysis.class_staleness(emb, kernel, labels, c)
    np.testing.assert_allclose(stale, alpha, atol=1e-7)
    since = np.array([0, 5, 40, 70, 300, -1])
    bins = analysis.staleness_by_visit(stale, since, edges=(0, 32, 64, 256))
    assert [b_["classes"] for b_ in bins] == [2, 1, 1, 1]
    assert bins[0]["deg"] == pytest.approx(np.degrees(alpha[:2].mean()))
    assert bins[3]["deg"] == pytest.approx(np.degrees(alpha[4]))
    s = analysis.staleness_slope(stale, since)
    ref = np.polyfit(since[:5].astype(float), np.degrees(alpha[:5]), 1)[0]
    assert s["slope_deg_per_100_steps"] == pytest.approx(100 * ref)
    assert s["spearman"] == pytest.approx(1.0) and s["n"] == 5


def _loop_errors(cur, old, w_old, w_cur, labels):
    """float64 loops: stale, Eq. 7, Eq. 7 with unit W, leave-one-out per-class shift."""
    def unit(x):
        return x / np.linalg.norm(x)

    out = {"stale": [], "eq7": [], "eq7_unit_w": [], "oracle": []}
    for i in range(len(cur)):
        e = unit(cur[i])
        cands = {
            "stale": old[i],
            "eq7": old[i] + np.linalg.norm(old[i]) / np.linalg.norm(w_old[i]) * (w_cur[i] - w_old[i]),
            "eq7_unit_w": old[i] + np.linalg.norm(old[i]) * (unit(w_cur[i]) - unit(w_old[i])),
        }
        others = [j for j in range(len(cur)) if labels[j] == labels[i] and j != i]
        shift = (np.mean([unit(cur[j]) - unit(old[j]) for j in others], axis=0)
                 if others else 0.0)
        cands["oracle"] = unit(old[i]) + shift
        for k, x in cands.items():
            out[k].append(1 - e @ unit(x))
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_regime_errors_match_float64_loops():
    rng = np.random.default_rng(3)
    n, d = 40, 12
    labels = rng.integers(0, 7, n)
    labels[0] = 9  # a class with a single image: the oracle leaves it unshifted
    old = rng.normal(size=(n, d)) * 3
    cur = old + rng.normal(size=(n, d))
    w_old = rng.normal(size=(10, d))[labels] * 2
    w_cur = w_old + 0.3 * rng.normal(size=(n, d))
    got = analysis.regime_errors(cur.astype(np.float32), old.astype(np.float32),
                                 w_old.astype(np.float32), w_cur.astype(np.float32), labels)
    ref = _loop_errors(cur.astype(np.float32).astype(np.float64), old.astype(np.float32).astype(np.float64),
                       w_old.astype(np.float32).astype(np.float64),
                       w_cur.astype(np.float32).astype(np.float64), labels)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


def test_oracle_recovers_a_shared_class_shift():
    """Every image of a class moved by the same unit-space shift: the oracle is exact,
    the stale error is not zero."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 4)
    old = np.ones((12, 5)) + 0.0 * rng.normal(size=(12, 5))
    old[:, 0] += labels  # identical within a class
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    shift = rng.normal(size=(3, 5)) * 0.2
    cur = old + shift[labels]
    comp = analysis.oracle_shift64(cur, old, labels)
    unit_cur = cur / np.linalg.norm(cur, axis=1, keepdims=True)
    # identical pairs in a class: the leave-one-out mean of (ê - ê⁻) is that pair's own
    np.testing.assert_allclose(comp, old + (unit_cur - old), atol=1e-12)
    e = analysis.regime_errors(cur, old, old, old, labels)
    assert e["oracle"] == pytest.approx(0.0, abs=1e-12) and e["stale"] > 1e-3


def test_paper_rotation_estimate():
    r = analysis.paper_rotation_estimate(5e-3, 5e-4, 0.9, 167, 0.5)
    per = np.sqrt(2 * 5e-3 * 5e-4 / 1.9)
    assert r["per_step_rad"] == pytest.approx(per, rel=1e-12)
    assert r["coherent_rad"] == pytest.approx(167 * per)
    assert r["s_coherent"] == pytest.approx(167 * per / 0.5)
    assert r["s_random_walk"] == pytest.approx(np.sqrt(167) * per / 0.5)
