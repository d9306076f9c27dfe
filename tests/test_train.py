"""Tests for broadface_jax.train: the loop, logging, warm start, failures.

Most runs use the tiny conv encoder of tests/tiny_encoder.py (compiles in a
second) on 16x16 synthetic identities over the 8 fake CPU devices; the real
backbone is exercised end to end by tests/test_main.py.
"""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from broadface_jax import checkpointing, cli, input_pipeline, sharding, train, train_step
from broadface_jax.evaluation import embedding
from tests.tiny_config import RUN_EMBED_DIM, tiny_config
from tests.tiny_encoder import TinyEncoder

REPO = pathlib.Path(__file__).resolve().parents[1]
EMBED_DIM = RUN_EMBED_DIM


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/<name>.py's get_config(arg), loaded as --config loads it."""
    return cli.config_from_file(REPO / "configs" / f"{name}.py", arg)




def optimizer_moments(opt_state):
    """The per-parameter statistics of an optimizer state (momentum buffers, Adam
    moments, counts): the state without optax's injected hyperparameters."""
    import optax

    def injected(x):
        return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))

    return jax.tree.map(lambda x: x.inner_state if injected(x) else x, opt_state, is_leaf=injected)


def tiny_model() -> nn.Module:
    return TinyEncoder(embedding_dim=EMBED_DIM)


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / train.METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def restore_state(config, workdir, step=None):
    """The checkpointed state of a run, restored onto the current mesh."""
    mesh = sharding.make_mesh(config.mesh)
    state, shardings = train_step.create_train_state(
        config, mesh, jax.random.PRNGKey(123), model=tiny_model())
    return checkpointing.restore(workdir, checkpointing.abstract_like(state, shardings), step)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------ schedule


def test_schedule_durations():
    s = train.Schedule(total_steps=10, log_every=3, checkpoint_every=0, eval_every=4)
    assert [k for k in range(1, 11) if s.is_log(k)] == [3, 6, 9, 10]
    assert [k for k in range(1, 11) if s.is_checkpoint(k)] == [10]
    assert [k for k in range(1, 11) if s.is_eval(k)] == [4, 8, 10]
    c = tiny_config()
    c.total_steps = 0
    with pytest.raises(ValueError, match="config.total_steps=0"):
        train.Schedule.from_config(c)


# ------------------------------------------------------------------ one step


@pytest.mark.slow
def test_one_step_end_to_end_matches_direct_step(tmp_path):
    """train_and_evaluate's first step equals create_train_state + step on batch 0."""
    config = tiny_config(total_steps=1)
    config.profile_steps = 1  # a trace that the run's end cuts short
    final = train.train_and_evaluate(config, tmp_path, model=tiny_model())

    # The same step by hand: fresh state from config.seed, batch 0 of the pipeline.
    mesh = sharding.make_mesh(config.mesh)
    state, shardings = train_step.create_train_state(
        config, mesh, jax.random.PRNGKey(config.seed), model=tiny_model())
    batch = next(input_pipeline.create_train_iterator(config, start_step=0))
    step_fn = train_step.make_train_step(config, mesh, shardings, model=tiny_model())
    expected, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}

    records = read_metrics(tmp_path)
    assert len(records) == 1 and records[0]["step"] == 1
    for name, value in metrics.items():
        assert np.isfinite(records[0][name])
        np.testing.assert_allclose(records[0][name], value, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(final[name], value, rtol=1e-5, err_msg=name)
    assert records[0]["lr"] == pytest.approx(config.lr)
    assert records[0]["images_per_sec"] > 0
    assert final["step"] == 1

    assert checkpointing.latest_step(tmp_path) == 1
    restored = restore_state(config, tmp_path)
    assert int(restored.step) == 1
    for got, want in zip(leaves(restored), leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (tmp_path / train.TENSORBOARD_SUBDIR).is_dir()
    assert list((tmp_path / train.TENSORBOARD_SUBDIR).glob("events.out.tfevents.*"))
    assert list((tmp_path / train.TENSORBOARD_SUBDIR / "plugins" / "profile").rglob("*.xplane.pb"))


# ------------------------------------------------------------------ writer, sizes


def test_writer_appends_one_jsonl_line_per_write(tmp_path):
    writer = train.create_writer(str(tmp_path))
    writer.write_hparams({"lr": 0.1})
    writer.write_scalars(3, {"loss": np.float32(1.5), "lr": 0.25})
    writer.write_scalars(3, {"eval/x/accuracy": 0.75})
    writer.write_texts(3, {"note": "not a scalar"})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.5, "lr": 0.25},
                                      {"step": 3, "eval/x/accuracy": 0.75}]
    assert list((tmp_path / train.TENSORBOARD_SUBDIR).glob("events.out.tfevents.*"))


