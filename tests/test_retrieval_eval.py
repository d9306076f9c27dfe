"""Recall@K: against a brute-force float64 reference, and the sop / inshop / cub200 / cars196 targets.

The reference sorts every query's cosine similarities in float64 and checks
the top K (the query itself left out for all-vs-all; a separate gallery for
In-Shop, where a query with no gallery image of its item is a miss). The
targets are then run through `evaluation.run_targets` (the trainer's and
`broadface_jax.evaluate`'s path) on miniature prepared data sets with a
fixed embed function, and compared with the reference on the same crops.
Seed 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from broadface_jax import datasets, evaluation
from broadface_jax.evaluation import retrieval, retrieval_targets
from configs.default import get_config
from tests import retrieval_fixtures as rf
from tests.test_retrieval_pipeline import np_resize

SEED = 0
FRAME, SIZE = 40, 32


def brute_force_recall(q, q_labels, g=None, g_labels=None, ks=(1,)):
    q = np.asarray(q, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    same_set = g is None
    if same_set:
        g, g_labels = q, q_labels
    else:
        g = np.asarray(g, np.float64)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    hits = {k: [] for k in ks}
    for i in range(len(q)):
        s = g @ q[i]
        order = [j for j in np.argsort(-s, kind="stable") if not (same_set and j == i)]
        ranked = np.asarray(g_labels)[order]
        for k in ks:
            hits[k].append(bool(np.any(ranked[:k] == q_labels[i])))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def test_all_vs_all_recall_matches_brute_force():
    rng = np.random.default_rng(SEED)
    feats = rng.normal(size=(300, 8))
    labels = rng.integers(0, 60, 300)
    ks = (1, 2, 4, 8, 100, 1000)
    got = retrieval.recall_at_k(feats, labels, ks=ks, chunk_size=64)
    ref = brute_force_recall(feats, labels, ks=ks)
    assert got == pytest.approx(ref, abs=1e-12)
    assert 0.0 < got[1] < got[8] < 1.0  # a non-trivial case
    # the query itself never counts: identical features of a singleton class are a miss
    same = np.ones((3, 4))
    assert retrieval.recall_at_k(same, np.array([0, 1, 2]), ks=(1, 2))[2] == 0.0


def test_query_gallery_recall_matches_brute_force():
    rng = np.random.default_rng(SEED + 1)
    q, g = rng.normal(size=(200, 8)), rng.normal(size=(150, 8))
    q_labels, g_labels = rng.integers(0, 50, 200), rng.integers(0, 45, 150)  # some queries have no match
    ks = retrieval_targets.INSHOP_KS
    got = retrieval.recall_at_k(q, q_labels, g, g_labels, ks=ks, chunk_size=32)
    assert got == pytest.approx(brute_force_recall(q, q_labels, g, g_labels, ks=ks), abs=1e-12)
    no_match = ~np.isin(q_labels, g_labels)
    assert no_match.any() and got[50] <= 1.0 - no_match.mean() + 1e-12


# ------------------------------------------------------------------ targets
def embed_fn(images: np.ndarray) -> np.ndarray:
    """A fixed 'network': mean colour of each 8 x 8 block (N x 48)."""
    x = images.astype(np.float64).reshape(images.shape[0], 4, SIZE // 4, 4, SIZE // 4, 3)
    return x.mean(axis=(2, 4)).reshape(images.shape[0], -1).astype(np.float32) - 128.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    rf.write_sop(root / "sop", seed=SEED, train_classes=(1, 2), test_classes=(3, 4, 5, 6), per_class=3)
    rf.write_inshop(root / "inshop", seed=SEED)
    rf.write_cub(root / "cub", seed=SEED, classes=(1, 101, 102, 103), per_class=3)
    for name, raw in (("sop", "sop"), ("inshop", "inshop"), ("cub200", "cub")):
        b = datasets.get_builder(name, str(root / "data"), file_format="array_record")
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root / raw)))
    return root / "data"


def _config(data_dir):
    c = get_config()
    c.image_size = SIZE
    c.dataset.resize_to = FRAME
    c.dataset.data_dir = str(data_dir)
    c.eval.batch_size = 4  # several batches per split
    return c


def _reference_features(data_dir, name, split):
    """Features of the evaluation crops computed with NumPy (resize, crop, round to uint8)."""
    builder = datasets.get_builder(name, str(data_dir))
    src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    crops, labels = [], []
    for i in range(len(src)):
        r = src[i]
        img = tf.io.decode_jpeg(r["image"], channels=3).numpy()
        crop = np_resize(img, FRAME, FRAME)[4:36, 4:36]
        crops.append(np.round(np.clip(crop, 0, 255)).astype(np.uint8))
        labels.append(int(r["label"]))
    return embed_fn(np.stack(crops)), np.array(labels)


def test_targets_match_reference_on_prepared_data(prepared):
    config = _config(prepared)
    results = evaluation.run_targets(["sop", "inshop", "cub200"], embed_fn, config)
    assert list(results["sop"]) == ["recall@1", "recall@10", "recall@100", "recall@1000"]
    assert list(results["inshop"]) == [f"recall@{k}" for k in (1, 10, 20, 30, 40, 50)]
    assert list(results["cub200"]) == [f"recall@{k}" for k in (1, 2, 4, 8)]

    f, lab = _reference_features(prepared, "sop", "test")
    assert len(lab) == 12
    ref = brute_force_recall(f, lab, ks=retrieval_targets.SOP_KS)
    assert [results["sop"][f"recall@{k}"] for k in retrieval_targets.SOP_KS] == pytest.approx(list(ref.values()))

    fq, lq = _reference_features(prepared, "inshop", "query")
    fg, lg = _reference_features(prepared, "inshop", "gallery")
    assert (len(lq), len(lg)) == (3, 7)
    ref = brute_force_recall(fq, lq, fg, lg, ks=retrieval_targets.INSHOP_KS)
    assert [results["inshop"][f"recall@{k}"] for k in retrieval_targets.INSHOP_KS] == pytest.approx(
        list(ref.values()))
    assert results["inshop"]["recall@1"] == 1.0  # class colours: each query finds its item first

    f, lab = _reference_features(prepared, "cub200", "test")
    ref = brute_force_recall(f, lab, ks=retrieval_targets.CUB_CARS_KS)
    assert [results["cub200"][f"recall@{k}"] for k in (1, 2, 4, 8)] == pytest.approx(list(ref.values()))


    table = evaluation.format_table(results)
    assert "| sop " in table and "recall@1000" in table and "recall@50" in table


def test_target_errors(prepared, tmp_path):
    config = _config(prepared)
    with pytest.raises(FileNotFoundError, match=r"data set cars196 is not prepared .*broadface_jax.prepare "
                                                r"--dataset cars196"):
        evaluation.run_targets(["cars196"], embed_fn, config)
    config.eval.tfds_data_dir = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"TFDS data_dir .*missing' does not exist"):
        evaluation.run_targets(["sop"], embed_fn, config)
    with pytest.raises(ValueError, match=r"unknown evaluation target 'sopp'.*sop, inshop, cub200, cars196"):
        evaluation.build_evaluator("sopp", config)


def test_recall_type_from_a_config_entry(prepared):
    """c.evals entry: type 'sop' with its own data_dir and ks (config.eval.tfds_data_dir unset)."""
    config = _config(prepared)
    config.eval.tfds_data_dir, config.dataset.data_dir = "", ""
    config.evals.products = dict(type="sop", data_dir=str(prepared), ks=(1, 2, 3))
    got = evaluation.run_targets(["products"], embed_fn, config)["products"]
    f, lab = _reference_features(prepared, "sop", "test")
    ref = brute_force_recall(f, lab, ks=(1, 2, 3))
    assert got == pytest.approx({f"recall@{k}": v for k, v in ref.items()})
