"""TFDS builders for the image-retrieval data sets (BroadFace paper, section 4.3).

Each builder reads a data set in the layout its users download, from
``manual_dir``, and writes its images **encoded at their own size** (JPEG
bytes kept as they are when the file is an RGB JPEG, else converted to RGB
and encoded at quality 95) with the data set's own class and image ids. The
standard splits of the deep-metric-learning protocol (Song et al., "Deep
metric learning via lifted structured feature embedding", CVPR 2016; the
BroadFace authors' release follows it):

| short name | TFDS name           | manual_dir                                        | splits (standard sizes)                       |
| ---------- | ------------------- | ------------------------------------------------- | --------------------------------------------- |
| `sop`      | `sop_retrieval`     | `Stanford_Online_Products/` (`Ebay_train.txt`, `Ebay_test.txt`, class folders) | train 59,551 images / 11,318 classes; test 60,502 / 11,316 |
| `inshop`   | `inshop_retrieval`  | In-Shop folder (`list_eval_partition.txt`, `img/`; or DeepFashion's `Eval/`, `Img/img/`) | train 25,882 / 3,997 items; query 14,218 and gallery 12,612 of 3,985 items |
| `cub200`   | `cub200_retrieval`  | `CUB_200_2011/` (`images.txt`, `image_class_labels.txt`, `images/`) | train = classes 1-100 (5,864); test = 101-200 (5,924) |
| `cars196`  | `cars196_retrieval` | folder with `cars_annos.mat` and `car_ims/`       | train = classes 1-98 (8,054); test = 99-196 (8,131) |

Labels. ``label`` is the position of the example's class among the sorted
class ids of its *label group*: the training split alone (so training labels
are ``0 .. num_classes - 1``), SOP / CUB / Cars ``test`` alone, In-Shop
``query`` and ``gallery`` together (a query and the gallery images of its
item share a label). ``class_id`` is the data set's own id (SOP
``class_id``, In-Shop item number of ``id_00000123``, CUB / Cars class
number), ``image_id`` the data set's image id (In-Shop: the line's position
in the list), ``class_name`` a readable class (SOP super-class folder, In-Shop
item id, CUB folder name, Cars class name).

``info.metadata``: ``num_classes`` (training classes: set
``config.num_classes`` to it), ``classes_per_split`` and ``protocol``
(``all_vs_all`` or ``query_gallery``, read by the Recall@K evaluators).

Errors: a missing list file, a malformed line, an id outside its range, a
missing or corrupt image raise an error naming the file (and the line of the
list that refers to it).

Each split's list is read in ranges (:mod:`broadface_jax.datasets.beam_split`):
in this process, or by Beam workers when a runner is asked for.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import pathlib
import re
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from broadface_jax.datasets import beam_split, common

ALL_VS_ALL = "all_vs_all"
QUERY_GALLERY = "query_gallery"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image of a list file."""

    file: str  # path relative to the image root, as the list writes it
    class_id: int  # the data set's own class / item id
    image_id: int
    class_name: str
    where: str  # "list file:line" that lists it (for error messages)


@dataclasses.dataclass
class Listing:
    """A data set's splits as its list files say, and where the images are."""

    name: str
    image_root: pathlib.Path
    splits: dict[str, list[Entry]]
    label_groups: list[tuple[str, ...]]  # splits whose labels share one class numbering
    protocol: str

    def labels(self) -> dict[str, dict[int, int]]:
        """split -> {class_id: label} (module docstring: labels)."""
        out: dict[str, dict[int, int]] = {}
        for group in self.label_groups:
            ids = sorted({e.class_id for s in group for e in self.splits[s]})
            mapping = {c: i for i, c in enumerate(ids)}
            for s in group:
                out[s] = mapping
        return out

    def classes_per_split(self) -> dict[str, int]:
        return {s: len({e.class_id for e in entries}) for s, entries in self.splits.items()}


