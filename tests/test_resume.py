"""Resume after a real kill: N steps straight == N/2 steps, SIGKILL, restart, N/2 more.

The first half runs in a subprocess (this file run as a script) whose input
iterator blocks before step N/2 + 2, i.e. after the checkpoint of step N/2 was
written and one more step ran (so the process dies with work past its last
checkpoint, and with orbax's background threads alive). The test kills it
with SIGKILL, restarts the run in-process from the workdir, and compares the
final state (parameters, batch statistics, optimizer states, queue, step,
RNG) with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 4
HALF = TOTAL_STEPS // 2
BLOCKED_MARKER = "blocked_before_step"


def _worker(workdir: str) -> None:
    """The first half: train with checkpoints every HALF steps, block, wait to be killed."""
    sys.path.insert(0, str(REPO))
    from broadface_jax import input_pipeline, train
    from tests.tiny_config import tiny_config
    from tests.test_train import tiny_model

    real_iterator = input_pipeline.create_train_iterator

    def blocking_iterator(config, start_step=0):
        for step, batch in enumerate(real_iterator(config, start_step), start=start_step + 1):
            if step == HALF + 2:
                pathlib.Path(workdir, BLOCKED_MARKER).write_text(str(step))
                while True:  # the test kills us here
                    time.sleep(1)
            yield batch

    input_pipeline.create_train_iterator = blocking_iterator
    config = tiny_config(total_steps=TOTAL_STEPS)
    config.checkpoint_every_steps = HALF
    train.train_and_evaluate(config, workdir, model=tiny_model())
    raise SystemExit("worker was not blocked")


def _run_killed_first_half(workdir: pathlib.Path, timeout: float = 240.0) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(workdir.parent / "worker.log", "wb")
    proc = subprocess.Popen([sys.executable, __file__, str(workdir)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    checkpoint = workdir / "checkpoints" / str(HALF)
    deadline = time.monotonic() + timeout
    try:
        while not ((workdir / BLOCKED_MARKER).exists() and checkpoint.is_dir()):
            if proc.poll() is not None:
                raise AssertionError(
                    f"worker exited early ({proc.returncode}):\n"
                    + (workdir.parent / "worker.log").read_text(errors="replace")[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError("worker did not reach the blocking step in time")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_resume_after_kill_is_identical(tmp_path):
    from broadface_jax import checkpointing, train
    from tests.tiny_config import tiny_config
    from tests.test_train import read_metrics, restore_state, tiny_model

    config = tiny_config(total_steps=TOTAL_STEPS)
    config.checkpoint_every_steps = HALF

    killed = tmp_path / "killed"
    killed.mkdir()
    _run_killed_first_half(killed)
    assert checkpointing.latest_step(killed) == HALF
    logged_before = read_metrics(killed)
    assert [r["step"] for r in logged_before] == list(range(1, HALF + 2))

    final_resumed = train.train_and_evaluate(config, killed, model=tiny_model())
    straight = tmp_path / "straight"
    final_straight = train.train_and_evaluate(config, straight, model=tiny_model())

    resumed_state = restore_state(config, killed, TOTAL_STEPS)
    straight_state = restore_state(config, straight, TOTAL_STEPS)
    assert int(resumed_state.step) == int(straight_state.step) == TOTAL_STEPS
    assert float(np.asarray(straight_state.queue.valid).sum()) > 0  # the queue is in use
    names = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(straight_state)[0]]
    for name, got, want in zip(names, jax.tree.leaves(resumed_state),
                               jax.tree.leaves(straight_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    for key in ("loss_encoder", "loss_classifier", "queue_fill"):
        np.testing.assert_allclose(final_resumed[key], final_straight[key], rtol=1e-6)

    # metrics.jsonl has one record per step: the step that ran twice (HALF + 1, after
    # the last checkpoint) was moved to metrics.replaced.jsonl on resume, with the
    # same values as its second run.
    records = read_metrics(killed)
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    replaced = [json.loads(line) for line in
                (killed / "metrics.replaced.jsonl").read_text().splitlines()]
    assert [r["step"] for r in replaced] == [HALF + 1]
    for key in ("loss_encoder", "loss_classifier", "grad_norm_encoder"):
        np.testing.assert_allclose(replaced[0][key], records[HALF][key], rtol=1e-6)
    straight_records = {r["step"]: r for r in read_metrics(straight)}
    for r in records:
        np.testing.assert_allclose(r["loss_classifier"],
                                   straight_records[r["step"]]["loss_classifier"], rtol=1e-6)


if __name__ == "__main__":
    _worker(sys.argv[1])
