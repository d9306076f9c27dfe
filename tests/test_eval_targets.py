"""Evaluation targets end to end (bin:, lfw_dev, cfp_fp on real faces, synthetic) with a random-projection embed.

Each target's metrics are checked against an independent path: images loaded
by the test itself (PIL / the align functions / the split files parsed here),
float64 flip-sum features, and verification.evaluate_embeddings.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from broadface_jax import cli, evaluation
from broadface_jax.evaluation import binfile, face_targets, verification

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(data_root="", bin_dir=""):
    c = cli.config_from_file(REPO / "configs" / "default.py")
    c.eval.data_root = str(data_root)
    c.eval.bin_dir = str(bin_dir)
    c.eval.batch_size = 64
    c.image_size = 112
    return c


class _RandomProjection:
    """An untrained 'model': 4x4 mean-pool, flatten, fixed random projection to 32-d."""

    def __init__(self, seed):
        self.rng_seed = seed
        self.proj = {}

    def features64(self, x):
        n, h, w, _ = x.shape
        pooled = x.astype(np.float64).reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4)) / 255.0 - 0.5
        flat = pooled.reshape(n, -1)
        if flat.shape[1] not in self.proj:
            self.proj[flat.shape[1]] = np.random.default_rng(self.rng_seed).normal(size=(flat.shape[1], 32))
        return flat @ self.proj[flat.shape[1]]

    def __call__(self, x):
        return self.features64(x).astype(np.float32)

    def flip_sum(self, x):
        """e(x) + e(flip(x)) summed in float32 like the evaluator (the embed returns float32)."""
        return (self(x) + self(np.ascontiguousarray(x[:, :, ::-1, :]))).astype(np.float64)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))


def _reference_metrics(embed, images_a, images_b, issame, folds):
    res = verification.evaluate_embeddings(embed.flip_sum(images_a), embed.flip_sum(images_b), issame, folds)
    return res


def _assert_close(metrics, ref):
    assert metrics["accuracy"] == pytest.approx(ref.accuracy, abs=1e-12)
    assert metrics["accuracy_std"] == pytest.approx(ref.accuracy_std, abs=1e-12)
    assert metrics["val@far=1e-3"] == pytest.approx(ref.val, abs=1e-12)
    assert metrics["threshold"] == pytest.approx(ref.best_threshold, abs=1e-12)


def test_bin_target_run_targets_table_and_roc(tmp_path):
    rng = np.random.default_rng()
    embed = _RandomProjection(int(rng.integers(1 << 31)))
    # Planted: pairs of the same 'person' are the same base image plus small noise.
    n_pairs = 60
    base = rng.integers(0, 256, (n_pairs, 112, 112, 3)).astype(np.int16)
    issame = np.arange(n_pairs) % 3 != 0
    other = np.where(issame[:, None, None, None], base, rng.integers(0, 256, base.shape))
    noise = lambda: rng.integers(-60, 61, base.shape)  # noqa: E731
    a = np.clip(base + noise(), 0, 255).astype(np.uint8)
    b = np.clip(other + noise(), 0, 255).astype(np.uint8)
    inter = np.empty((2 * n_pairs, 112, 112, 3), np.uint8)
    inter[0::2], inter[1::2] = a, b
    bin_dir = tmp_path / "bins"
    bin_dir.mkdir()
    binfile.write_bin(bin_dir / "toy.bin", inter, issame, image_format="png")

    config = _config(bin_dir=bin_dir)
    out = tmp_path / "out"
    results = evaluation.run_targets(["bin:toy"], embed, config, out_dir=out)
    ref = _reference_metrics(embed, a, b, issame, verification.kfold_ids(n_pairs))
    _assert_close(results["bin:toy"], ref)
    assert results["bin:toy"]["accuracy"] > 0.9  # planted structure is found
    norms = [np.linalg.norm(embed.features64(x), axis=1) for x in (inter, inter[:, :, ::-1])]
    assert results["bin:toy"]["xnorm"] == pytest.approx(np.mean(np.concatenate(norms)), rel=1e-6)
    assert (out / "roc_bin_toy.png").read_bytes()[:4] == b"\x89PNG"
    table = evaluation.format_table(results)
    assert table.splitlines()[0].startswith("| target") and "bin:toy" in table
    assert f"{results['bin:toy']['accuracy']:.4f}" in table
    # Absolute path form, string of names form.
    again = evaluation.run_targets(f"bin:{bin_dir / 'toy.bin'}", embed, config)
    assert again[f"bin:{bin_dir / 'toy.bin'}"]["accuracy"] == results["bin:toy"]["accuracy"]


def test_lfw_dev_end_to_end_and_disk_cache(shared_data, monkeypatch):
    from broadface_jax import align
    from broadface_jax.evaluation import protocols

    embed = _RandomProjection(int(np.random.default_rng().integers(1 << 31)))
    config = _config(data_root=shared_data)
    metrics = evaluation.build_evaluator("lfw_dev", config).run(embed)
    # Independent path: images per pair straight from disk.
    lfw = shared_data / "lfw"
    pairs = protocols.read_lfw_pairs(lfw / "pairsDevTest.txt")
    load = lambda p: align.lfw_center_crop(align.read_rgb(lfw / "images_deepfunneled" / p))  # noqa: E731
    ia = np.stack([load(p) for p in pairs.paths_a])
    ib = np.stack([load(p) for p in pairs.paths_b])
    _assert_close(metrics, _reference_metrics(embed, ia, ib, pairs.issame, pairs.folds))
    assert 0.5 < metrics["accuracy"] < 0.95  # pixels carry some identity signal; far from trained

    # A new evaluator (build_evaluator keeps nothing) reads the .npz cache: alignment is never called.
    def boom(*_):
        raise AssertionError("alignment ran although the cache exists")

    original = align.lfw_center_crop
    monkeypatch.setattr(align, "lfw_center_crop", boom)
    again = evaluation.build_evaluator("lfw_dev", config).run(embed)
    assert again == metrics
    assert len(os.listdir(os.environ["BROADFACE_EVAL_CACHE"])) == 1

    # A 32x32 model gets 32x32 crops of the same alignment (a separate cache entry).
    monkeypatch.setattr(align, "lfw_center_crop", original)
    config.image_size = 32
    small = evaluation.build_evaluator("lfw_dev", config).data()
    assert small.images.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(small.images[0], align.lfw_center_crop(
        align.read_rgb(lfw / "images_deepfunneled" / pairs.unique_paths()[0][0]), size=32))
    assert len(os.listdir(os.environ["BROADFACE_EVAL_CACHE"])) == 2


def _cfp_subset(shared_data, dst, per_file=35):
    """A CFP tree with the real images and the official 10 folds, each cut to its first pairs."""
    src = shared_data / "cfp" / "cfp-dataset"
    root = dst / "cfp" / "cfp-dataset"
    (root / "Protocol").mkdir(parents=True)
    os.symlink(src / "Data", root / "Data")
    for name in ("Pair_list_F.txt", "Pair_list_P.txt"):
        os.symlink(src / "Protocol" / name, root / "Protocol" / name)
    for fold in sorted(os.listdir(src / "Protocol" / "Split" / "FP")):
        (root / "Protocol" / "Split" / "FP" / fold).mkdir(parents=True)
        for kind in ("same.txt", "diff.txt"):
            lines = (src / "Protocol" / "Split" / "FP" / fold / kind).read_text().splitlines()[:per_file]
            (root / "Protocol" / "Split" / "FP" / fold / kind).write_text("\n".join(lines) + "\n")
    return dst, root


def test_cfp_fp_official_folds_end_to_end(shared_data, tmp_path):
    """CFP-FP's 10-fold protocol on real CFP faces (35 + 35 pairs per official fold)."""
    from broadface_jax import align

    data_root, root = _cfp_subset(shared_data, tmp_path / "data")
    embed = _RandomProjection(int(np.random.default_rng().integers(1 << 31)))
    metrics = evaluation.build_evaluator("cfp_fp", _config(data_root=data_root)).run(embed)
    # Independent parse of the split files and pair lists.
    plist = {}
    for name in ("F", "P"):
        for line in (root / "Protocol" / f"Pair_list_{name}.txt").read_text().split("\n"):
            if line.strip():
                idx, path = line.split()
                plist[name, int(idx)] = path.replace("../", "")
    pa, pb, same, folds = [], [], [], []
    for f, fold in enumerate(sorted(os.listdir(root / "Protocol" / "Split" / "FP"))):
        for kind, s in (("same.txt", True), ("diff.txt", False)):
            for line in (root / "Protocol" / "Split" / "FP" / fold / kind).read_text().split():
                i, j = map(int, line.split(","))
                pa.append(plist["F", i]), pb.append(plist["P", j]), same.append(s), folds.append(f)
    ia = np.stack([align.load_cfp_aligned(root, p) for p in pa])
    ib = np.stack([align.load_cfp_aligned(root, p) for p in pb])
    ref = _reference_metrics(embed, ia, ib, np.array(same), np.array(folds))
    assert ref.fold_accuracy.shape == (10,)
    _assert_close(metrics, ref)


