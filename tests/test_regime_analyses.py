"""benchmarks/regime_analyses.py --quick end to end (issue 18's protocol on synthetic data)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import regime_analyses as ra


@pytest.mark.slow
def test_quick_protocol_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--out", str(out), "--workdir", str(work)]
    s = ra.main(argv)
    p = ra.quick_protocol()
    names = {f"s2_{a.name}_seed1" for a in ra.arms(p)} | {"s1"}
    runs = {f.stem: json.loads(f.read_text()) for f in (out / "runs").glob("*.json")}
    assert names <= set(runs)
    # the lr rule: the smallest candidate with S >= 0.5, probes in order, extras only after
    probes = sorted((r for r in runs.values() if r["stage"] == "probe"), key=lambda r: r["lr"])
    ok = [r["lr"] for r in probes if r["S"] >= p.s_min]
    lr = min(ok) if ok else max(p.lr_candidates + p.lr_extra)
    assert s["meta"]["lr"] == lr
    assert all(runs[n]["lr"] == lr for n in names - {"s1"})
    for r in probes:
        assert r["S"] == pytest.approx(r["theta_t_visit_rad"] / p.margin)
    for n in names - {"s1"}:
        r = runs[n]
        reg = r["regime"]
        assert reg["replay_check_max_abs_w"] == 0.0  # the replay is the run
        assert reg["S"] == pytest.approx(reg["theta"][str(p.t_visit)]["rad"] / p.margin)
        assert 0 < reg["theta"]["1"]["rad"] < reg["theta"][str(max(p.lags))]["rad"] < math.pi
        assert set(reg["errors"]) == {str(k) for k in p.lags}
        assert r["command"].startswith("python -m benchmarks.regime_analyses") and n in r["command"]
        assert r["queue"] == ra.arms(p)[["A", "K", "B", "C", "D"].index(r["arm"])].queue_steps * p.batch
        assert str(r["final_step"]) in r["mechanism"]
    assert runs["s2_K_seed1"]["classifier_optimizer"]["momentum"] == pytest.approx(1 - 1 / p.k_window)
    assert {c["compare"] for c in s["claims"]} >= {"B - A", "C - B", "D - C", "B - K"}
    assert (out / "summary.md").is_file() and "e1_staleness.png" in s["figures"]
    # resumable: a second call finds every JSON and trains nothing
    before = {f.name: f.stat().st_mtime_ns for f in (out / "runs").glob("*.json")}
    ra.main(argv)
    assert before == {f.name: f.stat().st_mtime_ns for f in (out / "runs").glob("*.json")}


class _Cfg:
    """Just what Measurer.training_set reads (no model, no compiled functions)."""

    def __init__(self, config, per_class=0):
        self.config, self.per_class = config, per_class


@pytest.mark.slow  # ~16 s: the TF input pipeline's start on the loaded CPU
def test_e2_measured_set_is_k_training_images_of_every_class():
    """The E2 measured set: samples 0..k-1 of every class, the very pixels (normalised, unflipped)
    that the training stream of the run's seed shows for those examples."""
    import numpy as np

    from benchmarks import paper_analyses as pa

    p = ra.quick_e2_protocol()
    c = ra.stage1_config(p, "")
    c.seed = 3  # the renders depend on the seed: the set must follow the run's
    k = p.measure_per_class
    images, labels = ra.measured_set(c, k)
    assert images.shape == (p.num_classes * k, p.image_size, p.image_size, 3)
    assert np.bincount(labels, minlength=p.num_classes).tolist() == [k] * p.num_classes
    full_images, full_labels = pa.Measurer.training_set(_Cfg(c))  # the stream's epoch 0
    assert full_images.shape[0] == p.num_classes * p.samples_per_identity
    for img, lab in zip(images, labels):
        same = np.flatnonzero((full_images == img[None]).all(axis=(1, 2, 3)))
        assert same.size == 1 and full_labels[same[0]] == lab
    # and the subset Measurer measures on it (training_set alone: no model needed)
    got_i, got_l = ra.SubsetMeasurer.training_set(_Cfg(c, k))
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)
    with pytest.raises(ValueError, match="measure_per_class=7"):
        ra.measured_set(c, 7)



@pytest.mark.slow  # three TF input pipelines (~5 s each on the loaded CPU)
def test_training_set_cache_follows_the_data_and_the_seed():
    """Measurer.training_set's process-wide cache: a config with other synthetic sizes or another
    seed must not get the set another config cached (it did: the key held image size, data dir,
    name and classes only, so this module's tests failed or passed by their order in a worker)."""
    import numpy as np

    from benchmarks import paper_analyses as pa

    p = ra.quick_e2_protocol()
    c = ra.stage1_config(p, "")
    fewer = c.copy_and_resolve_references()
    with fewer.unlocked():
        fewer.dataset.synthetic.samples_per_identity = p.samples_per_identity - 2
    first, _ = pa.Measurer.training_set(_Cfg(fewer))
    assert first.shape[0] == p.num_classes * (p.samples_per_identity - 2)
    full, _ = pa.Measurer.training_set(_Cfg(c))
    assert full.shape[0] == p.num_classes * p.samples_per_identity
    reseeded = c.copy_and_resolve_references()
    reseeded.seed = c.seed + 1
    other, _ = pa.Measurer.training_set(_Cfg(reseeded))
    assert other.shape == full.shape and not np.array_equal(np.sort(other, axis=None),
                                                            np.sort(full, axis=None))

