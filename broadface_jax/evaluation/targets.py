"""Evaluation targets built from the config, and the table that reports them.

Targets (``config.eval.targets``):

* ``lfw_dev``: LFW View 1 test pairs (``<data_root>/lfw/pairsDevTest.txt``,
  500 + 500 pairs) on deep-funneled images, centre-cropped by
  ``broadface_jax.align.lfw_center_crop``; 10 balanced folds (View 1 has no
  official folds; see :func:`protocols.read_lfw_pairs`).
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

Face images are made at ``config.image_size`` (112 for the paper's models;
a 32x32 demo model gets 32x32 crops of the same alignment).
* ``synthetic``: pairs of held-out synthetic identities from
  ``broadface_jax.datasets.synthetic.verification_pairs(config, 600, seed)``.
* ``bin:<path>``: an insightface ``.bin`` (read safely); a relative path is
  looked up in ``config.eval.bin_dir`` too, and ``.bin`` may be left out
  (``bin:agedb_30``). Folds: insightface's KFold(10) in file order, or
  balanced folds where that leaves a fold without a same or a different pair
  (small or class-sorted files; :func:`verification.bin_fold_ids`).

* ``sop``, ``inshop``, ``cub200``, ``cars196``: Recall@K on the test splits
  of the prepared retrieval data sets (:mod:`.retrieval_targets`: no flip,
  the evaluation crop of the retrieval pipeline, metrics ``recall@K``).

All run the pair protocol of :mod:`verification` with flip-and-sum and
report accuracy ± std, the chosen threshold, VAL @ FAR = 1e-3 and XNorm.

Caching: the decoded / aligned images of a target are loaded once per
process (evaluators are memoised by name and config) and kept on disk as an
``.npz`` under the cache folder: ``config.eval.cache_dir`` if the config has
that field, else ``$BROADFACE_EVAL_CACHE``, else
``~/.cache/broadface_jax/eval``. The file name hashes the protocol files,
the image list and the alignment code, so a change to any of them makes a
new entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from broadface_jax.evaluation import protocols, retrieval_targets, verification
from broadface_jax.evaluation.common import EmbedFn, embed_images, l2_normalize

SYNTHETIC_NUM_PAIRS = 600
SYNTHETIC_SEED_OFFSET = 7919  # synthetic eval pairs use config.seed + this
TARGET_NAMES = ("lfw_dev", "lfw_people_test", "cfp_fp", "cfp_ff", "synthetic", "bin:<path>")
LFW_PEOPLE_TEST_MAX_IMAGES = 10  # lfw_people_test: first images per person
LFW_PEOPLE_TEST_FARS = (1e-2, 1e-3, 1e-4)


class Evaluator(Protocol):
    """An evaluation target: ``run(embed_fn, out_dir=None) -> {metric: value}``."""

    name: str

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        ...


@dataclasses.dataclass(frozen=True)
class PairData:
    """Images of a pair target (each stored once) and the pairs over them."""

    images: np.ndarray  # u8[M, H, W, 3]
    idx_a: np.ndarray  # int[N] rows of images
    idx_b: np.ndarray  # int[N]
    issame: np.ndarray  # bool[N]
    folds: np.ndarray  # int[N]


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
        data = self.data()
        feats, xnorm = embed_images(embed_fn, data.images, self.batch_size, flip=True)
        feats = l2_normalize(feats.astype(np.float64))
        result = verification.evaluate_embeddings(feats[data.idx_a], feats[data.idx_b],
                                                  data.issame, folds=data.folds)
        metrics = result.metrics()
        metrics["xnorm"] = xnorm
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)
            verification.plot_roc(result, os.path.join(out_dir, f"roc_{safe}.png"), self.name)
        return metrics


# ------------------------------------------------------------------ caching
def _cache_dir(config: Any) -> str | None:
    configured = config.eval.get("cache_dir", None) if hasattr(config.eval, "get") else None
    path = configured or os.environ.get("BROADFACE_EVAL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "broadface_jax", "eval")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        logging.warning("evaluation image cache disabled: cannot create %s (%s)", path, e)
        return None
    return path


def _file_digest(path: str) -> bytes:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _cached(cache_dir: str | None, name: str, key_parts: list[bytes | str],
            build: Callable[[], Any], cls: type = PairData) -> Any:
    """Loads ``build()``'s result from an .npz keyed by ``key_parts`` or builds and stores it."""
    if cache_dir is None:
        return build()
    h = hashlib.sha1()
    for part in key_parts:
        h.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        h.update(b"\0")
    path = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_]+', '_', name)}-{h.hexdigest()[:16]}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})
        except Exception as e:  # a partial / corrupt cache file: rebuild it
            logging.warning("ignoring unreadable evaluation cache %s (%s)", path, e)
    data = build()
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, **dataclasses.asdict(data))
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("could not write evaluation cache %s (%s)", path, e)
    return data


