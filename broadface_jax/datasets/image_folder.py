"""TFDS builder for a folder of aligned faces: one sub-folder per identity.

`manual_dir/<identity>/<image>.{jpg,jpeg,png,bmp,webp}`; labels are the
sorted identity folder names' positions (0 .. N-1). Images should already be
aligned face crops; any size other than 112x112 is resized (bilinear).
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from broadface_jax.datasets import common

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_identities(root: pathlib.Path) -> list[tuple[str, list[pathlib.Path]]]:
    """Sorted (identity, sorted image paths) of an identity-per-folder tree."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: manual_dir {root} is not a directory")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        if files:
            out.append((d.name, files))
    if not out:
        raise ValueError(f"image_folder: no identity sub-folders with images ({', '.join(IMAGE_SUFFIXES)}) "
                         f"in {root}")
    return out


class FaceImageFolder(tfds.core.GeneratorBasedBuilder):
    """Aligned face images, one folder per identity -> 112x112 JPEG faces + labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir holds one sub-folder per identity with that identity's aligned
    face images (jpg / png / bmp / webp). Labels follow the sorted folder names.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=common.face_features(),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(dl_manager.manual_dir)
        identities = list_identities(root)
        self.info.metadata["num_classes"] = len(identities)
        return {"train": self._generate_examples(root, identities)}

    def _generate_examples(self, root: pathlib.Path, identities):
        for label, (name, files) in enumerate(identities):
            for f in files:
                rel = f.relative_to(root).as_posix()
                yield rel, common.example(common.face_jpeg(f.read_bytes(), str(f)), label, name, rel)
