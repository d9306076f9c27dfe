"""Data preparation as an Apache Beam pipeline (broadface_jax.datasets.beam_split, prepare --beam_*).

The Beam tests need apache-beam (the `beam` extra; `make test`'s `test` extra
installs it too); without it they are skipped with that reason. The flag checks and the
missing-extra error run either way.
"""

import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from broadface_jax import prepare
from broadface_jax.datasets import beam_split, common, recordio
from tests.test_datasets import _jpeg
from tests.test_datasets import _smooth_image as _smooth

try:
    import apache_beam  # noqa: F401
    HAVE_BEAM = True
except ImportError:
    HAVE_BEAM = False
needs_beam = pytest.mark.skipif(not HAVE_BEAM, reason="apache-beam not installed: the optional `beam` "
                                "extra (pip install -e '.[beam]'; `make test` installs it)")

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_IDS = 9



def _write_rec(root: pathlib.Path, n: int, rng, bad_keys=(), corrupt_key=None) -> dict[int, int]:
    """A .rec of n images in NUM_IDS identities with oddities; {key: label} of the image records.

    Oddities: header and identity records; every 50th image not 112x112 (resized,
    re-encoded); every 37th with an array label; every 41st split in parts (id =
    the magic word); ``bad_keys`` damaged JPEG scan data (skipped and listed);
    ``corrupt_key``: that record's magic word overwritten (the .rec is corrupt there).
    """
    root.mkdir(parents=True, exist_ok=True)
    labels = np.sort(rng.integers(0, NUM_IDS, n))
    labels[:min(n, NUM_IDS)] = np.arange(min(n, NUM_IDS))  # every identity has an image
    labels = np.sort(labels)
    images, ids = [], []
    for key, label in enumerate(labels, start=1):
        size = (112, 112) if key % 50 else (96, 128)
        data = _jpeg(_smooth(rng, *size))
        if key in bad_keys:
            scan = data.find(b"\xff\xda")
            data = data[: (scan + len(data)) // 2] + b"\xff\xd9"
        images.append(([float(label), 0.0] if key % 37 == 0 else float(label), data))
        ids.append(recordio.MAGIC if key % 41 == 0 else key)
    recordio.write_face_rec(root / "train.rec", root / "train.idx", images, ids=ids)
    if corrupt_key is not None:
        offset = recordio.read_index(root / "train.idx")[corrupt_key]
        with open(root / "train.rec", "r+b") as f:
            f.seek(offset)
            f.write(b"\0\0\0\0")
    return {k: int(lbl) for k, lbl in enumerate(labels, start=1)}


def _rows(builder):
    import tensorflow_datasets as tfds
    src = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


# ------------------------------------------------------------------ flags (no Beam needed)
def test_beam_option_errors_name_the_flag():
    for kwargs, message in (
            (dict(pipeline_options="runner=DirectRunner,oops"), "expected key=value pairs.*'oops'"),
            (dict(runner="DirectRunner", pipeline_options="runner=DataflowRunner"),
             "--beam_runner=DirectRunner but --beam_pipeline_options has runner=DataflowRunner"),
            (dict(runner="DataflowRunner", workers=4), "--beam_workers applies to --beam_runner=DirectRunner"),
            (dict(runner="DirectRunner", workers=0), "--beam_workers must be >= 1, got 0"),
            (dict(pipeline_options="project=p"), "without runner=")):
        with pytest.raises(ValueError, match=message):
            prepare.beam_options(**kwargs)
    assert prepare.beam_options() is None


@needs_beam
def test_beam_options_for_direct_runner_workers():
    runner, options = prepare.beam_options("DirectRunner", 3, "direct_running_mode=multi_processing")
    opts = options.get_all_options()
    assert runner == "DirectRunner" and opts["runner"] == "DirectRunner"
    assert opts["direct_num_workers"] == 3 and opts["direct_running_mode"] == "multi_processing"
    assert opts["default_sdk_harness_log_level"] == "CRITICAL"
    _, options = prepare.beam_options("DirectRunner", 1, "default_sdk_harness_log_level=INFO")
    opts = options.get_all_options()
    assert opts["direct_running_mode"] == "in_memory" and opts["default_sdk_harness_log_level"] == "INFO"
    runner, options = prepare.beam_options(
        pipeline_options="runner=DataflowRunner,project=p,region=europe-west4,temp_location=gs://b/t")
    opts = options.get_all_options()
    assert runner == "DataflowRunner" and opts["project"] == "p" and opts["temp_location"] == "gs://b/t"


def test_missing_beam_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` raises ImportError
    with pytest.raises(beam_split.BeamMissingError, match=r"pip install -e '\.\[beam\]'"):
        prepare.beam_options("DirectRunner", 2)
    _write_rec(tmp_path / "raw", 3, np.random.default_rng(1))
    with pytest.raises(beam_split.BeamMissingError, match=r"\.\[beam\]"):
        prepare.prepare("insightface_rec", str(tmp_path / "raw"), str(tmp_path / "data"),
                        beam_runner="DirectRunner")
    assert not (tmp_path / "data").exists()


def test_ranges_cover_the_list_in_order():
    items = list(range(7, 30))
    for size in (1, 5, 23, 100):
        parts = beam_split.ranges(items, size)
        assert [s for s, _ in parts] == list(range(0, len(items), size))
        assert list(itertools.chain.from_iterable(p for _, p in parts)) == items
    assert beam_split.ranges(range(1, 11), 4) == [(0, range(1, 5)), (4, range(5, 9)), (8, range(9, 11))]


def test_worker_error_is_found_in_a_runner_traceback():
    inner = beam_split.WorkerError(beam_split._worker_error_text(
        recordio.RecordIOError("/d/train.rec: corrupt RecordIO file: bad magic 0x0 at offset 96")))
    wrapped = RuntimeError(f"Traceback (most recent call last):\n  File ...\n{inner} "
                           "[while running 'train/ReadCheckEncode']")
    found = beam_split.worker_error(wrapped)
    assert type(found) is recordio.RecordIOError
    assert str(found) == "/d/train.rec: corrupt RecordIO file: bad magic 0x0 at offset 96"
    try:
        raise RuntimeError("pipeline failed") from inner
    except RuntimeError as e:
        assert type(beam_split.worker_error(e)) is recordio.RecordIOError
    assert beam_split.worker_error(RuntimeError("something else")) is None


def test_beam_flags_refused_for_builders_without_ranges(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "x").write_text("x")
    with pytest.raises(ValueError, match="apply to --dataset insightface_rec, image_folder, sop"):
        prepare.prepare("cfp", str(tmp_path / "raw"), str(tmp_path / "data"), beam_runner="DirectRunner")


# ------------------------------------------------------------------ Beam == one process
def _prepare_both(raw, tmp_path, dataset, monkeypatch, workers, **kwargs):
    monkeypatch.setattr(beam_split.BeamSplitMixin, "BEAM_RANGE_SIZE", 300)
    single = prepare.prepare(dataset, str(raw), str(tmp_path / "single"), **kwargs)
    beam = prepare.prepare(dataset, str(raw), str(tmp_path / "beam"), beam_runner="DirectRunner",
                           beam_workers=workers, **kwargs)
    return single, beam


def _check_equal(single, beam):
    a, b = _rows(single), _rows(beam)
    assert len(a) == len(b) > 0
    assert {(r["file"], int(r["label"]), r["image"]) for r in a} == \
        {(r["file"], int(r["label"]), r["image"]) for r in b}
    # TFDS orders examples by a hash of the key: the same order, so the same random access.
    assert [r["file"] for r in a] == [r["file"] for r in b]
    assert dict(single.info.metadata) == dict(beam.info.metadata)
    assert single.info.splits["train"].num_examples == beam.info.splits["train"].num_examples


@needs_beam
def test_direct_runner_in_process_equals_single_process(tmp_path, monkeypatch):
    labels = _write_rec(tmp_path / "raw", 1200, np.random.default_rng(2), bad_keys={5, 777})
    single, beam = _prepare_both(tmp_path / "raw", tmp_path, "insightface_rec", monkeypatch, 1)
    _check_equal(single, beam)
    rows = {r["file"].decode(): r for r in _rows(beam)}
    assert len(rows) == 1198 and "train.rec#5" not in rows and "train.rec#777" not in rows
    assert all(int(rows[f"train.rec#{k}"]["label"]) == lbl for k, lbl in labels.items() if k not in (5, 777))
    assert beam.info.metadata["num_classes"] == NUM_IDS
    skipped = beam.info.metadata["skipped"]["bad_images"]
    assert [s.split("\t")[0] for s in skipped] == ["train.rec#5", "train.rec#777"]
    assert "damaged JPEG data" in skipped[0]
    listed = (pathlib.Path(beam.data_dir) / prepare.SKIPPED_FILE).read_text()
    assert listed == (pathlib.Path(single.data_dir) / prepare.SKIPPED_FILE).read_text()
    assert not list(pathlib.Path(beam.data_dir).glob("*.skipped.json"))


@needs_beam
def test_direct_runner_image_folder_and_retrieval_equal_single_process(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from tests import retrieval_fixtures

    rng = np.random.default_rng(3)
    for i in range(4):
        for j in range(3 + i):
            path = tmp_path / "faces" / f"id{i}" / f"{j}.{'png' if j == 1 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_smooth(rng, 112 if j else 90, 112)).save(path)
    (tmp_path / "faces" / "id2" / "bad.jpg").write_bytes(b"<html>403</html>")
    single, beam = _prepare_both(tmp_path / "faces", tmp_path / "f", "image_folder", monkeypatch, 1)
    _check_equal(single, beam)
    assert beam.info.metadata["skipped"]["bad_images"][0].startswith("id2/bad.jpg\t")
    # A retrieval set: three splits, labels shared by query and gallery; ranges of 4 images.
    monkeypatch.setattr(beam_split.BeamSplitMixin, "BEAM_RANGE_SIZE", 4)
    retrieval_fixtures.write_inshop(tmp_path / "inshop", seed=3)
    single = prepare.prepare("inshop", str(tmp_path / "inshop"), str(tmp_path / "i1"))
    beam = prepare.prepare("inshop", str(tmp_path / "inshop"), str(tmp_path / "i2"), beam_runner="DirectRunner")
    assert dict(single.info.metadata) == dict(beam.info.metadata)
    for split in ("train", "query", "gallery"):
        a, b = (b_.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
                for b_ in (single, beam))
        assert len(a) == len(b) > 0
        assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))], split


@needs_beam
def test_beam_worker_errors_one_line_and_nothing_prepared(tmp_path, monkeypatch):
    monkeypatch.setattr(beam_split.BeamSplitMixin, "BEAM_RANGE_SIZE", 100)  # 7 ranges, error in the 7th
    _write_rec(tmp_path / "raw", 700, np.random.default_rng(4), corrupt_key=650)
    offset = recordio.read_index(tmp_path / "raw" / "train.idx")[650]
    with pytest.raises(recordio.RecordIOError) as info:
        prepare.prepare("insightface_rec", str(tmp_path / "raw"), str(tmp_path / "data"),
                        beam_runner="DirectRunner")
    assert str(info.value) == (f"{tmp_path / 'raw' / 'train.rec'}: corrupt RecordIO file: bad magic "
                               f"0x00000000 at offset {offset} (expected 0xced7230a)")
    # The pipeline failed after other ranges were read: nothing prepared, nothing left over.
    assert not (tmp_path / "data" / "insightface_rec" / "1.0.0").exists()
    assert list((tmp_path / "data" / "insightface_rec").glob("*")) == []
    _write_rec(tmp_path / "raw2", 700, np.random.default_rng(5), bad_keys={640})
    with pytest.raises(common.BadImageError, match=r"train\.rec record 640 \(offset \d+\): damaged JPEG"):
        prepare.prepare("insightface_rec", str(tmp_path / "raw2"), str(tmp_path / "data"),
                        beam_runner="DirectRunner", strict=True)
    assert list((tmp_path / "data" / "insightface_rec").glob("*")) == []


@needs_beam
@pytest.mark.slow
def test_two_workers_equal_single_process_and_same_training_batches(tmp_path, monkeypatch):
    from broadface_jax import input_pipeline as ip
    from configs.default import get_config

    _write_rec(tmp_path / "raw", 2500, np.random.default_rng(6), bad_keys={1000})
    single, beam = _prepare_both(tmp_path / "raw", tmp_path, "insightface_rec", monkeypatch, 2)
    _check_equal(single, beam)
    batches = []
    for name in ("single", "beam"):
        c = get_config()
        c.seed, c.per_device_batch_size, c.image_size, c.num_classes = 11, 4, 112, 0
        c.dataset.name, c.dataset.tfds_name = "tfds", "insightface_rec"
        c.dataset.data_dir, c.dataset.split = str(tmp_path / name), "train"
        it = ip.create_train_iterator(c)
        batches.append(list(itertools.islice(it, 3)))
        it.close()
    for a, b in zip(*batches):
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])


@needs_beam
@pytest.mark.slow
def test_prepare_command_two_workers_worker_error_is_one_line(tmp_path):
    _write_rec(tmp_path / "raw", 900, np.random.default_rng(7), corrupt_key=800)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "broadface_jax.prepare", "--dataset", "insightface_rec",
                          "--manual_dir", str(tmp_path / "raw"), "--data_dir", str(tmp_path / "data"),
                          "--beam_runner=DirectRunner", "--beam_workers=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.startswith("broadface_jax: ")]
    assert len(lines) == 1 and "train.rec: corrupt RecordIO file: bad magic" in lines[0], out.stderr[-3000:]
    assert "worker error" not in lines[0]
    assert list((tmp_path / "data" / "insightface_rec").glob("*")) == []
