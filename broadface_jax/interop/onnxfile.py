"""ONNX recognition models: their weighted nodes in graph order (reading), and our export (writing).

Reading (:func:`read_onnx_layers`) parses the protobuf with the ``onnx``
package (no code in an ONNX file can run: it is data) and returns every
Conv / BatchNormalization / PRelu / Gemm / MatMul node in graph order with its
constant inputs resolved: initializers, ``Constant`` nodes, and the
``Identity`` / ``Unsqueeze`` / ``Squeeze`` / ``Reshape`` chains exporters put
in front of a PReLU slope. Initializer *names* are not used (insightface's
packs name them by number), :mod:`mapping` matches the nodes by position.

Writing (:func:`export_onnx`) builds the graph op by op from :mod:`layout` with
``onnx.helper``: NCHW float input ``data`` of shape ``(batch, 3, H, W)`` (RGB,
normalised to ``(x - 127.5) / 127.5`` by the caller, as insightface's
``ArcFaceONNX`` does), output ``embedding`` ``(batch, D)``, opset 11, the layout
``torch.onnx.export`` writes for arcface_torch (so insightface loads it, and
:func:`read_onnx_layers` reads it back). BatchNorm after a Conv can be folded
into it (``fold_bn``), as arcface_torch's exported packs are.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from broadface_jax.interop import layout
from broadface_jax.interop.mapping import BN_EPS, ONNX_WEIGHTED, OnnxLayer

#: Opset of the exported graph (arcface_torch's torch2onnx.py default; every op used exists there).
OPSET = 11
#: IR version that goes with opset 11 (onnxruntime >= 1.3 and insightface's loaders read it).
IR_VERSION = 6


class OnnxFileError(ValueError):
    """An ONNX file cannot be read (not ONNX, truncated, no weights)."""


def _onnx():
    try:
        import onnx  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("reading or writing ONNX files needs the onnx package: "
                          "pip install 'broadface_jax[interop]'") from e
    return onnx


def read_onnx_layers(path: str | os.PathLike) -> list[OnnxLayer]:
    """The weighted nodes of an ONNX model in graph order, constants resolved.

    Raises:
      FileNotFoundError: no such file.
      OnnxFileError: the file is not a readable ONNX model, or has no weighted nodes.
    """
    onnx = _onnx()
    from onnx import numpy_helper  # noqa: PLC0415

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(path, load_external_data=True)
    except Exception as e:  # DecodeError, OSError, ValueError for truncated / foreign files
        raise OnnxFileError(f"{path}: not a readable ONNX model (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from e
    graph = model.graph
    consts: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        consts[init.name] = numpy_helper.to_array(init)

    def attrs(node: Any) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    layers: list[OnnxLayer] = []
    for index, node in enumerate(graph.node):
        a = attrs(node)
        ins = [consts.get(n) if n else None for n in node.input]
        # Constant folding of the small chains exporters leave in front of weights.
        if node.op_type == "Constant" and "value" in a:
            consts[node.output[0]] = numpy_helper.to_array(a["value"])
        elif node.op_type == "Identity" and ins and ins[0] is not None:
            consts[node.output[0]] = ins[0]
        elif node.op_type == "Unsqueeze" and ins and ins[0] is not None:
            axes = a.get("axes") if "axes" in a else (
                ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
            if axes is not None:
                value = ins[0]
                for axis in sorted(int(x) % (value.ndim + len(axes)) for x in axes):
                    value = np.expand_dims(value, axis)
                consts[node.output[0]] = value
        elif node.op_type == "Squeeze" and ins and ins[0] is not None:
            axes = a.get("axes") if "axes" in a else (
                ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
            consts[node.output[0]] = np.squeeze(ins[0], tuple(axes) if axes else None)
        elif node.op_type == "Reshape" and len(ins) > 1 and ins[0] is not None and ins[1] is not None:
            consts[node.output[0]] = ins[0].reshape([int(v) for v in ins[1]])
        if node.op_type in ONNX_WEIGHTED:
            if node.op_type == "MatMul" and (len(ins) < 2 or ins[1] is None):
                continue  # a MatMul of two activations carries no weights
            layers.append(OnnxLayer(node.op_type, node.name or f"#{index}", index, ins, a,
                                    node.output[0], node.input[0]))
    if not layers:
        raise OnnxFileError(f"{path}: the graph has no Conv/BatchNormalization/Gemm nodes with "
                            "stored weights (not a recognition model?)")
    return layers


# ------------------------------------------------------------------ export


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node = tree
    for key in path:
        node = node[key]
    return node


#: Layout ops without weights that keep the channel count: kind -> (ONNX op, output
#: tensor prefix, node name prefix).
_WEIGHTLESS = {
    "relu": ("Relu", "relu", "Relu"),
    "add": ("Add", "add", "Add"),
    "maxpool": ("MaxPool", "pool", "MaxPool"),
    "gap": ("GlobalAveragePool", "gap", "Pool"),
    "flatten": ("Flatten", "flat", "Flatten"),
}


def _weightless_attributes(op: Any) -> dict[str, Any]:
    """The ONNX attributes of a :data:`_WEIGHTLESS` op."""
    if op.kind == "maxpool":
        return dict(kernel_shape=[3, 3], strides=[op.stride, op.stride], pads=[op.pad] * 4)
    if op.kind == "flatten":
        return dict(axis=1)
    return {}


def export_onnx(model_name: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                image_size: int, path: str | os.PathLike, *, fold_bn: bool = True,
                producer: str = "broadface_jax") -> Any:
    """Writes encoder ``model_name`` with these weights as an ONNX model at ``path``.

    Args:
      model_name: a ``models.REGISTRY`` name (the layout of the graph).
      params, batch_stats: the encoder's Flax trees (eval mode uses the
        running statistics).
      image_size: H = W of the input (fixed, as insightface's loaders read it
        from the graph); the batch is dynamic (named ``batch``, as in insightface packs).
      path: where to write the ``.onnx`` file.
      fold_bn: fold each BatchNorm that follows a Conv into the Conv's kernel
        and bias (arcface_torch's packs are folded; the function is the same).

    Returns:
      The ``onnx.ModelProto`` written.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    params = _to_numpy(params)
    batch_stats = _to_numpy(batch_stats)
    ops = layout.plan(model_name)
    nodes, inits = [], []
    counter = [0]

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def fresh(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    regs = {"x": "data"}
    channels = {"x": 3}
    skip_bn = False
    for k, op in enumerate(ops):
        name = "/".join(op.flax) or f"{op.kind}{k}"
        src = regs[op.src]
        if op.kind == "conv":
            kernel = np.asarray(_get(params, op.flax + ("kernel",)), np.float64)  # kh, kw, i/g, o
            kh, kw, ig, o = kernel.shape
            groups = channels[op.src] // ig
            w = kernel.transpose(3, 2, 0, 1)  # o, i/g, kh, kw
            inputs = [src]
            nxt = ops[k + 1] if k + 1 < len(ops) else None
            if fold_bn and nxt is not None and nxt.kind == "bn" and nxt.src == op.dst:
                g, beta, mean, var = _bn_values(params, batch_stats, nxt)
                factor = g / np.sqrt(var + BN_EPS)
                w = w * factor[:, None, None, None]
                inputs += [const(f"{name}/kernel", w), const(f"{name}/bias", beta - mean * factor)]
                skip_bn = True
            else:
                inputs.append(const(f"{name}/kernel", w))
            out = fresh("conv")
            nodes.append(helper.make_node(
                "Conv", inputs, [out], name=name, kernel_shape=[kh, kw],
                strides=[op.stride, op.stride], pads=[op.pad] * 4, group=groups,
                dilations=[1, 1]))
            channels[op.dst] = o
        elif op.kind == "bn":
            if skip_bn:
                skip_bn = False
                continue
            g, beta, mean, var = _bn_values(params, batch_stats, op)
            out = fresh("bn")
            nodes.append(helper.make_node(
                "BatchNormalization",
                [src, const(f"{name}/scale", g), const(f"{name}/bias", beta),
                 const(f"{name}/mean", mean), const(f"{name}/var", var)],
                [out], name=name, epsilon=BN_EPS))
            channels[op.dst] = channels[op.src]
        elif op.kind == "prelu":
            alpha = np.asarray(_get(params, op.flax + ("alpha",)))
            out = fresh("prelu")
            nodes.append(helper.make_node(
                "PRelu", [src, const(f"{name}/alpha", alpha.reshape(-1, 1, 1))], [out], name=name))
            channels[op.dst] = channels[op.src]
        elif op.kind in _WEIGHTLESS:
            onnx_op, out_prefix, node_prefix = _WEIGHTLESS[op.kind]
            out = fresh(out_prefix)
            inputs = [src, regs[op.other]] if op.kind == "add" else [src]
            nodes.append(helper.make_node(onnx_op, inputs, [out], name=fresh(node_prefix),
                                          **_weightless_attributes(op)))
            channels[op.dst] = channels[op.src]
        elif op.kind == "fc":
            kernel = np.asarray(_get(params, op.flax + ("kernel",)), np.float64)  # H*W*C, D
            n, d = kernel.shape
            c = channels[op.src]
            side = int(round((n // c) ** 0.5))
            # Our flatten is (H, W, C); the NCHW graph flattens (C, H, W).
            w = kernel.reshape(side, side, c, d).transpose(3, 2, 0, 1).reshape(d, n)
            inputs = [src, const(f"{name}/kernel", w)]
            bias_path = op.flax + ("bias",)
            try:
                inputs.append(const(f"{name}/bias", np.asarray(_get(params, bias_path))))
            except KeyError:
                pass
            out = fresh("fc")
            nodes.append(helper.make_node("Gemm", inputs, [out], name=name, transB=1))
            channels[op.dst] = d
        else:
            raise ValueError(f"layout op {op.kind!r} has no ONNX export")
        regs[op.dst] = out
    nodes[-1].output[0] = "embedding"
    d = int(channels["x"])
    graph = helper.make_graph(
        nodes, f"broadface_jax_{model_name}",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", d])],
        initializer=inits)
    model = helper.make_model(graph, producer_name=producer,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return model


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _bn_values(params: Any, batch_stats: Any, op: layout.Op
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale, bias, mean, var) of a BatchNorm op in float64 (scale 1 where fixed)."""
    beta = np.asarray(_get(params, op.flax + ("bias",)), np.float64)
    g = (np.asarray(_get(params, op.flax + ("scale",)), np.float64) if op.scale
         else np.ones_like(beta))
    mean = np.asarray(_get(batch_stats, op.flax + ("mean",)), np.float64)
    var = np.asarray(_get(batch_stats, op.flax + ("var",)), np.float64)
    return g, beta, mean, var
