"""Class sampling (PartialFC-style) for the batch and the BroadFace queue.

With ``config.classifier.sample_rate = r < 1`` each step scores the batch and
the queue against a sample of the classifier's rows instead of all C of them.
Per classifier shard (W[C_pad, D] cut into n = `sharding.classifier_shards`
blocks of R = C_pad / n rows; n = 1 when W is replicated) the sample holds
``S = sample_size(r, R) = ceil(r * R)`` rows, a static size:

1. every class of the global batch living on that shard,
2. then every class of the valid queue rows living on it,
3. then uniformly drawn other classes of the shard, up to S;

padding rows (classes >= num_classes) are drawn last and masked out of the
softmax (`ClassSample.valid`). The draw is a function of
``step_key(state.rng, step)`` and of the labels only, so an exact resume
replays the same sample. The rows are ordered by class within each shard.

Positives beyond S: ``validate`` (a config error, before anything runs)
requires S >= min(R, global batch), so the batch's classes always fit.
The queue's may not (it is 64x the batch): when a shard's batch + queue
classes exceed S, the queue classes that did not fit are not sampled and
their queue rows are left out of that step's queue loss and of Eq. 9's
denominator; the step counts them (`sample_queue_dropped`).

The step (``train_step.build_train_step``) gathers the sampled rows
(`gather_rows`), scores the batch (B x S) and every queue chunk (chunk x S)
against them, and the gradient of W is zero outside the sample. The
optimizer then runs on the whole W, as arcface_torch's PartialFC_V2 (its
sampled rows are ``self.weight[index]`` of the one parameter the SGD
optimizer holds): an unsampled row gets no gradient, but its momentum buffer
still decays (``buf = mu * buf + wd * w``) and it still moves by it and by
weight decay. Eq. 7 reads W_y from the full W (the queue's labels are
sampled anyway).
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

#: Folded into the state's rng to make the sampling key stream (apart from dropout's).
_SAMPLE_STREAM = 0x53414D50  # 'SAMP'


def sample_rate(config: Any) -> float:
    """``config.classifier.sample_rate`` (its range is ``config_check``'s)."""
    return float(config.classifier.sample_rate)


def sample_size(rate: float, rows_per_shard: int) -> int:
    """S = ceil(rate * R), rounded to 6 digits first (0.3 * 100 is 30, not 31)."""
    return max(1, min(int(rows_per_shard), math.ceil(round(rate * rows_per_shard, 6))))


def problems(config: Any, num_shards: int, rows_per_shard: int, global_batch: int
             ) -> list[str]:
    """Why this rate cannot sample the batch's positives (empty when it can)."""
    rate = sample_rate(config)
    if not 0.0 < rate <= 1.0 or rate == 1.0:
        return []  # the range is config_check's; 1.0 does not sample
    s = sample_size(rate, rows_per_shard)
    need = min(rows_per_shard, global_batch)
    if s >= need:
        return []
    return [f"config.classifier.sample_rate={rate:g}: samples {s} of the {rows_per_shard} "
            f"classifier rows per shard ({num_shards} shard(s)), fewer than the {need} "
            f"classes a global batch of {global_batch} can put on one shard; use a rate "
            f">= {need / rows_per_shard:.4g} (or 1.0)"]


@flax.struct.dataclass
class ClassSample:
    local: jax.Array  # i32[n, S]: sampled row of each shard, within the shard, ascending
    rows: jax.Array  # i32[n * S]: the same as rows of the full W
    valid: jax.Array  # bool[n * S]: a real class (False: padding row, out of the softmax)
    position: jax.Array  # i32[C_pad]: each class's row in the sample, -1 if not sampled
    positives_batch: jax.Array  # f32[]: classes of the global batch
    positives_queue: jax.Array  # f32[]: classes of valid queue rows not in the batch
    positives_max_shard: jax.Array  # f32[]: most batch + queue classes on one shard


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """The sampling key of a step: a function of the state's rng and step only."""
    return jax.random.fold_in(jax.random.fold_in(rng, _SAMPLE_STREAM), step)


def _shard_sample(key: jax.Array, shard: jax.Array, in_batch: jax.Array,
                  in_queue: jax.Array, real: jax.Array, size: int) -> jax.Array:
    """One shard's sample: i32[size] rows of its R, ascending (inputs: bool[R] each).

    Batch classes score 3, other queue classes 2, other real rows U[0, 1) from
    ``fold_in(key, shard)``, padding -1; the top `size` scores are taken.
    """
    u = jax.random.uniform(jax.random.fold_in(key, shard), in_batch.shape, jnp.float32)
    score = jnp.where(in_batch, 3.0, jnp.where(in_queue, 2.0, jnp.where(real, u, -1.0)))
    _, rows = jax.lax.top_k(score, size)
    return jnp.sort(rows.astype(jnp.int32))


def sample_classes(key: jax.Array, batch_labels: jax.Array, queue_labels: jax.Array,
                   queue_valid: jax.Array, *, num_shards: int, rows_per_shard: int,
                   sample_per_shard: int, num_classes: int,
                   shard_sharding: Any = None) -> ClassSample:
    """The step's sample: S rows per shard, batch classes, then queue classes, then random.

    Args:
      key: `step_key(state.rng, state.step)`.
      batch_labels: i32[B] of the global batch; queue_labels / queue_valid: the queue's.
      num_shards, rows_per_shard: n and R, W's class axis as [n, R].
      sample_per_shard: S (`sample_size`).
      num_classes: the real class count (rows >= it are padding).
      shard_sharding: W's class sharding (a NamedSharding of [n, R] arrays, or
        None): each shard's draw and top-k then run under `jax.shard_map` on
        the devices holding that shard (left to the compiler, the top-k was
        run on all n x R scores on every device). The result does not depend
        on it: shard i draws from ``fold_in(key, i)``.
    """
    n, r, s = num_shards, rows_per_shard, sample_per_shard
    c_pad = n * r
    in_batch = jnp.zeros((c_pad,), jnp.bool_).at[batch_labels].set(True)
    # invalid queue rows point past the end and are dropped by the scatter
    q_idx = jnp.where(queue_valid, queue_labels, c_pad)
    in_queue = jnp.zeros((c_pad,), jnp.bool_).at[q_idx].set(True, mode="drop")
    in_queue_only = in_queue & ~in_batch
    real = jnp.arange(c_pad) < num_classes

    def per_shard(key, shards, ib, iq, re):
        return jax.vmap(lambda i, b, q, v: _shard_sample(key, i, b, q, v, s))(shards, ib, iq, re)

    args = (jnp.arange(n, dtype=jnp.int32),
            *(x.reshape(n, r) for x in (in_batch, in_queue_only, real)))
    spec = None if shard_sharding is None else shard_sharding.spec
    if n > 1 and spec:
        rows_spec = jax.sharding.PartitionSpec(spec[0])
        per_shard = jax.shard_map(per_shard, mesh=shard_sharding.mesh,
                                  in_specs=(jax.sharding.PartitionSpec(), rows_spec, spec,
                                            spec, spec),
                                  out_specs=spec)
    local = per_shard(key, *args)
    rows = (local + (jnp.arange(n, dtype=jnp.int32) * r)[:, None]).reshape(-1)
    position = jnp.full((c_pad,), -1, jnp.int32).at[rows].set(
        jnp.arange(n * s, dtype=jnp.int32))
    per_shard_pos = jnp.sum((in_batch | in_queue).reshape(n, r), axis=1)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return ClassSample(local=local, rows=rows, valid=rows < num_classes, position=position,
                       positives_batch=f32(jnp.sum(in_batch)),
                       positives_queue=f32(jnp.sum(in_queue_only)),
                       positives_max_shard=f32(jnp.max(per_shard_pos)))


def gather_rows(kernel: jax.Array, sample: ClassSample) -> jax.Array:
    """The sampled rows of W[C_pad, D] as [n * S, D], each shard's from its own block.

    The gradient flows back into W's sampled rows only (zero elsewhere).
    """
    n, s = sample.local.shape
    w = kernel.reshape(n, kernel.shape[0] // n, kernel.shape[1])
    return jnp.take_along_axis(w, sample.local[:, :, None], axis=1).reshape(n * s, -1)