def _module_digest(module_name: str) -> bytes:
    import importlib

    mod = importlib.import_module(module_name)
    return _file_digest(mod.__file__)


# ------------------------------------------------------------------ loaders
def _pairs_to_data(pairs: protocols.PairList, load_image: Callable[[str], np.ndarray]) -> PairData:
    paths, idx_a, idx_b = pairs.unique_paths()
    first = load_image(paths[0])
    images = np.empty((len(paths),) + first.shape, np.uint8)
    images[0] = first
    for i, p in enumerate(paths[1:], start=1):
        images[i] = load_image(p)
    return PairData(images, idx_a, idx_b, pairs.issame, pairs.folds)


def _data_root(config: Any, sub: str) -> str:
    root = os.path.abspath(os.path.join(os.fspath(config.eval.data_root), sub))
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"config.eval.data_root={config.eval.data_root!r}: no '{sub}' folder at {root}")
    return root


def _lfw_loader(config: Any) -> Callable[[], PairData]:
    root = _data_root(config, "lfw")
    pairs_path = os.path.join(root, "pairsDevTest.txt")
    images_dir = os.path.join(root, "images_deepfunneled")

    def load() -> PairData:
        from broadface_jax import align

        pairs = protocols.read_lfw_pairs(pairs_path, images_dir)
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"LFW images folder not found: {images_dir}")

        size = int(config.image_size)

        def load_image(rel: str) -> np.ndarray:
            return align.lfw_center_crop(align.read_rgb(os.path.join(images_dir, rel)), size=size)

        key = ["lfw_dev", _file_digest(pairs_path), images_dir, str(size), _module_digest("broadface_jax.align")]
        return _cached(_cache_dir(config), "lfw_dev", key, lambda: _pairs_to_data(pairs, load_image))

    return load


@dataclasses.dataclass(frozen=True)
class LabelledFaces:
    """Faces with identity labels, for all-pairs verification."""

    images: np.ndarray  # u8[M, H, W, 3]
    labels: np.ndarray  # int[M]


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
        from broadface_jax.evaluation import tar_far

        data = self.data()
        feats, xnorm = embed_images(embed_fn, data.images, self.batch_size, flip=True)
        pos, neg = all_pairs_scores(l2_normalize(feats), data.labels)
        scores = np.concatenate([pos, neg])
        issame = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
        tars = tar_far.tar_at_far(scores, issame, LFW_PEOPLE_TEST_FARS)
        metrics = {f"tar@far={tar_far.format_far(f)}": v for f, v in tars.items()}
        metrics.update(num_genuine=float(pos.size), num_impostor=float(neg.size), xnorm=xnorm)
        return metrics


def _lfw_people_loader(config: Any) -> Callable[[], LabelledFaces]:
    root = _data_root(config, "lfw")
    people_path = os.path.join(root, "peopleDevTest.txt")
    images_dir = os.path.join(root, "images_deepfunneled")

    def load() -> LabelledFaces:
        from broadface_jax import align
        from broadface_jax.datasets.lfw import read_people_file

        people = read_people_file(people_path)
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"LFW images folder not found: {images_dir}")
        paths, labels = [], []
        for label, (name, count) in enumerate(people.items()):
            for i in range(1, min(count, LFW_PEOPLE_TEST_MAX_IMAGES) + 1):
                paths.append(os.path.join(name, f"{name}_{i:04d}.jpg"))
                labels.append(label)
        size = int(config.image_size)

        def build() -> LabelledFaces:
            images = np.stack([align.lfw_center_crop(
                align.read_rgb(os.path.join(images_dir, p)), size=size) for p in paths])
            return LabelledFaces(images, np.asarray(labels, np.int64))

        key = ["lfw_people_test", _file_digest(people_path), images_dir, str(size),
               str(LFW_PEOPLE_TEST_MAX_IMAGES), _module_digest("broadface_jax.align")]
        return _cached(_cache_dir(config), "lfw_people_test", key, build, cls=LabelledFaces)

    return load

