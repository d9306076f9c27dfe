"""Resume never silently throws work away (issue 16, items 1-7).

Config changes on resume are classified by what they do to the saved state
(layout: refused, naming the leaves; optimizer hyperparameters: carried over;
queue size: re-laid out), damaged checkpoints (checksums, missing metadata)
are set aside for an older one, a run with no readable checkpoint stops
instead of starting over, config.json is written only once the state is
restored, device-dependent checks run before anything is written, and a
rollback is a request of each command.

The runs are the tiny config of tests/test_train.py, in process (a few
seconds each).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from broadface_jax import (checkpointing, config_check, elastic, sharding, train, train_step,
                           workdir)
from tests.test_reliability import _config, _logged_steps

OPT = "opt_state.inner_states"


def _run(run: pathlib.Path, overrides: dict | None = None):
    from tests.test_train import tiny_model

    return train.train_and_evaluate(_config(overrides), run, model=tiny_model())


def _leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(checkpointing._storable(tree))[0]
    return {checkpointing._path_str(p): np.asarray(v) for p, v in flat}


def _saved(run: pathlib.Path, step: int, overrides: dict | None = None) -> dict[str, np.ndarray]:
    """The leaves of checkpoint ``step`` restored with the config it was written with."""
    from tests.test_train import restore_state

    return _leaves(restore_state(_config(overrides), run, step))


def _restore_into(run: pathlib.Path, overrides: dict, step: int):
    """elastic.restore of ``step`` into the state the config with ``overrides`` builds."""
    from tests.test_train import tiny_model

    config = _config(overrides)
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train_step.abstract_train_state(config, mesh, tiny_model())
    fresh = lambda: train_step.create_train_state(  # noqa: E731
        config, mesh, jax.random.PRNGKey(7), tiny_model())[0]
    return elastic.restore(run, checkpointing.abstract_like(abstract, shardings), step,
                           fresh=fresh)


def _tree_files(path: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> pathlib.Path:
    """A finished 3-step run (checkpoints 1, 2, 3); tests copy it before changing it."""
    run = tmp_path_factory.mktemp("three") / "run"
    _run(run, {"total_steps": 3})
    return run


@pytest.fixture(scope="module")
def saved3(three_steps) -> dict[str, np.ndarray]:
    """The leaves of that run's checkpoint 3."""
    return _saved(three_steps, 3)


