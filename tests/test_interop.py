"""Tests for broadface_jax.interop: PyTorch / ONNX weights in, ONNX out.

Fixtures (tests/fixtures/interop/, made once by make_fixtures.py with real
torch 2.13.0, so these tests need no torch): width-reduced models with
arcface_torch's / torchvision's module names, random weights, non-trivial
BatchNorm statistics and PReLU slopes, saved by ``torch.save`` and exported by
``torch.onnx.export`` as arcface_torch does, with PyTorch's float64 outputs;
and the key -> shape manifest of the full-size state dicts.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

from broadface_jax import interop, models
from broadface_jax.interop import layout, mapping, onnxfile, torchfile

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "interop"
REF = np.load(FIXTURES / "reference.npz")
# fixture -> (model.name, width, image size)
SPECS = {"r18": ("iresnet18", 1 / 16, 112), "mbf": ("mbf", 1 / 16, 112),
         "resnet50": ("resnet50", 1 / 16, 64), "r18s": ("iresnet18", 0.125, 16)}


def config_for(name: str, width: float, size: int, dim: int = 16,
               num_classes: int = 16) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model=dict(name=name, embedding_dim=dim, width=width, dropout=0.0, dtype="float32",
                   batch_norm="global"),
        image_size=size, seed=0, num_classes=num_classes))


def fixture_config(fixture: str) -> ml_collections.ConfigDict:
    return config_for(*SPECS[fixture])


@functools.lru_cache(maxsize=None)
def forward_with_trunk(fixture: str):
    """Jitted eval-mode forward on NCHW input -> (embedding, pooled output of block layer4_2)."""
    model = models.build_encoder(fixture_config(fixture).model)

    @jax.jit
    def run(params, batch_stats, x_nchw):
        y, state = model.apply({"params": params, "batch_stats": batch_stats},
                               x_nchw.transpose(0, 2, 3, 1), train=False,
                               capture_intermediates=lambda mdl, _: mdl.name == "layer4_2")
        block = state.get("intermediates", {}).get("layer4_2", {}).get("__call__")
        return y, None if block is None else block[0].mean(axis=(1, 2))

    return run


def forward(fixture: str):
    """Jitted eval-mode forward of the fixture's encoder on NCHW input."""
    return lambda *args: forward_with_trunk(fixture)(*args)[0]


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# ------------------------------------------------------------------ the .pth reader


def test_reader_reads_tensors_checkpoints_and_rows():
    sd = torchfile.read_torch_file(FIXTURES / "r18.pth")
    assert isinstance(sd, dict) and "layer1.0.bn1.running_var" in sd
    assert sd["conv1.weight"].dtype == np.float32 and sd["conv1.weight"].shape == (4, 3, 3, 3)
    assert sd["bn1.num_batches_tracked"].shape == () and int(sd["bn1.num_batches_tracked"]) == 1234
    np.testing.assert_array_equal(sd["features.weight"], 1.0)  # IResNet's fixed scale
    ck = torchfile.read_torch_file(FIXTURES / "checkpoint_gpu_1.pt")
    assert ck["epoch"] == 3 and ck["global_step"] == 1200
    assert isinstance(ck["state_optimizer"]["param_groups"], list)
    backbone = torchfile.read_torch_file(FIXTURES / "r18s.pth")
    for key, value in ck["state_dict_backbone"].items():
        np.testing.assert_array_equal(value, backbone[key])
    np.testing.assert_array_equal(ck["state_dict_softmax_fc"]["weight"], REF["r18s/softmax_rows"][8:])