def _cfp_loader(config: Any, protocol: str) -> Callable[[], PairData]:
    root = _data_root(config, "cfp")
    cfp_root = os.path.join(root, "cfp-dataset") if os.path.isdir(os.path.join(root, "cfp-dataset")) else root

    def load() -> PairData:
        from broadface_jax import align

        pairs = protocols.read_cfp_pairs(cfp_root, protocol)
        proto = os.path.join(cfp_root, "Protocol")
        size = int(config.image_size)
        key = [f"cfp_{protocol}", _file_digest(os.path.join(proto, "Pair_list_F.txt")),
               _file_digest(os.path.join(proto, "Pair_list_P.txt")),
               "\n".join(pairs.paths_a + pairs.paths_b), cfp_root, str(size),
               _module_digest("broadface_jax.align")]

        def load_image(rel: str) -> np.ndarray:
            return np.asarray(align.load_cfp_aligned(cfp_root, rel, size=size))

        return _cached(_cache_dir(config), f"cfp_{protocol.lower()}", key,
                       lambda: _pairs_to_data(pairs, load_image))

    return load


def _synthetic_loader(config: Any) -> Callable[[], PairData]:
    def load() -> PairData:
        from broadface_jax.datasets import synthetic

        a, b, issame = synthetic.verification_pairs(config, SYNTHETIC_NUM_PAIRS,
                                                    int(config.seed) + SYNTHETIC_SEED_OFFSET)
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


def _bin_loader(config: Any, path: str) -> Callable[[], PairData]:
    def load() -> PairData:
        from broadface_jax.evaluation import binfile

        file = resolve_bin_path(path, os.fspath(config.eval.bin_dir))
        size = int(config.image_size)

        def build() -> PairData:
            images, issame = binfile.read_bin(file, (size, size))
            n = issame.shape[0]
            return PairData(images, 2 * np.arange(n), 2 * np.arange(n) + 1, issame,
                            np.zeros(n, np.int64))  # folds: set below on every load

        st = os.stat(file)
        key = ["bin", file, str(st.st_size), str(st.st_mtime_ns), str(size)]
        data = _cached(_cache_dir(config), "bin_" + os.path.basename(file), key, build)
        # Folds are re-derived on every load (cheap), so a cache entry never holds an old rule's.
        return dataclasses.replace(data, folds=verification.bin_fold_ids(data.issame, source=file))

    return load


# ------------------------------------------------------------------ registry
_EVALUATORS: dict[tuple, PairVerificationEvaluator] = {}


def _memo_key(name: str, config: Any) -> tuple:
    syn = config.dataset.synthetic
    return (name, os.path.abspath(os.fspath(config.eval.data_root)), os.fspath(config.eval.bin_dir),
            int(config.eval.batch_size), int(config.image_size), int(config.seed),
            int(syn.num_identities), int(syn.heldout_identities), int(syn.samples_per_identity))


def build_evaluator(name: str, config: Any) -> PairVerificationEvaluator:
    """The evaluator for target ``name`` (module docstring); memoised per name and config values."""
    if name in retrieval_targets.TARGETS:  # Recall@K: cheap to build, images streamed per run
        return retrieval_targets.build_evaluator(name, config)
    key = _memo_key(name, config)
    if key in _EVALUATORS:
        return _EVALUATORS[key]
    batch_size = int(config.eval.batch_size)
    if name == "lfw_dev":
        loader = _lfw_loader(config)
    elif name in ("cfp_fp", "cfp_ff"):
        loader = _cfp_loader(config, name[-2:].upper())
    elif name == "lfw_people_test":
        evaluator = AllPairsVerificationEvaluator(name, _lfw_people_loader(config), batch_size)
        _EVALUATORS[key] = evaluator
        return evaluator
    elif name == "synthetic":
        loader = _synthetic_loader(config)
    elif name.startswith("bin:") and len(name) > 4:
        loader = _bin_loader(config, name[4:])
    else:
        raise ValueError(f"unknown evaluation target {name!r}; known: "
                         f"{', '.join(TARGET_NAMES + tuple(retrieval_targets.TARGETS))}")
    evaluator = PairVerificationEvaluator(name, loader, batch_size)
    _EVALUATORS[key] = evaluator
    return evaluator


def run_targets(names, embed_fn: EmbedFn, config: Any,
                out_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Runs each target in ``names``; returns ``{name: metrics}`` in that order."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return {name: build_evaluator(name, config).run(embed_fn, out_dir) for name in names}


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A Markdown table: one row per target, one column per metric (first-seen order)."""
    columns: list[str] = []
    for metrics in results.values():
        for k in metrics:
            if k not in columns:
                columns.append(k)
    header = ["target"] + columns
    rows = [[name] + [f"{m[c]:.{digits}f}" if c in m else "-" for c in columns]
            for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
