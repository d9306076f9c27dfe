"""Class sampling (config.classifier.sample_rate < 1): the sample, the sampled step, resume."""

from __future__ import annotations

import functools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broadface_jax import class_sampling, config_check, sharding, train_step
from tests.np_reference import np_compensate, np_curricular_ce, np_margin_ce
from tests.test_train_step import D, IMG, host
from tests.tiny_config import tiny_config
from tests.tiny_encoder import TinyEncoder

# Tolerances of the float32 step against float64 NumPy: 200 data seeds per case through
# sampled_step_errors (a scratch script, 2026-12-06): loss relative error max 2.6e-7
# (2.3e-7 1dev and 8dev_model_overflow, 2.6e-7 the padding case), W-gradient error /
# max |gradient| max 6.0e-6 (1dev; 3.7e-6 overflow, 4.4e-6 padding; central
# differences, h = 1e-6). The bounds are >= 16x those maxima; the planted bugs were
# off by > 1e-1.
LOSS_RTOL = 1e-5
GRAD_ATOL = 1e-4  # times max |gradient|


# ------------------------------------------------------------------ the sample


@functools.lru_cache(maxsize=None)
def _sampler(n, r, s, num_classes):
    return jax.jit(functools.partial(
        class_sampling.sample_classes, num_shards=n, rows_per_shard=r, sample_per_shard=s,
        num_classes=num_classes))


def _sample(key, batch, q_labels, q_valid, n, r, s, num_classes):
    return _sampler(n, r, s, num_classes)(key, jnp.asarray(batch), jnp.asarray(q_labels),
                                          jnp.asarray(q_valid))


def test_sample_holds_every_positive_then_uniform_negatives():
    rng = np.random.default_rng()
    n, r, num_classes = 4, 50, 190  # the last shard: 40 real rows, 10 padding
    s = class_sampling.sample_size(0.3, r)
    assert s == 15
    batch = rng.integers(0, num_classes, 6)
    q_labels, q_valid = rng.integers(0, num_classes, 12), rng.uniform(size=12) < 0.7
    positives = set(batch.tolist()) | set(q_labels[q_valid].tolist())
    counts = np.zeros(n * r)
    keys = 400
    for k in range(keys):
        smp = host(_sample(jax.random.PRNGKey(k), batch, q_labels, q_valid, n, r, s,
                           num_classes))
        assert smp.local.shape == (n, s)
        assert (np.diff(smp.local, axis=1) > 0).all()  # ascending, no repeats
        assert ((smp.local >= 0) & (smp.local < r)).all()
        np.testing.assert_array_equal(smp.rows, (smp.local + r * np.arange(n)[:, None]).ravel())
        assert positives <= set(smp.rows.tolist())
        assert smp.valid.all()  # 15 <= 40 real rows on every shard: no padding drawn
        np.testing.assert_array_equal(smp.position[smp.rows], np.arange(n * s))
        assert (np.delete(smp.position, smp.rows) == -1).all()
        assert smp.positives_batch == len(set(batch.tolist()))
        assert smp.positives_queue == len(positives - set(batch.tolist()))
        counts[smp.rows] += 1
    # Negatives: uniform over each shard's real, non-positive rows. Binomial(keys, p) per
    # row; the bound is 6 standard deviations (a false alarm is < 1e-8 per row).
    for shard in range(n):
        rows = np.arange(shard * r, min((shard + 1) * r, num_classes))
        pos = [c for c in rows if c in positives]
        neg = np.array([c for c in rows if c not in positives])
        p = (s - len(pos)) / len(neg)
        sd = np.sqrt(keys * p * (1 - p))
        assert np.abs(counts[neg] - keys * p).max() < 6 * sd, (shard, counts[neg], keys * p)
        assert (counts[pos] == keys).all()
    assert (counts[num_classes:] == 0).all()


