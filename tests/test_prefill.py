"""Queue pre-fill (``config.queue.prefill_steps``): the first update sees a full queue,
training reads the stream after the pre-fill batches, and resume is exact through it."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from broadface_jax import input_pipeline, losses, models, train, train_step
from tests.tiny_config import tiny_config
from tests.test_train import leaves, read_metrics, restore_state, tiny_model


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


def _run_and_copy(tmp_path, delete: tuple[int, ...], run=None):
    c = _config(total_steps=4)
    run = run or (lambda workdir: train.train_and_evaluate(c, workdir, model=tiny_model()))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    shutil.copytree(straight, resumed)
    for step in delete:
        shutil.rmtree(resumed / "checkpoints" / str(step))
    run(resumed)
    return c, straight, resumed


def _counting_run(monkeypatch, counts: list[dict]):
    """Runs with model=None, counting per run the encoder, loss and optimizer builds.

    ``models.build_encoder`` returns the tiny encoder, so the run is the same as
    with ``model=tiny_model()``; each run should build each part once
    (``train_step.Parts``), however many times it builds a state or a step.
    """
    calls = {}

    def counted(module, name, result=None):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return result() if result else real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(models, "build_encoder", tiny_model)
    counted(losses, "build")
    counted(train_step, "build_optimizer")

    def run(workdir):
        calls.clear()
        train.train_and_evaluate(_config(total_steps=4), workdir)
        counts.append(dict(calls))

    return run


def _assert_same_state(c, a_dir, b_dir):
    a, b = restore_state(c, str(a_dir), 4), restore_state(c, str(b_dir), 4)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_first_update_sees_a_full_queue_and_resume_is_exact(tmp_path, monkeypatch):
    counts = []
    c, straight, resumed = _run_and_copy(tmp_path, delete=(4,),  # resume from step 2
                                         run=_counting_run(monkeypatch, counts))
    # a fresh run (prefill, step, memory check) and a resume each build every part once
    assert counts == [{"build_encoder": 1, "build": 1, "build_optimizer": 1}] * 2, counts
    first = [m for m in read_metrics(straight) if m["step"] == 1 and "queue_used" in m][0]
    assert first["queue_used"] == 4 * jax.device_count()  # every row valid at update 1
    # stream batches 0 and 1 went to the pre-fill; steps 1 and 2 read batches 2 and 3 and
    # overwrote slots 0 and 1 of every shard
    q = restore_state(c, str(straight), 2).queue
    labels = np.asarray(q.labels).reshape(jax.device_count(), 2, 2)  # shard, slot, row
    b2, b3 = _stream_labels(c, 2, 2)
    np.testing.assert_array_equal(labels[:, 0].reshape(-1), b2)
    np.testing.assert_array_equal(labels[:, 1].reshape(-1), b3)
    assert int(q.position) == 0
    _assert_same_state(c, straight, resumed)


@pytest.mark.slow
def test_restart_before_the_first_checkpoint_redoes_the_same_prefill(tmp_path):
    c, straight, resumed = _run_and_copy(tmp_path, delete=(4, 2))  # no checkpoint left
    _assert_same_state(c, straight, resumed)
    # the pre-filled rows are embeddings of the model at step 0, not zeros
    q = restore_state(c, str(straight), 2).queue
    assert np.all(np.linalg.norm(np.asarray(q.embeddings), axis=-1) > 1e-3)
