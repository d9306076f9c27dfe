"""The BroadFace queue: past embeddings, their classifier rows, and compensation.

The queue is a pytree of fixed-shape arrays carried in the train state:

* ``embeddings`` E  f32[Q, D]: past embeddings e⁻ (not normalised),
* ``weights``    W⁻ f32[Q, D]: the classifier row W_y that was used with each
  embedding when it was computed (before that step's update, as in the
  authors' released code),
* ``labels``     i32[Q], ``valid`` bool[Q],
* ``position``   i32[]: the next write offset inside every shard.

The leading axis is laid out as ``num_shards`` contiguous shards of
``Q / num_shards`` rows. Under a mesh the queue is sharded on that axis over
'data', exactly like the batch, so shard i of the batch (device i's local
batch) is written into shard i of the queue: a ring buffer per device, written
with one ``jax.lax.dynamic_update_slice`` and no cross-device traffic.

Compensation (Eq. 7):  e* = e⁻ + (‖e⁻‖ / ‖W⁻_y‖) · (W_y − W⁻_y).

Precision of the queue's products (``config.queue.matmul_dtype``): the queue
loss costs two Q x D x C (or x S, sampled) products per step, the logits and
the W gradient. "float32" (default) runs them in float32; "bfloat16" casts
both inputs of each product to bfloat16 and accumulates in float32
(`queue_cosines`); everything else (normalisation, compensation, margins,
softmax, the gradient's sum over chunks) stays float32.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from broadface_jax import losses
from broadface_jax.config_check import QUEUE_MATMUL_DTYPES as MATMUL_DTYPES


@flax.struct.dataclass
class QueueState:
    embeddings: jax.Array  # f32[Q, D]
    weights: jax.Array  # f32[Q, D]
    labels: jax.Array  # i32[Q]
    valid: jax.Array  # bool[Q]
    position: jax.Array  # i32[], write offset within each shard
    num_shards: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def capacity(self) -> int:
        return self.labels.shape[0]

    @property
    def shard_capacity(self) -> int:
        return self.capacity // self.num_shards


def init_queue(capacity: int, dim: int, num_shards: int = 1) -> QueueState:
    """An empty queue of `capacity` rows in `num_shards` equal ring buffers."""
    if capacity < 0 or (capacity and capacity % num_shards):
        raise ValueError(
            f"queue capacity {capacity} must be a non-negative multiple of the "
            f"number of data shards ({num_shards})")
    return QueueState(
        embeddings=jnp.zeros((capacity, dim), jnp.float32),
        weights=jnp.zeros((capacity, dim), jnp.float32),
        labels=jnp.zeros((capacity,), jnp.int32),
        valid=jnp.zeros((capacity,), jnp.bool_),
        position=jnp.zeros((), jnp.int32),
        num_shards=num_shards,
    )


def compensate(embeddings: jax.Array, old_weights: jax.Array,
               current_weights: jax.Array) -> jax.Array:
    """Eq. 7: e* = e⁻ + ‖e⁻‖/‖W⁻‖ · (W − W⁻), row by row.

    Args:
      embeddings: e⁻, f32[N, D] past (unnormalised) embeddings.
      old_weights: W⁻, f32[N, D] the classifier rows stored with them.
      current_weights: W, f32[N, D] the current classifier rows of the same labels.
    """
    scale = (jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
             / jnp.maximum(jnp.linalg.norm(old_weights, axis=-1, keepdims=True), 1e-12))
    return embeddings + scale * (current_weights - old_weights)


_CONTRACT_D = (((1,), (1,)), ((), ()))  # [N, D] x [C, D] -> [N, C]
_CONTRACT_N = (((0,), (0,)), ((), ()))  # [N, C] x [N, D] -> [C, D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def queue_cosines(e_normalized: jax.Array, kernel_normalized: jax.Array,
                  dtype: str) -> jax.Array:
    """f32[N, C] cosines e_n @ W_n^T with both products in `dtype` (float32 accumulation).

    Forward: e_n and W_n cast to `dtype`, one dot with float32 output. Backward
    (custom, so the W gradient is accumulated in float32 too, where JAX's own
    transpose would return it in `dtype`): the incoming float32 cotangent G and
    the other input cast to `dtype`, ``G^T @ e_n`` for W and ``G @ W_n`` for e,
    both with float32 output.
    """
    lo = jnp.dtype(dtype)
    return jax.lax.dot_general(e_normalized.astype(lo), kernel_normalized.astype(lo),
                               _CONTRACT_D, preferred_element_type=jnp.float32)


def _queue_cosines_fwd(e_normalized, kernel_normalized, dtype):
    return queue_cosines(e_normalized, kernel_normalized, dtype), (e_normalized,
                                                                   kernel_normalized)


def _queue_cosines_bwd(dtype, res, g):
    e_n, w_n = res
    lo = jnp.dtype(dtype)
    g = g.astype(lo)
    d_e = jax.lax.dot_general(g, w_n.astype(lo), (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    d_w = jax.lax.dot_general(g, e_n.astype(lo), _CONTRACT_N,
                              preferred_element_type=jnp.float32)
    return d_e.astype(e_n.dtype), d_w.astype(w_n.dtype)


queue_cosines.defvjp(_queue_cosines_fwd, _queue_cosines_bwd)


def per_example_in(matmul_dtype: str, loss, embeddings: jax.Array,
                   kernel_normalized: jax.Array, labels: jax.Array, state=None,
                   num_classes: int | None = None,
                   class_mask: jax.Array | None = None) -> jax.Array:
    """``loss.per_example`` with the cosine product in `matmul_dtype` (`queue_cosines`).

    "float32" is ``loss.per_example`` itself (the same computation, bit for
    bit); otherwise only the product changes: normalisation, one-hot, target
    cosine, margins and softmax stay float32 (``losses.cosines``).
    """
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"config.queue.matmul_dtype={matmul_dtype!r}: must be one of "
                         f"{', '.join(MATMUL_DTYPES)}")
    product = (None if matmul_dtype == "float32"
               else lambda e, w: queue_cosines(e, w, matmul_dtype))
    return loss.per_example(embeddings, kernel_normalized, labels, state, num_classes,
                            class_mask, product=product)


def _split(x: jax.Array, num_shards: int) -> jax.Array:
    return x.reshape((num_shards, x.shape[0] // num_shards) + x.shape[1:])


def _merge(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def enqueue(queue: QueueState, embeddings: jax.Array, weights: jax.Array,
            labels: jax.Array) -> QueueState:
    """Writes a batch into the ring buffers; shard i of the batch into shard i.

    The batch (B rows) is split into `num_shards` contiguous slices of B/S rows,
    matching how a batch sharded on 'data' is laid out over devices. Each slice
    is written at `position` of its queue shard with `dynamic_update_slice`;
    the write position advances by B/S and wraps. The shard capacity must be a
    multiple of B/S so that a slice never wraps (checked at trace time).
    """
    if queue.capacity == 0:
        return queue
    s = queue.num_shards
    batch = labels.shape[0]
    if batch % s:
        raise ValueError(f"batch size {batch} is not a multiple of the {s} queue shards")
    local = batch // s
    if queue.shard_capacity % local:
        raise ValueError(
            f"queue shard capacity {queue.shard_capacity} must be a multiple of the "
            f"per-shard batch {local} (ring-buffer writes never wrap)")
    # One index type for dynamic_update_slice: with JAX_ENABLE_X64=1 a literal 0 is int64
    # while the saved position is int32.
    pos = jnp.asarray(queue.position, jnp.int32)
    zero = jnp.zeros((), jnp.int32)

    def write(buf, new):
        new = _split(new.astype(buf.dtype), s)
        start = (zero, pos) + (zero,) * (buf.ndim - 1)
        return _merge(jax.lax.dynamic_update_slice(_split(buf, s), new, start))

    return queue.replace(
        embeddings=write(queue.embeddings, embeddings),
        weights=write(queue.weights, weights),
        labels=write(queue.labels, labels),
        valid=write(queue.valid, jnp.ones_like(labels, jnp.bool_)),
        position=(pos + local) % queue.shard_capacity,
    )


def fill(queue: QueueState) -> jax.Array:
    """Fraction of valid rows."""
    if queue.capacity == 0:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(queue.valid.astype(jnp.float32))


def queue_loss_sum(queue: QueueState, kernel: jax.Array, kernel_normalized: jax.Array,
                   loss, *, chunk_size: int, compensate_embeddings: bool = True,
                   num_classes: int | None = None, loss_state=None,
                   scored_labels: jax.Array | None = None,
                   class_mask: jax.Array | None = None,
                   matmul_dtype: str = "float32"):
    """Sum of the per-example loss over the valid (compensated) queue rows, in chunks.

    This is the queue half of Eq. 9's numerator. The compensated embeddings are
    data: no gradient flows through e*, only through the logits into the
    classifier (`kernel_normalized`).

    The queue is processed `chunk_size` rows of every shard at a time under
    `jax.lax.scan`. Because the queue term depends on the classifier only, its
    gradient is computed in the same pass as its value (a custom VJP whose
    residual is the [C, D] gradient): per chunk, one matmul for the logits and
    one for the gradient, and only one chunk's [rows, C] logits alive at a
    time. Peak memory grows with the chunk, not with Q, and nothing is
    recomputed in the backward pass (plain rematerialisation would redo the
    logits matmul).

    Args:
      queue: the queue (its rows are split into `queue.num_shards` shards).
      kernel: the current classifier W[C, D] (raw; gives W_y for Eq. 7).
      kernel_normalized: W with L2-normalised rows (differentiated).
      loss: a `losses.Loss` (`losses.build(config.loss)`): the same per-example
        loss as the batch term, so every registered loss is BroadFace's too.
      chunk_size: rows per shard per chunk (0 = the whole shard); must divide
        the shard capacity.
      compensate_embeddings: apply Eq. 7 (False: use e⁻ as stored).
      num_classes: real class count when `kernel` has padding rows.
      loss_state: the loss's state for this step (stateful losses: the state
        already updated from the batch); not updated here.
      scored_labels: i32[Q], with a sampled classifier (`class_sampling`):
        each row's label as a row of `kernel_normalized` (the sampled rows),
        -1 where the label was not sampled (that row is left out of the loss);
        the stored labels still pick W_y from `kernel` for Eq. 7 and the drift.
        None: `kernel_normalized` holds every class, scored by `queue.labels`.
      class_mask: bool[rows of kernel_normalized], the real classes among them
        (padding rows of a sampled classifier leave the softmax).
      matmul_dtype: ``config.queue.matmul_dtype``: the dtype of the inputs of
        each chunk's two products (logits, W gradient), accumulated in float32
        (`queue_cosines`); "float32" is the plain float32 computation.

    Returns:
      (loss_sum, drift_sum, n_valid): the summed loss over valid rows, the sum
      over valid rows of cos(W⁻_j, W_{y_j}) between each stored row and the
      current classifier row of its label (classifier drift, from the same
      chunked gather of W_y as the compensation; the step's `queue_drift`
      metric is drift_sum / n_valid), and the count of valid rows scored
      (float32; with `scored_labels`, the valid rows whose label was sampled).
      Only loss_sum carries a gradient.
    """
    s, ql = queue.num_shards, queue.shard_capacity
    chunk = min(int(chunk_size), ql) if chunk_size else ql
    if ql % chunk:
        raise ValueError(
            f"config.queue.chunk_size={chunk_size} must divide the per-device queue "
            f"size {ql}")

    # [S, Ql, ...] -> [n_chunks, S, chunk, ...]: each scan step takes `chunk`
    # rows from every shard, so the work stays on the devices holding them.
    def chunks(x):
        x = _split(x, s)
        x = x.reshape((s, ql // chunk, chunk) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    sampled = scored_labels is not None
    if not sampled:
        scored_labels = queue.labels
    rows = tuple(chunks(x) for x in (queue.embeddings, queue.weights, queue.labels,
                                     queue.valid, scored_labels))
    kernel_const = jax.lax.stop_gradient(kernel)

    def prepare(rows):
        """Compensated embeddings (data), labels, mask and summed drift of one chunk."""
        emb, w_old, lab, val, lab_s = (r.reshape((-1,) + r.shape[2:]) for r in rows)
        w_cur = jnp.take(kernel_const, lab, axis=0)  # W_y (a cross-shard gather if W is sharded)
        e = compensate(emb, w_old, w_cur) if compensate_embeddings else emb
        drift = jnp.sum(losses.l2_normalize(w_old) * losses.l2_normalize(w_cur), axis=-1)
        scored = (val & (lab_s >= 0)) if sampled else val
        return e, lab_s, scored, jnp.sum(jnp.where(val, drift, 0.0))

    def chunk_loss(kn, e, lab, val):
        per_row = per_example_in(matmul_dtype, loss, e, kn, lab, loss_state, num_classes,
                                 class_mask)
        return jnp.sum(jnp.where(val, per_row, 0.0))

    def scan_all(kn):
        def body(carry, rows_i):
            loss_sum, drift_sum, grad = carry
            e, lab, val, drift = prepare(rows_i)
            loss_i, grad_i = jax.value_and_grad(chunk_loss)(kn, e, lab, val)
            return (loss_sum + loss_i, drift_sum + drift, grad + grad_i), None

        zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros_like(kn))
        if chunk == ql:
            out, _ = body(zero, tuple(r[0] for r in rows))
        else:
            out, _ = jax.lax.scan(body, zero, rows)
        return out

    # (loss, drift) with the gradient of the loss computed in the forward pass;
    # drift is a statistic (its cotangent is ignored).
    @jax.custom_vjp
    def loss_and_drift(kn):
        loss_sum, drift_sum, _ = scan_all(kn)
        return loss_sum, drift_sum

    def fwd(kn):
        loss_sum, drift_sum, grad = scan_all(kn)
        return (loss_sum, drift_sum), grad

    def bwd(grad, cts):
        return (grad * cts[0],)

    loss_and_drift.defvjp(fwd, bwd)

    loss_sum, drift_sum = loss_and_drift(kernel_normalized)
    drift_sum = jax.lax.stop_gradient(drift_sum)
    scored = (queue.valid & (scored_labels >= 0)) if sampled else queue.valid
    n_valid = jnp.sum(scored.astype(jnp.float32))
    return loss_sum, drift_sum, n_valid


def relayout(queue: QueueState, capacity: int, num_shards: int) -> QueueState:
    """Re-lays a queue saved on one device count out for another (elastic resume).

    Host-side (NumPy), once, at restore. The valid rows are ordered newest
    first (row age within each old shard follows from its write position), the
    newest `capacity` rows are kept, rounded down to a multiple of
    `num_shards` so that every new shard holds the same count, and dealt out
    round-robin, each new shard written oldest to newest from slot 0 so the
    ring continues from a common write position. Nothing is kept that was not
    valid; at most `num_shards - 1` extra oldest rows are dropped.
    """
    import numpy as np

    emb, w, lab, val = (np.asarray(x) for x in (queue.embeddings, queue.weights,
                                                queue.labels, queue.valid))
    old_s, old_ql = queue.num_shards, queue.shard_capacity
    pos = int(queue.position)
    dim = emb.shape[1]
    order = []  # global row indices, newest first
    for age in range(old_ql):
        r = (pos - 1 - age) % old_ql if old_ql else 0
        for s in range(old_s):
            i = s * old_ql + r
            if val[i]:
                order.append(i)
    new = init_queue(capacity, dim, num_shards)
    if capacity == 0:
        return new
    ql = capacity // num_shards
    n_per_shard = min(len(order), capacity) // num_shards
    keep = np.asarray(order[: n_per_shard * num_shards], np.int64)
    out = {k: np.zeros(np.shape(getattr(new, k)), getattr(new, k).dtype)
           for k in ("embeddings", "weights", "labels", "valid")}
    for j, i in enumerate(keep):
        shard, rank = j % num_shards, j // num_shards  # rank 0 = newest
        slot = shard * ql + (n_per_shard - 1 - rank)
        out["embeddings"][slot] = emb[i]
        out["weights"][slot] = w[i]
        out["labels"][slot] = lab[i]
        out["valid"][slot] = True
    return new.replace(**{k: jnp.asarray(v) for k, v in out.items()},
                       position=jnp.asarray(n_per_shard % ql, jnp.int32))
