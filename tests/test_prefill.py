"""Queue pre-fill (``config.queue.prefill_steps``): the first update sees a full queue,
training reads the stream after the pre-fill batches, and resume is exact through it."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from broadface_jax import input_pipeline, train
from tests.test_train import leaves, read_metrics, restore_state, tiny_config, tiny_model


def _config(total_steps: int):
    c = tiny_config(total_steps=total_steps)  # 8 devices x 2 images, queue 4 per device
    c.queue.prefill_steps = 2  # 2 batches fill it
    c.checkpoint_every_steps = 2
    return c


def _stream_labels(config, start: int, n: int) -> list[np.ndarray]:
    it = input_pipeline.create_train_iterator(config, start_step=start)
    try:
        return [np.asarray(next(it)["label"]) for _ in range(n)]
    finally:
        it.close()


def test_first_update_sees_a_full_queue(tmp_path):
    c = _config(total_steps=1)
    train.train_and_evaluate(c, tmp_path, model=tiny_model())
    first = [m for m in read_metrics(tmp_path) if m["step"] == 1 and "queue_used" in m][0]
    assert first["queue_used"] == 4 * jax.device_count()  # every row valid at update 1
    # the queue after step 1: slot 1 = stream batch 1 (pre-fill), slot 0 = the batch of
    # step 1, which is stream batch 2 (batches 0 and 1 went to the pre-fill)
    q = restore_state(c, str(tmp_path), 1).queue
    labels = np.asarray(q.labels).reshape(jax.device_count(), 2, 2)  # shard, slot, row
    b1, b2 = _stream_labels(c, 1, 2)
    np.testing.assert_array_equal(labels[:, 1].reshape(-1), b1)
    np.testing.assert_array_equal(labels[:, 0].reshape(-1), b2)
    assert int(q.position) == 2
    # the pre-filled rows are embeddings, not zeros
    emb = np.asarray(q.embeddings).reshape(jax.device_count(), 2, 2, -1)[:, 1]
    assert np.all(np.linalg.norm(emb, axis=-1) > 1e-3)


@pytest.mark.parametrize("from_step", [2, 0])
def test_resume_through_prefill_is_exact(tmp_path, from_step):
    """4 steps straight == the same run resumed from its step-2 checkpoint (or restarted
    from scratch: the pre-fill is redone identically)."""
    c = _config(total_steps=4)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train_and_evaluate(c, straight, model=tiny_model())
    shutil.copytree(straight, resumed)
    for step in (4, 2) if from_step == 0 else (4,):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    train.train_and_evaluate(c, resumed, model=tiny_model())
    a, b = restore_state(c, str(straight), 4), restore_state(c, str(resumed), 4)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)
