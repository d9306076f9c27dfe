"""The face-pair evaluation types: LFW, CFP, synthetic and ``.bin`` pairs, and LFW all-pairs TAR @ FAR.

Registered at the end of this module (:mod:`.registry`; two evaluator classes
serve the six types, each type with its own loader):

* ``lfw_dev``: LFW View 1 test pairs (``<data_root>/lfw/pairsDevTest.txt``;
  option ``data_root``, default ``config.eval.data_root``, as for the CFP and
  ``lfw_people_test`` types; 500 + 500 pairs) on deep-funneled images,
  centre-cropped by ``broadface_jax.align.lfw_center_crop``; 10 balanced
  folds (View 1 has no official folds; see :func:`protocols.read_lfw_pairs`).
* ``lfw_people_test``: every pair of faces of LFW View 1's
  ``peopleDevTest.txt`` people (disjoint from ``peopleDevTrain``; at most
  ``LFW_PEOPLE_TEST_MAX_IMAGES`` = 10 images per person, the first ones, so
  that a few people with a hundred photos do not make most of the genuine
  pairs): 3,118 faces of 1,711 people, same crops as ``lfw_dev``; TAR @ FAR
  = 1e-2, 1e-3, 1e-4 (:func:`tar_far.tar_at_far` on cosine scores of the
  flip-and-sum embeddings). No folds, no threshold training.
* ``cfp_fp`` / ``cfp_ff``: CFP frontal-profile / frontal-frontal, the
  official 10 folds of 350 + 350 pairs, images aligned with
  ``broadface_jax.align.load_cfp_aligned``.
* ``synthetic``: pairs of held-out synthetic identities from
  ``broadface_jax.datasets.synthetic.verification_pairs(config, num_pairs, seed)``
  (options ``num_pairs`` = 600, ``seed`` = -1: ``config.seed + 7919``).
* ``bin:<path>`` (type ``bin``, options ``path``, ``bin_dir``): an insightface
  ``.bin`` (read safely); a relative path is looked up in ``bin_dir``
  (default ``config.eval.bin_dir``) too, and ``.bin`` may be left out
  (``bin:agedb_30``). Folds: insightface's KFold(10) in file order, or
  balanced folds where that leaves a fold without a same or a different pair
  (small or class-sorted files; :func:`verification.bin_fold_ids`).

Face images are made at ``config.image_size`` (112 for the paper's models;
a 32x32 demo model gets 32x32 crops of the same alignment). The pair types
run the pair protocol of :mod:`verification` with flip-and-sum and report
accuracy ± std, the chosen threshold, VAL @ FAR = 1e-3 and XNorm; every
target embeds through :mod:`.embedding` (each process its share of the
images). A target's images are read on its first run, once per evaluator
(an evaluator lives as long as its run: :class:`.registry.Evaluators`), and
kept on disk by :mod:`.cache` (all but ``synthetic``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import numpy as np

from broadface_jax.evaluation import cache, protocols, verification
from broadface_jax.evaluation.common import EmbedFn, embed_images, l2_normalize
from broadface_jax.evaluation.registry import REQUIRED, TargetType, register

SYNTHETIC_NUM_PAIRS = 600
SYNTHETIC_SEED_OFFSET = 7919  # synthetic eval pairs use config.seed + this
LFW_PEOPLE_TEST_MAX_IMAGES = 10  # lfw_people_test: first images per person
LFW_PEOPLE_TEST_FARS = (1e-2, 1e-3, 1e-4)


@dataclasses.dataclass(frozen=True)
class PairData:
    """Images of a pair target (each stored once) and the pairs over them."""

    images: np.ndarray  # u8[M, H, W, 3]
    idx_a: np.ndarray  # int[N] rows of images
    idx_b: np.ndarray  # int[N]
    issame: np.ndarray  # bool[N]
    folds: np.ndarray  # int[N]


@dataclasses.dataclass(frozen=True)
class LabelledFaces:
    """Faces with identity labels, for all-pairs verification."""

    images: np.ndarray  # u8[M, H, W, 3]
    labels: np.ndarray  # int[M]


class _LazyTarget:
    """A named target whose data ``loader()`` runs on first use, once."""

    def __init__(self, name: str, loader: Callable[[], Any], batch_size: int):
        self.name = name
        self._loader = loader
        self.batch_size = int(batch_size)
        self._data: Any = None

    def data(self) -> Any:
        if self._data is None:
            self._data = self._loader()
        return self._data


class PairVerificationEvaluator(_LazyTarget):
    """Flip-and-sum embeddings, then the 10-fold pair protocol; data loaded lazily, once."""

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        from broadface_jax import distributed  # noqa: PLC0415

        data = self.data()
        feats, xnorm = embed_images(embed_fn, data.images, self.batch_size, flip=True)
        feats = l2_normalize(feats.astype(np.float64))
        result = verification.evaluate_embeddings(feats[data.idx_a], feats[data.idx_b],
                                                  data.issame, folds=data.folds)
        metrics = result.metrics()
        metrics["xnorm"] = xnorm
        if out_dir is not None and distributed.is_main_process():
            os.makedirs(out_dir, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)
            verification.plot_roc(result, os.path.join(out_dir, f"roc_{safe}.png"), self.name)
        return metrics


def all_pairs_scores(feats: np.ndarray, labels: np.ndarray, block: int = 1024
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores of every unordered pair i < j: (genuine f32[P], impostor f32[N]).

    ``feats`` are L2-normalised rows. Computed in row blocks so that only
    ``block x M`` scores exist at a time besides the outputs.
    """
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels)
    n = feats.shape[0]
    pos, neg = [], []
    for a in range(0, n, block):
        s = feats[a:a + block] @ feats.T
        upper = np.arange(n)[None, :] > np.arange(a, a + s.shape[0])[:, None]
        same = labels[a:a + s.shape[0], None] == labels[None, :]
        pos.append(s[upper & same])
        neg.append(s[upper & ~same])
    return np.concatenate(pos), np.concatenate(neg)


