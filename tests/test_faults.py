"""Faults an operator meets, each ending in one line and the right exit status.

Issue 16 items 8-12: flag errors (a misspelt or mistyped ``--config.FIELD``),
signals during start-up, ``JAX_ENABLE_X64=1``, a full disk at three moments,
damaged data files, a workdir that is a file, missing paths. Tests that need a
real process run this file as a script (``python tests/test_faults.py MODE ...``,
see :func:`_worker`).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.tmpfs import mount_tmpfs

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ["--config", "configs/demo.py:smoke"]


def _env(devices: int = 1, **extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _main(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """``python -m broadface_jax.main ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "broadface_jax.main", *args], cwd=REPO,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _one_line(out: subprocess.CompletedProcess) -> str:
    """The single ``broadface_jax:`` line of a failed command; no traceback anywhere."""
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "Fatal Python error" not in text, text[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("broadface_jax: ")
             and " received" not in line]  # the signal handler's acknowledgement
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ item 8: flag errors


@pytest.mark.parametrize("arg, expected", [
    ("--config.per_device_batchsize=4",
     "--config.per_device_batchsize=4: no such config field 'per_device_batchsize' "
     "(did you mean 'per_device_batch_size'"),
    ("--config.model.widht=2", "no such config field 'model.widht' (did you mean 'model.width'"),
    ("--config.per_device_batch_size=four",
     "--config.per_device_batch_size=four: 'four' is not a valid int for "
     "config.per_device_batch_size (now 4)"),
    ("--config.model=3", "config.model is a group of fields"),
])
def test_cli_flag_errors_are_one_line_and_exit_2(tmp_path, arg, expected):
    work = tmp_path / "never_created"
    out = _main([*SMOKE, f"--workdir={work}", arg], timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert expected in _one_line(out)
    assert not work.exists()


def test_flag_error_message_names_the_field_and_suggests(monkeypatch):
    """In-process: the parser's own exceptions, turned into our one line."""
    from absl import flags

    from broadface_jax import cli

    argv = ["prog", *SMOKE, "--config.optimizer.encoder.momentun=0", "--workdir=w"]
    error = AttributeError("'momentun'\nDid you mean \"momentum\"?")
    text = cli.flag_error_message(error, argv)
    assert text == ("--config.optimizer.encoder.momentun=0: no such config field "
                    "'optimizer.encoder.momentun' (did you mean 'optimizer.encoder.momentum'?)")
    argv = ["prog", *SMOKE, "--config.lr", "fast"]  # value as the next argument
    error = flags.IllegalFlagValueError("flag --config.lr=fast: could not convert string to "
                                        "float: 'fast'")
    assert cli.flag_error_message(error, argv) == (
        "--config.lr fast: 'fast' is not a valid float for config.lr (now 0.1): "
        "could not convert string to float: 'fast'")
    assert cli.flag_error_message(flags.UnrecognizedFlagError("nosuch"), ["prog", "--nosuch"]) \
        == "Unknown command line flag 'nosuch'"


# ------------------------------------------------------------------ item 9: signals at start-up

#: Where the start-up worker waits for the test's signal: after the flags and the
#: config (before TensorFlow is imported), after TensorFlow's import, inside the
#: distributed set-up, after the state is restored / initialised (before the loop's
#: handlers), and while the input pipeline starts (the loop's handlers installed, no
#: step run yet).
MOMENTS = {
    "flags": ("broadface_jax.cli", "load_config"),
    "tensorflow": ("broadface_jax.input_pipeline", "hide_gpus_from_tensorflow"),
    "distributed": ("broadface_jax.distributed", "maybe_initialize"),
    "restore": ("broadface_jax.train", "initial_state"),
    "input": ("broadface_jax.input_pipeline", "create_train_iterator"),
}


def _startup_worker(marker: str, moment: str, argv: list[str]) -> None:
    """``python -m broadface_jax.main ARGV`` that waits at ``moment`` for ``<marker>.go``.

    Runs main.py's ``__main__`` block itself (runpy), so the handlers are
    installed exactly as for a user; the wait is after ``moment``'s function
    returns, and the file ``<marker>.at`` says the worker got there.
    """
    import importlib

    module_name, name = MOMENTS[moment]
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def waiting(*args, **kwargs):
        out = real(*args, **kwargs)
        pathlib.Path(marker + ".at").write_text(moment)
        while not os.path.exists(marker + ".go"):
            time.sleep(0.02)
        return out

    setattr(module, name, waiting)
    sys.argv = ["broadface_jax.main", *argv]
    runpy.run_module("broadface_jax.main", run_name="__main__", alter_sys=True)


def _spawn_startup(tmp_path: pathlib.Path, moment: str, args: list[str]) -> tuple:
    marker = str(tmp_path / f"marker-{moment}")
    log = open(tmp_path / f"{moment}.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, "startup", marker, moment, *args],
                            cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    return proc, marker, tmp_path / f"{moment}.log"


def _wait_file(path: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"worker exited ({proc.returncode}) before {path}"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def _tree(path: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``path`` (but the lock) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "run.lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    """A finished 2-step smoke run (checkpoints 1 and 2) and the arguments that made it."""
    work = tmp_path_factory.mktemp("finished") / "run"
    args = [*SMOKE, f"--workdir={work}", "--config.checkpoint_every_steps=1"]
    first = _main([*args, "--config.total_steps=2"], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    return work, args


@pytest.mark.slow
@pytest.mark.parametrize("moment, signum", [
    ("flags", signal.SIGINT), ("tensorflow", signal.SIGTERM), ("distributed", signal.SIGINT),
    ("restore", signal.SIGTERM), ("input", signal.SIGINT)])
def test_signal_during_start_up_stops_cleanly_before_the_first_step(tmp_path, finished_run,
                                                                    moment, signum):
    """A resume of a finished 2-step run to 3 steps, signalled at one moment of its start-up.

    Exit 75 for SIGTERM, 130 for SIGINT, one line and no traceback or fault, the
    workdir as it was (no new checkpoint, nothing set aside, no metrics; only the
    TensorBoard writer's new empty event file once the loop's writer exists), and
    (the latest moment) the same command then runs to the end.
    """
    import shutil

    work = tmp_path / "run"
    shutil.copytree(finished_run[0], work)
    args = [a.replace(str(finished_run[0]), str(work)) for a in finished_run[1]]
    args.append("--config.total_steps=3")
    before = _tree(work)
    proc, marker, log = _spawn_startup(tmp_path, moment, args)
    try:
        _wait_file(marker + ".at", proc)
        os.kill(proc.pid, signum)
        pathlib.Path(marker + ".go").write_text("")
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    want = 130 if signum == signal.SIGINT else 75
    assert code == want, text[-3000:]
    line = _one_line(subprocess.CompletedProcess([], code, "", text))
    assert f"stopped by {signal.Signals(signum).name} during start-up, before the first step" \
        in line, line
    after = {k: v for k, v in _tree(work).items()
             if not (k.startswith("tensorboard/") and k not in before)}
    if moment in ("restore", "input"):
        # Once the state is restored the run records its config (total_steps 2 -> 3):
        # config.json is replaced and its previous record kept in config.replaced.jsonl.
        import json

        replaced = after.pop("config.replaced.jsonl")
        assert [json.loads(x)["config"] for x in replaced.decode().splitlines()] == \
            [json.loads(before["config.json"])]
    assert sorted(after) == sorted(before)
    for name in before:
        if name != "config.json":  # rewritten (same content, or the new total_steps)
            assert after[name] == before[name], name
    if moment == "input":
        again = _main(args, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        from broadface_jax import checkpointing

        assert checkpointing.all_steps(work)[-1] == 3


# ------------------------------------------------------------------ item 8: paths, disk, data


@pytest.mark.slow
@pytest.mark.parametrize("case", ["workdir_file", "workdir_below_file", "init_from", "data_dir"])
def test_wrong_paths_are_one_line_exit_2_before_anything_is_written(tmp_path, case):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("a user's file")
    work = tmp_path / "run"
    args = {"workdir_file": [f"--workdir={a_file}"],
            "workdir_below_file": [f"--workdir={a_file}/run"],
            "init_from": [f"--workdir={work}", f"--config.init_from={tmp_path / 'nowhere'}"],
            "data_dir": [f"--workdir={work}", "--config.dataset.name=tfds",
                         "--config.dataset.tfds_name=face_image_folder",
                         f"--config.dataset.data_dir={tmp_path / 'no_data'}"]}[case]
    out = _main([*SMOKE, *args], timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    line = _one_line(out)
    expected = {"workdir_file": f"--workdir={a_file} is a file, not a folder",
                "workdir_below_file": f"is inside {a_file}, a file, not a folder",
                "init_from": f"config.init_from='{tmp_path / 'nowhere'}' does not exist",
                "data_dir": f"config.dataset.data_dir='{tmp_path / 'no_data'}' does not exist"}
    assert expected[case] in line, line
    assert a_file.read_text() == "a user's file"
    assert not work.exists()


@pytest.mark.slow
def test_disk_full_at_the_first_checkpoint_is_one_last_line(tmp_path):
    """A disk with room for config.json and the metrics but not for checkpoint 1."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "120k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        work = disk / "run"
        out = _main([*SMOKE, f"--workdir={work}", "--config.checkpoint_every_steps=1"],
                    timeout=300)
        assert out.returncode == 1, out.stderr[-3000:]
        # tensorstore prints a timing-dependent number (0 to a few hundred under load) of
        # "RuntimeError: Event loop is closed" tracebacks straight to stderr from its threads
        # as the failed writes complete; nothing else may be a traceback.
        frames = [x for x in out.stderr.splitlines() if x.lstrip().startswith('File "')]
        assert not [f for f in frames if f"{os.sep}asyncio{os.sep}" not in f], frames[:20]
        errors = {x for x in out.stderr.splitlines() if x and x[0].isalpha() and
                  x.split(":")[0].endswith("Error") and not x.startswith("broadface_jax")}
        assert errors <= {"RuntimeError: Event loop is closed"}, errors
        assert "Fatal Python error" not in out.stderr
        lines = [x for x in out.stderr.splitlines() if x.startswith("broadface_jax: ")]
        assert len(lines) == 1, out.stderr[-3000:]
        line = lines[0]
        assert "checkpoint 1 could not be written" in line and "no space left on device" in line
        # The one line is the last one: no asyncio / orbax report of the same failure after it.
        assert out.stderr.strip().splitlines()[-1] == line, out.stderr[-3000:]
        assert (work / "config.json").exists()
        from broadface_jax import checkpointing

        assert checkpointing.all_steps(work) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_tensorboard_writer_disk_full_between_checkpoints(tmp_path, monkeypatch, capsys):
    """clu's asynchronous TensorBoard writer fails (disk full) at step 3: one line, exit 1."""
    from clu import asynclib

    from broadface_jax import checkpointing, main, train
    from tests.tiny_config import tiny_config
    from tests.test_train import tiny_model

    real = train.create_writer

    class FailingWriter:
        def __init__(self, writer):
            self.writer, self.failed = writer, None

        def write_scalars(self, step, scalars):
            if step >= 3:  # what clu raises for an error of its background thread
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError as e:
                    self.failed = asynclib.AsyncError(f"Error '{e}' occurred ASYNCHRONOUSLY.")
                    self.failed.__cause__ = e
                raise self.failed
            self.writer.write_scalars(step, scalars)

        def close(self):  # clu raises the pending error again on close
            self.writer.close()
            if self.failed is not None:
                raise self.failed

        def __getattr__(self, name):
            return getattr(self.writer, name)

    monkeypatch.setattr(train, "create_writer", lambda workdir: FailingWriter(real(workdir)))
    config = tiny_config(total_steps=6)
    config.checkpoint_every_steps = 1
    work = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main.run(config, str(work), model=tiny_model())
    assert info.value.code == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("broadface_jax: ")]
    assert lines == [f"broadface_jax: {work / 'tensorboard'} (TensorBoard events): no space "
                     "left on device: stopped (the last finished checkpoint is kept; free "
                     "space and run the same command again to resume)"]
    assert checkpointing.all_steps(work) == [1, 2]


def test_failed_save_is_reported_once_not_raised_again_on_close(tmp_path, monkeypatch, capsys):
    """Disk full at a save, and orbax's close() raising its raw error again (as it does)."""
    from broadface_jax import checkpointing, main
    from tests.tiny_config import tiny_config
    from tests.test_train import tiny_model

    manager = checkpointing.ocp.CheckpointManager
    real_save, real_close = manager.save, manager.close

    def failing_save(self, step, *args, **kwargs):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return real_save(self, step, *args, **kwargs)

    def close_again(self):
        real_close(self)
        if checkpointing.all_steps(str(tmp_path / "run")) == [1, 2]:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing \"params.encoder\" in OCDBT "
                             "database")

    monkeypatch.setattr(manager, "save", failing_save)
    monkeypatch.setattr(manager, "close", close_again)
    config = tiny_config(total_steps=4)
    config.checkpoint_every_steps = 1
    with pytest.raises(SystemExit) as info:
        main.run(config, str(tmp_path / "run"), model=tiny_model())
    assert info.value.code == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("broadface_jax: ")]
    assert lines == [f"broadface_jax: checkpoint 3 could not be written to "
                     f"{tmp_path / 'run' / 'checkpoints'}: no space left on device"]


@pytest.fixture(scope="module")
def prepared_faces(tmp_path_factory) -> pathlib.Path:
    """A tiny face_image_folder data set (3 identities x 6 images), prepared as ArrayRecord."""
    from PIL import Image

    from broadface_jax import prepare

    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(11)
    for k in range(3):
        (root / "raw" / f"id{k}").mkdir(parents=True)
        for i in range(6):
            image = np.clip(np.cumsum(rng.normal(0, 9, (112, 112, 3)), axis=1) + 128, 0, 255)
            Image.fromarray(image.astype(np.uint8)).save(root / "raw" / f"id{k}" / f"{i}.jpg")
    prepare.prepare("image_folder", str(root / "raw"), str(root / "data"))
    return root / "data"


def _faces_config(data_dir: pathlib.Path):
    from tests.tiny_config import tiny_config

    config = tiny_config(total_steps=3)
    config.dataset.name = "tfds"
    config.dataset.tfds_name = "face_image_folder"
    config.dataset.data_dir = str(data_dir)
    config.num_classes = 3
    config.per_device_batch_size = 1
    return config


def _damaged_copy(prepared: pathlib.Path, tmp_path: pathlib.Path, how: str) -> pathlib.Path:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (path,) = sorted(data.rglob("*.array_record-*"))
    raw = path.read_bytes()
    if how == "truncated":  # an interrupted copy
        path.write_bytes(raw[: len(raw) // 2])
    else:  # 1 KiB of garbage in the middle: a damaged chunk
        rng = np.random.default_rng(5)
        middle = len(raw) // 3
        path.write_bytes(raw[:middle] + rng.integers(0, 256, 1024, np.uint8).tobytes()
                         + raw[middle + 1024:])
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_array_record_file_is_named(prepared_faces, tmp_path, how):
    from broadface_jax import input_pipeline

    path = _damaged_copy(prepared_faces, tmp_path, how)
    with pytest.raises(input_pipeline.DataFileError) as info:
        iterator = input_pipeline.create_train_iterator(_faces_config(path.parents[2]))
        for _ in range(20):  # 18 records, 8 per batch: every record is read
            next(iterator)
    text = str(info.value)
    assert f"data file {path} of face_image_folder" in text, text
    assert ("is truncated or damaged" if how == "truncated" else "damaged") in text, text
    assert "\n" not in text


@pytest.mark.slow
def test_truncated_data_file_stops_the_run_with_one_line(prepared_faces, tmp_path):
    path = _damaged_copy(prepared_faces, tmp_path, "truncated")
    config = tmp_path / "faces_config.py"
    config.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.test_faults import _faces_config\n"
        "def get_config(arg=None):\n"
        f"    c = _faces_config({str(path.parents[2])!r})\n"
        "    c.model.name = 'iresnet18'\n"
        "    c.model.width = 0.125\n"
        "    return c\n")
    work = tmp_path / "run"
    out = _main(["--config", str(config), f"--workdir={work}"], timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    line = _one_line(out)
    assert f"data file {path} of face_image_folder is truncated or damaged" in line, line


# ------------------------------------------------------------------ item 10: JAX_ENABLE_X64=1

_X64_QUEUE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from broadface_jax import queue
assert jax.config.jax_enable_x64
rng = np.random.default_rng(int(sys.argv[1]))
q = queue.init_queue(capacity=12, dim=3, num_shards=2)
batches = []
for _ in range(4):  # 4 batches of 4 rows: 2 per shard, each shard holds 6 rows
    e = rng.normal(size=(4, 3)); w = rng.normal(size=(4, 3)); lab = rng.integers(0, 9, 4)
    batches.append((e.tolist(), w.tolist(), lab.tolist()))
    q = jax.jit(queue.enqueue)(q, jnp.asarray(e), jnp.asarray(w), jnp.asarray(lab))
print(json.dumps({"batches": batches, "embeddings": np.asarray(q.embeddings).tolist(),
                  "labels": np.asarray(q.labels).tolist(), "valid": np.asarray(q.valid).tolist(),
                  "position": int(q.position), "position_dtype": str(q.position.dtype)}))
"""


def test_queue_enqueue_under_x64_matches_a_numpy_ring_buffer():
    """JAX_ENABLE_X64=1 crashed in enqueue (dynamic_update_slice index types int64/int32)."""
    seed = int(np.random.default_rng().integers(1, 10**6))
    out = subprocess.run([sys.executable, "-c", _X64_QUEUE, str(seed)], cwd=REPO,
                         env=_env(JAX_ENABLE_X64="1"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # float64 reference: shard s of every batch (rows 2s, 2s+1) goes to ring buffer s,
    # at the shard's write position, which advances by 2 and wraps at 6.
    emb = np.zeros((2, 6, 3))
    labels = np.zeros((2, 6), np.int64)
    valid = np.zeros((2, 6), bool)
    pos = 0
    for e, _, lab in got["batches"]:
        e, lab = np.asarray(e, np.float64), np.asarray(lab)
        for shard in range(2):
            emb[shard, pos:pos + 2] = e[2 * shard:2 * shard + 2]
            labels[shard, pos:pos + 2] = lab[2 * shard:2 * shard + 2]
            valid[shard, pos:pos + 2] = True
        pos = (pos + 2) % 6
    np.testing.assert_allclose(np.asarray(got["embeddings"]), emb.reshape(12, 3), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["labels"]), labels.reshape(12))
    np.testing.assert_array_equal(np.asarray(got["valid"]), valid.reshape(12))
    assert got["position"] == pos and got["position_dtype"] == "int32"


@pytest.mark.slow
def test_core_tests_pass_under_x64():
    """The queue, train-step and loss tests once more in a child with JAX_ENABLE_X64=1."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-m",
                          "not slow", "tests/test_queue.py", "tests/test_train_step.py",
                          "tests/test_losses.py"], cwd=REPO, env=_env(JAX_ENABLE_X64="1"),
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def _worker(argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    if argv[0] == "startup":
        _startup_worker(argv[1], argv[2], argv[3:])
    else:
        raise SystemExit(f"unknown worker mode {argv[0]!r}")


if __name__ == "__main__":
    _worker(sys.argv[1:])
