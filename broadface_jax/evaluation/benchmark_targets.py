"""Evaluation types for the large face benchmarks, read from their released folder layouts.

All images are embedded through :func:`.embedding.embed_source` (one batch in
memory at a time, each process its share), flip-summed unless ``flip=False``.

* ``ijbb`` / ``ijbc`` (option ``root``, positional): insightface's IJB layout,
  ``<root>/meta/ijbc_face_tid_mid.txt``, ``ijbc_template_pair_label.txt``,
  ``ijbc_name_5pts_score.txt`` and ``<root>/loose_crop/`` (``root`` is e.g.
  ``IJB_release/IJBC``; ``ijbb_`` files for IJB-B). Each loose crop is aligned
  by its 5 points; 1:1 template verification of :func:`.ijb.evaluate_ijb`
  (options ``normalize_images``, ``use_face_scores``, ``fars``, ``rule``).
  Metrics ``tar@far=1e-4`` ...
* ``megaface`` (``root``): MegaFace challenge 1 with the devkit's JSON lists,
  ``<root>/<probe_list>`` (``{"path": [...], "id": [...]}``, FaceScrub probes,
  default ``devkit/templatelists/facescrub_features_list.json``) and
  ``<root>/<distractor_list>`` (``{"path": [...]}``, default
  ``devkit/templatelists/megaface_features_list.json_1000000_1``); the listed
  paths are read under ``<root>/<probe_dir>`` / ``<root>/<distractor_dir>``
  (aligned faces, e.g. insightface's ``facescrub_images`` /
  ``megaface_images``; other sizes are resized to ``config.image_size``).
  Distractors are embedded ``chunk_size`` at a time and streamed into
  :func:`.identification.megaface_identification` (the 1M x D features never
  exist at once). Metrics ``rank1`` ... and ``tar@far=1e-6`` ...
* ``ytf`` (``root``): YouTube Faces set-to-set verification,
  ``<root>/<splits>`` (default ``splits.txt``: a header line, then
  ``split, pair, Name/video, Name/video, is_same[, ...]`` comma-separated;
  the split number 1..10 is the fold) and the frames in
  ``<root>/<frames_dir>/<Name>/<video>/`` (default ``aligned_images_DB``;
  every image file, sorted by name, at most ``max_frames`` of them, 0 = all),
  each frame centre-cropped to ``center_crop`` of its shorter side and
  resized to ``config.image_size``. A video's feature is the mean of its
  L2-normalised frame features (:mod:`.set_to_set`); metrics as the pair
  targets (accuracy ± std over the 10 folds, VAL @ FAR, threshold, XNorm of
  the frame embeddings).

Errors name the file (and line or list entry) at fault.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from broadface_jax.evaluation import embedding, identification, ijb, set_to_set, tar_far
from broadface_jax.evaluation.common import EmbedFn, text_rows
from broadface_jax.evaluation.registry import REQUIRED, TargetType, register

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _read_face(path: str, size: int, crop: float = 1.0) -> np.ndarray:
    """u8[size, size, 3] of an image file: centre crop of ``crop`` x its shorter side, resized."""
    from PIL import Image

    from broadface_jax import align

    image = align.read_rgb(path)
    if crop < 1.0:
        h, w = image.shape[:2]
        side = max(1, int(round(min(h, w) * crop)))
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    return image


def _root(root: str, name: str, type_name: str) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"evaluation target {name!r} ({type_name}): root folder not found: {root}")
    return root


# ------------------------------------------------------------------ IJB
class IJBEvaluator:
    """IJB-B / IJB-C 1:1 verification (module docstring)."""

    def __init__(self, name: str, target: str, root: str, image_size: int, batch_size: int,
                 options: dict[str, Any]):
        self.name, self.target, self.root = name, target, root
        self.image_size, self.batch_size, self.options = int(image_size), int(batch_size), options

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        del out_dir
        o = self.options
        return ijb.run_ijb(embed_fn, _root(self.root, self.name, self.target.lower()), self.target,
                           self.batch_size, flip=o["flip"], normalize_images=o["normalize_images"],
                           use_face_scores=o["use_face_scores"], fars=tuple(o["fars"]), rule=o["rule"],
                           size=self.image_size)


_IJB_OPTIONS = {"root": REQUIRED, "flip": True, "normalize_images": False, "use_face_scores": True,
                "fars": tuple(tar_far.DEFAULT_FARS), "rule": "max_tpr"}
for _t in ("IJBB", "IJBC"):
    register(_t.lower(), TargetType(
        lambda name, c, o, t=_t: IJBEvaluator(name, t, o["root"], c.image_size, c.eval.batch_size, o),
        _IJB_OPTIONS, positional="root", choices={"rule": ("max_tpr", "insightface")},
        summary=f"{_t} 1:1 template verification from insightface's IJB_release/{_t} layout"))


# ------------------------------------------------------------------ MegaFace
def read_devkit_list(path: str, need_ids: bool) -> tuple[list[str], list[str] | None]:
    """(paths, ids or None) of a MegaFace devkit JSON template list."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MegaFace list not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("path"), list) or not data["path"]:
        raise ValueError(f"{path}: expected a JSON object with a non-empty 'path' list")
    paths = [str(p) for p in data["path"]]
    ids = None
    if need_ids:
        ids = data.get("id")
        if not isinstance(ids, list) or len(ids) != len(paths):
            raise ValueError(f"{path}: expected an 'id' list as long as 'path' ({len(paths)} entries), "
                             f"got {type(ids).__name__} of {len(ids) if isinstance(ids, list) else 0}")
        ids = [str(i) for i in ids]
    return paths, ids


