"""Helpers shared by the evaluation protocols: normalising, protocol text files, the embedding path's names.

An *embed function* (docs/ARCHITECTURE.md) maps uint8 RGB images
``u8[N, H, W, 3]`` to ``f32[N, D]`` unnormalised embeddings. Evaluators embed
through :mod:`broadface_jax.evaluation.embedding` (fixed-size zero-padded
batches, flip-and-sum ``e(x) + e(flip(x))`` as insightface's
``verification.test``, each process its share); ``EmbedFn`` and
``embed_images`` are re-exported here for the protocol modules.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from broadface_jax.evaluation.embedding import EmbedFn, embed_images  # noqa: F401  (re-exported)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (rows of zeros stay zero), in x's float dtype.

    Same rule as ``sklearn.preprocessing.normalize``: a zero norm is treated as 1.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norm = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
    return x / np.where(norm < eps, 1.0, norm).astype(x.dtype)


def text_rows(path: str | os.PathLike, what: str, sep: str | None = None
              ) -> Iterator[tuple[int, list[str], str]]:
    """``(line number, fields, stripped line)`` of each non-blank line of a protocol text file.

    Fields are split on white space, or on ``sep`` and stripped. A missing
    file is a ``FileNotFoundError`` ``'<what> not found: <path>'``; the
    caller checks the fields and names ``path:line`` in its errors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                fields = line.split() if sep is None else [x.strip() for x in line.split(sep)]
                yield lineno, fields, line.strip()
