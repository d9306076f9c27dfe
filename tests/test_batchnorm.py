"""BatchNorm statistics: over the global batch or per device (``config.model.batch_norm``).

* Train mode on the 8-device mesh (batch sharded over every device): the
  'per_device' encoder's output and updated running statistics equal a
  float64 NumPy IResNet whose every BatchNorm normalises each block of B/8
  rows with that block's statistics (running statistics: the mean over
  blocks); 'global' equals the same reference with one block.
* Eval mode (running statistics) is the same computation in both modes.
* One full BroadFace train step with 'per_device' equals the same step whose
  encoder runs the 'global' encoder on each device's rows separately
  (``jax.vmap`` over the shards: an independent route to per-shard BN).
* Errors name the values at fault.

Seeds are fixed (printed in failure messages).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from broadface_jax import config_check, models, sharding, train_step
from broadface_jax.models import layers
from configs import default
from tests.test_models import abstract_variables, np_conv, np_prelu, random_variables, to_np64

SEED = 20261201
SHARDS = 8
BN_EPS = 1e-5


def assert_close(actual: Any, expected: np.ndarray, rtol: float, what: str) -> None:
    """Max abs error relative to the reference's max magnitude."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol} (seed {SEED})"


def bn_config(mode: str, name: str = "iresnet18", dim: int = 6,
              width: float = 0.0625) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name=name, embedding_dim=dim, width=width, dropout=0.0, dtype="float32",
        batch_norm=mode))


def mesh8() -> Any:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, model=1)))
    assert mesh.size == SHARDS
    return mesh


# --------------------------------------------------------------------------
# float64 NumPy reference: IResNet in train mode, BN per block of rows
# --------------------------------------------------------------------------


