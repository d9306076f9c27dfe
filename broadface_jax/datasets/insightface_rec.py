"""TFDS builder for insightface training sets in MXNet RecordIO (train.rec / train.idx).

MS1MV2 (faces_emore), MS1MV3, Glint360K, WebFace42M, CASIA-WebFace as
insightface distributes them: already aligned 112x112 JPEG faces. Read with
`broadface_jax.datasets.recordio` (no mxnet needed).

The image keys are read in ranges (:mod:`broadface_jax.datasets.beam_split`):
in this process, or by Beam workers when a runner is asked for; each worker
opens the ``.rec`` once (:func:`_open_cached`) and reads its ranges by offset.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import tensorflow_datasets as tfds

from broadface_jax.datasets import beam_split, common, recordio


def read_property(path) -> int | None:
    """insightface's `property` file ('num_classes,112,112') -> num_classes, if present."""
    path = recordio.path(path)
    if not path.is_file():
        return None
    fields = path.read_text().strip().split(",")
    try:
        return int(fields[0])
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {fields!r}") from None


_READERS: dict[tuple, recordio.IndexedRecordIO] = {}


def _stat(p: str) -> tuple:
    if "://" in p:
        st = recordio.path(p).stat()
        return st.length, st.mtime
    st = os.stat(p)
    return st.st_size, st.st_mtime_ns


def _open_cached(rec: str, idx: str) -> recordio.IndexedRecordIO:
    """One open reader per process for (rec, idx) as they are now (size and mtime in the key)."""
    key = (rec, idx, _stat(rec), _stat(idx))
    if key not in _READERS:
        close_cached()
        _READERS[key] = recordio.IndexedRecordIO(rec, idx)
    return _READERS[key]


def close_cached() -> None:
    """Closes the readers :func:`_open_cached` opened in this process."""
    while _READERS:
        _READERS.popitem()[1].close()


@dataclasses.dataclass(frozen=True)
class RecRangeReader:
    """Reads, checks and encodes a range of image keys of one .rec (a Beam worker's unit)."""

    rec: str
    idx: str
    num_classes: int

    def __call__(self, keys):
        reader = _open_cached(self.rec, self.idx)
        for key in keys:
            where = f"{self.rec} record {key} (offset {reader.index.get(key)})"
            header, payload = recordio.unpack(reader.read_idx(key), where)
            label = recordio.image_label(header, where)
            if label >= self.num_classes:
                raise ValueError(f"{where}: label {label} out of range [0, {self.num_classes})")
            try:
                jpeg = common.face_jpeg(payload, where)
            except common.BadImageError as e:  # one bad image; the record file is fine
                yield beam_split.Skipped(f"train.rec#{key}", str(e))
                continue
            yield key, common.example(jpeg, label, str(label), f"train.rec#{key}")

    def close(self) -> None:
        """Closes this process's cached reader (called after the single-process generator)."""
        close_cached()


class InsightfaceRec(beam_split.BeamSplitMixin, common.FaceBuilderMixin,
                     tfds.core.GeneratorBasedBuilder):
    """insightface train.rec / train.idx -> aligned 112x112 JPEG faces + labels."""

    HOMEPAGE = "https://github.com/deepinsight/insightface/tree/master/recognition/_datasets_"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put insightface's `train.rec` and `train.idx` (and, if present, `property`)
    of the training set (e.g. faces_emore / ms1m-retinaface-t1 / glint360k) in
    manual_dir. Images are kept byte for byte when they are 112x112 RGB JPEGs.
    """

    def __init__(self, *, strict: bool = False, **kwargs):
        self._strict = strict  # True: the first bad image stops the preparation
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = recordio.path(dl_manager.manual_dir)  # a local folder or gs://... (Dataflow)
        rec, idx = root / "train.rec", root / "train.idx"
        for p in (rec, idx):
            if not p.is_file():
                raise FileNotFoundError(f"insightface_rec: {p} not found (manual_dir={root})")
        with recordio.IndexedRecordIO(rec, idx) as reader:
            layout = recordio.face_record_layout(reader)
            image_keys = layout.image_keys
            num_classes = read_property(root / "property")
            if num_classes is None and len(layout.identity_keys):
                num_classes = len(layout.identity_keys)
        if num_classes is None:
            num_classes = 1 + max(lbl for _, lbl in self._labels(rec, idx, layout.image_keys))
        self.info.metadata["num_classes"] = int(num_classes)
        return {"train": self._generate_examples(rec, idx, image_keys, num_classes)}

    def _set_skipped(self, names: list[str]) -> None:
        self.info.metadata.setdefault("skipped", {})["bad_images"] = names

    @staticmethod
    def _labels(rec, idx, keys):
        with recordio.IndexedRecordIO(rec, idx) as reader:
            for key in keys:
                where = f"{rec} record {key}"
                header, _ = recordio.unpack(reader.read_idx(key), where)
                yield key, recordio.image_label(header, where)

    def _generate_examples(self, rec: pathlib.Path, idx: pathlib.Path, keys, num_classes: int):
        """The image records ``keys``: a generator, or a Beam transform when a runner is asked for."""
        return self._examples("train", keys, RecRangeReader(str(rec), str(idx), int(num_classes)),
                              strict=self._strict, on_skipped=self._set_skipped)
