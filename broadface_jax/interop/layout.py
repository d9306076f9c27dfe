"""Each encoder as an ordered list of layer operations, with Flax and PyTorch names.

One list (:func:`plan`) serves the three converters, so they cannot disagree:

* PyTorch state dicts: each op names its module in arcface_torch's
  ``iresnet.py`` / ``mobilefacenet.py`` or torchvision's ``resnet.py``
  (``layer1.0.conv1``) and in our Flax tree (``('layer1_0', 'conv1')``);
* ONNX files: the ops are in PyTorch's forward order, which is the order in
  which ``torch.onnx.export`` writes the graph's nodes, so the weights of an
  ONNX file with numeric initializer names are matched by position;
* ONNX export: the ops, read as a data flow over named registers (``src`` ->
  ``dst``; ``add`` sums ``src`` and ``other``), are the exported graph.

Pure Python, no JAX: the ops are fixed by the architecture name and stage
sizes (channel counts come from the parameter shapes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Op:
    """One layer operation.

    Attributes:
      kind: ``conv`` | ``bn`` | ``prelu`` | ``relu`` | ``add`` | ``maxpool``
        | ``gap`` (global average pool) | ``flatten`` | ``fc``.
      flax: the module path in ``params`` / ``batch_stats`` (empty for ops
        without weights).
      torch: the PyTorch module name (``''``: the PyTorch model has no such
        layer, e.g. torchvision's ResNet has no embedding head).
      src, dst: registers read and written (residual branches use two).
      other: the second addend of ``add``.
      stride, pad: of ``conv`` / ``maxpool`` (symmetric padding).
      scale: ``bn`` only: whether it has a learned scale (IResNet's last BN
        has a fixed scale of 1).
    """

    kind: str
    flax: tuple[str, ...] = ()
    torch: str = ""
    src: str = "x"
    dst: str = "x"
    other: str = ""
    stride: int = 1
    pad: int = 0
    scale: bool = True


def _conv(flax: tuple[str, ...], torch: str, stride: int, pad: int,
          src: str = "x", dst: Optional[str] = None) -> Op:
    return Op("conv", flax, torch, src, dst or src, stride=stride, pad=pad)


def _bn(flax: tuple[str, ...], torch: str, reg: str = "x", scale: bool = True) -> Op:
    return Op("bn", flax, torch, reg, reg, scale=scale)


def _iresnet(stage_sizes: tuple[int, ...]) -> list[Op]:
    ops = [_conv(("conv1",), "conv1", 1, 1), _bn(("bn1",), "bn1"),
           Op("prelu", ("prelu",), "prelu")]
    for stage, blocks in enumerate(stage_sizes):
        for b in range(blocks):
            f, t = f"layer{stage + 1}_{b}", f"layer{stage + 1}.{b}"
            stride = 2 if b == 0 else 1
            ops += [
                Op("bn", (f, "bn1"), f"{t}.bn1", "x", "y"),
                _conv((f, "conv1"), f"{t}.conv1", 1, 1, "y"),
                _bn((f, "bn2"), f"{t}.bn2", "y"),
                Op("prelu", (f, "prelu"), f"{t}.prelu", "y", "y"),
                _conv((f, "conv2"), f"{t}.conv2", stride, 1, "y"),
                _bn((f, "bn3"), f"{t}.bn3", "y"),
            ]
            if b == 0:  # every stage starts with stride 2: a projection shortcut
                ops += [_conv((f, "downsample_conv"), f"{t}.downsample.0", stride, 0),
                        _bn((f, "downsample_bn"), f"{t}.downsample.1")]
            ops.append(Op("add", src="y", other="x", dst="x"))
    ops += [_bn(("head", "bn"), "bn2"), Op("flatten"), Op("fc", ("head", "fc"), "fc"),
            _bn(("head", "features"), "features", scale=False)]
    return ops


def _mobilefacenet(blocks: tuple[int, ...]) -> list[Op]:
    def conv_block(f: tuple[str, ...], t: str, stride: int, pad: int, src: str = "x",
                   dst: Optional[str] = None, linear: bool = False) -> list[Op]:
        dst = dst or src
        ops = [_conv(f + ("conv",), f"{t}.layers.0", stride, pad, src, dst),
               _bn(f + ("bn",), f"{t}.layers.1", dst)]
        if not linear:
            ops.append(Op("prelu", f + ("prelu",), f"{t}.layers.2", dst, dst))
        return ops

    def depthwise(f: str, t: str, stride: int, residual: bool) -> list[Op]:
        out = "y" if residual else "x"
        ops = (conv_block((f, "expand"), f"{t}.layers.0", 1, 0, "x", out)
               + conv_block((f, "depthwise"), f"{t}.layers.1", stride, 1, out)
               + conv_block((f, "project"), f"{t}.layers.2", 1, 0, out, linear=True))
        if residual:
            ops.append(Op("add", src="y", other="x", dst="x"))
        return ops

    def stage(name: str, t: str, n: int) -> list[Op]:
        return [op for i in range(n) for op in depthwise(f"{name}_{i}", f"{t}.layers.{i}", 1, True)]

    ops = conv_block(("conv1",), "layers.0", 2, 1)
    if blocks[0] == 1:
        ops += conv_block(("conv2_dw",), "layers.1", 1, 1)
    else:
        ops += stage("stage0", "layers.1", blocks[0])
    ops += depthwise("down1", "layers.2", 2, False) + stage("stage1", "layers.3", blocks[1])
    ops += depthwise("down2", "layers.4", 2, False) + stage("stage2", "layers.5", blocks[2])
    ops += depthwise("down3", "layers.6", 2, False) + stage("stage3", "layers.7", blocks[3])
    ops += conv_block(("conv_sep",), "conv_sep", 1, 0)
    ops += [_conv(("gdc_conv",), "features.layers.0.layers.0", 1, 0),
            _bn(("head", "bn"), "features.layers.0.layers.1"), Op("flatten"),
            Op("fc", ("head", "fc"), "features.layers.2"),
            _bn(("head", "features"), "features.layers.3")]
    return ops


def _resnet(stage_sizes: tuple[int, ...]) -> list[Op]:
    ops = [_conv(("conv1",), "conv1", 2, 3), _bn(("bn1",), "bn1"), Op("relu"),
           Op("maxpool", stride=2, pad=1)]
    for stage, blocks in enumerate(stage_sizes):
        for b in range(blocks):
            f, t = f"layer{stage + 1}_{b}", f"layer{stage + 1}.{b}"
            stride = 2 if stage > 0 and b == 0 else 1
            ops += [
                _conv((f, "conv1"), f"{t}.conv1", 1, 0, "x", "y"), _bn((f, "bn1"), f"{t}.bn1", "y"),
                Op("relu", src="y", dst="y"),
                _conv((f, "conv2"), f"{t}.conv2", stride, 1, "y"), _bn((f, "bn2"), f"{t}.bn2", "y"),
                Op("relu", src="y", dst="y"),
                _conv((f, "conv3"), f"{t}.conv3", 1, 0, "y"), _bn((f, "bn3"), f"{t}.bn3", "y"),
            ]
            if b == 0:  # the first block of every stage changes the channel count
                ops += [_conv((f, "downsample_conv"), f"{t}.downsample.0", stride, 0),
                        _bn((f, "downsample_bn"), f"{t}.downsample.1")]
            ops += [Op("add", src="y", other="x", dst="x"), Op("relu")]
    # torchvision's classifier ends here (avgpool, fc to 1000 classes); our
    # embedding head has no PyTorch counterpart (torch='').
    ops += [Op("gap"), _bn(("head", "bn"), ""), Op("flatten"), Op("fc", ("head", "fc"), ""),
            _bn(("head", "features"), "", scale=False)]
    return ops


def family(model_name: str) -> str:
    """``iresnet`` | ``mobilefacenet`` | ``resnet`` for a :data:`models.REGISTRY` name."""
    from broadface_jax import models  # noqa: PLC0415 (the registry only; no JAX import)

    if model_name not in models.REGISTRY:
        raise ValueError(f"model.name={model_name!r} is not a known encoder; choose one of "
                         f"{sorted(models.REGISTRY)}")
    return models.REGISTRY[model_name][0]


def plan(model_name: str) -> list[Op]:
    """The ops of encoder ``model_name`` (a key of ``models.REGISTRY``) in forward order."""
    from broadface_jax import models  # noqa: PLC0415

    fam = family(model_name)
    fixed: dict[str, Any] = models.REGISTRY[model_name][2]
    if fam == "iresnet":
        return _iresnet(tuple(fixed["stage_sizes"]))
    if fam == "mobilefacenet":
        return _mobilefacenet(tuple(fixed["blocks"]))
    if fam == "resnet":
        return _resnet(tuple(fixed["stage_sizes"]))
    raise ValueError(f"no weight layout is known for model.name={model_name!r}")
