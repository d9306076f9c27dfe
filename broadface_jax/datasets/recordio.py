"""MXNet RecordIO (`train.rec` / `train.idx`) without mxnet.

The format insightface's training sets ship in (MS1MV2, MS1MV3, Glint360K,
WebFace). Byte layout, as dmlc-core's `RecordIOWriter` writes it:

* each part: `u32 magic = 0xced7230a`, `u32 lrec = cflag << 29 | length`,
  `length` bytes of data, zero padding to a multiple of 4 bytes (little endian);
* cflag 0: a whole record. A record whose data contains the magic word at a
  4-byte aligned offset is split there: parts with cflag 1 (first), 2
  (middle), 3 (last), the magic word itself dropped; a reader joins the parts
  with the magic word in between;
* `.idx`: text lines `key<TAB>byte offset of the record's first part`.

A record's payload (mxnet `recordio.pack`): the IRHeader `struct '<IfQQ'`
(flag, label, id, id2; 24 bytes), then, when flag > 0, `flag` float32 labels
(the header's label field is then unused), then the image bytes (JPEG).

insightface's layout: record 0 is a header whose labels are
`(end_of_images, end_of_identities)`: image records are keys
`1 .. end_of_images - 1` (as `arcface_torch/dataset.py` reads them); keys
`end_of_images .. end_of_identities - 1` are per-identity records whose two
labels are the range of that identity's image keys. Without a header
(record 0 with flag == 0), every key in the `.idx` is an image record.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import struct
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC_BITS = 29
_MAX_LENGTH = (1 << _LREC_BITS) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24


class RecordIOError(ValueError):
    """A corrupt or truncated RecordIO file (the message names file and offset)."""


class IRHeader(NamedTuple):
    """mxnet's image record header; `label` is a float or, when flag > 0, f32[flag]."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Header + payload as mxnet `recordio.pack` does (array labels set flag)."""
    label = header.label
    if np.ndim(label) == 0:
        head = struct.pack(IR_FORMAT, 0, float(label), header.id, header.id2)
        return head + payload
    arr = np.asarray(label, dtype="<f4").ravel()
    head = struct.pack(IR_FORMAT, arr.size, 0.0, header.id, header.id2)
    return head + arr.tobytes() + payload


def unpack(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Record payload -> (IRHeader, remaining bytes), as mxnet `recordio.unpack`."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes, shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, record)
    rest = record[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"{where}: header announces {flag} float labels but only "
                                f"{len(rest)} bytes follow")
        label = np.frombuffer(rest, dtype="<f4", count=flag).copy()
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), rest


def write_record(f: BinaryIO, data: bytes) -> None:
    """Appends one record at f's position, split on magic words as dmlc does."""
    n = len(data)
    if n > _MAX_LENGTH:
        raise ValueError(f"RecordIO records must be < 2**29 bytes, got {n}")
    start = 0
    for i in range(0, n - n % 4, 4):
        if data[i:i + 4] == _MAGIC_BYTES:
            cflag = 1 if start == 0 else 2
            f.write(struct.pack("<II", MAGIC, (cflag << _LREC_BITS) | (i - start)))
            f.write(data[start:i])
            start = i + 4
    cflag = 3 if start else 0
    f.write(struct.pack("<II", MAGIC, (cflag << _LREC_BITS) | (n - start)))
    f.write(data[start:])
    f.write(b"\0" * (-(n - start) % 4))


