"""Evaluation targets: one registry of types, built from the config, and the table that reports them.

A target is named in ``config.eval.targets`` (or ``broadface_jax.evaluate
--targets``) in one of three ways (:func:`resolve_target`):

* the name of a ``config.evals`` entry, as big_vision's ``config.evals``:
  ``c.evals.ijbc = dict(type="ijbc", root="/data/IJB_release/IJBC", flip=True)``
  (``type`` defaults to the entry's name; the other keys are the type's options);
* a type name, every option at its default: ``lfw_dev``, ``cfp_fp``, ``sop``;
* ``'<type>:<value>'``, setting the type's positional option:
  ``bin:agedb_30``, ``ijbc:/data/IJB_release/IJBC``, ``megaface:/data/megaface``.

Types (:data:`TYPES`; ``register(name, TargetType(...))`` adds one): the pair
and all-pairs targets below, the Recall@K targets of :mod:`.retrieval_targets`
(options ``data_dir``, ``ks``) and ``ijbb`` / ``ijbc`` / ``megaface`` / ``ytf``
of :mod:`.benchmark_targets`. Options are checked before anything runs: an
unknown type or option, a missing required one or a value of the wrong type
is a :class:`TargetError` naming the entry and option, with close matches
(``config_check`` reports them with the other config faults). The trainer and
``broadface_jax.evaluate`` both run targets through :func:`run_targets`.

* ``lfw_dev``: LFW View 1 test pairs (``<data_root>/lfw/pairsDevTest.txt``;
  option ``data_root``, default ``config.eval.data_root``, as for the CFP and
  ``lfw_people_test`` types;
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
  ``broadface_jax.datasets.synthetic.verification_pairs(config, num_pairs, seed)``
  (options ``num_pairs`` = 600, ``seed`` = -1: ``config.seed + 7919``).
* ``bin:<path>`` (type ``bin``, options ``path``, ``bin_dir``): an insightface
  ``.bin`` (read safely); a relative path is looked up in ``bin_dir``
  (default ``config.eval.bin_dir``) too, and ``.bin`` may be left out
  (``bin:agedb_30``). Folds: insightface's KFold(10) in file order, or
  balanced folds where that leaves a fold without a same or a different pair
  (small or class-sorted files; :func:`verification.bin_fold_ids`).

* ``sop``, ``inshop``, ``cub200``, ``cars196``: Recall@K on the test splits
  of the prepared retrieval data sets (:mod:`.retrieval_targets`: no flip,
  the evaluation crop of the retrieval pipeline, metrics ``recall@K``).

The pair targets (``lfw_dev``, ``cfp_*``, ``synthetic``, ``bin``) run the pair
protocol of :mod:`verification` with flip-and-sum and report accuracy ± std,
the chosen threshold, VAL @ FAR = 1e-3 and XNorm. Every target embeds through
:mod:`.embedding` (each process its share of the images).

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
from broadface_jax.suggest import did_you_mean as _suggest
from broadface_jax.evaluation.common import EmbedFn, embed_images, l2_normalize

SYNTHETIC_NUM_PAIRS = 600
SYNTHETIC_SEED_OFFSET = 7919  # synthetic eval pairs use config.seed + this
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
        from broadface_jax import distributed

        if out_dir is not None and distributed.is_main_process():
            os.makedirs(out_dir, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)
            verification.plot_roc(result, os.path.join(out_dir, f"roc_{safe}.png"), self.name)
        return metrics


# ------------------------------------------------------------------ caching
#: Environment variable naming the evaluation cache folder (``config.eval.cache_dir`` wins).
CACHE_ENV = "BROADFACE_EVAL_CACHE"


def cache_path(config: Any = None) -> str:
    """The evaluation cache folder: ``config.eval.cache_dir``, ``$BROADFACE_EVAL_CACHE`` or the default."""
    configured = None
    if config is not None and hasattr(config.eval, "get"):
        configured = config.eval.get("cache_dir", None)
    return configured or os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "broadface_jax", "eval")


def clear_cache(config: Any = None) -> str:
    """Deletes the evaluation cache's ``.npz`` files (nothing else); returns what it did, one line."""
    path = cache_path(config)
    if not os.path.isdir(path):
        return f"evaluation cache {path}: nothing there"
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz")]
    size = sum(os.path.getsize(f) for f in files)
    for f in files:
        os.remove(f)
    return f"evaluation cache {path}: removed {len(files)} files ({size / 2**20:.1f} MiB)"


def _cache_dir(config: Any) -> str | None:
    path = cache_path(config)
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


