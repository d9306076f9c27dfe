"""Who owns evaluators, and how a type is added: one class plus one ``register`` call, nothing else.

A throwaway type (``_Probe``) is registered by this module, as a target
module registers its own, and run by a training run (``train._Run``, what
``train_and_evaluate`` opens, evaluating at steps 1 and 2) and by the
``evaluate`` command's ``evaluate_checkpoint`` under two configs in one
process. The probe reads a
config field that no registry code lists (``loss.s``) and reports it, with
the shape of what the embed function returned, so a stale evaluator (one
built for another config) or one rebuilt at every evaluation shows in the
numbers. Also: the evaluation modules import each other without a cycle.
"""

from __future__ import annotations

import ast
import itertools
import pathlib

import numpy as np
import pytest

from broadface_jax import evaluate, evaluation, train
from tests.test_train import EMBED_DIM, read_metrics, tiny_config, tiny_model

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "broadface_jax" / "evaluation"
PROBE = "probe_throwaway"


class _Probe:
    """Embeds ``num_images`` random images (seeded by its option); reports ``config.loss.s`` and shapes."""

    built: list["_Probe"] = []  # every instance, in order

    def __init__(self, name: str, config, options: dict):
        size = int(config.image_size)
        self.name, self.loss_s, self.runs = name, float(config.loss.s), 0
        self.images = np.random.default_rng(options["seed"]).integers(
            0, 256, (options["num_images"], size, size, 3), dtype=np.uint8)
        _Probe.built.append(self)

    def run(self, embed_fn, out_dir=None) -> dict[str, float]:
        self.runs += 1
        feats = np.asarray(embed_fn(self.images))
        return {"loss_s": self.loss_s, "rows": float(feats.shape[0]), "dim": float(feats.shape[1]),
                "finite": float(np.isfinite(feats).all())}


@pytest.fixture
def probe():
    """Registers the throwaway type (as a module does below its class); removed afterwards."""
    evaluation.register(PROBE, evaluation.TargetType(_Probe, {"num_images": 5, "seed": 0},
                                                     summary="test-only probe"))
    _Probe.built.clear()
    yield _Probe.built
    evaluation.TYPES.pop(PROBE)
    _Probe.built.clear()


def test_registered_type_runs_in_a_training_run_and_in_evaluate_one_evaluator_per_run(tmp_path, probe):
    import jax

    from broadface_jax import sharding, train_step

    config = tiny_config(total_steps=2)
    config.eval.targets = (PROBE,)
    mesh = sharding.make_mesh(config.mesh)
    state, _ = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0), model=tiny_model())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The trainer's run (what train_and_evaluate opens) evaluating at steps 1 and 2: built once, run twice.
    with train._Run(config, str(run_dir), train.Schedule.from_config(config), mesh, tiny_model(),
                    state) as run:
        run.evaluate(1)
        run.evaluate(2)
        run.save(2)
    assert [p.runs for p in probe] == [2]
    records = [r for r in read_metrics(run_dir) if f"eval/{PROBE}/rows" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert (r[f"eval/{PROBE}/rows"], r[f"eval/{PROBE}/dim"]) == (5, EMBED_DIM)
        assert r[f"eval/{PROBE}/loss_s"] == config.loss.s and r[f"eval/{PROBE}/finite"] == 1

    # The evaluate command, two configs in one process: two evaluators, each its own config's.
    results = {}
    for loss_s in (3.0, 5.0):
        other = tiny_config(total_steps=2)
        other.loss.s = loss_s
        step, got = evaluate.evaluate_checkpoint(other, str(run_dir), [PROBE], model=tiny_model())
        assert step == 2
        results[loss_s] = got[PROBE]
    assert results[3.0] == {"loss_s": 3.0, "rows": 5.0, "dim": float(EMBED_DIM), "finite": 1.0}
    assert results[5.0] == {**results[3.0], "loss_s": 5.0}
    assert len(probe) == 3 and len({id(p) for p in probe}) == 3
    assert [p.runs for p in probe] == [2, 1, 1]


def test_evaluators_keep_one_instance_per_target_and_config():
    config = tiny_config()
    first, second = evaluation.Evaluators(config), evaluation.Evaluators(config)
    assert first.get("synthetic") is first.get("synthetic")
    assert first.get("synthetic") is not second.get("synthetic")
    assert evaluation.build_evaluator("synthetic", config) is not evaluation.build_evaluator("synthetic",
                                                                                          config)


def _module_imports(path: pathlib.Path) -> set[str]:
    """The ``broadface_jax.evaluation`` submodules ``path`` imports at module level (not in functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "broadface_jax.evaluation":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("broadface_jax.evaluation."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names
                      if a.name.startswith("broadface_jax.evaluation.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_evaluation_modules_import_without_a_cycle():
    graph = {p.stem: _module_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert {"registry", "face_targets", "retrieval_targets", "benchmark_targets"} <= graph.keys()
    assert not graph["registry"] & {"face_targets", "retrieval_targets", "benchmark_targets"}

    def reaches(start: str, seen: set[str]) -> set[str]:
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reaches(nxt, seen)
        return seen

    cycles = [m for m in graph if m in reaches(m, set())]
    assert not cycles, f"evaluation modules in an import cycle: {cycles}"
    assert list(itertools.islice(evaluation.TYPES, 6)) == ["lfw_dev", "cfp_fp", "cfp_ff",
                                                          "lfw_people_test", "synthetic", "bin"]
