"""Tests for broadface_jax.checkpointing (orbax save / restore / reshard)."""

from __future__ import annotations

import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from broadface_jax import checkpointing


@flax.struct.dataclass
class _State:
    """Shaped like the trainer's TrainState: arrays, dicts, optax state, key."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    queue: dict
    rng: jax.Array


def _make_state(seed: int, mesh: jax.sharding.Mesh) -> tuple[_State, _State]:
    """A random state on ``mesh`` (rows sharded over 'data') and its shardings."""
    r = np.random.default_rng(seed)
    params = {
        "encoder": {"conv": r.normal(size=(3, 3, 3, 8)).astype(np.float32),
                    "fc": r.normal(size=(16, 8)).astype(np.float32)},
        "classifier": {"kernel": r.normal(size=(24, 8)).astype(np.float32)},
    }
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    # Fill the momentum with random values so a restore of zeros would fail.
    opt_state = jax.tree.map(
        lambda x: r.normal(size=x.shape).astype(np.float32), opt_state)
    state = _State(
        step=np.int32(r.integers(1, 1000)),
        params=params,
        batch_stats={"bn": {"mean": r.normal(size=(8,)).astype(np.float32)}},
        opt_state=opt_state,
        queue={"emb": r.normal(size=(16, 8)).astype(np.float32),
               "label": r.integers(0, 24, size=(16,)).astype(np.int32),
               "off": np.zeros((0, 8), np.float32)},  # a disabled queue: zero size
        rng=jax.random.key(int(r.integers(0, 2**31))),
    )
    rows = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    shardings = jax.tree.map(
        lambda x: rows if getattr(x, "ndim", 0) >= 1 and x.shape[0] % mesh.size == 0
        else rep, state)
    return jax.device_put(state, shardings), shardings


def _assert_trees_equal(a, b) -> None:
    a = checkpointing._keys_to_data(a)
    b = checkpointing._keys_to_data(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture()
def mesh8() -> jax.sharding.Mesh:
    return jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])


def _save_one(workdir, step: int, state, max_to_keep=None) -> None:
    """Saves ``state`` as checkpoint ``step`` of ``workdir`` and waits for it."""
    manager = checkpointing.create_manager(workdir, max_to_keep=max_to_keep)
    assert checkpointing.save(manager, step, state, force=True)
    manager.wait_until_finished()
    manager.close()


def test_listing_steps_runs_no_multihost_barrier(tmp_path, mesh8, monkeypatch):
    """Readers must be barrier-free: one process may list steps where another does not.

    (The 2-process training test failed once with process 1 in orbax's
    'save_root_metadata' barrier of a read-only manager while process 0 was in
    'create_directory': process 1 listed the steps just after process 0 had
    created the folder.)
    """
    from orbax.checkpoint._src.multihost import multihost

    state, shardings = _make_state(0, mesh8)
    _save_one(tmp_path, 3, state)
    barriers = []
    monkeypatch.setattr(multihost, "sync_global_processes",
                        lambda name, *a, **k: barriers.append(name))
    assert checkpointing.all_steps(tmp_path) == [3]
    assert barriers == []  # listing: none at all
    abstract = jax.eval_shape(lambda s: s, state)
    restored = checkpointing.restore(tmp_path, checkpointing.abstract_like(abstract, shardings))
    np.testing.assert_array_equal(np.asarray(restored.params["classifier"]["kernel"]),
                                  state.params["classifier"]["kernel"])
    # Restoring is collective (every process restores): only the restore's own barrier.
    assert [b for b in barriers if "restore" not in b] == []


def test_round_trip_reshards_onto_other_mesh(tmp_path, mesh8):
    state, _ = _make_state(0, mesh8)
    _save_one(tmp_path, 7, state, max_to_keep=2)

    # Restore onto 2 devices with a different partitioning of each leaf.
    mesh2 = jax.make_mesh((2,), ("data",), devices=jax.devices()[2:4])
    abstract = jax.eval_shape(lambda s: s, state)
    _, shard2 = _make_state(0, mesh2)
    shard2 = shard2.replace(params={
        **shard2.params, "classifier": {"kernel": NamedSharding(mesh2, P(None, "data"))}})
    target = checkpointing.abstract_like(abstract, shard2)
    restored = checkpointing.restore(tmp_path, target)

    assert isinstance(restored, _State)
    _assert_trees_equal(restored, state)
    assert restored.queue["off"].shape == (0, 8)
    assert restored.queue["off"].sharding == shard2.queue["off"]
    assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    kernel = restored.params["classifier"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh2, P(None, "data"))
    assert {d.id for d in kernel.devices()} == {2, 3}
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(jax.random.normal(restored.rng, (4,)),
                                  jax.random.normal(state.rng, (4,)))


def test_keeps_latest_and_resolves_paths(tmp_path, mesh8):
    manager = checkpointing.create_manager(tmp_path, max_to_keep=2)
    states = {}
    for step in (1, 2, 3):
        states[step], shardings = _make_state(step, mesh8)
        checkpointing.save(manager, step, states[step], force=True)
    manager.wait_until_finished()
    manager.close()

    assert checkpointing.latest_step(tmp_path) == 3
    ckdir = checkpointing.checkpoint_dir(tmp_path)
    assert sorted(os.listdir(ckdir)) == ["2", "3"]
    assert checkpointing.resolve(tmp_path) == (ckdir, 3)
    assert checkpointing.resolve(ckdir) == (ckdir, 3)
    assert checkpointing.resolve(os.path.join(ckdir, "2")) == (ckdir, 2)
    assert checkpointing.resolve(tmp_path, step=2) == (ckdir, 2)

    target = checkpointing.abstract_like(jax.eval_shape(lambda s: s, states[2]),
                                         shardings)
    _assert_trees_equal(checkpointing.restore(os.path.join(ckdir, "2"), target),
                        states[2])
    _assert_trees_equal(checkpointing.restore(tmp_path, target), states[3])


def test_missing_and_empty_paths_are_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        checkpointing.resolve(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint found in .*empty"):
        checkpointing.resolve(empty)
    assert checkpointing.latest_step(empty) is None


def test_missing_step_is_clear_error(tmp_path, mesh8):
    state, _ = _make_state(1, mesh8)
    _save_one(tmp_path, 5, state)
    with pytest.raises(FileNotFoundError, match=r"step 9 not found.*\[5\]"):
        checkpointing.resolve(tmp_path, step=9)


def _corrupt(step_dir: pathlib.Path) -> None:
    """Truncates every data file of a checkpoint to a few bytes."""
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:3])


def test_corrupt_checkpoint_names_directory(tmp_path, mesh8):
    state, shardings = _make_state(2, mesh8)
    _save_one(tmp_path, 4, state)
    step_dir = pathlib.Path(checkpointing.checkpoint_dir(tmp_path)) / "4"
    _corrupt(step_dir)
    target = checkpointing.abstract_like(jax.eval_shape(lambda s: s, state),
                                         shardings)
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"checkpoints/4 .*(corrupt|incomplete)"):
        checkpointing.restore(tmp_path, target)


def test_partial_restore_and_shape_mismatch(tmp_path, mesh8):
    state, shardings = _make_state(3, mesh8)
    _save_one(tmp_path, 10, state)

    part = {"params": {"encoder": state.params["encoder"]},
            "batch_stats": state.batch_stats}
    part_target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), part)
    got = checkpointing.restore_partial(tmp_path, part_target)
    assert set(got) == {"params", "batch_stats"}
    assert set(got["params"]) == {"encoder"}
    _assert_trees_equal(got, part)

    bad = {"params": {"classifier": {"kernel": jax.ShapeDtypeStruct(
        (30, 8), jnp.float32, sharding=NamedSharding(mesh8, P()))}}}
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"params\.classifier\.kernel: checkpoint has shape "
                             r"\(24, 8\), model needs \(30, 8\)"):
        checkpointing.restore_partial(tmp_path, bad)
    absent = {"params": {"head": {"w": jax.ShapeDtypeStruct(
        (2,), jnp.float32, sharding=NamedSharding(mesh8, P()))}}}
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"params\.head\.w: missing from the checkpoint"):
        checkpointing.restore_partial(tmp_path, absent)


def test_relative_workdir_saves_and_restores(tmp_path, mesh8, monkeypatch):
    """`make demo` passes --workdir runs/demo: orbax needs absolute paths, we make them."""
    monkeypatch.chdir(tmp_path)
    state, shardings = _make_state(5, mesh8)
    _save_one("runs/rel", 5, state, max_to_keep=1)
    ckdir = checkpointing.checkpoint_dir("runs/rel")
    assert os.path.isabs(ckdir) and ckdir == str(tmp_path / "runs" / "rel" / "checkpoints")
    assert checkpointing.latest_step("runs/rel") == 5
    target = checkpointing.abstract_like(jax.eval_shape(lambda s: s, state), shardings)
    _assert_trees_equal(checkpointing.restore("runs/rel", target), state)