def _data_root(data_root: str, sub: str, where: str) -> str:
    root = os.path.abspath(os.path.join(os.fspath(data_root), sub))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{where}={data_root!r}: no '{sub}' folder at {root}")
    return root


def _lfw_loader(config: Any, data_root: str, where: str) -> Callable[[], PairData]:
    root = _data_root(data_root, "lfw", where)
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


def _lfw_people_loader(config: Any, data_root: str, where: str) -> Callable[[], LabelledFaces]:
    root = _data_root(data_root, "lfw", where)
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

def _cfp_loader(config: Any, protocol: str, data_root: str, where: str) -> Callable[[], PairData]:
    root = _data_root(data_root, "cfp", where)
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


def _synthetic_loader(config: Any, num_pairs: int, seed: int) -> Callable[[], PairData]:
    def load() -> PairData:
        from broadface_jax.datasets import synthetic

        a, b, issame = synthetic.verification_pairs(config, num_pairs, seed)
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


def _bin_loader(config: Any, path: str, bin_dir: str) -> Callable[[], PairData]:
    def load() -> PairData:
        from broadface_jax.evaluation import binfile

        file = resolve_bin_path(path, bin_dir)
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
REQUIRED = "<required>"  # an option default: the option must be given


@dataclasses.dataclass(frozen=True)
class TargetType:
    """One kind of evaluation target: how to build its evaluator and which options it takes.

    ``options`` maps each option to its default (:data:`REQUIRED`: must be
    given); a given value must have the default's type (an int passes for a
    float, a list for a tuple). ``positional`` is the option that a
    ``'<type>:<value>'`` target string sets (``bin:agedb_30``, ``ijbc:/data/IJBC``).
    ``build(name, config, options)`` gets every option, defaults filled in.
    """

    build: Callable[[str, Any, dict[str, Any]], Evaluator]
    options: Mapping[str, Any]
    positional: str | None = None
    summary: str = ""
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # option -> allowed values


class TargetError(ValueError):
    """An evaluation target that cannot be built; ``problems`` lists each fault on its own."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A resolved evaluation target: its name (the key of the results), type and options."""

    name: str
    type: str
    options: Mapping[str, Any]
    where: str  # the config field it came from, for errors


#: type name -> :class:`TargetType`; filled below and by :mod:`.benchmark_targets`.
TYPES: dict[str, TargetType] = {}


def register(type_name: str, target_type: TargetType) -> None:
    """Adds an evaluation type (a new evaluator is one class and one ``register`` call)."""
    if type_name in TYPES:
        raise ValueError(f"evaluation type {type_name!r} is already registered")
    TYPES[type_name] = target_type


def _type_ok(value: Any, default: Any) -> bool:
    if default is REQUIRED or default is None:
        return value is not None
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def option_problems(spec: TargetSpec) -> list[str]:
    """Every fault of ``spec`` as ``'<where>.<option>=<value>: <why>'`` (empty when it is valid)."""
    if spec.type not in TYPES:
        return [f"{spec.where}: unknown evaluation type {spec.type!r}{_suggest(spec.type, TYPES)}; "
                f"known: {', '.join(TYPES)}"]
    kind = TYPES[spec.type]
    found = []
    for key, value in spec.options.items():
        if key not in kind.options:
            found.append(f"{spec.where}.{key}={value!r}: not an option of type {spec.type!r}"
                         f"{_suggest(key, kind.options)}; its options: {', '.join(kind.options) or 'none'}")
        elif not _type_ok(value, kind.options[key]):
            default = kind.options[key]
            want = "a value" if default is REQUIRED else f"a {type(default).__name__} like {default!r}"
            found.append(f"{spec.where}.{key}={value!r}: must be {want}")
        elif key in kind.choices and value not in kind.choices[key]:
            found.append(f"{spec.where}.{key}={value!r}: must be one of "
                         f"{', '.join(repr(c) for c in kind.choices[key])}{_suggest(value, kind.choices[key])}")
    for key, default in kind.options.items():
        if default is REQUIRED and key not in spec.options:
            found.append(f"{spec.where}.{key}: required by type {spec.type!r} (not set)")
    return found


def _entries(config: Any) -> Mapping[str, Any]:
    evals = config.get("evals", None) if hasattr(config, "get") else getattr(config, "evals", None)
    return evals if evals is not None else {}


