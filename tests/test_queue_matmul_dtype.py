"""config.queue.matmul_dtype: the queue's Q x D x C products in float32 or bfloat16.

bfloat16 has an 8-bit significand: rounding to nearest has unit roundoff
u = 2^-8. With unit vectors e, w rounded to bfloat16 and a float32 sum,
|cos_bf - cos| <= sum_d |e_d w_d| (2u + u^2) + D * 2^-24 <= eps_c := 2u(1 + u) + D 2^-24
(Cauchy-Schwarz). CosFace logits are s * cos (the target s * (cos - m)), so each
moves by at most s * eps_c and a row's loss lse(z) - z_y by at most 2 s eps_c.
The W gradient is G^T E with G = s (softmax - onehot) per scored row: rounding
G and E costs at most 2u(1 + u) (|G|^T |E|) componentwise, and the logits'
error moves each softmax entry by at most p (exp(2 s eps_c) - 1), i.e. G by
s p (exp(2 s eps_c) - 1). Those are the float64 bounds below (worst cases, not
estimates). The second check is tight: the same float64 computation on inputs
rounded to bfloat16 (ml_dtypes) and G rounded to bfloat16 leaves only float32
rounding, ~1e-6, far below the bfloat16 error, so a missing cast or a bfloat16
accumulation fails it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from broadface_jax import losses, queue as queue_lib, sharding, train_step
from tests.np_reference import np_compensate
from tests.test_train_step import fill_queue_randomly, host, random_batch
from tests.tiny_config import tiny_config
from tests.tiny_encoder import TinyEncoder

U = 2.0 ** -8  # bfloat16 unit roundoff
S, M3 = 16.0, 0.35
Q, D, C = 256, 64, 200
# Tight checks against the bf16-rounded float64 reference, measured over 20 seeds x both
# cases (2026-12-07, s 16): loss relative error max 1.4e-6, W gradient relative Frobenius
# error max 1.6e-4 (G entries within float32 noise of a bfloat16 rounding midpoint round
# the other way: ~1e-6 relative noise on p, hundreds of the 51,200 entries). Float32
# products against the same reference: gradient min 1.9e-3 (the loss sum hides the
# error: its bf16 errors cancel to ~1e-6 too, so only the gradient separates).
TIGHT_LOSS_RTOL = 1e-5
TIGHT_GRAD = 6e-4  # relative Frobenius


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _bf16(x):
    return np.asarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16), np.float64)


def _queue_case(rng, sampled: bool):
    """A queue of Q rows (some invalid), W[C, D], and for `sampled` a sample of W's rows."""
    q = queue_lib.init_queue(Q, D, 1)
    labels = rng.integers(0, C, Q)
    kernel = rng.normal(size=(C, D))
    w_old = kernel[labels] + 0.1 * rng.normal(size=(Q, D))
    emb = 3.0 * rng.normal(size=(Q, D))
    valid = rng.uniform(size=Q) < 0.8
    q = q.replace(embeddings=jnp.asarray(emb, jnp.float32),
                  weights=jnp.asarray(w_old, jnp.float32),
                  labels=jnp.asarray(labels, jnp.int32), valid=jnp.asarray(valid))
    if not sampled:
        return q, kernel.astype(np.float32), np.arange(C), labels, np.ones(C, bool)
    # a sample: every class but a quarter of the queue's, then 10 of the dropped rows as
    # "padding" (out of the softmax, and no queue row scored against them)
    dropped = rng.choice(np.unique(labels), len(np.unique(labels)) // 4, replace=False)
    kept = np.setdiff1d(np.arange(C), dropped)
    pos = np.full(C, -1)
    pos[kept] = np.arange(len(kept))
    rows = np.concatenate([kept, dropped[:10]])
    mask = np.arange(len(rows)) < len(kept)
    return q, kernel.astype(np.float32), rows, pos[labels], mask


def _jax_loss_grad(q, kernel, rows, scored, mask, sampled, dtype, chunk=64):
    loss = losses.build(dict(name="cosface", s=S, m3=M3))
    kn = losses.l2_normalize(jnp.asarray(kernel)[jnp.asarray(rows)])
    kw = dict(scored_labels=jnp.asarray(scored, jnp.int32),
              class_mask=jnp.asarray(mask)) if sampled else {}

    def f(kn):
        total, _, n = queue_lib.queue_loss_sum(q, jnp.asarray(kernel), kn, loss,
                                               chunk_size=chunk, matmul_dtype=dtype, **kw)
        return total, n

    (total, n), g = jax.jit(jax.value_and_grad(f, has_aux=True))(kn)
    return float(total), np.asarray(g, np.float64), np.asarray(kn, np.float64)


def _np_loss_grad(q, kernel, kn, scored, mask, round_bf16):
    """float64: (loss sum, dL/dkn, bound inputs); inputs and G rounded to bf16 if asked."""
    qh = host(q)
    e = np_compensate(qh.embeddings.astype(np.float64), qh.weights.astype(np.float64),
                      kernel.astype(np.float64)[qh.labels])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    w = kn
    if round_bf16:
        e, w = _bf16(e), _bf16(w)
    use = qh.valid & (scored >= 0)
    e, y = e[use], scored[use]
    cos = e @ w.T
    rows = np.arange(len(y))
    z = S * cos
    z[rows, y] = S * (cos[rows, y] - M3)
    z = np.where(mask[None, :], z, -np.inf)
    mx = z.max(1, keepdims=True)
    p = np.exp(z - mx)
    p /= p.sum(1, keepdims=True)
    loss = np.sum(np.log(np.exp(z - mx).sum(1)) + mx[:, 0] - z[rows, y])
    g = S * p
    g[rows, y] -= S
    if round_bf16:
        g = _bf16(g)
    return loss, g.T @ e, (e, g, p, len(y))


@pytest.mark.parametrize("sampled", [False, True], ids=["all_classes", "sampled"])
def test_bfloat16_queue_products_match_float64_within_the_bf16_bounds(sampled):
    rng = np.random.default_rng()
    q, kernel, rows, scored, mask = _queue_case(rng, sampled)
    loss_bf, grad_bf, kn = _jax_loss_grad(q, kernel, rows, scored, mask, sampled, "bfloat16")
    loss_64, grad_64, (e, g, p, n) = _np_loss_grad(q, kernel, kn, scored, mask, False)
    # the derived worst-case bounds against exact float64
    eps_c = 2 * U * (1 + U) + D * 2.0 ** -24
    assert abs(loss_bf - loss_64) <= 2 * S * eps_c * n
    bound = (2 * U * (1 + U) * np.abs(g).T @ np.abs(e)
             + S * (np.exp(2 * S * eps_c) - 1) * p.T @ np.abs(e) + 1e-6)
    assert (np.abs(grad_bf - grad_64) <= bound).all()
    # and the products really ran in bfloat16: exact on bf16-rounded inputs up to float32
    loss_r, grad_r, _ = _np_loss_grad(q, kernel, kn, scored, mask, True)
    assert abs(loss_bf - loss_r) <= TIGHT_LOSS_RTOL * abs(loss_r)
    assert _rel(grad_bf, grad_r) <= TIGHT_GRAD
    # the bf16 error is visible at this size (else the tight check would prove nothing)
    assert _rel(grad_64, grad_r) > 2 * TIGHT_GRAD


def _step_metrics(dtype, batches, rng_state):
    """Metrics and params of 2 steps with config.queue.matmul_dtype = dtype."""
    cfg = tiny_config("step", queue__size_per_device=64, queue__chunk_size=16,
                      loss__name="cosface", loss__m3=0.35)
    cfg.queue.matmul_dtype = dtype
    model = TinyEncoder(embedding_dim=cfg.model.embedding_dim)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(3), model=model)
    state = fill_queue_randomly(state, np.random.default_rng(rng_state), valid_frac=0.9)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)
    out = []
    for b in batches:
        state, m = step(state, sharding.shard_batch(b, mesh))
        out.append(host(m))
    return out, host(state.params)