def _copy(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------ item 1: classes of change


@pytest.mark.parametrize("overrides, dropped, initialised", [
    # weight decay / clipping: stateless transforms; every saved leaf moves to its new place
    ({"optimizer.encoder.weight_decay": 0.0}, 0, 0),
    ({"grad_clip_norm": 5.0}, 0, 0),
    # momentum off: the encoder's momentum buffers (5 leaves of the tiny encoder) are dropped
    ({"optimizer.encoder.momentum": 0.0}, 5, 0),
])
def test_optimizer_hyperparameter_change_carries_the_saved_state(three_steps, saved3, overrides,
                                                                   dropped, initialised):
    saved = saved3
    state, note = _restore_into(three_steps, overrides, 3)
    got = _leaves(state)
    matched = 0
    for name, value in got.items():
        canon = checkpointing.canonical_name(name)
        source = [k for k in saved if checkpointing.canonical_name(k) == canon]
        assert len(source) == 1, name
        np.testing.assert_array_equal(value, saved[source[0]], err_msg=name)
        matched += 1
    assert matched == len(saved) - dropped
    if dropped:
        assert f"dropped {dropped} saved leaves" in note and "trace.encoder" in note
        assert not any(".trace.encoder" in k for k in got)
    else:
        assert note is None or "dropped" not in note


@pytest.mark.slow  # a run of its own (momentum off), ~20-40 s on 2 shared cores
def test_momentum_switched_on_starts_its_buffers_at_zero(tmp_path):
    run = tmp_path / "run"
    _run(run, {"total_steps": 1, "optimizer.encoder.momentum": 0.0})
    saved = _saved(run, 1, {"optimizer.encoder.momentum": 0.0})
    state, note = _restore_into(run, {}, 1)
    got = _leaves(state)
    new = [k for k in got if ".trace.encoder." in k]
    assert len(new) == 5 and f"initialised {len(new)} new leaves" in note
    for name in new:
        np.testing.assert_array_equal(got[name], np.zeros_like(got[name]), err_msg=name)
    for name in (k for k in got if k not in new):
        canon = checkpointing.canonical_name(name)
        (source,) = [k for k in saved if checkpointing.canonical_name(k) == canon]
        np.testing.assert_array_equal(got[name], saved[source], err_msg=name)


def test_resume_with_momentum_off_continues_and_keeps_every_checkpoint(three_steps, tmp_path):
    """The probe's reproduction: it set checkpoints aside and trained from step 0."""
    run = _copy(three_steps, tmp_path)
    _run(run, {"total_steps": 4, "optimizer.encoder.momentum": 0.0})
    assert checkpointing.all_steps(run) == [1, 2, 3, 4]
    assert not (run / checkpointing.SET_ASIDE_SUBDIR).exists()
    assert _logged_steps(run) == [1, 2, 3, 4]  # step 4 from 3, not a new run from 0
    assert json.loads((run / workdir.CONFIG_FILE).read_text())[
        "optimizer.encoder.momentum"] == 0.0
    replaced = (run / workdir.REPLACED_CONFIG_FILE).read_text().splitlines()
    assert json.loads(replaced[-1])["config"]["optimizer.encoder.momentum"] == 0.9


def test_layout_change_is_refused_naming_leaves_and_nothing_is_moved(three_steps, tmp_path):
    """Even when allowed, a config that builds other shapes stops: nothing is set aside."""
    run = _copy(three_steps, tmp_path)
    before = _tree_files(run / "checkpoints")
    with pytest.raises(workdir.ResumeConfigError) as info:
        _run(run, {"total_steps": 4, "model.embedding_dim": 16, "allow_resume_changes": "*"})
    text = str(info.value)
    assert "params.classifier.kernel: saved (12, 8) float32, config builds (12, 16) float32" in text
    assert "model.embedding_dim: 8 -> 16" in text and "no checkpoint was moved" in text
    assert _tree_files(run / "checkpoints") == before
    assert not (run / checkpointing.SET_ASIDE_SUBDIR).exists()


def test_failed_resume_does_not_write_config_json(three_steps, tmp_path):
    """Item 5: config.json deleted, a resume with another layout fails and records nothing."""
    run = _copy(three_steps, tmp_path)
    (run / workdir.CONFIG_FILE).unlink()
    with pytest.raises(workdir.ResumeConfigError, match="params.classifier.kernel"):
        _run(run, {"total_steps": 4, "model.embedding_dim": 16})
    assert not (run / workdir.CONFIG_FILE).exists()
    _run(run, {"total_steps": 4})  # the run's real config still resumes, and is recorded
    assert checkpointing.all_steps(run)[-1] == 4
    assert json.loads((run / workdir.CONFIG_FILE).read_text())["model.embedding_dim"] == 8


def test_allowed_queue_size_change_relays_the_queue_out(three_steps, saved3, tmp_path):
    """Item 4: the refusal suggests allow_resume_changes=queue.size_per_device; that works."""
    run = _copy(three_steps, tmp_path)
    with pytest.raises(workdir.ResumeConfigError,
                       match="allow_resume_changes=queue.size_per_device"):
        _run(run, {"total_steps": 4, "queue.size_per_device": 8})
    saved = saved3
    allowed = {"queue.size_per_device": 8, "allow_resume_changes": "queue.size_per_device"}
    config = _config(allowed)
    from tests.test_train import tiny_model

    mesh = sharding.make_mesh(config.mesh)
    state, _, origin = train.initial_state(config, mesh, str(run), tiny_model(),
                                           workdir.read_config(str(run)))
    assert "elastic resume" in origin
    q = jax.device_get(state.queue)
    assert q.embeddings.shape == (64, 8) and q.num_shards == 8
    # every valid saved row is kept (capacity grew), each row's embedding with its label
    old = {tuple(np.round(e, 6)) + (int(l),) for e, l, v in zip(
        saved["queue.embeddings"], saved["queue.labels"], saved["queue.valid"]) if v}
    new = {tuple(np.round(e, 6)) + (int(l),) for e, l, v in zip(
        np.asarray(q.embeddings), np.asarray(q.labels), np.asarray(q.valid)) if v}
    assert len(old) == int(saved["queue.valid"].sum()) and new == old
    # and laid out as the saved 8 ring buffers of 4 rows re-laid out into 8 of 8 would be
    from broadface_jax import queue as queue_lib

    saved_q = queue_lib.QueueState(
        embeddings=saved["queue.embeddings"], weights=saved["queue.weights"],
        labels=saved["queue.labels"], valid=saved["queue.valid"],
        position=saved["queue.position"], num_shards=8)
    want = queue_lib.relayout(saved_q, 64, 8)
    for k in ("embeddings", "weights", "labels", "valid", "position"):
        np.testing.assert_array_equal(np.asarray(getattr(q, k)), np.asarray(getattr(want, k)),
                                      err_msg=k)
    _run(run, {"total_steps": 5, **allowed})
    assert checkpointing.all_steps(run)[-1] == 5
    assert json.loads((run / workdir.CONFIG_FILE).read_text())["queue.size_per_device"] == 8


# ------------------------------------------------------------------ items 2, 3: damage


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file()
             and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bit(path: pathlib.Path, rng) -> None:
    data = bytearray(path.read_bytes())
    i = int(rng.integers(len(data)))
    data[i] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))


