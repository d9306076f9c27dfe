"""TFDS builder for LFW (deep-funneled) training faces: the `dev_train` split.

`dev_train` = people of LFW's View 1 `peopleDevTrain.txt` with at least 2
images, minus the people who also appear in CFP (`cfp-dataset/Data/
list_name.txt`, spaces -> underscores), so that a model trained on it is clean
for both the LFW View 1 test and CFP. Faces: centre box (61, 61, 189, 189)
of the 250x250 deep-funneled images, resized to 112x112
(`broadface_jax.align.lfw_center_crop`). Labels 0 .. N-1 by sorted name.
With the public files: 1,184 people with >= 2 images (6,671 images), 91 of
them in CFP, 1,093 identities left.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow_datasets as tfds

from broadface_jax import align
from broadface_jax.datasets import common

IMAGES = "images_deepfunneled"
CFP_NAMES_DEFAULT = pathlib.Path("..", "cfp", "cfp-dataset", "Data", "list_name.txt")


def read_people_file(path: str | pathlib.Path) -> dict[str, int]:
    """LFW `peopleDev*.txt` (count line, then `Name<TAB>num_images`) -> {name: num_images}."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LFW people file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    people: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        try:
            people[fields[0]] = int(fields[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{lineno}: expected 'Name<TAB>num_images', got {line!r}") from None
    try:
        declared = int(lines[0])
    except (IndexError, ValueError):
        raise ValueError(f"{path}: first line must be the number of people") from None
    if declared != len(people):
        raise ValueError(f"{path}: declares {declared} people but lists {len(people)}")
    return people


def read_cfp_names(path: str | pathlib.Path) -> set[str]:
    """CFP `list_name.txt` -> LFW-style names (spaces -> underscores)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CFP names file not found: {path} (the LFW dev_train split leaves out CFP's people; "
            f"pass cfp_names_file=...)")
    return {ln.strip().replace(" ", "_") for ln in path.read_text().splitlines() if ln.strip()}


def dev_train_people(lfw_root: str | pathlib.Path, cfp_names_file: str | pathlib.Path | None = None
                     ) -> list[tuple[str, int]]:
    """Sorted (name, num_images) of the dev_train split (module docstring)."""
    lfw_root = pathlib.Path(lfw_root)
    people = read_people_file(lfw_root / "peopleDevTrain.txt")
    cfp = read_cfp_names(cfp_names_file or lfw_root / CFP_NAMES_DEFAULT)
    return sorted((n, k) for n, k in people.items() if k >= 2 and n not in cfp)


def load_face(path: pathlib.Path) -> np.ndarray:
    """A deep-funneled LFW image -> u8[112, 112, 3] centre crop."""
    return align.lfw_center_crop(align.read_rgb(path))


class LfwAligned(common.FaceBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """LFW deep-funneled, centre-cropped to 112x112: dev_train identities."""

    HOMEPAGE = "http://vis-www.cs.umass.edu/lfw/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir is the LFW folder with `images_deepfunneled/` and
    `peopleDevTrain.txt`. CFP's `list_name.txt` is looked up at
    `<manual_dir>/../cfp/cfp-dataset/Data/list_name.txt` unless the builder is
    given `cfp_names_file=...`.
    """

    def __init__(self, *, cfp_names_file: str | None = None, **kwargs):
        self._cfp_names_file = cfp_names_file
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(dl_manager.manual_dir)
        if not (root / IMAGES).is_dir():
            raise FileNotFoundError(f"lfw: {root / IMAGES} not found (manual_dir={root})")
        people = dev_train_people(root, self._cfp_names_file)
        self.info.metadata["num_classes"] = len(people)
        return {"dev_train": self._generate_examples(root, people)}

    def _generate_examples(self, root: pathlib.Path, people):
        for label, (name, count) in enumerate(people):
            for i in range(1, count + 1):
                rel = f"{IMAGES}/{name}/{name}_{i:04d}.jpg"
                face = load_face(root / rel)
                yield rel, common.example(common.encode_jpeg(face), label, name, rel)
