"""1:N identification with distractors, MegaFace style, in bounded memory.

Setting (MegaFace challenge 1, FaceScrub probes): every *genuine pair*
(probe p, gallery image g of the same identity, g != p) is one trial; the
gallery of that trial is g plus all N distractors.

* rank-r accuracy: the fraction of genuine pairs where fewer than r
  distractors score ``>= s(p, g)`` (a distractor tying the genuine score
  counts as ranked above it: the conservative choice).
* TAR @ FAR (MegaFace verification): genuine scores = all genuine pairs;
  impostor scores = all ``n_probes * N`` probe-distractor scores; the rule
  of :mod:`broadface_jax.evaluation.tar_far` (largest TAR with FAR <= target).

Memory: the distractors are read chunk by chunk (an array, a memmap or any
iterable of arrays); per chunk the ``[n_probes, chunk]`` score block is
reduced to (a) a running top-R per probe (R = max rank; a running max for
rank 1) and (b) a running global top-K impostor scores, with
``K = allowed_false_accepts(max FAR, n_probes * N) + 1`` (3,531 for FAR 1e-6
with 3,530 probes x 1M distractors). The full probe x distractor matrix never
exists. Only scores that beat the current K-th best are kept from each chunk,
so the global top-K costs one comparison pass per chunk once it has warmed up.

Features are L2-normalised here (float32); scores are cosines.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np

from broadface_jax.evaluation import tar_far
from broadface_jax.evaluation.common import l2_normalize


@dataclasses.dataclass(frozen=True)
class IdentificationResult:
    """Rank-r accuracies and TAR @ FAR of a MegaFace-style run."""

    rank_accuracy: dict[int, float]
    tar: dict[float, float]
    num_genuine: int
    num_probes: int
    num_distractors: int

    def metrics(self) -> dict[str, float]:
        out = {f"rank{r}": v for r, v in self.rank_accuracy.items()}
        out.update({f"tar@far={tar_far.format_far(f)}": v for f, v in self.tar.items()})
        return out


def _chunks(distractors: np.ndarray | Iterable[np.ndarray], chunk_size: int) -> Iterator[np.ndarray]:
    if isinstance(distractors, np.ndarray):
        for start in range(0, distractors.shape[0], chunk_size):
            yield distractors[start:start + chunk_size]
        return
    for block in distractors:
        block = np.asarray(block)
        for start in range(0, block.shape[0], chunk_size):
            yield block[start:start + chunk_size]


def genuine_pairs(probe_feats: np.ndarray, probe_labels: np.ndarray,
                  gallery_feats: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                  chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(probe index int64[G], cosine f32[G]) of every same-identity (probe, gallery) pair.

    Without a gallery the probes are their own gallery and a probe is never
    paired with itself (MegaFace / FaceScrub).
    """
    probes = l2_normalize(np.asarray(probe_feats, np.float32))
    probe_labels = np.asarray(probe_labels)
    same_set = gallery_feats is None
    gallery = probes if same_set else l2_normalize(np.asarray(gallery_feats, np.float32))
    gallery_labels = probe_labels if same_set else np.asarray(gallery_labels)
    if gallery_labels is None or gallery_labels.shape != (gallery.shape[0],):
        raise ValueError("gallery_labels must give one label per gallery row")
    idx_out, score_out = [], []
    for start in range(0, probes.shape[0], chunk_size):
        block = probes[start:start + chunk_size] @ gallery.T
        mask = probe_labels[start:start + chunk_size, None] == gallery_labels[None, :]
        if same_set:
            rows = np.arange(block.shape[0])
            mask[rows, start + rows] = False
        r, _ = np.nonzero(mask)
        idx_out.append(start + r)
        score_out.append(block[mask])
    return np.concatenate(idx_out).astype(np.int64), np.concatenate(score_out).astype(np.float32)