@pytest.mark.slow  # two step compilations: ~1.5 min on the loaded 2-core machine
def test_the_step_reads_queue_matmul_dtype():
    """bfloat16 moves the loss within 2 s eps_c of float32 (the float32 step is the one
    tests/test_train_step.py checks against float64: per_example_in('float32', ...) is
    loss.per_example itself)."""
    rng = np.random.default_rng()
    batches = [random_batch(rng, 4) for _ in range(2)]
    seed = int(rng.integers(1 << 30))
    m32, p32 = _step_metrics("float32", batches, seed)
    mbf, pbf = _step_metrics("bfloat16", batches, seed)
    eps_c = 2 * U * (1 + U) + 6 * 2.0 ** -24
    l32 = np.array([m["loss_classifier"] for m in m32])
    lbf = np.array([m["loss_classifier"] for m in mbf])
    # step 1 (same state): Eq. 9 is a mean of rows, each within 2 s eps_c
    assert abs(lbf[0] - l32[0]) <= 2 * 64.0 * eps_c
    assert not np.array_equal(lbf, l32)  # the field reaches the queue's products
    assert mbf[0]["loss_encoder"] == m32[0]["loss_encoder"]  # the batch stays float32


def test_bad_matmul_dtype_is_a_config_error():
    from broadface_jax import config_check

    cfg = tiny_config("step", queue__matmul_dtype="float16")
    found = config_check.problems(cfg)
    assert any(p.startswith("config.queue.matmul_dtype='float16': must be one of")
               for p in found), found
    with pytest.raises(ValueError, match="config.queue.matmul_dtype='int8'"):
        queue_lib.per_example_in("int8", None, None, None, None)
