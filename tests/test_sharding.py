"""Class-sharded classifier: W split over classes matches the replicated run."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from broadface_jax import sharding, train_step
from tests.tiny_config import tiny_config
from tests.test_train_step import host, random_batch
from tests.tiny_encoder import TinyEncoder


def run(mode, mesh_shape, batches, num_classes, steps_model=None):
    cfg = tiny_config("step", per_device_batch_size=2, queue__size_per_device=4, queue__chunk_size=2)
    cfg.num_classes = num_classes
    cfg.lr = 1e-3
    cfg.classifier_sharding = mode
    cfg.mesh.data, cfg.mesh.model = mesh_shape
    mesh = sharding.make_mesh(cfg.mesh)
    model = TinyEncoder(embedding_dim=6)
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(11), model=model)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)
    metrics = []
    for b in batches:
        state, m = step(state, sharding.shard_batch(b, mesh))
        metrics.append(host(m))
    return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("mode,mesh_shape", [("all", (8, 1)), ("model", (2, 4)), ("all", (2, 4))])
def test_sharded_classifier_matches_replicated(mode, mesh_shape):
    rng = np.random.default_rng()
    num_classes = 13  # not a multiple of the shards: padded to 16, padding masked
    batches = [random_batch(rng, 16, classes=num_classes) for _ in range(4)]
    ref_state, ref_metrics = run("replicated", (8, 1), batches, num_classes)
    state, metrics = run(mode, mesh_shape, batches, num_classes)
    kernel = state.params["classifier"]["kernel"]
    want = P(("data", "model"), None) if mode == "all" else P("model", None)
    assert kernel.sharding.spec == want
    n_shards = 8 if mode == "all" else 4
    assert kernel.shape[0] == 16 and len({str(s.index) for s in kernel.addressable_shards}) == n_shards
    # optimizer momentum of W follows W
    traces = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", ()) == kernel.shape]
    assert traces and all(t.sharding.spec == want for t in traces)
    np.testing.assert_allclose(np.asarray(kernel)[:num_classes],
                               np.asarray(ref_state.params["classifier"]["kernel"])[:num_classes],
                               rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(host(state.params["encoder"]), host(ref_state.params["encoder"]),
                                rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.queue.weights), np.asarray(ref_state.queue.weights),
                               rtol=1e-5, atol=1e-6)


def test_mesh_errors_name_the_field():
    cfg = tiny_config("step")
    cfg.mesh.model = 3
    with pytest.raises(ValueError, match="mesh.model=3"):
        sharding.make_mesh(cfg.mesh)
    cfg.mesh.model, cfg.mesh.data = 2, 3
    with pytest.raises(ValueError, match="data=3"):
        sharding.make_mesh(cfg.mesh)
    with pytest.raises(ValueError, match="classifier_sharding"):
        sharding.classifier_spec("rows")


def test_queue_chunk_follows_the_class_shards():
    """With W over n shards a device scores n gathered chunks: the chunk is divided by n."""
    cfg = tiny_config("step", per_device_batch_size=128, queue__size_per_device=8192, queue__chunk_size=2048)
    mesh = sharding.make_mesh(cfg.mesh)
    assert train_step.queue_chunk(cfg, mesh) == 2048
    cfg.classifier_sharding = "all"
    assert train_step.queue_chunk(cfg, mesh) == 256
    cfg.mesh.data, cfg.mesh.model, cfg.classifier_sharding = 2, 4, "model"
    assert train_step.queue_chunk(cfg, sharding.make_mesh(cfg.mesh)) == 512
    cfg.queue.chunk_size = 0  # unchunked stays unchunked
    assert train_step.queue_chunk(cfg, sharding.make_mesh(cfg.mesh)) == 0
