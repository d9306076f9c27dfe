"""The retrieval input pipeline: random resized crop + flip for training, resize + centre crop for evaluation.

Crop windows and flips must stay within the configured ranges and be a pure
function of (seed, step); batches must equal a float64 NumPy reference
(antialiased bilinear resize written out as a triangle filter, crop, flip,
ImageNet mean/std) computed from the same decoded images; the evaluation
crop must be deterministic and match the reference too. Seed: 0 (fixed).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from broadface_jax import datasets, input_pipeline
from configs.default import get_config
from tests import retrieval_fixtures as rf

SEED = 0
FRAME, SIZE = 40, 32


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Rows of the antialiased bilinear (triangle) filter, pixel centres at i + 0.5."""
    inv = n_in / n_out
    support = max(inv, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in) + 0.5 - (i + 0.5) * inv) / support)
        m[i] = w / w.sum()
    return m


def np_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.einsum("ai,ijc,bj->abc", resize_matrix(img.shape[0], h), img.astype(np.float64),
                     resize_matrix(img.shape[1], w))


def np_train_view(img, window, flip, frame=FRAME, size=SIZE):
    top, left, h, w = window
    x = np_resize(img, frame, frame)[top:top + h, left:left + w]
    x = np_resize(x, size, size)
    if flip:
        x = x[:, ::-1]
    mean = np.array(input_pipeline.IMAGENET_MEAN)
    std = np.array(input_pipeline.IMAGENET_STD)
    return (x / 255.0 - mean) / std


def _config(data_dir):
    c = get_config()
    c.seed = SEED
    c.dataset.tfds_name = "sop"
    c.dataset.data_dir = str(data_dir)
    c.dataset.augment = "retrieval"
    c.dataset.normalize = "imagenet"
    c.dataset.resize_to = FRAME
    c.image_size = SIZE
    c.per_device_batch_size = 1  # 8 fake devices: 8 images per batch
    c.num_classes = 3
    return c


@pytest.fixture(scope="module")
def sop_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sop")
    rf.write_sop(root / "raw", seed=SEED, train_classes=(1, 2, 3), test_classes=(4,), per_class=3)
    builder = datasets.get_builder("sop", str(root / "data"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root / "raw")))
    return root / "data"


def test_crop_windows_and_flips_within_ranges():
    scale, ratio = (0.16, 1.0), (0.75, 1.33)
    stream = input_pipeline.IndexStream(100, 64, SEED, 0)
    windows = np.concatenate([stream.crops(k, 256, scale, ratio) for k in range(10)])
    top, left, h, w = windows.T
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 256) and np.all(left + w <= 256)
    area = h * w / 256**2
    # rounding w and h to whole pixels moves the area and the ratio by at most ~1 px per side
    assert area.min() >= scale[0] - 0.002 and area.max() <= 1.0  # 0.5 px per side: <= 0.0016
    aspect = w / h
    tol = 1.0 / np.minimum(h, w)
    assert np.all(aspect >= ratio[0] * (1 - tol) - 1e-9) and np.all(aspect <= ratio[1] * (1 + tol) + 1e-9)
    assert area.min() < 0.25 and area.max() > 0.9  # the whole range is used
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    # a pure function of (seed, process, step); other steps and seeds differ
    np.testing.assert_array_equal(stream.crops(3, 256, scale, ratio),
                                  input_pipeline.IndexStream(100, 64, SEED, 0).crops(3, 256, scale, ratio))
    assert not np.array_equal(stream.crops(3, 256, scale, ratio), stream.crops(4, 256, scale, ratio))
    assert not np.array_equal(stream.crops(3, 256, scale, ratio),
                              input_pipeline.IndexStream(100, 64, SEED + 1, 0).crops(3, 256, scale, ratio))
    flips = np.concatenate([stream.flips(k) for k in range(10)])
    assert 0.4 < flips.mean() < 0.6


