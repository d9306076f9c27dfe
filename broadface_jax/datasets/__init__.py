"""Face and image-retrieval data sets: TFDS builders and the synthetic source.

| short name        | TFDS name          | builder                                   | splits              |
| ----------------- | ------------------ | ----------------------------------------- | ------------------- |
| `insightface_rec` | `insightface_rec`  | `insightface_rec.InsightfaceRec`          | train               |
| `image_folder`    | `face_image_folder`| `image_folder.FaceImageFolder`            | train               |
| `lfw`             | `lfw_aligned`      | `lfw.LfwAligned`                          | dev_train           |
| `cfp`             | `cfp_aligned`      | `cfp.CfpAligned`                          | frontal, profile    |
| `sop`             | `sop_retrieval`    | `retrieval.SopRetrieval`                  | train, test         |
| `inshop`          | `inshop_retrieval` | `retrieval.InshopRetrieval`               | train, query, gallery |
| `cub200`          | `cub200_retrieval` | `retrieval.Cub200Retrieval`               | train, test         |
| `cars196`         | `cars196_retrieval`| `retrieval.Cars196Retrieval`              | train, test         |

The TFDS names differ from the short names where TFDS already has a data set
of that name (`lfw`). Every builder's `info.metadata['num_classes']` holds its
number of identities. Modules are imported on demand (TensorFlow is heavy).
"""

from __future__ import annotations

import importlib
from typing import Any

# short name or TFDS name -> (module, class)
_BUILDERS = {
    "insightface_rec": ("insightface_rec", "InsightfaceRec"),
    "image_folder": ("image_folder", "FaceImageFolder"),
    "face_image_folder": ("image_folder", "FaceImageFolder"),
    "lfw": ("lfw", "LfwAligned"),
    "lfw_aligned": ("lfw", "LfwAligned"),
    "cfp": ("cfp", "CfpAligned"),
    "cfp_aligned": ("cfp", "CfpAligned"),
    "sop": ("retrieval", "SopRetrieval"),
    "sop_retrieval": ("retrieval", "SopRetrieval"),
    "inshop": ("retrieval", "InshopRetrieval"),
    "inshop_retrieval": ("retrieval", "InshopRetrieval"),
    "cub200": ("retrieval", "Cub200Retrieval"),
    "cub200_retrieval": ("retrieval", "Cub200Retrieval"),
    "cars196": ("retrieval", "Cars196Retrieval"),
    "cars196_retrieval": ("retrieval", "Cars196Retrieval"),
}
SHORT_NAMES = ("insightface_rec", "image_folder", "lfw", "cfp", "sop", "inshop", "cub200", "cars196")


def known_names() -> list[str]:
    """Every short and TFDS name of this package's builders (no module is imported)."""
    return sorted(_BUILDERS)


def is_known(name: str) -> bool:
    """Whether `name` is one of this package's builders (short or TFDS name)."""
    return name in _BUILDERS


def builder_class(name: str) -> Any:
    """The TFDS builder class for a short or TFDS name (imports its module)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(SHORT_NAMES)}")
    module, cls = _BUILDERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_builder(name: str, data_dir: str | None = None, **kwargs: Any):
    """A builder instance: ours by short/TFDS name, else any registered TFDS data set.

    `kwargs` go to the builder (e.g. `file_format`, `cfp_names_file` for lfw).
    """
    if is_known(name):
        return builder_class(name)(data_dir=data_dir or None, **kwargs)
    import tensorflow_datasets as tfds
    return tfds.builder(name, data_dir=data_dir or None, **kwargs)