def resolve_target(item: str, config: Any, where: str = "config.eval.targets") -> TargetSpec:
    """The :class:`TargetSpec` of one entry of ``config.eval.targets`` / ``--targets``.

    ``item`` is the name of a ``config.evals`` entry (``{type: ..., <options>}``;
    ``type`` defaults to the entry's name), a type name (all options default:
    ``lfw_dev``, ``synthetic``, ``sop``, ...) or ``'<type>:<value>'`` setting
    the type's positional option (``bin:agedb_30``, ``ijbc:/data/IJB_release/IJBC``).
    Options are checked here; the data is not touched.

    Raises:
      TargetError: (a ValueError) naming ``where`` (the entry / field), with close matches.
    """
    if not isinstance(item, str) or not item:
        raise TargetError([f"{where}={item!r}: a target must be a non-empty string"])
    entries = _entries(config)
    if item in entries:
        entry = entries[item]
        options = dict(entry.items()) if hasattr(entry, "items") else None
        if options is None:
            raise TargetError([f"config.evals.{item}={entry!r}: an entry must be a dict "
                               "{'type': ..., <options>}"])
        type_name = str(options.pop("type", item))
        spec = TargetSpec(item, type_name, options, f"config.evals.{item}")
    elif item in TYPES:
        spec = TargetSpec(item, item, {}, where)
        needs = [k for k, v in TYPES[item].options.items() if v is REQUIRED]
        if needs:
            raise TargetError([f"{where}={item!r}: type {item!r} needs {', '.join(needs)}: write "
                               f"'{item}:<{needs[0]}>' or name a config.evals entry of this type"])
    elif ":" in item and item.split(":", 1)[0] in TYPES:
        type_name, value = item.split(":", 1)
        kind = TYPES[type_name]
        if kind.positional is None:
            raise TargetError([f"{where}={item!r}: type {type_name!r} takes no ':<value>' "
                               "(define a config.evals entry for its options)"])
        if not value:
            raise TargetError([f"{where}={item!r}: empty {kind.positional} after '{type_name}:'"])
        spec = TargetSpec(item, type_name, {kind.positional: value}, where)
    else:
        head = item.split(":", 1)[0]
        names = sorted(set(TYPES) | set(entries))
        raise TargetError([f"{where}: unknown evaluation target {item!r}{_suggest(head, names)}; "
                         f"known types: {', '.join(TYPES)}"
                         + (f"; config.evals entries: {', '.join(entries)}" if entries else "")
                         + " (or '<type>:<path>', e.g. 'bin:agedb_30', 'ijbc:/data/IJB_release/IJBC')"])
    found = option_problems(spec)
    if found:
        raise TargetError(found)
    return spec


def target_problems(config: Any, targets: Any = None, field: str = "config.eval.targets") -> list[str]:
    """Every fault of ``config.eval.targets`` (or ``targets``, named ``field`` in messages), unraised."""
    targets = tuple(config.eval.targets) if targets is None else targets
    found = []
    for i, item in enumerate(targets):
        try:
            resolve_target(item, config, f"{field}[{i}]")
        except TargetError as e:
            found.extend(e.problems)
    return found


def _options(spec: TargetSpec) -> dict[str, Any]:
    out = {k: v for k, v in TYPES[spec.type].options.items() if v is not REQUIRED}
    out.update({k: tuple(v) if isinstance(v, list) else v for k, v in spec.options.items()})
    return out


_EVALUATORS: dict[tuple, Evaluator] = {}


def _memo_key(spec: TargetSpec, options: Mapping[str, Any], config: Any) -> tuple:
    syn = config.dataset.synthetic
    return (spec.name, spec.type, tuple(sorted(options.items())),
            os.path.abspath(os.fspath(config.eval.data_root)), os.fspath(config.eval.bin_dir),
            int(config.eval.batch_size), int(config.image_size), int(config.seed),
            int(syn.num_identities), int(syn.heldout_identities), int(syn.samples_per_identity),
            retrieval_targets.data_dir_of(config), str(config.dataset.get("resize_to", None)),
            str(config.dataset.get("normalize", None)))


def build_evaluator(target: str | TargetSpec, config: Any) -> Evaluator:
    """The evaluator of a target (:func:`resolve_target`); memoised per target, options and config values."""
    spec = target if isinstance(target, TargetSpec) else resolve_target(target, config)
    options = _options(spec)
    key = _memo_key(spec, options, config)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = TYPES[spec.type].build(spec.name, config, options)
    return _EVALUATORS[key]


