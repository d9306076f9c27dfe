"""The training input pipeline: tf.data, per process, deterministic and resumable.

`create_train_iterator(config, start_step)` yields per-process numpy batches
`{'image': f32[B, H, W, 3], 'label': i32[B]}` (images normalised by
`config.dataset.normalize`: [-1, 1] with the default 'face', ImageNet mean
and std with 'imagenet') with
`B = config.per_device_batch_size * jax.local_device_count()`.

Order. Each process reads its own contiguous shard of the split
(`tfds.split_for_jax_process`). The stream of record indices is a
concatenation of epochs, each a permutation of the shard drawn from
`(config.seed, process index, epoch)` (full shuffles, no shuffle buffer);
batch k is positions `[k * B, (k + 1) * B)` of that stream and the flips of
its images (when `config.dataset.random_flip`) come from
`(config.seed, process index, k)`. So batch k is a pure function of k:
`start_step=k` computes it directly (nothing is read and skipped), and a
resumed run sees exactly the batches a run that never stopped would have seen.

Data. `config.dataset.name == 'tfds'` reads a data set prepared by
`python -m broadface_jax.prepare` (ArrayRecord files, random access through
`tfds` data sources, images fetched as JPEG bytes and decoded by tf.data);
`'synthetic'` renders `broadface_jax.datasets.synthetic` identities.
Batches are fetched (or rendered) by parallel tf.data maps over the step
counter, then decoded, flipped and normalised `(x / 255 - 0.5) / 0.5` by
parallel maps; order is kept (deterministic maps). TensorFlow is hidden from
GPUs.

Retrieval augmentation (`config.dataset.augment == 'retrieval'`, the
protocol of Song et al. as in the BroadFace authors' release): each image is
resized to `resize_to x resize_to` (bilinear, antialiased), then a random
resized crop of that frame (area fraction in `config.dataset.crop_scale`,
aspect ratio w/h in `config.dataset.crop_ratio`, torchvision's
`RandomResizedCrop` rule: 10 tries, else a centre crop) is resized to
`config.image_size` and flipped (when `random_flip`). The crop windows of
batch k, like its flips, are drawn on the host from
`(config.seed, process index, k)` (`IndexStream.crops`), so batch k stays a
pure function of k. Evaluation images get `retrieval_eval_image`: resize to
`resize_to x resize_to`, centre `image_size` crop. `config.dataset.normalize`
picks the normalisation: `'face'` `(x / 255 - 0.5) / 0.5` (default) or
`'imagenet'` `(x / 255 - mean) / std` with torchvision's ImageNet mean/std
(`normalize_images` applies the same rule to evaluation images). With the
defaults (`augment='face'`, `normalize='face'`) the pipeline is exactly the
face pipeline above.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import gc
import pathlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

_PERM_SALT = 0x0E90C4
_FLIP_SALT = 0xF11F
_CROP_SALT = 0xC409

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics, RGB, on x / 255
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``config.dataset.augment`` / ``normalize`` values (``config_check`` checks them).
AUGMENTATIONS = ("face", "retrieval")
NORMALIZATIONS = ("face", "imagenet")


# ---------------------------------------------------------- normalisation
def normalization(config: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) f32[3] on the x / 255 scale for `config.dataset.normalize`."""
    from broadface_jax import config_check  # noqa: PLC0415

    config_check.check(config, only=("dataset.normalize",))
    if config.dataset.normalize == "face":
        return np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
    return np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)


def normalize_images(images: np.ndarray, config: Any) -> np.ndarray:
    """float32 images in [0, 255] -> the network's input scale (`config.dataset.normalize`).

    The same rule and constants as the training pipeline (:func:`normalization`).
    """
    mean, std = normalization(config)
    return (np.asarray(images, np.float32) / 255.0 - mean) / std


@dataclasses.dataclass(frozen=True)
class RetrievalAugment:
    """The retrieval crop settings (module docstring), checked."""

    resize_to: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]

    @classmethod
    def from_config(cls, config: Any) -> "RetrievalAugment":
        from broadface_jax import config_check  # noqa: PLC0415 (the rules live there)

        config_check.check(config, only=("dataset.resize_to", "dataset.crop_scale",
                                          "dataset.crop_ratio"))
        ds = config.dataset
        return cls(int(ds.resize_to), tuple(float(v) for v in ds.crop_scale),
                   tuple(float(v) for v in ds.crop_ratio))


