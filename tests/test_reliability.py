"""Runs that survive their operators: locks, signals, full disks, rollback, config checks.

Most tests drive real processes: this file run as a script is the worker
(``python tests/test_reliability.py WORKDIR OVERRIDES_JSON``), which trains
the tiny config of tests/test_train.py through ``broadface_jax.main.run``
(the CLI's exit-code mapping) on 8 fake CPU devices. The tests send it real
signals and compare what it leaves on disk with an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from broadface_jax import checkpointing, config_check, preemption, train, workdir
from tests.tmpfs import mount_tmpfs

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("BROADFACE_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


def _config(overrides: dict | None = None):
    from tests.tiny_config import tiny_config

    fields = {"total_steps": 6, "checkpoint_every_steps": 1}
    fields.update({key.replace(".", "__"): tuple(value) if isinstance(value, list) else value
                   for key, value in (overrides or {}).items()})
    return tiny_config(**fields)


def _worker(workdir_: str, overrides: str) -> None:
    sys.path.insert(0, str(REPO))
    dist = os.environ.get("BROADFACE_TEST_DIST")  # "port,num_processes,process_id"
    if dist:
        port, count, pid = map(int, dist.split(","))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", count, pid, initialization_timeout=120)
    from broadface_jax import main
    from tests.test_train import tiny_model

    overrides = json.loads(overrides)
    block = overrides.pop("_block_before_step", None)
    if overrides.pop("_block_process", jax.process_index()) != jax.process_index():
        block = None
    if block is not None:  # the input waits before step `block` until <workdir>/go exists
        from broadface_jax import input_pipeline

        real = input_pipeline.create_train_iterator

        def blocking(config, start_step=0):
            for step, batch in enumerate(real(config, start_step), start=start_step + 1):
                if step == block:
                    pathlib.Path(workdir_, "blocked").write_text(str(step))
                    while not pathlib.Path(workdir_, "go").exists():
                        time.sleep(0.05)
                yield batch

        input_pipeline.create_train_iterator = blocking
    main.run(_config(overrides), workdir_, model=tiny_model())


def _env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _log_path(workdir_: pathlib.Path) -> pathlib.Path:
    """The worker's output, beside the workdir (or in LOG_DIR for a workdir on a tmpfs)."""
    return LOG_DIR.get(workdir_, workdir_.parent) / f"{workdir_.name}.log"


LOG_DIR: dict[pathlib.Path, pathlib.Path] = {}


