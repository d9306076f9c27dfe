"""Class sampling (sample_rate < 1) through a restore: same device count and elastic.

An 8-device sampled run saves at step 10. Restored on 8 devices (through
`train.initial_state`, the trainer's path) its step 11 is the uninterrupted
run's step 11 bit for bit: the sample is a function of the saved rng, the
step and the labels. Restored on 4 devices (elastic: the queue re-laid out),
the state but the queue is the saved one bit for bit, the step samples what
`sample_classes` draws from the saved rng, step 10 and the re-laid queue, and
two restores give the same step 11 bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from broadface_jax import checkpointing, class_sampling, sharding, train, train_step
from tests.tiny_config import tiny_config
from tests.tiny_encoder import TinyEncoder

STEPS, CLASSES, RATE = 10, 400, 0.5  # S = 200 > the <= 144 positives: random negatives


def _config(num_devices: int):
    return tiny_config("step", model__embedding_dim=8, num_classes=CLASSES, image_size=8,
                       per_device_batch_size=16 // num_devices, queue__size_per_device=16,
                       queue__chunk_size=8, loss__s=16.0, loss__m2=0.3, lr=0.01,
                       lr_boundaries=(), init_from="", classifier__sample_rate=RATE)


def _batches(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, CLASSES, 16).astype(np.int32)} for _ in range(n)]


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sampled_elastic")
    batches = _batches(int(np.random.default_rng().integers(2**31)), STEPS + 1)
    config = _config(8)
    model = TinyEncoder(embedding_dim=8)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:8])
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), model)
    step = train_step.make_train_step(config, mesh, shardings, model=model)
    for b in batches[:STEPS]:
        state, _ = step(state, sharding.shard_batch(b, mesh))
    saved = jax.device_get(state)
    manager = checkpointing.create_manager(workdir, max_to_keep=1)
    checkpointing.save(manager, STEPS, state, force=True)
    manager.wait_until_finished()
    manager.close()
    state, metrics = step(state, sharding.shard_batch(batches[STEPS], mesh))
    return workdir, batches, saved, jax.device_get((state, metrics))


def _resume_and_step(workdir, batch, num_devices):
    config = _config(num_devices)
    model = TinyEncoder(embedding_dim=8)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:num_devices])
    state, shardings, origin = train.initial_state(config, mesh, workdir, model)
    restored = jax.device_get(state)
    step = train_step.make_train_step(config, mesh, shardings, model=model)
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    return origin, restored, jax.device_get((state, metrics))


def _assert_trees_equal(a, b, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{what}{jax.tree_util.keystr(path)}"


@pytest.mark.slow  # two restores and two step compilations on 8 and 4 devices
def test_sampled_run_resumes_bit_identical_and_elastically(sampled_run):
    workdir, batches, saved, (ref_state, ref_metrics) = sampled_run
    assert "sample_rows_per_shard" in ref_metrics
    # same device count: step 11 is the uninterrupted run's, bit for bit
    _, _, (state8, metrics8) = _resume_and_step(workdir, batches[STEPS], 8)
    _assert_trees_equal(state8, ref_state, "state")
    _assert_trees_equal(metrics8, ref_metrics, "metrics")

    # 4 devices: the queue is re-laid out; the rest is the saved state
    origin, restored, (state4, metrics4) = _resume_and_step(workdir, batches[STEPS], 4)
    assert "elastic resume" in origin
    for part in ("step", "params", "batch_stats", "opt_state", "rng"):
        _assert_trees_equal(getattr(restored, part), getattr(saved, part), part)
    q = restored.queue
    labels = batches[STEPS]["label"]
    c_pad = saved.params["classifier"]["kernel"].shape[0]
    smp = jax.device_get(class_sampling.sample_classes(
        class_sampling.step_key(saved.rng, saved.step), labels, q.labels, q.valid,
        num_shards=1, rows_per_shard=c_pad,
        sample_per_shard=class_sampling.sample_size(RATE, c_pad), num_classes=CLASSES))
    assert metrics4["sample_rows_per_shard"] == class_sampling.sample_size(RATE, c_pad)
    assert metrics4["sample_positives_batch"] == len(set(labels.tolist()))
    assert metrics4["sample_positives_batch"] == smp.positives_batch
    assert metrics4["sample_positives_queue"] == smp.positives_queue
    # and a second elastic restore gives step 11 bit for bit
    _, _, again = _resume_and_step(workdir, batches[STEPS], 4)
    _assert_trees_equal(again, (state4, metrics4), "4-device step 11")
