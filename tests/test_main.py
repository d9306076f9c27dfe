"""The command-line entry points, run as a user runs them (subprocesses).

`python -m broadface_jax.main --config configs/demo.py:smoke` trains the real
IResNet-18 (width 0.125) for a few steps on synthetic identities, checkpoints
and evaluates; `python -m broadface_jax.evaluate` then restores that
checkpoint's encoder and must reproduce the trainer's own evaluation. Config
mistakes fail before anything runs, naming the field or variant.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_main_demo_smoke_then_evaluate_cli(tmp_path):
    workdir = tmp_path / "demo"
    proc = _run(["broadface_jax.main", "--config", "configs/demo.py:smoke",
                 "--workdir", str(workdir), "--config.total_steps=2",
                 "--config.checkpoint_every_steps=1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Verification at step 2" in proc.stdout
    assert "| synthetic" in proc.stdout

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss_encoder" in r]
    assert [r["step"] for r in train_records] == [1, 2]  # --config.total_steps=2 applied
    eval_record = records[-1]
    assert eval_record["step"] == 2
    accuracy = eval_record["eval/synthetic/accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert (workdir / "eval" / "roc_synthetic.png").stat().st_size > 0

    # The evaluate CLI restores step 2's encoder and reproduces the trainer's result.
    proc = _run(["broadface_jax.evaluate", "--config", "configs/demo.py:smoke",
                 "--workdir", str(workdir), "--targets", "synthetic"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Verification at step 2" in proc.stdout
    saved = json.loads((workdir / "eval" / "results_2.json").read_text())
    assert saved["step"] == 2
    assert saved["results"]["synthetic"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/demo.py:smoke", "--config.no_such_field=1"], "no_such_field"),
    (["--config", "configs/demo.py:bogus"], "unknown variant 'bogus'"),
    (["--config", "configs/demo.py", "--config.per_device_batch_size=many"],
     "per_device_batch_size"),
])
def test_config_mistakes_are_errors(tmp_path, args, message):
    workdir = tmp_path / "run"
    proc = _run(["broadface_jax.main", *args, "--workdir", str(workdir)], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not workdir.exists()  # failed before touching anything


def test_evaluate_cli_missing_checkpoint(tmp_path):
    proc = _run(["broadface_jax.evaluate", "--config", "configs/demo.py:smoke",
                 "--workdir", str(tmp_path), "--targets", "synthetic"], timeout=120)
    assert proc.returncode != 0
    assert "no checkpoint found in" in proc.stderr and str(tmp_path) in proc.stderr


CONFIG_VARIANTS = [("default", None), ("arcface", None), ("arcface", "r50"),
                   ("cosface", None), ("cosface", "m04"), ("cosface", "baseline"),
                   ("demo", None), ("demo", "smoke"), ("demo", "arcface"),
                   ("lfw", None), ("lfw", "smoke"), ("lfw", "arcface")]


def _flat_fields(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = config.get_type(key)  # a placeholder's declared type
    return out


@pytest.mark.parametrize("name, arg", CONFIG_VARIANTS)
def test_configs_only_change_default_fields(name, arg):
    """Every config keeps default.py's field set and types, and passes the step's checks."""
    import jax

    from broadface_jax import models, sharding, train_step
    from tests.test_train import load_config

    default = load_config("default")
    config = load_config(name, arg)
    assert _flat_fields(config) == _flat_fields(default)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    train_step.validate_config(config, mesh)
    models.build_encoder(config.model)
    if name == "arcface":
        assert config.queue.size_per_device == 0
    if name == "cosface":
        assert config.loss.name == "cosface"
        assert config.loss.m3 == (0.4 if arg == "m04" else 0.35)
    if name in ("demo", "lfw") and arg != "arcface":
        assert config.queue.size_per_device > 0


def test_config_from_file_loads_as_the_command_line_does(tmp_path, monkeypatch):
    """One loader: path[:variant], repository-relative paths, locked like --config."""
    import importlib.util

    from broadface_jax import cli

    spec = importlib.util.spec_from_file_location("demo_ref", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    want = module.get_config("smoke")

    monkeypatch.chdir(tmp_path)  # "configs/demo.py" is found from the repository root
    for got in (cli.config_from_file("configs/demo.py:smoke"),
                cli.config_from_file(REPO / "configs" / "demo.py", "smoke")):
        assert got.to_dict() == want.to_dict() and got.total_steps == 3
        with pytest.raises(AttributeError):  # locked: a typo is an error, as on the command line
            got.totl_steps = 5
    assert cli.config_from_file("configs/demo.py").total_steps == module.get_config().total_steps
    with pytest.raises(FileNotFoundError, match="no such config file 'configs/nope.py'"):
        cli.config_from_file("configs/nope.py")