def np_bn_groups(x: np.ndarray, p: dict, groups: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each of ``groups`` consecutive row blocks normalised with its own (biased) stats.

    Returns (output, mean over blocks of the block means, of the block variances).
    """
    rows = x.shape[0] // groups
    outs, means, variances = [], [], []
    for g in range(groups):
        xg = x[g * rows:(g + 1) * rows]
        axes = tuple(range(xg.ndim - 1))
        mean, var = xg.mean(axis=axes), xg.var(axis=axes)
        outs.append((xg - mean) / np.sqrt(var + BN_EPS) * p.get("scale", 1.0) + p["bias"])
        means.append(mean)
        variances.append(var)
    return np.concatenate(outs), np.mean(means, axis=0), np.mean(variances, axis=0)


def np_iresnet_train(x: np.ndarray, p: dict, s: dict, stage_sizes: tuple, groups: int
                     ) -> tuple[np.ndarray, dict]:
    """Train-mode IResNet forward; returns (embedding, updated batch_stats)."""
    new: dict = {}

    def bn(path: tuple[str, ...], y: np.ndarray) -> np.ndarray:
        pp, old, out = p, s, new
        for k in path:
            pp, old = pp[k], old[k]
        for k in path[:-1]:
            out = out.setdefault(k, {})
        y, mean, var = np_bn_groups(y, pp, groups)
        out[path[-1]] = {"mean": 0.9 * old["mean"] + 0.1 * mean,
                         "var": 0.9 * old["var"] + 0.1 * var}
        return y

    y = np_prelu(bn(("bn1",), np_conv(x, p["conv1"]["kernel"], 1, 1)), p["prelu"]["alpha"])
    for stage, num_blocks in enumerate(stage_sizes):
        for block in range(num_blocks):
            name, stride = f"layer{stage + 1}_{block}", 2 if block == 0 else 1
            q = p[name]
            z = np_conv(bn((name, "bn1"), y), q["conv1"]["kernel"], 1, 1)
            z = np_prelu(bn((name, "bn2"), z), q["prelu"]["alpha"])
            z = bn((name, "bn3"), np_conv(z, q["conv2"]["kernel"], stride, 1))
            if "downsample_conv" in q:
                y = bn((name, "downsample_bn"),
                       np_conv(y, q["downsample_conv"]["kernel"], stride, 0))
            y = z + y
    h = bn(("head", "bn"), y).reshape(x.shape[0], -1)
    h = h @ p["head"]["fc"]["kernel"] + p["head"]["fc"]["bias"]
    return bn(("head", "features"), h), new


@pytest.fixture(scope="module")
def tiny_case() -> dict:
    """iresnet18 at width 1/16, 24 images of 16x16 (3 per device), random variables."""
    rng = np.random.default_rng(SEED)
    x = rng.uniform(-1, 1, size=(3 * SHARDS, 16, 16, 3))
    module = models.build_encoder(bn_config("global"))
    variables = random_variables(abstract_variables(module, x.shape), rng)
    return {"x": x, "variables": variables, "v64": to_np64(variables)}


def sharded_train_forward(module: Any, variables: Any, x: np.ndarray) -> tuple:
    """Jitted train-mode forward with the batch sharded over all 8 devices."""
    mesh = mesh8()

    def forward(variables, x):
        out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return out, updates["batch_stats"]

    xs = jax.device_put(jnp.asarray(x, jnp.float32), sharding.batch_sharding(mesh))
    rep = sharding.replicated(mesh)
    fn = jax.jit(forward, in_shardings=(rep, sharding.batch_sharding(mesh)),
                 out_shardings=(sharding.batch_sharding(mesh), rep))
    return fn(variables, xs)


@pytest.mark.parametrize("mode,groups", [("per_device", SHARDS), ("global", 1)])
def test_train_mode_matches_numpy_per_group(tiny_case: dict, mode: str, groups: int) -> None:
    module = models.build_encoder(bn_config(mode), batch_shards=SHARDS)
    out, stats = sharded_train_forward(module, tiny_case["variables"], tiny_case["x"])
    v = tiny_case["v64"]
    expected, expected_stats = np_iresnet_train(
        tiny_case["x"], v["params"], v["batch_stats"], (2, 2, 2, 2), groups)
    assert_close(out, expected, rtol=2e-4, what=f"{mode} embedding")
    flat = jax.tree_util.tree_flatten_with_path(to_np64(stats))[0]
    want = dict(jax.tree_util.tree_flatten_with_path(expected_stats)[0])
    assert len(flat) == len(want) == 2 * 31  # iresnet18: stem, 8 x 3 + 4 shortcuts, head 2
    for path, value in flat:
        assert_close(value, want[path], rtol=2e-5,
                     what=f"{mode} {jax.tree_util.keystr(path)}")
    # The other grouping is far outside these tolerances (so each check above can fail).
    other, other_stats = np_iresnet_train(tiny_case["x"], v["params"], v["batch_stats"],
                                          (2, 2, 2, 2), SHARDS + 1 - groups)
    assert np.max(np.abs(other - expected)) > 0.05 * np.max(np.abs(expected))
    gap = max(np.max(np.abs(a - b)) for a, b in zip(
        jax.tree_util.tree_leaves(other_stats), jax.tree_util.tree_leaves(expected_stats)))
    assert gap > 1e-3


def test_eval_mode_identical_in_both_modes(tiny_case: dict) -> None:
    """Running statistics: the very same computation (jaxpr) whatever the mode or shard count."""
    x = jnp.asarray(tiny_case["x"], jnp.float32)
    jaxprs = {str(jax.make_jaxpr(lambda v, m=models.build_encoder(bn_config(mode), shards):
                                 m.apply(v, x, train=False))(tiny_case["variables"]))
              for mode, shards in (("global", SHARDS), ("per_device", SHARDS),
                                   ("per_device", None))}
    assert len(jaxprs) == 1
    # ... while train mode does differ between the modes.
    train = {str(jax.make_jaxpr(lambda v, m=models.build_encoder(bn_config(mode), SHARDS):
                                m.apply(v, x, train=True, mutable=["batch_stats"]))(
                                    tiny_case["variables"]))
             for mode in ("global", "per_device")}
    assert len(train) == 2


# --------------------------------------------------------------------------
# a full train step
# --------------------------------------------------------------------------


class PerShardReference:
    """The 'global' encoder applied to each device's rows on its own (``jax.vmap``).

    Stands in for the encoder in ``train_step``: embeddings of every shard
    concatenated, running statistics averaged over the shards.
    """

    def __init__(self, module: Any, shards: int):
        self.module, self.shards = module, shards

    def init(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.init(*args, **kwargs)

    def apply(self, variables: Any, x: jax.Array, **kwargs: Any) -> tuple:
        def one(rows):
            return self.module.apply(variables, rows, **kwargs)

        emb, new = jax.vmap(one)(x.reshape((self.shards, -1) + x.shape[1:]))
        return emb.reshape((x.shape[0],) + emb.shape[2:]), jax.tree.map(
            lambda a: a.mean(axis=0), new)


def step_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.update(bn_config("per_device", name="iresnet_1stage", dim=6))
    c.num_classes, c.image_size, c.per_device_batch_size = 11, 16, 3
    c.queue.size_per_device, c.queue.chunk_size = 6, 6
    c.lr, c.warmup_steps = 0.05, 0
    return c


@pytest.mark.slow  # two compiles of a full BroadFace step: ~25 s CPU, 60 s wall on the loaded 2 cores
def test_per_device_step_equals_step_with_each_shard_separately(monkeypatch) -> None:
    # A one-stage IResNet (7 BatchNorms) built by name, so the step builds it from
    # config.model as in training (with the mesh's shard count) and compiles in seconds.
    monkeypatch.setitem(models.REGISTRY, "iresnet_1stage",
                        ("iresnet", "IResNet", {"stage_sizes": (1,)}))
    config = step_config()
    mesh = mesh8()
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(SEED))
    rng = np.random.default_rng(SEED + 1)
    b = config.per_device_batch_size * SHARDS
    batch = sharding.shard_batch(
        {"image": rng.uniform(-1, 1, size=(b, 16, 16, 3)).astype(np.float32),
         "label": rng.integers(0, config.num_classes, b).astype(np.int32)}, mesh)
    host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    start = host(state)

    per_device = train_step.make_train_step(config, mesh, shardings)
    new, metrics = host(per_device(state, batch))
    state = jax.device_put(start, shardings)
    reference_model = PerShardReference(
        models.build_encoder(bn_config("global", name="iresnet_1stage", dim=6)), SHARDS)
    reference = train_step.make_train_step(config, mesh, shardings, model=reference_model)
    ref_new, ref_metrics = host(reference(state, batch))

    for name in ("loss_encoder", "loss_classifier"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    for what in ("params", "batch_stats"):
        got = jax.tree_util.tree_flatten_with_path(getattr(new, what))[0]
        want = jax.tree_util.tree_leaves(getattr(ref_new, what))
        before = jax.tree_util.tree_leaves(getattr(start, what))
        assert len(got) == len(want) == len(before)
        # The change this step made; a leaf whose gradient is ~0 in exact arithmetic
        # (the head BN's bias: the last BN removes any shift) is compared in absolute
        # terms, against the largest change of the tree.
        largest = max(np.max(np.abs(w - w0)) for w, w0 in zip(want, before))
        for (path, a), b_, a0 in zip(got, want, before):
            change, ref_change = a - a0, b_ - a0
            err = np.max(np.abs(change - ref_change))
            assert err <= 1e-4 * np.max(np.abs(ref_change)) + 1e-6 * largest, (
                f"{what}{jax.tree_util.keystr(path)}: error {err:.3g} in a change of at "
                f"most {np.max(np.abs(ref_change)):.3g} (seed {SEED})")
    # The step moved the running statistics (the comparison is not of unchanged values).
    assert not np.allclose(new.batch_stats["bn1"]["var"], start.batch_stats["bn1"]["var"])


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_batch_not_divisible_by_groups_names_the_values() -> None:
    module = models.build_encoder(bn_config("per_device"), batch_shards=SHARDS)
    x = jnp.zeros((12, 16, 16, 3))
    variables = abstract_variables(module, x.shape)
    with pytest.raises(ValueError, match=r"batch of 12 rows .* groups=8 .*multiple of 8"):
        jax.eval_shape(lambda v: module.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables)


def test_per_device_without_shard_count_refuses_to_train() -> None:
    module = models.build_encoder(bn_config("per_device"))
    x = jnp.zeros((8, 16, 16, 3))
    variables = abstract_variables(module, x.shape)
    with pytest.raises(ValueError, match=r"batch_norm='per_device' needs the number of batch"):
        jax.eval_shape(lambda v: module.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables)


def test_one_value_per_channel_per_group_is_an_error() -> None:
    bn = layers.GroupedBatchNorm(groups=4, name="features")
    x = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"'features': 1 row\(s\) .* give 1 value per channel"):
        jax.eval_shape(lambda: bn.init_with_output(jax.random.key(0), x))


def test_unknown_mode_is_rejected_by_build_and_config_check() -> None:
    with pytest.raises(ValueError, match=r"model.batch_norm='sync': must be one of"):
        models.build_encoder(bn_config("sync"))
    with pytest.raises(ValueError, match="batch_shards must be a positive int, got 0"):
        models.build_encoder(bn_config("per_device"), batch_shards=0)
    config = default.get_config()
    assert config.model.batch_norm == "global"
    config.model.batch_norm = "per_gpu"
    assert any(p.startswith("config.model.batch_norm='per_gpu': must be one of")
               and "per_device" in p for p in config_check.problems(config))
