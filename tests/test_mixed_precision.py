"""bfloat16 compute (config.model.dtype='bfloat16') on a real tiny IResNet.

The same data and the same initialisation are trained for a few steps in
float32 and in bfloat16: the losses agree to 3e-2 relative, the parameters,
batch statistics, optimizer state and queue stay float32, the backbone's
convolutions really run in bfloat16, and everything that touches the
classifier (logits of the batch and of the queue, softmax, margin loss) runs
in float32 (checked on every equation of the step's jaxpr, inside the
queue's scan and custom VJP too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from broadface_jax import sharding, train_step
from tests.tiny_config import tiny_config

pytestmark = pytest.mark.slow  # every test uses the module's ~1-3 min training fixture

NUM_CLASSES = 11  # no layer of the tiny backbone has 11 channels: shape[-1] == 11 means logits
STEPS = 3


def _config(dtype: str):
    # lr is small: W starts at N(0, 0.01^2), so its rows turn fast (the gradient
    # through the row normalisation scales as 1/|W|); at larger rates one step
    # changes the loss so much that the bf16 gradient error is amplified.
    return tiny_config("step", model__name="iresnet18", model__width=0.0625,
                       model__embedding_dim=16, model__dtype=dtype, num_classes=NUM_CLASSES,
                       image_size=32, per_device_batch_size=8, queue__size_per_device=16,
                       queue__chunk_size=8, loss__s=16.0, loss__m2=0.3, lr=2e-4, lr_boundaries=())


def _batches(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)} for _ in range(STEPS)]


def _train(dtype: str, batches: list[dict]):
    config = _config(dtype)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(3))
    init_params = jax.device_get(state.params)
    step = train_step.make_train_step(config, mesh, shardings)
    losses = []
    for b in batches:
        state, metrics = step(state, sharding.shard_batch(b, mesh))
        losses.append((float(metrics["loss_classifier"]), float(metrics["loss_encoder"])))
    return config, mesh, state, init_params, np.array(losses)


@pytest.fixture(scope="module")
def runs():
    batches = _batches(int(np.random.default_rng().integers(2**31)))
    return {dtype: _train(dtype, batches) for dtype in ("float32", "bfloat16")}, batches


def test_bf16_losses_track_float32(runs):
    by_dtype, _ = runs
    _, _, _, init32, loss32 = by_dtype["float32"]
    _, _, _, init16, loss16 = by_dtype["bfloat16"]
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), init32, init16)
    assert all(jax.tree.leaves(chex_equal)), "same seed must give the same float32 init"
    assert np.all(np.isfinite(loss16))
    # The runs did train (the loss moved), and bf16 follows float32 step by step.
    assert loss32[-1, 0] < 0.8 * loss32[0, 0]
    # The tolerance is 2.7x the largest difference seen over 1,500 data seeds
    # (benchmarks/bench_bf16_tolerance.py, 2026-12-06: per-seed max relative
    # difference median 0.0031, q0.999 0.0109, max 0.0112; 4 seeds were above
    # the 1e-2 this test used to have, which made it fail in CI).
    np.testing.assert_allclose(loss16, loss32, rtol=3e-2)
    # ... while not being float32 in disguise.
    assert np.any(loss16 != loss32)


def test_bf16_state_stays_float32(runs):
    by_dtype, _ = runs
    _, _, state, _, _ = by_dtype["bfloat16"]
    for part in ("params", "batch_stats", "opt_state"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, part)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32, f"{part}{jax.tree_util.keystr(path)} is {leaf.dtype}"
    assert state.queue.embeddings.dtype == jnp.float32
    assert state.queue.weights.dtype == jnp.float32
    assert float(jnp.mean(state.queue.valid)) == 1.0  # the queue did fill


def _equations(jaxpr):
    """Every equation of a jaxpr, recursing into scans, custom VJPs, pjit, cond..."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _equations(sub)


def test_bf16_compute_where_expected(runs):
    by_dtype, batches = runs
    config, mesh, state, _, _ = by_dtype["bfloat16"]
    step_fn = train_step.build_train_step(config)
    batch = sharding.shard_batch(batches[0], mesh)
    eqns = list(_equations(jax.make_jaxpr(step_fn)(state, batch).jaxpr))

    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)

    # Logits: every value whose last axis is the class axis, forward and backward,
    # in the batch loss and in the queue loss (scan + custom VJP).
    c_pad = state.params["classifier"]["kernel"].shape[0]
    class_axis = [(e.primitive.name, v.aval.dtype) for e in eqns for v in e.outvars
                  if hasattr(v.aval, "shape") and v.aval.shape and v.aval.shape[-1] == c_pad
                  and jnp.issubdtype(v.aval.dtype, jnp.floating)]
    assert len(class_axis) > 20
    assert {d for _, d in class_axis} == {jnp.dtype(jnp.float32)}, class_axis
    logit_dots = [e for e in eqns if e.primitive.name == "dot_general"
                  and e.outvars[0].aval.shape[-1] == c_pad]
    assert len(logit_dots) >= 2  # batch logits and queue-chunk logits
    for e in logit_dots:
        assert all(v.aval.dtype == jnp.float32 for v in e.invars), e
    # Softmax pieces (exp / log / max over classes) are float32 everywhere.
    for e in eqns:
        if e.primitive.name in ("exp", "log", "log1p", "logistic", "reduce_max"):
            assert e.outvars[0].aval.dtype == jnp.float32, e
