"""TFDS builder for CFP (Celebrities in Frontal-Profile), aligned to 112x112.

Evaluation-only data: splits `frontal` (5,000 images) and `profile` (2,000),
each face aligned to the ArcFace template from its 30 fiducials
(`broadface_jax.align.cfp_five_points`, which documents the point layout and
how profile faces are handled). Labels are the person ids minus 1 (0 .. 499).
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from broadface_jax import align
from broadface_jax.datasets import common


class CfpAligned(common.FaceBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """CFP frontal and profile faces aligned with a 5-point similarity transform."""

    HOMEPAGE = "http://www.cfpw.io/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir is the CFP `cfp-dataset` folder (with Data/Images,
    Data/Fiducials, Data/list_name.txt) or the folder that contains it.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = align.cfp_dataset_root(dl_manager.manual_dir)
        names_file = root / "Data" / "list_name.txt"
        if not names_file.is_file():
            raise FileNotFoundError(f"cfp: {names_file} not found")
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        self.info.metadata["num_classes"] = len(names)
        return {view: self._generate_examples(root, names, view) for view in ("frontal", "profile")}

    def _generate_examples(self, root: pathlib.Path, names: list[str], view: str):
        for pid in range(1, len(names) + 1):
            folder = root / "Data" / "Images" / f"{pid:03d}" / view
            if not folder.is_dir():
                raise FileNotFoundError(f"cfp: {folder} not found")
            for f in sorted(folder.glob("*.jpg")):
                rel = f.relative_to(root).as_posix()
                face = align.align_cfp_image(root, rel)
                yield rel, common.example(common.encode_jpeg(face), pid - 1, names[pid - 1], rel)
