"""``broadface_jax.evaluate`` on a config.evals entry and an ad-hoc '<type>:<path>' target.

A real checkpoint (the interop fixture's IResNet-18, imported by
``broadface_jax.convert`` as step 0 of a workdir) is evaluated on a YTF folder
named by a ``config.evals`` entry and on an IJB-C folder given as
``ijbc:<root>`` (what ``--targets ijbc:<root>`` passes), both written here.
The YTF metrics are checked against this file's own path: frames read and
cropped here, the encoder applied by ``train_step.make_embed_fn`` on
normalised images, flip-sum, set means, the 10-fold protocol.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from broadface_jax import convert, evaluate, evaluation, restore, sharding, train_step
from broadface_jax.evaluation import verification
from tests import eval_folders
from tests.test_train import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "interop"
RANKS = str(FIXTURES / "checkpoint_gpu_*.pt")


def test_evaluate_checkpoint_on_entry_and_inline_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))
    config = load_config("demo", "smoke")
    config.eval.targets, config.eval.batch_size = ("ytf_small",), 8
    size = int(config.image_size)
    rng = np.random.default_rng(5)
    print("seed 5")
    assert size == 16  # the writer's 20x24 frames, centre 0.8 = 16x16 crops
    data = eval_folders.write_ytf(tmp_path / "ytf", rng, size=size)
    eval_folders.write_ijb(tmp_path / "IJBC", rng, n_img=10)
    with config.unlocked():  # as a config file's get_config adds an entry
        config.evals.ytf_small = dict(type="ytf", root=str(tmp_path / "ytf"), center_crop=0.8)
    out = tmp_path / "imported"
    convert.convert(config, RANKS, str(out))

    step, results = evaluate.evaluate_checkpoint(config, str(out),
                                                 ["ytf_small", f"ijbc:{tmp_path / 'IJBC'}"])
    assert step == 0 and list(results) == ["ytf_small", f"ijbc:{tmp_path / 'IJBC'}"]
    saved = json.loads((out / "eval" / "results_0.json").read_text())
    assert saved["results"]["ytf_small"] == pytest.approx(results["ytf_small"])
    assert set(results[f"ijbc:{tmp_path / 'IJBC'}"]) == {f"tar@far=1e-{k}" for k in range(1, 7)}

    mesh = sharding.make_mesh(config.mesh)
    encoder = restore.restore_encoder(str(out), config, sharding=sharding.replicated(mesh))
    params, batch_stats = encoder.params, encoder.batch_stats
    fn = train_step.make_embed_fn(config, mesh)

    def flip_sum(u8):
        x = (u8.astype(np.float32) / 255.0 - 0.5) / 0.5
        return (fn(params, batch_stats, x) + fn(params, batch_stats, np.ascontiguousarray(x[:, :, ::-1]))
                ).astype(np.float64)

    means = {}
    for video, frames in data["crops"].items():
        f = flip_sum(frames)
        means[video] = (f / np.linalg.norm(f, axis=1, keepdims=True)).mean(axis=0)
    ref = verification.evaluate_embeddings(np.stack([means[v] for v in data["first"]]),
                                           np.stack([means[v] for v in data["second"]]),
                                           data["issame"], folds=data["folds"])
    assert results["ytf_small"]["accuracy"] == pytest.approx(ref.accuracy, abs=1e-9)
    assert results["ytf_small"]["threshold"] == pytest.approx(ref.best_threshold, abs=0.011)

    # evaluate's main checks every target before loading anything: a typo is a usage error.
    problems = evaluation.target_problems(config, ["ytf_smal"])
    assert problems and "did you mean 'ytf_small'" in problems[0]


def test_evaluate_main_checks_targets_before_anything(tmp_path):
    """`python -m broadface_jax.evaluate --targets ...`: each bad target named, exit 2, no checkpoint read."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "broadface_jax.evaluate", "--config",
                           "configs/demo.py:smoke", "--workdir", str(tmp_path / "none"),
                           "--targets", "ijbcc:/x,synthetic,ijbc"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--targets[0]: unknown evaluation target 'ijbcc:/x' (did you mean 'ijbc'" in proc.stderr
    assert "--targets[2]='ijbc': type 'ijbc' needs root: write 'ijbc:<root>'" in proc.stderr
    assert "--targets[1]" not in proc.stderr  # a good target is not reported
    assert "no checkpoint found" not in proc.stderr  # the targets are checked first

    proc = subprocess.run([sys.executable, "-m", "broadface_jax.evaluate", "--config",
                           "configs/demo.py:smoke", "--workdir", str(tmp_path), "--targets", "list"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ijbc: IJBC 1:1 template verification" in proc.stdout
    assert "options: root=<required>, flip=True, normalize_images=False" in proc.stdout