# ------------------------------------------------------------------ list files
def _read_lines(path: pathlib.Path, what: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) of the non-empty lines of a list file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: list file {path} not found")
    text = path.read_text(encoding="utf-8", errors="strict")
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def _int(value: str, path: pathlib.Path, lineno: int, field: str, line: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: {field} must be an integer, got {value!r} "
                         f"(line {line!r})") from None


def _find_root(manual_dir: pathlib.Path, marker: str, subfolders: Iterable[str]) -> pathlib.Path:
    """manual_dir or one of its named sub-folders, whichever holds `marker`."""
    for cand in [manual_dir, *(manual_dir / s for s in subfolders)]:
        if (cand / marker).exists():
            return cand
    return manual_dir


def read_sop(manual_dir: str | pathlib.Path) -> Listing:
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt``.

    Each list: a header ``image_id class_id super_class_id path``, then one
    line per image; ``path`` is relative to the folder of the lists. Training
    and test classes must be disjoint and every id a positive integer.
    """
    root = _find_root(pathlib.Path(manual_dir), "Ebay_train.txt", ["Stanford_Online_Products"])
    splits: dict[str, list[Entry]] = {}
    seen_images: dict[int, str] = {}
    for split, fname in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = root / fname
        lines = _read_lines(path, "sop")
        if not lines or lines[0][1].split()[:2] != ["image_id", "class_id"]:
            raise ValueError(f"{path}:1: expected the header 'image_id class_id super_class_id path', "
                             f"got {lines[0][1] if lines else '(empty file)'!r}")
        entries = []
        for lineno, line in lines[1:]:
            fields = line.split()
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected 'image_id class_id super_class_id path', "
                                 f"got {line!r}")
            image_id, class_id, super_id = (_int(v, path, lineno, f, line) for v, f in
                                            zip(fields[:3], ("image_id", "class_id", "super_class_id")))
            for value, field in ((image_id, "image_id"), (class_id, "class_id"), (super_id, "super_class_id")):
                if value < 1:
                    raise ValueError(f"{path}:{lineno}: {field} {value} out of range (ids start at 1)")
            if image_id in seen_images:
                raise ValueError(f"{path}:{lineno}: image_id {image_id} already listed at "
                                 f"{seen_images[image_id]}")
            seen_images[image_id] = f"{path}:{lineno}"
            rel = fields[3]
            entries.append(Entry(rel, class_id, image_id, rel.split("/")[0], f"{path}:{lineno}"))
        if not entries:
            raise ValueError(f"{path}: lists no images")
        splits[split] = entries
    overlap = {e.class_id for e in splits["train"]} & {e.class_id for e in splits["test"]}
    if overlap:
        c = min(overlap)
        where = next(e.where for e in splits["test"] if e.class_id == c)
        raise ValueError(f"{where}: class_id {c} is in both Ebay_train.txt and Ebay_test.txt "
                         f"({len(overlap)} shared classes); the protocol needs disjoint classes")
    return Listing("sop", root, splits, [("train",), ("test",)], ALL_VS_ALL)


INSHOP_LIST = "list_eval_partition.txt"
_INSHOP_ITEM = re.compile(r"^id_(\d+)$")


def read_inshop(manual_dir: str | pathlib.Path) -> Listing:
    """In-Shop Clothes Retrieval: ``list_eval_partition.txt``.

    Line 1: the number of images; line 2: the header ``image_name item_id
    evaluation_status``; then ``img/.../x.jpg id_00000001 train|query|gallery``.
    The list is looked up in manual_dir and ``manual_dir/Eval`` (DeepFashion's
    layout), image paths under manual_dir and ``manual_dir/Img``. Items of the
    training split must not be in query or gallery.
    """
    manual_dir = pathlib.Path(manual_dir)
    list_root = _find_root(manual_dir, INSHOP_LIST, ["Eval"])
    path = list_root / INSHOP_LIST
    lines = _read_lines(path, "inshop")
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line, got {len(lines)} lines")
    declared = _int(lines[0][1], path, lines[0][0], "the image count", lines[0][1])
    if lines[1][1].split() != ["image_name", "item_id", "evaluation_status"]:
        raise ValueError(f"{path}:{lines[1][0]}: expected the header 'image_name item_id "
                         f"evaluation_status', got {lines[1][1]!r}")
    splits: dict[str, list[Entry]] = {"train": [], "query": [], "gallery": []}
    for n, (lineno, line) in enumerate(lines[2:], 1):
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"{path}:{lineno}: expected 'image_name item_id evaluation_status', got {line!r}")
        rel, item, status = fields
        m = _INSHOP_ITEM.match(item)
        if m is None:
            raise ValueError(f"{path}:{lineno}: item_id must look like 'id_00000001', got {item!r}")
        if status not in splits:
            raise ValueError(f"{path}:{lineno}: evaluation_status must be train, query or gallery, "
                             f"got {status!r}")
        splits[status].append(Entry(rel, int(m.group(1)), n, item, f"{path}:{lineno}"))
    if declared != len(lines) - 2:
        raise ValueError(f"{path}:{lines[0][0]}: declares {declared} images but lists {len(lines) - 2}")
    for s, entries in splits.items():
        if not entries:
            raise ValueError(f"{path}: no image has evaluation_status {s!r}")
    eval_items = {e.class_id for s in ("query", "gallery") for e in splits[s]}
    for e in splits["train"]:
        if e.class_id in eval_items:
            raise ValueError(f"{e.where}: training item {e.class_name} is also in query/gallery; the "
                             f"protocol needs disjoint items")
    first = splits["train"][0].file
    image_root = _find_root(manual_dir, first, ["Img"])
    return Listing("inshop", image_root, splits, [("train",), ("query", "gallery")], QUERY_GALLERY)


CUB_CLASSES, CUB_TRAIN_CLASSES = 200, 100


def read_cub(manual_dir: str | pathlib.Path) -> Listing:
    """CUB-200-2011: ``images.txt`` (``id path``) and ``image_class_labels.txt`` (``id class``).

    Classes 1-100 train, 101-200 test; image paths under ``images/``. Every
    image id of one file must be in the other; a class outside 1-200 is an error.
    """
    root = _find_root(pathlib.Path(manual_dir), "images.txt", ["CUB_200_2011"])
    images_path, labels_path = root / "images.txt", root / "image_class_labels.txt"
    paths: dict[int, tuple[str, str]] = {}
    for lineno, line in _read_lines(images_path, "cub200"):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise ValueError(f"{images_path}:{lineno}: expected 'image_id path', got {line!r}")
        image_id = _int(fields[0], images_path, lineno, "image_id", line)
        if image_id in paths:
            raise ValueError(f"{images_path}:{lineno}: image_id {image_id} listed twice")
        paths[image_id] = (fields[1], f"{images_path}:{lineno}")
    splits: dict[str, list[Entry]] = {"train": [], "test": []}
    labelled: set[int] = set()
    for lineno, line in _read_lines(labels_path, "cub200"):
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{labels_path}:{lineno}: expected 'image_id class_id', got {line!r}")
        image_id = _int(fields[0], labels_path, lineno, "image_id", line)
        class_id = _int(fields[1], labels_path, lineno, "class_id", line)
        if image_id not in paths:
            raise ValueError(f"{labels_path}:{lineno}: image_id {image_id} is not in {images_path}")
        if image_id in labelled:
            raise ValueError(f"{labels_path}:{lineno}: image_id {image_id} labelled twice")
        if not 1 <= class_id <= CUB_CLASSES:
            raise ValueError(f"{labels_path}:{lineno}: class_id {class_id} out of range 1..{CUB_CLASSES}")
        labelled.add(image_id)
        rel, where = paths[image_id]
        split = "train" if class_id <= CUB_TRAIN_CLASSES else "test"
        splits[split].append(Entry(f"images/{rel}", class_id, image_id, rel.split("/")[0],
                                   f"{where} ({labels_path.name}:{lineno})"))
    missing = sorted(set(paths) - labelled)
    if missing:
        raise ValueError(f"{paths[missing[0]][1]}: image_id {missing[0]} has no class in {labels_path} "
                         f"({len(missing)} unlabelled images)")
    for s, entries in splits.items():
        if not entries:
            raise ValueError(f"{labels_path}: no image in the {s} classes "
                             f"({'1-100' if s == 'train' else '101-200'})")
        entries.sort(key=lambda e: e.image_id)
    return Listing("cub200", root, splits, [("train",), ("test",)], ALL_VS_ALL)


CARS_ANNOS = "cars_annos.mat"
CARS_CLASSES, CARS_TRAIN_CLASSES = 196, 98


def read_cars(manual_dir: str | pathlib.Path) -> Listing:
    """Cars196: ``cars_annos.mat`` (struct array ``annotations`` with
    ``relative_im_path``, ``class`` and the boxes; ``class_names``) and ``car_ims/``.

    Classes 1-98 train, 99-196 test, all 16,185 images (the mat's ``test``
    flag is the classification split and not used by the retrieval protocol).
    "line" in errors is the annotation's 1-based position in the struct array.
    """
    import scipy.io

    root = _find_root(pathlib.Path(manual_dir), CARS_ANNOS, ["cars196", "stanford_cars"])
    path = root / CARS_ANNOS
    if not path.is_file():
        raise FileNotFoundError(f"cars196: annotation file {path} not found (the retrieval protocol "
                                f"uses cars_annos.mat with car_ims/, not the devkit's train/test files)")
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for bad files
        raise ValueError(f"{path}: not a readable MATLAB file: {e}") from e
    if "annotations" not in mat:
        raise ValueError(f"{path}: no 'annotations' variable (has {sorted(k for k in mat if not k.startswith('__'))})")
    annos = np.atleast_1d(mat["annotations"])
    names = [str(n) for n in np.atleast_1d(mat.get("class_names", np.array([], object)))]
    splits: dict[str, list[Entry]] = {"train": [], "test": []}
    for i, a in enumerate(annos, 1):
        where = f"{path}:annotation {i}"
        try:
            rel, class_id = str(a.relative_im_path), int(a.__dict__["class"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: expected fields relative_im_path and class ({e})") from None
        if not 1 <= class_id <= CARS_CLASSES:
            raise ValueError(f"{where}: class {class_id} out of range 1..{CARS_CLASSES}")
        name = names[class_id - 1] if class_id <= len(names) else str(class_id)
        split = "train" if class_id <= CARS_TRAIN_CLASSES else "test"
        splits[split].append(Entry(rel, class_id, i, name, where))
    for s, entries in splits.items():
        if not entries:
            raise ValueError(f"{path}: no image in the {s} classes "
                             f"({'1-98' if s == 'train' else '99-196'})")
    return Listing("cars196", root, splits, [("train",), ("test",)], ALL_VS_ALL)


# ------------------------------------------------------------------ images
def retrieval_jpeg(data: bytes, where: str) -> bytes:
    """Checks an encoded image (fully decoded) and returns JPEG bytes at its own size.

    An RGB JPEG is kept byte for byte; anything else (grayscale, CMYK, PNG)
    is converted to RGB and encoded at quality 95. A truncated or corrupt
    file raises ValueError naming `where`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "JPEG" and im.mode == "RGB":
                return data
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"corrupt or unreadable image {where}: {e}") from e
    return common.encode_jpeg(rgb)


