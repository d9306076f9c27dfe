"""Shared pieces of the face TFDS builders: features, image checks and encoding.

Every image is decoded in full before it is written (:func:`face_jpeg`): a
file that is not an image, is cut short, or whose JPEG scan data is damaged
(libjpeg's "Corrupt JPEG data" warnings, which PIL and TensorFlow otherwise
accept silently, filling the rest with grey) raises :class:`BadImageError`
naming the file. The builders skip such files and list them
(:class:`SkipList`; ``broadface_jax.prepare`` writes ``skipped.txt``), or
stop at the first with ``strict=True``. A flipped bit inside the scan data
that still decodes cannot be told from a real image (JPEG has no checksum).
"""

from __future__ import annotations

import io
import os
import tempfile
import threading

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SIZE = 112
JPEG_QUALITY = 95


def face_features() -> tfds.features.FeaturesDict:
    """Aligned 112x112 JPEG face, integer identity label, identity name, source file."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
        "label": tfds.features.Scalar(dtype=np.int64, doc="identity, 0 .. num_classes - 1"),
        "identity": tfds.features.Text(doc="identity name (or id) of the label"),
        "file": tfds.features.Text(doc="source of the image: file path or record"),
    })


class FaceBuilderMixin:
    """Mixin (before ``tfds.core.GeneratorBasedBuilder``) of every face builder: version
    1.0.0 and its info, :func:`face_features` with ``(image, label)`` as the supervised
    keys, ``HOMEPAGE`` (set by the builder; None: none) and an empty metadata dict the
    builder fills (``num_classes``, skipped images)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    HOMEPAGE: str | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=face_features(),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
            homepage=self.HOMEPAGE,
        )


def encode_jpeg(image_u8: np.ndarray) -> bytes:
    """u8[H, W, 3] -> JPEG bytes (quality 95)."""
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class BadImageError(ValueError):
    """An image file that does not decode in full; the message names the file."""


#: libjpeg's warnings about damaged scan data (jerror.h: JWRN_*), as printed to stderr.
_LIBJPEG_WARNINGS = (b"Corrupt JPEG data", b"Premature end of JPEG file",
                     b"Invalid SOS parameters", b"Unsupported marker type")
_STDERR_LOCK = threading.Lock()


def jpeg_scan_warning(data: bytes) -> str | None:
    """libjpeg's warning for damaged JPEG scan data, or None when it decodes cleanly.

    Decodes with TensorFlow's libjpeg while file descriptor 2 goes to a
    temporary file (libjpeg prints its warnings there and decodes on); any
    other text written meanwhile is passed on to the real stderr.
    """
    import tensorflow as tf  # noqa: PLC0415 (TFDS has imported it already)

    with _STDERR_LOCK, tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            tf.io.decode_jpeg(data, channels=3)
            error = None
        except tf.errors.OpError as e:  # (PIL decoded it: rarely reached)
            error = str(e).splitlines()[0]
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read()
    found = [line for line in text.splitlines() if line.startswith(_LIBJPEG_WARNINGS)]
    rest = b"\n".join(line for line in text.splitlines() if line not in found)
    if rest.strip():
        os.write(2, rest + b"\n")
    if found:
        return found[0].decode(errors="replace")
    return error


def _describe(error: BaseException) -> str:
    text = str(error)
    if isinstance(error, Image.UnidentifiedImageError) or "cannot identify image file" in text:
        return "not an image (PIL cannot identify it)"  # not "<_io.BytesIO object at 0x...>"
    return " ".join(f"{type(error).__name__}: {text}".split())


def face_jpeg(data: bytes, where: str, size: int = IMAGE_SIZE) -> bytes:
    """Checks an encoded image and returns JPEG bytes of a size x size RGB face.

    The image is fully decoded: a file that is not an image, is truncated, or
    (JPEG) has damaged scan data raises :class:`BadImageError` naming
    `where`. A JPEG that is already size x size RGB is kept byte for byte (no
    re-encoding loss, as insightface's .rec images); anything else is
    converted to RGB, resized (bilinear) and encoded as JPEG.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and, for PNG, chunk checksums
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # every pixel: a truncated file raises here
            is_jpeg = im.format == "JPEG"
            if is_jpeg and im.mode == "RGB" and im.size == (size, size):
                rgb = None
            else:
                rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{where}: corrupt or unreadable image: {_describe(e)}") from e
    if is_jpeg:
        warning = jpeg_scan_warning(data)
        if warning is not None:
            raise BadImageError(f"{where}: damaged JPEG data ({warning.strip()})")
    if rgb is None:
        return data
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return encode_jpeg(np.asarray(rgb))


def example(jpeg: bytes, label: int, identity: str, file: str) -> dict:
    return {"image": jpeg, "label": int(label), "identity": identity, "file": file}


class SkipList:
    """The images a preparation left out: ``(file, reason)`` in order, or stop at the first.

    ``strict=True`` re-raises the first :class:`BadImageError` (one line naming
    the file); otherwise each is logged and listed, and :meth:`names` goes to
    the data set's metadata (``skipped['bad_images']``), from which
    ``broadface_jax.prepare`` writes ``skipped.txt`` and prints the count.
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.entries: list[tuple[str, str]] = []

    def skip(self, name: str, error: BadImageError) -> None:
        from absl import logging  # noqa: PLC0415

        if self.strict:
            raise error
        reason = str(error)
        self.entries.append((name, reason))
        logging.warning("skipped bad image %d: %s", len(self.entries), reason)

    def names(self) -> list[str]:
        """``"<file>\t<reason>"`` per skipped image."""
        return [f"{name}\t{reason}" for name, reason in self.entries]