def test_padding_rows_fill_a_short_shard_masked_and_queue_overflow_is_counted():
    rng = np.random.default_rng()
    n, r, num_classes, s = 2, 50, 60, 12  # shard 1: 10 real rows, so 2 padding rows drawn
    batch = rng.integers(0, 50, 4)  # the batch: shard 0
    q_labels = rng.permutation(50)[:20]  # 20 distinct shard-0 classes
    smp = host(_sample(jax.random.PRNGKey(int(rng.integers(1 << 30))), batch, q_labels,
                       np.ones(20, bool), n, r, s, num_classes))
    shard0, shard1 = smp.rows[:s], smp.rows[s:]
    assert set(batch.tolist()) <= set(shard0.tolist())  # the batch's classes: always
    q_only = set(q_labels.tolist()) - set(batch.tolist())
    assert len(q_only & set(shard0.tolist())) == s - len(set(batch.tolist()))  # then the queue's
    assert smp.positives_max_shard == len(q_only) + len(set(batch.tolist()))
    np.testing.assert_array_equal(shard1, np.arange(50, 62))  # 10 real rows + 2 padding
    np.testing.assert_array_equal(smp.valid, smp.rows < num_classes)
    assert (~smp.valid).sum() == 2


def test_same_key_same_sample_other_step_other_sample():
    rng = np.random.default_rng()
    args = (rng.integers(0, 400, 8), rng.integers(0, 400, 16), rng.uniform(size=16) < 0.5)
    rng_state = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    draws = [host(_sample(class_sampling.step_key(rng_state, jnp.int32(step)), *args,
                          2, 200, 40, 400)).rows for step in (5, 5, 6)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])


# ------------------------------------------------------------------ config


def test_bad_rate_and_too_small_sample_are_config_errors():
    cfg = tiny_config("step", per_device_batch_size=8, queue__size_per_device=16, queue__chunk_size=8)
    for bad in (0.0, -0.1, 1.5):
        cfg.classifier.sample_rate = bad
        found = [p for p in config_check.problems(cfg) if "sample_rate" in p]
        assert found == [f"config.classifier.sample_rate={bad!r}: must be a finite number "
                         "in (0, 1]"], found
        with pytest.raises(ValueError, match=r"config\.classifier\.sample_rate"):
            train_step.validate_config(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    cfg.classifier.sample_rate = 0.5
    assert not [p for p in config_check.problems(cfg) if "sample_rate" in p]
    # C = 11 on one shard: S = 6 rows < the 8 classes a batch of 8 may hold
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    with pytest.raises(ValueError) as e:
        train_step.validate_config(cfg, mesh)
    assert str(e.value) == (
        "config.classifier.sample_rate=0.5: samples 6 of the 11 classifier rows per shard "
        "(1 shard(s)), fewer than the 8 classes a global batch of 8 can put on one shard; "
        "use a rate >= 0.7273 (or 1.0)")
    cfg.classifier.sample_rate = 0.73  # ceil(0.73 * 11) = 9 >= 8
    train_step.validate_config(cfg, mesh)


# ------------------------------------------------------------------ the step


def test_rate_one_is_todays_step():
    """1.0 samples nothing: no sampling ops, no sample metrics (a rate < 1 has both).

    (Configs without the field are no longer read: config_check requires every
    field of configs/default.py, and config.json's state format refuses older
    workdirs.) The float64 references of tests/test_train_step.py cover the step.
    """
    rng = np.random.default_rng()
    model = TinyEncoder(embedding_dim=D)
    cfg = tiny_config("step", per_device_batch_size=4, queue__size_per_device=8, queue__chunk_size=4)
    sampled = tiny_config("step", per_device_batch_size=4, queue__size_per_device=8,
                          queue__chunk_size=4, classifier__sample_rate=0.4)  # 5 of 11 rows
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(0), model=model)
    batch = {"image": rng.normal(size=(4, IMG, IMG, 3)).astype(np.float32),
             "label": rng.integers(0, 11, 4).astype(np.int32)}
    programs, metric_names = [], []
    for c in (cfg, sampled):
        fn = train_step.build_train_step(c, model, mesh)
        programs.append(str(jax.make_jaxpr(fn)(state, batch)))
        metric_names.append(sorted(jax.eval_shape(fn, state, batch)[1]))
    assert "top_k" not in programs[0] and "threefry" not in programs[0]
    assert "top_k" in programs[1]
    assert any(k.startswith("sample_") for k in metric_names[1])
    assert not any(k.startswith("sample_") for k in metric_names[0])


