"""Margin losses against float64 NumPy references on fresh random inputs."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broadface_jax import config_check, losses
from configs import default
from tests.np_reference import np_central_gradient, np_curricular_ce, np_margin_ce, np_target


def _margin_loss(name, s, m1, m2, m3):
    """``losses.build`` of a combined-margin loss; the fields the loss does not use must be
    the family's neutral values (m1 = 1, m2 = 0, m3 = 0)."""
    margins = {"m1": m1, "m2": m2, "m3": m3}
    used = losses.REGISTRY[name].fields
    assert all(v == (1.0 if k == "m1" else 0.0) for k, v in margins.items() if k not in used)
    return losses.build({"name": name, "s": s, **{k: v for k, v in margins.items() if k in used}})


def _target_logit(loss, cos_y):
    """The registered loss's logit at the label, divided by s: cos(m1*theta + m2) - m3."""
    cos_y = jnp.atleast_1d(cos_y)
    onehot = jnp.ones((cos_y.shape[0], 1), bool)
    return loss.logits(cos_y[:, None], onehot, cos_y)[:, 0] / loss.params["s"]


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2),
                                      (0.9, 0.4, 0.15)])
def test_target_logit_matches_float64(m1, m2, m3):
    rng = np.random.default_rng()
    c = np.concatenate([rng.uniform(-1, 1, 500), [-1.0, -0.999, 0.999, 1.0]])
    got = _target_logit(_margin_loss("combined", 64.0, m1, m2, m3), jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np_target(c, m1, m2, m3), atol=5e-4)


def test_arcface_true_margin_gradient_and_fallback():
    """d/dcos of cos(theta + m) is sin(theta+m)/sin(theta), not 1 (no-grad margin)."""
    m = 0.5
    loss = _margin_loss("arcface", 64.0, 1.0, m, 0.0)
    target = lambda c: _target_logit(loss, c)[0]  # noqa: E731
    rng = np.random.default_rng()
    theta = rng.uniform(0.2, np.pi - m - 0.2, 50)
    g = jax.vmap(jax.grad(target))(jnp.asarray(np.cos(theta), jnp.float32))
    np.testing.assert_allclose(np.asarray(g), np.sin(theta + m) / np.sin(theta), rtol=2e-3)
    # past theta + m > pi: fallback cos(theta) - m sin(m) (slope 1), still decreasing in
    # theta across the switch, with insightface's jump from -1 to -cos(m) - m sin(m).
    theta_b = rng.uniform(np.pi - m + 0.05, np.pi - 0.05, 20)
    g_b = jax.vmap(jax.grad(target))(jnp.asarray(np.cos(theta_b), jnp.float32))
    np.testing.assert_allclose(np.asarray(g_b), 1.0, rtol=1e-6)
    c_switch = np.cos(np.pi - m)
    left = target(jnp.float32(c_switch + 1e-5))
    right = target(jnp.float32(c_switch - 1e-5))
    np.testing.assert_allclose(float(left), -1.0, atol=1e-3)
    np.testing.assert_allclose(float(right), -np.cos(m) - m * np.sin(m), atol=1e-3)


@pytest.mark.parametrize("name,m1,m2,m3", [("arcface", 1.0, 0.5, 0.0),
                                           ("cosface", 1.0, 0.0, 0.35),
                                           ("combined", 1.0, 0.3, 0.2)])
def test_margin_cross_entropy_matches_float64(name, m1, m2, m3):
    rng = np.random.default_rng()
    n, c, d = 17, 11, 6
    e = rng.normal(size=(n, d))
    w = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    loss = _margin_loss(name, 64.0, m1, m2, m3)
    got = loss.per_example(jnp.asarray(e, jnp.float32),
                           losses.l2_normalize(jnp.asarray(w, jnp.float32)), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, 64.0, m1, m2, m3),
                               rtol=1e-4, atol=1e-3)


def test_padding_classes_are_excluded():
    rng = np.random.default_rng()
    e, w, y = rng.normal(size=(5, 4)), rng.normal(size=(7, 4)), rng.integers(0, 7, 5)
    w_pad = np.concatenate([w, rng.normal(size=(3, 4))])
    loss = losses.build({"name": "arcface", "s": 64.0})
    got = loss.per_example(jnp.asarray(e, jnp.float32),
                           losses.l2_normalize(jnp.asarray(w_pad, jnp.float32)),
                           jnp.asarray(y), num_classes=7)
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, 64.0, 1.0, 0.5, 0.0),
                               rtol=1e-4, atol=1e-3)


