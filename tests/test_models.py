"""Tests of the encoders (broadface_jax.models).

* Parameter counts of the full-size models (``jax.eval_shape``: nothing is
  allocated) against an independent layer-by-layer count of the PyTorch
  reference (insightface arcface_torch / torchvision) and published figures.
* Forward passes of tiny versions (width multiplier) against an independent
  float64 NumPy implementation of the same layers, on fresh random inputs,
  parameters and BatchNorm statistics.
* One train-mode forward + backward per backbone family: finite gradients
  that reach the stem, updated BatchNorm statistics.
* bfloat16 compute with float32 parameters and embeddings; config errors.

Random draws use a fresh seed per test session, printed in failure messages.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from broadface_jax import models
from broadface_jax.models import head as head_lib
from broadface_jax.models import iresnet, layers

SEED = int(np.random.SeedSequence().entropy % 2**31)
BN_EPS = 1e-5


def _rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


def model_config(name: str, embedding_dim: int = 16, width: float = 0.125,
                 dropout: float = 0.0, dtype: str = "float32") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name=name, embedding_dim=embedding_dim, width=width, dropout=dropout, dtype=dtype,
        batch_norm="global"))


def abstract_variables(module: Any, shape: tuple[int, ...]) -> Any:
    """Shapes of ``module.init`` on an input of ``shape`` (no allocation, no compile)."""
    return jax.eval_shape(
        lambda key: module.init(key, jnp.zeros(shape, jnp.float32), train=False),
        jax.random.key(0))


def random_variables(abstract: Any, rng: np.random.Generator) -> Any:
    """Random float32 values for every leaf, drawn by the leaf's role.

    Conv / FC kernels ~ N(0, 1/fan_in); BN scale ~ U(0.5, 1.5), bias and
    running mean ~ N(0, 0.2^2), running var ~ U(0.5, 1.5); PReLU slopes
    ~ U(0.05, 0.5) (so that a wrong slope, or a scalar one, shows).
    """
    def draw(path: Any, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.2, size=shape)
        elif name == "alpha":
            value = rng.uniform(0.05, 0.5, size=shape)
        else:
            raise AssertionError(f"unexpected leaf {path}")
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def jit_eval(module: Any) -> Any:
    """Jitted eval-mode forward (one compile beats hundreds of eager op compiles)."""
    return jax.jit(lambda variables, x: module.apply(variables, x, train=False))


def jit_train(module: Any) -> Any:
    """Jitted train-mode forward returning (embedding, updated batch_stats)."""
    def forward(variables, x, key):
        out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"],
                                    rngs={"dropout": key})
        return out, updates["batch_stats"]
    return jax.jit(forward)


def to_np64(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def assert_close(actual: Any, expected: np.ndarray, rtol: float = 1e-4, what: str = "") -> None:
    """Max abs error relative to the reference's max magnitude."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12)
    assert err < rtol, f"{what}: relative error {err:.3g} >= {rtol} (seed {SEED})"


# --------------------------------------------------------------------------
# float64 NumPy reference layers (PyTorch semantics, NHWC layout)
# --------------------------------------------------------------------------