def random_resized_crop_window(rng: np.random.Generator, height: int, width: int,
                               scale: tuple[float, float], ratio: tuple[float, float]
                               ) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's `RandomResizedCrop.get_params`.

    Ten tries of an area fraction ~ U(scale) and a log-uniform aspect ratio
    w/h in `ratio`; the first window that fits is taken, else a centre crop
    with the aspect ratio clamped to `ratio`. Always 40 draws from `rng`, so
    the stream of windows does not depend on which try succeeded.
    """
    area = height * width
    draws = rng.random((10, 4))
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = float(np.exp(log_lo + (log_hi - log_lo) * u_ratio))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------ sources
@dataclasses.dataclass
class _Source:
    """What the pipeline reads: `fetch(indices) -> (payload, labels)`.

    payload is a list of encoded images (`encoded=True`) or u8[N, H, W, 3].
    """

    name: str
    num_examples: int  # in this process's shard
    num_total: int  # in the whole split
    encoded: bool
    fetch: Callable[[np.ndarray], tuple[Any, np.ndarray]]
    describe: Callable[[int], str]  # record index -> where it came from


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the training data set's metadata says, without reading its records."""

    name: str  # for messages: "insightface_rec (<data_dir>) split 'train'" or "synthetic"
    num_examples: int  # in the whole split (all processes)
    num_classes: int | None  # None: the data set's metadata does not say


def _tfds_builder(config: Any):
    """The prepared TFDS builder of `config.dataset`, checked (folder, preparation, split)."""
    from broadface_jax import datasets

    hide_gpus_from_tensorflow()
    ds_cfg = config.dataset
    name, split = ds_cfg.tfds_name, ds_cfg.split
    data_dir = ds_cfg.data_dir or None
    if data_dir is not None and "://" not in data_dir and not pathlib.Path(data_dir).is_dir():
        raise FileNotFoundError(f"config.dataset.data_dir={data_dir!r} does not exist (the TFDS "
                                f"data directory with the prepared data set {name})")
    builder = datasets.get_builder(name, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"data set {name} is not prepared in {builder.data_dir}: run "
            f"`python -m broadface_jax.prepare --dataset {name} --manual_dir ... "
            f"--data_dir {data_dir or '<TFDS default>'}`")
    if split not in builder.info.splits:
        raise ValueError(f"data set {name} has no split {split!r}; it has {list(builder.info.splits)}")
    return builder


class DataFileError(ValueError):
    """A prepared data file is truncated or damaged; the message names the file."""


def _array_record_source(src: Any) -> Any:
    """array_record's data source inside a TFDS one (None for other formats)."""
    inner = getattr(src, "data_source", None)
    return inner if hasattr(inner, "_read_instructions") else None


def check_data_files(src: Any, name: str) -> None:
    """Opens every ArrayRecord file of a TFDS data source and checks its record count.

    Cheap (each file's footer and index only). A file cut short (an
    interrupted copy or preparation) holds fewer records than the data set's
    metadata says; it is named in a :class:`DataFileError`.
    """
    from array_record.python import array_record_module  # noqa: PLC0415

    inner = _array_record_source(src)
    if inner is None:
        return
    for instruction in inner._read_instructions:
        path = instruction.filename
        try:
            reader = array_record_module.ArrayRecordReader(path)
            count = reader.num_records()
            reader.close()
        except Exception as e:  # not an ArrayRecord file at all
            raise DataFileError(f"data file {path} of {name} is truncated or damaged: it cannot "
                                f"be read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); prepare the data "
                                "set again (broadface_jax.prepare --overwrite)") from e
        if count < instruction.end:
            raise DataFileError(
                f"data file {path} of {name} is truncated or damaged: it holds {count} records, "
                f"the data set's metadata says {instruction.end}; prepare the data set again "
                "(broadface_jax.prepare --overwrite) or copy the file again")


