"""Shared pieces of the face TFDS builders: features, image checks and encoding."""

from __future__ import annotations

import io

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


def encode_jpeg(image_u8: np.ndarray) -> bytes:
    """u8[H, W, 3] -> JPEG bytes (quality 95)."""
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def face_jpeg(data: bytes, where: str, size: int = IMAGE_SIZE) -> bytes:
    """Checks an encoded image and returns JPEG bytes of a size x size RGB face.

    The image is fully decoded (a truncated or corrupt file raises ValueError
    naming `where`). A JPEG that is already size x size RGB is kept byte for
    byte (no re-encoding loss, as insightface's .rec images); anything else is
    converted to RGB, resized (bilinear) and encoded as JPEG.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size):
                return data
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"corrupt or unreadable image in {where}: {e}") from e
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return encode_jpeg(np.asarray(rgb))


def example(jpeg: bytes, label: int, identity: str, file: str) -> dict:
    return {"image": jpeg, "label": int(label), "identity": identity, "file": file}
