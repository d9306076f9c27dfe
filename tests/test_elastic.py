"""Elastic resume: a checkpoint written on 8 devices resumes on 4 and on 1.

The run trains 10 steps on 8 devices (the queue fills and its ring buffers
wrap), saves, and continues one more step there (the reference). The
checkpoint is then restored through the trainer's `initial_state` on meshes
of `jax.devices()[:4]` and `[:1]`, with the same global batch (per-device
batch x2 / x8) and the same queue rows per device, so the queue has 1/2 and
1/8 of the rows it was saved with. Checks:

* every leaf but the queue equals the saved state exactly;
* the queue holds exactly the newest rows of every old ring buffer (ages
  computed here from the saved write position, independently of
  `queue.relayout`), and the relayout is reported;
* the first step after resume continues the run: on the batch the 8-device
  run saw next, the encoder loss equals the 8-device run's (1e-5) and so do
  the updated encoder parameters (the encoder's gradient is that of the batch
  loss alone, Eq. 8, whatever the queue holds); the classifier loss uses the
  re-laid queue: it equals (batch losses + the per-row losses of exactly the
  kept rows) / (16 + kept), while the 8-device value is the same expression
  over all 128 rows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from broadface_jax import checkpointing, elastic, losses, sharding, train, train_step
from broadface_jax import queue as queue_lib
from tests.tiny_config import tiny_config
from tests.saved_run import random_batches, train_save_and_step
from tests.tiny_encoder import TinyEncoder

STEPS = 10
PER_DEVICE_8 = 2  # 16 images per step on every mesh
QUEUE_PER_DEVICE = 16


def _config(num_devices: int):
    return tiny_config("step", model__embedding_dim=8, num_classes=10, image_size=8,
                       per_device_batch_size=PER_DEVICE_8 * 8 // num_devices,
                       queue__size_per_device=QUEUE_PER_DEVICE, queue__chunk_size=8, loss__s=16.0,
                       loss__m2=0.3, lr=0.01, lr_boundaries=(), init_from="")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """10 steps on 8 devices, checkpoint, then step 11 (the reference)."""
    batches = random_batches(int(np.random.default_rng().integers(2**31)), STEPS + 1, 10)
    return train_save_and_step(tmp_path_factory.mktemp("elastic"), _config(8), batches, STEPS)


def _newest_rows(q, keep_per_shard: int) -> set:
    """(label, embedding bytes) of the rows younger than keep_per_shard in each old shard."""
    ql = q.labels.shape[0] // q.num_shards
    pos = int(q.position)
    rows = set()
    for s in range(q.num_shards):
        for r in range(ql):
            age = (pos - 1 - r) % ql
            i = s * ql + r
            if age < keep_per_shard and q.valid[i]:
                rows.add((int(q.labels[i]), np.asarray(q.embeddings[i]).tobytes(),
                          np.asarray(q.weights[i]).tobytes()))
    return rows


@pytest.mark.parametrize("num_devices", [4, 1])
def test_resume_on_fewer_devices(saved_run, num_devices, caplog):
    workdir, batches, saved, (ref_state, ref_metrics) = saved_run
    assert saved.queue.num_shards == 8 and bool(np.all(saved.queue.valid))
    assert int(saved.queue.position) != 0  # the ring buffers wrapped
    config = _config(num_devices)
    model = TinyEncoder(embedding_dim=8)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:num_devices])
    assert elastic.saved_queue_rows(workdir) == 8 * QUEUE_PER_DEVICE

    with caplog.at_level("INFO"):
        state, shardings, origin = train.initial_state(config, mesh, workdir, model)
    assert "elastic resume" in origin
    assert any("elastic resume" in r.getMessage() for r in caplog.records)
    restored = jax.device_get(state)

    # Everything but the queue is the saved state, bit for bit.
    for part in ("step", "params", "batch_stats", "opt_state", "rng"):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(getattr(restored, part)),
                                jax.tree.leaves(getattr(saved, part))):
            assert np.array_equal(a, b), f"{part}{jax.tree_util.keystr(path)}"

    # The queue: new layout, the newest rows of every old ring buffer.
    q = restored.queue
    capacity = QUEUE_PER_DEVICE * num_devices
    assert q.num_shards == num_devices and q.labels.shape == (capacity,)
    assert state.queue.labels.sharding.is_equivalent_to(shardings.queue.labels, 1)
    assert bool(np.all(q.valid))
    got = {(int(q.labels[i]), np.asarray(q.embeddings[i]).tobytes(),
            np.asarray(q.weights[i]).tobytes()) for i in range(capacity)}
    assert got == _newest_rows(saved.queue, capacity // 8)

    # One more step on the batch the 8-device run saw next.
    step = train_step.make_train_step(config, mesh, shardings, model=model)
    state, metrics = step(state, sharding.shard_batch(batches[STEPS], mesh))
    metrics = jax.device_get(metrics)
    assert int(state.step) == STEPS + 1
    np.testing.assert_allclose(metrics["loss_encoder"], ref_metrics["loss_encoder"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params["encoder"])),
                    jax.tree.leaves(ref_state.params["encoder"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(metrics["queue_used"]) == capacity
    # Eq. 9 over the re-laid queue: (sum of batch losses + per-row losses of the
    # kept rows) / (16 + kept); the 8-device step used all 128 rows.
    row_loss = _queue_row_losses(config, saved)
    kept = np.array([(int(saved.queue.labels[i]), np.asarray(saved.queue.embeddings[i]).tobytes(),
                      np.asarray(saved.queue.weights[i]).tobytes()) in got
                     for i in range(saved.queue.labels.shape[0])])
    batch_sum = 16 * float(ref_metrics["loss_encoder"])
    np.testing.assert_allclose(float(ref_metrics["loss_classifier"]),
                               (batch_sum + row_loss.sum()) / (16 + row_loss.size), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_classifier"]),
                               (batch_sum + row_loss[kept].sum()) / (16 + kept.sum()), rtol=1e-4)


def _queue_row_losses(config, saved) -> np.ndarray:
    """Per-row margin loss of the saved queue under the saved classifier (Eq. 7 + margin)."""
    q, kernel = saved.queue, np.asarray(saved.params["classifier"]["kernel"])
    e = queue_lib.compensate(q.embeddings, q.weights, kernel[np.asarray(q.labels)])
    return np.asarray(losses.build(config.loss).per_example(
        e, losses.l2_normalize(kernel), q.labels, num_classes=int(config.num_classes)), np.float64)


def test_same_device_count_is_a_plain_restore(saved_run):
    workdir, _, saved, _ = saved_run
    config = _config(8)
    model = TinyEncoder(embedding_dim=8)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:8])
    abstract, shardings = train_step.abstract_train_state(config, mesh, model)
    state, note = elastic.restore(workdir, checkpointing.abstract_like(abstract, shardings))
    assert note is None
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(saved)):
        assert np.array_equal(a, b)


def test_changed_rows_per_device_is_named(saved_run):
    workdir, _, _, _ = saved_run
    config = _config(4)
    config.queue.size_per_device = 12
    config.per_device_batch_size = 4
    config.queue.chunk_size = 4
    model = TinyEncoder(embedding_dim=8)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:4])
    abstract, shardings = train_step.abstract_train_state(config, mesh, model)
    with pytest.raises(checkpointing.CheckpointError, match="size_per_device=12"):
        elastic.restore(workdir, checkpointing.abstract_like(abstract, shardings))
