"""Models in and out: arcface_torch / torchvision / insightface ONNX weights -> Flax, and ONNX export.

    params, batch_stats = interop.import_encoder("backbone.pth", config)
    variables = {"params": params, "batch_stats": batch_stats}
    embeddings = model.apply(variables, images_nhwc, train=False)

Sources (chosen by the file's suffix):

* ``.pth`` / ``.pt``: a ``torch.save`` file, read without torch and without
  running pickled code (:mod:`torchfile`): an arcface_torch state dict
  (``backbone.pth``, ``model.pt``; IResNet-18/34/50/100/200, MobileFaceNet),
  an arcface_torch training checkpoint (``checkpoint_gpu_<rank>.pt``: its
  ``state_dict_backbone``, and ``state_dict_softmax_fc['weight']`` rows for
  the classifier, concatenated in rank order over all rank files), or a
  torchvision ResNet-50 state dict (its 1000-way ``fc`` dropped; our
  embedding head, which torchvision lacks, is freshly initialised);
* ``.onnx``: an insightface recognition pack exported from arcface_torch
  (``torch2onnx.py``: opset 11, BatchNorm folded into the Conv before it,
  numeric initializer names), matched by graph order (:mod:`mapping`).

Several rank files are given as a comma-separated list or a glob
(``ckpt/checkpoint_gpu_*.pt``); the backbone is read from the first.
Names map through :mod:`layout`; everything here but the final placement is
pure NumPy.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Optional

import numpy as np

from broadface_jax.interop.mapping import ImportMismatch
from broadface_jax.interop.onnxfile import OnnxFileError
from broadface_jax.interop.torchfile import TorchFileError, read_torch_file

#: Suffixes ``config.init_from`` / ``--from`` treat as a weights file.
TORCH_SUFFIXES = (".pth", ".pt")
ONNX_SUFFIXES = (".onnx",)


class InteropError(ValueError):
    """A weights file is readable but cannot be used as asked (e.g. no classifier rows)."""


def is_model_file(spec: str) -> bool:
    """Whether ``spec`` (a path, comma list or glob) names weights files rather than a workdir."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    return bool(parts) and all(p.lower().endswith(TORCH_SUFFIXES + ONNX_SUFFIXES) for p in parts)


def _rank_of(path: str) -> Optional[int]:
    m = re.search(r"(\d+)\.pt[h]?$", os.path.basename(path))
    return int(m.group(1)) if m else None


def resolve_files(spec: str) -> list[str]:
    """The files named by ``spec`` (comma list and/or globs), rank files in rank order.

    Raises:
      FileNotFoundError: a named file (or every match of a glob) is missing.
    """
    files: list[str] = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if any(ch in part for ch in "*?["):
            matches = glob.glob(part)
            if not matches:
                raise FileNotFoundError(f"no file matches {part!r}")
            ranks = [_rank_of(m) for m in matches]
            matches = (sorted(matches, key=_rank_of) if all(r is not None for r in ranks)
                       else sorted(matches))
            files += matches
        elif not os.path.isfile(part):
            raise FileNotFoundError(f"weights file not found: {part}")
        else:
            files.append(part)
    if not files:
        raise FileNotFoundError(f"no weights file named in {spec!r}")
    return files


def backbone_state(obj: Any, source: str) -> dict[str, np.ndarray]:
    """The backbone state dict inside a loaded torch file (plain, DDP or full checkpoint)."""
    if isinstance(obj, dict):
        for key in ("state_dict_backbone", "state_dict", "model", "backbone"):
            if key in obj and isinstance(obj[key], dict):
                return dict(obj[key])
        if obj and all(isinstance(k, str) for k in obj) and any(
                isinstance(v, np.ndarray) for v in obj.values()):
            return dict(obj)
        raise TorchFileError(
            f"{source}: holds a dict with keys {sorted(map(str, obj))[:8]} but no state dict "
            "(expected tensors, or 'state_dict_backbone' of an arcface_torch checkpoint)")
    raise TorchFileError(f"{source}: holds a {type(obj).__name__}, not a state dict")


