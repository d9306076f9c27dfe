"""Readers for the LFW and CFP verification protocol files.

LFW ``pairs*.txt``
  * View 1 (``pairsDevTrain.txt``, ``pairsDevTest.txt``): the first line is
    the number N of same pairs; then N lines ``name<TAB>i<TAB>j`` (same person)
    and N lines ``name1<TAB>i<TAB>name2<TAB>j`` (different people).
  * View 2 (``pairs.txt``): the first line is ``n_folds<TAB>n`` (``10 300``);
    then for each fold n same lines followed by n different lines.
  Indices are 1-based image numbers: image i of ``name`` is
  ``name/name_{i:04d}.jpg``.
  Folds: View 2's are official (fold f = the f-th block of 2n lines). View 1
  has none; :func:`read_lfw_pairs` gives it balanced folds (the same pairs cut
  into 10 contiguous blocks, the different pairs likewise), the layout View 2
  uses, so that every fold holds both kinds.

CFP (``cfp-dataset/Protocol``)
  ``Pair_list_F.txt`` / ``Pair_list_P.txt``: ``index path`` lines, paths
  relative to ``Protocol/``. ``Split/{FF,FP}/01..10/{same,diff}.txt``: lines
  ``i,j``; i indexes Pair_list_F, j indexes Pair_list_F (FF) or Pair_list_P
  (FP). The official protocol evaluates each of the 10 split folders as a
  fold (train the threshold on the other 9): the fold ids returned here
  are those folders, NOT a KFold over the concatenated pairs.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from broadface_jax.evaluation.common import text_rows


@dataclasses.dataclass(frozen=True)
class PairList:
    """Verification pairs: image paths relative to ``root``, labels and folds."""

    root: str
    paths_a: list[str]
    paths_b: list[str]
    issame: np.ndarray  # bool[N]
    folds: np.ndarray  # int[N], fold id of each pair (0-based)

    def __len__(self) -> int:
        return len(self.paths_a)

    def unique_paths(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(sorted unique paths, index of path_a, index of path_b) into that list."""
        uniq = sorted(set(self.paths_a) | set(self.paths_b))
        pos = {p: i for i, p in enumerate(uniq)}
        idx_a = np.array([pos[p] for p in self.paths_a], np.int64)
        idx_b = np.array([pos[p] for p in self.paths_b], np.int64)
        return uniq, idx_a, idx_b


def _lfw_image(name: str, number: str, ext: str, path: str, lineno: int) -> str:
    try:
        n = int(number)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: image number {number!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"{path}:{lineno}: image number {n} must be >= 1 (1-based)")
    return f"{name}/{name}_{n:04d}.{ext}"


def _parse_lfw_pair(line: str, path: str, lineno: int, ext: str) -> tuple[str, str, bool]:
    fields = line.split()
    if len(fields) == 3:
        name, i, j = fields
        return _lfw_image(name, i, ext, path, lineno), _lfw_image(name, j, ext, path, lineno), True
    if len(fields) == 4:
        name1, i, name2, j = fields
        return _lfw_image(name1, i, ext, path, lineno), _lfw_image(name2, j, ext, path, lineno), False
    raise ValueError(f"{path}:{lineno}: expected 3 (same) or 4 (different) fields, got {len(fields)}: {line!r}")


def read_lfw_pairs(pairs_path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                   ext: str = "jpg", nfolds_view1: int = 10) -> PairList:
    """Reads an LFW View 1 or View 2 pairs file (see the module docstring).

    Args:
      pairs_path: ``pairsDevTest.txt``, ``pairsDevTrain.txt`` or ``pairs.txt``.
      images_dir: root the returned paths are relative to (recorded as
        ``PairList.root``); default: the folder of ``pairs_path``.
      ext: image file extension.
      nfolds_view1: number of balanced folds given to a View 1 file.
    """
    pairs_path = os.fspath(pairs_path)
    if not os.path.isfile(pairs_path):
        raise FileNotFoundError(f"LFW pairs file not found: {pairs_path}")
    with open(pairs_path, encoding="utf-8") as f:
        lines = [(n, ln.strip()) for n, ln in enumerate(f, start=1)]
    lines = [(n, ln) for n, ln in lines if ln]
    if not lines:
        raise ValueError(f"{pairs_path}: empty file")
    header = lines[0][1].split()
    try:
        counts = [int(x) for x in header]
    except ValueError:
        raise ValueError(f"{pairs_path}:1: header must be 'N' (View 1) or 'folds N' (View 2), got {lines[0][1]!r}") from None
    if len(counts) == 1:
        n_folds, per_class = 1, counts[0]
    elif len(counts) == 2:
        n_folds, per_class = counts
    else:
        raise ValueError(f"{pairs_path}:1: header must have 1 or 2 numbers, got {lines[0][1]!r}")
    body = lines[1:]
    expected = n_folds * 2 * per_class
    if len(body) != expected:
        raise ValueError(
            f"{pairs_path}: header {lines[0][1]!r} announces {expected} pair lines, found {len(body)}")
    paths_a, paths_b, issame, folds = [], [], [], []
    for k, (lineno, line) in enumerate(body):
        a, b, same = _parse_lfw_pair(line, pairs_path, lineno, ext)
        fold, pos = divmod(k, 2 * per_class)
        if same != (pos < per_class):
            kind = "same" if pos < per_class else "different"
            raise ValueError(f"{pairs_path}:{lineno}: expected a {kind}-person line here, got {line!r}")
        paths_a.append(a)
        paths_b.append(b)
        issame.append(same)
        folds.append(fold)
    issame_arr = np.asarray(issame, bool)
    if n_folds == 1:
        from broadface_jax.evaluation.verification import balanced_fold_ids

        fold_arr = balanced_fold_ids(issame_arr, nfolds_view1)
    else:
        fold_arr = np.asarray(folds, np.int64)
    root = os.fspath(images_dir) if images_dir is not None else os.path.dirname(pairs_path)
    return PairList(root, paths_a, paths_b, issame_arr, fold_arr)


