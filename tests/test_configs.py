"""Every config file and variant loads as ``--config configs/X.py:variant`` does, and is valid."""

from __future__ import annotations

import pathlib

import pytest

from broadface_jax import cli, config_check

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

#: file -> the variants its docstring lists ("" = none given).
VARIANTS = {
    "default.py": [""],
    "arcface.py": ["", "r50"],
    "cosface.py": ["", "m04", "baseline"],
    "demo.py": ["", "smoke", "arcface"],
    "lfw.py": ["", "smoke", "arcface"],
    "retrieval.py": None,  # its own list: retrieval._variants()
}


def _variants(name: str) -> list[str]:
    if VARIANTS[name] is not None:
        return VARIANTS[name]
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrieval_variants", CONFIGS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [""] + module._variants()


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted(VARIANTS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_loads_locked_and_valid(name):
    default = cli.config_from_file(CONFIGS / "default.py")
    for variant in _variants(name):
        config = cli.config_from_file(CONFIGS / name, variant or None)
        assert config_check.problems(config) == [], (name, variant)
        # starts from configs/default.py: the same fields, locked
        assert sorted(config.to_dict()) == sorted(default.to_dict()), (name, variant)
        with pytest.raises(AttributeError):
            config.totl_steps = 5
    if name != "default.py":
        with pytest.raises(ValueError, match=f"configs/{name}: unknown variant 'nope'"):
            cli.config_from_file(CONFIGS / name, "nope")


def test_variants_change_what_they_say():
    """A few variants against their documented fields (a variant that did nothing fails)."""
    get = lambda spec: cli.config_from_file(CONFIGS / spec)  # noqa: E731
    assert get("arcface.py").queue.size_per_device == 0
    assert get("arcface.py:r50").model.name == "iresnet50"
    assert (get("cosface.py").loss.name, get("cosface.py").loss.m3) == ("cosface", 0.35)
    assert get("cosface.py:m04").loss.m3 == 0.4
    assert get("cosface.py:baseline").queue.size_per_device == 0
    assert get("demo.py:smoke").total_steps == 3
    assert get("demo.py:arcface").queue.size_per_device == 0
    assert get("lfw.py:arcface").queue.size_per_device == 0
    sop = get("retrieval.py:sop")
    assert (sop.dataset.tfds_name, sop.dataset.augment, sop.dataset.normalize) == (
        "sop", "retrieval", "imagenet")