def _zip_with_pickle(path: pathlib.Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")


class _RunsCommand:
    """Pickles as os.system(<touch marker>), as a malicious .pth would."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Model:
    """Stands for an nn.Module saved whole (torch.save(model)): its class is a global."""

    def __init__(self):
        self.weight = np.ones(2)


class _Evals:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload_kind", ["system", "eval", "inside_state_dict", "class"])
def test_malicious_pth_is_refused_and_nothing_runs(tmp_path, payload_kind):
    marker = tmp_path / "pwned"
    if payload_kind == "system":
        obj, refused = _RunsCommand(marker), os.system.__module__ + ".system"
    elif payload_kind == "eval":
        obj, refused = _Evals(marker), "__builtin__.eval"  # protocol 2 spelling
    elif payload_kind == "inside_state_dict":  # a state dict with a payload among the tensors
        obj, refused = {"conv1.weight": 1.0, "bn1.weight": _RunsCommand(marker)}, "posix.system"
    else:  # torch.save(model): the model's class is a global, refused like any other
        obj, refused = {"model": _Model()}, f"{__name__}._Model"
    path = tmp_path / "backbone.pth"
    _zip_with_pickle(path, pickle.dumps(obj, protocol=2))
    with pytest.raises(torchfile.TorchFileError) as info:
        torchfile.read_torch_file(path)
    message = str(info.value)
    assert str(path) in message and "Nothing from the file was run" in message
    assert f"asks for the global {refused};" in message
    assert not marker.exists()
    # numpy's reconstructor (what a numpy array pickles as) is refused too.
    _zip_with_pickle(path, pickle.dumps(np.zeros(2), protocol=2))
    with pytest.raises(torchfile.TorchFileError, match="numpy"):
        torchfile.read_torch_file(path)


def test_bad_files_are_named(tmp_path):
    data = (FIXTURES / "r18.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(torchfile.TorchFileError, match=f"{truncated}.*truncated or corrupt"):
        torchfile.read_torch_file(truncated)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    with pytest.raises(torchfile.TorchFileError, match=f"{legacy}: legacy"):
        torchfile.read_torch_file(legacy)
    script = tmp_path / "scripted.pt"
    with zipfile.ZipFile(script, "w") as z:
        for name in ("m/data.pkl", "m/constants.pkl", "m/code/__torch__.py"):
            z.writestr(name, b"")
    with pytest.raises(torchfile.TorchFileError, match=f"{script}: this is a TorchScript"):
        torchfile.read_torch_file(script)
    # A storage record cut short: the tensor would read past its end.
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(FIXTURES / "r18.pth") as src, zipfile.ZipFile(short, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            dst.writestr(item, body[:8] if item.filename.endswith("/data/0") else body)
    with pytest.raises(torchfile.TorchFileError, match=f"{short}: storage '0'.*truncated"):
        torchfile.read_torch_file(short)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        torchfile.read_torch_file(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x01\x02not an onnx file" * 10)
    with pytest.raises(onnxfile.OnnxFileError, match=f"{garbage}"):
        onnxfile.read_onnx_layers(garbage)


# ------------------------------------------------------------------ parity with PyTorch


@pytest.mark.parametrize("fixture", ["r18", "mbf"])
def test_pth_and_onnx_import_match_torch(fixture):
    """arcface_torch state dict and its torch.onnx.export pack -> Flax == torch (float64)."""
    config = fixture_config(fixture)
    x, want = REF[f"{fixture}/x"], REF[f"{fixture}/y"]
    params, batch_stats = interop.import_encoder(str(FIXTURES / f"{fixture}.pth"), config)
    assert rel_err(forward(fixture)(params, batch_stats, x), want) <= 1e-5
    imported = interop.import_model(str(FIXTURES / f"{fixture}.onnx"), config)
    n_conv = sum(op.kind == "conv" for op in layout.plan(config.model.name))
    assert imported.folded == n_conv and imported.fresh == []  # the exporter folded every Conv+BN
    assert rel_err(forward(fixture)(imported.params, imported.batch_stats, x), want) <= 1e-5


def test_torchvision_resnet50_trunk_matches_torch_and_head_is_fresh():
    config = fixture_config("resnet50")
    imported = interop.import_model(str(FIXTURES / "resnet50.pth"), config)
    assert imported.fresh == sorted(
        ["params/head/bn/scale", "params/head/bn/bias", "params/head/fc/kernel",
         "params/head/fc/bias", "params/head/features/bias", "batch_stats/head/bn/mean",
         "batch_stats/head/bn/var", "batch_stats/head/features/mean",
         "batch_stats/head/features/var"])
    _, trunk = forward_with_trunk("resnet50")(imported.params, imported.batch_stats,
                                              REF["resnet50/x"])
    assert rel_err(trunk, REF["resnet50/y"]) <= 1e-5
    # The fresh head: PyTorch's nn.Linear init from config.seed (deterministic), BN at identity.
    kernel = imported.params["head"]["fc"]["kernel"]
    assert kernel.shape == (128, 16) and np.abs(kernel).max() <= 1 / np.sqrt(128)
    assert np.unique(kernel).size == kernel.size
    np.testing.assert_array_equal(imported.batch_stats["head"]["bn"]["var"], 1.0)
    again = interop.import_model(str(FIXTURES / "resnet50.pth"), config)
    np.testing.assert_array_equal(again.params["head"]["fc"]["kernel"], kernel)


def test_full_size_layouts_match_the_torch_manifest():
    """Every key and shape of full-size r50 / r100 / mbf / resnet50 state dicts (taken from torch)."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())["models"]
    for name, size in (("iresnet50", 112), ("iresnet100", 112), ("mbf", 112), ("resnet50", 224)):
        _, shapes = interop.abstract_variables(config_for(name, 1.0, size, dim=512))
        ours = {e.torch_key: e.torch_shape for e in mapping.torch_entries(name, shapes)}
        fam = layout.family(name)
        theirs = {k: tuple(v) for k, v in manifest[name].items() if not mapping._ignorable(k, fam)}
        assert ours == theirs, name
        assert name in mapping.guess_model(set(manifest[name]))
    assert len(manifest["iresnet100"]) == 1 + 5 + 1 + 100 // 2 * 0 + len(
        [k for k in manifest["iresnet100"] if k.startswith("layer")]) + 5 + 2 + 5


# ------------------------------------------------------------------ mismatches