def retrieval_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.Scalar(dtype=np.int64, doc="class within the split's label group, 0 .. n-1"),
        "class_id": tfds.features.Scalar(dtype=np.int64, doc="the data set's own class / item id"),
        "image_id": tfds.features.Scalar(dtype=np.int64, doc="the data set's image id"),
        "class_name": tfds.features.Text(doc="readable class: SOP super-class, In-Shop item, CUB/Cars name"),
        "file": tfds.features.Text(doc="image path as the list writes it"),
    })


@dataclasses.dataclass(frozen=True)
class EntryRangeReader:
    """Reads, checks and encodes a range of ``(Entry, label)`` of one split."""

    name: str  # the data set's short name (error messages)
    image_root: str

    def __call__(self, entries):
        for e, label in entries:
            path = pathlib.Path(self.image_root) / e.file
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: image {path} not found (listed at {e.where})")
            jpeg = retrieval_jpeg(path.read_bytes(), f"{path} (listed at {e.where})")
            yield e.file, {"image": jpeg, "label": label, "class_id": e.class_id,
                           "image_id": e.image_id, "class_name": e.class_name, "file": e.file}


class RetrievalBuilder(beam_split.BeamSplitMixin, tfds.core.GeneratorBasedBuilder, abc.ABC):
    """Shared builder: ``read_listing(manual_dir)`` -> splits of encoded images + ids."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    HOMEPAGE = ""

    @abc.abstractmethod
    def read_listing(self, manual_dir: pathlib.Path) -> Listing:
        """The data set's splits from its list files."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=retrieval_features(),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        listing = self.read_listing(pathlib.Path(dl_manager.manual_dir))
        self.info.metadata["num_classes"] = listing.classes_per_split()["train"]
        self.info.metadata["classes_per_split"] = listing.classes_per_split()
        self.info.metadata["protocol"] = listing.protocol
        labels = listing.labels()
        return {split: self._generate_examples(listing, split, labels[split]) for split in listing.splits}

    def _generate_examples(self, listing: Listing, split: str, labels: dict[int, int]):
        """A split's images: a generator, or a Beam transform when a runner is asked for."""
        entries = [(e, labels[e.class_id]) for e in listing.splits[split]]
        return self._examples(split, entries, EntryRangeReader(listing.name, str(listing.image_root)))


