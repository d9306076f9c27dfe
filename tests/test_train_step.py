"""The pure BroadFace train step: Eqs. 8 and 9, queue semantics, compile-once, 8 devices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broadface_jax import losses, sharding, train_step
from tests.tiny_config import STEP_CLASSES, STEP_EMBED_DIM, STEP_IMAGE, tiny_config
from tests.np_reference import (np_central_gradient, np_compensate, np_curricular_ce,
                                np_margin_ce)
from tests.tiny_encoder import TinyEncoder

C, D, IMG = STEP_CLASSES, STEP_EMBED_DIM, STEP_IMAGE



def one_device_mesh(config):
    return sharding.make_mesh(config.mesh, devices=jax.devices()[:1])


def random_batch(rng, n, classes=C):
    return {"image": rng.normal(size=(n, IMG, IMG, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def fill_queue_randomly(state, rng, valid_frac=0.6):
    q = state.queue
    n, d = q.embeddings.shape
    q = q.replace(
        embeddings=jnp.asarray(rng.normal(size=(n, d)) * 3, jnp.float32),
        weights=jnp.asarray(rng.normal(size=(n, d)) * 0.3, jnp.float32),
        labels=jnp.asarray(rng.integers(0, C, n), jnp.int32),
        valid=jnp.asarray(rng.uniform(size=n) < valid_frac))
    return state.replace(queue=q)


@pytest.mark.slow
def test_empty_queue_step_equals_plain_arcface_step():
    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    batch = random_batch(rng, 8)
    outs = []
    for capacity in (0, 16):
        cfg = tiny_config("step", per_device_batch_size=8, queue__size_per_device=capacity, queue__chunk_size=8)
        cfg.lr = 1e-3
        mesh = one_device_mesh(cfg)
        state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(3), model=model)
        init = host(state)
        step = train_step.make_train_step(cfg, mesh, sh, model=model)
        new, metrics = step(state, sharding.shard_batch(batch, mesh))
        outs.append((host(new.params), metrics))

    # Independent plain ArcFace step: mean margin loss over the batch, one optimizer.
    loss_fn = losses.build(cfg.loss)
    tx, _ = train_step.build_optimizer(cfg)

    def plain_loss(params):
        emb, _ = model.apply({"params": params["encoder"], "batch_stats": init.batch_stats},
                             batch["image"], train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.fold_in(init.rng, 0)})
        kn = losses.l2_normalize(params["classifier"]["kernel"])
        return jnp.mean(loss_fn.per_example(emb, kn, jnp.asarray(batch["label"])))

    loss, grads = jax.value_and_grad(plain_loss)(init.params)
    updates, _ = tx.update(grads, tx.init(init.params), init.params)
    ref_update = host(updates)
    for params, metrics in outs:
        update = jax.tree.map(lambda new, old: new - old, params, host(init.params))
        for got, want in zip(jax.tree.leaves(update), jax.tree.leaves(ref_update)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(metrics["loss_classifier"]), float(loss), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["loss_encoder"]), float(loss), rtol=1e-6)


def _np_eq9(W, emb, labels, q, compensate=True):
    """float64 Eq. 9 as a function of the classifier W; e* frozen at the current W.

    ``compensate=False``: the stale e⁻ as stored stands in for e* (queue.compensate off).
    """
    valid = q["valid"]
    e_old, w_old, ql = q["embeddings"][valid], q["weights"][valid], q["labels"][valid]
    e_star = np_compensate(e_old, w_old, W[ql]) if compensate else e_old

    def loss(Wm):
        total = np_margin_ce(emb, Wm, labels).sum() + np_margin_ce(e_star, Wm, ql).sum()
        return total / (len(labels) + valid.sum())

    return loss


@pytest.mark.parametrize("compensate", [True, False], ids=["compensated", "stale"])
def test_encoder_sees_batch_only_and_classifier_gradient_is_eq9(compensate):
    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    cfg = tiny_config("step", per_device_batch_size=6, queue__size_per_device=12, queue__chunk_size=6, queue__compensate=compensate)
    # classifier: plain SGD with lr 1 so that W_new = W - dL/dW
    cfg.optimizer.classifier.momentum = 0.0
    cfg.optimizer.classifier.weight_decay = 0.0
    cfg.optimizer.classifier.lr_scale = 1.0 / cfg.lr
    mesh = one_device_mesh(cfg)
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(1), model=model)
    W = rng.normal(size=(C, D))
    state = state.replace(params={**state.params,
                                  "classifier": {"kernel": jnp.asarray(W, jnp.float32)}})
    batch = random_batch(rng, 6)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)

    results = []
    for frac in (0.3, 0.9):
        s_host = host(fill_queue_randomly(state, rng, frac))
        new, _ = step(jax.device_put(s_host, sh), sharding.shard_batch(batch, mesh))
        results.append((s_host, host(new.params)))

    # Encoder: the same update whatever the queue holds (Eq. 8).
    chex.assert_trees_all_close(results[0][1]["encoder"], results[1][1]["encoder"],
                                rtol=1e-6, atol=1e-6)
    # Classifier: gradient of Eq. 9, against float64 central differences.
    s_host, new_params = results[1]
    emb, _ = model.apply({"params": s_host.params["encoder"], "batch_stats": s_host.batch_stats},
                         batch["image"], train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.fold_in(s_host.rng, 0)})
    q = {k: np.asarray(getattr(s_host.queue, k)) for k in ("embeddings", "weights", "labels",
                                                            "valid")}
    q["embeddings"] = q["embeddings"].astype(np.float64)
    q["weights"] = q["weights"].astype(np.float64)
    W64 = np.asarray(s_host.params["classifier"]["kernel"], np.float64)
    loss = _np_eq9(W64, np.asarray(emb, np.float64), batch["label"], q, compensate)
    h = 1e-6
    g_ref = np.zeros_like(W64)
    for idx in np.ndindex(*W64.shape):
        wp, wm = W64.copy(), W64.copy()
        wp[idx] += h
        wm[idx] -= h
        g_ref[idx] = (loss(wp) - loss(wm)) / (2 * h)
    g = W64 - np.asarray(new_params["classifier"]["kernel"], np.float64)
    np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4 * np.abs(g_ref).max())
    # ...and the classifier does depend on the queue
    assert not np.allclose(results[0][1]["classifier"]["kernel"], new_params["classifier"]["kernel"])


def test_curricularface_broadface_step_matches_float64():
    """A stateful loss outside the combined-margin family, through the BroadFace step.

    One step with a part-filled queue: t's EMA from the batch, Eq. 9 (batch and
    compensated queue scored with the updated t), Eq. 8's loss_encoder, the
    classifier's gradient (float64 central differences, t and e* held fixed as
    the step holds them) and queue_drift, all against float64 NumPy.
    """
    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    cfg = tiny_config("step", per_device_batch_size=6, queue__size_per_device=12, queue__chunk_size=6)
    cfg.loss.name = "curricularface"
    cfg.loss.s, s, m = 32.0, 32.0, 0.5  # m2 unset: CurricularFace's default 0.5
    cfg.optimizer.classifier.momentum = 0.0  # W_new = W - dL/dW
    cfg.optimizer.classifier.weight_decay = 0.0
    cfg.optimizer.classifier.lr_scale = 1.0 / cfg.lr
    mesh = one_device_mesh(cfg)
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(2), model=model)
    assert float(state.loss_state["t"]) == 0.0
    t0 = rng.uniform(0.1, 0.5)
    state = state.replace(params={**state.params, "classifier": {
        "kernel": jnp.asarray(rng.normal(size=(C, D)), jnp.float32)}},
        loss_state={"t": jnp.float32(t0)})
    s_host = host(fill_queue_randomly(state, rng, 0.6))
    batch = random_batch(rng, 6)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)
    new, metrics = step(jax.device_put(s_host, sh), sharding.shard_batch(batch, mesh))

    emb, _ = model.apply({"params": s_host.params["encoder"], "batch_stats": s_host.batch_stats},
                         batch["image"], train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.fold_in(s_host.rng, 0)})
    emb, y = np.asarray(emb, np.float64), batch["label"]
    W = np.asarray(s_host.params["classifier"]["kernel"], np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    t1 = 0.01 * np.mean(np.sum(unit(emb) * unit(W)[y], 1)) + 0.99 * t0
    np.testing.assert_allclose(float(new.loss_state["t"]), t1, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_state_t"]), t1, rtol=1e-5)

    valid = np.asarray(s_host.queue.valid)
    w_old = np.asarray(s_host.queue.weights, np.float64)[valid]
    ql = np.asarray(s_host.queue.labels)[valid]
    e_star = np_compensate(np.asarray(s_host.queue.embeddings, np.float64)[valid], w_old, W[ql])

    def eq9(Wm):
        return (np_curricular_ce(emb, Wm, y, t1, s, m).sum()
                + np_curricular_ce(e_star, Wm, ql, t1, s, m).sum()) / (len(y) + valid.sum())

    np.testing.assert_allclose(float(metrics["loss_classifier"]), eq9(W), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_encoder"]),
                               np_curricular_ce(emb, W, y, t1, s, m).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["queue_drift"]),
                               np.mean(np.sum(unit(w_old) * unit(W[ql]), 1)), rtol=1e-5)
    g_ref = np_central_gradient(eq9, W)
    g = W - np.asarray(new.params["classifier"]["kernel"], np.float64)
    np.testing.assert_allclose(g, g_ref, rtol=1e-3, atol=1e-4 * np.abs(g_ref).max())


@pytest.mark.slow  # state init + step compile + orbax save/restore: 23 s measured on 2 shared cores
def test_loss_state_and_applied_lr_resume_from_a_checkpoint(tmp_path):
    """CurricularFace's t and the injected lr schedule's count travel with the checkpoint."""
    from broadface_jax import checkpointing

    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    cfg = tiny_config("step", per_device_batch_size=4, queue__size_per_device=8, queue__chunk_size=0)
    cfg.loss.name = "curricularface"
    cfg.lr_boundaries, cfg.lr_decay = (2,), 0.5  # the resumed step 2 must use lr/2
    mesh = one_device_mesh(cfg)
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(4), model=model)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)
    batches = [sharding.shard_batch(random_batch(rng, 4), mesh) for _ in range(3)]
    for b in batches[:2]:
        state, _ = step(state, b)
    assert float(state.loss_state["t"]) != 0.0
    manager = checkpointing.create_manager(tmp_path, max_to_keep=1)
    checkpointing.save(manager, 2, state, force=True)
    checkpointing.wait(manager)
    abstract, _ = train_step.abstract_train_state(cfg, mesh, model)
    restored = checkpointing.restore(tmp_path, checkpointing.abstract_like(abstract, sh))
    chex.assert_trees_all_equal(host(restored.loss_state), host(state.loss_state))
    chex.assert_trees_all_equal(host(restored.opt_state), host(state.opt_state))
    a, m_a = step(state, batches[2])
    b, m_b = step(restored, batches[2])
    assert float(m_b["lr"]) == pytest.approx(cfg.lr * 0.5)
    chex.assert_trees_all_equal(host(m_a), host(m_b))
    chex.assert_trees_all_equal(host(a.params), host(b.params))


def test_ring_buffer_through_the_step_compiles_once():
    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    cfg = tiny_config("step", per_device_batch_size=2, queue__size_per_device=4, queue__chunk_size=2)
    mesh = sharding.make_mesh(cfg.mesh)  # 8 devices: global batch 16, queue 32
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(0), model=model)
    pure = chex.assert_max_traces(train_step.build_train_step(cfg, model), n=1)
    step = train_step.make_train_step(cfg, mesh, sh, step_fn=pure)
    seen = []  # (label, W row used) per sample, in order, per device slice
    k_steps = 7
    for _ in range(k_steps):
        batch = random_batch(rng, 16)
        kernel_before = np.array(state.params["classifier"]["kernel"])
        state, metrics = step(state, sharding.shard_batch(batch, mesh))
        seen.append((batch["label"], kernel_before[batch["label"]]))
    q = host(state.queue)
    for dev in range(8):
        rows = slice(dev * 4, (dev + 1) * 4)
        lab = np.concatenate([l[dev * 2:(dev + 1) * 2] for l, _ in seen])[-4:]
        w = np.concatenate([w[dev * 2:(dev + 1) * 2] for _, w in seen])[-4:]
        order = np.roll(np.arange(4), -int(q.position))
        np.testing.assert_array_equal(q.labels[rows][order], lab)
        np.testing.assert_array_equal(q.weights[rows][order], w)
    assert q.valid.all() and float(metrics["queue_fill"]) == 1.0
    assert int(state.step) == k_steps


@pytest.mark.slow
def test_eight_devices_match_one_device():
    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    runs = {}
    batches = []
    for i in range(5):
        b = random_batch(rng, 16)
        # device d's slice (rows 2d, 2d+1) gets labels from its own set {d, d+8} (C = 16 here)
        b["label"] = (np.repeat(np.arange(8), 2) + 8 * rng.integers(0, 2, 16)).astype(np.int32)
        batches.append(b)
    for n_dev, per_dev, q in ((1, 16, 32), (8, 2, 4)):
        cfg = tiny_config("step", per_device_batch_size=per_dev, queue__size_per_device=q, queue__chunk_size=min(q, 8))
        cfg.num_classes = 16
        cfg.lr = 1e-3  # keeps W near its init scale, where float32 sums differ least
        mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:n_dev])
        state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(7), model=model)
        step = train_step.make_train_step(cfg, mesh, sh, model=model)
        metrics = []
        for b in batches:
            state, m = step(state, sharding.shard_batch(b, mesh))
            metrics.append(host(m))
        runs[n_dev] = (state, metrics)
    s1, m1 = runs[1]
    s8, m8 = runs[8]
    chex.assert_trees_all_close(host(s1.params), host(s8.params), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(host(s1.batch_stats), host(s8.batch_stats), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(m1, m8, rtol=1e-5, atol=1e-5)
    # same queue contents (as a set of rows), different layouts
    q1, q8 = host(s1.queue), host(s8.queue)
    k1 = np.lexsort(q1.embeddings.T)
    k8 = np.lexsort(q8.embeddings.T)
    np.testing.assert_allclose(q1.embeddings[k1], q8.embeddings[k8], rtol=1e-5, atol=1e-5)
    # each device's queue shard holds only embeddings from its own slice of the batch
    for shard in s8.queue.labels.addressable_shards:
        dev = int(np.argmax([d == shard.device for d in jax.devices()]))
        labels = np.asarray(shard.data)
        assert set(labels.tolist()) <= {dev, dev + 8}, (dev, labels)


def test_config_errors_name_the_field():
    cfg = tiny_config("step", per_device_batch_size=3, queue__size_per_device=8)
    mesh = one_device_mesh(cfg)
    with pytest.raises(ValueError, match="size_per_device"):
        train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(0), model=TinyEncoder())
    cfg = tiny_config("step", per_device_batch_size=4, queue__size_per_device=8, queue__chunk_size=3)
    with pytest.raises(ValueError, match="chunk_size"):
        train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(0), model=TinyEncoder())