def test_finite_gradient_at_theta_zero_and_pi():
    rng = np.random.default_rng()
    w = rng.normal(size=(4, 8)).astype(np.float32)
    # embeddings exactly on W_0 (theta = 0) and on -W_1 (theta = pi)
    e = np.stack([w[0] * 3.0, -w[1] * 0.5]).astype(np.float32)
    y = jnp.asarray([0, 1])
    for loss in (losses.build({"name": "arcface", "s": 64.0}),
                 _margin_loss("combined", 64.0, 0.9, 0.4, 0.1)):
        g_e, g_w = jax.grad(
            lambda e, w: jnp.sum(loss.per_example(e, losses.l2_normalize(w), y)),
            argnums=(0, 1))(e, w)
        assert np.all(np.isfinite(np.asarray(g_e))) and np.all(np.isfinite(np.asarray(g_w)))


def test_unknown_loss_name_is_a_clear_error():
    class Cfg:
        name, s, m1, m2, m3 = "arcfce", 64.0, 1.0, 0.5, 0.0
    with pytest.raises(ValueError, match="arcfce"):
        losses.build(Cfg)


def test_scale_gradient():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=5), jnp.float32)
    f = 2.75
    val, g = jax.value_and_grad(lambda x: jnp.sum(losses.scale_gradient(x, jnp.float32(f)) ** 2))(x)
    np.testing.assert_allclose(float(val), float(jnp.sum(x ** 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), 2 * f * np.asarray(x), rtol=1e-6)


# ------------------------------------------------------------------ the registry

def _loss_config(name, **fields):
    c = default.get_config().loss
    c.name = name
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.mark.parametrize("name,fields,ref", [
    ("arcface", {}, (1.0, 0.5, 0.0)),
    ("arcface", {"m2": 0.3}, (1.0, 0.3, 0.0)),
    ("cosface", {}, (1.0, 0.0, 0.35)),
    ("cosface", {"m3": 0.4}, (1.0, 0.0, 0.4)),
    ("combined", {}, (1.0, 0.3, 0.2)),
    ("combined", {"m1": 0.9, "m2": 0.4, "m3": 0.15}, (0.9, 0.4, 0.15)),
])
def test_registered_margin_losses_match_float64(name, fields, ref):
    """By name, with the loss's defaults for unset fields, as the trainer builds it."""
    rng = np.random.default_rng()
    n, c, d = 9, 7, 5
    e, w, y = rng.normal(size=(n, d)), rng.normal(size=(c, d)), rng.integers(0, c, n)
    loss = losses.build(_loss_config(name, s=32.0, **fields))
    got = loss.per_example(jnp.asarray(e, jnp.float32),
                           losses.l2_normalize(jnp.asarray(w, jnp.float32)), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, 32.0, *ref),
                               rtol=1e-4, atol=1e-4)
    assert loss.init_state() == {}


@pytest.mark.parametrize("name,field,value", [("arcface", "m1", 0.9), ("arcface", "m3", 0.1),
                                              ("cosface", "m2", 0.5), ("cosface", "m1", 1.0),
                                              ("curricularface", "m3", 0.2)])
def test_a_margin_field_the_loss_ignores_is_an_error(name, field, value):
    cfg = _loss_config(name, **{field: value})
    want = rf"config\.loss\.{field}={value}: loss '{name}' does not use {field}"
    with pytest.raises(ValueError, match=want):
        losses.build(cfg)
    full = default.get_config()
    full.loss = cfg
    problems = config_check.problems(full)
    assert len(problems) == 1 and problems[0].startswith(f"config.loss.{field}={value}: ")