def np_conv(x: np.ndarray, kernel: np.ndarray, stride: int, pad: int, groups: int = 1) -> np.ndarray:
    """Cross-correlation as ``torch.nn.Conv2d(padding=pad, stride, groups, bias=False)``.

    ``kernel`` is (kh, kw, cin / groups, cout); output channel o belongs to
    group o // (cout / groups).
    """
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    b, h, w, cin = x.shape
    kh, kw, cin_g, cout = kernel.shape
    assert cin == cin_g * groups and cout % groups == 0, (x.shape, kernel.shape, groups)
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    k = kernel.reshape(kh, kw, cin_g, groups, cout // groups)
    out = np.zeros((b, ho, wo, groups, cout // groups))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            patch = patch.reshape(b, ho, wo, groups, cin_g)
            out += np.einsum("bhwgc,cgo->bhwgo", patch, k[i, j])
    return out.reshape(b, ho, wo, cout)


def np_bn_eval(x: np.ndarray, p: dict, s: dict) -> np.ndarray:
    scale = p.get("scale", 1.0)
    return (x - s["mean"]) / np.sqrt(s["var"] + BN_EPS) * scale + p["bias"]


def np_bn_train(x: np.ndarray, p: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean) / np.sqrt(var + BN_EPS) * p.get("scale", 1.0) + p["bias"]
    return y, mean, var


def np_prelu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, alpha * x)


def np_head(x: np.ndarray, p: dict, s: dict) -> np.ndarray:
    """Eval mode: BN -> flatten (H, W, C order) -> FC -> BN."""
    y = np_bn_eval(x, p["bn"], s["bn"]).reshape(x.shape[0], -1)
    y = y @ p["fc"]["kernel"] + p["fc"].get("bias", 0.0)
    return np_bn_eval(y, p["features"], s["features"])


def np_ibasic_block(x: np.ndarray, p: dict, s: dict, features: int, stride: int) -> np.ndarray:
    y = np_bn_eval(x, p["bn1"], s["bn1"])
    y = np_conv(y, p["conv1"]["kernel"], 1, 1)
    y = np_prelu(np_bn_eval(y, p["bn2"], s["bn2"]), p["prelu"]["alpha"])
    y = np_bn_eval(np_conv(y, p["conv2"]["kernel"], stride, 1), p["bn3"], s["bn3"])
    if stride != 1 or x.shape[-1] != features:
        x = np_bn_eval(np_conv(x, p["downsample_conv"]["kernel"], stride, 0),
                       p["downsample_bn"], s["downsample_bn"])
    return y + x


def np_iresnet(x: np.ndarray, p: dict, s: dict, stage_sizes: tuple, widths: tuple) -> np.ndarray:
    y = np_conv(x, p["conv1"]["kernel"], 1, 1)
    y = np_prelu(np_bn_eval(y, p["bn1"], s["bn1"]), p["prelu"]["alpha"])
    for stage, (n, c) in enumerate(zip(stage_sizes, widths)):
        for b in range(n):
            name = f"layer{stage + 1}_{b}"
            y = np_ibasic_block(y, p[name], s[name], c, 2 if b == 0 else 1)
    return np_head(y, p["head"], s["head"])


def np_conv_block(x, p, s, stride=1, pad=0, groups=1, linear=False):
    y = np_bn_eval(np_conv(x, p["conv"]["kernel"], stride, pad, groups), p["bn"], s["bn"])
    return y if linear else np_prelu(y, p["prelu"]["alpha"])


def np_depthwise(x, p, s, stride, residual):
    e = p["expand"]["conv"]["kernel"].shape[-1]
    y = np_conv_block(x, p["expand"], s["expand"])
    y = np_conv_block(y, p["depthwise"], s["depthwise"], stride, 1, groups=e)
    y = np_conv_block(y, p["project"], s["project"], linear=True)
    return x + y if residual else y


def np_mobilefacenet(x, p, s, blocks, scale):
    y = np_conv_block(x, p["conv1"], s["conv1"], 2, 1)
    assert blocks[0] == 1
    c1 = y.shape[-1]
    y = np_conv_block(y, p["conv2_dw"], s["conv2_dw"], 1, 1, groups=c1 // scale)
    for name, stage, n in (("down1", "stage1", blocks[1]), ("down2", "stage2", blocks[2]),
                           ("down3", "stage3", blocks[3])):
        y = np_depthwise(y, p[name], s[name], 2, False)
        for i in range(n):
            y = np_depthwise(y, p[f"{stage}_{i}"], s[f"{stage}_{i}"], 1, True)
    y = np_conv_block(y, p["conv_sep"], s["conv_sep"])
    y = np_conv(y, p["gdc_conv"]["kernel"], 1, 0, groups=y.shape[-1])
    assert y.shape[1:3] == (1, 1)
    return np_head(y, p["head"], s["head"])


def np_maxpool3x3s2(x: np.ndarray) -> np.ndarray:
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.max([x[:, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def np_resnet(x, p, s, stage_sizes):
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    y = relu(np_bn_eval(np_conv(x, p["conv1"]["kernel"], 2, 3), p["bn1"], s["bn1"]))
    y = np_maxpool3x3s2(y)
    for stage, n in enumerate(stage_sizes):
        for b in range(n):
            q, t = p[f"layer{stage + 1}_{b}"], s[f"layer{stage + 1}_{b}"]
            stride = 2 if stage > 0 and b == 0 else 1
            z = relu(np_bn_eval(np_conv(y, q["conv1"]["kernel"], 1, 0), q["bn1"], t["bn1"]))
            z = relu(np_bn_eval(np_conv(z, q["conv2"]["kernel"], stride, 1), q["bn2"], t["bn2"]))
            z = np_bn_eval(np_conv(z, q["conv3"]["kernel"], 1, 0), q["bn3"], t["bn3"])
            if stride != 1 or y.shape[-1] != z.shape[-1]:
                y = np_bn_eval(np_conv(y, q["downsample_conv"]["kernel"], stride, 0),
                               q["downsample_bn"], t["downsample_bn"])
            y = relu(z + y)
    y = y.mean(axis=(1, 2))
    return np_head(y, p["head"], s["head"])


# --------------------------------------------------------------------------
# Independent layer-by-layer parameter counts of the PyTorch references
# (sum(p.numel() for p in model.parameters()): weights, BN affine, PReLU;
# BN running statistics are buffers and not counted).
# --------------------------------------------------------------------------


def torch_iresnet_count(stage_sizes: tuple, d: int, spatial: int = 7) -> int:
    """arcface_torch ``IResNet``; counts ``features.weight`` (frozen at 1) as torch does."""
    n = 3 * 3 * 3 * 64 + 2 * 64 + 64  # conv1, bn1, prelu
    cin = 64
    for stage, blocks in enumerate(stage_sizes):
        cout = 64 * 2**stage
        for b in range(blocks):
            n += 2 * cin + 9 * cin * cout + 2 * cout + cout + 9 * cout * cout + 2 * cout
            if b == 0:  # stride 2: downsample conv1x1 + BN
                n += cin * cout + 2 * cout
            cin = cout
    return n + 2 * 512 + 512 * spatial * spatial * d + d + 2 * d  # bn2, fc, features


def torch_mobilefacenet_count(blocks: tuple, scale: int, d: int) -> int:
    """arcface_torch ``MobileFaceNet`` (``get_mbf``)."""
    def conv_block(cin, cout, k, groups=1, linear=False):
        return cin // groups * cout * k * k + 2 * cout + (0 if linear else cout)

    def depthwise(cin, cout, e):
        return conv_block(cin, e, 1) + conv_block(e, e, 3, e) + conv_block(e, cout, 1, linear=True)

    c1, c2 = 64 * scale, 128 * scale
    n = conv_block(3, c1, 3)
    n += conv_block(c1, c1, 3, 64) if blocks[0] == 1 else blocks[0] * depthwise(c1, c1, 128)
    n += depthwise(c1, c1, 128) + blocks[1] * depthwise(c1, c1, 128)
    n += depthwise(c1, c2, 256) + blocks[2] * depthwise(c2, c2, 256)
    n += depthwise(c2, c2, 512) + blocks[3] * depthwise(c2, c2, 256)
    n += conv_block(c2, 512, 1)
    n += conv_block(512, 512, 7, 512, linear=True)  # GDC: 7x7 depthwise + BN
    return n + 512 * d + 2 * d  # Linear(bias=False) + BatchNorm1d


def torch_resnet_backbone_count(stage_sizes: tuple) -> int:
    """torchvision ``resnet50`` without its ``fc``."""
    n = 7 * 7 * 3 * 64 + 2 * 64
    cin = 64
    for stage, blocks in enumerate(stage_sizes):
        w = 64 * 2**stage
        for b in range(blocks):
            n += cin * w + 2 * w + 9 * w * w + 2 * w + w * 4 * w + 2 * 4 * w
            if b == 0:
                n += cin * 4 * w + 2 * 4 * w
            cin = 4 * w
    return n


def test_torchvision_resnet50_count_formula() -> None:
    # torchvision docs, ResNet50_Weights.IMAGENET1K_V1: num_params 25,557,032,
    # of which the 1000-way fc is 2048 * 1000 + 1000.
    assert torch_resnet_backbone_count((3, 4, 6, 3)) + 2048 * 1000 + 1000 == 25_557_032


# name, embedding dim, PyTorch count of the reference, published figure (or None), source
FULL_SIZE = [
    ("iresnet18", 512, torch_iresnet_count((2, 2, 2, 2), 512), None, ""),
    ("iresnet34", 512, torch_iresnet_count((3, 4, 6, 3), 512), None, ""),
    ("iresnet50", 512, torch_iresnet_count((3, 4, 14, 3), 512), 43.6e6,
     "43.6M, the figure quoted for insightface's R50 (512-d, 112x112)"),
    ("iresnet100", 512, torch_iresnet_count((3, 13, 30, 3), 512), 65.2e6,
     "65.2M, the figure quoted for insightface's R100 (512-d, 112x112)"),
    ("iresnet200", 512, torch_iresnet_count((6, 26, 60, 6), 512), None, ""),
    ("mobilefacenet", 128, torch_mobilefacenet_count((1, 4, 6, 2), 1, 128), 0.99e6,
     "0.99M, MobileFaceNets paper (Chen et al. 2018), Table 3"),
    ("mbf", 512, torch_mobilefacenet_count((1, 4, 6, 2), 2, 512), None, ""),
]


@pytest.mark.parametrize("name,dim,torch_count,published,source", FULL_SIZE,
                         ids=[f[0] for f in FULL_SIZE])
def test_full_size_param_count_and_shape(name, dim, torch_count, published, source) -> None:
    """Counts the ``params`` collection (BN running stats are in ``batch_stats``).

    The IResNet head's last BN has no scale parameter here; PyTorch keeps it
    as a frozen parameter of value 1 and counts it, hence ``torch - dim``.
    """
    module = models.build_encoder(model_config(name, dim, width=1.0))
    variables = abstract_variables(module, (1, 112, 112, 3))
    n = models.count_params(variables["params"])
    frozen = dim if name.startswith("iresnet") else 0
    assert n == torch_count - frozen
    if published is not None:
        tol = 0.015 if name == "mobilefacenet" else 0.01
        # MobileFaceNet: the paper gives two digits and no counting rule; the
        # PyTorch count of its Table 1 network is 1.0031M (+1.3%).
        assert abs(n - published) / published < tol, (n, source)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    out = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((2, 112, 112, 3)), train=False),
                         variables)
    assert out.shape == (2, dim) and out.dtype == jnp.float32


def test_resnet50_full_size_count_and_shape() -> None:
    module = models.build_encoder(model_config("resnet50", 512, width=1.0))
    variables = abstract_variables(module, (1, 224, 224, 3))
    params = variables["params"]
    backbone = {k: v for k, v in params.items() if k != "head"}
    assert models.count_params(backbone) == 23_508_032  # torchvision resnet50 minus fc
    # head: BN(2048) affine, FC 2048x512 + bias, BN(512) bias (scale fixed at 1)
    assert models.count_params(params["head"]) == 2 * 2048 + 2048 * 512 + 512 + 512
    for size in (112, 224):
        out = jax.eval_shape(
            lambda v: module.apply(v, jnp.zeros((2, size, size, 3)), train=False), variables)
        assert out.shape == (2, 512) and out.dtype == jnp.float32


def test_scale_channels() -> None:
    assert [layers.scale_channels(c, 0.125) for c in (64, 128, 256, 512)] == [8, 16, 32, 64]
    assert [layers.scale_channels(c, 0.0625) for c in (64, 128, 256, 512)] == [4, 8, 16, 32]
    assert layers.scale_channels(64, 0.001) == 1
    assert layers.scale_channels(64, 0.3, multiple_of=2) == 20  # 19.2 -> 20
    with pytest.raises(ValueError, match="width"):
        layers.scale_channels(64, 0.0)


# --------------------------------------------------------------------------
# Numerics against the float64 reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cin,features,stride", [(6, 6, 1), (6, 10, 2), (5, 5, 2)])
def test_ibasic_block_matches_numpy(cin: int, features: int, stride: int) -> None:
    rng = _rng(1 + cin + features + stride)
    block = iresnet.IBasicBlock(features, strides=stride)
    x = rng.normal(size=(3, 10, 9, cin))  # odd width: checks PyTorch-style padding
    variables = random_variables(abstract_variables(block, x.shape), rng)
    has_shortcut = "downsample_conv" in variables["params"]
    assert has_shortcut == (stride != 1 or cin != features)
    out = jit_eval(block)(variables, jnp.asarray(x, jnp.float32))
    v = to_np64(variables)
    expected = np_ibasic_block(x, v["params"], v["batch_stats"], features, stride)
    assert_close(out, expected, what="IBasicBlock")


@pytest.mark.parametrize("fc_bias,learn_scale", [(True, False), (False, True)])
def test_head_matches_numpy_eval_and_train(fc_bias: bool, learn_scale: bool) -> None:
    rng = _rng(20 + fc_bias)
    head = head_lib.EmbeddingHead(7, fc_bias=fc_bias, learn_feature_scale=learn_scale)
    x = rng.normal(1.0, 2.0, size=(6, 3, 2, 5))
    variables = random_variables(abstract_variables(head, x.shape), rng)
    params = variables["params"]
    assert ("bias" in params["fc"]) == fc_bias
    assert ("scale" in params["features"]) == learn_scale
    v = to_np64(variables)
    p, s = v["params"], v["batch_stats"]
    xj = jnp.asarray(x, jnp.float32)

    assert_close(head.apply(variables, xj, train=False), np_head(x, p, s), what="head eval")

    out, updates = head.apply(variables, xj, train=True, mutable=["batch_stats"])
    y, m1, v1 = np_bn_train(x, p["bn"])
    y = y.reshape(6, -1) @ p["fc"]["kernel"] + p["fc"].get("bias", 0.0)
    expected, m2, v2 = np_bn_train(y, p["features"])
    assert_close(out, expected, what="head train")
    new = to_np64(updates["batch_stats"])
    # Running statistics with PyTorch's momentum 0.1 (Flax momentum 0.9).
    for name, mean, var in (("bn", m1, v1), ("features", m2, v2)):
        assert_close(new[name]["mean"], 0.9 * s[name]["mean"] + 0.1 * mean, 1e-5, name)
        assert_close(new[name]["var"], 0.9 * s[name]["var"] + 0.1 * var, 1e-5, name)


def test_tiny_iresnet_matches_numpy() -> None:
    """iresnet18 at width 1/16 (4/8/16/32 channels), non-square input, eval mode."""
    rng = _rng(30)
    module = models.build_encoder(model_config("iresnet18", 12, width=0.0625))
    x = rng.uniform(-1, 1, size=(2, 36, 28, 3))
    variables = random_variables(abstract_variables(module, x.shape), rng)
    out = jit_eval(module)(variables, jnp.asarray(x, jnp.float32))
    v = to_np64(variables)
    expected = np_iresnet(x, v["params"], v["batch_stats"], (2, 2, 2, 2), (4, 8, 16, 32))
    assert_close(out, expected, what="iresnet18 w=1/16")


@pytest.mark.parametrize("name,scale", [("mobilefacenet", 1), ("mbf", 2)])
def test_tiny_mobilefacenet_matches_numpy(name: str, scale: int) -> None:
    """Width 1/8; ``mbf`` (scale 2) has a grouped (2 channels per group) conv."""
    rng = _rng(40 + scale)
    module = models.build_encoder(model_config(name, 8, width=0.125))
    x = rng.uniform(-1, 1, size=(2, 40, 32, 3))
    variables = random_variables(abstract_variables(module, x.shape), rng)
    out = jit_eval(module)(variables, jnp.asarray(x, jnp.float32))
    v = to_np64(variables)
    expected = np_mobilefacenet(x, v["params"], v["batch_stats"], (1, 4, 6, 2), scale)
    assert_close(out, expected, what=name)


def test_tiny_resnet50_matches_numpy() -> None:
    rng = _rng(50)
    module = models.build_encoder(model_config("resnet50", 8, width=0.0625))
    x = rng.uniform(-1, 1, size=(2, 33, 40, 3))
    variables = random_variables(abstract_variables(module, x.shape), rng)
    out = jit_eval(module)(variables, jnp.asarray(x, jnp.float32))
    v = to_np64(variables)
    expected = np_resnet(x, v["params"], v["batch_stats"], (3, 4, 6, 3))
    assert_close(out, expected, what="resnet50 w=1/16")


# --------------------------------------------------------------------------
# Training mode, dtype, dropout, initialisation, config errors
# --------------------------------------------------------------------------

# iresnet18 shares every module with iresnet50 (and is trained in
# test_iresnet_stem_running_mean_update), so one IResNet compile is enough.
STEM_CONV = {"iresnet50": ("conv1",), "mobilefacenet": ("conv1", "conv"),
             "resnet50": ("conv1",)}


@pytest.mark.parametrize("name", list(STEM_CONV))
def test_train_forward_backward(name: str) -> None:
    rng = _rng(60 + len(name))
    module = models.build_encoder(model_config(name, 16, width=0.125, dropout=0.2))
    x = jnp.asarray(rng.uniform(-1, 1, size=(4, 32, 32, 3)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    variables = random_variables(abstract_variables(module, x.shape), rng)

    def loss_fn(params, batch_stats):
        emb, updates = module.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": jax.random.key(SEED)})
        return jnp.sum(emb * target), (emb, updates["batch_stats"])

    (loss, (emb, new_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], variables["batch_stats"])
    assert emb.shape == (4, 16) and emb.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    stem = grads
    for key in STEM_CONV[name]:
        stem = stem[key]
    assert float(jnp.max(jnp.abs(stem["kernel"]))) > 0.0, "no gradient reaches the stem"
    old, new = jax.tree_util.tree_leaves(variables["batch_stats"]), jax.tree_util.tree_leaves(new_stats)
    assert len(old) == len(new) > 0
    for a, b in zip(old, new):
        assert np.all(np.isfinite(b)) and not np.allclose(a, b)


def test_iresnet_stem_running_mean_update() -> None:
    """The stem BN's running mean moves by 0.1 x (batch mean of the stem conv)."""
    rng = _rng(70)
    module = models.build_encoder(model_config("iresnet18", 8, width=0.0625))
    x = rng.uniform(-1, 1, size=(3, 16, 16, 3))
    variables = random_variables(abstract_variables(module, x.shape), rng)
    _, stats = jit_train(module)(variables, jnp.asarray(x, jnp.float32), jax.random.key(0))
    v = to_np64(variables)
    conv = np_conv(x, v["params"]["conv1"]["kernel"], 1, 1)
    old = v["batch_stats"]["bn1"]
    new = to_np64(stats["bn1"])
    assert_close(new["mean"], 0.9 * old["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)), 1e-5)
    assert_close(new["var"], 0.9 * old["var"] + 0.1 * conv.var(axis=(0, 1, 2)), 1e-5)


def test_bfloat16_compute_float32_params_and_output() -> None:
    rng = _rng(80)
    x = jnp.asarray(rng.uniform(-1, 1, size=(2, 32, 32, 3)), jnp.float32)
    m32 = models.build_encoder(model_config("iresnet18", 16, width=0.125))
    m16 = models.build_encoder(model_config("iresnet18", 16, width=0.125, dtype="bfloat16"))
    abstract = abstract_variables(m16, x.shape)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract))
    variables = random_variables(abstract, rng)
    out32 = jit_eval(m32)(variables, x)
    out16, stats = jax.eval_shape(jit_train(m16), variables, x, jax.random.key(0))
    assert out16.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(stats))
    eval16 = jit_eval(m16)(variables, x)
    err = float(jnp.max(jnp.abs(eval16 - out32)) / jnp.max(jnp.abs(out32)))
    assert 0.0 < err < 0.05, f"bf16 vs f32 relative error {err} (seed {SEED})"
    jaxpr = str(jax.make_jaxpr(lambda v: m16.apply(v, x, train=False))(variables))
    assert "conv_general_dilated" in jaxpr and "bf16[2,32,32,8]" in jaxpr


def test_dropout_only_in_train_mode() -> None:
    """Head dropout: identity in eval mode, keyed by the 'dropout' RNG in train mode."""
    rng = _rng(90)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 8)), jnp.float32)
    with_dropout = head_lib.EmbeddingHead(6, dropout=0.5)
    without = head_lib.EmbeddingHead(6)
    variables = random_variables(abstract_variables(without, x.shape), rng)
    np.testing.assert_array_equal(jit_eval(with_dropout)(variables, x),
                                  jit_eval(without)(variables, x))
    forward = jit_train(with_dropout)

    def train(key):
        return forward(variables, x, key)[0]

    a, b = train(jax.random.key(1)), train(jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, train(jax.random.key(1)))
    assert not np.allclose(a, jit_train(without)(variables, x, jax.random.key(1))[0])


def test_init_follows_insightface() -> None:
    """Conv ~ N(0, 0.1^2), BN 1/0, PReLU 0.25, FC ~ U(+-1/sqrt(fan_in)), no feature scale."""
    block = iresnet.IBasicBlock(64, strides=2)
    x = jnp.zeros((1, 8, 8, 32))
    variables = jax.jit(lambda k: block.init(k, x, train=False))(jax.random.key(SEED))
    p = variables["params"]
    kernel = np.asarray(p["conv2"]["kernel"])
    assert kernel.shape == (3, 3, 64, 64)
    assert abs(kernel.std() - 0.1) < 0.003 and abs(kernel.mean()) < 0.003
    np.testing.assert_array_equal(p["prelu"]["alpha"], np.full(64, 0.25, np.float32))
    np.testing.assert_array_equal(p["bn1"]["scale"], np.ones(32, np.float32))
    np.testing.assert_array_equal(p["bn3"]["bias"], np.zeros(64, np.float32))
    np.testing.assert_array_equal(variables["batch_stats"]["bn2"]["var"], np.ones(64, np.float32))

    head = head_lib.EmbeddingHead(256)
    hv = jax.jit(lambda k: head.init(k, jnp.zeros((2, 2, 2, 100)), train=False))(jax.random.key(1))
    fc = hv["params"]["fc"]
    bound = 1 / math.sqrt(400)
    for leaf in (fc["kernel"], fc["bias"]):
        assert float(jnp.max(jnp.abs(leaf))) <= bound
        assert float(jnp.max(jnp.abs(leaf))) > 0.9 * bound
    assert set(hv["params"]["features"]) == {"bias"}


@pytest.mark.parametrize("field,value", [
    ("name", "iresnet101"), ("embedding_dim", 0), ("width", 0.0), ("width", float("nan")),
    ("dropout", 1.0), ("dtype", "float16"),
])
def test_build_encoder_rejects_bad_config(field: str, value: Any) -> None:
    cfg = model_config("iresnet50").to_dict()
    cfg[field] = value
    with pytest.raises(ValueError, match=f"model.{field}"):
        models.build_encoder(cfg)


def test_build_encoder_names_missing_field() -> None:
    with pytest.raises(ValueError, match="no field 'dtype'"):
        models.build_encoder({k: v for k, v in model_config("iresnet50").items() if k != "dtype"})


def test_registry_covers_config_names() -> None:
    for name in ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
                 "mobilefacenet", "resnet50"):
        assert name in models.REGISTRY
