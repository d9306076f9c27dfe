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
``recall@K`` in [0, 1] for each K of the protocol. Each data set is an
evaluation type (registered at the end of this module; options ``data_dir``,
positional, "" = as above, and ``ks``, () = the protocol's).

The images are decoded again at every evaluation (SOP's 60,502 test crops
at 224x224 would be 9 GB of uint8, too much to keep); only the features
(N x D float32) are held.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from broadface_jax.evaluation import embedding, retrieval
from broadface_jax.evaluation.common import EmbedFn
from broadface_jax.evaluation.registry import TargetType, register

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
    return str(config.eval.tfds_data_dir or config.dataset.data_dir or "")


class RecallEvaluator:
    """Recall@K of one retrieval target; images streamed from the prepared TFDS splits."""

    def __init__(self, name: str, protocol: Protocol, data_dir: str, image_size: int,
                 resize_to: int, batch_size: int, ks: tuple[int, ...] = ()):
        if resize_to < image_size:
            raise ValueError(f"config.dataset.resize_to={resize_to} must be >= config.image_size "
                             f"({image_size}) for the {name} evaluation crop")
        if batch_size < 1:
            raise ValueError(f"config.eval.batch_size={batch_size} must be >= 1")
        self.name, self.protocol = name, protocol
        self.data_dir, self.image_size, self.resize_to = data_dir, int(image_size), int(resize_to)
        self.batch_size = int(batch_size)
        self.ks = tuple(ks) or protocol.ks
        if min(self.ks) < 1:
            raise ValueError(f"evaluation target {name}: ks={ks} must be positive integers")

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

    def source(self, builder, split: str) -> "TFDSSource":
        """The split's evaluation crops (and labels), readable a range at a time."""
        return TFDSSource(builder, split, self.resize_to, self.image_size)

    def features(self, embed_fn: EmbedFn, builder, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(f32[N, D] embeddings, int64[N] labels) of every image of `split` (each process its share)."""
        src = self.source(builder, split)
        if len(src) == 0:
            raise ValueError(f"evaluation target {self.name}: split {split!r} is empty")
        out = embedding.embed_source(embed_fn, src, self.batch_size, flip=False,
                                     what=f"evaluation target {self.name} split {split!r}")
        return out.features, out.labels

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        del out_dir  # nothing to plot
        builder = self._builder()
        q, q_labels = self.features(embed_fn, builder, self.protocol.query_split)
        if self.protocol.gallery_split is None:
            rec = retrieval.recall_at_k(q, q_labels, ks=self.ks)
        else:
            g, g_labels = self.features(embed_fn, builder, self.protocol.gallery_split)
            rec = retrieval.recall_at_k(q, q_labels, g, g_labels, ks=self.ks)
        return {f"recall@{k}": float(v) for k, v in rec.items()}


class TFDSSource:
    """An :class:`~broadface_jax.evaluation.embedding.ImageSource` over a prepared TFDS split.

    Rows ``start..stop-1`` are read by index (``as_data_source``), decoded and
    cropped by a parallel ``tf.data`` pipeline, and yielded with their labels.
    """

    def __init__(self, builder, split: str, resize_to: int, image_size: int):
        import tensorflow_datasets as tfds

        self._src = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        self.resize_to, self.image_shape = int(resize_to), (int(image_size), int(image_size), 3)

    def __len__(self) -> int:
        return len(self._src)

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import tensorflow as tf

        from broadface_jax import input_pipeline

        src, bs, size = self._src, int(batch_size), self.image_shape[0]

        def fetch(first: np.ndarray):
            first = int(first)
            records = src.__getitems__(list(range(first, min(first + bs, stop))))
            return (np.array([r["image"] for r in records], dtype=object),
                    np.array([r["label"] for r in records], np.int64))

        def fetch_tf(first):
            data, labels = tf.numpy_function(fetch, [first], [tf.string, tf.int64], stateful=False)
            return tf.ensure_shape(data, [None]), tf.ensure_shape(labels, [None])

        def crop(data, label):
            image = input_pipeline.retrieval_eval_image(tf.io.decode_jpeg(data, channels=3),
                                                        self.resize_to, size)
            return tf.cast(tf.round(image), tf.uint8), label

        ds = tf.data.Dataset.range(start, stop, bs).map(fetch_tf, num_parallel_calls=tf.data.AUTOTUNE,
                                                        deterministic=True)
        ds = ds.unbatch().map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(bs).prefetch(tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()


def build_evaluator(dataset: str, config: Any, data_dir: str = "", ks: tuple[int, ...] = (),
                    name: str | None = None) -> RecallEvaluator:
    """The Recall@K evaluator of data set `dataset` (a key of :data:`TARGETS`).

    ``data_dir`` "" = :func:`data_dir_of`; ``ks`` () = the protocol's K.
    """
    if dataset not in TARGETS:
        raise ValueError(f"unknown retrieval target {dataset!r}; known: {', '.join(TARGETS)}")
    return RecallEvaluator(name or dataset, TARGETS[dataset], data_dir or data_dir_of(config),
                           int(config.image_size), int(config.dataset.resize_to),
                           int(config.eval.batch_size), ks)


def _build(dataset: str):
    def build(name: str, config: Any, o: dict) -> RecallEvaluator:
        return build_evaluator(dataset, config, data_dir=o["data_dir"], ks=tuple(int(k) for k in o["ks"]),
                               name=name)

    return build


for _ds in TARGETS:
    register(_ds, TargetType(_build(_ds), {"data_dir": "", "ks": ()}, positional="data_dir",
                             summary=f"Recall@K on the prepared {_ds} test split(s)"))
