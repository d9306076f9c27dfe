"""PyTorch state dicts and ONNX weights -> our Flax ``params`` / ``batch_stats`` (pure NumPy).

Conventions (see ``models/``): conv kernels are PyTorch ``(O, I/g, kh, kw)``
and Flax ``(kh, kw, I/g, O)``; PyTorch flattens the last feature map as
``(C, H, W)`` and our head as ``(H, W, C)``, so the FC weight's input axis is
permuted; BatchNorm ``weight/bias/running_mean/running_var`` are Flax
``scale/bias`` (params) and ``mean/var`` (batch_stats); PReLU ``weight`` is
``alpha``. Everything else is a renaming given by :mod:`layout`.

Every mismatch is collected before one :class:`ImportMismatch` is raised, so
the message lists all missing and unexpected keys and every shape that
differs (with the key, the shape the model needs and the shape found).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from broadface_jax.interop import layout

Shapes = Mapping[tuple[str, ...], tuple[int, ...]]  # ('params', *path, leaf) -> shape
#: BatchNorm epsilon of our models (and of PyTorch's default).
BN_EPS = 1e-5


class ImportMismatch(ValueError):
    """The file's weights do not fit ``config.model`` (all problems listed)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor and the Flax leaf it becomes."""

    torch_key: str
    leaf: Optional[tuple[str, ...]]  # ('params', *path, name); None: checked, not stored
    torch_shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray]
    check: Optional[Callable[[np.ndarray], Optional[str]]] = None