def _garbage(path: pathlib.Path, rng) -> None:
    """1 KiB of random bytes over the file's data at a random place (all of a smaller file)."""
    data = bytearray(path.read_bytes())
    n = min(1024, len(data))
    start = int(rng.integers(len(data) - n + 1))
    data[start:start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_bit", "garbage_1kib", "truncate", "delete"])
def test_verify_names_the_damaged_file(three_steps, tmp_path, damage):
    run = _copy(three_steps, tmp_path)
    step_dir = pathlib.Path(checkpointing.checkpoint_dir(run)) / "3"
    assert checkpointing.verify(step_dir) is True
    target = _largest_array_file(step_dir)
    rng = np.random.default_rng()
    if damage == "flip_bit":
        _flip_bit(target, rng)
    elif damage == "garbage_1kib":
        _garbage(target, rng)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    with pytest.raises(checkpointing.CorruptCheckpointError) as info:
        checkpointing.verify(step_dir)
    assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_flipped_bit_is_set_aside_and_the_older_checkpoint_used(three_steps, tmp_path, caplog):
    """Without checksums the flipped bit restored silently (the probe: a NaN optimizer leaf)."""
    run = _copy(three_steps, tmp_path)
    step_dir = pathlib.Path(checkpointing.checkpoint_dir(run)) / "3"
    target = _largest_array_file(step_dir)
    _flip_bit(target, np.random.default_rng())
    with caplog.at_level("WARNING"):
        _run(run, {"total_steps": 3})
    assert any(str(target) in r.getMessage() and "checksum" in r.getMessage()
               for r in caplog.records)
    aside = sorted(p.name for p in (run / checkpointing.SET_ASIDE_SUBDIR).iterdir())
    assert aside == ["3.unreadable"]
    assert checkpointing.all_steps(run) == [1, 2, 3]  # step 3 trained again from 2
    assert _logged_steps(run) == [1, 2, 3]


def test_missing_metadata_file_falls_back_to_the_older_checkpoint(three_steps, tmp_path):
    """Item 2: a step without default/_METADATA blocked every resume."""
    run = _copy(three_steps, tmp_path)
    (pathlib.Path(checkpointing.checkpoint_dir(run)) / "3" / "default" / "_METADATA").unlink()
    with pytest.raises(checkpointing.UnreadableCheckpointError, match="_METADATA"):
        elastic.saved_queue_rows(run, 3)
    _run(run, {"total_steps": 4})
    assert sorted(p.name for p in (run / checkpointing.SET_ASIDE_SUBDIR).iterdir()) == [
        "3.unreadable"]
    assert checkpointing.all_steps(run) == [1, 2, 3, 4]


def test_an_import_is_not_resumed_nor_set_aside(tmp_path):
    """A workdir holding only weights (broadface_jax.convert's checkpoint 0) is not a run."""
    from tests.test_train import tiny_model

    config = _config()
    state, _ = train_step.create_train_state(config, sharding.make_mesh(config.mesh),
                                             jax.random.PRNGKey(0), tiny_model())
    manager = checkpointing.create_manager(tmp_path / "import", max_to_keep=None)
    checkpointing.save(manager, 0, {"params": state.params, "batch_stats": state.batch_stats},
                       force=True)
    checkpointing.wait(manager)
    manager.close()
    run = tmp_path / "import"
    before = _tree_files(run / "checkpoints")
    with pytest.raises(workdir.ResumeConfigError, match="not a broadface_jax train state"):
        _run(run, {"total_steps": 2})
    assert _tree_files(run / "checkpoints") == before
    assert not (run / checkpointing.SET_ASIDE_SUBDIR).exists()


def test_no_readable_checkpoint_stops_unless_start_over(three_steps, tmp_path):
    run = _copy(three_steps, tmp_path)
    for step in (1, 2, 3):
        (pathlib.Path(checkpointing.checkpoint_dir(run)) / str(step) / "default"
         / "_METADATA").unlink()
    before = _tree_files(run / "checkpoints")
    with pytest.raises(train.NoReadableCheckpointError, match="start_over=True"):
        _run(run, {"total_steps": 4})
    assert _tree_files(run / "checkpoints") == before  # nothing moved
    _run(run, {"total_steps": 2, "start_over": True})
    assert sorted(p.name for p in (run / checkpointing.SET_ASIDE_SUBDIR).iterdir()) == [
        "1.unreadable", "2.unreadable", "3.unreadable"]
    assert checkpointing.all_steps(run) == [1, 2]


def test_manifest_is_written_before_the_step_counts(tmp_path, monkeypatch):
    """A save whose manifest cannot be written never becomes a finished step."""
    from tests.test_checkpointing import _make_state

    mesh = sharding.make_mesh(_config().mesh)
    state, _ = _make_state(1, mesh)
    manager = checkpointing.create_manager(tmp_path, max_to_keep=None)
    checkpointing.save(manager, 1, state, force=True)
    checkpointing.wait(manager)
    assert (pathlib.Path(checkpointing.checkpoint_dir(tmp_path)) / "1"
            / checkpointing.MANIFEST_FILE).exists()

    def broken(step_dir):
        assert ".orbax-checkpoint-tmp" in str(step_dir)  # before orbax's rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing, "write_manifest", broken)
    checkpointing.save(manager, 2, state, force=True)
    with pytest.raises(checkpointing.CheckpointWriteError, match="no space left"):
        checkpointing.wait(manager)
    assert checkpointing.all_steps(tmp_path) == [1]
    manager.close()


# ------------------------------------------------------------------ item 6: checks first


@pytest.mark.parametrize("overrides, expected", [
    ({"queue.chunk_size": 3}, "config.queue.chunk_size=3"),
    ({"mesh.data": 3}, "data=3"),
    ({"mesh.model": 3}, "config.mesh.model=3"),
    ({"restore_step": 7}, "config.restore_step=7"),
    # a device of 1 MiB (patched below) cannot hold 65,536 queue rows (4.3 MiB); the
    # probe's 134M rows per device the same way, without risking the allocation if broken
    ({"queue.size_per_device": 2 ** 16}, "config.queue.size_per_device=65536: 4.3 MiB"),
])
def test_device_checks_run_before_anything_is_written(tmp_path, overrides, expected,
                                                      monkeypatch):
    monkeypatch.setattr(train, "device_memory_bytes", lambda: 2 ** 20)
    run = tmp_path / "run"
    with pytest.raises(config_check.ConfigError) as info:
        _run(run, {"total_steps": 2, **overrides})
    assert expected in str(info.value)
    assert not run.exists()


def test_memory_estimate_counts_the_queue_per_device():
    from tests.test_train import tiny_model

    config = _config({"queue.size_per_device": 1024, "queue.chunk_size": 0})
    mesh = sharding.make_mesh(config.mesh)
    need = train.memory_estimate(config, mesh, tiny_model())
    # embeddings + weights, float32, 8 dims; labels int32 and valid bool; one shard per device
    assert need["queue.size_per_device"] == 1024 * (8 * 4 * 2 + 4 + 1) + 4
    # logits of the whole queue against the 12 classes, forward and backward
    assert need["queue.chunk_size"] == 3 * 1024 * 12 * 4


# ------------------------------------------------------------------ item 7: rollback


def _initial_step(run: pathlib.Path, overrides: dict) -> int:
    from tests.test_train import tiny_model

    config = _config(overrides)
    mesh = sharding.make_mesh(config.mesh)
    state, _, _ = train.initial_state(config, mesh, str(run), tiny_model())
    return int(jax.device_get(state.step))


def test_rollback_is_a_request_of_each_command(three_steps, tmp_path, monkeypatch):
    """Item 7: the same rollback again was ignored ("rollback already done")."""
    import shutil

    for name in train.INVOCATION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    run = _copy(three_steps, tmp_path)
    aside = run / checkpointing.SET_ASIDE_SUBDIR
    ckpts = pathlib.Path(checkpointing.checkpoint_dir(run))

    def rolled_back_run_writes_step_3_again():
        shutil.copytree(aside / "3.rolled-back", ckpts / "3")

    assert _initial_step(run, {"restore_step": 2}) == 2
    assert sorted(p.name for p in aside.iterdir()) == ["3.rolled-back"]
    rolled_back_run_writes_step_3_again()
    # The same command again: a new request, the diverged checkpoint 3 is set aside again.
    assert _initial_step(run, {"restore_step": 2}) == 2
    assert len(list(aside.iterdir())) == 2 and checkpointing.all_steps(run) == [1, 2]
    requests = json.loads((run / train.ROLLBACK_FILE).read_text())["requests"]
    assert [(r["restore_step"], r["set_aside"], r["invocation"]) for r in requests] == [
        (2, [3], None), (2, [3], None)]
    # Under an invocation id: the first start rolls back, the same id requeued resumes.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    rolled_back_run_writes_step_3_again()
    assert _initial_step(run, {"restore_step": 2}) == 2
    rolled_back_run_writes_step_3_again()
    assert _initial_step(run, {"restore_step": 2}) == 3
    assert len(list(aside.iterdir())) == 3
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job with the same command: a request
    assert _initial_step(run, {"restore_step": 2}) == 2


@pytest.mark.slow
def test_rollback_twice_trains_from_the_step_each_time(three_steps, tmp_path, monkeypatch):
    for name in train.INVOCATION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    run = _copy(three_steps, tmp_path)
    for _ in range(2):
        _run(run, {"total_steps": 4, "restore_step": 2})
        assert checkpointing.all_steps(run) == [1, 2, 3, 4]
        assert _logged_steps(run) == [1, 2, 3, 4]
    names = sorted(p.name for p in (run / checkpointing.SET_ASIDE_SUBDIR).iterdir())
    assert [n.split(".")[0] for n in names] == ["3", "3", "4"]
    assert (run / workdir.REPLACED_METRICS_FILE).exists()


# ------------------------------------------------------------------ the probe's commands


def _main(workdir_: pathlib.Path, *flags: str):
    """``python -m broadface_jax.main`` with the smoke config on one CPU device."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    for name in train.INVOCATION_VARIABLES:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "broadface_jax.main", "--config", "configs/demo.py:smoke",
         f"--workdir={workdir_}", "--config.checkpoint_every_steps=1",
         "--config.log_every_steps=1", "--config.keep_checkpoints=0", "--config.eval.targets=()",
         *flags],
        cwd=pathlib.Path(__file__).resolve().parents[1], env=env, capture_output=True,
        text=True, timeout=600)


@pytest.mark.slow
def test_probe_commands_resume_or_stop_with_one_line(tmp_path):
    run = tmp_path / "W"
    assert _main(run, "--config.total_steps=2").returncode == 0
    # momentum off: resumes (the probe: checkpoints set aside, trained from step 0)
    done = _main(run, "--config.total_steps=3", "--config.optimizer.encoder.momentum=0.0")
    assert done.returncode == 0, done.stderr[-2000:]
    # clipping on, weight decay off (the probe: CheckpointError tracebacks)
    done = _main(run, "--config.total_steps=4", "--config.optimizer.encoder.momentum=0.0",
                 "--config.grad_clip_norm=5.0", "--config.optimizer.encoder.weight_decay=0.0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpointing.all_steps(run) == [1, 2, 3, 4]
    assert not (run / checkpointing.SET_ASIDE_SUBDIR).exists()
    assert _logged_steps(run) == [1, 2, 3, 4]
    # another width with config.json gone: one line, nothing recorded, nothing moved
    recorded = (run / workdir.CONFIG_FILE).read_text()
    (run / workdir.CONFIG_FILE).unlink()
    failed = _main(run, "--config.total_steps=5", "--config.model.width=0.25")
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("broadface_jax: cannot resume") and "config builds" in last
    assert "Traceback" not in failed.stderr
    assert not (run / workdir.CONFIG_FILE).exists()
    assert checkpointing.all_steps(run) == [1, 2, 3, 4]
    (run / workdir.CONFIG_FILE).write_text(recorded)
    # checks that need the devices, on a fresh workdir: exit 2, nothing written
    fresh = tmp_path / "fresh"
    for flag, text in (("--config.queue.chunk_size=3", "config.queue.chunk_size=3"),
                       ("--config.mesh.model=2", "config.mesh.model=2"),
                       ("--config.restore_step=7", "config.restore_step=7")):
        refused = _main(fresh, flag)
        assert refused.returncode == 2, (flag, refused.stderr[-2000:])
        assert text in refused.stderr and "Traceback" not in refused.stderr, flag
        assert not fresh.exists(), flag