def test_crop_window_fallback_is_a_centre_crop():
    # no window of area >= 0.9 with aspect 1 fits a 10 x 100 image: centre crop, aspect clamped to 1
    rng = np.random.default_rng(SEED)
    assert input_pipeline.random_resized_crop_window(rng, 10, 100, (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)
    assert input_pipeline.random_resized_crop_window(rng, 100, 10, (0.9, 1.0), (2.0, 3.0)) == (47, 0, 5, 10)


def test_train_batches_match_numpy_reference_and_resume(sop_data):
    config = _config(sop_data)
    it = input_pipeline.create_train_iterator(config)
    batches = [next(it) for _ in range(3)]
    it.close()

    builder = datasets.get_builder("sop", str(sop_data))
    shard = tfds.even_splits("train", n=1, drop_remainder=True)[0]
    src = builder.as_data_source(shard, decoders={"image": tfds.decode.SkipDecoding()})
    stream = input_pipeline.IndexStream(len(src), 8, SEED, 0)
    for k, batch in enumerate(batches):
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        windows = stream.crops(k, FRAME, (0.16, 1.0), (0.75, 1.33))
        for j, (index, flip, window) in enumerate(zip(stream.indices(k), stream.flips(k), windows)):
            record = src[int(index)]
            img = tf.io.decode_jpeg(record["image"], channels=3).numpy()
            ref = np_train_view(img, window, flip)
            np.testing.assert_allclose(batch["image"][j], ref, atol=2e-4, err_msg=f"batch {k} image {j}")
            assert batch["label"][j] == record["label"]

    config_resumed = _config(sop_data)
    it = input_pipeline.create_train_iterator(config_resumed, start_step=2)
    resumed = next(it)
    it.close()
    np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
    np.testing.assert_array_equal(resumed["label"], batches[2]["label"])


def test_eval_crop_is_deterministic_and_matches_reference():
    rng = np.random.default_rng(SEED)
    square = rng.integers(0, 256, (FRAME, FRAME, 3)).astype(np.uint8)
    out = input_pipeline.retrieval_eval_image(tf.constant(square), FRAME, SIZE).numpy()
    np.testing.assert_array_equal(out, square[4:36, 4:36].astype(np.float32))  # no resize, centre crop
    odd = rng.integers(0, 256, (50, 37, 3)).astype(np.uint8)
    a = input_pipeline.retrieval_eval_image(tf.constant(odd), FRAME, SIZE).numpy()
    b = input_pipeline.retrieval_eval_image(tf.constant(odd), FRAME, SIZE).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, np_resize(odd, FRAME, FRAME)[4:36, 4:36], atol=1e-3)  # f32 on 0..255
    # torchvision's 256 -> 224 offset: 16
    big = input_pipeline.retrieval_eval_image(tf.zeros((300, 200, 3), tf.uint8), 256, 224)
    assert big.shape == (224, 224, 3)


def test_normalisations():
    rng = np.random.default_rng(SEED)
    x = rng.uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    c = get_config()
    assert c.dataset.augment == "face" and c.dataset.normalize == "face"  # defaults keep the face pipeline
    np.testing.assert_array_equal(input_pipeline.normalize_images(x, c), (x / 255.0 - 0.5) / 0.5)
    c.dataset.normalize = "imagenet"
    ref = (x.astype(np.float64) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(input_pipeline.normalize_images(x, c), ref, rtol=1e-6, atol=1e-6)
    c.dataset.normalize = "bogus"
    with pytest.raises(ValueError, match="config.dataset.normalize='bogus': must be one of"):
        input_pipeline.normalization(c)


def test_bad_retrieval_settings(sop_data):
    c = _config(sop_data)
    c.dataset.resize_to = 16
    with pytest.raises(ValueError, match=r"config.dataset.resize_to=16: must be an integer >= config.image_size"):
        input_pipeline.create_train_iterator(c)
    c = _config(sop_data)
    c.dataset.crop_scale = (0.5, 0.2)
    with pytest.raises(ValueError, match=r"config.dataset.crop_scale=\(0.5, 0.2\)"):
        input_pipeline.create_train_iterator(c)
    c = _config(sop_data)
    c.dataset.augment = "bogus"
    with pytest.raises(ValueError, match="config.dataset.augment='bogus': must be one of"):
        input_pipeline.create_train_iterator(c)


def test_embed_fn_normalises_as_in_training(monkeypatch):
    """The trainer's / evaluate's uint8 embed function applies config.dataset.normalize."""
    from broadface_jax import sharding, train_step
    from broadface_jax.evaluation import embedding

    def fake_make_embed_fn(config, mesh, model=None):  # "network": per-image channel means
        return lambda params, batch_stats, images: np.asarray(images, np.float64).mean(axis=(1, 2))

    monkeypatch.setattr(train_step, "make_embed_fn", fake_make_embed_fn)
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    x = images.astype(np.float64) / 255.0
    for normalize, mean, std in (("imagenet", input_pipeline.IMAGENET_MEAN, input_pipeline.IMAGENET_STD),
                                 ("face", (0.5,) * 3, (0.5,) * 3)):
        c = get_config()
        c.image_size, c.eval.batch_size, c.dataset.normalize = SIZE, 8, normalize
        embed_fn = embedding.make_uint8_embed_fn(c, sharding.make_mesh(c.mesh))(None, None)
        want = ((x - np.array(mean)) / np.array(std)).mean(axis=(1, 2))
        np.testing.assert_allclose(embed_fn(images), want, rtol=1e-5, atol=1e-5)
