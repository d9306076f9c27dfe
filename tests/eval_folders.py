"""Miniature benchmark folders in their released layouts, written by the tests, and a tiny embed function.

* :func:`write_ijb`: insightface's ``IJB_release/IJBC`` (``meta/`` lists + ``loose_crop/``).
* :func:`write_megaface`: the MegaFace devkit's JSON lists + aligned probe / distractor images.
* :func:`write_ytf`: YouTube Faces ``splits.txt`` + ``aligned_images_DB/<Name>/<video>/`` frames.

Every writer returns what its lists say, for the tests' own reference computations.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

from broadface_jax import align


class PoolProject:
    """A deterministic 'model': 4x4 mean pool, flatten, fixed Gaussian projection (float64 inside)."""

    def __init__(self, seed: int, dim: int = 8):
        self.seed, self.dim, self.proj = seed, dim, {}

    def features64(self, x: np.ndarray) -> np.ndarray:
        n, h, w, _ = x.shape
        pooled = x.astype(np.float64).reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4)) / 255.0 - 0.5
        flat = pooled.reshape(n, -1)
        if flat.shape[1] not in self.proj:
            self.proj[flat.shape[1]] = np.random.default_rng(self.seed).normal(size=(flat.shape[1], self.dim))
        return flat @ self.proj[flat.shape[1]]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.features64(x).astype(np.float32)

    def flip_sum(self, x: np.ndarray) -> np.ndarray:
        return (self(x) + self(np.ascontiguousarray(x[:, :, ::-1]))).astype(np.float64)


def _face(rng: np.random.Generator, base: np.ndarray, shape) -> np.ndarray:
    img = np.clip(base + rng.normal(0, 30, shape + (3,)), 0, 255)
    return img.astype(np.uint8)


def write_ijb(root: pathlib.Path, rng: np.random.Generator, prefix: str = "ijbc",
              n_img: int = 30, n_ids: int = 3) -> dict:
    """``root/meta/{prefix}_*.txt`` + ``root/loose_crop/*.jpg``; returns the lists' contents."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    identity = np.arange(n_img) % n_ids
    templates = 100 + identity * 4 + (np.arange(n_img) // n_ids) % 4  # 4 templates per identity
    medias = rng.integers(0, 2, n_img)
    bases = rng.uniform(110, 145, (n_ids, 1, 1, 3))  # close colours + casts: genuine / impostor overlap
    names, points, scores = [], [], np.round(rng.uniform(0.05, 1.0, n_img), 3)
    for i in range(n_img):
        h, w = (int(v) for v in rng.integers(40, 60, 2))
        img = _face(rng, bases[identity[i]] + rng.normal(0, 20, 3), (h, w))  # + a per-image colour cast
        x0, y0, side = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(28, 34)
        pts = np.round(align.ARCFACE_TEMPLATE / 112.0 * side + [x0, y0], 2)
        names.append(f"{i + 1}.jpg")
        points.append(pts)
        Image.fromarray(img).save(root / "loose_crop" / names[-1], quality=95)
    meta = root / "meta"
    (meta / f"{prefix}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias)))
    (meta / f"{prefix}_name_5pts_score.txt").write_text(
        "".join(n + " " + " ".join(f"{v:.2f}" for v in p.ravel()) + f" {s:.3f}\n"
                for n, p, s in zip(names, points, scores)))
    uniq = np.unique(templates)
    t1, t2 = np.meshgrid(uniq, uniq)
    keep = t1 < t2
    t1, t2 = t1[keep], t2[keep]
    labels = ((t1 - 100) // 4 == (t2 - 100) // 4).astype(int)
    (meta / f"{prefix}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in zip(t1, t2, labels)))
    return dict(names=names, templates=templates, medias=medias, points=np.stack(points),
                scores=scores, t1=t1, t2=t2, labels=labels)


def write_megaface(root: pathlib.Path, rng: np.random.Generator, n_ids: int = 3, per_id: int = 3,
                   n_dist: int = 37, size: int = 16) -> dict:
    """devkit/templatelists/*.json + facescrub_images/ + megaface_images/ (aligned, ``size`` square)."""
    lists = root / "devkit" / "templatelists"
    lists.mkdir(parents=True)
    bases = rng.uniform(40, 215, (n_ids, 1, 1, 3))
    probe_paths, probe_ids, probes = [], [], []
    for k in range(n_ids):
        name = f"Actor_{k}"
        for j in range(per_id):
            rel = f"{name}/{name}_{j}.png"
            img = _face(rng, bases[k], (size, size))
            (root / "facescrub_images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "facescrub_images" / rel)
            probe_paths.append(rel)
            probe_ids.append(name)
            probes.append(img)
    dist_paths, dists = [], []
    for j in range(n_dist):
        rel = f"{j % 4}/{1000 + j}@N0{j % 3}/{j}_0.png"
        img = _face(rng, rng.uniform(40, 215, (1, 1, 3)), (size + 8, size + 8))  # resized on read
        (root / "megaface_images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "megaface_images" / rel)
        dist_paths.append(rel)
        dists.append(np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)))
    (lists / "facescrub_features_list.json").write_text(json.dumps({"path": probe_paths, "id": probe_ids}))
    (lists / "megaface_features_list.json_1000000_1").write_text(json.dumps({"path": dist_paths}))
    return dict(probes=np.stack(probes), probe_ids=np.array(probe_ids), distractors=np.stack(dists))


def write_ytf(root: pathlib.Path, rng: np.random.Generator, n_people: int = 4, frames: int = 3,
              frame_shape=(20, 24), size: int = 16) -> dict:
    """splits.txt (header + 10 splits) + aligned_images_DB/<Name>/<video>/aligned_detect_<v>.<i>.jpg."""
    bases = rng.uniform(40, 215, (n_people, 1, 1, 3))
    crops = {}
    for p in range(n_people):
        for v in range(2):
            video = f"Person_{p}/{v}"
            folder = root / "aligned_images_DB" / video
            folder.mkdir(parents=True)
            kept = []
            for i in range(frames):
                img = _face(rng, bases[p], frame_shape)
                path = folder / f"aligned_detect_{v}.{i + 1}.png"
                Image.fromarray(img).save(path)
                h, w = frame_shape
                side = int(round(min(h, w) * 0.8))
                top, left = (h - side) // 2, (w - side) // 2
                kept.append(np.asarray(Image.fromarray(img[top:top + side, left:left + side]).resize(
                    (size, size), Image.Resampling.BILINEAR)))
            crops[video] = np.stack(kept)
    lines = ["split number, pair number, first name, second name, is same person?"]
    first, second, same, folds = [], [], [], []
    for split in range(1, 11):
        for k, is_same in enumerate((1, 0)):
            p = int(rng.integers(n_people))
            a = f"Person_{p}/0"
            b = f"Person_{p}/1" if is_same else f"Person_{(p + 1 + int(rng.integers(n_people - 1))) % n_people}/1"
            lines.append(f"{split}, {k + 1}, {a}, {b}, {is_same}, {is_same}")
            first.append(a)
            second.append(b)
            same.append(bool(is_same))
            folds.append(split - 1)
    (root / "splits.txt").write_text("\n".join(lines) + "\n")
    return dict(crops=crops, first=first, second=second, issame=np.array(same), folds=np.array(folds))