@dataclasses.dataclass
class Imported:
    """What one import produced.

    Attributes:
      params, batch_stats: the encoder's Flax trees (NumPy float32).
      classifier: ``f32[C, D]`` arcface_torch softmax rows in rank order, or
        None when the file(s) have none (a plain backbone, ONNX).
      fresh: Flax leaves the file has no counterpart for (initialised from
        ``config.seed``), e.g. the embedding head of a torchvision ResNet.
      folded: Conv+BN pairs that arrived folded (ONNX).
      source: the files read.
    """

    params: dict
    batch_stats: dict
    classifier: Optional[np.ndarray]
    fresh: list[str]
    folded: int
    source: str


def abstract_variables(config: Any) -> tuple[Any, dict[tuple[str, ...], tuple[int, ...]]]:
    """The encoder's variables as ``ShapeDtypeStruct`` and as ``{leaf path: shape}``."""
    import jax  # noqa: PLC0415

    from broadface_jax import models  # noqa: PLC0415

    model = models.build_encoder(config.model)
    abstract = jax.eval_shape(
        lambda rng: models.init_variables(model, int(config.image_size), rng),
        jax.random.PRNGKey(0))
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    shapes = {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
    return abstract, shapes


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def read_classifier(files: list[str], num_classes: Optional[int] = None,
                    embedding_dim: Optional[int] = None) -> Optional[np.ndarray]:
    """arcface_torch softmax rows ``f32[C, D]`` from rank files (None if the files have none).

    Each ``checkpoint_gpu_<rank>.pt`` holds its rank's slice of the classes
    (``state_dict_softmax_fc['weight']``, rows in class order); the slices are
    concatenated in rank order.

    Raises:
      InteropError: only some files have rows, D differs, or ``num_classes``
        is given and the row count differs (names the files and counts).
    """
    slices, without = [], []
    for path in files:
        if not path.lower().endswith(TORCH_SUFFIXES):
            without.append(path)
            continue
        obj = read_torch_file(path)
        fc = obj.get("state_dict_softmax_fc") if isinstance(obj, dict) else None
        weight = fc.get("weight") if isinstance(fc, dict) else None
        if weight is None:
            without.append(path)
            continue
        if not isinstance(weight, np.ndarray) or weight.ndim != 2:
            raise InteropError(f"{path}: state_dict_softmax_fc['weight'] is not a 2-D tensor")
        slices.append((path, weight.astype(np.float32)))
    if not slices:
        return None
    if without:
        raise InteropError(f"classifier rows found in {len(slices)} file(s) but not in "
                           f"{without}: give all rank files of one checkpoint")
    dims = {w.shape[1] for _, w in slices}
    if len(dims) != 1 or (embedding_dim is not None and dims != {embedding_dim}):
        raise InteropError(f"classifier rows have embedding sizes {sorted(dims)} across "
                           f"{[p for p, _ in slices]}, model.embedding_dim={embedding_dim}")
    rows = np.concatenate([w for _, w in slices])
    if num_classes is not None and rows.shape[0] != num_classes:
        per_file = ", ".join(f"{os.path.basename(p)}: {w.shape[0]}" for p, w in slices)
        raise InteropError(
            f"classifier rows of {len(slices)} rank file(s) ({per_file}) sum to "
            f"{rows.shape[0]} classes, config.num_classes={num_classes}"
            + ("; pass all rank files, e.g. 'DIR/checkpoint_gpu_*.pt'" if rows.shape[0] < num_classes
               else ""))
    return rows


def import_model(spec: str, config: Any, *, with_classifier: bool = False) -> Imported:
    """Reads weights file(s) into the Flax trees of ``config.model`` (see the module docstring).

    Args:
      spec: a ``.pth`` / ``.pt`` / ``.onnx`` path, or a comma list / glob of rank files.
      config: the run's config (``model.*``, ``image_size``, ``seed``,
        ``num_classes`` when ``with_classifier``).
      with_classifier: also read arcface_torch softmax rows (None if absent).

    Raises:
      FileNotFoundError, TorchFileError, OnnxFileError: the file is missing or unreadable.
      ImportMismatch: the weights do not fit ``config.model`` (every problem listed).
    """
    from broadface_jax.interop import mapping, onnxfile  # noqa: PLC0415

    files = resolve_files(spec)
    first = files[0]
    name = str(config.model.name)
    abstract, shapes = abstract_variables(config)
    folded = 0
    if first.lower().endswith(ONNX_SUFFIXES):
        leaves, folded = mapping.from_onnx_layers(
            onnxfile.read_onnx_layers(first), name, shapes, first)
    else:
        state = backbone_state(read_torch_file(first), first)
        leaves = mapping.from_torch_state_dict(state, name, shapes, first)
    fresh = sorted("/".join(p) for p in shapes if p not in leaves)
    if fresh:
        leaves.update(_fresh_leaves(config, [p for p in shapes if p not in leaves], shapes))
    tree = _nest(leaves)
    classifier = None
    if with_classifier:
        classifier = read_classifier(files, int(config.num_classes),
                                     int(config.model.embedding_dim))
    del abstract
    return Imported(tree.get("params", {}), tree.get("batch_stats", {}), classifier, fresh,
                    folded, ",".join(files))


def _fresh_leaves(config: Any, paths: list[tuple[str, ...]],
                  shapes: dict[tuple[str, ...], tuple[int, ...]]) -> dict[tuple[str, ...], np.ndarray]:
    """The model's own initialisation (``config.seed``) of the leaves a file lacks.

    The only such leaves in practice are the embedding head of a torchvision
    ResNet (torchvision has none): then only the head is initialised, as a
    module named ``head`` at the root, which gets the same parameter RNG (Flax
    derives it from the module path) and so the same values as the whole
    model's ``init``, without tracing the trunk. Anything else initialises
    the whole model.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from broadface_jax import models  # noqa: PLC0415

    rng = jax.random.PRNGKey(int(config.seed))
    model = models.build_encoder(config.model)
    from broadface_jax.interop import layout  # noqa: PLC0415

    if layout.family(str(config.model.name)) == "resnet" and all(p[1] == "head" for p in paths):
        from flax import linen as nn  # noqa: PLC0415

        from broadface_jax.models.head import EmbeddingHead  # noqa: PLC0415

        class _HeadOnly(nn.Module):
            """ResNet's head (as models/resnet.py builds it) on pooled features."""

            @nn.compact
            def __call__(self, x: jax.Array) -> jax.Array:
                return EmbeddingHead(model.embedding_dim, dropout=model.dropout, fc_bias=True,
                                     learn_feature_scale=False, dtype=model.dtype,
                                     name="head")(x, False)

        (channels,) = shapes[("params", "head", "bn", "bias")]  # the pooled trunk's
        variables = _HeadOnly().init({"params": rng, "dropout": rng},
                                     jnp.zeros((1, channels), jnp.float32))
    else:
        variables = jax.jit(lambda r: models.init_variables(model, int(config.image_size), r))(rng)
    out = {}
    for path in paths:
        node = variables
        for key in path:
            node = node[key]
        out[path] = np.asarray(node, np.float32)
    return out


def import_encoder(path: str, config: Any) -> tuple[dict, dict]:
    """``(params, batch_stats)`` of ``config.model`` from a weights file, ready for ``model.apply``.

    See :func:`import_model` for the sources and errors.
    """
    imported = import_model(path, config)
    return imported.params, imported.batch_stats


__all__ = ["ImportMismatch", "Imported", "InteropError", "OnnxFileError", "TorchFileError",
           "abstract_variables", "backbone_state", "import_encoder", "import_model",
           "is_model_file", "read_classifier", "read_torch_file", "resolve_files"]