def test_config_check_reads_the_registry_and_stays_light():
    """Every registered name passes the name check; checking a config imports no JAX."""
    for name in losses.REGISTRY:
        c = default.get_config()
        c.loss.name = name
        assert config_check.problems(c) == [], name
    c = default.get_config()
    c.loss.name = "curricularfce"
    assert "did you mean 'curricularface'" in config_check.problems(c)[0]
    code = ("import sys; from broadface_jax import config_check; from configs import default; "
            "assert config_check.problems(default.get_config()) == []; "
            "assert 'jax' not in sys.modules, 'config_check imported jax'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(default.__file__).rsplit(
        "/configs/", 1)[0])


# ------------------------------------------------------------------ CurricularFace

def test_curricularface_value_and_gradient_match_float64():
    """Huang et al. 2020, Eqs. 6-9 with a given t: value and d/de, d/dW vs float64."""
    rng = np.random.default_rng()
    n, c, d, s, m, t = 7, 9, 5, 16.0, 0.5, rng.uniform(0.1, 0.6)
    e, w, y = rng.normal(size=(n, d)), rng.normal(size=(c, d)), rng.integers(0, c, n)
    loss = losses.build(_loss_config("curricularface", s=s))
    state = {"t": jnp.float32(t)}

    def total(e, w):
        return jnp.sum(loss.per_example(e, losses.l2_normalize(w), jnp.asarray(y), state))

    e32, w32 = jnp.asarray(e, jnp.float32), jnp.asarray(w, jnp.float32)
    got = jax.jit(loss.per_example)(e32, losses.l2_normalize(w32), jnp.asarray(y), state)
    np.testing.assert_allclose(np.asarray(got), np_curricular_ce(e, w, y, t, s, m),
                               rtol=1e-4, atol=1e-4)
    g_e, g_w = jax.jit(jax.grad(total, argnums=(0, 1)))(e32, w32)
    ref_e = np_central_gradient(lambda x: np_curricular_ce(x, w, y, t, s, m).sum(), e)
    ref_w = np_central_gradient(lambda x: np_curricular_ce(e, x, y, t, s, m).sum(), w)
    np.testing.assert_allclose(np.asarray(g_e), ref_e, rtol=1e-3, atol=1e-4 * np.abs(ref_e).max())
    np.testing.assert_allclose(np.asarray(g_w), ref_w, rtol=1e-3, atol=1e-4 * np.abs(ref_w).max())
    # the inputs exercise both branches of N(t, cos_j)
    en, wn = e / np.linalg.norm(e, axis=1, keepdims=True), w / np.linalg.norm(w, axis=1,
                                                                              keepdims=True)
    cos = en @ wn.T
    hard = cos > np.cos(np.arccos(cos[np.arange(n), y]) + m)[:, None]
    hard[np.arange(n), y] = False
    assert 0 < hard.sum() < n * (c - 1)


def test_curricularface_t_is_an_ema_updated_before_scoring_the_batch():
    rng = np.random.default_rng()
    n, c, d, s = 8, 6, 4, 16.0
    e, w, y = rng.normal(size=(n, d)), rng.normal(size=(c, d)), rng.integers(0, c, n)
    loss = losses.build(_loss_config("curricularface", s=s, m2=0.3))
    assert loss.params == {"s": s, "m2": 0.3}
    state = loss.init_state()
    assert float(state["t"]) == 0.0
    wn = w / np.linalg.norm(w, axis=1, keepdims=True)
    t = 0.0
    batch = jax.jit(loss.batch)
    for k in range(3):
        e_k = e + k  # a different batch each time
        got, state = batch(jnp.asarray(e_k, jnp.float32),
                           losses.l2_normalize(jnp.asarray(w, jnp.float32)), jnp.asarray(y), state)
        ek = e_k / np.linalg.norm(e_k, axis=1, keepdims=True)
        t = 0.01 * np.mean((ek @ wn.T)[np.arange(n), y]) + 0.99 * t
        np.testing.assert_allclose(float(state["t"]), t, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got), np_curricular_ce(e_k, w, y, t, s, 0.3),
                                   rtol=1e-4, atol=1e-4)
    # no gradient reaches the embeddings through t
    g = jax.jit(jax.grad(lambda x: loss.batch(x, losses.l2_normalize(jnp.asarray(w, jnp.float32)),
                                              jnp.asarray(y), state)[1]["t"]))(
        jnp.asarray(e, jnp.float32))
    assert not np.any(np.asarray(g))
