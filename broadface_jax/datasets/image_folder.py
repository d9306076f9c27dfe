"""TFDS builder for a folder of aligned faces: one sub-folder per identity.

`manual_dir/<identity>/<image>.{jpg,jpeg,png,bmp,webp}`; labels are the
sorted identity folder names' positions (0 .. N-1). Images should already be
aligned face crops; any size other than 112x112 is resized (bilinear).

What is left out is said, never silently dropped: files that are not images
(by suffix), files directly in `manual_dir`, identity folders without
images, and images that do not decode in full (corrupt, truncated, damaged
JPEG data: ``common.face_jpeg``) are logged while preparing and recorded in
the data set's metadata (`skipped`), which `broadface_jax.prepare` prints
and writes to ``skipped.txt``. With ``strict=True`` the first bad image
stops the preparation instead (``BadImageError`` naming the file).

The file list is read in ranges (:mod:`broadface_jax.datasets.beam_split`):
in this process, or by Beam workers when a runner is asked for.
"""

from __future__ import annotations

import dataclasses
import pathlib

import tensorflow_datasets as tfds
from absl import logging

from broadface_jax.datasets import beam_split, common

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_identities(root: pathlib.Path, skipped: dict[str, list[str]] | None = None
                    ) -> list[tuple[str, list[pathlib.Path]]]:
    """Sorted (identity, sorted image paths) of an identity-per-folder tree.

    ``skipped`` (if given) receives what was left out, by reason:
    ``not_images`` (files without an image suffix, relative paths),
    ``outside_identity_folders`` (files directly in ``root``) and
    ``empty_identities`` (folders with no image). Each reason is also logged.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: manual_dir {root} is not a directory")
    skipped = {} if skipped is None else skipped
    for key in ("not_images", "outside_identity_folders", "empty_identities"):
        skipped.setdefault(key, [])
    out = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            skipped["outside_identity_folders"].append(entry.name)
            continue
        files = []
        for f in sorted(entry.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
            else:
                skipped["not_images"].append(f.relative_to(root).as_posix())
        if files:
            out.append((entry.name, files))
        else:
            skipped["empty_identities"].append(entry.name)
    for reason, what in (("not_images", f"files that are not images ({', '.join(IMAGE_SUFFIXES)})"),
                         ("outside_identity_folders", "files outside identity folders"),
                         ("empty_identities", "identity folders without images")):
        if skipped[reason]:
            shown = ", ".join(skipped[reason][:5]) + (" ..." if len(skipped[reason]) > 5 else "")
            logging.warning("image_folder %s: skipped %d %s: %s", root, len(skipped[reason]),
                            what, shown)
    if not out:
        raise ValueError(f"image_folder: no identity sub-folders with images ({', '.join(IMAGE_SUFFIXES)}) "
                         f"in {root}")
    return out


@dataclasses.dataclass(frozen=True)
class FileRangeReader:
    """Reads, checks and encodes a range of ``(relative path, label, identity)`` files."""

    root: str

    def __call__(self, files):
        root = pathlib.Path(self.root)
        for rel, label, name in files:
            path = root / rel
            try:
                jpeg = common.face_jpeg(path.read_bytes(), str(path))
            except common.BadImageError as e:
                yield beam_split.Skipped(rel, str(e))
                continue
            yield rel, common.example(jpeg, label, name, rel)


class FaceImageFolder(beam_split.BeamSplitMixin, common.FaceBuilderMixin,
                      tfds.core.GeneratorBasedBuilder):
    """Aligned face images, one folder per identity -> 112x112 JPEG faces + labels."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir holds one sub-folder per identity with that identity's aligned
    face images (jpg / png / bmp / webp). Labels follow the sorted folder names.
    """

    def __init__(self, *, strict: bool = False, **kwargs):
        self._strict = strict
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = pathlib.Path(dl_manager.manual_dir)
        skipped: dict[str, list[str]] = {}
        identities = list_identities(root, skipped)
        self.info.metadata["num_classes"] = len(identities)
        self.info.metadata["skipped"] = {k: v for k, v in skipped.items() if v}
        return {"train": self._generate_examples(root, identities)}

    def _generate_examples(self, root: pathlib.Path, identities):
        """Every image file: a generator, or a Beam transform when a runner is asked for."""
        files = [(f.relative_to(root).as_posix(), label, name)
                 for label, (name, paths) in enumerate(identities) for f in paths]
        return self._examples("train", files, FileRangeReader(str(root)), strict=self._strict,
                              on_skipped=self._set_skipped)

    def _set_skipped(self, names: list[str]) -> None:
        # saved with the data set's info once every split is written
        self.info.metadata["skipped"]["bad_images"] = names
