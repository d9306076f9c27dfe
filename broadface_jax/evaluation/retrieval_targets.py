"""Recall@K evaluation targets on the prepared retrieval data sets (paper section 4.3).

| target    | data set (``broadface_jax.prepare --dataset``) | protocol                         | K                      |
| --------- | ---------------------------------------------- | -------------------------------- | ---------------------- |
| ``sop``     | ``sop``, split ``test``                      | all vs all, the query left out   | 1, 10, 100, 1000       |
| ``inshop``  | ``inshop``, ``query`` vs ``gallery``         | query set against the gallery    | 1, 10, 20, 30, 40, 50  |
| ``cub200``  | ``cub200``, split ``test``                   | all vs all, the query left out   | 1, 2, 4, 8             |
| ``cars196`` | ``cars196``, split ``test``                  | all vs all, the query left out   | 1, 2, 4, 8             |

The data set is read from ``config.eval.tfds_data_dir`` (or, when that is
empty, ``config.dataset.data_dir``: the TFDS folder the training set was
prepared into). Every image is shown to the network as in evaluation of the
authors' release: resized to ``config.dataset.resize_to`` squared, centre
``config.image_size`` crop (:func:`broadface_jax.input_pipeline.retrieval_eval_image`),
rounded to uint8 and passed to the embed function, which normalises as in
training. No flip. Recall@K by :func:`broadface_jax.evaluation.retrieval.recall_at_k`
(cosine similarity; a query's own image never counts). Metrics:
``recall@K`` in [0, 1] for each K of the protocol.

The images are decoded again at every evaluation (SOP's 60,502 test crops
at 224x224 would be 9 GB of uint8, too much to keep); only the features
(N x D float32) are held.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from broadface_jax.evaluation import retrieval
from broadface_jax.evaluation.common import EmbedFn

SOP_KS = (1, 10, 100, 1000)
INSHOP_KS = (1, 10, 20, 30, 40, 50)
CUB_CARS_KS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Protocol:
    dataset: str  # short name of the TFDS builder
    query_split: str
    gallery_split: str | None  # None: all vs all within query_split
    ks: tuple[int, ...]


TARGETS: dict[str, Protocol] = {
    "sop": Protocol("sop", "test", None, SOP_KS),
    "inshop": Protocol("inshop", "query", "gallery", INSHOP_KS),
    "cub200": Protocol("cub200", "test", None, CUB_CARS_KS),
    "cars196": Protocol("cars196", "test", None, CUB_CARS_KS),
}


def data_dir_of(config: Any) -> str:
    """The TFDS data_dir holding the retrieval test splits (module docstring)."""
    ev = config.eval
    configured = ev.get("tfds_data_dir", "") if hasattr(ev, "get") else getattr(ev, "tfds_data_dir", "")
    return str(configured or config.dataset.data_dir or "")


class RecallEvaluator:
    """Recall@K of one retrieval target; images streamed from the prepared TFDS splits."""

    def __init__(self, name: str, protocol: Protocol, data_dir: str, image_size: int,
                 resize_to: int, batch_size: int):
        if resize_to < image_size:
            raise ValueError(f"config.dataset.resize_to={resize_to} must be >= config.image_size "
                             f"({image_size}) for the {name} evaluation crop")
        if batch_size < 1:
            raise ValueError(f"config.eval.batch_size={batch_size} must be >= 1")
        self.name, self.protocol = name, protocol
        self.data_dir, self.image_size, self.resize_to = data_dir, int(image_size), int(resize_to)
        self.batch_size = int(batch_size)

    def _builder(self):
        from broadface_jax import datasets

        if self.data_dir and "://" not in self.data_dir and not os.path.isdir(self.data_dir):
            raise FileNotFoundError(
                f"evaluation target {self.name}: TFDS data_dir {self.data_dir!r} does not exist "
                "(config.eval.tfds_data_dir, else config.dataset.data_dir)")
        builder = datasets.get_builder(self.protocol.dataset, self.data_dir or None)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"evaluation target {self.name}: data set {self.protocol.dataset} is not prepared in "
                f"{builder.data_dir}: run `python -m broadface_jax.prepare --dataset "
                f"{self.protocol.dataset} --manual_dir ... --data_dir {self.data_dir or '<TFDS default>'}`")
        for split in (self.protocol.query_split, self.protocol.gallery_split):
            if split is not None and split not in builder.info.splits:
                raise ValueError(f"evaluation target {self.name}: {builder.name} in {builder.data_dir} "
                                 f"has no split {split!r} (has {list(builder.info.splits)})")
        return builder

    def batches(self, builder, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(u8[<=batch, S, S, 3] evaluation crops, int64 labels) of `split`, in record order."""
        import tensorflow as tf
        import tensorflow_datasets as tfds

        from broadface_jax import input_pipeline

        src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        n = len(src)
        bs = self.batch_size

        def fetch(start: np.ndarray):
            start = int(start)
            records = src.__getitems__(list(range(start, min(start + bs, n))))
            return (np.array([r["image"] for r in records], dtype=object),
                    np.array([r["label"] for r in records], np.int64))

        def fetch_tf(start):
            data, labels = tf.numpy_function(fetch, [start], [tf.string, tf.int64], stateful=False)
            return tf.ensure_shape(data, [None]), tf.ensure_shape(labels, [None])

        def crop(data, label):
            image = input_pipeline.retrieval_eval_image(tf.io.decode_jpeg(data, channels=3),
                                                        self.resize_to, self.image_size)
            return tf.cast(tf.round(image), tf.uint8), label

        ds = tf.data.Dataset.range(0, n, bs).map(fetch_tf, num_parallel_calls=tf.data.AUTOTUNE,
                                                 deterministic=True)
        ds = ds.unbatch().map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(bs).prefetch(tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()

    def features(self, embed_fn: EmbedFn, builder, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(f32[N, D] embeddings, int64[N] labels) of every image of `split`."""
        feats, labels = [], []
        for images, lab in self.batches(builder, split):
            out = np.asarray(embed_fn(images), np.float32)
            if out.ndim != 2 or out.shape[0] != images.shape[0]:
                raise ValueError(f"embed_fn must return f32[N, D] for N={images.shape[0]} images, "
                                 f"got shape {out.shape}")
            if not np.all(np.isfinite(out)):
                raise ValueError(f"evaluation target {self.name}: embed_fn returned NaN/inf "
                                 f"embeddings on split {split!r} (is the model diverged?)")
            feats.append(out)
            labels.append(lab)
        if not feats:
            raise ValueError(f"evaluation target {self.name}: split {split!r} is empty")
        return np.concatenate(feats), np.concatenate(labels)

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        del out_dir  # nothing to plot
        builder = self._builder()
        q, q_labels = self.features(embed_fn, builder, self.protocol.query_split)
        if self.protocol.gallery_split is None:
            rec = retrieval.recall_at_k(q, q_labels, ks=self.protocol.ks)
        else:
            g, g_labels = self.features(embed_fn, builder, self.protocol.gallery_split)
            rec = retrieval.recall_at_k(q, q_labels, g, g_labels, ks=self.protocol.ks)
        return {f"recall@{k}": float(v) for k, v in rec.items()}


def build_evaluator(name: str, config: Any) -> RecallEvaluator:
    """The Recall@K evaluator of target `name` (a key of :data:`TARGETS`)."""
    if name not in TARGETS:
        raise ValueError(f"unknown retrieval target {name!r}; known: {', '.join(TARGETS)}")
    resize_to = config.dataset.get("resize_to", 256) if hasattr(config.dataset, "get") else 256
    return RecallEvaluator(name, TARGETS[name], data_dir_of(config), int(config.image_size),
                           int(resize_to), int(config.eval.batch_size))
