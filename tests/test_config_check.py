"""config_check: every rule in one place, the names read from the registries that own them.

* the fields it used to skip (``dataset.augment``, ``normalize``, ``resize_to``,
  ``crop_scale``, ``crop_ratio``, ``eval.tfds_data_dir``): a bad value of each
  is one line naming the field and the value;
* the code that needs a field valid (encoder, step sizes, schedule, optimizer,
  input pipeline) raises config_check's own line, not a copy of the rule;
* an optimizer or a loss with a new hyperparameter is one registry entry: the
  default config grows the field, config_check checks its range, the step
  builds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from broadface_jax import (config_check, input_pipeline, losses, models, optim, sharding, train,
                           train_step)
from tests.np_reference import np_margin_ce
from tests.tiny_config import tiny_config


def _untyped(config) -> ml_collections.ConfigDict:
    """The config with any value allowed in any field (ml_collections checks types)."""
    return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


@pytest.mark.parametrize("field,value", [
    ("dataset.augment", "crop"),
    ("dataset.augment", None),
    ("dataset.normalize", "imagenett"),
    ("dataset.resize_to", 8),  # < image_size 16
    ("dataset.resize_to", 32.0),
    ("dataset.crop_scale", (0.5, 0.2)),
    ("dataset.crop_scale", (0.2, 1.5)),
    ("dataset.crop_scale", 0.5),
    ("dataset.crop_ratio", (0.0, 1.0)),
    ("dataset.crop_ratio", (1.0,)),
    ("eval.tfds_data_dir", 3),
    ("eval.tfds_data_dir", None),
])
def test_each_field_it_used_to_skip_is_one_line_naming_it(field, value):
    config = _untyped(tiny_config())
    assert config_check.problems(config) == []
    _set(config, field, value)
    found = config_check.problems(config)
    assert len(found) == 1 and found[0].startswith(f"config.{field}={value!r}: "), found


def test_imagenet_normalisation_needs_the_retrieval_pipeline():
    config = tiny_config(dataset__normalize="imagenet")
    assert config_check.problems(config) == [
        "config.dataset.normalize='imagenet': needs config.dataset.augment='retrieval' "
        "(the face pipeline normalises to [-1, 1])"]
    config.dataset.augment = "retrieval"
    assert config_check.problems(config) == []


def test_a_missing_field_is_named():
    config = _untyped(tiny_config())
    del config.dataset["crop_ratio"]
    assert config_check.problems(config) == [
        "config.dataset has no field 'crop_ratio' (configs/default.py lists every field)"]


def _line(config, field: str) -> str:
    (line,) = [p for p in config_check.problems(config) if p.startswith(f"config.{field}=")]
    return line


def test_the_code_raises_config_checks_own_line():
    """Each consumer asks config_check: the error is its line, so there is one rule."""
    mesh = sharding.make_mesh(tiny_config().mesh, jax.devices()[:1])
    cases = [
        ("model.dtype", "float16", lambda c: models.build_encoder(c.model)),
        ("model.batch_norm", "sync", lambda c: models.build_encoder(c.model)),
        ("queue.size_per_device", 6, lambda c: train_step.validate_config(c, mesh)),
        ("classifier.sample_rate", 0.0, lambda c: train_step.validate_config(c, mesh)),
        ("total_steps", 0, train.Schedule.from_config),
        ("log_every_steps", 1.5, train.Schedule.from_config),
        ("optimizer.classifier.name", "sgdd", train_step.build_optimizer),
        ("lr_boundaries", (3, 2), train_step.build_optimizer),
        ("dataset.normalize", "bogus", input_pipeline.normalization),
        ("dataset.crop_ratio", (2.0, 1.0), input_pipeline.RetrievalAugment.from_config),
        ("dataset.resize_to", 4, input_pipeline.RetrievalAugment.from_config),
    ]
    for field, value, use in cases:
        config = _untyped(tiny_config("step"))
        _set(config, field, value)
        want = _line(config, field)
        with pytest.raises(config_check.ConfigError) as e:
            use(config)
        assert want in str(e.value), (field, str(e.value))


def test_ring_buffer_rule_is_config_checks():
    config = tiny_config(per_device_batch_size=4, queue__size_per_device=6)
    want = ("config.queue.size_per_device=6: must be a multiple of "
            "config.per_device_batch_size=4 (the ring buffer writes whole batches)")
    assert config_check.problems(config) == [want]
    with pytest.raises(ValueError, match=want.replace("(", r"\(").replace(")", r"\)")):
        train_step.validate_config(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))


def test_names_come_from_the_registries(monkeypatch):
    config = tiny_config(model__dtype="bfloat16", optimizer__encoder__name="adam")
    assert config_check.problems(config) == []
    monkeypatch.setattr(models, "DTYPES", ("float32",))
    monkeypatch.delitem(optim.REGISTRY, "adam")
    found = config_check.problems(config)
    assert [p.split("=")[0] for p in found] == ["config.model.dtype",
                                                "config.optimizer.encoder.name"], found


def test_a_new_optimizer_is_one_registry_line(monkeypatch):
    import optax

    monkeypatch.setitem(optim.REGISTRY, "plain", lambda lr, opt_config: (
        optax.inject_hyperparams(optax.sgd)(learning_rate=lr)))
    config = tiny_config(optimizer__classifier__name="plain",
                         optimizer__classifier__weight_decay=0.0)
    assert config_check.problems(config) == []
    tx, _ = train_step.build_optimizer(config)
    rng = np.random.default_rng(0)
    params = {"encoder": {"w": jnp.asarray(rng.normal(size=3), jnp.float32)},
              "classifier": {"kernel": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["classifier"]["kernel"]),
                               -config.lr * np.asarray(grads["classifier"]["kernel"]), rtol=1e-6)
    assert float(train_step.applied_lr(state)["classifier"]) == pytest.approx(config.lr)


# A loss defined outside the package, with a hyperparameter no other loss has.
def shifted_logits(cos, onehot, cos_y, state, *, s: float, shift: float):
    del cos_y, state
    return s * jnp.where(onehot, cos - shift, cos)


def test_a_loss_with_a_new_hyperparameter_is_its_module_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(losses.REGISTRY, "shifted", losses.LossSpec(
        "tests.test_config_check", "shifted_logits",
        {"shift": losses.Hyperparameter(0.25, 0.0, 1.0, high_open=True)}))
    config = tiny_config(loss__m2=None)  # configs/default.py, loaded now: it has loss.shift
    assert config.loss.shift is None
    config.loss.name, config.loss.s = "shifted", 32.0
    assert config_check.problems(config) == []
    config.loss.shift = 1.0
    assert config_check.problems(config) == [
        "config.loss.shift=1.0: must be a finite number in [0, 1) or None (the loss's default)"]
    config.loss.shift = 0.4
    config.loss.m2 = 0.5
    assert config_check.problems(config) == [
        "config.loss.m2=0.5: loss 'shifted' does not use m2 (it uses s, shift); leave it "
        "unset (None) or choose a loss that uses it"]
    config.loss.m2 = None
    config.loss.name = "arcface"  # and the other way round
    assert [p.split(":")[0] for p in config_check.problems(config)] == ["config.loss.shift=0.4"]

    config.loss.name = "shifted"
    rng = np.random.default_rng(3)
    n, c, d = 7, 5, 4
    e, w, y = rng.normal(size=(n, d)), rng.normal(size=(c, d)), rng.integers(0, c, n)
    loss = losses.build(config.loss)
    got = loss.per_example(jnp.asarray(e, jnp.float32),
                           losses.l2_normalize(jnp.asarray(w, jnp.float32)), jnp.asarray(y))
    s = float(config.loss.s)
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, s, 1.0, 0.0, 0.4),
                               rtol=1e-4, atol=1e-4)
    config.loss.shift = None  # the declared default
    got = losses.build(config.loss).per_example(
        jnp.asarray(e, jnp.float32), losses.l2_normalize(jnp.asarray(w, jnp.float32)),
        jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), np_margin_ce(e, w, y, s, 1.0, 0.0, 0.25),
                               rtol=1e-4, atol=1e-4)


def test_parts_are_built_once_and_passed(monkeypatch):
    """create_train_state / build_train_step / make_embed_fn use the Parts given."""
    from tests.tiny_encoder import TinyEncoder

    config = tiny_config("step")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    parts = train_step.build_parts(config, mesh, TinyEncoder(embedding_dim=6))
    for name in ("build_parts", "build_optimizer"):
        monkeypatch.setattr(train_step, name, lambda *a, **k: pytest.fail("built again"))
    monkeypatch.setattr(losses, "build", lambda *a, **k: pytest.fail("built again"))
    monkeypatch.setattr(models, "build_encoder", lambda *a, **k: pytest.fail("built again"))
    abstract, _ = train_step.abstract_train_state(config, mesh, parts=parts)
    assert abstract.params["classifier"]["kernel"].shape == (config.num_classes, 6)
    train_step.build_train_step(config, mesh=mesh, parts=parts)
    train_step.build_prefill_step(config, mesh=mesh, parts=parts)
    train_step.make_embed_fn(config, mesh, parts.model)
    with pytest.raises(ValueError, match="either as model= or in parts="):
        train_step.build_train_step(config, TinyEncoder(embedding_dim=6), mesh, parts=parts)


def test_a_config_recorded_in_a_workdir_reads_back_valid(tmp_path):
    """config.json (today's format) -> restore.workdir_config: still valid, targets resolve.

    workdir.flatten records leaves only, so an empty ``evals`` is not in it: the
    one field read as optional (evaluation.registry), every other one is there.
    """
    from broadface_jax import evaluation, restore, workdir

    config = tiny_config(eval__targets=("synthetic",), dataset__normalize="imagenet",
                         dataset__augment="retrieval")
    workdir.record_config(str(tmp_path), config)
    recorded = restore.workdir_config(str(tmp_path))
    assert config_check.problems(recorded) == []
    assert evaluation.resolve_target("synthetic", recorded).type == "synthetic"
    assert input_pipeline.RetrievalAugment.from_config(recorded) == (
        input_pipeline.RetrievalAugment.from_config(config))
    np.testing.assert_array_equal(input_pipeline.normalization(recorded)[0],
                                  np.asarray(input_pipeline.IMAGENET_MEAN, np.float32))
