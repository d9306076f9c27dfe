"""An 8-device run saved at a step, then one more step: the reference of the elastic tests.

Shared by tests/test_elastic.py and tests/test_sampling_elastic.py (not a test
module: no fixtures here, the test modules wrap it in their own).
"""

from __future__ import annotations

import jax
import numpy as np

from broadface_jax import checkpointing, sharding, train_step
from tests.tiny_encoder import TinyEncoder


def random_batches(seed: int, n: int, num_classes: int) -> list[dict]:
    """n global batches of 16 8x8 images with labels in [0, num_classes)."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "label": rng.integers(0, num_classes, 16).astype(np.int32)} for _ in range(n)]


def train_save_and_step(workdir, config, batches: list[dict], steps: int):
    """Trains `steps` steps on 8 devices, saves at `steps`, then steps once more.

    Returns (workdir, batches, the saved state on the host, (state, metrics) after
    step steps + 1 on the host).
    """
    model = TinyEncoder(embedding_dim=8)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:8])
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), model)
    step = train_step.make_train_step(config, mesh, shardings, model=model)
    for b in batches[:steps]:
        state, _ = step(state, sharding.shard_batch(b, mesh))
    saved = jax.device_get(state)
    manager = checkpointing.create_manager(workdir, max_to_keep=1)
    checkpointing.save(manager, steps, state, force=True)
    manager.wait_until_finished()
    manager.close()
    state, metrics = step(state, sharding.shard_batch(batches[steps], mesh))
    return workdir, batches, saved, jax.device_get((state, metrics))
