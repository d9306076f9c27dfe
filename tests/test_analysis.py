"""broadface_jax.analysis against float64 NumPy loops on small random cases (seed printed in asserts)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from broadface_jax import analysis, queue as queue_lib

SEED = 8_2026


def _case(n=40, c=7, c_pad=9, d=5, seed=SEED):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=(n, 1))
    kernel = rng.normal(size=(c_pad, d))
    labels = rng.integers(0, c, size=n)
    labels[:c - 1] = np.arange(c - 1)  # every class but the last present
    labels[labels == c - 1] = 0
    return emb, kernel, labels, c


def test_classifier_top1_and_center_alignment_match_loops():
    emb, kernel, labels, c = _case()
    # top-1: loop over rows, cosine against every real class (padding rows ignored)
    hits = 0
    for e, y in zip(emb, labels):
        cos = [e @ kernel[k] / np.linalg.norm(e) / np.linalg.norm(kernel[k]) for k in range(c)]
        hits += int(np.argmax(cos) == y)
    assert analysis.classifier_top1(emb, kernel, labels, c) == pytest.approx(hits / len(emb), abs=1e-15)
    # padding rows must not win even when they align perfectly
    kernel2 = kernel.copy()
    kernel2[c] = emb[0]
    assert analysis.classifier_top1(emb, kernel2, labels, c) == pytest.approx(hits / len(emb))

    cos_per_class = []
    for k in range(c):
        rows = [e / np.linalg.norm(e) for e, y in zip(emb, labels) if y == k]
        if not rows:
            continue  # class c - 1 is absent
        m = np.mean(rows, axis=0)
        cos_per_class.append(m @ kernel[k] / np.linalg.norm(m) / np.linalg.norm(kernel[k]))
    assert len(cos_per_class) == c - 1
    assert analysis.center_alignment(emb, kernel, labels, c) == pytest.approx(
        np.mean(cos_per_class), abs=1e-12)


def test_bad_inputs_name_the_problem():
    emb, kernel, labels, c = _case()
    with pytest.raises(ValueError, match="num_classes=10"):
        analysis.classifier_top1(emb, kernel, labels, 10)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        analysis.center_alignment(emb, kernel, labels, 3)
    with pytest.raises(ValueError, match="same D"):
        analysis.classifier_top1(emb[:, :3], kernel, labels, c)


def test_rows_at_lag_and_coverage_follow_the_real_queue():
    """Enqueue known batches with queue.enqueue; rows_at_lag must find each one."""
    rng = np.random.default_rng(SEED + 1)
    shards, local, shard_cap, d = 2, 3, 12, 4  # 4 steps per shard
    q = queue_lib.init_queue(shards * shard_cap, d, shards)
    batches = []
    for step in range(6):  # wraps around once
        lab = rng.integers(0, 20, size=shards * local).astype(np.int32)
        emb = rng.normal(size=(shards * local, d)).astype(np.float32)
        q = queue_lib.enqueue(q, jnp.asarray(emb), jnp.asarray(emb) * 2, jnp.asarray(lab))
        batches.append((lab, emb))
    for lag in range(1, 5):
        idx = analysis.rows_at_lag(int(q.position), q.shard_capacity, shards, local, lag)
        lab, emb = batches[-lag]
        np.testing.assert_array_equal(np.asarray(q.labels)[idx], lab)
        np.testing.assert_array_equal(np.asarray(q.embeddings)[idx], emb)
    with pytest.raises(ValueError, match="lag 5 outside"):
        analysis.rows_at_lag(int(q.position), q.shard_capacity, shards, local, 5)

    cov = analysis.queue_coverage(np.asarray(q.labels), np.asarray(q.valid), shards, local)
    held = [b[0] for b in batches[-4:]]
    assert cov["queue_rows"] == 24 and cov["queue_steps"] == 4
    assert cov["queue_classes"] == len(set(np.concatenate(held).tolist()))
    assert cov["classes_per_step"] == pytest.approx(np.mean([len(set(h.tolist())) for h in held]))
    # a half-full queue: only the valid rows count
    q2 = queue_lib.init_queue(shards * shard_cap, d, shards)
    lab, emb = batches[0]
    q2 = queue_lib.enqueue(q2, jnp.asarray(emb), jnp.asarray(emb), jnp.asarray(lab))
    cov2 = analysis.queue_coverage(np.asarray(q2.labels), np.asarray(q2.valid), shards, local)
    assert cov2 == dict(queue_rows=6.0, queue_classes=float(len(set(lab.tolist()))),
                        queue_steps=1.0, classes_per_step=float(len(set(lab.tolist()))))


def test_compensation_errors_match_eq7_loop_and_queue_compensate():
    rng = np.random.default_rng(SEED + 2)
    n, d = 16, 6
    stale = rng.normal(size=(n, d)) * 3
    w_old = rng.normal(size=(n, d)) * 0.5
    w_cur = w_old + 0.1 * rng.normal(size=(n, d))
    current = stale + 0.3 * rng.normal(size=(n, d))
    out = analysis.compensation_errors(current, stale, w_old, w_cur)
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    comp = [s + np.linalg.norm(s) / np.linalg.norm(wo) * (wc - wo)
            for s, wo, wc in zip(stale, w_old, w_cur)]
    assert out["stale"] == pytest.approx(np.mean([1 - cos(c, s) for c, s in zip(current, stale)]),
                                         abs=1e-12)
    assert out["compensated"] == pytest.approx(
        np.mean([1 - cos(c, e) for c, e in zip(current, comp)]), abs=1e-12)
    assert out["drift_w"] == pytest.approx(np.mean([1 - cos(a, b) for a, b in zip(w_old, w_cur)]),
                                           abs=1e-12)
    # the library's Eq. 7 (float32, used in training) agrees with the float64 one
    lib = np.asarray(queue_lib.compensate(jnp.asarray(stale, jnp.float32),
                                          jnp.asarray(w_old, jnp.float32),
                                          jnp.asarray(w_cur, jnp.float32)))
    np.testing.assert_allclose(lib, analysis.compensate64(stale, w_old, w_cur), rtol=1e-5, atol=1e-5)


def test_paired_interval_matches_scipy_ttest_rel():
    from scipy import stats

    rng = np.random.default_rng(SEED + 3)
    a, b = rng.normal(size=5), rng.normal(size=5)
    out = analysis.paired_interval(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert out["diff"] == pytest.approx(np.mean(a - b), abs=1e-14)
    assert (out["lo"], out["hi"]) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    one = analysis.paired_interval(a[:1], b[:1])
    assert one["n"] == 1 and np.isnan(one["lo"])
