"""Helpers shared by the evaluation protocols: embedding images and normalising.

An *embed function* (docs/ARCHITECTURE.md) maps uint8 RGB images
``u8[N, H, W, 3]`` to ``f32[N, D]`` unnormalised embeddings. Evaluators call it
in fixed-size batches (the last batch is padded by repeating its last image,
so a jitted embed function compiles once) and do the flip-and-sum themselves,
as insightface's ``verification.test`` does: ``e(x) + e(flip(x))``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

EmbedFn = Callable[[np.ndarray], np.ndarray]


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (rows of zeros stay zero), in x's float dtype.

    Same rule as ``sklearn.preprocessing.normalize``: a zero norm is treated as 1.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norm = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
    return x / np.where(norm < eps, 1.0, norm).astype(x.dtype)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(
            f"images must be a uint8 numpy array u8[N, H, W, 3], got "
            f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: nothing to embed")


def _call_embed(embed_fn: EmbedFn, batch: np.ndarray, start: int) -> np.ndarray:
    out = np.asarray(embed_fn(batch))
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(
            f"embed_fn must return f32[N, D] for N={batch.shape[0]} images, "
            f"got shape {out.shape} (images {start}..{start + batch.shape[0] - 1})")
    if not np.all(np.isfinite(out)):
        raise ValueError(
            f"embed_fn returned non-finite embeddings for images "
            f"{start}..{start + batch.shape[0] - 1} (NaN or inf: is the model diverged?)")
    return out.astype(np.float32, copy=False)


def embed_images(embed_fn: EmbedFn, images: np.ndarray, batch_size: int,
                 flip: bool = True) -> tuple[np.ndarray, float]:
    """Embeds ``images`` in batches; returns (features f32[N, D], xnorm).

    features: ``e(x) + e(x[:, :, ::-1])`` when ``flip`` (insightface's
    "Accuracy-Flip"), else ``e(x)``; not normalised.
    xnorm: mean L2 norm of all the embeddings computed (plain and, with
    ``flip``, flipped), the "XNorm" insightface's ``verification.test`` logs
    next to the accuracy.

    Every call to ``embed_fn`` gets exactly ``batch_size`` images: the last
    batch is padded with copies of its last image and the padding is dropped.
    """
    _check_images(images)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = images.shape[0]
    feats: np.ndarray | None = None
    norm_sum = 0.0
    for start in range(0, n, batch_size):
        batch = np.asarray(images[start:start + batch_size])
        count = batch.shape[0]
        if count < batch_size:
            pad = np.repeat(batch[-1:], batch_size - count, axis=0)
            batch = np.concatenate([batch, pad], axis=0)
        plain = _call_embed(embed_fn, batch, start)[:count]
        norm_sum += float(np.sum(np.linalg.norm(plain.astype(np.float64), axis=1)))
        if flip:
            flipped = _call_embed(embed_fn, np.ascontiguousarray(batch[:, :, ::-1, :]), start)[:count]
            norm_sum += float(np.sum(np.linalg.norm(flipped.astype(np.float64), axis=1)))
            plain = plain + flipped
        if feats is None:
            feats = np.empty((n, plain.shape[1]), np.float32)
        feats[start:start + count] = plain
    assert feats is not None
    return feats, norm_sum / (2 * n if flip else n)
