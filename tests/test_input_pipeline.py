"""Tests for the tf.data training pipeline (broadface_jax.input_pipeline)."""

import itertools

import jax
import numpy as np
import pytest
from PIL import Image

from broadface_jax import input_pipeline as ip
from broadface_jax.datasets import synthetic
from configs.default import get_config

NUM_IDS, PER_ID = 5, 3  # the prepared image folder: 15 examples


def _smooth_image(rng, size=112) -> np.ndarray:
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _prepare_folder(raw, data_dir, bad_file=None):
    import tensorflow_datasets as tfds

    from broadface_jax import datasets
    rng = np.random.default_rng(0)
    for i in range(NUM_IDS):
        (raw / f"id{i}").mkdir(parents=True)
        for j in range(PER_ID):
            Image.fromarray(_smooth_image(rng)).save(raw / f"id{i}" / f"{j}.jpg", quality=95)
    if bad_file:
        good = (raw / "id0" / "0.jpg").read_bytes()
        (raw / "id0" / bad_file).write_bytes(good[:200])
    builder = datasets.get_builder("image_folder", str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
    return builder


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    _prepare_folder(root / "raw", root / "data")
    return root / "data"


def _tfds_config(data_dir, image_size=112):
    c = get_config()
    c.seed = 17
    c.per_device_batch_size = 1  # x 8 fake devices = 8 per batch
    c.image_size = image_size
    c.num_classes = NUM_IDS
    c.dataset.name = "tfds"
    c.dataset.tfds_name = "image_folder"
    c.dataset.data_dir = str(data_dir)
    c.dataset.split = "train"
    return c


def _synthetic_config():
    c = get_config()
    c.seed = 5
    c.per_device_batch_size = 1
    c.image_size = 32
    c.num_classes = 6
    c.dataset.name = "synthetic"
    c.dataset.synthetic.num_identities = 6
    c.dataset.synthetic.heldout_identities = 2
    c.dataset.synthetic.samples_per_identity = 3
    return c


def _reference(images_u8: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """float64 NumPy flip + normalise."""
    x = images_u8.astype(np.float64)
    x = np.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    return (x / 255.0 - 0.5) / 0.5


def test_synthetic_batches_match_reference_and_resume():
    c = _synthetic_config()
    b = 8
    assert jax.local_device_count() == 8
    batches = list(itertools.islice(ip.create_train_iterator(c), 5))
    stream = ip.IndexStream(18, b, c.seed, 0)
    spec = synthetic.spec_from_config(c)
    flips_seen = []
    for k, batch in enumerate(batches):
        assert batch["image"].shape == (b, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        images, labels = synthetic.training_examples(spec, stream.indices(k), c.seed)
        flips = stream.flips(k)
        flips_seen.extend(flips)
        np.testing.assert_array_equal(batch["label"], labels)
        np.testing.assert_allclose(batch["image"], _reference(images, flips), atol=1e-6)
    assert 0 < np.mean(flips_seen) < 1
    # Epochs: each of the first two runs of 18 positions shows every example once.
    labels = np.concatenate([bt["label"] for bt in batches])
    for e in range(2):
        np.testing.assert_array_equal(np.bincount(labels[18 * e:18 * (e + 1)], minlength=6), [3] * 6)
    resumed = list(itertools.islice(ip.create_train_iterator(c, start_step=3), 2))
    for got, want in zip(resumed, batches[3:]):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    c.dataset.random_flip = False
    unflipped = next(ip.create_train_iterator(c))
    images, _ = synthetic.training_examples(spec, stream.indices(0), c.seed)
    np.testing.assert_allclose(unflipped["image"], _reference(images, np.zeros(b, bool)), atol=1e-6)
    c.dataset.random_flip = True
    c.seed = 6
    other = next(ip.create_train_iterator(c))
    assert not np.array_equal(other["label"], batches[0]["label"]) or \
        not np.array_equal(other["image"], batches[0]["image"])


def test_tfds_batches_match_reference_and_resume(folder_data):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from broadface_jax import datasets
    c = _tfds_config(folder_data)
    it = ip.create_train_iterator(c)
    assert tf.config.get_visible_devices("GPU") == []
    batches = list(itertools.islice(it, 4))  # 32 positions over 15 examples: 3 epochs
    src = datasets.get_builder("image_folder", str(folder_data)).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})
    stream = ip.IndexStream(15, 8, c.seed, 0)
    for k, batch in enumerate(batches):
        rows = [src[int(i)] for i in stream.indices(k)]
        images = np.stack([tf.io.decode_jpeg(r["image"], channels=3).numpy() for r in rows])
        np.testing.assert_array_equal(batch["label"], [r["label"] for r in rows])
        np.testing.assert_allclose(batch["image"], _reference(images, stream.flips(k)), atol=1e-6)
        # Labels follow the folder names of the files.
        assert [int(r["file"].decode()[2]) for r in rows] == batch["label"].tolist()
    resumed = next(ip.create_train_iterator(c, start_step=2))
    np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
    np.testing.assert_array_equal(resumed["label"], batches[2]["label"])
    assert ip.num_train_examples(c) == 15
    assert ip.data_info(c).num_classes == NUM_IDS


def test_num_classes_from_the_data_sets_metadata(folder_data):
    """num_classes = 0 takes the metadata's count; another explicit value is an error."""
    from broadface_jax import config_check

    c = _tfds_config(folder_data)
    c.num_classes = 0
    assert not [p for p in config_check.problems(c) if "num_classes" in p]
    resolved = ip.resolve_num_classes(c)
    assert resolved.num_classes == NUM_IDS and c.num_classes == 0  # a copy; the caller's kept
    assert ip.resolve_num_classes(resolved) is resolved  # an equal explicit value passes
    c.num_classes = NUM_IDS + 2
    with pytest.raises(ValueError, match=rf"config.num_classes={NUM_IDS + 2} but data set "
                                         rf"image_folder \(.*\) split 'train' has {NUM_IDS} "
                                         "identities"):
        ip.resolve_num_classes(c)
    c.num_classes = 0  # the pipeline checks labels against the metadata's count
    assert next(ip.create_train_iterator(c))["label"].shape == (8,)
    s = _synthetic_config()
    s.num_classes = 0
    assert ip.resolve_num_classes(s).num_classes == 6  # synthetic: its training identities
    s.num_classes = 1
    assert [p for p in config_check.problems(s) if p.startswith("config.num_classes=1:")]


def _np_resize_half(images: np.ndarray) -> np.ndarray:
    """float64 2x downscale, antialiased bilinear: the triangle filter of support 4
    (weights 1/8, 3/8, 3/8, 1/8) along each axis, edges clamped."""
    x = images.astype(np.float64)
    w = np.array([1, 3, 3, 1], np.float64) / 8
    for axis in (1, 2):
        n = x.shape[axis]
        idx = np.clip(np.arange(0, n, 2)[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)
        x = np.tensordot(np.take(x, idx, axis=axis), w, axes=([axis + 1], [0]))
    return x


def test_tfds_resize_to_config_image_size(folder_data):
    """112x112 JPEGs to image_size 56: the whole face scaled down (not a crop), matched
    against a float64 antialiased-bilinear reference of the decoded source images."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from broadface_jax import datasets
    c = _tfds_config(folder_data, image_size=56)
    batch = next(ip.create_train_iterator(c))
    assert batch["image"].shape == (8, 56, 56, 3)
    src = datasets.get_builder("image_folder", str(folder_data)).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()})
    stream = ip.IndexStream(15, 8, c.seed, 0)
    rows = [src[int(i)] for i in stream.indices(0)]
    full = np.stack([tf.io.decode_jpeg(r["image"], channels=3).numpy() for r in rows])
    want = _np_resize_half(full)
    flips = stream.flips(0)
    want[flips] = want[flips][:, :, ::-1]
    np.testing.assert_array_equal(batch["label"], [r["label"] for r in rows])
    np.testing.assert_allclose(batch["image"], (want / 255.0 - 0.5) / 0.5, atol=2e-3)


def test_process_shards_are_disjoint(folder_data):
    c = _tfds_config(folder_data)
    files = []
    for p in range(2):
        src = ip._make_source(c, p, 2)
        assert src.num_examples == 7 and src.num_total == 15
        files.append({src.describe(i).split("file ")[1] for i in range(src.num_examples)})
    assert not files[0] & files[1]
    s = _synthetic_config()
    a, b = ip._make_source(s, 0, 2), ip._make_source(s, 1, 2)
    assert a.num_examples == b.num_examples == 9
    assert set(a.fetch(np.arange(9))[1]) == {0, 1, 2} and set(b.fetch(np.arange(9))[1]) == {3, 4, 5}


def test_index_stream_epochs_are_permutations():
    s = ip.IndexStream(10, 4, seed=1, process_index=0)
    pos = np.concatenate([s.indices(k) for k in range(5)])  # 20 positions = 2 epochs
    assert sorted(pos[:10]) == list(range(10)) and sorted(pos[10:]) == list(range(10))
    assert not np.array_equal(pos[:10], pos[10:])
    np.testing.assert_array_equal(ip.IndexStream(10, 4, 1, 0).indices(3), s.indices(3))
    assert not np.array_equal(ip.IndexStream(10, 4, 1, 1).indices(0), s.indices(0))


def test_label_out_of_range(folder_data):
    c = _tfds_config(folder_data)
    c.num_classes = 2
    with pytest.raises(ValueError, match=r"label [2-4] out of range \[0, 2\) in data set image_folder"):
        for _ in itertools.islice(ip.create_train_iterator(c), 4):
            pass
    with pytest.raises(ValueError, match=r"label -1 out of range \[0, 7\) in data set x"):
        ip.check_labels(np.array([0, 6, -1]), 7, "x")


def test_missing_or_unprepared_data_dir(tmp_path):
    c = _tfds_config(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ip.create_train_iterator(c)
    (tmp_path / "empty").mkdir()
    c = _tfds_config(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not prepared.*broadface_jax.prepare"):
        ip.create_train_iterator(c)
    c.dataset.name = "imagenet"
    with pytest.raises(ValueError, match="'tfds' or 'synthetic'"):
        ip.create_train_iterator(c)


def test_corrupt_jpeg_names_the_record(tmp_path, monkeypatch):
    from broadface_jax.datasets import common
    # Simulate a record corrupted after preparation: skip the builder's own check.
    monkeypatch.setattr(common, "face_jpeg", lambda data, where, size=112: data)
    _prepare_folder(tmp_path / "raw", tmp_path / "data", bad_file="zz_bad.jpg")
    c = _tfds_config(tmp_path / "data")
    c.num_classes = NUM_IDS
    with pytest.raises(ValueError, match=r"corrupt image in image_folder .*id0/zz_bad\.jpg"):
        for _ in itertools.islice(ip.create_train_iterator(c), 4):  # 32 positions > 16 records
            pass
