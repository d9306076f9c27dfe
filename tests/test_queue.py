"""The BroadFace queue: Eq. 7, ring-buffer semantics, chunked loss, sharded layout."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from broadface_jax import losses, queue as queue_lib, sharding
from tests.np_reference import np_compensate, np_margin_ce


def test_compensation_matches_eq7_float64():
    rng = np.random.default_rng()
    n, d = 64, 16
    e_old = rng.normal(size=(n, d)) * rng.uniform(0.5, 20, (n, 1))
    w_old = rng.normal(size=(n, d)) * 0.05
    w_cur = w_old + rng.normal(size=(n, d)) * 0.01
    ref = np_compensate(e_old, w_old, w_cur)
    got = queue_lib.compensate(*(jnp.asarray(a, jnp.float32) for a in (e_old, w_old, w_cur)))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    # no drift of the classifier -> no change of the embedding
    same = queue_lib.compensate(jnp.asarray(e_old, jnp.float32), jnp.asarray(w_old, jnp.float32),
                                jnp.asarray(w_old, jnp.float32))
    np.testing.assert_allclose(np.asarray(same), e_old, rtol=1e-6)


@pytest.mark.parametrize("shards,capacity,batch", [(1, 12, 3), (1, 12, 4), (4, 16, 8)])
def test_ring_buffer_keeps_the_last_samples(shards, capacity, batch):
    rng = np.random.default_rng()
    d = 5
    q = queue_lib.init_queue(capacity, d, shards)
    write = jax.jit(queue_lib.enqueue)
    history = []  # per shard: list of (emb, w, label) in write order
    for k in range(1, 9):
        emb = rng.normal(size=(batch, d)).astype(np.float32)
        w = rng.normal(size=(batch, d)).astype(np.float32)
        lab = rng.integers(0, 1000, batch).astype(np.int32)
        q = write(q, emb, w, lab)
        history.append((emb, w, lab))
        local, ql = batch // shards, capacity // shards
        for s in range(shards):
            rows = slice(s * ql, (s + 1) * ql)
            valid = np.asarray(q.valid[rows])
            assert valid.sum() == min(k * local, ql)
            # the last min(k*local, ql) samples of this shard, wherever the ring put them
            want = [(e[s * local:(s + 1) * local], ww[s * local:(s + 1) * local],
                     ll[s * local:(s + 1) * local]) for e, ww, ll in history]
            want_lab = np.concatenate([x[2] for x in want])[-min(k * local, ql):]
            want_emb = np.concatenate([x[0] for x in want])[-min(k * local, ql):]
            want_w = np.concatenate([x[1] for x in want])[-min(k * local, ql):]
            pos = (k * local) % ql
            order = np.roll(np.arange(ql), -pos) if k * local >= ql else np.arange(k * local)
            np.testing.assert_array_equal(np.asarray(q.labels[rows])[order], want_lab)
            np.testing.assert_array_equal(np.asarray(q.embeddings[rows])[order], want_emb)
            np.testing.assert_array_equal(np.asarray(q.weights[rows])[order], want_w)
        assert int(q.position) == (k * local) % ql
    np.testing.assert_allclose(float(queue_lib.fill(q)), 1.0)


def test_enqueue_rejects_wrapping_writes():
    q = queue_lib.init_queue(10, 4, 1)
    with pytest.raises(ValueError, match="multiple of the per-shard batch"):
        queue_lib.enqueue(q, jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.zeros((3,), jnp.int32))


def _random_queue(rng, capacity, d, c, shards, valid_frac=0.7):
    q = queue_lib.init_queue(capacity, d, shards)
    return q.replace(
        embeddings=jnp.asarray(rng.normal(size=(capacity, d)) * 5, jnp.float32),
        weights=jnp.asarray(rng.normal(size=(capacity, d)) * 0.05, jnp.float32),
        labels=jnp.asarray(rng.integers(0, c, capacity), jnp.int32),
        valid=jnp.asarray(rng.uniform(size=capacity) < valid_frac),
    )


def np_queue_loss(q, kernel):
    """float64: sum over valid rows of the ArcFace loss of the compensated embedding."""
    e, w_old = np.asarray(q.embeddings, np.float64), np.asarray(q.weights, np.float64)
    lab, w = np.asarray(q.labels), np.asarray(kernel, np.float64)
    per = np_margin_ce(np_compensate(e, w_old, w[lab]), w, lab)
    return per[np.asarray(q.valid)].sum()


def test_chunked_and_unchunked_queue_loss_agree():
    rng = np.random.default_rng()
    capacity, d, c, shards = 64, 8, 13, 2
    q = _random_queue(rng, capacity, d, c, shards)
    kernel = jnp.asarray(rng.normal(size=(c, d)) * 0.05, jnp.float32)
    loss = losses.build({"name": "arcface", "s": 64.0})

    def f(kernel, chunk):
        total, drift, n = queue_lib.queue_loss_sum(
            q, kernel, losses.l2_normalize(kernel), loss, chunk_size=chunk)
        return total, (drift, n)

    results = {}
    for chunk in (32, 8, 4):
        (val, (drift, n)), grad = jax.jit(jax.value_and_grad(f, has_aux=True),
                                          static_argnums=1)(kernel, chunk)
        results[chunk] = (float(val), np.asarray(grad), float(drift), float(n))
    ref = np_queue_loss(q, kernel)
    for chunk, (val, grad, drift, n) in results.items():
        np.testing.assert_allclose(val, ref, rtol=1e-5)
        # float32 sums in another order: 1e-5 relative to the gradient's scale
        scale = np.abs(results[32][1]).max()
        np.testing.assert_allclose(grad, results[32][1], rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(drift, results[32][2], rtol=1e-5)
        assert n == float(np.asarray(q.valid).sum())


def np_drift(q, kernel):
    """float64 sum over valid rows of cos(W⁻_j, W_{y_j}), and the valid count."""
    w_old, lab = np.asarray(q.weights, np.float64), np.asarray(q.labels)
    w_cur = np.asarray(kernel, np.float64)[lab]
    cos = np.sum(w_old * w_cur, 1) / (np.linalg.norm(w_old, axis=1) * np.linalg.norm(w_cur, axis=1))
    valid = np.asarray(q.valid)
    return cos[valid].sum(), valid.sum()


def test_queue_drift_matches_float64():
    """Drift of the stored rows W⁻ from the current rows of their labels, over valid rows only.

    Invalid rows hold random W⁻ too (as after wrapping or relayout), so a sum over
    every row, or cos(W⁻, W⁻), or the compensated rows, would all differ.
    """
    rng = np.random.default_rng()
    capacity, d, c, shards = 48, 6, 9, 2
    q = _random_queue(rng, capacity, d, c, shards, valid_frac=0.5)
    assert 0 < int(np.asarray(q.valid).sum()) < capacity
    kernel = jnp.asarray(rng.normal(size=(c, d)) * 0.05, jnp.float32)
    loss = losses.build({"name": "arcface", "s": 64.0})
    fn = jax.jit(lambda k, chunk: queue_lib.queue_loss_sum(
        q, k, losses.l2_normalize(k), loss, chunk_size=chunk), static_argnums=1)
    want, n_want = np_drift(q, kernel)
    for chunk in (0, 8):
        _, drift, n = fn(kernel, chunk)
        np.testing.assert_allclose(float(drift), want, rtol=1e-5, atol=1e-5)
        assert float(n) == n_want


def test_queue_loss_has_no_gradient_through_compensation():
    """Eq. 7 is data: d loss / d W equals the gradient with e* frozen as constants."""
    rng = np.random.default_rng()
    q = _random_queue(rng, 16, 6, 7, 1, valid_frac=1.0)
    kernel = jnp.asarray(rng.normal(size=(7, 6)) * 0.05, jnp.float32)
    loss = losses.build({"name": "arcface", "s": 64.0})
    g = jax.grad(lambda k: queue_lib.queue_loss_sum(
        q, k, losses.l2_normalize(k), loss, chunk_size=0)[0])(kernel)
    e_star = queue_lib.compensate(q.embeddings, q.weights, kernel[q.labels])
    g_frozen = jax.grad(lambda k: jnp.sum(loss.per_example(
        e_star, losses.l2_normalize(k), q.labels)))(kernel)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_frozen), rtol=1e-5, atol=1e-6)


def test_sharded_enqueue_is_local_to_each_device():
    """On 8 devices the enqueue compiles to no cross-device communication."""
    assert jax.device_count() == 8
    from ml_collections import ConfigDict
    mesh = sharding.make_mesh(ConfigDict(dict(data=-1, model=1)))
    q = queue_lib.init_queue(64, 4, 8)
    row = NamedSharding(mesh, P(sharding.BATCH_AXES))
    q_sh = jax.tree.map(lambda x: row if x.ndim else NamedSharding(mesh, P()), q)
    q = jax.device_put(q, q_sh)
    rng = np.random.default_rng()
    emb = jax.device_put(rng.normal(size=(16, 4)).astype(np.float32), row)
    w = jax.device_put(rng.normal(size=(16, 4)).astype(np.float32), row)
    lab = jax.device_put(np.arange(16, dtype=np.int32), row)
    fn = jax.jit(queue_lib.enqueue, in_shardings=(q_sh, row, row, row), out_shardings=q_sh)
    hlo = fn.lower(q, emb, w, lab).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert not re.search(rf"\b{op}\b", hlo), f"enqueue compiled to a {op}"
    out = fn(q, emb, w, lab)
    for shard in out.labels.addressable_shards:
        dev = mesh.devices.reshape(-1).tolist().index(shard.device)
        got = np.asarray(shard.data)
        # device i holds batch rows 2i, 2i+1 (labels == row index) in its first two slots
        np.testing.assert_array_equal(got[:2], [2 * dev, 2 * dev + 1])


@pytest.mark.parametrize("old,new,cap_old,cap_new", [(8, 4, 32, 16), (8, 1, 32, 4), (2, 4, 8, 32)])
def test_relayout_keeps_the_newest_rows(old, new, cap_old, cap_new):
    rng = np.random.default_rng()
    d = 3
    q = queue_lib.init_queue(cap_old, d, old)
    stream = []  # (label, embedding) in write order, per old shard
    steps = 5
    for _ in range(steps):
        b = rng.normal(size=(old * 2, d)).astype(np.float32)
        lab = rng.integers(0, 10_000, old * 2).astype(np.int32)
        q = queue_lib.enqueue(q, b, b * 2, lab)
        stream.append((lab, b))
    r = queue_lib.relayout(q, cap_new, new)
    assert r.num_shards == new and r.capacity == cap_new
    valid = np.asarray(r.valid)
    # newest rows first overall: age = steps back, ties within a step in shard order
    kept_want = min(int(np.asarray(q.valid).sum()), cap_new) // new * new
    assert valid.sum() == kept_want
    newest = []
    for lab, b in reversed(stream):
        for local in (1, 0):
            for s in range(old):
                newest.append((lab[s * 2 + local], b[s * 2 + local]))
    want_labels = sorted(int(l) for l, _ in newest[:kept_want])
    assert sorted(np.asarray(r.labels)[valid].tolist()) == want_labels
    # rows stay whole: W⁻ and embedding travel together
    np.testing.assert_array_equal(np.asarray(r.weights)[valid], 2 * np.asarray(r.embeddings)[valid])
    # and the ring goes on: the next enqueue overwrites the oldest row of each shard
    ql = cap_new // new
    assert int(r.position) == (kept_want // new) % ql
    r2 = queue_lib.enqueue(r, np.zeros((new, d), np.float32), np.zeros((new, d), np.float32),
                           np.full((new,), -1, np.int32))
    assert (np.asarray(r2.labels) == -1).sum() == new
