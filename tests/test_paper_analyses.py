"""benchmarks/paper_analyses.py --quick end to end: every stage, two arms, one seed, resumable.

Checks that each run's JSON holds its curve, training metrics, mechanism
numbers (with Fig. 5a errors for the queue arm) and final evaluation, that
the summary has a verdict per claim and that every figure was drawn; then
that a second call skips the finished runs.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import paper_analyses


def test_quick_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))
    out, work = tmp_path / "out", tmp_path / "runs"
    args = ["--quick", "--out", str(out), "--workdir", str(work)]
    summary = paper_analyses.main(args)
    p = paper_analyses.quick_protocol()

    names = sorted(f.stem for f in (out / "runs").glob("*.json"))
    assert names == sorted(["s1_arcface", "s2_arcface_seed1", "s2_q8_comp_seed1",
                            "s3_arcface_seed1", "s3_q8_comp_seed1"])
    recs = {n: json.loads((out / "runs" / f"{n}.json").read_text()) for n in names}
    for n, r in recs.items():
        every = {1: p.stage1_eval_every, 2: p.stage2_eval_every, 3: p.scratch_eval_every}[r["stage"]]
        assert sorted(int(s) for s in r["curve"]) == list(range(every, r["steps"] + 1, every)), n
        assert all(0.0 <= v["synthetic/accuracy"] <= 1.0 for v in r["curve"].values())
        assert r["final_step"] == r["steps"] and 0.0 < r["final"]["synthetic"]["accuracy"] <= 1.0
        assert r["wall_s"]["train_s"] > 0 and r["wall_s"]["analysis_s"] > 0
    s2q = recs["s2_q8_comp_seed1"]
    assert s2q["init_from"].endswith("s1_arcface") and s2q["lr"] == pytest.approx(0.1 / 20)
    assert s2q["lr_boundaries"] == [2, 4]
    # the queue was used: 8 rows per device x 8 devices, 2 global batches of 32
    assert s2q["train"]["4"]["queue_used"] == 64.0
    mech = s2q["mechanism"]
    assert sorted(mech) == ["2", "4"]
    for m in mech.values():
        assert 0.0 <= m["train_top1"] <= 1.0 and -1.0 <= m["center_cos"] <= 1.0
        assert m["queue_rows"] == 64 and m["queue_steps"] == 2
        assert m["batch_classes"] <= m["union_classes"] <= m["num_classes"] == 16
        assert m["queue_classes"] <= m["union_classes"]
    assert sorted(mech["4"]["comp_error"], key=int) == ["1", "2"]  # lag 4 > the queue's 2 steps
    assert sorted(mech["2"]["comp_error"]) == ["1"]  # lags_every at earlier checkpoints
    for e in mech["4"]["comp_error"].values():
        assert e["stale"] >= 0 and e["compensated"] >= 0 and e["drift_w"] >= 0
    arc = recs["s2_arcface_seed1"]["mechanism"]["4"]
    assert arc["queue_rows"] == 0 and arc["comp_error"] == {}
    assert arc["union_classes"] == arc["batch_classes"]
    assert "start" in recs["s1_arcface"]["mechanism"]

    assert set(summary["stages"]["2"]) == {"arcface", "q8_comp"}
    claims = {(c["claim"], c["compare"]) for c in summary["claims"]}
    assert ("BroadFace reaches its best sooner (from scratch)", "q8_comp - arcface") in claims
    assert all(c["verdict"] in ("pending (1 seed)", "pending") for c in summary["claims"])
    for fig in ("curves_stage1.png", "curves_stage2.png", "curves_stage3.png", "finals_stage2.png",
                "queue_compensation.png", "compensation_error.png", "mechanism_stage2.png"):
        assert (out / fig).stat().st_size > 1000, fig
    assert json.loads((out / "summary.json").read_text())["runs_done"] == names
    assert "### Claims of the paper" in (out / "summary.md").read_text()

    # resumable: a second call trains nothing and rebuilds the same summary
    capsys.readouterr()
    again = paper_analyses.main(args)
    assert "training" not in capsys.readouterr().out
    assert [c["verdict"] for c in again["claims"]] == [c["verdict"] for c in summary["claims"]]
    assert again["runs_done"] == names


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        paper_analyses.parse_args(["--out", "x", "--stages", "4"])
    with pytest.raises(SystemExit):
        paper_analyses.parse_args(["--out", "x", "--seeds", "0"])