def test_wrong_architecture_and_missing_keys_are_listed(tmp_path):
    path = str(FIXTURES / "r18.pth")
    with pytest.raises(mapping.ImportMismatch) as info:  # an r18 file into an r50 config
        interop.import_encoder(path, config_for("iresnet50", 1 / 16, 112))
    message = str(info.value)
    assert path in message and "model.name='iresnet50'" in message
    assert "missing keys" in message and "layer1.2.bn1.weight" in message
    assert "model.name='iresnet18'" in message  # the hint: what the file is
    with pytest.raises(mapping.ImportMismatch) as info:  # right layers, wrong width
        interop.import_encoder(path, config_for("iresnet18", 1 / 8, 112))
    assert "conv1.weight: model needs (8, 3, 3, 3), file has (4, 3, 3, 3)" in str(info.value)
    assert "check model.width" in str(info.value)
    _, shapes = interop.abstract_variables(fixture_config("r18"))
    state = torchfile.read_torch_file(path)
    del state["layer2.1.prelu.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(mapping.ImportMismatch,
                       match=r"(?s)missing keys \(1\): layer2.1.prelu.weight.*"
                             r"unexpected keys \(1\): extra.weight"):
        mapping.from_torch_state_dict(state, "iresnet18", shapes, path)
    state = torchfile.read_torch_file(path)
    state["features.weight"] = state["features.weight"] * 2
    with pytest.raises(mapping.ImportMismatch, match="features.weight must be all ones"):
        mapping.from_torch_state_dict(state, "iresnet18", shapes, path)
    onnx_path = str(FIXTURES / "r18.onnx")
    with pytest.raises(mapping.ImportMismatch,
                       match=r"graph has 41 weighted nodes.*count fits model.name='iresnet18'"):
        interop.import_encoder(onnx_path, config_for("iresnet34", 1 / 16, 112))
    mbf_path = str(FIXTURES / "mbf.onnx")
    with pytest.raises(mapping.ImportMismatch,
                       match=f"{mbf_path}: weighted node #1 .* is a PRelu, but model.name="
                             "'resnet50' needs a Conv there for layer1_0/conv1"):
        interop.import_encoder(mbf_path, config_for("resnet50", 1 / 16, 64))


def test_classifier_rows_concatenate_in_rank_order():
    pattern = str(FIXTURES / "checkpoint_gpu_*.pt")
    files = interop.resolve_files(pattern)
    assert [os.path.basename(f) for f in files] == ["checkpoint_gpu_0.pt", "checkpoint_gpu_1.pt"]
    rows = interop.read_classifier(files, num_classes=16, embedding_dim=16)
    np.testing.assert_array_equal(rows, REF["r18s/softmax_rows"])
    with pytest.raises(interop.InteropError, match=r"checkpoint_gpu_0.pt: 8\) sum to 8 classes, "
                                                   r"config.num_classes=16; pass all rank files"):
        interop.read_classifier(files[:1], num_classes=16, embedding_dim=16)
    assert interop.read_classifier([str(FIXTURES / "r18s.pth")]) is None
    assert interop.is_model_file(pattern) and interop.is_model_file("a.onnx")
    assert not interop.is_model_file("runs/arcface")


# ------------------------------------------------------------------ export


def _lfw_faces(shared_data: pathlib.Path, n: int, size: int) -> np.ndarray:
    from broadface_jax import align

    paths = sorted((shared_data / "lfw").rglob("*.jpg"))[:n]
    if len(paths) < n:
        pytest.skip("LFW images not found under shared/data/lfw")
    faces = [align.lfw_center_crop(align.read_rgb(p), size) for p in paths]
    return np.stack(faces)


@pytest.mark.parametrize("fixture", ["r18", "mbf", "resnet50"])
def test_export_round_trip_in_onnxruntime(tmp_path, fixture, shared_data):
    """Our ONNX in onnxruntime == our JAX forward (random inputs and real faces); re-import exact."""
    import onnx
    import onnxruntime as ort

    config = fixture_config(fixture)
    name, _, size = SPECS[fixture]
    params, batch_stats = interop.import_encoder(str(FIXTURES / f"{fixture}.pth"), config)
    rng = np.random.default_rng(9)
    print("seed 9")
    faces = _lfw_faces(shared_data, 3, size).astype(np.float32)
    inputs = np.concatenate([rng.uniform(-1, 1, (3, 3, size, size)).astype(np.float32),
                             ((faces - 127.5) / 127.5).transpose(0, 3, 1, 2)])
    want = np.asarray(forward(fixture)(params, batch_stats, inputs))
    for fold in (True, False):
        path = tmp_path / f"{fixture}_{fold}.onnx"
        onnxfile.export_onnx(name, params, batch_stats, size, path, fold_bn=fold)
        model = onnx.load(path)
        assert model.opset_import[0].version == 11
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, size, size]
        assert not {"Sub", "Mul"} & {n.op_type for n in model.graph.node[:8]}  # ArcFaceONNX: 127.5
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(None, {"data": inputs[:4]})[0],
                              session.run(None, {"data": inputs[4:]})[0]])  # dynamic batch
        assert rel_err(got, want) <= 1e-4, (fold, rel_err(got, want))
        if fold and fixture != "resnet50":
            back = interop.import_model(str(path), config)
            assert back.folded > 0
            assert rel_err(forward(fixture)(back.params, back.batch_stats, inputs), want) <= 1e-5