def read_record(f: BinaryIO, offset: int, path: str | os.PathLike = "<stream>") -> tuple[bytes, int]:
    """Reads the record starting at byte `offset` -> (data, offset after it).

    Raises RecordIOError naming `path` and the offset of the bad part for a bad
    magic word, a bad continuation flag or a truncated part.
    """
    f.seek(offset)
    chunks: list[bytes] = []
    pos = offset
    first = True
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{path}: truncated RecordIO file: record header at offset {pos} "
                                f"has {len(head)} of 8 bytes")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{path}: corrupt RecordIO file: bad magic 0x{magic:08x} at offset "
                                f"{pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> _LREC_BITS, lrec & _MAX_LENGTH
        if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            raise RecordIOError(f"{path}: corrupt RecordIO file: unexpected continuation flag "
                                f"{cflag} at offset {pos}")
        padded = length + (-length % 4)
        body = f.read(padded)
        if len(body) < padded:
            raise RecordIOError(f"{path}: truncated RecordIO file: record at offset {pos} announces "
                                f"{length} bytes, only {len(body)} remain")
        chunks.append(body[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(chunks), pos
        first = False


def path(p: str | os.PathLike) -> "epath.Path":
    """A local path or a URL such as ``gs://bucket/train.rec`` (etils.epath: what TFDS uses)."""
    from etils import epath  # noqa: PLC0415

    return epath.Path(p)


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
    """Reads a `.idx` file (local or ``gs://``...) -> {key: byte offset}."""
    idx_path = path(idx_path)
    if not idx_path.is_file():
        raise FileNotFoundError(f"RecordIO index file not found: {idx_path}")
    index: dict[int, int] = {}
    with idx_path.open("r") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (IndexError, ValueError):
                raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', "
                                    f"got {line[:80]!r}") from None
            index[key] = offset
    return index


class IndexedRecordIO:
    """Random access to a `.rec` file through its `.idx` (reader only; local or ``gs://``...)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.idx_path = path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self.index = read_index(self.idx_path)
        self.size = self.rec_path.stat().length
        for key, offset in self.index.items():
            if not 0 <= offset < self.size:
                raise RecordIOError(f"{self.idx_path}: key {key} points at offset {offset}, outside "
                                    f"{self.rec_path} ({self.size} bytes): truncated .rec?")
        self._f = self.rec_path.open("rb")

    @property
    def keys(self) -> list[int]:
        return list(self.index)

    def read_idx(self, key: int) -> bytes:
        """The raw record stored under `key`."""
        if key not in self.index:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        data, _ = read_record(self._f, self.index[key], self.rec_path)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "IndexedRecordIO":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IndexedRecordIOWriter:
    """Writes a `.rec` and its `.idx` (for tests and for interoperability)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = pathlib.Path(rec_path)
        self.idx_path = pathlib.Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")

    def write_idx(self, key: int, data: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        write_record(self._rec, data)

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> "IndexedRecordIOWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_records(rec_path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Reads a `.rec` sequentially (no `.idx` needed) -> (offset, data) pairs."""
    rec_path = pathlib.Path(rec_path)
    size = rec_path.stat().st_size
    with open(rec_path, "rb") as f:
        offset = 0
        while offset < size:
            data, nxt = read_record(f, offset, rec_path)
            yield offset, data
            offset = nxt


@dataclasses.dataclass(frozen=True)
class FaceRecordLayout:
    """Which keys of an insightface `.rec` are images, and the identity records."""

    image_keys: Sequence[int]
    identity_keys: Sequence[int]


def face_record_layout(reader: IndexedRecordIO) -> FaceRecordLayout:
    """Reads record 0 and returns the image / identity key ranges (module docstring)."""
    if 0 not in reader.index:
        return FaceRecordLayout(sorted(reader.index), [])
    header, _ = unpack(reader.read_idx(0), f"{reader.rec_path} record 0")
    if header.flag == 0:
        return FaceRecordLayout(sorted(reader.index), [])
    labels = np.asarray(header.label)
    if labels.size < 2 or not np.all(np.isfinite(labels)):
        raise RecordIOError(f"{reader.rec_path}: header record 0 has labels {labels.tolist()}, "
                            f"expected (end_of_images, end_of_identities)")
    img_end, id_end = int(labels[0]), int(labels[1])
    if not 1 <= img_end <= id_end:
        raise RecordIOError(f"{reader.rec_path}: header record 0 has an invalid range "
                            f"(end_of_images={img_end}, end_of_identities={id_end})")
    image_keys = range(1, img_end)
    missing = [k for k in (1, img_end - 1) if img_end > 1 and k not in reader.index]
    if missing:
        raise RecordIOError(f"{reader.rec_path}: header says images are keys 1..{img_end - 1} "
                            f"but key {missing[0]} is not in {reader.idx_path}")
    return FaceRecordLayout(image_keys, range(img_end, id_end))


def image_label(header: IRHeader, where: str) -> int:
    """The integer identity label of an image record (first label when an array)."""
    label = header.label
    value = float(np.asarray(label).ravel()[0]) if np.ndim(label) else float(label)
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise RecordIOError(f"{where}: label {value} is not a non-negative integer")
    return int(value)


def write_face_rec(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None,
                   images: Sequence[tuple[float | Sequence[float], bytes]], *,
                   num_classes: int | None = None, ids: Sequence[int] | None = None) -> int:
    """Writes an insightface-layout `.rec` / `.idx` (module docstring) -> number of image records.

    ``images``: ``(label, encoded image)`` per image record, keys ``1 ..
    len(images)`` in order; a sequence label is stored as a float array (flag
    > 0). Record 0 is the header; identity ``c``'s record (keys after the
    images) holds the first and one-past-last key of the images labelled
    ``c`` (0, 0 when none). ``ids``: the IRHeader ``id`` of each image record
    (default its key). For tests, benchmarks and interoperability.
    """
    labels = [int(np.asarray(lbl, dtype=np.float64).ravel()[0]) for lbl, _ in images]
    num_classes = num_classes if num_classes is not None else (max(labels) + 1 if labels else 0)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for key, label in enumerate(labels, start=1):
        first.setdefault(label, key)
        last[label] = key
    n = len(images)
    with IndexedRecordIOWriter(rec_path, idx_path) as w:
        w.write_idx(0, pack(IRHeader(0, [n + 1, n + 1 + num_classes], 0, 0), b""))
        for key, (label, data) in enumerate(images, start=1):
            rec_id = key if ids is None else int(ids[key - 1])
            w.write_idx(key, pack(IRHeader(0, label, rec_id, 0), data))
        for c in range(num_classes):
            span = [float(first[c]), float(last[c] + 1)] if c in first else [0.0, 0.0]
            w.write_idx(n + 1 + c, pack(IRHeader(0, span, 0, 0), b""))
    return n
