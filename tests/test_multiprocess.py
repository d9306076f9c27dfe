"""A real multi-process run: 2 processes x 4 CPU devices on localhost (gloo).

Both processes run the command-line entry point as a user would
(``python -m broadface_jax.main --config configs/demo.py:smoke ...
--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i
--cpu_collectives=gloo``) for 3 steps with the real tf.data pipeline on
synthetic identities. Each process reads its own shard of the data
(``per_device_batch_size * 4`` images of its half of the examples per step).

The reference is a single-process run on this process's 8 devices with the
same config, fed the global batches the two processes form together: for
each step, process 0's batch followed by process 1's, each produced by the
real input pipeline as it runs in that process (``jax.process_index`` /
``process_count`` / ``local_device_count`` set to what the children see).
The two runs must log the same losses and queue statistics (metrics.jsonl,
1e-5 relative; observed <= 1e-6), the same gradient norms (1e-4; observed
<= 1e-5 at lr 0.01) and write the same final checkpoint: integer leaves
(queue labels, valid flags, positions, step, RNG) exactly, parameters within
1e-3 of each leaf's largest magnitude (observed <= 2e-4), the other float
leaves (momentum, batch statistics, queue rows) within 1e-2 (observed
<= 1.2e-3, in the momentum of the first blocks' BatchNorm biases), both plus
1e-5 absolute for leaves that are zero up to round-off (biases of a
BatchNorm followed by BatchNorm). These are looser than round-off because the
runs sum over devices in different orders (gloo across processes, in-process
here) and the loss has kinks (ArcFace's
fallback branch at theta + m > pi, PReLU at 0) where a last-bit change flips a
row's gradient; the losses, which are continuous, agree to 1e-6.

Measured (2026-12-01, this 2-core machine at load average 11-14, script
/tmp/issue10_tests/mp_experiment.py: this test's comparison, run outside
pytest): in float32 the largest differences were 9.7e-6 relative
(grad_norm_encoder, step 3), 2.5e-6 (grad_norm_classifier), 1.1e-6 (losses),
parameters 0.37 of their tolerance; two runs gave bit-identical numbers on
both sides, so the comparison is deterministic and machine load does not
change it. Re-run in float64 (jax_enable_x64, with the model and train step
in float64 in parent and children) every metric agreed to <= 1.8e-15 and every
leaf to <= 2e-14 of its scale: the two set-ups compute the same function and
the float32 differences are reduction-order round-off. One reported failure
(grad_norm_encoder 4.6e-4 at step 2, in a full `make test` while other agents
edited this shared checkout) was not reproduced; a likely cause is the
children importing the package minutes after this process did, from files
changed in between.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from broadface_jax import checkpointing, input_pipeline, sharding, train, train_step
from tests import local_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
CONFIG = "configs/demo.py:smoke"
# No evaluation (this test is about training); a smaller rate than the smoke
# run's 0.1, whose large steps amplify the all-reduce's round-off order past 1e-5.
OVERRIDES = {"eval.targets": "()", "lr": "0.01"}
LOSSES = ("loss_encoder", "loss_classifier", "queue_fill", "queue_drift")
GRAD_NORMS = ("grad_norm_encoder", "grad_norm_classifier")


def _config():
    """The children's config: configs/demo.py:smoke with OVERRIDES applied."""
    from broadface_jax import cli

    config = cli.config_from_file(REPO / "configs" / "demo.py", "smoke")
    config.eval.targets = ()
    config.lr = 0.01
    return config