def _read_cfp_pair_list(path: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for lineno, fields, line in text_rows(path, "CFP pair list"):
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'index path', got {line!r}")
        try:
            idx = int(fields[0])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: index {fields[0]!r} is not an integer") from None
        if idx in out:
            raise ValueError(f"{path}:{lineno}: index {idx} appears twice")
        # Paths are written relative to Protocol/: '../Data/Images/001/frontal/01.jpg'.
        rel = os.path.normpath(os.path.join("Protocol", fields[1])).replace(os.sep, "/")
        if rel.startswith("../"):
            raise ValueError(f"{path}:{lineno}: path {fields[1]!r} leaves the CFP folder")
        out[idx] = rel
    if not out:
        raise ValueError(f"{path}: empty pair list")
    return out


def _read_cfp_split(path: str, list_a: dict[int, str], list_b: dict[int, str],
                    name_a: str, name_b: str) -> list[tuple[str, str]]:
    pairs = []
    for lineno, fields, line in text_rows(path, "CFP split file", sep=","):
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'i,j', got {line!r}")
        try:
            i, j = int(fields[0]), int(fields[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: indices must be integers, got {line!r}") from None
        if i not in list_a:
            raise ValueError(f"{path}:{lineno}: index {i} is not in {name_a}")
        if j not in list_b:
            raise ValueError(f"{path}:{lineno}: index {j} is not in {name_b}")
        pairs.append((list_a[i], list_b[j]))
    return pairs


def read_cfp_pairs(cfp_root: str | os.PathLike, protocol: str) -> PairList:
    """Reads CFP's official 10-fold FF or FP protocol.

    Args:
      cfp_root: the ``cfp-dataset`` folder (holding ``Protocol/`` and ``Data/``).
      protocol: 'FF' (frontal-frontal) or 'FP' (frontal-profile).

    Returns a :class:`PairList` whose paths are relative to ``cfp_root``
    (``Data/Images/001/frontal/01.jpg``), ordered fold by fold, same pairs
    before different pairs, with ``folds`` = split folder - 1.
    """
    protocol = protocol.upper()
    if protocol not in ("FF", "FP"):
        raise ValueError(f"CFP protocol must be 'FF' or 'FP', got {protocol!r}")
    cfp_root = os.fspath(cfp_root)
    proto_dir = os.path.join(cfp_root, "Protocol")
    if not os.path.isdir(proto_dir):
        raise FileNotFoundError(f"CFP protocol folder not found: {proto_dir}")
    list_f = _read_cfp_pair_list(os.path.join(proto_dir, "Pair_list_F.txt"))
    list_b = list_f if protocol == "FF" else _read_cfp_pair_list(os.path.join(proto_dir, "Pair_list_P.txt"))
    name_b = "Pair_list_F.txt" if protocol == "FF" else "Pair_list_P.txt"
    split_dir = os.path.join(proto_dir, "Split", protocol)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"CFP split folder not found: {split_dir}")
    fold_dirs = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not fold_dirs:
        raise ValueError(f"{split_dir}: no fold folders (expected 01..10)")
    paths_a, paths_b, issame, folds = [], [], [], []
    for fold, d in enumerate(fold_dirs):
        for fname, same in (("same.txt", True), ("diff.txt", False)):
            pairs = _read_cfp_split(os.path.join(split_dir, d, fname), list_f, list_b,
                                    "Pair_list_F.txt", name_b)
            if not pairs:
                raise ValueError(f"{os.path.join(split_dir, d, fname)}: no pairs")
            for a, b in pairs:
                paths_a.append(a)
                paths_b.append(b)
                issame.append(same)
                folds.append(fold)
    return PairList(cfp_root, paths_a, paths_b, np.asarray(issame, bool), np.asarray(folds, np.int64))
