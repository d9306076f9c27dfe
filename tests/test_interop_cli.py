"""End to end with imported weights: warm start + BroadFace steps, convert -> evaluate, export, embed.

All on ``configs/demo.py:smoke``'s encoder (IResNet-18, width 0.125, 16-d,
16x16 input) whose arcface_torch-layout weights, PyTorch float64 outputs and
2-rank softmax rows are committed fixtures (tests/fixtures/interop/r18s.pth,
checkpoint_gpu_{0,1}.pt; see make_fixtures.py).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from broadface_jax import align, convert, embed, export, restore, sharding, train
from broadface_jax import train_step
from broadface_jax.interop import InteropError
from tests.test_train import load_config, optimizer_moments

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "interop"
REF = np.load(FIXTURES / "reference.npz")
BACKBONE = str(FIXTURES / "r18s.pth")
RANKS = str(FIXTURES / "checkpoint_gpu_*.pt")


def smoke_config(init_from: str = "", init_classifier: bool = False):
    c = load_config("demo", "smoke")
    c.total_steps = 2
    c.checkpoint_every_steps = 2
    c.eval.targets = ()
    c.init_from = init_from
    c.init_classifier = init_classifier
    return c


def torch_x_nhwc() -> np.ndarray:
    return REF["r18s/x"].transpose(0, 2, 3, 1)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.slow  # ~50 s on 2 busy cores: the train state and the train step compile
def test_warm_start_from_pth_then_broadface_steps(tmp_path):
    """init_from=<rank files>: embeddings before the first update == torch's; the rows too; it trains."""
    config = smoke_config(RANKS, init_classifier=True)
    mesh = sharding.make_mesh(config.mesh)
    state, shardings, origin = train.initial_state(config, mesh, str(tmp_path / "run"))
    assert origin == f"warm start (encoder + classifier) from {RANKS}"
    embed_fn = train_step.make_embed_fn(config, mesh)
    got = embed_fn(state.params["encoder"], state.batch_stats, torch_x_nhwc())
    assert rel_err(got, REF["r18s/y"]) <= 1e-5
    np.testing.assert_array_equal(state.params["classifier"]["kernel"], REF["r18s/softmax_rows"])
    assert int(state.step) == 0 and all(np.all(np.asarray(x) == 0)
                                        for x in jax.tree.leaves(optimizer_moments(state.opt_state)))

    # A plain backbone file has no rows: a clear error, or encoder only when asked.
    with pytest.raises(InteropError, match="r18s.pth' has no classifier rows.*init_classifier=False"):
        train.warm_start(state, shardings, BACKBONE, True, config=config)
    only = train.warm_start(state, shardings, BACKBONE, False, config=config)
    for a, b in zip(jax.tree.leaves(only.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)  # same backbone in both files; rows kept

    # A few BroadFace steps (queue on) from the imported state.
    step_fn = train_step.make_train_step(config, mesh, shardings)
    batch_size = sharding.global_batch_size(config)
    rng = np.random.default_rng(0)
    print("seed 0")
    before = np.asarray(state.params["encoder"]["conv1"]["kernel"])
    for _ in range(2):
        batch = sharding.shard_batch(
            {"image": rng.uniform(-1, 1, (batch_size, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, config.num_classes, batch_size).astype(np.int32)}, mesh)
        state, metrics = step_fn(state, batch)
        assert np.isfinite(float(metrics["loss_encoder"]))
    assert float(metrics["queue_fill"]) > 0 and int(state.step) == 2
    assert not np.array_equal(np.asarray(state.params["encoder"]["conv1"]["kernel"]), before)

    config.init_from = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="config.init_from=.*missing.pth"):
        train._check_paths(config)


def test_convert_then_evaluate_export_and_embed(tmp_path, shared_data, capsys):
    config = smoke_config()
    out = tmp_path / "imported"
    record = convert.convert(config, RANKS, str(out))
    assert record["classifier_rows"] == 16 and record["fresh_leaves"] == []
    assert json.loads((out / "import.json").read_text())["source"].endswith("checkpoint_gpu_1.pt")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        convert.convert(config, BACKBONE, str(out))

    # evaluate's restore reads the import as a run's checkpoint (step 0).
    mesh = sharding.make_mesh(config.mesh)
    encoder = restore.restore_encoder(str(out), config, sharding=sharding.replicated(mesh))
    params, batch_stats, step = encoder.params, encoder.batch_stats, encoder.step
    assert step == 0
    y = train_step.make_embed_fn(config, mesh)(params, batch_stats, torch_x_nhwc())
    assert rel_err(y, REF["r18s/y"]) <= 1e-5

    # Export from the workdir; onnxruntime == JAX.
    onnx_path = tmp_path / "model.onnx"
    params, batch_stats, source = export.export(config, str(onnx_path), workdir=str(out))
    assert "step 0" in source
    assert export.check_against_jax(config, params, batch_stats, str(onnx_path)) <= 1e-4

    # Embed a folder of real faces with one unreadable file; flip-sum by hand as reference.
    faces_dir = tmp_path / "faces"
    faces_dir.mkdir()
    paths = sorted((shared_data / "lfw").rglob("*.jpg"))[:3]
    if len(paths) < 3:
        pytest.skip("LFW images not found")
    crops = []
    for i, p in enumerate(paths):
        crop = align.lfw_center_crop(align.read_rgb(p), 16)
        Image.fromarray(crop).save(faces_dir / f"face{i}.png")
        crops.append(crop)
    (faces_dir / "broken.jpg").write_bytes(b"not a jpeg")
    feats = tmp_path / "feats.npz"
    capsys.readouterr()
    result = embed.run(config, str(faces_dir), str(feats), workdir=str(out), progress=True)
    bars = capsys.readouterr().err
    assert "embedding: 100%" in bars and "6/6" in bars  # 3 faces and their mirrors
    saved = np.load(feats)
    assert list(saved["names"]) == ["face0.png", "face1.png", "face2.png"]
    assert list(saved["skipped"]) == ["broken.jpg"]
    assert "cannot decode image" in str(saved["skipped_reason"][0])
    crops = np.stack(crops).astype(np.float32)
    fn = train_step.make_embed_fn(config, mesh)
    norm = lambda u8: (u8 / 255.0 - 0.5) / 0.5  # noqa: E731
    want = fn(params, batch_stats, norm(crops)) + fn(params, batch_stats, norm(crops[:, :, ::-1]))
    assert rel_err(saved["features"], want) <= 1e-5
    np.testing.assert_array_equal(result["features"], saved["features"])

    # With landmarks: the template points on an aligned face are the identity warp.
    listing = tmp_path / "list.txt"
    listing.write_text("faces/face0.png\nfaces/face1.png\nfaces/face2.png\n")
    points = align.ARCFACE_TEMPLATE * (16 / 112)
    marks = tmp_path / "marks.txt"
    marks.write_text("".join(f"faces/face{i}.png " + " ".join(f"{v:.17g}" for v in points.ravel())
                             + "\n" for i in (0, 2)))
    result = embed.run(config, str(listing), str(tmp_path / "f2.npz"), workdir=str(out),
                       landmarks=str(marks), progress=False)
    assert list(result["names"]) == ["faces/face0.png", "faces/face2.png"]
    assert list(result["skipped"]) == ["faces/face1.png"]
    assert list(result["skipped_reason"]) == ["no landmarks for this image"]
    warped = np.stack([align.warp_to_template(crops[i].astype(np.uint8), points, 16)
                       for i in (0, 2)]).astype(np.float32)  # PIL's identity warp is off by <= 1
    want = fn(params, batch_stats, norm(warped)) + fn(params, batch_stats, norm(warped[:, :, ::-1]))
    assert rel_err(result["features"], want) <= 1e-5
    bad = tmp_path / "bad_marks.txt"
    bad.write_text("faces/face0.png 1 2 3\n")
    with pytest.raises(ValueError, match="bad_marks.txt:1: expected"):
        embed.read_landmarks(str(bad))
