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