def _damaged_file_message(src: Any, name: str, keys: list[int], bad: int | None,
                          error: BaseException | None) -> str:
    """Which file a failed read came from (re-reading the keys one by one)."""
    inner = _array_record_source(src)
    culprit, reason = bad, f"{type(error).__name__}: {error}" if error else "empty record"
    if culprit is None:
        for key in keys:
            try:
                if src[key] is None:
                    culprit = key
                    break
            except Exception as e:
                culprit, reason = key, f"{type(e).__name__}: {e}"
                break
    reason = " ".join(str(reason).split())[:300]
    if inner is not None and culprit is not None:
        index, position = inner._reader_idx_and_position(culprit)
        path = inner._read_instructions[index].filename
        return (f"data file {path} of {name} is damaged (record {position}: {reason}); prepare "
                "the data set again (broadface_jax.prepare --overwrite) or copy the file again")
    return f"a data file of {name} is damaged ({reason})"


def _tfds_info(config: Any) -> DataInfo:
    builder = _tfds_builder(config)
    split = config.dataset.split
    meta = builder.info.metadata or {}
    return DataInfo(f"{config.dataset.tfds_name} ({builder.data_dir}) split {split!r}",
                    builder.info.splits[split].num_examples,
                    int(meta["num_classes"]) if "num_classes" in meta else None)


