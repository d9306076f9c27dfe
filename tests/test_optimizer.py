"""The optimizer against a hand-written PyTorch-style SGD, the lr schedule, gradient clipping.

PyTorch's ``optim.SGD(lr, momentum=mu, weight_decay=wd)`` (dampening 0, no
Nesterov) after ``clip_grad_norm_`` is, per step::

    g = clip(g);  g += wd * p;  buf = mu * buf + g;  p -= lr * buf

written here in float64 NumPy and compared with ``train_step.build_optimizer``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broadface_jax import train_step
from tests.tiny_config import tiny_config

SHAPES = {"encoder": {"conv": (3, 4), "bias": (5,)}, "classifier": {"kernel": (6, 3)}}


def _config(clip=0.0, warmup=2, boundaries=(3, 5)):
    c = tiny_config("default")
    c.lr, c.lr_decay, c.lr_boundaries, c.warmup_steps = 0.1, 0.1, boundaries, warmup
    c.grad_clip_norm = clip
    c.optimizer.encoder.update(dict(name="sgd", momentum=0.9, weight_decay=0.05, lr_scale=1.0))
    c.optimizer.classifier.update(dict(name="sgd", momentum=0.8, weight_decay=0.02, lr_scale=0.5))
    return c


def np_lr(config, step):
    """The documented schedule: warmup ramp, then lr * decay ** #{b <= step}."""
    w = config.warmup_steps
    if step < w:
        return config.lr * (step + 1) / w
    return config.lr * config.lr_decay ** sum(b <= step for b in config.lr_boundaries)


def _random_tree(rng, scale=1.0):
    return {part: {k: rng.normal(size=s) * scale for k, s in leaves.items()}
            for part, leaves in SHAPES.items()}


def np_torch_sgd(config, params, grads_seq):
    """float64 PyTorch SGD (weight decay into the gradient before momentum), per part,
    with clip_grad_norm_ of each part's gradient; returns params and lrs after each step."""
    p = {part: {k: v.astype(np.float64).copy() for k, v in leaves.items()}
         for part, leaves in params.items()}
    buf = {part: {k: np.zeros_like(v) for k, v in leaves.items()} for part, leaves in p.items()}
    history = []
    for step, grads in enumerate(grads_seq):
        lrs = {}
        for part in p:
            opt = config.optimizer[part]
            g = {k: v.astype(np.float64).copy() for k, v in grads[part].items()}
            if config.grad_clip_norm > 0:
                norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
                g = {k: v * min(1.0, config.grad_clip_norm / norm) for k, v in g.items()}
            lrs[part] = np_lr(config, step) * opt.lr_scale
            for k in g:
                g[k] = g[k] + opt.weight_decay * p[part][k]
                buf[part][k] = opt.momentum * buf[part][k] + g[k]
                p[part][k] = p[part][k] - lrs[part] * buf[part][k]
        history.append(({part: dict(v) for part, v in p.items()}, lrs))
    return history


def _run_optax(config, params, grads_seq):
    tx, _ = train_step.build_optimizer(config)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for grads in grads_seq:
        updates, opt_state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads),
                                    opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out.append((jax.tree.map(np.asarray, params), opt_state))
    return out


def test_sgd_matches_pytorch_style_sgd_over_a_schedule():
    """7 steps over warmup and two boundaries: weight decay enters before momentum."""
    rng = np.random.default_rng()
    config = _config()
    params = _random_tree(rng)
    grads_seq = [_random_tree(rng, 0.5) for _ in range(7)]
    want = np_torch_sgd(config, params, grads_seq)
    got = _run_optax(config, params, grads_seq)
    for step, ((p_ref, lr_ref), (p_got, opt_state)) in enumerate(zip(want, got)):
        for part in SHAPES:
            for k in SHAPES[part]:
                np.testing.assert_allclose(p_got[part][k], p_ref[part][k], rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {step} {part}/{k}")
        applied = train_step.applied_lr(opt_state)
        for part in SHAPES:
            np.testing.assert_allclose(float(applied[part]), lr_ref[part], rtol=1e-6,
                                       err_msg=f"step {step} applied lr of {part}")
        metrics = train_step.lr_metrics(config, opt_state)
        assert set(metrics) == {"lr", "lr_encoder", "lr_classifier"}  # the parts' scales differ
        np.testing.assert_allclose(float(metrics["lr"]), lr_ref["encoder"], rtol=1e-6)
        np.testing.assert_allclose(float(metrics["lr_classifier"]), lr_ref["classifier"],
                                   rtol=1e-6)


def test_one_lr_metric_when_the_parts_share_it():
    config = _config()
    config.optimizer.classifier.lr_scale = 1.0
    tx, _ = train_step.build_optimizer(config)
    params = jax.tree.map(jnp.asarray, _random_tree(np.random.default_rng()))
    _, opt_state = tx.update(params, tx.init(params), params)
    metrics = train_step.lr_metrics(config, opt_state)
    assert list(metrics) == ["lr"] and float(metrics["lr"]) == pytest.approx(np_lr(config, 0))


@pytest.mark.parametrize("warmup", [0, 4])
def test_schedule_at_warmup_and_each_boundary(warmup):
    config = _config(warmup=warmup, boundaries=(10, 20))
    schedule = jax.jit(train_step.build_schedule(config))
    steps = [0, 1, 2, 3, 4, 5, 9, 10, 11, 19, 20, 21, 1000]
    got = [float(schedule(jnp.int32(s))) for s in steps]
    np.testing.assert_allclose(got, [np_lr(config, s) for s in steps], rtol=1e-6)
    # spelled out: step b is the first at the decayed lr
    np.testing.assert_allclose(got[steps.index(9)], 0.1, rtol=1e-6)
    np.testing.assert_allclose(got[steps.index(10)], 0.01, rtol=1e-6)
    np.testing.assert_allclose(got[steps.index(20)], 0.001, rtol=1e-6)
    if warmup:
        np.testing.assert_allclose(got[:5], [0.025, 0.05, 0.075, 0.1, 0.1], rtol=1e-6)


def test_gradient_clipping_is_per_part_and_before_weight_decay():
    """Encoder gradient above the norm (clipped by its own norm), classifier below (untouched)."""
    rng = np.random.default_rng()
    config = _config(clip=1.0)
    params = _random_tree(rng)
    grads_seq = []
    for _ in range(3):
        g = _random_tree(rng)
        enc_norm = np.sqrt(sum(np.sum(v ** 2) for v in g["encoder"].values()))
        g["encoder"] = {k: v * 5.0 / enc_norm for k, v in g["encoder"].items()}  # norm 5
        g["classifier"]["kernel"] *= 0.3 / np.linalg.norm(g["classifier"]["kernel"])  # norm 0.3
        grads_seq.append(g)
    want = np_torch_sgd(config, params, grads_seq)
    got = _run_optax(config, params, grads_seq)
    for step, ((p_ref, _), (p_got, _)) in enumerate(zip(want, got)):
        for part in SHAPES:
            for k in SHAPES[part]:
                np.testing.assert_allclose(p_got[part][k], p_ref[part][k], rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {step} {part}/{k}")
