"""The retrieval TFDS builders (SOP, In-Shop, CUB-200-2011, Cars196) on miniature data sets.

Each data set is written by `tests/retrieval_fixtures.py` in its real layout
(list-file formats as downloaded, a few classes, small JPEGs of assorted
sizes); the prepared splits must hold exactly what the lists say: sizes,
labels per label group, class / image ids, query vs gallery membership,
images at their own size (byte for byte for RGB JPEGs). Broken inputs must
fail naming the file and line.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from broadface_jax import datasets
from broadface_jax.datasets import retrieval

from tests import retrieval_fixtures as rf


def _prepare(name, manual_dir, data_dir):
    builder = datasets.get_builder(name, str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _records(builder, split):
    src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    out = []
    for i in range(len(src)):
        r = src[i]
        out.append({k: (v.decode() if isinstance(v, bytes) and k != "image" else v) for k, v in r.items()})
    return sorted(out, key=lambda r: r["image_id"])


def test_sop_builder(tmp_path):
    raw = tmp_path / "raw"
    truth = rf.write_sop(raw, train_classes=(1, 2, 3), test_classes=(4, 6), per_class=3)
    builder = _prepare("sop", raw, tmp_path / "data")  # manual_dir = the parent of Stanford_Online_Products
    assert builder.name == "sop_retrieval"
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 9, "test": 6}
    meta = builder.info.metadata
    assert meta["num_classes"] == 3 and meta["classes_per_split"] == {"train": 3, "test": 2}
    assert meta["protocol"] == "all_vs_all"
    base = raw / "Stanford_Online_Products"
    for split, first_class in (("train", 1), ("test", 4)):
        recs = _records(builder, split)
        assert [(r["image_id"], r["class_id"], r["file"]) for r in recs] == truth[split]
        # labels: positions among the split's sorted class ids
        classes = sorted({c for _, c, _ in truth[split]})
        assert [r["label"] for r in recs] == [classes.index(r["class_id"]) for r in recs]
        for r in recs:  # RGB JPEGs are kept byte for byte, at their own size
            assert r["image"] == (base / r["file"]).read_bytes()
            assert r["class_name"] == r["file"].split("/")[0]


def test_inshop_builder_query_gallery(tmp_path):
    raw = tmp_path / "raw"
    rows = rf.write_inshop(raw)["rows"]
    builder = _prepare("inshop", raw, tmp_path / "data")
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    assert sizes == {"train": 8, "query": 3, "gallery": 7}
    assert builder.info.metadata["num_classes"] == 3
    assert builder.info.metadata["protocol"] == "query_gallery"
    recs = {s: _records(builder, s) for s in ("train", "query", "gallery")}
    for s, rs in recs.items():  # membership and order exactly as list_eval_partition.txt says
        assert [(r["file"], r["class_id"], s) for r in rs] == [row for row in rows if row[2] == s]
        assert all(r["class_name"] == f"id_{r['class_id']:08d}" for r in rs)
    assert [r["image_id"] for r in recs["train"]] == list(range(1, 9))  # line positions
    # train labels 0..2 by item; query and gallery share one numbering over items 7, 8, 9
    assert [r["label"] for r in recs["train"]] == [0, 0, 0, 1, 1, 2, 2, 2]
    label_of = {7: 0, 8: 1, 9: 2}
    for s in ("query", "gallery"):
        assert [r["label"] for r in recs[s]] == [label_of[r["class_id"]] for r in recs[s]]


def test_cub_builder_class_split_and_grayscale(tmp_path):
    raw = tmp_path / "raw"
    rows = rf.write_cub(raw, classes=(1, 2, 101, 102, 103), per_class=3)["rows"]
    builder = _prepare("cub200", raw, tmp_path / "data")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6, "test": 9}
    assert builder.info.metadata["classes_per_split"] == {"train": 2, "test": 3}
    train, test = _records(builder, "train"), _records(builder, "test")
    assert [(r["image_id"], r["class_id"]) for r in train + test] == [(i, c) for i, c, _ in rows]
    assert [r["label"] for r in test] == [0] * 3 + [1] * 3 + [2] * 3  # classes 101..103 -> 0..2
    assert all(r["file"].startswith("images/") for r in train + test)
    gray = next(r for r in train if r["image_id"] == 2)  # written as a grayscale JPEG: stored RGB
    with Image.open(io.BytesIO(gray["image"])) as im:
        assert im.mode == "RGB"
        with Image.open(raw / "CUB_200_2011" / gray["file"]) as src:
            assert im.size == src.size and src.mode == "L"


def test_cars_builder_from_annos_mat(tmp_path):
    raw = tmp_path / "raw"
    rows = rf.write_cars(raw, classes=(1, 2, 99, 100), per_class=3)["rows"]
    builder = _prepare("cars196", raw, tmp_path / "data")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 6, "test": 6}
    train, test = _records(builder, "train"), _records(builder, "test")
    assert [(r["image_id"], r["class_id"], r["file"]) for r in train + test] == rows
    assert [r["label"] for r in test] == [0, 0, 0, 1, 1, 1]
    assert train[0]["class_name"] == "Make Model 1" and test[0]["class_name"] == "Make Model 99"


# ------------------------------------------------------------------ errors
def _replace_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_missing_list_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt not found"):
        retrieval.read_sop(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt not found"):
        retrieval.read_inshop(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="images.txt not found"):
        retrieval.read_cub(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="cars_annos.mat not found"):
        retrieval.read_cars(tmp_path / "empty")


def test_bad_lines_and_ids_name_file_and_line(tmp_path):
    rf.write_sop(tmp_path / "sop", train_classes=(1, 2), test_classes=(3,), per_class=2)
    ebay = tmp_path / "sop" / "Stanford_Online_Products" / "Ebay_test.txt"
    _replace_line(ebay, 3, "6 2 1 chair_final/100002_0.JPG")  # class 2 is a training class
    with pytest.raises(ValueError, match=r"Ebay_test.txt:3: class_id 2 is in both"):
        retrieval.read_sop(tmp_path / "sop")
    _replace_line(ebay, 2, "5 x 1 chair_final/100003_0.JPG")
    with pytest.raises(ValueError, match=r"Ebay_test.txt:2: class_id must be an integer, got 'x'"):
        retrieval.read_sop(tmp_path / "sop")

    rf.write_cub(tmp_path / "cub", classes=(1, 101), per_class=2)
    labels = tmp_path / "cub" / "CUB_200_2011" / "image_class_labels.txt"
    _replace_line(labels, 4, "4 201")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:4: class_id 201 out of range 1..200"):
        retrieval.read_cub(tmp_path / "cub")
    _replace_line(labels, 4, "9 101")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:4: image_id 9 is not in .*images.txt"):
        retrieval.read_cub(tmp_path / "cub")

    rf.write_inshop(tmp_path / "inshop")
    part = tmp_path / "inshop" / "list_eval_partition.txt"
    lines = part.read_text().splitlines()
    _replace_line(part, 5, lines[4].replace("train", "test"))
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:5: evaluation_status must be .* got 'test'"):
        retrieval.read_inshop(tmp_path / "inshop")
    _replace_line(part, 5, lines[4].replace("id_00000001", "id_00000007"))  # train item also in query
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:5: training item id_00000007"):
        retrieval.read_inshop(tmp_path / "inshop")
    _replace_line(part, 1, "99")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:1: declares 99 images but lists 18"):
        retrieval.read_inshop(tmp_path / "inshop")

    rf.write_cars(tmp_path / "cars", classes=(1, 197), per_class=1)
    with pytest.raises(ValueError, match=r"cars_annos.mat:annotation 2: class 197 out of range 1..196"):
        retrieval.read_cars(tmp_path / "cars")


def test_corrupt_or_missing_image_names_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    truth = rf.write_sop(raw, train_classes=(1, 2), test_classes=(3,), per_class=2)
    _, _, rel = truth["train"][1]  # listed on line 3 of Ebay_train.txt
    path = raw / "Stanford_Online_Products" / rel
    path.write_bytes(path.read_bytes()[:100])  # truncated JPEG
    with pytest.raises(ValueError, match=rf"corrupt or unreadable image .*{rel} \(listed at .*Ebay_train.txt:3\)"):
        _prepare("sop", raw, tmp_path / "data")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"image .*{rel} not found \(listed at .*Ebay_train.txt:3\)"):
        _prepare("sop", raw, tmp_path / "data2")


def test_registry_and_prepare_summary(tmp_path):
    from broadface_jax import prepare

    for short, tfds_name in (("sop", "sop_retrieval"), ("inshop", "inshop_retrieval"),
                             ("cub200", "cub200_retrieval"), ("cars196", "cars196_retrieval")):
        assert short in datasets.SHORT_NAMES and datasets.builder_class(tfds_name).name == tfds_name
        assert datasets.builder_class(short).name == tfds_name
    rf.write_cars(tmp_path / "raw", classes=(1, 99), per_class=2)
    builder = prepare.prepare("cars196", str(tmp_path / "raw"), str(tmp_path / "data"))
    text = prepare.summary(builder)
    assert "split train: 2 examples" in text and "split test: 2 examples" in text
    assert "classes per split: train 1, test 1" in text
    assert np.all([builder.info.splits[s].num_examples == 2 for s in ("train", "test")])