def _spawn(workdir_: pathlib.Path, overrides: dict | None = None, dist: str = "",
           log_name: str = "") -> subprocess.Popen:
    """The worker on ``workdir_``; ``dist="port,2,i"``: process i of 2 (4 devices each)."""
    env = _env(4 if dist else 8)
    if dist:
        env["BROADFACE_TEST_DIST"] = dist
    log = open(_log_path(workdir_).with_name(log_name or _log_path(workdir_).name), "ab")
    return subprocess.Popen([sys.executable, __file__, str(workdir_), json.dumps(overrides or {})],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _log(workdir_: pathlib.Path) -> str:
    return _log_path(workdir_).read_text(errors="replace")


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _records(workdir_: pathlib.Path) -> list[dict]:
    path = workdir_ / workdir.METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def _logged_steps(workdir_: pathlib.Path) -> list[int]:
    return [r["step"] for r in _records(workdir_) if "loss_encoder" in r]


def _state_leaves(config, workdir_: pathlib.Path, step: int):
    from tests.test_train import restore_state

    state = restore_state(config, workdir_, step)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return dict(zip(names, (np.asarray(x) for x in jax.tree.leaves(state))))


def _assert_same_state(config, a: pathlib.Path, b: pathlib.Path, step: int) -> None:
    got, want = _state_leaves(config, a, step), _state_leaves(config, b, step)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


TOTAL = 12
EVAL = {"eval.targets": ["synthetic"], "eval_every_steps": 4, "total_steps": TOTAL}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> pathlib.Path:
    """The uninterrupted reference run (12 steps, synthetic evaluation every 4)."""
    from tests.test_train import tiny_model

    path = tmp_path_factory.mktemp("straight") / "run"
    train.train_and_evaluate(_config(EVAL), path, model=tiny_model())
    return path


# ------------------------------------------------------------------ config checks


def test_every_bad_config_value_is_named_at_once():
    config = _config()
    config.queue.chunk_size = -2
    config.loss.s = -64.0
    config.image_size = 0
    config.keep_checkpoints = -1
    config.lr_boundaries = ("abc",)
    config.loss.name = "arcfase"
    config.optimizer.encoder.momentum = 1.5
    config.classifier_sharding = "rows"
    found = config_check.problems(config)
    fields = sorted(line.split("=")[0] for line in found)
    assert fields == sorted(["config.queue.chunk_size", "config.loss.s", "config.image_size",
                             "config.keep_checkpoints", "config.lr_boundaries",
                             "config.loss.name", "config.optimizer.encoder.momentum",
                             "config.classifier_sharding"])
    text = "\n".join(found)
    assert "did you mean 'arcface'" in text and "-2" in text and ">= 16" in text
    assert config_check.problems(_config()) == []
    with pytest.raises(config_check.ConfigError, match="8 invalid fields"):
        config_check.validate(config)


def test_unknown_data_set_suggests_our_builders_only(tmp_path):
    config = _config()
    config.dataset.name = "tfds"
    config.dataset.tfds_name = "lfw_alinged"
    (found,) = config_check.problems(config)
    assert "did you mean 'lfw_aligned'" in found
    assert "mnist" not in found  # not TFDS's catalogue
    # A data set prepared in data_dir under any name is accepted.
    (tmp_path / "my_faces").mkdir()
    config.dataset.data_dir = str(tmp_path)
    config.dataset.tfds_name = "my_faces"
    assert config_check.problems(config) == []


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--config", "configs/missing.py"], "no such config file"),
    (["--config", "configs/demo.py:smoke", "--config.loss.name=arcfase",
      "--config.queue.chunk_size=-2"], "did you mean 'arcface'"),
    (["--config", "configs/demo.py:smoke", "--config.dataset.name=tfds",
      "--config.dataset.tfds_name=insightface_recc"], "did you mean 'insightface_rec'"),
])
def test_cli_refuses_bad_config_before_the_workdir_exists(tmp_path, args, expected):
    work = tmp_path / "never_created"
    out = subprocess.run([sys.executable, "-m", "broadface_jax.main", *args,
                          f"--workdir={work}"], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert not work.exists()


# ------------------------------------------------------------------ one writer


@pytest.mark.slow
def test_second_run_on_a_workdir_exits_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from broadface_jax import workdir\n"
         "with workdir.exclusive(sys.argv[1]):\n print('held', flush=True); time.sleep(300)",
         str(run)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _spawn(run)
        assert second.wait(timeout=240) == 1
        log = _log(run)
        assert f"pid {holder.pid}" in log and "in use by another run" in log
        assert "Traceback" not in log
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # In-process too: a second train_and_evaluate while the lock is held.
    with workdir.exclusive(str(run)):
        with pytest.raises(workdir.WorkdirBusyError, match=f"pid {os.getpid()}"):
            train.train_and_evaluate(_config(), run)


# ------------------------------------------------------------------ signals


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_a_second_signal_aborts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _spawn(run, {"checkpoint_every_steps": 100, "_block_before_step": 4})
    _wait_for(lambda: (run / "blocked").exists(), proc, "step 4")
    proc.send_signal(signal.SIGTERM)  # the loop waits for its input: the stop is pending
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # a second signal does not wait
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "second signal (SIGTERM): aborting now" in _log(run)
    assert checkpointing.all_steps(run) == []

    # One signal: step 4 runs, is checkpointed (not a scheduled checkpoint), and the
    # run exits with EXIT_PREEMPTED and one line.
    run2 = tmp_path / "run2"
    run2.mkdir()
    proc = _spawn(run2, {"checkpoint_every_steps": 100, "_block_before_step": 4})
    _wait_for(lambda: (run2 / "blocked").exists(), proc, "step 4")
    proc.send_signal(signal.SIGINT)
    (run2 / "go").write_text("")
    assert proc.wait(timeout=120) == preemption.EXIT_PREEMPTED, _log(run2)[-3000:]
    assert checkpointing.all_steps(run2) == [4]
    assert _logged_steps(run2) == [1, 2, 3, 4]
    message = [line for line in _log(run2).splitlines() if line.startswith("broadface_jax: ")]
    assert message[0].startswith("broadface_jax: SIGINT received: stopping after this step")
    assert len(message) == 2 and "stopped by SIGINT after step 4" in message[1]
    assert "Traceback" not in _log(run2) and "KeyboardInterrupt" not in _log(run2)


@pytest.mark.slow
def test_random_kills_and_signals_then_resume_is_bit_identical(tmp_path, straight):
    """SIGTERM / SIGINT / SIGKILL at random moments (mid-step, mid-save, mid-eval)."""
    rng = random.Random(SEED)
    print(f"BROADFACE_TEST_SEED={SEED}")
    run = tmp_path / "run"
    run.mkdir()
    outcomes = []
    for _ in range(4):
        kept = checkpointing.all_steps(run)
        start = kept[-1] if kept else 0
        if start >= TOTAL:
            break
        proc = _spawn(run, EVAL)
        # Once this run has trained past its checkpoint, a random delay, then a signal.
        # Records past the checkpoint left by the previous (killed) run do not count:
        # this run holds the lock (run.lock names its pid) and has rewritten or
        # appended to metrics.jsonl since.
        def trained_past_checkpoint() -> bool:
            lock, metrics = run / workdir.LOCK_FILE, run / workdir.METRICS_FILE
            try:
                mine = f"pid {proc.pid} " in lock.read_text()
                fresh = metrics.stat().st_mtime_ns >= lock.stat().st_mtime_ns
            except OSError:
                return False
            return mine and fresh and any(s > start for s in _logged_steps(run))

        deadline = time.monotonic() + 300
        while proc.poll() is None and not trained_past_checkpoint():
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        sig = rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
        if proc.poll() is None:
            proc.send_signal(sig)
        rc = proc.wait(timeout=300)
        outcomes.append((sig.name, rc, checkpointing.all_steps(run)[-1:]))
        assert rc in (0, preemption.EXIT_PREEMPTED, -signal.SIGKILL), (sig, rc, _log(run)[-3000:])
        if rc == preemption.EXIT_PREEMPTED:  # a clean stop leaves its step checkpointed
            assert checkpointing.all_steps(run)[-1] == _logged_steps(run)[-1]
    final = _spawn(run, EVAL)
    assert final.wait(timeout=300) == 0, _log(run)[-3000:]
    print("outcomes (signal, exit code, newest checkpoint):", outcomes)

    _assert_same_state(_config(EVAL), run, straight, TOTAL)
    assert _logged_steps(run) == list(range(1, TOTAL + 1))  # one record per logged step
    evals = [r["step"] for r in _records(run) if any(k.startswith("eval/") for k in r)]
    assert evals == [4, 8, 12]
    want = {r["step"]: r for r in _records(straight) if "loss_encoder" in r}
    for r in _records(run):
        if "loss_encoder" in r:
            assert r["loss_classifier"] == want[r["step"]]["loss_classifier"]


# Class sampling (issue 19): 128 classes, rate 0.5 samples 64 rows of the replicated W per
# step; the global batch (16) and the queue (32 rows) give at most 48 positives, so every
# step draws >= 16 random negatives.
SAMPLED = {"classifier.sample_rate": 0.5, "num_classes": 128,
           "dataset.synthetic.num_identities": 128, "total_steps": 6}


@pytest.mark.slow
def test_sigkill_then_resume_with_class_sampling_is_bit_identical(tmp_path):
    """A sampled run killed (SIGKILL, before step 4) and resumed equals an uninterrupted one."""
    from tests.test_train import tiny_model

    straight_run = tmp_path / "straight"
    train.train_and_evaluate(_config(SAMPLED), straight_run, model=tiny_model())
    sampled = [r for r in _records(straight_run) if "sample_rows_per_shard" in r]
    assert [r["step"] for r in sampled] == list(range(1, 7))
    negatives = [r["sample_rows_per_shard"] - r["sample_positives_max_shard"] for r in sampled]
    assert min(negatives) >= 16, negatives

    run = tmp_path / "run"
    run.mkdir()
    proc = _spawn(run, {**SAMPLED, "_block_before_step": 4})
    _wait_for(lambda: (run / "blocked").exists(), proc, "step 4")
    proc.send_signal(signal.SIGKILL)  # steps 1-3 done, step 3's save may be in flight
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert _logged_steps(run) == [1, 2, 3]
    resumed = _spawn(run, SAMPLED)
    assert resumed.wait(timeout=300) == 0, _log(run)[-3000:]

    _assert_same_state(_config(SAMPLED), run, straight_run, 6)
    want = {r["step"]: r for r in sampled}
    got = [r for r in _records(run) if "loss_encoder" in r]
    assert [r["step"] for r in got] == list(range(1, 7))
    for r in got:  # the same sample (counts) and the same losses, bit for bit
        for name in ("loss_classifier", "loss_encoder", "sample_positives_queue",
                     "sample_positives_max_shard", "sample_queue_dropped"):
            assert r[name] == want[r["step"]][name], (r["step"], name)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """2 processes x 4 CPU devices (gloo): SIGTERM to process 1 while it waits for input.

    JAX's preemption sync point makes both processes checkpoint the same step
    and exit with EXIT_PREEMPTED; the resumed pair finishes with one record
    per step.
    """
    run = tmp_path / "run"
    run.mkdir()
    overrides = {"checkpoint_every_steps": 100, "_block_before_step": 3, "_block_process": 1}

    def start(extra: dict) -> list[subprocess.Popen]:
        port = _free_port()
        return [_spawn(run, {**overrides, **extra}, dist=f"{port},2,{pid}",
                       log_name=f"run.{pid}.log") for pid in range(2)]

    procs = start({})
    try:
        _wait_for(lambda: (run / "blocked").exists(), procs[1], "process 1 at step 3")
        procs[1].send_signal(signal.SIGTERM)
        time.sleep(1.0)
        (run / "go").write_text("")
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"run.{pid}.log").read_text(errors="replace") for pid in range(2)]
    assert codes == [preemption.EXIT_PREEMPTED] * 2, "\n".join(x[-3000:] for x in logs)
    stopped = checkpointing.all_steps(run)
    assert len(stopped) == 1 and stopped[0] >= 3
    for text in logs:
        assert f"stopped by SIGTERM (preemption notice) after step {stopped[0]}" in text
    procs = start({"_block_before_step": None})
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], (tmp_path / "run.0.log").read_text(errors="replace")[-3000:]
    assert checkpointing.all_steps(run)[-1] == 6
    assert _logged_steps(run) == list(range(1, 7))