def _start_children(workdir: pathlib.Path) -> list[subprocess.Popen]:
    """Starts both processes (the caller waits for them and kills what is left)."""
    command = [sys.executable, "-m", "broadface_jax.main", "--config", CONFIG,
               "--workdir", str(workdir), *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    return local_cluster.start([command] * NUM_PROCESSES, local_cluster.child_env(LOCAL_DEVICES),
                               init_timeout=60)


def _wait_children(procs: list[subprocess.Popen]) -> None:
    outputs = local_cluster.wait_ok(procs, timeout=240, tail=4000)
    assert "JAX process 1 / 2, 4 local / 8 global devices" in outputs[1], outputs[1][-2000:]


def _process_batches(config, pid: int, steps: int, monkeypatch) -> list[dict]:
    """What the real input pipeline yields in process `pid` of 2 (4 local devices)."""
    with monkeypatch.context() as m:
        m.setattr(jax, "process_index", lambda *a, **k: pid)
        m.setattr(jax, "process_count", lambda *a, **k: NUM_PROCESSES)
        m.setattr(jax, "local_device_count", lambda *a, **k: LOCAL_DEVICES)
        it = input_pipeline.create_train_iterator(config, start_step=0)
        try:
            return [next(it) for _ in range(steps)]
        finally:
            it.close()


def _records(workdir: pathlib.Path) -> dict[int, dict]:
    lines = (workdir / train.METRICS_FILE).read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss_encoder" in r}


def _restore(workdir: pathlib.Path, config):
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train_step.abstract_train_state(config, mesh)
    return jax.device_get(checkpointing.restore(
        workdir, checkpointing.abstract_like(abstract, shardings)))


def _reference_run(config, ref_dir: pathlib.Path, steps: int, monkeypatch) -> None:
    """Single process, 8 devices, fed what the two processes read together."""
    # Each process reads its own half of the examples, B_local = 4 x per-device batch.
    per_process = [_process_batches(config, pid, steps, monkeypatch) for pid in range(2)]
    n_ids = int(config.dataset.synthetic.num_identities)
    for pid, batches in enumerate(per_process):
        for b in batches:
            assert b["image"].shape[0] == config.per_device_batch_size * LOCAL_DEVICES
            lo, hi = pid * n_ids // 2, (pid + 1) * n_ids // 2
            assert np.all((b["label"] >= lo) & (b["label"] < hi)), (pid, b["label"])
    global_batches = [{k: np.concatenate([per_process[0][s][k], per_process[1][s][k]])
                       for k in ("image", "label")} for s in range(steps)]

    def fake_iterator(cfg, start_step=0):
        assert start_step == 0
        return iter(global_batches)

    with monkeypatch.context() as m:
        m.setattr(input_pipeline, "create_train_iterator", fake_iterator)
        train.train_and_evaluate(config, ref_dir)


@pytest.mark.slow  # two child JAX processes train with gloo, then a reference run
@pytest.mark.skipif(jax.device_count() != NUM_PROCESSES * LOCAL_DEVICES,
                    reason="the reference run needs 8 devices (tests/conftest.py)")
def test_two_processes_match_single_process(tmp_path, monkeypatch):
    config = _config()
    steps = int(config.total_steps)
    multi_dir, ref_dir = tmp_path / "multi", tmp_path / "single"
    procs = _start_children(multi_dir)  # the reference below runs meanwhile
    try:
        _reference_run(config, ref_dir, steps, monkeypatch)
        _wait_children(procs)
    finally:
        local_cluster.kill(procs)

    multi, ref = _records(multi_dir), _records(ref_dir)
    assert sorted(multi) == sorted(ref) == list(range(1, steps + 1))
    for step in ref:
        for name in LOSSES + GRAD_NORMS:
            np.testing.assert_allclose(multi[step][name], ref[step][name], atol=1e-7,
                                       rtol=1e-5 if name in LOSSES else 1e-4,
                                       err_msg=f"step {step} {name}")
    assert multi[steps]["queue_fill"] > 0  # the queue was on and used
    assert ref[1]["loss_encoder"] != ref[steps]["loss_encoder"]  # training moved

    got, want = _restore(multi_dir, config), _restore(ref_dir, config)
    assert int(got.step) == int(want.step) == steps
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        name, g, w = jax.tree_util.keystr(path), np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if not np.issubdtype(w.dtype, np.floating):
            assert np.array_equal(g, w), name  # labels, valid flags, positions, RNG
            continue
        scale = float(np.max(np.abs(w), initial=0.0))
        err = float(np.max(np.abs(g.astype(np.float64) - w), initial=0.0))
        rel = 1e-3 if name.startswith(".params") else 1e-2
        assert err <= rel * scale + 1e-5, f"{name}: |diff| {err:.2e}, leaf scale {scale:.2e}"