def run_targets(names, embed_fn: EmbedFn, config: Any,
                out_dir: str | os.PathLike | None = None,
                progress: Callable[[str], Any] | None = None) -> dict[str, dict[str, float]]:
    """Runs each target of ``names`` (comma-separated or a sequence); returns ``{name: metrics}`` in order.

    Every target is resolved (and its options checked) before the first one
    runs, so a typo in the last target costs no evaluation time. With several
    processes every process must call this with the same targets (the
    embedding is shared, :mod:`.embedding`); all get the same results.
    ``progress(name)`` makes each target's progress reporter
    (``embedding.BarProgress`` / ``embedding.LogProgress``), open while the
    target runs.
    """
    import contextlib  # noqa: PLC0415

    from broadface_jax.evaluation import embedding  # noqa: PLC0415

    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    specs = [resolve_target(n, config, f"target {n!r}") for n in names]
    results = {}
    for spec in specs:
        with (embedding.reporting(progress(spec.name)) if progress is not None
              else contextlib.nullcontext()):
            results[spec.name] = build_evaluator(spec, config).run(embed_fn, out_dir)
    return results


# ---- the built-in types
def _or(value: str, default: str) -> str:
    return value if value else default


def _pair(loader_fn) -> Callable[[str, Any, dict], Evaluator]:
    def build(name: str, config: Any, o: dict) -> Evaluator:
        return PairVerificationEvaluator(name, loader_fn(config, o), int(config.eval.batch_size))

    return build


_DATA_ROOT = {"data_root": ""}  # "" = config.eval.data_root

register("lfw_dev", TargetType(
    _pair(lambda c, o: _lfw_loader(c, _or(o["data_root"], c.eval.data_root),
                                   "data_root" if o["data_root"] else "config.eval.data_root")),
    _DATA_ROOT, summary="LFW View 1 test pairs (<data_root>/lfw), 10 balanced folds"))
for _proto in ("fp", "ff"):
    register(f"cfp_{_proto}", TargetType(
        _pair(lambda c, o, p=_proto.upper(): _cfp_loader(
            c, p, _or(o["data_root"], c.eval.data_root),
            "data_root" if o["data_root"] else "config.eval.data_root")),
        _DATA_ROOT, summary=f"CFP {_proto.upper()} (<data_root>/cfp), official 10 folds"))
register("lfw_people_test", TargetType(
    lambda name, c, o: AllPairsVerificationEvaluator(
        name, _lfw_people_loader(c, _or(o["data_root"], c.eval.data_root),
                                 "data_root" if o["data_root"] else "config.eval.data_root"),
        int(c.eval.batch_size)),
    _DATA_ROOT, summary="every pair of LFW View 1 peopleDevTest faces, TAR @ FAR"))
register("synthetic", TargetType(
    _pair(lambda c, o: _synthetic_loader(
        c, o["num_pairs"], o["seed"] if o["seed"] >= 0 else int(c.seed) + SYNTHETIC_SEED_OFFSET)),
    {"num_pairs": SYNTHETIC_NUM_PAIRS, "seed": -1},
    summary="held-out synthetic identities (seed -1 = config.seed + 7919)"))
register("bin", TargetType(
    _pair(lambda c, o: _bin_loader(c, o["path"], _or(o["bin_dir"], os.fspath(c.eval.bin_dir)))),
    {"path": REQUIRED, "bin_dir": ""}, positional="path",
    summary="an insightface .bin (bin_dir '' = config.eval.bin_dir)"))


def _recall_build(dataset: str):
    def build(name: str, config: Any, o: dict) -> Evaluator:
        return retrieval_targets.build_evaluator(dataset, config, data_dir=o["data_dir"],
                                                 ks=tuple(int(k) for k in o["ks"]), name=name)

    return build


for _ds in retrieval_targets.TARGETS:
    register(_ds, TargetType(_recall_build(_ds), {"data_dir": "", "ks": ()}, positional="data_dir",
                             summary=f"Recall@K on the prepared {_ds} test split(s)"))

def describe_types() -> str:
    """One line per registered type: name, summary, options with defaults (``evaluate --targets=list``)."""
    lines = []
    for name, kind in TYPES.items():
        opts = ", ".join(f"{k}={'<required>' if v is REQUIRED else repr(v)}" for k, v in kind.options.items())
        pos = f"  ('{name}:<{kind.positional}>')" if kind.positional else ""
        lines.append(f"{name}: {kind.summary}{pos}\n    options: {opts or 'none'}")
    return "\n".join(lines)


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


# The benchmark types (ijbb, ijbc, megaface, ytf) register themselves.
from broadface_jax.evaluation import benchmark_targets  # noqa: E402,F401