# id: (devices, classifier_sharding, loss, per-device batch, per-device queue, C, rate)
CASES = {
    # one shard of 180 rows, S = 72; random queue labels, 60% valid
    "1dev": (1, "replicated", "arcface", 8, 16, 180, 0.4),
    # 8 shards of 23 rows, S = 10; the queue: 16 distinct classes of shard 0, all valid,
    # so some of its classes never fit (dropped and counted)
    "8dev_model_overflow": (8, "model", "arcface", 1, 2, 180, 0.4),
    # 8 shards of 10 rows, S = 9; the last shard has 3 real rows: 6 padding rows sampled
    "8dev_all_curricularface_padding": (8, "all", "curricularface", 1, 2, 73, 0.9),
}


@functools.lru_cache(maxsize=None)
def _sampled_step(case: str):
    devices, mode, loss_name, b, q, num_classes, rate = CASES[case]
    cfg = tiny_config("step", per_device_batch_size=b, queue__size_per_device=q, queue__chunk_size=2 if devices > 1 else 8)
    cfg.num_classes = num_classes
    cfg.classifier.sample_rate = rate
    cfg.classifier_sharding = mode
    if mode == "model":
        cfg.mesh.model = devices
    cfg.loss.name = loss_name
    cfg.loss.s = 32.0
    cfg.optimizer.classifier.momentum = 0.0  # W_new = W - dL/dW
    cfg.optimizer.classifier.weight_decay = 0.0
    cfg.optimizer.classifier.lr_scale = 1.0 / cfg.lr
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
    model = TinyEncoder(embedding_dim=D)
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(1), model=model)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)
    return cfg, mesh, model, host(state), sh, step


def sampled_step_errors(case: str, rng: np.random.Generator) -> dict:
    """One sampled step on fresh random inputs against float64 NumPy over its sample.

    Returns the errors (loss relative, gradient / max |gradient|) after the exact checks.
    """
    cfg, mesh, model, state0, sh, step = _sampled_step(case)
    devices, _, _, b, q, num_classes, rate = CASES[case]
    n = sharding.classifier_shards(mesh, cfg.classifier_sharding)
    c_pad = train_step.padded_num_classes(cfg, mesh)
    r = c_pad // n
    s = class_sampling.sample_size(rate, r)
    bsz, qsz = b * devices, q * devices  # the global batch and queue
    W = rng.normal(size=(c_pad, D))  # padding rows too: they must not count
    overflow = case.endswith("overflow")
    if overflow:  # every queue row valid, 16 distinct classes of shard 0: more than S fit
        q_lab, q_val = rng.permutation(r)[:qsz], np.ones(qsz, bool)
    else:
        q_lab, q_val = rng.integers(0, num_classes, qsz), rng.uniform(size=qsz) < 0.6
    queue = state0.queue.replace(
        embeddings=rng.normal(size=(qsz, D)).astype(np.float32) * 3,
        weights=rng.normal(size=(qsz, D)).astype(np.float32) * 0.3,
        labels=q_lab.astype(np.int32), valid=q_val)
    t0 = rng.uniform(0.1, 0.5)
    state = state0.replace(
        step=np.int32(rng.integers(0, 1000)), rng=np.asarray(
            jax.random.PRNGKey(int(rng.integers(1 << 30)))),
        params={**state0.params, "classifier": {"kernel": W.astype(np.float32)}}, queue=queue,
        loss_state={"t": np.float32(t0)} if state0.loss_state else {})
    batch = {"image": rng.normal(size=(bsz, IMG, IMG, 3)).astype(np.float32),
             "label": rng.integers(0, num_classes, bsz).astype(np.int32)}
    new, metrics = step(jax.device_put(state, sh), sharding.shard_batch(batch, mesh))
    new, metrics = host(new), host(metrics)

    smp = host(class_sampling.sample_classes(
        class_sampling.step_key(state.rng, state.step), batch["label"], q_lab, q_val,
        num_shards=n, rows_per_shard=r, sample_per_shard=s, num_classes=num_classes))
    keep = smp.rows[smp.valid]  # the sampled real classes
    where = {c: i for i, c in enumerate(keep.tolist())}

    emb, _ = model.apply({"params": state.params["encoder"], "batch_stats": state.batch_stats},
                         batch["image"], train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
    emb, y = np.asarray(emb, np.float64), batch["label"]
    W = np.asarray(state.params["classifier"]["kernel"], np.float64)
    scored = q_val & np.isin(q_lab, keep)
    e_star = np_compensate(queue.embeddings[scored].astype(np.float64),
                           queue.weights[scored].astype(np.float64), W[q_lab[scored]])
    yb = np.array([where[c] for c in y])
    yq = np.array([where[c] for c in q_lab[scored]], dtype=np.int64)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    if cfg.loss.name == "curricularface":
        t1 = 0.01 * np.mean(np.sum(unit(emb) * unit(W)[y], 1)) + 0.99 * t0
        ce = functools.partial(np_curricular_ce, t=t1, s=32.0, m=0.5)
    else:
        ce = functools.partial(np_margin_ce, s=32.0)

    def eq9(w_keep):
        return (ce(emb, w_keep, yb).sum() + ce(e_star, w_keep, yq).sum()) / (len(y) + len(yq))

    # exact: what was sampled, counted and left out
    assert metrics["sample_rows_per_shard"] == s
    assert metrics["sample_positives_batch"] == len(set(y.tolist()))
    assert metrics["sample_positives_queue"] == len(set(q_lab[q_val].tolist()) - set(y.tolist()))
    assert metrics["sample_queue_dropped"] == q_val.sum() - scored.sum()
    if overflow:
        assert metrics["sample_queue_dropped"] > 0  # the overflow path is exercised
    if case.endswith("padding"):
        assert (~smp.valid).sum() == 6  # padding rows sampled (and masked)
    g = W - np.asarray(new.params["classifier"]["kernel"], np.float64)
    unsampled = np.setdiff1d(np.arange(c_pad), keep)
    assert (g[unsampled] == 0).all()  # no gradient outside the sample (momentum/wd off)
    # float64: the loss and the gradient of the sampled rows
    loss_ref = eq9(W[keep])
    loss_err = abs(float(metrics["loss_classifier"]) - loss_ref) / abs(loss_ref)
    h = 1e-6
    g_ref = np.zeros((len(keep), D))
    for idx in np.ndindex(*g_ref.shape):
        wp, wm = W[keep].copy(), W[keep].copy()
        wp[idx] += h
        wm[idx] -= h
        g_ref[idx] = (eq9(wp) - eq9(wm)) / (2 * h)
    grad_err = np.abs(g[keep] - g_ref).max() / np.abs(g_ref).max()
    return {"loss": loss_err, "grad": grad_err}


# 20-50 s each on the loaded 2-core machine (compiles of the 8-device step): one case
# in `make test`, the other two in `make test-slow`.
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=() if c == "8dev_model_overflow" else pytest.mark.slow) for c in CASES])
def test_sampled_step_is_a_float64_softmax_over_the_sample(case):
    errors = sampled_step_errors(case, np.random.default_rng())
    assert errors["loss"] < LOSS_RTOL, errors
    assert errors["grad"] < GRAD_ATOL, errors