class AllPairsVerificationEvaluator(_LazyTarget):
    """Flip-and-sum embeddings, cosine scores of all pairs, TAR at fixed FARs; data loaded once."""

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        from broadface_jax.evaluation import tar_far  # noqa: PLC0415

        data = self.data()
        feats, xnorm = embed_images(embed_fn, data.images, self.batch_size, flip=True)
        pos, neg = all_pairs_scores(l2_normalize(feats), data.labels)
        scores = np.concatenate([pos, neg])
        issame = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
        tars = tar_far.tar_at_far(scores, issame, LFW_PEOPLE_TEST_FARS)
        metrics = {f"tar@far={tar_far.format_far(f)}": v for f, v in tars.items()}
        metrics.update(num_genuine=float(pos.size), num_impostor=float(neg.size), xnorm=xnorm)
        return metrics


# ------------------------------------------------------------------ loaders
def _pairs_to_data(pairs: protocols.PairList, load_image: Callable[[str], np.ndarray]) -> PairData:
    paths, idx_a, idx_b = pairs.unique_paths()
    first = load_image(paths[0])
    images = np.empty((len(paths),) + first.shape, np.uint8)
    images[0] = first
    for i, p in enumerate(paths[1:], start=1):
        images[i] = load_image(p)
    return PairData(images, idx_a, idx_b, pairs.issame, pairs.folds)


def _data_root(config: Any, options: dict, sub: str) -> str:
    """``<data_root>/<sub>`` (option ``data_root``, "" = ``config.eval.data_root``), which must exist."""
    data_root, where = ((options["data_root"], "data_root") if options["data_root"]
                        else (config.eval.data_root, "config.eval.data_root"))
    root = os.path.abspath(os.path.join(os.fspath(data_root), sub))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{where}={data_root!r}: no '{sub}' folder at {root}")
    return root


def _lfw_files(config: Any, options: dict, list_name: str) -> tuple[str, str, Callable[[str], np.ndarray]]:
    """(``<data_root>/lfw/<list_name>``, the deep-funneled images folder, its centre-crop reader)."""
    root = _data_root(config, options, "lfw")
    images_dir = os.path.join(root, "images_deepfunneled")

    def read(rel: str) -> np.ndarray:
        from broadface_jax import align  # noqa: PLC0415

        return align.lfw_center_crop(align.read_rgb(os.path.join(images_dir, rel)),
                                     size=int(config.image_size))

    return os.path.join(root, list_name), images_dir, read


def _need_folder(images_dir: str) -> None:
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"LFW images folder not found: {images_dir}")


def _lfw_loader(config: Any, options: dict) -> Callable[[], PairData]:
    pairs_path, images_dir, read = _lfw_files(config, options, "pairsDevTest.txt")

    def load() -> PairData:
        pairs = protocols.read_lfw_pairs(pairs_path, images_dir)
        _need_folder(images_dir)
        key = ["lfw_dev", cache.file_digest(pairs_path), images_dir, str(int(config.image_size)),
               cache.module_digest("broadface_jax.align")]
        return cache.cached(cache.cache_dir(config), "lfw_dev", key,
                            lambda: _pairs_to_data(pairs, read), PairData)

    return load


def _lfw_people_loader(config: Any, options: dict) -> Callable[[], LabelledFaces]:
    people_path, images_dir, read = _lfw_files(config, options, "peopleDevTest.txt")

    def load() -> LabelledFaces:
        from broadface_jax.datasets.lfw import read_people_file  # noqa: PLC0415

        people = read_people_file(people_path)
        _need_folder(images_dir)
        paths, labels = [], []
        for label, (name, count) in enumerate(people.items()):
            for i in range(1, min(count, LFW_PEOPLE_TEST_MAX_IMAGES) + 1):
                paths.append(os.path.join(name, f"{name}_{i:04d}.jpg"))
                labels.append(label)
        key = ["lfw_people_test", cache.file_digest(people_path), images_dir, str(int(config.image_size)),
               str(LFW_PEOPLE_TEST_MAX_IMAGES), cache.module_digest("broadface_jax.align")]
        return cache.cached(cache.cache_dir(config), "lfw_people_test", key, lambda: LabelledFaces(
            np.stack([read(p) for p in paths]), np.asarray(labels, np.int64)), LabelledFaces)

    return load