class SopRetrieval(RetrievalBuilder):
    """Stanford Online Products (Song et al. 2016): 22,634 products, train / test by class."""

    HOMEPAGE = "https://cvgl.stanford.edu/projects/lifted_struct/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir is the unpacked `Stanford_Online_Products` folder (or its
    parent): `Ebay_train.txt`, `Ebay_test.txt` and the `<super_class>_final/`
    image folders they refer to.
    """

    def read_listing(self, manual_dir: pathlib.Path) -> Listing:
        return read_sop(manual_dir)


class InshopRetrieval(RetrievalBuilder):
    """DeepFashion In-Shop Clothes Retrieval: train items; query vs gallery of the other items."""

    HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir holds `list_eval_partition.txt` and the unpacked `img/` folder
    (the BroadFace release's `Inshop/` layout), or DeepFashion's layout with
    `Eval/list_eval_partition.txt` and `Img/img/`.
    """

    def read_listing(self, manual_dir: pathlib.Path) -> Listing:
        return read_inshop(manual_dir)


class Cub200Retrieval(RetrievalBuilder):
    """CUB-200-2011 birds: classes 1-100 train, 101-200 test."""

    HOMEPAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir is the unpacked `CUB_200_2011` folder (or its parent):
    `images.txt`, `image_class_labels.txt` and `images/`.
    """

    def read_listing(self, manual_dir: pathlib.Path) -> Listing:
        return read_cub(manual_dir)


class Cars196Retrieval(RetrievalBuilder):
    """Stanford Cars 196: classes 1-98 train, 99-196 test."""

    HOMEPAGE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir holds `cars_annos.mat` and the `car_ims/` folder of all 16,185
    images (the "car_ims.tgz + cars_annos.mat" download).
    """

    def read_listing(self, manual_dir: pathlib.Path) -> Listing:
        return read_cars(manual_dir)