# ------------------------------------------------------------------ disk full


def test_enospc_in_a_save_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path,
                                                                           monkeypatch):
    """Portable fault injection: the checkpoint writer's save raises ENOSPC at step 3."""
    from tests.test_train import tiny_model

    real_save = checkpointing.ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save", failing_save)
    run = tmp_path / "run"
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        train.train_and_evaluate(_config(), run, model=tiny_model())
    message = str(info.value)
    assert "\n" not in message
    assert "checkpoint 3" in message and "no space left on device" in message
    assert str(run / "checkpoints") in message
    assert checkpointing.all_steps(run) == [1, 2]
    monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "save", real_save)
    train.train_and_evaluate(_config(), run, model=tiny_model())  # resumes from 2
    assert checkpointing.all_steps(run)[-1] == 6
    assert _logged_steps(run) == list(range(1, 7))


@pytest.mark.slow
def test_full_tmpfs_stops_with_one_readable_line(tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "400k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        run.mkdir()
        LOG_DIR[run] = tmp_path  # not on the full disk
        proc = _spawn(run, {"keep_checkpoints": 0, "total_steps": 40})
        rc = proc.wait(timeout=300)
        log = _log(run)
        assert rc == 1, log[-3000:]
        lines = [line for line in log.splitlines() if line.startswith("broadface_jax: ")]
        assert len(lines) == 1 and "no space left on device" in lines[0], log[-3000:]
        # No traceback through our code or orbax's (orbax's storage tracebacks are cut to
        # their one-line message). tensorstore may still print, directly to stderr from
        # its threads (interleaved, so their text is not checked), a varying number of
        # "RuntimeError: Event loop is closed" reports, one per write that completes after
        # orbax ended the failed save's event loop (0 to ~20 seen).
        frames = [line for line in log.splitlines() if 'File "' in line]
        assert not [f for f in frames if str(REPO / "broadface_jax") in f], frames
        assert not [f for f in frames if f"site-packages{os.sep}orbax{os.sep}" in f], frames
        kept = checkpointing.all_steps(run)
        assert kept, "no checkpoint survived"
        # Free space (move the run to a real disk) and resume exactly.
        moved = tmp_path / "moved"
        shutil.copytree(run, moved, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    proc = _spawn(moved, {"keep_checkpoints": 0, "total_steps": 40})
    assert proc.wait(timeout=300) == 0, _log(moved)[-3000:]
    assert checkpointing.all_steps(moved)[-1] == 40
    assert _logged_steps(moved) == list(range(1, 41))


# ------------------------------------------------------------------ restore & rollback


def test_unreadable_latest_checkpoint_is_set_aside_and_an_older_one_used(tmp_path):
    from tests.test_train import tiny_model

    run = tmp_path / "run"
    train.train_and_evaluate(_config({"total_steps": 4}), run, model=tiny_model())
    assert checkpointing.all_steps(run) == [1, 2, 3, 4]
    # What two writers left behind: a step folder that looks finished but has no arrays.
    for f in (run / "checkpoints" / "4").rglob("*"):
        if f.is_file() and "METADATA" not in f.name and "commit_success" not in f.name:
            f.unlink()
    train.train_and_evaluate(_config({"total_steps": 4}), run, model=tiny_model())
    aside = run / checkpointing.SET_ASIDE_SUBDIR
    assert [p.name for p in aside.iterdir()] == ["4.unreadable"]
    assert checkpointing.all_steps(run) == [1, 2, 3, 4]  # step 4 trained again from 3
    assert _logged_steps(run) == [1, 2, 3, 4]


def test_nan_names_kept_steps_and_restore_step_rolls_back(tmp_path, monkeypatch):
    from tests.test_train import tiny_model

    for name in train.INVOCATION_VARIABLES:  # no scheduler's invocation id: each command asks
        monkeypatch.delenv(name, raising=False)

    run, straight_run = tmp_path / "run", tmp_path / "straight"
    train.train_and_evaluate(_config({"total_steps": 3, "checkpoint_every_steps": 1}), run,
                             model=tiny_model())
    with pytest.raises(train.NonFiniteError) as info:
        train.train_and_evaluate(_config({"lr": 1e30, "total_steps": 6}), run,
                                 model=tiny_model())
    # Step 4's loss was still finite (its update is what diverged): checkpoint 4 is kept
    # though already bad, which is why the message offers an older one.
    assert "Kept checkpoints: [1, 2, 3, 4]" in str(info.value)
    assert "--config.restore_step=3" in str(info.value)

    rollback = _config({"restore_step": 2})
    train.train_and_evaluate(rollback, run, model=tiny_model())
    aside = sorted(p.name for p in (run / checkpointing.SET_ASIDE_SUBDIR).iterdir())
    assert aside == ["3.rolled-back", "4.rolled-back"]
    train.train_and_evaluate(_config(), straight_run, model=tiny_model())
    _assert_same_state(_config(), run, straight_run, 6)
    assert _logged_steps(run) == list(range(1, 7))
    assert (run / workdir.REPLACED_METRICS_FILE).exists()
    # The same command again is a new request (issue 16): it rolls back to 2 again
    # (restored only here; tests/test_resume_changes.py trains it).
    from broadface_jax import sharding

    state, _, _ = train.initial_state(rollback, sharding.make_mesh(rollback.mesh), str(run),
                                      tiny_model())
    assert int(state.step) == 2 and checkpointing.all_steps(run) == [1, 2]
    requests = json.loads((run / train.ROLLBACK_FILE).read_text())["requests"]
    assert [r["restore_step"] for r in requests] == [2, 2]
    assert len(list((run / checkpointing.SET_ASIDE_SUBDIR).iterdir())) == 6


def test_resume_refuses_state_changing_config_and_logs_harmless_changes(tmp_path):
    from tests.test_train import tiny_model

    run = tmp_path / "run"
    train.train_and_evaluate(_config({"total_steps": 2}), run, model=tiny_model())
    saved = json.loads((run / workdir.CONFIG_FILE).read_text())
    assert saved["per_device_batch_size"] == 2 and saved["seed"] == 0
    changed = _config({"total_steps": 4, "per_device_batch_size": 4, "seed": 1,
                       "queue.size_per_device": 8})
    with pytest.raises(workdir.ResumeConfigError) as info:
        train.train_and_evaluate(changed, run, model=tiny_model())
    text = str(info.value)
    assert "per_device_batch_size: 2 -> 4" in text and "seed: 0 -> 1" in text
    assert "allow_resume_changes=per_device_batch_size,queue.size_per_device,seed" in text
    assert "total_steps" not in text  # harmless: logged, not refused
    assert checkpointing.all_steps(run) == [1, 2]  # nothing written
    train.train_and_evaluate(_config({"total_steps": 3, "log_every_steps": 2}), run,
                             model=tiny_model())
    assert checkpointing.all_steps(run)[-1] == 3


def test_resume_refuses_a_workdir_of_another_state_format(tmp_path):
    """A workdir written before the state layout changed gets one message, and is left as is."""
    from tests.test_train import tiny_model

    run = tmp_path / "run"
    train.train_and_evaluate(_config({"total_steps": 2}), run, model=tiny_model())
    path = run / workdir.CONFIG_FILE
    saved = json.loads(path.read_text())
    assert saved[workdir.FORMAT_KEY] == workdir.STATE_FORMAT
    del saved[workdir.FORMAT_KEY]  # as written by a version before the format was recorded
    path.write_text(json.dumps(saved))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(workdir.ResumeConfigError) as info:
        train.train_and_evaluate(_config({"total_steps": 3}), run, model=tiny_model())
    text = str(info.value)
    assert f"state format 1 ({path})" in text and f"writes format {workdir.STATE_FORMAT}" in text
    assert f"--config.init_from={run}" in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert not (run / checkpointing.SET_ASIDE_SUBDIR).exists()


def test_compare_configs_rules():
    saved = {"seed": 0, "model.name": "iresnet50", "lr": 0.1, "eval.targets": ["lfw_dev"],
             "dataset.data_dir": "/a"}
    current = {"seed": 0, "model.name": "iresnet100", "lr": 0.01, "eval.targets": [],
               "dataset.data_dir": "/b"}
    refused, accepted = workdir.compare_configs(saved, current)
    assert refused == ["model.name: 'iresnet50' -> 'iresnet100'"]
    assert sorted(a.split(":")[0] for a in accepted) == ["dataset.data_dir", "eval.targets",
                                                         "lr"]
    assert workdir.compare_configs(saved, current, "model")[0] == []
    assert workdir.compare_configs(saved, current, "*")[0] == []
    assert workdir.compare_configs(saved, current, "model.width")[0] != []


def test_truncate_metrics_moves_later_and_torn_records(tmp_path):
    path = tmp_path / workdir.METRICS_FILE
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 2, 3)]
    path.write_text("".join(lines) + '{"step": 4, "lo')  # a kill mid-write
    assert workdir.truncate_metrics(str(tmp_path), 2) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2]
    moved = (tmp_path / workdir.REPLACED_METRICS_FILE).read_text().splitlines()
    assert len(moved) == 3 and moved[-1] == '{"step": 4, "lo'


def test_no_checkpoint_hint_names_the_checkpoints_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"e\.g\. .*/checkpoints/1000"):
        checkpointing.resolve(tmp_path)


def test_image_folder_says_what_it_skipped(tmp_path):
    import types

    from broadface_jax import prepare
    from broadface_jax.datasets import image_folder

    for rel in ("alice/1.jpg", "alice/notes.txt", "bob/2.PNG", "carol/readme.md",
                "stray.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "dave").mkdir()
    skipped = {}
    found = image_folder.list_identities(tmp_path, skipped)
    assert [name for name, _ in found] == ["alice", "bob"]
    assert skipped == {"not_images": ["alice/notes.txt", "carol/readme.md"],
                       "outside_identity_folders": ["stray.jpg"],
                       "empty_identities": ["carol", "dave"]}
    builder = types.SimpleNamespace(
        name="face_image_folder", version="1.0.0", data_dir=str(tmp_path),
        info=types.SimpleNamespace(splits={}, metadata={"num_classes": 2, "skipped": skipped}))
    text = prepare.summary(builder)
    assert "skipped (not images): 2: alice/notes.txt, carol/readme.md" in text
    assert "skipped (empty identities): 2: carol, dave" in text


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
