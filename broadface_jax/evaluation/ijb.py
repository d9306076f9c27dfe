"""IJB-B / IJB-C 1:1 template verification, as insightface ``arcface_torch/eval_ijbc.py``.

Pipeline (insightface's defaults F2 / N1 / D1):

1. Per image: ``e(x) + e(flip(x))`` (flip test "F2"; :func:`broadface_jax.
   evaluation.common.embed_images` on the 112x112 aligned faces).
2. Norm kept ("N1": ``normalize_images=False``) or each image feature
   L2-normalised first (``normalize_images=True``).
3. Detector-score weighting ("D1"): each feature multiplied by its face
   score from ``*_name_5pts_score.txt`` (pass ``face_scores``; None skips it).
4. Media pooling: the mean of the features of a template's images that
   share a media id (frames of one video, or a single photo).
5. Template pooling: the sum of the template's media means, L2-normalised.
6. Template-pair score: cosine of the two template features, computed in
   batches of ``batch_size`` pairs so memory stays bounded.
7. TAR @ FAR for FAR = 1e-6 ... 1e-1 (:mod:`broadface_jax.evaluation.tar_far`).

Steps 4-5 are one sparse matrix product ``W @ features`` with
``W[t, i] = 1 / (#images of i's media within template t)``, so the image
features are never copied or sorted.

Metadata formats (``<root>/meta/``, ``ijbc_`` or ``ijbb_`` prefix):
  * ``*_face_tid_mid.txt``: ``image_name template_id media_id``
  * ``*_template_pair_label.txt``: ``template_id_1 template_id_2 label``
  * ``*_name_5pts_score.txt``: ``image_name x1 y1 ... x5 y5 face_score``

:func:`run_ijb` does it all from insightface's IJB folder layout
(``<root>/meta/`` and ``<root>/loose_crop/``), aligning each loose crop by its
5 points with ``broadface_jax.align.warp_to_template`` (the ArcFace template,
as eval_ijbc.py's ``Embedding.get``) and streaming images through the embed
function batch by batch (469k aligned faces would not fit in memory).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from broadface_jax.evaluation import embedding, tar_far
from broadface_jax.evaluation.common import EmbedFn, l2_normalize, text_rows


def _read_columns(path: str | os.PathLike, ncols: int, what: str) -> list[list[str]]:
    path = os.fspath(path)
    rows = []
    for lineno, fields, line in text_rows(path, f"IJB {what} file"):
        if len(fields) != ncols:
            raise ValueError(f"{path}:{lineno}: expected {ncols} fields ({what}), got {len(fields)}: {line!r}")
        rows.append(fields)
    if not rows:
        raise ValueError(f"{path}: empty {what} file")
    return rows


def _ints(column: list[str], path: str, what: str) -> np.ndarray:
    try:
        return np.array(column, dtype=np.int64)
    except ValueError:
        bad = next(x for x in column if not x.lstrip("-").isdigit())
        raise ValueError(f"{path}: {what} {bad!r} is not an integer") from None


def read_template_media(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``*_face_tid_mid.txt`` -> (image names, template ids int64[N], media ids int64[N])."""
    rows = _read_columns(path, 3, "face/template/media")
    names = [r[0] for r in rows]
    return (names, _ints([r[1] for r in rows], os.fspath(path), "template id"),
            _ints([r[2] for r in rows], os.fspath(path), "media id"))


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``*_template_pair_label.txt`` -> (template 1, template 2, label) int64 vectors.

    Parsed with ``np.loadtxt`` (NumPy's C reader: ~15.7M IJB-C lines).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB template pair file not found: {path}")
    try:
        arr = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: not 'template_id_1 template_id_2 label' integer lines: {e}") from e
    if arr.shape[0] == 0 or arr.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 integer columns, got shape {arr.shape}")
    labels = arr[:, 2]
    if not np.all((labels == 0) | (labels == 1)):
        bad = labels[(labels != 0) & (labels != 1)][0]
        raise ValueError(f"{path}: label {bad} is not 0 or 1")
    return arr[:, 0].copy(), arr[:, 1].copy(), labels.copy()


def read_landmarks_scores(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``*_name_5pts_score.txt`` -> (image names, landmarks f32[N, 5, 2], face scores f32[N])."""
    path = os.fspath(path)
    rows = _read_columns(path, 12, "name/5 points/score")
    try:
        values = np.array([r[1:] for r in rows], dtype=np.float32)
    except ValueError as e:
        raise ValueError(f"{path}: landmark and score columns must be numbers: {e}") from e
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: landmarks or scores hold NaN or inf")
    return [r[0] for r in rows], values[:, :10].reshape(-1, 5, 2), values[:, 10].copy()


def pooling_matrix(templates: np.ndarray, medias: np.ndarray, image_weights: np.ndarray | None = None):
    """Sparse W [T, N] (float32) with template features = W @ image features; and sorted unique templates.

    ``W[t, i] = image_weights[i] / (#images of i's media within template t)``
    for the images i of template t: media means summed per template.
    """
    import scipy.sparse

    templates = np.asarray(templates, np.int64)
    medias = np.asarray(medias, np.int64)
    if templates.shape != medias.shape or templates.ndim != 1:
        raise ValueError(f"templates {templates.shape} and medias {medias.shape} must be equal-length vectors")
    unique_t, t_idx = np.unique(templates, return_inverse=True)
    t_idx = t_idx.reshape(-1)
    # (template, media) groups: images of one media inside one template are averaged.
    _, g_idx, g_count = np.unique(np.stack([t_idx, medias], 1), axis=0, return_inverse=True, return_counts=True)
    weights = 1.0 / g_count[g_idx.reshape(-1)]
    if image_weights is not None:
        weights = weights * image_weights
    n = templates.shape[0]
    w = scipy.sparse.csr_matrix((weights.astype(np.float32), (t_idx, np.arange(n))),
                                shape=(unique_t.shape[0], n))
    return w, unique_t


def image_to_template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                               face_scores: np.ndarray | None = None,
                               normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Image features -> (L2-normalised template features f32[T, D], sorted unique template ids).

    ``img_feats`` rows follow the metadata rows (flip-summed by the caller).
    Per-image normalisation and face-score weighting are folded into the
    sparse pooling weights (``W @ diag(score_i / |f_i|)``), so the image
    feature matrix (~0.9 GB for IJB-C) is never copied.
    """
    img_feats = np.asarray(img_feats)
    if img_feats.ndim != 2 or img_feats.shape[0] != np.shape(templates)[0]:
        raise ValueError(f"img_feats {img_feats.shape} must be [N, D] with N = {np.shape(templates)[0]} metadata rows")
    feats = img_feats.astype(np.float32, copy=False)
    if not np.all(np.isfinite(feats)):
        raise ValueError("image features hold NaN or inf")
    scale = np.ones(feats.shape[0], np.float64)
    if normalize_images:
        norms = np.sqrt(np.einsum("ij,ij->i", feats, feats, dtype=np.float64))
        scale /= np.where(norms < 1e-12, 1.0, norms)
    if face_scores is not None:
        face_scores = np.asarray(face_scores, np.float64)
        if face_scores.shape != (feats.shape[0],):
            raise ValueError(f"face_scores {face_scores.shape} must have one score per image ({feats.shape[0]})")
        scale *= face_scores
    w, unique_t = pooling_matrix(templates, medias, scale)
    template_feats = np.asarray(w @ feats, np.float32)
    return l2_normalize(template_feats), unique_t


def template_rows(unique_templates: np.ndarray, template_ids: np.ndarray) -> np.ndarray:
    """Row of each template id in the sorted ``unique_templates``; a clear error for unknown ids."""
    unique_templates = np.asarray(unique_templates)
    template_ids = np.asarray(template_ids, np.int64)
    idx = np.minimum(np.searchsorted(unique_templates, template_ids), unique_templates.shape[0] - 1)
    missing = unique_templates[idx] != template_ids
    if np.any(missing):
        raise ValueError(f"template id {template_ids[missing][0]} of the pair list has no images in the metadata")
    return idx.astype(np.int32) if unique_templates.shape[0] < 2**31 else idx


def template_pair_scores(template_feats: np.ndarray, unique_templates: np.ndarray,
                         t1: np.ndarray, t2: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Cosine score f32[P] of each template pair, ``batch_size`` pairs at a time.

    The two gathered feature blocks are reused buffers of ``batch_size x D``
    floats: memory stays ~2 x 16 MB at D = 512, and small blocks stay in cache
    (8k-pair blocks ran about 2x faster than insightface's 100k on the 2-core
    benchmark machine, see benchmarks/bench_eval_ijb.py).
    """
    t1 = np.asarray(t1, np.int64)
    t2 = np.asarray(t2, np.int64)
    if t1.shape != t2.shape or t1.ndim != 1:
        raise ValueError(f"t1 {t1.shape} and t2 {t2.shape} must be equal-length vectors")
    feats = np.ascontiguousarray(template_feats, np.float32)
    rows1, rows2 = template_rows(unique_templates, t1), template_rows(unique_templates, t2)
    n = t1.shape[0]
    buf1 = np.empty((min(batch_size, n), feats.shape[1]), np.float32)
    buf2 = np.empty_like(buf1)
    scores = np.empty(n, np.float32)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        a, b = buf1[:stop - start], buf2[:stop - start]
        np.take(feats, rows1[start:stop], axis=0, out=a)
        np.take(feats, rows2[start:stop], axis=0, out=b)
        scores[start:stop] = np.einsum("ij,ij->i", a, b)
    return scores


def evaluate_ijb(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                 t1: np.ndarray, t2: np.ndarray, labels: np.ndarray,
                 face_scores: np.ndarray | None = None, normalize_images: bool = False,
                 fars: Sequence[float] = tar_far.DEFAULT_FARS, rule: str = "max_tpr",
                 batch_size: int = 8192) -> dict[str, float]:
    """Template pooling + pair scoring + TAR @ FAR: ``{'tar@far=1e-4': ..., ...}``.

    ``rule``: 'max_tpr' (:func:`tar_far.tar_at_far`, the conservative rule) or
    'insightface' (nearest ROC point, as eval_ijbc.py's table).
    """
    template_feats, unique_t = image_to_template_features(img_feats, templates, medias, face_scores,
                                                          normalize_images)
    scores = template_pair_scores(template_feats, unique_t, t1, t2, batch_size)
    if rule == "max_tpr":
        tars = tar_far.tar_at_far(scores, labels, fars)
    elif rule == "insightface":
        tars = tar_far.tar_at_far_insightface(scores, labels, fars)
    else:
        raise ValueError(f"rule must be 'max_tpr' or 'insightface', got {rule!r}")
    return {f"tar@far={tar_far.format_far(f)}": v for f, v in tars.items()}


def embed_aligned_images(embed_fn: EmbedFn, image_dir: str | os.PathLike, names: Sequence[str],
                         landmarks: np.ndarray, batch_size: int, flip: bool = True,
                         size: int = 112) -> np.ndarray:
    """Per-image features f32[N, D] (flip-summed when ``flip``) of IJB loose crops, streamed.

    Each image ``image_dir/name`` is aligned by its 5 points (``landmarks``
    f[N, 5, 2], loose-crop pixel coordinates) to ``size`` x ``size``; only one
    batch of aligned faces is held at a time, and each process reads and
    embeds only its share (:func:`broadface_jax.evaluation.embedding.embed_source`).
    """
    from broadface_jax import align

    landmarks = np.asarray(landmarks)
    if landmarks.shape != (len(names), 5, 2):
        raise ValueError(f"landmarks {landmarks.shape} must be [{len(names)}, 5, 2]")
    image_dir = os.fspath(image_dir)

    def load(i: int) -> np.ndarray:
        path = os.path.join(image_dir, names[i])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"IJB image {names[i]!r} (row {i + 1} of the metadata) not found: {path}")
        return align.warp_to_template(align.read_rgb(path), landmarks[i], size)

    source = embedding.FileSource(len(names), load, (size, size, 3), what="IJB image")
    return embedding.embed_source(embed_fn, source, batch_size, flip, what=f"IJB images in {image_dir}").features


def run_ijb(embed_fn: EmbedFn, root: str | os.PathLike, target: str = "IJBC", batch_size: int = 256,
            flip: bool = True, normalize_images: bool = False, use_face_scores: bool = True,
            fars: Sequence[float] = tar_far.DEFAULT_FARS, rule: str = "max_tpr",
            size: int = 112) -> dict[str, float]:
    """IJB-B / IJB-C 1:1 from insightface's folder layout (module docstring); defaults F2 / N1 / D1."""
    target = target.upper()
    if target not in ("IJBB", "IJBC"):
        raise ValueError(f"target must be 'IJBB' or 'IJBC', got {target!r}")
    meta = os.path.join(os.fspath(root), "meta")
    prefix = os.path.join(meta, target.lower())
    names, templates, medias = read_template_media(f"{prefix}_face_tid_mid.txt")
    t1, t2, labels = read_template_pairs(f"{prefix}_template_pair_label.txt")
    lmk_names, landmarks, face_scores = read_landmarks_scores(f"{prefix}_name_5pts_score.txt")
    if lmk_names != names:
        raise ValueError(f"{prefix}_name_5pts_score.txt and {prefix}_face_tid_mid.txt list different images "
                         f"(or in a different order)")
    crops = os.path.join(os.fspath(root), "loose_crop")
    if not os.path.isdir(crops):
        raise FileNotFoundError(f"IJB {target}: no loose_crop/ folder in {os.fspath(root)}")
    feats = embed_aligned_images(embed_fn, crops, names, landmarks, batch_size, flip, size)
    return evaluate_ijb(feats, templates, medias, t1, t2, labels,
                        face_scores if use_face_scores else None, normalize_images, fars, rule)