def test_e2_comparisons_use_the_seeds_every_core_arm_has():
    """K runs after every seed of A, B, D: its unfinished seeds must not drop finished
    A / B / D seeds; a core arm's missing seed does."""
    p = ra.e2_protocol()

    def rec(arm, seed):
        return dict(stage=2, arm=arm, seed=seed)

    records = [rec(a, s) for a in ("A", "B", "D") for s in (1, 2, 3)] + [rec("K", 1), rec("A", 4)]
    by = ra._by_arm(records, core=p.arm_names)
    assert {a: sorted(v) for a, v in by.items()} == {"A": [1, 2, 3], "B": [1, 2, 3],
                                                      "D": [1, 2, 3], "K": [1]}
    by = ra._by_arm(records[1:], core=p.arm_names)  # A seed 1 missing
    assert {a: sorted(v) for a, v in by.items()} == {"A": [2, 3], "B": [2, 3], "D": [2, 3]}
    # E1 (core = every arm): one arm's seeds bound all
    q = ra.full_protocol()
    by = ra._by_arm(records, core=q.arm_names)
    assert {a: sorted(v) for a, v in by.items()} == {"A": [1], "B": [1], "D": [1], "K": [1]}


def test_e2_arm_c_runs_last_with_a_compensated_256_step_queue():
    """E2's arm C (added 2026-12-07, after the others had run): after A and B per seed and
    D and K for every seed, C for seeds 1, 2, 3; a pre-filled 4,096-row (256-step) queue with
    Eq. 7; the claims C >= B and D < C are made, and D's descriptive comparisons with A and B
    (written when C was not run) are kept; E1 has none of those."""
    import pathlib

    p = ra.e2_protocol()
    assert [(sd, a.name) for sd, a in ra.run_order(p)] == (
        [(sd, a) for sd in (1, 2, 3) for a in ("A", "B")]
        + [(sd, a) for a in ("D", "K", "C") for sd in (1, 2, 3)])
    c = {a.name: a for a in ra.arms(p)}["C"]
    cfg = ra.stage2_config(p, c, 2, 5e-3, pathlib.Path("/nowhere"), "")
    assert (cfg.queue.size_per_device, cfg.queue.compensate, cfg.queue.prefill_steps,
            cfg.seed, cfg.lr) == (4096, True, 256, 2, 5e-3)
    d = {a.name: a for a in ra.arms(p)}["D"]
    assert ra.stage2_config(p, d, 2, 5e-3, pathlib.Path("/nowhere"), "").queue.compensate is False
    signs = {(a, b): sign for a, b, sign, _ in ra.comparisons(p)}
    assert (signs[("C", "B")], signs[("D", "C")], signs[("D", "A")], signs[("D", "B")]) == (1, -1, 0, 0)
    assert not {("D", "A"), ("D", "B")} & {(a, b) for a, b, _, _ in ra.comparisons(ra.full_protocol())}
    # C is a later arm: its unfinished seeds leave the finished seeds of the others in
    records = [dict(stage=2, arm=a, seed=sd) for a in ("A", "B", "D", "K") for sd in (1, 2, 3)]
    by = ra._by_arm(records + [dict(stage=2, arm="C", seed=1)], core=p.arm_names)
    assert {a: sorted(v) for a, v in by.items()} == {"A": [1, 2, 3], "B": [1, 2, 3],
                                                      "D": [1, 2, 3], "K": [1, 2, 3], "C": [1]}


@pytest.mark.slow
def test_quick_e2_protocol_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    s = ra.main(["--quick", "--protocol", "e2", "--out", str(out), "--workdir", str(work)])
    p = ra.quick_e2_protocol()
    runs = {f.stem: json.loads(f.read_text()) for f in (out / "runs").glob("*.json")}
    assert {f"s2_{a}_seed1" for a in ("A", "B", "D", "K")} | {"s1"} <= set(runs)
    assert not any(n.startswith("s2_C") for n in runs)
    # stage 1 stops at the first check reaching the train top-1, else at the cap
    s1 = runs["s1"]
    checks = {int(k): v["train_top1"] for k, v in s1["checks"].items()}
    reached = [st for st in sorted(checks) if checks[st] >= p.s1_target_top1]
    assert s1["steps"] == (reached[0] if reached else p.s1_stop)
    assert sorted(checks) == list(range(p.s1_check_every, s1["steps"] + 1, p.s1_check_every))
    assert s1["start"]["train_top1"] == pytest.approx(checks[s1["steps"]])
    for n in ("s2_A_seed1", "s2_B_seed1", "s2_D_seed1", "s2_K_seed1"):
        r = runs[n]
        assert r["protocol"] == "quick_e2" and "--protocol e2" in r["command"]
        assert set(r["final"]) == {"heldout"} and 0.0 <= r["final"]["heldout"]["accuracy"] <= 1.0
        assert r["regime"]["replay_check_max_abs_w"] == 0.0
        assert set(r["regime"]["errors"]) == {str(k) for k in p.lags}
    assert runs["s2_D_seed1"]["queue"] == p.window_c * p.batch and not runs["s2_D_seed1"]["compensate"]
    assert s["metric_keys"] == ["heldout/accuracy", "heldout/val@far=1e-3"]
    assert any(c["compare"] == "B - A" and c["primary"] for c in s["claims"])
    # C is not run: D is described against A and B (no claim), with the seeds they share
    d_a = [c for c in s["claims"] if c["compare"] == "D - A" and c["metric"] == "heldout/accuracy"]
    assert len(d_a) == 1 and d_a[0]["verdict"] == "(descriptive)"
    acc = {a: runs[f"s2_{a}_seed1"]["final"]["heldout"]["accuracy"] for a in ("A", "D")}
    assert d_a[0]["result"]["diff"] == pytest.approx(acc["D"] - acc["A"])
    assert "One primary outcome" in (out / "summary.md").read_text()
    assert "e1_staleness.png" in s["figures"] and (out / "summary.md").read_text().startswith(
        "## QUICK_E2 summary")
