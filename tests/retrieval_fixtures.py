"""Miniature retrieval data sets in their real layouts (list-file formats as downloaded).

Each writer puts a few classes of small JPEGs of assorted sizes under `root`
and returns what the lists say, for the tests to compare the builders with.
Images are a class colour plus noise (seeded), so a class is recognisable.
"""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image


def write_jpeg(path: pathlib.Path, rng: np.random.Generator, colour, size=None, mode="RGB") -> None:
    h, w = size if size is not None else (int(rng.integers(24, 72)), int(rng.integers(24, 72)))
    base = np.asarray(colour, np.float64)[None, None, :]
    img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert(mode).save(path, format="JPEG", quality=90)


def _colour(class_id: int) -> tuple[int, int, int]:
    r = np.random.default_rng(class_id)
    return tuple(int(v) for v in r.integers(30, 226, 3))


def write_sop(root: pathlib.Path, seed: int = 0, train_classes=(1, 2, 3), test_classes=(4, 5),
              per_class: int = 3) -> dict:
    """Stanford_Online_Products/ with Ebay_train.txt, Ebay_test.txt and class folders."""
    rng = np.random.default_rng(seed)
    base = root / "Stanford_Online_Products"
    out = {}
    image_id = 1
    for split, classes in (("train", train_classes), ("test", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        rows = []
        for c in classes:
            super_name = ("bicycle_final", "chair_final")[c % 2]
            for k in range(per_class):
                rel = f"{super_name}/{100000 + c}_{k}.JPG"
                write_jpeg(base / rel, rng, _colour(c))
                lines.append(f"{image_id} {c} {1 + c % 2} {rel}")
                rows.append((image_id, c, rel))
                image_id += 1
        (base / f"Ebay_{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = rows
    return out


def write_inshop(root: pathlib.Path, seed: int = 0) -> dict:
    """list_eval_partition.txt + img/: items 1-3 train, 7-9 query / gallery (item 9 gallery only)."""
    rng = np.random.default_rng(seed)
    rows = []
    plan = [(1, "train", 3), (2, "train", 2), (3, "train", 3),
            (7, "query", 2), (7, "gallery", 2), (8, "query", 1), (8, "gallery", 3), (9, "gallery", 2)]
    for item, status, count in plan:
        for k in range(count):
            gender = "WOMEN" if item % 2 else "MEN"
            rel = f"img/{gender}/Dresses/id_{item:08d}/{k:02d}_{status[0]}_front.jpg"
            write_jpeg(root / rel, rng, _colour(item))
            rows.append((rel, item, status))
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += [f"{rel}{' ' * 20}id_{item:08d}{' ' * 10}{status}" for rel, item, status in rows]
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return {"rows": rows}


def write_cub(root: pathlib.Path, seed: int = 0, classes=(1, 2, 101, 102, 103), per_class: int = 3) -> dict:
    """CUB_200_2011/ with images.txt, image_class_labels.txt and images/ (one grayscale JPEG)."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    images, labels, rows = [], [], []
    image_id = 1
    for c in classes:
        folder = f"{c:03d}.Bird_{c}"
        for k in range(per_class):
            rel = f"{folder}/Bird_{c}_{k:04d}_{image_id}.jpg"
            write_jpeg(base / "images" / rel, rng, _colour(c), mode="L" if image_id == 2 else "RGB")
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            rows.append((image_id, c, rel))
            image_id += 1
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return {"rows": rows}


def write_cars(root: pathlib.Path, seed: int = 0, classes=(1, 2, 99, 100), per_class: int = 3) -> dict:
    """cars_annos.mat (struct array `annotations`, `class_names`) + car_ims/."""
    import scipy.io

    rng = np.random.default_rng(seed)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records, rows = [], []
    for c in classes:
        for k in range(per_class):
            i = len(records) + 1
            rel = f"car_ims/{i:06d}.jpg"
            write_jpeg(root / rel, rng, _colour(c))
            records.append((rel, 1, 1, 20, 20, c, k % 2))
            rows.append((i, c, rel))
    annos = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for j, rec in enumerate(records):
        for f, v in zip(fields, rec):
            annos[0, j][f] = np.array([v]) if isinstance(v, str) else np.array([[v]], np.uint16)
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = np.array([f"Make Model {c + 1}"])
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annos, "class_names": names})
    return {"rows": rows}
