"""Margin losses against float64 NumPy references on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from broadface_jax import losses
from tests.np_reference import np_margin_ce, np_target


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.3, 0.2),
                                      (0.9, 0.4, 0.15)])
def test_target_logit_matches_float64(m1, m2, m3):
    rng = np.random.default_rng()
    c = np.concatenate([rng.uniform(-1, 1, 500), [-1.0, -0.999, 0.999, 1.0]])
    got = losses.target_logit(jnp.asarray(c, jnp.float32),
                              losses.MarginConfig(64.0, m1, m2, m3))
    np.testing.assert_allclose(np.asarray(got), np_target(c, m1, m2, m3), atol=5e-4)


def test_arcface_true_margin_gradient_and_fallback():
    """d/dcos of cos(theta + m) is sin(theta+m)/sin(theta), not 1 (no-grad margin)."""
    m = 0.5
    margin = losses.MarginConfig(64.0, 1.0, m, 0.0)
    rng = np.random.default_rng()
    theta = rng.uniform(0.2, np.pi - m - 0.2, 50)
    g = jax.vmap(jax.grad(lambda c: losses.target_logit(c, margin)))(
        jnp.asarray(np.cos(theta), jnp.float32))
    np.testing.assert_allclose(np.asarray(g), np.sin(theta + m) / np.sin(theta), rtol=2e-3)
    # past theta + m > pi: fallback cos(theta) - m sin(m) (slope 1), still decreasing in
    # theta across the switch, with insightface's jump from -1 to -cos(m) - m sin(m).
    theta_b = rng.uniform(np.pi - m + 0.05, np.pi - 0.05, 20)
    g_b = jax.vmap(jax.grad(lambda c: losses.target_logit(c, margin)))(
        jnp.asarray(np.cos(theta_b), jnp.float32))
    np.testing.assert_allclose(np.asarray(g_b), 1.0, rtol=1e-6)
    c_switch = np.cos(np.pi - m)
    left = losses.target_logit(jnp.float32(c_switch + 1e-5), margin)
    right = losses.target_logit(jnp.float32(c_switch - 1e-5), margin)
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
    margin = losses.MarginConfig(64.0, m1, m2, m3)
    got = losses.margin_cross_entropy(jnp.asarray(e, jnp.float32),
                                      losses.l2_normalize(jnp.asarray(w, jnp.float32)),
                                      jnp.asarray(y), margin)
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, 64.0, m1, m2, m3),
                               rtol=1e-4, atol=1e-3)


def test_padding_classes_are_excluded():
    rng = np.random.default_rng()
    e, w, y = rng.normal(size=(5, 4)), rng.normal(size=(7, 4)), rng.integers(0, 7, 5)
    w_pad = np.concatenate([w, rng.normal(size=(3, 4))])
    margin = losses.MarginConfig()
    got = losses.margin_cross_entropy(jnp.asarray(e, jnp.float32),
                                      losses.l2_normalize(jnp.asarray(w_pad, jnp.float32)),
                                      jnp.asarray(y), margin, num_classes=7)
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, 64.0, 1.0, 0.5, 0.0),
                               rtol=1e-4, atol=1e-3)


def test_finite_gradient_at_theta_zero_and_pi():
    rng = np.random.default_rng()
    w = rng.normal(size=(4, 8)).astype(np.float32)
    # embeddings exactly on W_0 (theta = 0) and on -W_1 (theta = pi)
    e = np.stack([w[0] * 3.0, -w[1] * 0.5]).astype(np.float32)
    y = jnp.asarray([0, 1])
    for margin in (losses.MarginConfig(), losses.MarginConfig(64.0, 0.9, 0.4, 0.1)):
        g_e, g_w = jax.grad(
            lambda e, w: jnp.sum(losses.margin_cross_entropy(
                e, losses.l2_normalize(w), y, margin)), argnums=(0, 1))(e, w)
        assert np.all(np.isfinite(np.asarray(g_e))) and np.all(np.isfinite(np.asarray(g_w)))


def test_unknown_loss_name_is_a_clear_error():
    class Cfg:
        name, s, m1, m2, m3 = "arcfce", 64.0, 1.0, 0.5, 0.0
    with pytest.raises(ValueError, match="arcfce"):
        losses.MarginConfig.from_config(Cfg)


def test_scale_gradient():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=5), jnp.float32)
    f = 2.75
    val, g = jax.value_and_grad(lambda x: jnp.sum(losses.scale_gradient(x, jnp.float32(f)) ** 2))(x)
    np.testing.assert_allclose(float(val), float(jnp.sum(x ** 2)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), 2 * f * np.asarray(x), rtol=1e-6)