def _tfds_source(config: Any, process_index: int, process_count: int) -> _Source:
    import tensorflow_datasets as tfds

    builder = _tfds_builder(config)
    name, split = config.dataset.tfds_name, config.dataset.split
    num_total = builder.info.splits[split].num_examples
    shard = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    try:
        src = builder.as_data_source(shard, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as e:
        raise ValueError(
            f"data set {name} in {builder.data_dir} was not prepared in a random-access format "
            f"(prepare it with broadface_jax.prepare, which writes ArrayRecord): {e}") from e
    if len(src) == 0:
        raise ValueError(f"data set {name} split {split!r} shard {process_index}/{process_count} is empty")
    check_data_files(src, name)
    where = f"{name} ({builder.data_dir}) split {split!r}"

    def fetch(indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        keys = [int(i) for i in indices]
        try:
            records = src.__getitems__(keys)
            bad = next((k for k, r in zip(keys, records) if r is None), None)
            error: Exception | None = None
        except Exception as e:  # riegeli / array_record: a damaged chunk
            bad, error = None, e
        if isinstance(error, RuntimeError) and "interpreter shutdown" in str(error):
            raise error  # tf.data still prefetching while Python exits: not the data's fault
        if bad is not None or error is not None:
            raise DataFileError(_damaged_file_message(src, name, keys, bad, error)) from error
        return ([r["image"] for r in records],
                np.array([r["label"] for r in records], dtype=np.int64))

    def describe(index: int) -> str:
        record = src[int(index)]
        file = record.get("file", b"")
        file = file.decode() if isinstance(file, bytes) else str(file)
        return f"{where}, shard record {index}" + (f" (file {file})" if file else "")

    return _Source(name, len(src), num_total, True, fetch, describe)


def _synthetic_info(config: Any) -> DataInfo:
    from broadface_jax.datasets import synthetic

    spec = synthetic.spec_from_config(config)
    return DataInfo("synthetic", spec.num_examples, spec.num_identities)


def _synthetic_source(config: Any, process_index: int, process_count: int) -> _Source:
    from broadface_jax.datasets import synthetic

    spec = synthetic.spec_from_config(config)
    total = spec.num_examples
    if total <= 0:
        raise ValueError(
            "config.dataset.name == 'synthetic' needs config.dataset.synthetic.num_identities > 0 and "
            f"samples_per_identity > 0 (got {spec.num_identities}, {spec.samples_per_identity})")
    per = total // process_count
    if per == 0:
        raise ValueError(f"synthetic data set has {total} examples, fewer than {process_count} processes")
    lo = process_index * per

    def fetch(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = synthetic.training_examples(spec, lo + np.asarray(indices), config.seed)
        return images, labels.astype(np.int64)

    def describe(index: int) -> str:
        e = lo + int(index)
        return f"synthetic example {e} (identity {e // spec.samples_per_identity})"

    return _Source("synthetic", per, total, False, fetch, describe)


#: config.dataset.name -> (source for one process, metadata): the one dispatch on the kind.
_KINDS: dict[str, tuple[Callable[[Any, int, int], _Source], Callable[[Any], DataInfo]]] = {
    "tfds": (_tfds_source, _tfds_info),
    "synthetic": (_synthetic_source, _synthetic_info),
}


def _kind(config: Any) -> tuple[Callable[[Any, int, int], _Source], Callable[[Any], DataInfo]]:
    kind = config.dataset.name
    if kind not in _KINDS:
        raise ValueError(f"config.dataset.name must be {' or '.join(map(repr, _KINDS))}, "
                         f"got {kind!r}")
    return _KINDS[kind]


def _make_source(config: Any, process_index: int, process_count: int) -> _Source:
    return _kind(config)[0](config, process_index, process_count)


def data_info(config: Any) -> DataInfo:
    """The training data's name, size and number of identities (its metadata)."""
    return _kind(config)[1](config)


# ------------------------------------------------------------- index stream
class IndexStream:
    """Record indices and flips of batch k, a pure function of (seed, process, k)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, process_index: int):
        if num_examples <= 0 or batch_size <= 0:
            raise ValueError(f"IndexStream needs num_examples > 0 and batch_size > 0, "
                             f"got {num_examples}, {batch_size}")
        self.n, self.b = int(num_examples), int(batch_size)
        self.seed, self.process = int(seed) & 0xFFFFFFFF, int(process_index)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        """The shard's order in `epoch` (the last few are cached; thread-safe)."""
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) >= 4:
                    self._perms.pop(min(self._perms))
                rng = np.random.default_rng([_PERM_SALT, self.seed, self.process, epoch])
                self._perms[epoch] = rng.permutation(self.n)
            return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.b, (step + 1) * self.b, dtype=np.int64)
        epochs, offsets = pos // self.n, pos % self.n
        out = np.empty(self.b, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out

    def flips(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([_FLIP_SALT, self.seed, self.process, step])
        return rng.random(self.b) < 0.5

    def crops(self, step: int, frame: int, scale: tuple[float, float],
              ratio: tuple[float, float]) -> np.ndarray:
        """int32[B, 4] (top, left, h, w) random resized crops of a frame x frame image."""
        rng = np.random.default_rng([_CROP_SALT, self.seed, self.process, step])
        return np.array([random_resized_crop_window(rng, frame, frame, scale, ratio)
                         for _ in range(self.b)], np.int32)


# ------------------------------------------------------------------ tf.data
def hide_gpus_from_tensorflow():
    """Imports TensorFlow with no GPU visible to it; returns the module.

    tf.data (input, image decoding) runs beside JAX; a TensorFlow that sees
    the GPUs reserves their memory. Every entry point calls this before JAX
    starts.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised; then it was hidden before (or there is no GPU)
        pass
    return tf


def _build_dataset(source: _Source, stream: IndexStream, start_step: int, image_size: int,
                   random_flip: bool, mean: np.ndarray, std: np.ndarray):
    """steps -> (fetch records | render) in parallel -> decode, flip, normalise -> batches."""
    import tensorflow as tf

    b = stream.b
    mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

    def load(step: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = int(step)
        payload, labels = source.fetch(stream.indices(step))
        if source.encoded:
            payload = np.array(payload, dtype=object)
        flips = stream.flips(step) if random_flip else np.zeros(b, bool)
        return payload, labels.astype(np.int64), flips

    payload_type = tf.string if source.encoded else tf.uint8

    def load_tf(step):
        payload, labels, flips = tf.numpy_function(load, [step], [payload_type, tf.int64, tf.bool],
                                                   stateful=False)
        shape = [b] if source.encoded else [b, image_size, image_size, 3]
        return tf.ensure_shape(payload, shape), tf.ensure_shape(labels, [b]), tf.ensure_shape(flips, [b])

    ds = tf.data.Dataset.counter(start_step)
    ds = ds.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    if source.encoded:
        def decode(data, label, flip):
            image = tf.cast(tf.io.decode_jpeg(data, channels=3), tf.float32)
            same = tf.logical_and(tf.shape(image)[0] == image_size, tf.shape(image)[1] == image_size)
            image = tf.cond(same, lambda: image, lambda: tf.clip_by_value(tf.image.resize(
                image, (image_size, image_size), method="bilinear", antialias=True), 0.0, 255.0))
            image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
            image = tf.ensure_shape(image, [image_size, image_size, 3])
            return (image / 255.0 - mean_t) / std_t, label

        ds = ds.unbatch()
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(b, drop_remainder=True)
    else:
        def augment(images, labels, flips):
            images = tf.cast(images, tf.float32)
            images = tf.where(flips[:, None, None, None], tf.reverse(images, axis=[2]), images)
            return (images / 255.0 - mean_t) / std_t, labels

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def _resize(tf, image, size: int):
    """float image -> size x size, bilinear with antialiasing (kept when already that size)."""
    same = tf.logical_and(tf.shape(image)[0] == size, tf.shape(image)[1] == size)
    return tf.cond(same, lambda: image, lambda: tf.clip_by_value(tf.image.resize(
        image, (size, size), method="bilinear", antialias=True), 0.0, 255.0))


def retrieval_eval_image(image, resize_to: int, size: int):
    """Evaluation view of a retrieval image: resize to resize_to^2, centre size x size crop.

    `image`: a tf uint8 / float image [H, W, 3]; returns float32 [size, size, 3]
    in [0, 255] (not normalised). The crop offset is torchvision's
    `CenterCrop`: round((resize_to - size) / 2).
    """
    import tensorflow as tf

    offset = int(round((resize_to - size) / 2.0))
    image = _resize(tf, tf.cast(image, tf.float32), resize_to)
    image = image[offset:offset + size, offset:offset + size, :]
    return tf.ensure_shape(image, [size, size, 3])


def _build_retrieval_dataset(source: _Source, stream: IndexStream, start_step: int, image_size: int,
                             random_flip: bool, aug: RetrievalAugment, mean: np.ndarray, std: np.ndarray):
    """steps -> fetch + crop windows -> decode, resize, crop, resize, flip, normalise -> batches."""
    import tensorflow as tf

    b = stream.b

    def load(step: np.ndarray):
        step = int(step)
        payload, labels = source.fetch(stream.indices(step))
        if source.encoded:
            payload = np.array(payload, dtype=object)
        flips = stream.flips(step) if random_flip else np.zeros(b, bool)
        windows = stream.crops(step, aug.resize_to, aug.crop_scale, aug.crop_ratio)
        return payload, labels.astype(np.int64), flips, windows

    payload_type = tf.string if source.encoded else tf.uint8

    def load_tf(step):
        payload, labels, flips, windows = tf.numpy_function(
            load, [step], [payload_type, tf.int64, tf.bool, tf.int32], stateful=False)
        shape = [b] if source.encoded else [b, None, None, 3]
        return (tf.ensure_shape(payload, shape), tf.ensure_shape(labels, [b]),
                tf.ensure_shape(flips, [b]), tf.ensure_shape(windows, [b, 4]))

    mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

    def augment(data, label, flip, window):
        image = tf.io.decode_jpeg(data, channels=3) if source.encoded else data
        image = _resize(tf, tf.cast(image, tf.float32), aug.resize_to)
        image = tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))
        image = _resize(tf, image, image_size)
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        image = tf.ensure_shape(image, [image_size, image_size, 3])
        return (image / 255.0 - mean_t) / std_t, label

    ds = tf.data.Dataset.counter(start_step)
    ds = ds.map(load_tf, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.unbatch()
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(b, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)


def check_labels(labels: np.ndarray, num_classes: int, dataset: str) -> None:
    """Raises ValueError naming the value when a label is outside [0, num_classes)."""
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        value = int(labels[np.argmax(bad)])
        raise ValueError(f"label {value} out of range [0, {num_classes}) in data set {dataset} "
                         f"(config.num_classes = {num_classes})")


def _find_bad_record(source: _Source, stream: IndexStream, step: int, tf) -> str:
    """Decodes batch `step` eagerly to name the record that failed."""
    indices = stream.indices(step)
    payload, _ = source.fetch(indices)
    for index, data in zip(indices, payload):
        try:
            tf.io.decode_jpeg(data, channels=3)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            return f"{source.describe(int(index))}: {str(e).splitlines()[0]}"
    return f"batch {step} (no single bad record found on re-reading)"


def create_train_iterator(config: Any, start_step: int = 0) -> "TrainIterator":
    """Per-process numpy batches from step `start_step` on (module docstring)."""
    import jax

    from broadface_jax import sharding

    tf = hide_gpus_from_tensorflow()
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if int(config.num_classes) == 0:  # labels are checked against the metadata's count
        config = resolve_num_classes(config)
    process_index, process_count = jax.process_index(), jax.process_count()
    source = _make_source(config, process_index, process_count)
    stream = IndexStream(source.num_examples, sharding.local_batch_size(config), config.seed,
                         process_index)
    from broadface_jax import config_check  # noqa: PLC0415

    config_check.check(config, only=("dataset.augment", "dataset.normalize"))
    mean, std = normalization(config)
    if config.dataset.augment == "retrieval":
        ds = _build_retrieval_dataset(source, stream, start_step, int(config.image_size),
                                      bool(config.dataset.random_flip),
                                      RetrievalAugment.from_config(config), mean, std)
    else:  # 'face', normalised to [-1, 1] (config_check)
        ds = _build_dataset(source, stream, start_step, int(config.image_size),
                            bool(config.dataset.random_flip), mean, std)
    return TrainIterator(ds, source, stream, start_step, int(config.num_classes), tf)


class TrainIterator:
    """Iterator over checked numpy batches; `close()` releases the tf.data pipeline.

    Live iterators are closed at interpreter exit: a tf.data generator still
    running while Python finalises can otherwise hang the exit.
    """

    def __init__(self, ds, source: _Source, stream: IndexStream, start_step: int, num_classes: int, tf):
        self._it = ds.as_numpy_iterator()
        self._source, self._stream, self._tf = source, stream, tf
        self._num_classes = num_classes
        self.step = start_step  # the step of the next batch
        _LIVE_ITERATORS.add(self)

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise StopIteration
        tf = self._tf
        try:
            images, labels = next(self._it)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            bad = _find_bad_record(self._source, self._stream, self.step, tf)  # DataFileError
            raise DataFileError(f"corrupt image in {bad}") from e
        check_labels(labels, self._num_classes, self._source.name)
        self.step += 1
        return {"image": images, "label": labels.astype(np.int32)}

    def close(self) -> None:
        self._it = None


_LIVE_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE_ITERATORS):
        it.close()
    gc.collect()


def num_train_examples(config: Any) -> int:
    """Examples in the whole training split (all processes)."""
    return data_info(config).num_examples


def resolve_num_classes(config: Any) -> Any:
    """``config`` with ``num_classes`` from the data set's metadata when it is 0.

    An explicit ``config.num_classes`` must equal the metadata's (a classifier
    with other rows than the data has identities is a mistake: labels out of
    range, or rows that never see a positive). A data set without the
    metadata keeps the explicit value (labels are still checked per batch).
    Returns a copy when it fills the field; the caller's config is unchanged.

    Raises:
      ValueError: naming both numbers and the data set, or asking for the
        field when the data set does not say.
    """
    given, info = int(config.num_classes), data_info(config)
    if info.num_classes is None:
        if given == 0:
            raise ValueError(f"config.num_classes=0 (take it from the data) but data set "
                             f"{info.name} has no num_classes metadata: set config.num_classes")
        return config
    if given == 0:
        config = copy.deepcopy(config)
        config.num_classes = info.num_classes
        return config
    if given != info.num_classes:
        raise ValueError(
            f"config.num_classes={given} but data set {info.name} has {info.num_classes} "
            "identities (its metadata num_classes); set config.num_classes="
            f"{info.num_classes}, or 0 to take it from the data")
    return config
