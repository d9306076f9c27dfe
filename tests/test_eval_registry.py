"""Evaluation targets by name: config.evals entries, type names and '<type>:<path>' strings.

Each benchmark type runs end to end on a miniature folder in its released
layout written here (tests/eval_folders.py), with a deterministic
pool-and-project embed function; the metrics are checked against a float64
NumPy reference computed by this file from what it wrote (its own image
reading, alignment, pooling and brute-force ranks / TAR @ FAR). Errors name the
entry, option or file at fault, with close matches.
"""

from __future__ import annotations

import pathlib
import runpy

import numpy as np
import pytest

from broadface_jax import align, config_check, evaluation
from broadface_jax.evaluation import verification
from tests import eval_folders

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16


def _config(**evals):
    c = runpy.run_path(str(REPO / "configs" / "default.py"))["get_config"]()
    c.image_size = SIZE
    c.eval.batch_size = 4
    for name, entry in evals.items():
        c.evals[name] = entry
    return c


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))


def _seed() -> int:
    seed = int(np.random.default_rng().integers(1 << 31))
    print(f"seed {seed}")
    return seed


def _tar_at_far(pos: np.ndarray, neg: np.ndarray, far: float) -> float:
    """Brute force: the largest TAR over thresholds whose FAR (neg >= t) is <= far."""
    best = 0.0
    for t in np.concatenate([pos, neg, [np.inf]]):
        if np.mean(neg >= t) <= far:
            best = max(best, float(np.mean(pos >= t)))
    return best


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ijbc_entry_and_inline_target_match_reference(tmp_path):
    rng = np.random.default_rng(_seed())
    root = tmp_path / "IJB_release" / "IJBC"
    lists = eval_folders.write_ijb(root, rng)
    embed = eval_folders.PoolProject(int(rng.integers(1 << 31)))
    fars = (0.05, 0.2)
    config = _config(ijbc_small=dict(type="ijbc", root=str(root), fars=fars))
    results = evaluation.run_targets(["ijbc_small", f"ijbc:{root}"], embed, config)

    # Reference: align each loose crop here, flip-sum, x face score, media means summed per template.
    faces = np.stack([align.warp_to_template(align.read_rgb(root / "loose_crop" / n), p, SIZE)
                      for n, p in zip(lists["names"], lists["points"])])
    feats = embed.flip_sum(faces) * lists["scores"][:, None]
    temp = {}
    for t in np.unique(lists["templates"]):
        rows = np.where(lists["templates"] == t)[0]
        means = [feats[rows[lists["medias"][rows] == m]].mean(axis=0) for m in np.unique(lists["medias"][rows])]
        temp[t] = np.sum(means, axis=0) / np.linalg.norm(np.sum(means, axis=0))
    scores = np.array([temp[a] @ temp[b] for a, b in zip(lists["t1"], lists["t2"])])
    pos, neg = scores[lists["labels"] == 1], scores[lists["labels"] == 0]
    want = {"tar@far=5e-2": _tar_at_far(pos, neg, 0.05), "tar@far=2e-1": _tar_at_far(pos, neg, 0.2)}
    assert results["ijbc_small"] == pytest.approx(want, abs=1e-6)
    # The inline form runs the type's default FARs (1e-6 .. 1e-1).
    assert results[f"ijbc:{root}"]["tar@far=1e-1"] == pytest.approx(_tar_at_far(pos, neg, 0.1), abs=1e-6)
    assert len(results[f"ijbc:{root}"]) == 6


def test_megaface_entry_matches_brute_force(tmp_path):
    rng = np.random.default_rng(_seed())
    root = tmp_path / "megaface"
    data = eval_folders.write_megaface(root, rng, size=SIZE)
    embed = eval_folders.PoolProject(int(rng.integers(1 << 31)))
    config = _config(mf=dict(type="megaface", root=str(root), ranks=(1, 3), fars=(0.05,), chunk_size=10))
    got = evaluation.run_targets(["mf"], embed, config)["mf"]

    probes = _unit(embed.flip_sum(data["probes"]))
    dist = _unit(embed.flip_sum(data["distractors"]))
    ids = data["probe_ids"]
    sd = probes @ dist.T
    genuine, above = [], []
    for p in range(len(ids)):
        for g in range(len(ids)):
            if p != g and ids[p] == ids[g]:
                s = probes[p] @ probes[g]
                genuine.append(s)
                above.append(int(np.sum(sd[p] >= s)))
    above = np.array(above)
    want = {"rank1": float(np.mean(above < 1)), "rank3": float(np.mean(above < 3)),
            "tar@far=5e-2": _tar_at_far(np.array(genuine), sd.ravel(), 0.05)}
    assert got == pytest.approx(want, abs=1e-6)
    assert 0 < want["rank3"] and want["rank1"] <= want["rank3"]