def _file_source(folder: str, paths: Sequence[str], size: int, list_path: str,
                 crop: float = 1.0) -> embedding.FileSource:
    def load(i: int) -> np.ndarray:
        full = os.path.join(folder, paths[i])
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{list_path}: entry {i} ({paths[i]!r}) not found: {full}")
        return _read_face(full, size, crop)

    return embedding.FileSource(len(paths), load, (size, size, 3), what=f"{os.path.basename(list_path)} image")


class _Range:
    """Rows ``[start, stop)`` of a source, as a source."""

    def __init__(self, source: embedding.FileSource, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop
        self.image_shape = source.image_shape

    def __len__(self) -> int:
        return self.stop - self.start

    def batches(self, start: int, stop: int, batch_size: int):
        return self.source.batches(self.start + start, self.start + stop, batch_size)


class MegaFaceEvaluator:
    """MegaFace challenge 1 identification with streamed distractors (module docstring)."""

    def __init__(self, name: str, config: Any, o: dict[str, Any]):
        self.name, self.o = name, o
        self.image_size, self.batch_size = int(config.image_size), int(config.eval.batch_size)
        if int(o["chunk_size"]) < 1:
            raise ValueError(f"evaluation target {name!r}: chunk_size={o['chunk_size']} must be >= 1")

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        del out_dir
        o, size = self.o, self.image_size
        root = _root(o["root"], self.name, "megaface")
        probe_list = os.path.join(root, o["probe_list"])
        dist_list = os.path.join(root, o["distractor_list"])
        probe_paths, probe_ids = read_devkit_list(probe_list, need_ids=True)
        dist_paths, _ = read_devkit_list(dist_list, need_ids=False)
        probes = embedding.embed_source(
            embed_fn, _file_source(os.path.join(root, o["probe_dir"]), probe_paths, size, probe_list),
            self.batch_size, o["flip"], what=f"MegaFace probes of {probe_list}").features
        _, labels = np.unique(np.asarray(probe_ids), return_inverse=True)
        dist_source = _file_source(os.path.join(root, o["distractor_dir"]), dist_paths, size, dist_list)
        chunk = int(o["chunk_size"])

        def distractor_chunks():
            for a in range(0, len(dist_paths), chunk):
                part = _Range(dist_source, a, min(a + chunk, len(dist_paths)))
                yield embedding.embed_source(embed_fn, part, self.batch_size, o["flip"],
                                             what=f"MegaFace distractors {a}.. of {dist_list}").features

        result = identification.megaface_identification(
            probes, labels.reshape(-1), distractor_chunks(), num_distractors=len(dist_paths),
            ranks=tuple(int(r) for r in o["ranks"]), fars=tuple(float(f) for f in o["fars"]))
        return result.metrics()


register("megaface", TargetType(
    MegaFaceEvaluator,
    {"root": REQUIRED, "probe_list": "devkit/templatelists/facescrub_features_list.json",
     "distractor_list": "devkit/templatelists/megaface_features_list.json_1000000_1",
     "probe_dir": "facescrub_images", "distractor_dir": "megaface_images",
     "ranks": (1,), "fars": (1e-6,), "flip": True, "chunk_size": 65536},
    positional="root", summary="MegaFace challenge 1 (FaceScrub probes, devkit lists): rank-r, TAR @ FAR"))


# ------------------------------------------------------------------ YTF
def read_ytf_splits(path: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(first videos, second videos, issame bool[P], folds int[P]) of a YTF ``splits.txt``."""
    a, b, same, folds = [], [], [], []
    for lineno, fields, line in text_rows(path, "YTF splits file", sep=","):
        if not fields[0].isdigit():
            continue  # the header
        if len(fields) < 5 or not fields[1].isdigit() or fields[4] not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: expected 'split, pair, Name/video, Name/video, "
                             f"is_same(0/1)[, ...]', got {line!r}")
        folds.append(int(fields[0]) - 1)
        a.append(fields[2])
        b.append(fields[3])
        same.append(fields[4] == "1")
    if not a:
        raise ValueError(f"{path}: no pairs")
    return a, b, np.asarray(same, bool), np.asarray(folds, np.int64)


class YTFEvaluator:
    """YouTube Faces set-to-set verification (module docstring)."""

    def __init__(self, name: str, config: Any, o: dict[str, Any]):
        self.name, self.o = name, o
        self.image_size, self.batch_size = int(config.image_size), int(config.eval.batch_size)
        if not 0 < float(o["center_crop"]) <= 1 or int(o["max_frames"]) < 0:
            raise ValueError(f"evaluation target {name!r}: center_crop={o['center_crop']} must be in "
                             f"(0, 1] and max_frames={o['max_frames']} >= 0")

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        del out_dir
        o = self.o
        root = _root(o["root"], self.name, "ytf")
        splits = os.path.join(root, o["splits"])
        frames_dir = os.path.join(root, o["frames_dir"])
        first, second, issame, folds = read_ytf_splits(splits)
        videos = sorted(set(first) | set(second))
        paths, set_ids = [], []
        for v, video in enumerate(videos):
            folder = os.path.join(frames_dir, video)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{splits}: video {video!r} has no frames folder {folder}")
            frames = sorted(x for x in os.listdir(folder) if x.lower().endswith(IMAGE_SUFFIXES))
            if int(o["max_frames"]):
                frames = frames[:int(o["max_frames"])]
            if not frames:
                raise FileNotFoundError(f"{splits}: video {video!r}: no image files in {folder}")
            paths += [os.path.join(video, x) for x in frames]
            set_ids += [v] * len(frames)
        source = _file_source(frames_dir, paths, self.image_size, splits, float(o["center_crop"]))
        out = embedding.embed_source(embed_fn, source, self.batch_size, o["flip"],
                                     what=f"YTF frames of {splits}")
        index = {video: v for v, video in enumerate(videos)}
        result = set_to_set.evaluate_set_pairs(out.features, np.asarray(set_ids), [index[x] for x in first],
                                               [index[x] for x in second], issame, folds=folds)
        return {**result.metrics(), "xnorm": out.xnorm}


register("ytf", TargetType(
    YTFEvaluator,
    {"root": REQUIRED, "splits": "splits.txt", "frames_dir": "aligned_images_DB", "max_frames": 0,
     "center_crop": 1.0, "flip": True},
    positional="root", summary="YouTube Faces set-to-set verification (splits.txt, 10 folds)"))