# ------------------------------------------------------------------ resume


@pytest.mark.slow  # two training runs and three worker processes (~1 min on 2 shared cores)
def test_kill_and_resume_with_sampling_is_bit_identical(tmp_path):
    from broadface_jax import checkpointing, train
    from tests import test_reliability as rel
    from tests.test_train import tiny_model

    overrides = {"classifier.sample_rate": 0.5, "num_classes": 48,
                 "dataset.synthetic.num_identities": 48}
    straight = tmp_path / "straight"
    train.train_and_evaluate(rel._config(overrides), straight, model=tiny_model())
    assert {r["sample_rows_per_shard"] for r in rel._records(straight)
            if "loss_encoder" in r} == {24.0}
    run = tmp_path / "run"
    run.mkdir()
    proc = rel._spawn(run, overrides)
    rel._wait_for(lambda: any(s >= 3 for s in rel._logged_steps(run)), proc, "step 3")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert checkpointing.all_steps(run)[-1] < 6
    final = rel._spawn(run, overrides)
    assert final.wait(timeout=300) == 0, rel._log(run)[-3000:]
    rel._assert_same_state(rel._config(overrides), run, straight, 6)
    want = {r["step"]: r for r in rel._records(straight) if "loss_encoder" in r}
    got = {r["step"]: r for r in rel._records(run) if "loss_encoder" in r}
    assert sorted(got) == list(range(1, 7))
    for step, r in got.items():
        for k in ("loss_classifier", "sample_positives_batch", "sample_positives_queue"):
            assert r[k] == want[step][k], (step, k)
