"""Tests for the RecordIO reader/writer and the TFDS face builders."""

import io
import os
import pathlib
import struct

import numpy as np
import pytest
from PIL import Image

from broadface_jax.datasets import recordio

MAGIC = struct.pack("<I", 0xCED7230A)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _smooth_image(rng, h: int, w: int) -> np.ndarray:
    """A random low-frequency image (JPEG keeps it nearly exactly)."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------ RecordIO
def test_write_record_byte_layout():
    """Bytes as dmlc writes them: a plain record, then one split at an embedded magic word."""
    f = io.BytesIO()
    recordio.write_record(f, b"abcde")
    expect = MAGIC + struct.pack("<I", 5) + b"abcde" + b"\0\0\0"
    assert f.getvalue() == expect
    f = io.BytesIO()
    recordio.write_record(f, b"wxyz" + MAGIC + b"12")
    expect = (MAGIC + struct.pack("<I", (1 << 29) | 4) + b"wxyz"
              + MAGIC + struct.pack("<I", (3 << 29) | 2) + b"12\0\0")
    assert f.getvalue() == expect
    # An unaligned magic word is just data.
    f = io.BytesIO()
    recordio.write_record(f, b"x" + MAGIC)
    assert f.getvalue()[:8] == MAGIC + struct.pack("<I", 5)


def test_records_round_trip_including_multi_part(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(int(rng.integers(0, 60))) for _ in range(20)]
    payloads += [MAGIC + b"ab" + MAGIC * 3 + b"cdef" + MAGIC, MAGIC, b"", MAGIC * 2]
    with recordio.IndexedRecordIOWriter(tmp_path / "t.rec") as w:
        for k, p in enumerate(payloads):
            w.write_idx(k, p)
    with recordio.IndexedRecordIO(tmp_path / "t.rec") as r:
        assert r.keys == list(range(len(payloads)))
        for k, p in enumerate(payloads):
            assert r.read_idx(k) == p
    assert [d for _, d in recordio.iter_records(tmp_path / "t.rec")] == payloads


def test_pack_unpack_matches_mxnet_layout():
    head, rest = recordio.unpack(recordio.pack(recordio.IRHeader(0, 7.0, 3, 0), b"img"))
    assert head == recordio.IRHeader(0, 7.0, 3, 0) and rest == b"img"
    packed = recordio.pack(recordio.IRHeader(0, [5.0, 9.5], 4, 1), b"xy")
    # 'IfQQ': flag = number of labels, label field 0, then the f32 labels, then data.
    assert packed[:24] == struct.pack("<IfQQ", 2, 0.0, 4, 1)
    assert packed[24:32] == np.array([5.0, 9.5], "<f4").tobytes() and packed[32:] == b"xy"
    head, rest = recordio.unpack(packed)
    assert head.flag == 2 and head.label.tolist() == [5.0, 9.5] and rest == b"xy"
    assert recordio.image_label(head, "x") == 5
    with pytest.raises(recordio.RecordIOError, match="not a non-negative integer"):
        recordio.image_label(recordio.IRHeader(0, 2.5, 0, 0), "rec 3")
    with pytest.raises(recordio.RecordIOError, match="shorter"):
        recordio.unpack(b"abc", "rec 9")


def _write_face_rec(root: pathlib.Path, labels, rng, header=True, array_labels=(), big_ids=()):
    """A small insightface-style train.rec/.idx: header, images, identity records."""
    root.mkdir(parents=True, exist_ok=True)
    images = {}
    num_ids = max(labels) + 1
    with recordio.IndexedRecordIOWriter(root / "train.rec", root / "train.idx") as w:
        n = len(labels)
        if header:
            w.write_idx(0, recordio.pack(recordio.IRHeader(0, [n + 1, n + 1 + num_ids], 0, 0), b""))
        for k, lbl in enumerate(labels, start=1 if header else 0):
            img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
            data = _jpeg(img)
            images[k] = data
            label = [float(lbl), 0.0] if k in array_labels else float(lbl)
            # id = the magic word puts it at an aligned offset: a multi-part record.
            rec_id = 0xCED7230A if k in big_ids else k
            w.write_idx(k, recordio.pack(recordio.IRHeader(0, label, rec_id, 0), data))
        if header:
            for c in range(num_ids):
                w.write_idx(n + 1 + c, recordio.pack(recordio.IRHeader(0, [1.0, 2.0], 0, 0), b""))
    return images


def test_face_record_layout_and_truncation(tmp_path):
    rng = np.random.default_rng(1)
    _write_face_rec(tmp_path, [0, 1, 1, 2], rng, big_ids={2})
    with recordio.IndexedRecordIO(tmp_path / "train.rec") as r:
        layout = recordio.face_record_layout(r)
        assert list(layout.image_keys) == [1, 2, 3, 4]
        assert list(layout.identity_keys) == [5, 6, 7]
        raw = open(tmp_path / "train.rec", "rb").read()
        assert raw[r.index[2] + 4:r.index[2] + 8] != struct.pack("<I", 0)
        assert (struct.unpack("<I", raw[r.index[2] + 4:r.index[2] + 8])[0] >> 29) == 1  # multi-part
    size = os.path.getsize(tmp_path / "train.rec")
    with recordio.IndexedRecordIO(tmp_path / "train.rec") as r:
        last_image = r.index[4]
    # Cut the file inside image record 4.
    with open(tmp_path / "train.rec", "r+b") as f:
        f.truncate(last_image + 100)
    with pytest.raises(recordio.RecordIOError, match="outside"):
        recordio.IndexedRecordIO(tmp_path / "train.rec")  # identity records now past the end
    with open(tmp_path / "train.rec", "rb") as f:
        with pytest.raises(recordio.RecordIOError, match=rf"train.rec.*truncated.*offset {last_image}"):
            recordio.read_record(f, last_image, tmp_path / "train.rec")
    assert size > last_image + 100


def test_corrupt_magic_names_file_and_offset(tmp_path):
    with recordio.IndexedRecordIOWriter(tmp_path / "c.rec") as w:
        w.write_idx(0, b"hello")
        w.write_idx(1, b"world!!!")
    data = bytearray(open(tmp_path / "c.rec", "rb").read())
    data[16] ^= 0xFF  # first byte of record 1's magic
    (tmp_path / "c.rec").write_bytes(bytes(data))
    with recordio.IndexedRecordIO(tmp_path / "c.rec") as r:
        assert r.read_idx(0) == b"hello"
        with pytest.raises(recordio.RecordIOError, match=r"c\.rec.*bad magic.*offset 16"):
            r.read_idx(1)


# ------------------------------------------------------------------ builders
def _prepare(name, manual_dir, data_dir, **kwargs):
    import tensorflow_datasets as tfds

    from broadface_jax import datasets
    builder = datasets.get_builder(name, str(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def _read_all(builder, split):
    import tensorflow_datasets as tfds
    src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def test_insightface_rec_builder(tmp_path):
    rng = np.random.default_rng(2)
    labels = [0, 0, 1, 2, 2, 2, 3]
    images = _write_face_rec(tmp_path / "raw", labels, rng, array_labels={3, 5}, big_ids={2, 6})
    builder = _prepare("insightface_rec", tmp_path / "raw", tmp_path / "data")
    assert builder.info.metadata["num_classes"] == 4
    rows = _read_all(builder, "train")
    assert len(rows) == len(labels)
    by_file = {r["file"].decode(): r for r in rows}
    for k, lbl in enumerate(labels, start=1):
        row = by_file[f"train.rec#{k}"]
        assert row["label"] == lbl
        assert row["image"] == images[k]  # 112x112 JPEG kept byte for byte


def test_insightface_rec_without_header_and_truncated(tmp_path):
    rng = np.random.default_rng(3)
    _write_face_rec(tmp_path / "raw", [1, 0, 2], rng, header=False)
    (tmp_path / "raw" / "property").write_text("5,112,112")
    builder = _prepare("insightface_rec", tmp_path / "raw", tmp_path / "data")
    assert builder.info.metadata["num_classes"] == 5
    assert sorted(r["label"] for r in _read_all(builder, "train")) == [0, 1, 2]
    # Truncated inside the last record: the error names the file and the record's offset.
    with recordio.IndexedRecordIO(tmp_path / "raw" / "train.rec") as r:
        last = r.index[2]
    with open(tmp_path / "raw" / "train.rec", "r+b") as f:
        f.truncate(last + 50)
    with pytest.raises(recordio.RecordIOError, match=rf"train\.rec.*truncated.*offset {last}"):
        _prepare("insightface_rec", tmp_path / "raw", tmp_path / "data2")


def test_insightface_rec_missing_files(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "README").write_text("no record files here")
    with pytest.raises(FileNotFoundError, match="train.rec"):
        _prepare("insightface_rec", tmp_path / "raw", tmp_path / "data")


def test_image_folder_builder(tmp_path):
    rng = np.random.default_rng(4)
    raw = tmp_path / "faces"
    originals = {}
    for name, shapes in {"bob": [(112, 112), (90, 100)], "alice": [(112, 112)], "carol": [(128, 128)]}.items():
        (raw / name).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            img = _smooth_image(rng, h, w)
            suffix = ".png" if (h, w) != (112, 112) else ".jpg"
            path = raw / name / f"{i}{suffix}"
            Image.fromarray(img).save(path)
            originals[f"{name}/{i}{suffix}"] = img
    (raw / "empty").mkdir()
    (raw / "notes.txt").write_text("not an identity")
    builder = _prepare("image_folder", raw, tmp_path / "data")
    assert builder.name == "face_image_folder"
    assert builder.info.metadata["num_classes"] == 3
    rows = {r["file"].decode(): r for r in _read_all(builder, "train")}
    assert set(rows) == set(originals)
    for rel, img in originals.items():
        name = rel.split("/")[0]
        assert rows[rel]["label"] == {"alice": 0, "bob": 1, "carol": 2}[name]
        assert rows[rel]["identity"].decode() == name
        got = _decode(rows[rel]["image"]).astype(np.float64)
        assert got.shape == (112, 112, 3)
        ref = np.asarray(Image.fromarray(img).resize((112, 112), Image.Resampling.BILINEAR), np.float64)
        assert np.abs(got - ref).mean() < 2.5
        other = np.asarray(Image.fromarray(originals["alice/0.jpg"]).resize((112, 112)), np.float64)
        if rel != "alice/0.jpg":
            assert np.abs(got - other).mean() > 20


def _damaged_jpegs(rng) -> dict[str, bytes]:
    """A good 112x112 JPEG and three broken ones made from it, by how they are broken."""
    textured = np.clip(np.cumsum(rng.normal(0, 8, (112, 112, 3)), axis=1) + 128, 0, 255)
    good = _jpeg(textured.astype(np.uint8))
    scan = good.find(b"\xff\xda")  # start of scan: the entropy-coded image data follows
    # Valid header, the second half of the scan data lost, the end marker kept (a failed
    # download or a bad sector); PIL decodes it without a word (libjpeg only warns and
    # fills the rest with grey):
    damaged = good[: (scan + len(good)) // 2] + b"\xff\xd9"
    with Image.open(io.BytesIO(bytes(damaged))) as im:
        im.load()
    return {"good": good, "scan_damaged": bytes(damaged), "truncated": good[: len(good) // 2],
            "not_an_image": b"<html>403 Forbidden</html>"}


def test_face_jpeg_decodes_every_image_in_full():
    from broadface_jax.datasets import common

    images = _damaged_jpegs(np.random.default_rng(21))
    assert common.face_jpeg(images["good"], "good.jpg") == images["good"]  # kept byte for byte
    for name, reason in (("scan_damaged", "damaged JPEG data (Corrupt JPEG data"),
                         ("truncated", "image file is truncated"),
                         ("not_an_image", "not an image (PIL cannot identify it)")):
        with pytest.raises(common.BadImageError) as info:
            common.face_jpeg(images[name], f"faces/{name}.jpg")
        text = str(info.value)
        assert text.startswith(f"faces/{name}.jpg: ") and reason in text, text
        assert "BytesIO" not in text and "\n" not in text


def _bad_image_folder(root: pathlib.Path, rng) -> dict[str, bytes]:
    images = _damaged_jpegs(rng)
    files = {"a/0.jpg": _jpeg(_smooth_image(rng, 112, 112)), "a/1_scan.jpg": images["scan_damaged"],
             "b/0.jpg": _jpeg(_smooth_image(rng, 112, 112)), "b/1_cut.jpg": images["truncated"],
             "b/2.jpg": _jpeg(_smooth_image(rng, 112, 112)), "c/0_html.jpg": images["not_an_image"],
             "c/1.jpg": _jpeg(_smooth_image(rng, 112, 112))}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_image_folder_skips_and_lists_bad_images(tmp_path):
    from broadface_jax import datasets, prepare

    files = _bad_image_folder(tmp_path / "faces", np.random.default_rng(22))
    builder = prepare.prepare("image_folder", str(tmp_path / "faces"), str(tmp_path / "data"))
    rows = {r["file"].decode(): r for r in _read_all(builder, "train")}
    assert sorted(rows) == ["a/0.jpg", "b/0.jpg", "b/2.jpg", "c/1.jpg"]
    for rel, row in rows.items():
        assert row["image"] == files[rel]  # good 112x112 JPEGs are kept byte for byte
    listed = (pathlib.Path(builder.data_dir) / prepare.SKIPPED_FILE).read_text().splitlines()
    assert [line.split("\t")[:2] for line in listed] == [
        ["bad_images", "a/1_scan.jpg"], ["bad_images", "b/1_cut.jpg"],
        ["bad_images", "c/0_html.jpg"]]
    assert "damaged JPEG data" in listed[0] and "truncated" in listed[1]
    assert "not an image" in listed[2]
    # The list is in the data set's info on disk too, and the summary counts it.
    again = datasets.get_builder("image_folder", str(tmp_path / "data"))
    assert [x.split("\t")[0] for x in again.info.metadata["skipped"]["bad_images"]] == [
        "a/1_scan.jpg", "b/1_cut.jpg", "c/0_html.jpg"]
    text = prepare.summary(again)
    assert "skipped (bad images): 3: a/1_scan.jpg, b/1_cut.jpg, c/0_html.jpg" in text
    assert f"skipped files listed in {again.data_dir}/skipped.txt" in text


def test_image_folder_strict_stops_at_the_first_bad_image(tmp_path):
    from broadface_jax import prepare
    from broadface_jax.datasets import common, image_folder

    _bad_image_folder(tmp_path / "faces", np.random.default_rng(23))
    with pytest.raises(common.BadImageError, match=r"faces/a/1_scan\.jpg: damaged JPEG data"):
        prepare.prepare("image_folder", str(tmp_path / "faces"), str(tmp_path / "data"),
                        strict=True)
    with pytest.raises(ValueError, match="--strict applies to --dataset image_folder"):
        prepare.prepare("cfp", str(tmp_path / "faces"), str(tmp_path / "data"), strict=True)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder.list_identities(tmp_path / "nowhere")


@pytest.mark.slow
def test_prepare_command_bad_images_one_line_with_strict_else_a_count(tmp_path):
    import subprocess
    import sys

    _bad_image_folder(tmp_path / "faces", np.random.default_rng(24))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "broadface_jax.prepare", "--dataset", "image_folder",
               "--manual_dir", str(tmp_path / "faces")]
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([*command, "--data_dir", str(tmp_path / "strict"), "--strict"], cwd=repo,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "BytesIO" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith("broadface_jax: ")]
    assert len(lines) == 1 and "faces/a/1_scan.jpg: damaged JPEG data" in lines[0], out.stderr
    out = subprocess.run([*command, "--data_dir", str(tmp_path / "data")], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "split train: 4 examples" in out.stdout
    assert "skipped (bad images): 3: a/1_scan.jpg, b/1_cut.jpg, c/0_html.jpg" in out.stdout


def test_lfw_dev_train_counts(shared_data):
    from broadface_jax.datasets import lfw
    lfw_root = shared_data / "lfw"
    people = lfw.read_people_file(lfw_root / "peopleDevTrain.txt")
    assert len(people) == 4038
    two = {n: k for n, k in people.items() if k >= 2}
    cfp = lfw.read_cfp_names(shared_data / "cfp" / "cfp-dataset" / "Data" / "list_name.txt")
    assert len(cfp) == 500
    assert (len(two), sum(two.values())) == (1184, 6671)
    assert len(set(two) & cfp) == 91
    split = lfw.dev_train_people(lfw_root)  # default CFP list location: ../cfp/...
    assert len(split) == 1093
    assert [n for n, _ in split] == sorted(set(two) - cfp)
    test_people = lfw.read_people_file(lfw_root / "peopleDevTest.txt")
    assert not set(test_people) & {n for n, _ in split}


def test_lfw_builder_on_a_subset(tmp_path, shared_data):
    from broadface_jax import align
    from broadface_jax.datasets import lfw
    src = shared_data / "lfw"
    people = lfw.read_people_file(src / "peopleDevTrain.txt")
    cfp = lfw.read_cfp_names(shared_data / "cfp" / "cfp-dataset" / "Data" / "list_name.txt")
    many = sorted(n for n, k in people.items() if 2 <= k <= 3 and n not in cfp)[:3]
    in_cfp = sorted(n for n, k in people.items() if 2 <= k <= 3 and n in cfp)[:1]
    single = sorted(n for n, k in people.items() if k == 1)[:1]
    chosen = many + in_cfp + single
    manual = tmp_path / "lfw"
    (manual / "images_deepfunneled").mkdir(parents=True)
    for n in chosen:
        os.symlink(src / "images_deepfunneled" / n, manual / "images_deepfunneled" / n)
    (manual / "peopleDevTrain.txt").write_text(
        f"{len(chosen)}\n" + "".join(f"{n}\t{people[n]}\n" for n in chosen))
    names = tmp_path / "cfp" / "cfp-dataset" / "Data" / "list_name.txt"
    names.parent.mkdir(parents=True)
    names.write_text("".join(n.replace("_", " ") + "\n" for n in in_cfp))
    builder = _prepare("lfw", manual, tmp_path / "data")
    assert builder.info.metadata["num_classes"] == 3
    rows = _read_all(builder, "dev_train")
    assert len(rows) == sum(people[n] for n in many)
    for r in rows:
        name = r["identity"].decode()
        assert r["label"] == many.index(name)
        face = align.lfw_center_crop(align.read_rgb(src / r["file"].decode()))
        assert np.abs(_decode(r["image"]).astype(float) - face).mean() < 3.0


def test_cfp_builder_on_a_fake_tree(tmp_path, shared_data):
    from broadface_jax import align
    src = shared_data / "cfp" / "cfp-dataset"
    root = tmp_path / "cfp" / "cfp-dataset"
    for pid in ("001", "002"):
        for view, n in (("frontal", "01"), ("frontal", "02"), ("profile", "01")):
            for kind, ext in (("Images", ".jpg"), ("Fiducials", ".txt")):
                d = root / "Data" / kind / pid / view
                d.mkdir(parents=True, exist_ok=True)
                os.symlink(src / "Data" / kind / pid / view / (n + ext), d / (n + ext))
    names = (src / "Data" / "list_name.txt").read_text().splitlines()[:2]
    (root / "Data" / "list_name.txt").write_text("\n".join(names) + "\n")
    builder = _prepare("cfp", tmp_path / "cfp", tmp_path / "data")
    assert builder.info.metadata["num_classes"] == 2
    assert builder.info.splits["frontal"].num_examples == 4
    assert builder.info.splits["profile"].num_examples == 2
    for r in _read_all(builder, "profile") + _read_all(builder, "frontal"):
        rel = r["file"].decode()
        assert r["label"] == int(rel.split("/")[2]) - 1
        assert r["identity"].decode() == names[r["label"]].strip()
        ref = align.align_cfp_image(src, rel).astype(float)
        assert np.abs(_decode(r["image"]).astype(float) - ref).mean() < 3.0


def test_prepare_function_and_summary(tmp_path):
    from broadface_jax import prepare
    raw = tmp_path / "faces"
    rng = np.random.default_rng(5)
    for name in ("x", "y"):
        (raw / name).mkdir(parents=True)
        Image.fromarray(_smooth_image(rng, 112, 112)).save(raw / name / "0.jpg")
    builder = prepare.prepare("image_folder", str(raw), str(tmp_path / "data"))
    text = prepare.summary(builder)
    assert "split train: 2 examples" in text and "identities (num_classes): 2" in text
    assert builder.info.file_format.value == "array_record"
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        prepare.prepare("image_folder", str(tmp_path / "missing_dir"), str(tmp_path / "data"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        prepare.prepare("lfw", str(tmp_path / "empty"), str(tmp_path / "data"))
    with pytest.raises(ValueError, match="only applies to --dataset lfw"):
        prepare.prepare("cfp", str(raw), str(tmp_path / "data"), cfp_names_file="x.txt")
