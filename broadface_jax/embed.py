"""Embed face images with a trained run or an imported model; write features and names.

    python -m broadface_jax.embed --workdir runs/paper --images faces/ --out feats.npz
    python -m broadface_jax.embed --config configs/default.py --from backbone.pth \\
        --images photos.txt --landmarks photos_5pts.txt --out feats.npz

``--images`` is a folder (every .jpg/.jpeg/.png/.bmp/.webp below it, sorted)
or a text file with one image path per line (relative paths are relative to
the list's folder). Without ``--landmarks`` the images are aligned faces
(``config.image_size`` square; others are resized to it). With
``--landmarks FILE`` each image is aligned here to the ArcFace template
(``align.warp_to_template``) from its 5 points: one line per image,
``<path> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5`` (left eye, right eye, nose tip, left
and right mouth corner, pixel coordinates; whitespace or commas), the path
written as in the list (or relative to the folder).

Embeddings are flip-summed (``f(x) + f(flip(x))``, as the evaluators do;
``--noflip`` turns it off) and *not* L2-normalised. ``--out`` (``.npz``)
holds ``features`` f32[N, D], ``names`` (the N embedded paths, as given),
``skipped`` and ``skipped_reason`` (images that could not be read or have no
landmarks: listed there and on stderr, never silently dropped), and
``flip``. The model is the run's (its ``config.json``) unless ``--config``
is given, which must then agree with it on ``model.*`` and ``image_size``;
``--from`` needs ``--config``. Few images cost few: the last batch is padded
to the next power of two (from 8), not to ``eval.batch_size``.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags

from broadface_jax import cli

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")



def list_images(spec: str) -> tuple[list[str], pathlib.Path]:
    """(names as given, base folder) of a folder or a list file.

    Raises:
      FileNotFoundError: ``spec`` does not exist.
      ValueError: it lists no image.
    """
    path = pathlib.Path(spec)
    if path.is_dir():
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        base = path
    elif path.is_file():
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        base = path.parent
    else:
        raise FileNotFoundError(f"--images={spec!r}: no such folder or list file")
    if not names:
        raise ValueError(f"--images={spec!r}: no images found (suffixes {IMAGE_SUFFIXES})")
    return names, base


def read_landmarks(path: str) -> dict[str, np.ndarray]:
    """``{image name: f64[5, 2]}`` from a landmarks file (one image per line).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line does not have a name and 10 finite numbers (names the line).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--landmarks={path!r}: no such file")
    out = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = [p for p in re.split(r"[\s,]+", line) if p]
            try:
                values = np.array([float(v) for v in parts[1:]], np.float64)
            except ValueError:
                values = np.array([])
            if len(parts) != 11 or not np.all(np.isfinite(values)):
                raise ValueError(f"{path}:{number}: expected '<path> x1 y1 ... x5 y5' "
                                 f"(a name and 10 numbers), got {line[:80]!r}")
            out[parts[0]] = values.reshape(5, 2)
    return out


