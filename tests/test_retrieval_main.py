"""End to end: the retrieval config trains BroadFace and reports Recall@K, through the CLIs.

A miniature SOP (real list layout, 4 training and 3 test products) is
prepared with `broadface_jax.prepare`; `python -m broadface_jax.main
--config configs/retrieval.py:sop,smoke` runs 3 BroadFace steps of the
ResNet-50 (width 1/16, 32x32 crops of 40x40 frames, random resized crops and
flips, ImageNet normalisation) and evaluates the SOP protocol (Recall@1, 10,
100, 1000, all vs all) into metrics.jsonl and the printed table.
(`broadface_jax.evaluate` runs the same `evaluation.run_targets`, tested in
test_retrieval_eval.py; a second ResNet-50 process here would double the
run time.) XLA's CPU backend optimisations are turned down in the
subprocess: compiling ResNet-50 dominates the run time.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import retrieval_fixtures as rf

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_sop_smoke_trains_broadface_and_reports_recall(tmp_path):
    from broadface_jax import prepare

    rf.write_sop(tmp_path / "raw", seed=0, train_classes=(1, 2, 3, 4), test_classes=(5, 6, 7), per_class=3)
    builder = prepare.prepare("sop", str(tmp_path / "raw"), str(tmp_path / "tfds"))
    assert builder.info.metadata["num_classes"] == 4

    workdir = tmp_path / "run"
    flags = ["--config", "configs/retrieval.py:sop,smoke", f"--config.dataset.data_dir={tmp_path / 'tfds'}",
             "--config.num_classes=4", "--config.checkpoint_every_steps=0"]
    proc = _run(["broadface_jax.main", *flags, "--workdir", str(workdir)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Verification at step 3" in proc.stdout
    assert "| sop " in proc.stdout and "recall@1000" in proc.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss_encoder" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # BroadFace: the queue fills by one global batch (2 devices x 2) per step, 8 rows per device
    assert [r["queue_fill"] for r in train] == pytest.approx([0.25, 0.5, 0.75])
    evals = [r for r in records if "eval/sop/recall@1" in r]
    assert len(evals) == 1 and evals[0]["step"] == 3
    recall = {k: evals[0][f"eval/sop/recall@{k}"] for k in (1, 10, 100, 1000)}
    assert all(0.0 <= v <= 1.0 for v in recall.values())
    assert recall[1] <= recall[10] <= recall[100] == recall[1000] == 1.0  # 9 test images: K >= 8 finds all
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]


def test_retrieval_config_variants():
    import runpy

    get_config = runpy.run_path(str(REPO / "configs" / "retrieval.py"))["get_config"]
    c = get_config("sop")
    assert (c.model.name, c.model.embedding_dim, c.image_size) == ("resnet50", 512, 224)
    assert (c.loss.name, c.loss.s, c.loss.m2) == ("arcface", 64.0, 0.5)
    assert c.queue.size_per_device == 32_000 and c.queue.compensate
    assert (c.dataset.tfds_name, c.dataset.augment, c.dataset.normalize) == ("sop", "retrieval", "imagenet")
    assert c.num_classes == 11_318 and c.per_device_batch_size == 128
    assert c.total_steps == 46_525  # 100 epochs of 59,551 images at batch 128 (ceil)
    assert c.lr_boundaries == (18_610, 27_915, 37_219) and c.lr_decay == 0.2  # epochs 40, 60, 80
    assert c.optimizer.encoder.name == c.optimizer.classifier.name == "adam"
    assert c.init_from == "" and not c.init_classifier
    assert c.eval.targets == ("sop",)
    assert get_config("sop_arcface").queue.size_per_device == 0
    inshop = get_config("inshop")
    assert inshop.num_classes == 3_997 and inshop.eval.targets == ("inshop",)
    assert get_config("cub200_arcface,smoke").queue.size_per_device == 0
    assert get_config("cars196").num_classes == 98
    smoke = get_config("inshop,smoke")
    assert (smoke.image_size, smoke.dataset.resize_to, smoke.model.width) == (32, 40, 1 / 16)
    for bad in ("sopp", "sop,fast", "sop,smoke,smoke"):
        with pytest.raises(ValueError, match="configs/retrieval.py: unknown variant"):
            get_config(bad)