def _cfp_loader(config: Any, options: dict, protocol: str) -> Callable[[], PairData]:
    root = _data_root(config, options, "cfp")
    cfp_root = os.path.join(root, "cfp-dataset") if os.path.isdir(os.path.join(root, "cfp-dataset")) else root

    def load() -> PairData:
        from broadface_jax import align  # noqa: PLC0415

        pairs = protocols.read_cfp_pairs(cfp_root, protocol)
        proto = os.path.join(cfp_root, "Protocol")
        size = int(config.image_size)
        key = [f"cfp_{protocol}", cache.file_digest(os.path.join(proto, "Pair_list_F.txt")),
               cache.file_digest(os.path.join(proto, "Pair_list_P.txt")),
               "\n".join(pairs.paths_a + pairs.paths_b), cfp_root, str(size),
               cache.module_digest("broadface_jax.align")]

        def load_image(rel: str) -> np.ndarray:
            return np.asarray(align.load_cfp_aligned(cfp_root, rel, size=size))

        return cache.cached(cache.cache_dir(config), f"cfp_{protocol.lower()}", key,
                            lambda: _pairs_to_data(pairs, load_image), PairData)

    return load


def _synthetic_loader(config: Any, options: dict) -> Callable[[], PairData]:
    seed = options["seed"] if options["seed"] >= 0 else int(config.seed) + SYNTHETIC_SEED_OFFSET

    def load() -> PairData:
        from broadface_jax.datasets import synthetic  # noqa: PLC0415

        a, b, issame = synthetic.verification_pairs(config, options["num_pairs"], seed)
        n = a.shape[0]
        issame = np.asarray(issame, bool)
        return PairData(np.concatenate([a, b]), np.arange(n), n + np.arange(n), issame,
                        verification.balanced_fold_ids(issame))

    return load


def resolve_bin_path(path: str, bin_dir: str = "") -> str:
    """A ``bin:`` target's file: as given, else under ``bin_dir``, with or without ``.bin``."""
    candidates = [path, path + ".bin"]
    if bin_dir and not os.path.isabs(path):
        candidates += [os.path.join(bin_dir, path), os.path.join(bin_dir, path + ".bin")]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(f"verification .bin not found: tried {', '.join(candidates)} "
                            f"(config.eval.bin_dir={bin_dir!r})")


def _bin_loader(config: Any, options: dict) -> Callable[[], PairData]:
    bin_dir = options["bin_dir"] or os.fspath(config.eval.bin_dir)

    def load() -> PairData:
        from broadface_jax.evaluation import binfile  # noqa: PLC0415

        file = resolve_bin_path(options["path"], bin_dir)
        size = int(config.image_size)

        def build() -> PairData:
            images, issame = binfile.read_bin(file, (size, size))
            n = issame.shape[0]
            return PairData(images, 2 * np.arange(n), 2 * np.arange(n) + 1, issame,
                            np.zeros(n, np.int64))  # folds: set below on every load

        st = os.stat(file)
        key = ["bin", file, str(st.st_size), str(st.st_mtime_ns), str(size)]
        data = cache.cached(cache.cache_dir(config), "bin_" + os.path.basename(file), key, build, PairData)
        # Folds are re-derived on every load (cheap), so a cache entry never holds an old rule's.
        return dataclasses.replace(data, folds=verification.bin_fold_ids(data.issame, source=file))

    return load


# ------------------------------------------------------------------ the types
def _pairs(loader: Callable[..., Callable[[], PairData]], *args: Any
           ) -> Callable[[str, Any, dict], PairVerificationEvaluator]:
    """A type's build: ``PairVerificationEvaluator`` over ``loader(config, options, *args)``."""
    return lambda name, config, o: PairVerificationEvaluator(name, loader(config, o, *args),
                                                             config.eval.batch_size)


_DATA_ROOT = {"data_root": ""}  # "" = config.eval.data_root

register("lfw_dev", TargetType(_pairs(_lfw_loader), _DATA_ROOT,
                               summary="LFW View 1 test pairs (<data_root>/lfw), 10 balanced folds"))
for _proto in ("FP", "FF"):
    register(f"cfp_{_proto.lower()}", TargetType(
        _pairs(_cfp_loader, _proto), _DATA_ROOT,
        summary=f"CFP {_proto} (<data_root>/cfp), official 10 folds"))
register("lfw_people_test", TargetType(
    lambda name, c, o: AllPairsVerificationEvaluator(name, _lfw_people_loader(c, o), c.eval.batch_size),
    _DATA_ROOT, summary="every pair of LFW View 1 peopleDevTest faces, TAR @ FAR"))
register("synthetic", TargetType(
    _pairs(_synthetic_loader), {"num_pairs": SYNTHETIC_NUM_PAIRS, "seed": -1},
    summary="held-out synthetic identities (seed -1 = config.seed + 7919)"))
register("bin", TargetType(
    _pairs(_bin_loader), {"path": REQUIRED, "bin_dir": ""}, positional="path",
    summary="an insightface .bin (bin_dir '' = config.eval.bin_dir)"))