def test_log_model_size_counts_parameters_and_step_flops():
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0),
                                                     model=tiny_model())
    step_fn = train_step.make_train_step(config, mesh, shardings, model=tiny_model())
    rng = np.random.default_rng(0)  # seed fixed: any values do
    batch = sharding.shard_batch({
        "image": rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 12, 16).astype(np.int32)}, mesh)
    sizes = train.log_model_size(state, step_fn, batch)
    enc = sum(np.size(x) for x in leaves(state.params["encoder"]))
    assert sizes["params/encoder"] == enc > 0
    assert sizes["params/classifier"] == 12 * EMBED_DIM  # C x D
    assert sizes["batch_stats"] == sum(np.size(x) for x in leaves(state.batch_stats))
    # At least the per-device logits of the batch: 2 rows x 12 classes x 8 dims, 2 flops each.
    assert sizes["step_flops_per_device"] >= 2 * 2 * 12 * EMBED_DIM


# ------------------------------------------------------------------ embed fn


class _LinearEncoder(nn.Module):
    """embedding = flatten(x) @ W + b: an encoder with an exact NumPy reference."""

    embedding_dim: int = EMBED_DIM

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(self.embedding_dim)(x.reshape((x.shape[0], -1)))


def test_uint8_embed_fn_matches_float64_reference(monkeypatch):
    config = tiny_config()
    config.eval.batch_size = 12  # rounded up to 16 (8 devices); 37 images = 3 batches
    mesh = sharding.make_mesh(config.mesh)
    model = _LinearEncoder()
    state, _ = train_step.create_train_state(config, mesh, jax.random.PRNGKey(1), model=model)

    shapes = []
    real_make = train_step.make_embed_fn

    def recording_make(*args, **kwargs):
        embed = real_make(*args, **kwargs)

        def wrapped(params, batch_stats, images):
            shapes.append(np.shape(images))
            return embed(params, batch_stats, images)

        return wrapped

    monkeypatch.setattr(train_step, "make_embed_fn", recording_make)
    embed_fn = embedding.make_uint8_embed_fn(config, mesh, model)(
        state.params["encoder"], state.batch_stats)

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(37, 16, 16, 3), dtype=np.uint8)
    got = embed_fn(images)

    kernel = np.asarray(state.params["encoder"]["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(state.params["encoder"]["Dense_0"]["bias"], np.float64)
    x = (images.astype(np.float64) / 255.0 - 0.5) / 0.5
    want = x.reshape(37, -1) @ kernel + bias
    assert got.dtype == np.float32 and got.shape == (37, EMBED_DIM)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Full chunks of eval.batch_size, the last 5 rows padded to 8 (a power of two): few shapes.
    assert shapes == [(16, 16, 16, 3)] * 2 + [(8, 16, 16, 3)]

    # Faces of another size are resized to config.image_size first.
    big = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    out = embed_fn(big)
    assert out.shape == (5, EMBED_DIM) and np.all(np.isfinite(out))
    assert shapes[-1] == (8, 16, 16, 3)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        embed_fn(images[..., 0])


# ------------------------------------------------------------------ warm start


@pytest.mark.slow
def test_warm_start_loads_encoder_exactly(tmp_path):
    source = tmp_path / "arcface"
    config = tiny_config(total_steps=1)
    config.queue.size_per_device = 0
    train.train_and_evaluate(config, source, model=tiny_model())
    trained = restore_state(config, source)

    mesh = sharding.make_mesh(config.mesh)
    warm = tiny_config()
    warm.seed = 5  # another init, so equality can only come from the checkpoint
    warm.init_from = str(source)
    state, _, origin = train.initial_state(warm, mesh, str(tmp_path / "broadface"),
                                           model=tiny_model())
    assert "warm start (encoder + classifier)" in origin
    for got, want in zip(leaves((state.params, state.batch_stats)),
                         leaves((trained.params, trained.batch_stats))):
        np.testing.assert_array_equal(got, want)
    assert int(state.step) == 0
    assert all(np.all(x == 0) for x in leaves(optimizer_moments(state.opt_state)))  # fresh momentum
    assert float(np.asarray(state.queue.valid).sum()) == 0  # empty queue

    # Encoder only: the classifier keeps this run's own initialisation.
    warm.init_classifier = False
    fresh, _ = train_step.create_train_state(warm, mesh, jax.random.PRNGKey(5),
                                             model=tiny_model())
    state, _, origin = train.initial_state(warm, mesh, str(tmp_path / "b2"), model=tiny_model())
    assert "warm start (encoder)" in origin
    np.testing.assert_array_equal(state.params["classifier"]["kernel"],
                                  fresh.params["classifier"]["kernel"])
    for got, want in zip(leaves(state.params["encoder"]), leaves(trained.params["encoder"])):
        np.testing.assert_array_equal(got, want)

    # Another number of classes: a clear error naming the leaf and the fix.
    warm.init_classifier = True
    warm.num_classes = 20
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"(?s)config.init_from=.*params\.classifier\.kernel: checkpoint "
                             r"has shape \(12, 8\), model needs \(20, 8\).*init_classifier=False"):
        train.initial_state(warm, mesh, str(tmp_path / "b3"), model=tiny_model())

    warm.init_from = str(tmp_path / "missing_run")
    with pytest.raises(FileNotFoundError, match="config.init_from=.*missing_run"):
        train.train_and_evaluate(warm, tmp_path / "b4", model=tiny_model())


# ------------------------------------------------------------------ failures


def _poisoned_step(monkeypatch, from_step: int, what: str) -> None:
    """Makes the step report a NaN loss (or NaN params) from `from_step` on."""
    real_make = train_step.make_train_step

    def make(config, mesh, shardings, model=None, step_fn=None, parts=None):
        inner = train_step.build_train_step(config, model, parts=parts)

        def poisoned(state, batch):
            new_state, metrics = inner(state, batch)
            bad = new_state.step >= from_step
            if what == "loss":
                metrics = dict(metrics, loss_encoder=jnp.where(
                    bad, jnp.nan, metrics["loss_encoder"]))
            else:
                kernel = new_state.params["classifier"]["kernel"]
                params = dict(new_state.params,
                              classifier={"kernel": jnp.where(bad, jnp.inf, kernel)})
                new_state = new_state.replace(params=params)
            return new_state, metrics

        return real_make(config, mesh, shardings, model=model, step_fn=poisoned, parts=parts)

    monkeypatch.setattr(train.train_step, "make_train_step", make)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(total_steps=6)
    _poisoned_step(monkeypatch, from_step=4, what="loss")
    with pytest.raises(train.NonFiniteError,
                       match=r"step 4: loss_encoder = nan is not finite.*no checkpoint"):
        train.train_and_evaluate(config, tmp_path, model=tiny_model())
    assert checkpointing.latest_step(tmp_path) == 2  # step 4's checkpoint not written
    state = restore_state(config, tmp_path)
    assert int(state.step) == 2
    assert all(np.all(np.isfinite(x)) for x in leaves(state.params))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_nan_params_block_the_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(total_steps=6)
    config.log_every_steps = 100  # the loss is fine; only the saved state is bad
    _poisoned_step(monkeypatch, from_step=4, what="params")
    with pytest.raises(train.NonFiniteError,
                       match=r"step 4: parameters .* NaN/inf; checkpoint not written"):
        train.train_and_evaluate(config, tmp_path, model=tiny_model())
    assert checkpointing.latest_step(tmp_path) == 2


def test_num_classes_other_than_the_data_is_refused_before_the_workdir(tmp_path):
    config = tiny_config()
    config.num_classes = 6  # the synthetic data has 12 identities
    with pytest.raises(ValueError, match=r"config.num_classes=6 but data set synthetic has 12 "
                                         r"identities .*num_classes=12, or 0"):
        train.train_and_evaluate(config, tmp_path / "run", model=tiny_model())
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_data_dir_is_named(tmp_path):
    config = tiny_config()
    config.dataset.name = "tfds"
    config.dataset.tfds_name = "lfw"
    config.dataset.data_dir = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match=r"config.dataset.data_dir=.*no_such_dir"):
        train.train_and_evaluate(config, tmp_path / "run", model=tiny_model())