def conv_to_flax(w: np.ndarray) -> np.ndarray:
    """``(O, I/g, kh, kw)`` -> ``(kh, kw, I/g, O)``."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def fc_to_flax(w: np.ndarray, channels: int) -> np.ndarray:
    """PyTorch ``(D, C*H*W)`` (input flattened as C, H, W) -> Flax ``(H*W*C, D)``."""
    d, n = w.shape
    hw = n // channels
    side = math.isqrt(hw)
    if side * side * channels != n:
        raise ValueError(f"FC input size {n} is not C x H x H for C={channels}")
    return np.ascontiguousarray(
        w.reshape(d, channels, side, side).transpose(2, 3, 1, 0).reshape(n, d))


def _ones_check(what: str) -> Callable[[np.ndarray], Optional[str]]:
    def check(value: np.ndarray) -> Optional[str]:
        if not np.allclose(value, 1.0):
            return (f"{what} must be all ones (our last BatchNorm has a fixed scale of 1, as "
                    f"arcface_torch's IResNet); found values in [{value.min():.4g}, "
                    f"{value.max():.4g}]")
        return None
    return check


def _channels_before_fc(ops: list[layout.Op], shapes: Shapes) -> int:
    """Channels of the map the FC layer flattens (those of the BN before it)."""
    for i, op in enumerate(ops):
        if op.kind == "fc":
            for prev in reversed(ops[:i]):
                if prev.kind == "bn":
                    return shapes[("params",) + prev.flax + ("bias",)][0]
    raise ValueError("the layout has no FC layer")


def torch_entries(model_name: str, shapes: Shapes) -> list[Entry]:
    """The PyTorch keys encoder ``model_name`` needs, with shapes and converters."""
    ops = layout.plan(model_name)
    channels = _channels_before_fc(ops, shapes)
    out: list[Entry] = []
    for op in ops:
        if not op.torch or not op.flax:
            continue
        p, b, t = ("params",) + op.flax, ("batch_stats",) + op.flax, op.torch
        if op.kind == "conv":
            kh, kw, i, o = shapes[p + ("kernel",)]
            out.append(Entry(f"{t}.weight", p + ("kernel",), (o, i, kh, kw), conv_to_flax))
        elif op.kind == "bn":
            (c,) = shapes[p + ("bias",)]
            if op.scale:
                out.append(Entry(f"{t}.weight", p + ("scale",), (c,), np.asarray))
            else:
                out.append(Entry(f"{t}.weight", None, (c,), np.asarray,
                                 _ones_check(f"{t}.weight")))
            out += [Entry(f"{t}.bias", p + ("bias",), (c,), np.asarray),
                    Entry(f"{t}.running_mean", b + ("mean",), (c,), np.asarray),
                    Entry(f"{t}.running_var", b + ("var",), (c,), np.asarray)]
        elif op.kind == "prelu":
            (c,) = shapes[p + ("alpha",)]
            out.append(Entry(f"{t}.weight", p + ("alpha",), (c,), np.asarray))
        elif op.kind == "fc":
            n, d = shapes[p + ("kernel",)]
            out.append(Entry(f"{t}.weight", p + ("kernel",), (d, n),
                             lambda w, c=channels: fc_to_flax(w, c)))
            if p + ("bias",) in shapes:
                out.append(Entry(f"{t}.bias", p + ("bias",), (d,), np.asarray))
    return out


def torch_key_names(model_name: str) -> set[str]:
    """The state-dict keys of ``model_name`` (without shapes; for guessing a file's model)."""
    keys = set()
    for op in layout.plan(model_name):
        if not op.torch:
            continue
        if op.kind == "bn":
            keys |= {f"{op.torch}.{k}" for k in ("weight", "bias", "running_mean", "running_var")}
        elif op.kind in ("conv", "prelu", "fc"):
            keys.add(f"{op.torch}.weight")
    return keys


def _ignorable(key: str, fam: str) -> bool:
    """Keys a file may carry that the encoder does not use."""
    if key.endswith("num_batches_tracked"):
        return True
    return fam == "resnet" and key.split(".")[0] == "fc"  # torchvision's 1000-way classifier


def guess_model(keys: set[str]) -> list[str]:
    """Registry names whose PyTorch keys are exactly the file's (biases and bookkeeping aside)."""
    from broadface_jax import models  # noqa: PLC0415

    found = []
    for name in models.REGISTRY:
        want = torch_key_names(name)
        have = {k for k in keys if not _ignorable(k, layout.family(name))}
        extra = {k for k in have - want if not (k.endswith(".bias") and k[:-5] + ".weight" in want)}
        if want <= have and not extra:
            found.append(name)
    return found


def _fmt(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def from_torch_state_dict(state: Mapping[str, Any], model_name: str, shapes: Shapes,
                          source: str) -> dict[tuple[str, ...], np.ndarray]:
    """Maps a state dict onto the Flax leaves of ``model_name``.

    Returns:
      ``{('params'|'batch_stats', *path, leaf): float32 array}`` for every
      leaf the PyTorch model has (torchvision's ResNet has no embedding head:
      those leaves are absent and keep their fresh initialisation).

    Raises:
      ImportMismatch: listing missing keys, unexpected keys and every shape
        mismatch (key, expected, found), naming ``source`` and the model.
    """
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    fam = layout.family(model_name)
    entries = torch_entries(model_name, shapes)
    used = {e.torch_key for e in entries}
    missing = [e.torch_key for e in entries if e.torch_key not in state]
    unexpected = sorted(k for k in state if k not in used and not _ignorable(k, fam))
    bad_shapes, bad_values, out = [], [], {}
    for e in entries:
        if e.torch_key not in state:
            continue
        value = state[e.torch_key]
        if not isinstance(value, np.ndarray):
            bad_values.append(f"{e.torch_key}: a {type(value).__name__}, not a tensor")
            continue
        if tuple(value.shape) != e.torch_shape:
            bad_shapes.append(f"{e.torch_key}: model needs {e.torch_shape}, file has "
                              f"{tuple(value.shape)}")
            continue
        value = value.astype(np.float32)
        if e.check is not None and (msg := e.check(value)):
            bad_values.append(msg)
        if e.leaf is not None:
            out[e.leaf] = e.convert(value).astype(np.float32)
    if missing or unexpected or bad_shapes or bad_values:
        parts = [f"{source} does not fit model.name={model_name!r} "
                 f"(width {_width_hint(shapes)}):"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if bad_shapes:
            parts.append(f"  shape mismatches ({len(bad_shapes)}):\n    "
                         + "\n    ".join(bad_shapes[:12])
                         + (f"\n    ... ({len(bad_shapes) - 12} more)" if len(bad_shapes) > 12 else ""))
        if bad_values:
            parts.append("  bad values: " + "; ".join(bad_values[:5]))
        guesses = [g for g in guess_model(set(state)) if g != model_name]
        if guesses and (missing or unexpected):
            parts.append(f"  the file's keys are those of model.name={guesses[0]!r}; set "
                         f"--config.model.name={guesses[0]}")
        elif bad_shapes and not (missing or unexpected):
            parts.append("  " + _shape_hint(bad_shapes))
        raise ImportMismatch("\n".join(parts))
    return out


def _shape_hint(bad_shapes: list[str]) -> str:
    """Which config field to check when every key is there but some shapes differ.

    Only the FC's input size differing (``(D, n)`` vs ``(D, m)``, the Conv
    layers matching) means another feature-map size: ``image_size``; channel
    counts differing mean ``model.width``; the output size, ``model.embedding_dim``.
    """
    pairs = []
    for line in bad_shapes:
        m = re.search(r"model needs \(([\d, ]*)\), file has \(([\d, ]*)\)", line)
        if m:
            pairs.append(tuple(tuple(int(v) for v in g.replace(" ", "").split(",") if v)
                               for g in m.groups()))
    if pairs and all(len(a) == len(b) == 2 and a[0] == b[0] and a[1] != b[1] for a, b in pairs):
        return ("(the layers match and only the FC's input size differs: check image_size, "
                "which sets the feature map the FC flattens; arcface_torch models use 112)")
    return "(the layers match: check model.width and model.embedding_dim)"


def _width_hint(shapes: Shapes) -> str:
    for path, shape in shapes.items():
        if path[-1] == "kernel" and len(shape) == 4:
            return f"stem {shape[3]} channels"
    return "?"


# ------------------------------------------------------------------ ONNX by graph order

#: ONNX node types that carry weights, in the order torch.onnx.export writes them.
ONNX_WEIGHTED = ("Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul")


@dataclasses.dataclass
class OnnxLayer:
    """One weighted ONNX node: its type, name, position and constant inputs."""

    op_type: str
    name: str
    index: int
    inputs: list[Optional[np.ndarray]]  # constant inputs (None where not constant)
    attrs: dict[str, Any]
    output: str
    first_input: str


def _expect(layers: list[OnnxLayer], i: int, op_type: str, op: layout.Op, model_name: str,
            source: str) -> OnnxLayer:
    if i >= len(layers):
        raise ImportMismatch(
            f"{source}: the graph ends after {len(layers)} weighted nodes, but "
            f"model.name={model_name!r} needs a {op_type} for {'/'.join(op.flax)} "
            f"(PyTorch {op.torch or '-'}): a smaller architecture?")
    layer = layers[i]
    if layer.op_type != op_type:
        raise ImportMismatch(
            f"{source}: weighted node #{i} ({layer.name!r}) is a {layer.op_type}, but "
            f"model.name={model_name!r} needs a {op_type} there for {'/'.join(op.flax)} "
            f"(PyTorch {op.torch or '-'}): the file is another architecture, or was not "
            "exported from arcface_torch/torchvision the way torch.onnx.export writes it")
    return layer


def _const(layer: OnnxLayer, k: int, what: str, source: str) -> np.ndarray:
    if k >= len(layer.inputs) or layer.inputs[k] is None:
        raise ImportMismatch(f"{source}: node {layer.name!r} ({layer.op_type}) has no constant "
                             f"{what} (input {k}); only weights stored in the file can be imported")
    return np.asarray(layer.inputs[k], np.float32)


def from_onnx_layers(layers: list[OnnxLayer], model_name: str, shapes: Shapes, source: str
                     ) -> tuple[dict[tuple[str, ...], np.ndarray], int]:
    """Maps weighted ONNX nodes (in graph order) onto the Flax leaves of ``model_name``.

    A Conv with a bias followed (in our layout) by a BatchNorm that the graph
    does not have is a Conv+BN folded by the exporter: the conv takes the
    folded kernel and the BatchNorm becomes the identity plus the folded bias
    (scale 1, mean 0, var 1 - eps), which computes the same function exactly in
    eval mode. A BatchNorm epsilon other than ours is absorbed into the variance.

    Returns:
      ``(leaves, folded)``: the leaves (as :func:`from_torch_state_dict`) and
      the number of folded Conv+BN pairs.
    """
    ops = [op for op in layout.plan(model_name) if op.flax]
    channels = _channels_before_fc(layout.plan(model_name), shapes)
    out: dict[tuple[str, ...], np.ndarray] = {}
    bad_shapes: list[str] = []
    _check_onnx_count(len(layers), ops, model_name, source)
    i, folded, skip_bn = 0, 0, False

    def put(leaf: tuple[str, ...], value: np.ndarray, what: str) -> None:
        want = shapes.get(leaf)
        if want is None or tuple(value.shape) != tuple(want):
            bad_shapes.append(f"{'/'.join(leaf[1:])} (from {what}): model needs {want}, "
                              f"file has {tuple(value.shape)}")
            return
        out[leaf] = value.astype(np.float32)

    for k, op in enumerate(ops):
        p, b = ("params",) + op.flax, ("batch_stats",) + op.flax
        if op.kind == "conv":
            layer = _expect(layers, i, "Conv", op, model_name, source)
            i += 1
            w = _const(layer, 1, "weight", source)
            put(p + ("kernel",), conv_to_flax(w), f"node {layer.name!r}")
            has_bias = len(layer.inputs) > 2 and layer.inputs[2] is not None
            nxt = ops[k + 1] if k + 1 < len(ops) else None
            skip_bn = False
            if has_bias:
                bias = _const(layer, 2, "bias", source)
                next_is_bn = (i < len(layers) and layers[i].op_type == "BatchNormalization"
                              and layers[i].first_input == layer.output)
                if nxt is None or nxt.kind != "bn" or (next_is_bn and np.any(bias != 0)):
                    raise ImportMismatch(
                        f"{source}: Conv {layer.name!r} has a bias that {'/'.join(op.flax)} "
                        "cannot hold (no BatchNorm follows it to fold it into)")
                if not next_is_bn:  # a folded Conv+BN: BN = identity + the folded bias
                    bq = ("params",) + nxt.flax
                    bs = ("batch_stats",) + nxt.flax
                    c = bias.shape[0]
                    if nxt.scale:
                        put(bq + ("scale",), np.ones(c, np.float32), "folded BN")
                    put(bq + ("bias",), bias, f"bias of node {layer.name!r}")
                    put(bs + ("mean",), np.zeros(c, np.float32), "folded BN")
                    put(bs + ("var",), np.full(c, 1.0 - BN_EPS, np.float32), "folded BN")
                    skip_bn, folded = True, folded + 1
        elif op.kind == "bn":
            if skip_bn:
                skip_bn = False
                continue
            layer = _expect(layers, i, "BatchNormalization", op, model_name, source)
            i += 1
            scale, bias, mean, var = (_const(layer, j, w, source) for j, w in
                                      enumerate(("scale", "bias", "mean", "var"), start=1))
            eps = float(layer.attrs.get("epsilon", 1e-5))
            if op.scale:
                put(p + ("scale",), scale, f"node {layer.name!r}")
            elif not np.allclose(scale, 1.0):
                raise ImportMismatch(f"{source}: BatchNormalization {layer.name!r} has a scale "
                                     f"other than 1, but {'/'.join(op.flax)} has a fixed scale of 1")
            put(p + ("bias",), bias, f"node {layer.name!r}")
            put(b + ("mean",), mean, f"node {layer.name!r}")
            put(b + ("var",), var + np.float32(eps - BN_EPS), f"node {layer.name!r}")
        elif op.kind == "prelu":
            layer = _expect(layers, i, "PRelu", op, model_name, source)
            i += 1
            slope = _const(layer, 1, "slope", source).reshape(-1)
            want = shapes[p + ("alpha",)]
            if slope.size == 1:
                slope = np.full(want, slope[0], np.float32)
            put(p + ("alpha",), slope, f"node {layer.name!r}")
        elif op.kind == "fc":
            if i < len(layers) and layers[i].op_type == "MatMul":
                layer = layers[i]
                weight = _const(layer, 1, "weight", source).T  # (in, D) -> (D, in)
                bias = None
            else:
                layer = _expect(layers, i, "Gemm", op, model_name, source)
                weight = _const(layer, 1, "weight", source)
                if not layer.attrs.get("transB", 0):
                    weight = weight.T
                weight = weight * np.float32(layer.attrs.get("alpha", 1.0))
                bias = (None if len(layer.inputs) < 3 or layer.inputs[2] is None else
                        _const(layer, 2, "bias", source) * np.float32(layer.attrs.get("beta", 1.0)))
            i += 1
            try:
                put(p + ("kernel",), fc_to_flax(weight, channels), f"node {layer.name!r}")
            except ValueError as e:
                bad_shapes.append(f"{'/'.join(op.flax)}: {e}")
            if p + ("bias",) in shapes:
                put(p + ("bias",), np.zeros(weight.shape[0], np.float32) if bias is None else bias,
                    f"node {layer.name!r}")
            elif bias is not None and np.any(bias != 0):
                raise ImportMismatch(f"{source}: FC node {layer.name!r} has a bias, but "
                                     f"model.name={model_name!r} has an FC without one")
    if bad_shapes:
        raise ImportMismatch(
            f"{source} does not fit model.name={model_name!r} ({len(bad_shapes)} shape "
            "mismatches; check model.width and model.embedding_dim):\n    "
            + "\n    ".join(bad_shapes[:12])
            + (f"\n    ... ({len(bad_shapes) - 12} more)" if len(bad_shapes) > 12 else ""))
    if i != len(layers):
        rest = layers[i:]
        raise ImportMismatch(
            f"{source}: {len(rest)} weighted nodes are left after model.name={model_name!r} "
            f"is complete (first: {rest[0].op_type} {rest[0].name!r}): another architecture")
    return out, folded


def _weighted_counts(ops: list[layout.Op]) -> tuple[int, int]:
    """Weighted ONNX nodes of a layout: (every Conv+BN folded, none folded)."""
    pairs = sum(1 for a, c in zip(ops, ops[1:]) if a.kind == "conv" and c.kind == "bn")
    return len(ops) - pairs, len(ops)


def _check_onnx_count(n: int, ops: list[layout.Op], model_name: str, source: str) -> None:
    """Fails early, suggesting the architecture that fits, when the node count is wrong."""
    from broadface_jax import models  # noqa: PLC0415

    counts = _weighted_counts(ops)
    if counts[0] <= n <= counts[1]:
        return
    fits = [name for name in models.REGISTRY if name != model_name and n in _weighted_counts(
        [op for op in layout.plan(name) if op.flax])]
    raise ImportMismatch(
        f"{source}: the graph has {n} weighted nodes (Conv, BatchNormalization, PRelu, Gemm), "
        f"model.name={model_name!r} has {counts[0]} (BatchNorm folded into Conv) or "
        f"{counts[1]} (not folded)"
        + (f"; the count fits model.name={fits[0]!r}" if fits else "")
        + ": another architecture")
