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

from broadface_jax import class_sampling, sharding, train, train_step
from tests.tiny_config import tiny_config
from tests.saved_run import random_batches, train_save_and_step
from tests.tiny_encoder import TinyEncoder

STEPS, CLASSES, RATE = 10, 400, 0.5  # S = 200 > the <= 144 positives: random negatives


def _config(num_devices: int):
    return tiny_config("step", model__embedding_dim=8, num_classes=CLASSES, image_size=8,
                       per_device_batch_size=16 // num_devices, queue__size_per_device=16,
                       queue__chunk_size=8, loss__s=16.0, loss__m2=0.3, lr=0.01,
                       lr_boundaries=(), init_from="", classifier__sample_rate=RATE)


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    batches = random_batches(int(np.random.default_rng().integers(2**31)), STEPS + 1, CLASSES)
    return train_save_and_step(tmp_path_factory.mktemp("sampled_elastic"), _config(8), batches, STEPS)


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