def load_faces(names: Sequence[str], base: pathlib.Path, size: int,
               landmarks: Optional[dict[str, np.ndarray]] = None,
               progress: bool = True) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Reads (and aligns) the images -> (u8[N, size, size, 3], kept names, [(name, reason)]).

    ``progress``: a bar on stderr (only when there are more than a few images to read).
    """
    from PIL import Image

    from broadface_jax import align

    faces, kept, skipped = [], [], []
    iterator: Any = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="reading", unit="img", file=sys.stderr, leave=False)
    for name in iterator:
        full = pathlib.Path(name) if os.path.isabs(name) else base / name
        if landmarks is not None:
            points = landmarks.get(name, landmarks.get(str(full)))
            if points is None:
                skipped.append((name, "no landmarks for this image"))
                continue
        try:
            image = align.read_rgb(full)
        except (FileNotFoundError, ValueError) as e:
            skipped.append((name, str(e)))
            continue
        if landmarks is not None:
            image = align.warp_to_template(image, points, size)
        elif image.shape[:2] != (size, size):
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        faces.append(image)
        kept.append(name)
    stacked = np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)
    return stacked, kept, skipped


def embed_faces(config: Any, params: Any, batch_stats: Any, faces: np.ndarray,
                flip: bool = True, progress: bool = True) -> np.ndarray:
    """``f32[N, D]`` embeddings of u8 faces (flip-summed when ``flip``).

    The evaluators' embedding path (``evaluation.embedding``: batches of
    ``config.eval.batch_size``, the last one zero-padded to the next power of
    two from 8, so the encoder compiles a few shapes at most); ``progress``
    shows a bar on stderr counting the images embedded (each mirror counted
    too when ``flip``; padding rows not).
    """
    import contextlib

    import jax

    from broadface_jax import sharding
    from broadface_jax.evaluation import embedding

    d = int(config.model.embedding_dim)
    if len(faces) == 0:
        return np.zeros((0, d), np.float32)
    mesh = sharding.make_mesh(config.mesh)
    params, batch_stats = jax.device_put((params, batch_stats), sharding.replicated(mesh))
    embed_fn = embedding.make_uint8_embed_fn(config, mesh)(params, batch_stats)
    report = (embedding.reporting(embedding.BarProgress("embedding", done_line=False))
              if progress else contextlib.nullcontext())
    with report:
        features, _ = embedding.embed_images(embed_fn, faces, max(1, int(config.eval.batch_size)),
                                             flip)
    return features


def run(config: Any, images: str, out: str, *, workdir: Optional[str] = None,
        checkpoint: Optional[str] = None, weights: Optional[str] = None,
        landmarks: Optional[str] = None, flip: bool = True, progress: bool = True) -> dict:
    """The whole command; returns what was written to ``out``."""
    from broadface_jax import restore

    if not (weights or workdir or checkpoint):
        raise ValueError("give --workdir (or --checkpoint) of a run, or --from a weights file")
    names, base = list_images(images)
    marks = read_landmarks(landmarks) if landmarks else None
    encoder = restore.restore_encoder(weights or checkpoint or workdir, config)
    params, batch_stats, source = encoder.params, encoder.batch_stats, encoder.source
    size = int(config.image_size)
    faces, kept, skipped = load_faces(names, base, size, marks, progress)
    features = embed_faces(config, params, batch_stats, faces, flip, progress)
    result = {
        "features": features,
        "names": np.array(kept, dtype=str),
        "skipped": np.array([n for n, _ in skipped], dtype=str),
        "skipped_reason": np.array([r for _, r in skipped], dtype=str),
        "flip": np.array(flip),
        "source": np.array(source),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **result)
    return result


def _define_flags() -> None:
    """The command-line flags, defined only when run as a program (importing stays flag-free)."""
    global _CONFIG, _WORKDIR, _CHECKPOINT, _FROM, _IMAGES, _LANDMARKS, _OUT, _FLIP
    _CONFIG = cli.define_config_flag(
        "Config of the model (model.*, image_size, eval.batch_size); default: the workdir's "
        "config.json.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Run whose latest checkpoint embeds.")
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A specific checkpoint (as evaluate).")
    _FROM = flags.DEFINE_string("from", None, "Weights file (.pth / .pt / .onnx) instead of a run.")
    _IMAGES = flags.DEFINE_string("images", None, "Folder of images, or a text file of paths.")
    _LANDMARKS = flags.DEFINE_string("landmarks", None, "5-point landmarks file (see module doc).")
    _OUT = flags.DEFINE_string("out", None, "Output .npz.")
    _FLIP = flags.DEFINE_bool("flip", True, "Sum the embeddings of each image and its mirror.")
    flags.mark_flags_as_required(["images", "out"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_third_party_logs()
    config = cli.load_config_for_run(_CHECKPOINT.value or _WORKDIR.value)
    try:
        result = run(config, _IMAGES.value, _OUT.value, workdir=_WORKDIR.value,
                     checkpoint=_CHECKPOINT.value, weights=_FROM.value,
                     landmarks=_LANDMARKS.value, flip=_FLIP.value)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"broadface_jax.embed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    for name, reason in zip(result["skipped"], result["skipped_reason"]):
        print(f"skipped {name}: {reason}", file=sys.stderr)
    n, d = result["features"].shape
    print(f"wrote {_OUT.value}: {n} embeddings of size {d} (flip-sum "
          f"{'on' if _FLIP.value else 'off'}), {len(result['skipped'])} images skipped",
          flush=True)


def cli_main() -> None:
    """The ``broadface-embed`` console script: ``python -m broadface_jax.embed``."""
    _define_flags()
    cli.run(main, flags_parser=cli.workdir_config_parser())  # one-line flag errors, exit 2


if __name__ == "__main__":
    cli_main()
