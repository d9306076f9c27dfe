"""benchmarks/paper_analyses.py: --quick end to end (stages 1 and 2, two arms, one seed), resumable;
the claims' paired statistics on made-up records with known differences.

The end-to-end test checks that each run's JSON holds its curve, training
metrics, mechanism numbers (with Fig. 5a errors for the queue arm) and final
evaluation; recomputes both stage-2 arms' mechanism numbers at their last
checkpoint in float64 NumPy from the checkpoint, the data and the model
(``check_last_checkpoint_numbers``); checks that the summary has a verdict per
claim and that the figures were drawn; then that a second call skips the
finished runs. Stage 3 runs
the same ``run_one`` with another config (checked in ``make_config``); its
claims are checked on made-up records.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest
from scipy import stats

from benchmarks import paper_analyses


@pytest.mark.slow  # trains stage 1 and two stage-2 arms for real (~1-4 min on 2 cores)
def test_quick_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))
    out, work = tmp_path / "out", tmp_path / "runs"
    args = ["--quick", "--stages", "1,2", "--out", str(out), "--workdir", str(work)]
    summary = paper_analyses.main(args)
    p = paper_analyses.quick_protocol()

    names = sorted(f.stem for f in (out / "runs").glob("*.json"))
    assert names == sorted(["s1_arcface", "s2_arcface_seed1", "s2_q8_comp_seed1"])
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
    # the numbers themselves, recomputed from the last checkpoint in float64
    check_last_checkpoint_numbers(p, work, s2q)
    check_last_checkpoint_numbers(p, work, recs["s2_arcface_seed1"])

    assert set(summary["stages"]["2"]) == {"arcface", "q8_comp"}
    assert all(c["verdict"] in ("pending (1 seed)", "pending") for c in summary["claims"])
    for fig in ("curves_stage1.png", "curves_stage2.png", "finals_stage2.png",
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


def check_last_checkpoint_numbers(p, work: pathlib.Path, rec: dict) -> None:
    """A run's mechanism numbers at its last checkpoint (the one run_one keeps), recomputed
    in float64 NumPy from the checkpoint, the synthetic data set and the model alone: not
    through paper_analyses.Measurer nor broadface_jax.analysis.

    train_top1 / center_cos: eval-mode embeddings of every training face (rendered by
    ``datasets.synthetic``) against the classifier; comp_error at each lag: the queue rows
    written ``lag`` steps ago (each shard's ring buffer advances by the per-device batch at
    every step) against the train-mode embeddings of that step's batch, stale and with Eq. 7.
    """
    import jax

    from broadface_jax import checkpointing, input_pipeline, sharding, train_step
    from broadface_jax.datasets import synthetic
    from tests.np_reference import np_compensate

    spec = paper_analyses.RunSpec(rec["name"], rec["stage"], rec["queue"], rec["compensate"],
                                  rec["seed"])
    config = paper_analyses.make_config(p, spec, work)
    model = paper_analyses.quick_model(p.embedding_dim)
    step = rec["final_step"]
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train_step.abstract_train_state(config, mesh, model)
    state = jax.device_get(checkpointing.restore(
        str(work / spec.name), checkpointing.abstract_like(abstract, shardings), step))
    params, batch_stats = state.params["encoder"], state.batch_stats
    c = int(config.num_classes)
    w = np.asarray(state.params["classifier"]["kernel"], np.float64)[:c]

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def forward(x, train):  # x: normalised images
        out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=train,
                          mutable=["batch_stats"] if train else False)
        return np.asarray(out[0] if train else out, np.float64)

    data = synthetic.spec_from_config(config)
    images, labels = synthetic.training_examples(data, np.arange(data.num_examples), config.seed)
    emb = unit(forward(input_pipeline.normalize_images(images.astype(np.float32), config),
                       train=False))
    mech = rec["mechanism"][str(step)]
    assert mech["train_top1"] == np.mean(np.argmax(emb @ unit(w).T, axis=1) == labels)
    centers = unit(np.stack([emb[labels == k].mean(axis=0) for k in range(c)]))
    np.testing.assert_allclose(mech["center_cos"], np.mean(np.sum(centers * unit(w), axis=1)),
                               rtol=1e-5, atol=1e-6)

    q = state.queue
    local, devices = int(config.per_device_batch_size), jax.device_count()
    per_shard = int(config.queue.size_per_device)
    held = min(step, per_shard // local)  # steps the queue holds (no pre-fill)
    lags = [lag for lag in p.lags if lag <= held]
    assert sorted(mech["comp_error"], key=int) == [str(lag) for lag in lags]
    assert lags or not per_shard  # the queue arm measures at least one lag
    for lag in lags:
        offset = ((step - lag) * local) % per_shard  # written by training step step - lag + 1
        rows = (np.arange(devices)[:, None] * per_shard + offset + np.arange(local)).ravel()
        it = input_pipeline.create_train_iterator(config, start_step=step - lag)
        batch = next(it)
        it.close()
        assert np.array_equal(np.asarray(q.labels)[rows], batch["label"]) and q.valid[rows].all()
        current = unit(forward(batch["image"], train=True))  # flips as in training
        stale = np.asarray(q.embeddings, np.float64)[rows]
        w_old = np.asarray(q.weights, np.float64)[rows]
        w_cur = w[np.asarray(q.labels)[rows]]
        want = dict(stale=np.mean(1 - np.sum(current * unit(stale), axis=1)),
                    compensated=np.mean(1 - np.sum(
                        current * unit(np_compensate(stale, w_old, w_cur)), axis=1)),
                    drift_w=np.mean(1 - np.sum(unit(w_old) * unit(w_cur), axis=1)))
        got = mech["comp_error"][str(lag)]
        for key, value in want.items():  # measured: ~2e-6 apart (jit vs not); Eq. 7 moves
            # the quick run's errors by ~3e-3 relative, so a missing compensation fails
            np.testing.assert_allclose(got[key], value, rtol=5e-5, atol=1e-12,
                                       err_msg=f"{rec['name']} lag {lag} {key}")


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        paper_analyses.parse_args(["--out", "x", "--stages", "4"])
    with pytest.raises(SystemExit):
        paper_analyses.parse_args(["--out", "x", "--seeds", "0"])


def test_stage_configs():
    p = paper_analyses.full_protocol()
    root = pathlib.Path("/runs")
    s1 = paper_analyses.make_config(p, paper_analyses.STAGE1, root)
    assert (s1.lr, s1.lr_boundaries, s1.warmup_steps, s1.init_from) == (0.1, (1500, 2100), 100, "")
    s2 = paper_analyses.make_config(p, paper_analyses.RunSpec("x", 2, 8192, False, 2), root)
    assert s2.lr == pytest.approx(5e-3) and s2.lr_boundaries == (315, 441) and s2.warmup_steps == 0
    assert (s2.init_from, s2.init_classifier) == ("/runs/s1_arcface", True)
    assert (s2.queue.size_per_device, s2.queue.compensate, s2.queue.chunk_size, s2.seed) == (8192, False, 1024, 2)
    assert s2.keep_checkpoints > s2.total_steps // s2.eval_every_steps
    s3 = paper_analyses.make_config(p, paper_analyses.RunSpec("y", 3, 4096, True, 1), root)
    assert (s3.lr, s3.init_from, s3.total_steps, s3.queue.size_per_device) == (0.1, "", 2500, 4096)
    # stage 2 runs seed by seed, every arm with the same seeds
    specs = paper_analyses.stage2_specs(p)
    assert len(specs) == 3 * 7 and [s.seed for s in specs[:7]] == [1] * 7
    assert {(s.queue, s.compensate) for s in specs} == {(0, True)} | {
        (q, c) for q in (1024, 4096, 8192) for c in (True, False)}


def _record(stage, arm, queue, comp, seed, acc, best_at=4, err=None):
    curve = {str(s): {"synthetic/accuracy": acc - (0.1 if s < best_at else 0.0)} for s in (2, 4, 6)}
    mech = {"6": {"comp_error": {} if err is None else {"1": {"stale": 0.01, "compensated": 0.01},
                                                        "4": err}}}
    return dict(stage=stage, arm=arm, queue=queue, compensate=comp, seed=seed, protocol="quick",
                final={"synthetic": {"accuracy": acc}}, curve=curve, mechanism=mech,
                wall_s={"train_s": 1.0, "analysis_s": 1.0})


def test_claims_paired_over_seeds_with_t_intervals():
    p = dataclasses.replace(paper_analyses.quick_protocol(), queues=(8, 16), seeds=(1, 2, 3),
                            compensations=(True, False))
    arc = np.array([0.80, 0.83, 0.81])
    q8 = arc + [0.020, 0.030, 0.025]  # clearly better: seen
    q16 = q8 + [0.010, -0.012, 0.001]  # no clear change: not seen
    q16n = q16 - [0.05, 0.06, 0.04]  # no compensation at the largest queue: worse (the paper's sign)
    recs = []
    for i, seed in enumerate(p.seeds):
        recs += [_record(2, "arcface", 0, True, seed, arc[i]),
                 _record(2, "q8_comp", 8, True, seed, q8[i], err={"stale": 0.2, "compensated": 0.1}),
                 _record(2, "q8_nocomp", 8, False, seed, q8[i] - 0.001 * (i + 1),
                         err={"stale": 0.2, "compensated": 0.25 + 0.01 * i}),
                 _record(2, "q16_comp", 16, True, seed, q16[i]),
                 _record(2, "q16_nocomp", 16, False, seed, q16n[i]),
                 _record(3, "arcface", 0, True, seed, 0.7, best_at=6),
                 _record(3, "q16_comp", 16, True, seed, 0.685 - 0.005 * (i + 1), best_at=4)]
    summary = paper_analyses.summarise(p, recs)
    claims = {(c["claim"], c["compare"]): c for c in summary["claims"]}

    def check(key, a, b, verdict):
        c = claims[key]
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert c["result"]["diff"] == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12), key
        assert (c["result"]["lo"], c["result"]["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert c["result"]["seeds"] == [1, 2, 3] and c["verdict"] == verdict, key

    check(("BroadFace (with compensation) beats ArcFace fine-tuning", "q8_comp - arcface"), q8, arc, "seen")
    # an interval across 0 is "not seen" whatever the expected sign
    assert paper_analyses.verdict(dict(diff=-0.2, lo=-0.9, hi=0.5, n=3.0), -1) == "not seen"
    assert paper_analyses.verdict(dict(diff=-0.2, lo=-0.9, hi=-0.1, n=3.0), -1) == "seen"
    assert paper_analyses.verdict(dict(diff=0.2, lo=0.1, hi=0.3, n=3.0), -1) == "opposite"
    assert paper_analyses.verdict(dict(diff=-0.2, lo=-0.3, hi=-0.1, n=3.0), +1) == "opposite"
    check(("accuracy grows with the queue", "q16_comp - q8_comp"), q16, q8, "not seen")
    check(("without compensation a large queue degrades", "q16_nocomp - q16_comp"), q16n, q16, "seen")
    c = claims[("compensation reduces the embedding error (Fig. 5a)",
                "q8_comp: compensated - stale error, largest lag")]
    assert c["result"]["diff"] == pytest.approx(-0.1) and c["verdict"] == "seen"
    c = claims[("compensation reduces the embedding error (Fig. 5a)",
                "q8_nocomp: compensated - stale error, largest lag")]
    assert c["result"]["diff"] == pytest.approx(0.06) and c["verdict"] == "opposite"
    c = claims[("BroadFace reaches its best sooner (from scratch)", "q16_comp - arcface")]
    assert c["result"]["diff"] == -2 and c["result"]["sd"] == 0 and c["verdict"] == "seen"
    check(("BroadFace from scratch ends higher", "q16_comp - arcface"),
          [0.68, 0.675, 0.67], [0.7, 0.7, 0.7], "opposite")
    rows = summary["stages"]["2"]
    assert rows["q8_comp"]["synthetic/accuracy"]["mean"] == pytest.approx(q8.mean())
    assert rows["q8_comp"]["synthetic/accuracy"]["sd"] == pytest.approx(q8.std(ddof=1))
    assert paper_analyses.best_broadface_arm(p, recs) == (8, True)  # q16 is 0.03 points lower
    md = paper_analyses.summary_markdown(summary)
    assert "| q8_comp | 1,2,3 | 83.83 ± 2.02 |" in md


def test_from_scratch_compensation_claim_at_lag_64():
    """Fig. 5a where the embedding moves (issue 18): compensated - stale at lag 64, mean over
    a run's checkpoints, paired over seeds; larger compensated errors are 'opposite'."""
    p = dataclasses.replace(paper_analyses.quick_protocol(), seeds=(1, 2, 3))
    rng = np.random.default_rng(7)
    stale = rng.uniform(0.1, 0.17, (3, 2))
    ratio = rng.uniform(1.3, 1.55, (3, 2))
    recs = []
    for i, seed in enumerate(p.seeds):
        recs.append(_record(3, "arcface", 0, True, seed, 0.7))
        r = _record(3, "q8_nocomp", 8, False, seed, 0.7)
        r["mechanism"] = {str(step): {"comp_error": {"64": {"stale": stale[i, j],
                                                            "compensated": stale[i, j] * ratio[i, j]},
                                                     "8": {"stale": 0.5, "compensated": 0.0}}}
                          for j, step in enumerate((250, 500))}
        r["mechanism"]["start"] = {}
        recs.append(r)
    summary = paper_analyses.summarise(p, recs)
    c = [c for c in summary["claims"]
         if c["claim"] == "compensation reduces the embedding error (Fig. 5a), from scratch"]
    assert len(c) == 1 and c[0]["compare"].startswith("q8_nocomp")
    per_seed = (stale * (ratio - 1)).mean(axis=1)
    ci = stats.ttest_1samp(per_seed, 0.0).confidence_interval(0.95)
    assert c[0]["result"]["diff"] == pytest.approx(per_seed.mean(), rel=1e-12)
    assert (c[0]["result"]["lo"], c[0]["result"]["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert c[0]["verdict"] == "opposite"
    md = paper_analyses.summary_markdown(summary)
    assert f"{per_seed.mean():+.2e} [" in md  # errors in e-notation, not +0.00