def test_ytf_entry_matches_reference(tmp_path):
    rng = np.random.default_rng(_seed())
    root = tmp_path / "YouTubeFaces"
    data = eval_folders.write_ytf(root, rng, size=SIZE)
    embed = eval_folders.PoolProject(int(rng.integers(1 << 31)))
    config = _config(ytf=dict(root=str(root), center_crop=0.8))  # type defaults to the entry's name
    got = evaluation.run_targets(["ytf"], embed, config)["ytf"]

    means = {v: _unit(embed.flip_sum(c)).mean(axis=0) for v, c in data["crops"].items()}
    a = np.stack([means[v] for v in data["first"]])
    b = np.stack([means[v] for v in data["second"]])
    ref = verification.evaluate_embeddings(a, b, data["issame"], folds=data["folds"])
    frames = np.concatenate(list(data["crops"].values()))
    norms = np.r_[np.linalg.norm(embed.features64(frames), axis=1),
                  np.linalg.norm(embed.features64(np.ascontiguousarray(frames[:, :, ::-1])), axis=1)]
    assert got == pytest.approx({**ref.metrics(), "xnorm": norms.mean()}, abs=1e-6)


def test_pair_types_by_entry_and_by_name(tmp_path):
    from broadface_jax.datasets import synthetic

    seed = _seed()
    embed = eval_folders.PoolProject(seed)
    config = _config(syn40=dict(type="synthetic", num_pairs=40, seed=seed % 1000))
    config.dataset.synthetic.num_identities, config.dataset.synthetic.heldout_identities = 20, 10
    got = evaluation.run_targets("syn40", embed, config)["syn40"]
    a, b, issame = synthetic.verification_pairs(config, 40, seed % 1000)
    issame = np.asarray(issame, bool)
    ref = verification.evaluate_embeddings(embed.flip_sum(a), embed.flip_sum(b), issame,
                                           folds=verification.balanced_fold_ids(issame))
    assert got["accuracy"] == pytest.approx(ref.accuracy, abs=1e-12)
    assert got["threshold"] == pytest.approx(ref.best_threshold, abs=1e-12)


def test_errors_name_the_entry_option_and_file(tmp_path):
    config = _config(a=dict(type="ijbcc", root="/x"), b=dict(type="ijbc", rot="/x", flip=3),
                     c=dict(type="ijbc", root="/x", rule="insightfase"))
    with pytest.raises(evaluation.TargetError, match=r"config.evals.a: unknown evaluation type 'ijbcc' "
                                                     r"\(did you mean 'ijbc'"):
        evaluation.build_evaluator("a", config)
    with pytest.raises(ValueError) as info:
        evaluation.build_evaluator("b", config)
    text = str(info.value)
    assert "config.evals.b.rot='/x': not an option of type 'ijbc' (did you mean 'root'?)" in text
    assert "config.evals.b.flip=3: must be a bool" in text and "config.evals.b.root: required" in text
    with pytest.raises(ValueError, match=r"rule='insightfase': must be one of 'max_tpr', 'insightface' "
                                         r"\(did you mean 'insightface'"):
        evaluation.build_evaluator("c", config)
    with pytest.raises(ValueError, match=r"'ijbc': type 'ijbc' needs root: write 'ijbc:<root>'"):
        evaluation.build_evaluator("ijbc", config)
    with pytest.raises(ValueError, match=r"unknown evaluation target 'ytff:/x' \(did you mean 'ytf'"):
        evaluation.run_targets(["synthetic", "ytff:/x"], lambda x: x, config)  # checked before running

    # config_check lists every fault, one per line, with the others of the config.
    config.eval.targets = ("lfw_devv", "b")
    found = config_check.problems(config)
    assert any(p.startswith("config.eval.targets[0]: unknown evaluation target 'lfw_devv' "
                            "(did you mean 'lfw_dev'?)") for p in found)
    assert sum("config.evals.b." in p for p in found) == 3
    assert any("config.evals.a: unknown evaluation type 'ijbcc'" in p for p in found)  # not run, still checked

    # Missing files are named.
    root = tmp_path / "IJBC"
    (root / "meta").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"IJB face/template/media file not found: .*ijbc_face_tid_mid.txt"):
        evaluation.run_targets([f"ijbc:{root}"], lambda x: x, config)
    with pytest.raises(FileNotFoundError, match=r"root folder not found: .*nowhere"):
        evaluation.run_targets([f"ytf:{tmp_path / 'nowhere'}"], lambda x: x, config)
    ytf = tmp_path / "ytf"
    ytf.mkdir()
    (ytf / "splits.txt").write_text("split number, pair number, first name, second name, is same\n"
                                    "1, 1, A/0, B/1, 0, 0\n")
    with pytest.raises(FileNotFoundError, match=r"splits.txt: video 'A/0' has no frames folder"):
        evaluation.run_targets([f"ytf:{ytf}"], lambda x: x, config)
    (ytf / "splits.txt").write_text("1, 1, A/0, B/1, maybe\n")
    with pytest.raises(ValueError, match=r"splits.txt:1: expected 'split, pair"):
        evaluation.run_targets([f"ytf:{ytf}"], lambda x: x, config)
    mf = tmp_path / "mf"
    eval_folders.write_megaface(mf, np.random.default_rng(0), n_ids=2, per_id=2, n_dist=3, size=SIZE)
    (mf / "megaface_images" / "0" / "1000@N00" / "0_0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"megaface_features_list.json_1000000_1: entry 0 "):
        evaluation.run_targets([f"megaface:{mf}"], eval_folders.PoolProject(0), config)
