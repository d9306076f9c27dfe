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

The sampled variant (issue 19: ``classifier.sample_rate`` 0.25 of 320 classes,
80 rows: the batch's classes, the queue's, then random negatives) must log the
same sample counts in both layouts. At lr 0.01 it did not meet the tolerances
above for 2 of 3 seeds (2026-12-07, config.seed 0 / 1 / 2: step 3
grad_norm_encoder 1.9e-3 / 1.5e-3 / 2.0e-6 relative; seed 1 also step 3 losses
7.4e-5 and parameters 11x their tolerance, in BatchNorm biases that are zero up
to round-off). Not a sampling difference: every sample count, the queue's labels
and valid flags and the RNG were equal at each step; step 3 re-run in one
process from the 2-process run's step-2 checkpoint reproduced its logged
grad_norm_encoder bit for bit (60.483765; from the reference's step-2
checkpoint 60.598099, the same sample rows from both), and the same two states
stepped at rate 1.0 differ by 1.25e-3 as well. The step-2 states differ by
round-off (BatchNorm-followed biases and their momentum, ~1e-8 in size, by up
to 2x; the head's fc bias momentum by 3e-3), and a random 1e-6 relative
change of all parameters moves step 3's grad_norm_encoder by <= 1.5e-5 (4
draws): a kink flip (ArcFace's fallback, PReLU at 0) on this 320-class
config (loss 28 at step 1), not smooth amplification. The
sampled variant therefore runs at lr 0.001, where (config.seed 0 and 1) every
metric agreed to <= 5.3e-7 relative and every checkpoint leaf to <= 0.11 of its
tolerance, so it keeps the tolerances above (scratch script: this file's
_run_both and _differences with config.seed and lr overridden).
"""

from __future__ import annotations

import ast
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
# The sampled variant (issue 19): 320 classes, rate 0.25 samples 80 of them (replicated W,
# one shard): batch (32) and queue classes (up to 64) first, then random negatives
# (step 1: 48 negatives; step 3 at seed 0: 87 positives > 80, 7 queue classes dropped),
# at lr 0.001: at 0.01 a kink flips between the layouts for some seeds (docstring).
SAMPLED = {"classifier.sample_rate": 0.25, "num_classes": 320,
           "dataset.synthetic.num_identities": 320, "lr": "0.001"}
LOSSES = ("loss_encoder", "loss_classifier", "queue_fill", "queue_drift")
GRAD_NORMS = ("grad_norm_encoder", "grad_norm_classifier")


def _overrides(extra: dict | None = None) -> dict:
    return {**OVERRIDES, **(extra or {})}


def _config(extra: dict | None = None):
    """The children's config: configs/demo.py:smoke with OVERRIDES (and `extra`) applied."""
    from broadface_jax import cli

    config = cli.config_from_file(REPO / "configs" / "demo.py", "smoke")
    for key, value in _overrides(extra).items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = type(node[leaf])(ast.literal_eval(value) if isinstance(value, str) else value)
    return config


def _start_children(workdir: pathlib.Path, extra: dict | None = None
                    ) -> list[subprocess.Popen]:
    """Starts both processes (the caller waits for them and kills what is left)."""
    command = [sys.executable, "-m", "broadface_jax.main", "--config", CONFIG,
               "--workdir", str(workdir),
               *[f"--config.{k}={v}" for k, v in _overrides(extra).items()]]
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


def _run_both(tmp_path, monkeypatch, extra: dict | None = None):
    """The 2-process run and its 1-process reference: (config, multi dir, reference dir)."""
    config = _config(extra)
    multi_dir, ref_dir = tmp_path / "multi", tmp_path / "single"
    procs = _start_children(multi_dir, extra)  # the reference below runs meanwhile
    try:
        _reference_run(config, ref_dir, int(config.total_steps), monkeypatch)
        _wait_children(procs)
    finally:
        local_cluster.kill(procs)
    return config, multi_dir, ref_dir


def _differences(config, multi_dir: pathlib.Path, ref_dir: pathlib.Path) -> dict:
    """Largest relative metric differences and checkpoint-leaf error / allowed, by kind."""
    steps = int(config.total_steps)
    multi, ref = _records(multi_dir), _records(ref_dir)
    assert sorted(multi) == sorted(ref) == list(range(1, steps + 1))
    out = {}
    for step in ref:
        for name in multi[step].keys() - {"sec_per_step", "images_per_sec"}:
            if name.startswith("sample_"):  # counts: the same sample in both layouts
                assert multi[step][name] == ref[step][name], (step, name)
                continue
            a, b = multi[step][name], ref[step][name]
            # relative, floored at 0.01 (metrics that are 0, as step 1's queue drift)
            out[f"step {step} {name}"] = abs(a - b) / max(abs(b), 1e-2)
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
        out[f"leaf {name}"] = err / (rel * scale + 1e-5)  # <= 1: within its tolerance
    return out


@pytest.mark.slow  # two child JAX processes train with gloo, then a reference run
@pytest.mark.skipif(jax.device_count() != NUM_PROCESSES * LOCAL_DEVICES,
                    reason="the reference run needs 8 devices (tests/conftest.py)")
@pytest.mark.parametrize("extra", [None, SAMPLED], ids=["all_classes", "sampled"])
def test_two_processes_match_single_process(tmp_path, monkeypatch, extra):
    config, multi_dir, ref_dir = _run_both(tmp_path, monkeypatch, extra)
    diff = _differences(config, multi_dir, ref_dir)  # the sample counts are equal
    steps = int(config.total_steps)
    for step in range(1, steps + 1):
        for name in LOSSES + GRAD_NORMS:
            tol = 1e-5 if name in LOSSES else 1e-4
            assert diff[f"step {step} {name}"] <= tol, (step, name, diff[f"step {step} {name}"])
    for name, ratio in diff.items():
        if name.startswith("leaf "):
            assert ratio <= 1.0, f"{name}: |diff| is {ratio:.2f} x its tolerance"
    multi, ref = _records(multi_dir), _records(ref_dir)
    assert multi[steps]["queue_fill"] > 0  # the queue was on and used
    assert ref[1]["loss_encoder"] != ref[steps]["loss_encoder"]  # training moved
    if extra:  # random negatives were drawn (step 1: 80 sampled rows, 32 batch classes)
        assert ref[1]["sample_rows_per_shard"] - ref[1]["sample_positives_max_shard"] >= 48