def test_synthetic_target(tmp_path):
    from broadface_jax.datasets import synthetic

    config = _config()
    config.image_size = 32
    config.dataset.synthetic.num_identities = 10
    config.dataset.synthetic.heldout_identities = 30
    config.dataset.synthetic.samples_per_identity = 4
    embed = _RandomProjection(int(np.random.default_rng().integers(1 << 31)))
    metrics = evaluation.build_evaluator("synthetic", config).run(embed)
    a, b, issame = synthetic.verification_pairs(config, face_targets.SYNTHETIC_NUM_PAIRS,
                                                config.seed + face_targets.SYNTHETIC_SEED_OFFSET)
    _assert_close(metrics, _reference_metrics(embed, a, b, issame, verification.balanced_fold_ids(issame)))
    run = evaluation.Evaluators(config)  # a run keeps its evaluators (and their images)
    assert run.get("synthetic") is run.get("synthetic")


def test_bad_target_names_and_paths(tmp_path):
    config = _config(data_root=tmp_path / "nodata")
    with pytest.raises(ValueError, match="unknown evaluation target 'lfw'"):
        evaluation.build_evaluator("lfw", config)
    with pytest.raises(FileNotFoundError, match="no 'lfw' folder"):
        evaluation.build_evaluator("lfw_dev", config).run(lambda x: x)
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluation.build_evaluator("bin:nope", config).run(lambda x: x)