def _merge_topk(current: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    both = np.concatenate([current, candidates])
    if both.size <= k:
        return both
    return np.partition(both, both.size - k)[-k:]


def megaface_identification(probe_feats: np.ndarray, probe_labels: np.ndarray,
                            distractors: np.ndarray | Iterable[np.ndarray], *,
                            gallery_feats: np.ndarray | None = None,
                            gallery_labels: np.ndarray | None = None,
                            num_distractors: int | None = None,
                            ranks: Sequence[int] = (1,), fars: Sequence[float] = (1e-6,),
                            chunk_size: int = 8192) -> IdentificationResult:
    """Rank-r identification and TAR @ FAR against streamed distractors (module docstring).

    Args:
      probe_feats: f[Np, D] probe features (normalised here).
      probe_labels: identity of each probe.
      distractors: f[Nd, D] array / memmap, or an iterable of f[n_i, D] chunks
        (e.g. a generator producing them from a seed); read once.
      num_distractors: total rows of an iterable ``distractors`` (needed up
        front: it fixes how many top impostor scores to keep); checked.
      gallery_feats, gallery_labels: a separate gallery; default: the probes.
      ranks: the r of rank-r accuracy.
      fars: FARs for TAR @ FAR.
      chunk_size: distractor rows scored at once (memory ~ 4 * Np * chunk bytes).
    """
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    probes = l2_normalize(np.asarray(probe_feats, np.float32))
    gen_idx, gen_scores = genuine_pairs(probes, probe_labels, gallery_feats, gallery_labels)
    if gen_scores.size == 0:
        raise ValueError("no genuine pairs: every identity needs a second image (in the gallery)")
    n_probes = probes.shape[0]
    if isinstance(distractors, np.ndarray):
        if num_distractors is not None and num_distractors != distractors.shape[0]:
            raise ValueError(f"num_distractors={num_distractors} but the array has {distractors.shape[0]} rows")
        num_distractors = distractors.shape[0]
    elif num_distractors is None:
        raise ValueError("num_distractors is required when distractors is an iterable of chunks")
    if num_distractors <= 0:
        raise ValueError("no distractors")
    max_rank = max(ranks)
    top_rank = np.full((n_probes, max_rank), -np.inf, np.float32)  # per-probe top-R, unsorted
    top_imp = np.empty(0, np.float32)  # global top-K impostor scores
    k_imp = tar_far.allowed_false_accepts(max(fars), n_probes * num_distractors) + 1 if fars else 0
    n_dist = 0
    for chunk in _chunks(distractors, chunk_size):
        if chunk.ndim != 2 or chunk.shape[1] != probes.shape[1]:
            raise ValueError(f"distractor chunk has shape {chunk.shape}, expected [n, {probes.shape[1]}]")
        d = l2_normalize(np.asarray(chunk, np.float32))
        if not np.all(np.isfinite(d)):
            raise ValueError(f"distractors {n_dist}..{n_dist + d.shape[0] - 1} hold NaN or inf")
        s = probes @ d.T  # [Np, c]
        n_dist += d.shape[0]
        # (a) per-probe top-R
        if max_rank == 1:
            np.maximum(top_rank[:, 0], s.max(axis=1), out=top_rank[:, 0])
        else:
            both = np.concatenate([top_rank, s], axis=1)
            top_rank = np.partition(both, both.shape[1] - max_rank, axis=1)[:, -max_rank:]
        # (b) global top-K impostors: only scores >= the current K-th best can enter.
        if k_imp:
            if top_imp.size >= k_imp:
                cand = s[s >= top_imp.min()]
            else:
                cand = s.ravel()
            top_imp = _merge_topk(top_imp, cand, k_imp)
    if n_dist != num_distractors:
        raise ValueError(f"num_distractors={num_distractors} but the chunks held {n_dist} rows")
    top_sorted = -np.sort(-top_rank, axis=1)  # descending; -inf where fewer than R distractors
    rank_acc = {}
    for r in ranks:
        rank_acc[r] = float(np.mean(gen_scores > top_sorted[gen_idx, r - 1]))
    tars = tar_far.tar_at_far_from_top_negatives(gen_scores, top_imp, n_probes * n_dist, fars) if fars else {}
    return IdentificationResult(rank_acc, tars, int(gen_scores.size), n_probes, n_dist)
