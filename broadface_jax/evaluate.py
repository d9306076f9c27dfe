"""Evaluate a trained run's encoder on evaluation targets.

    python -m broadface_jax.evaluate --config configs/lfw.py --workdir runs/lfw
    python -m broadface_jax.evaluate --config configs/demo.py --workdir runs/demo \\
        --targets synthetic,lfw_dev --checkpoint runs/demo/checkpoints/400
    python -m broadface_jax.evaluate --config configs/default.py --workdir runs/paper \\
        --targets ijbc:/data/IJB_release/IJBC,megaface:/data/megaface,bin:agedb_30

Restores the encoder (parameters and BatchNorm statistics) from the latest
checkpoint of ``--workdir`` (or from ``--checkpoint``: a workdir, checkpoints
folder or step folder), embeds each target's faces with flip-and-sum, prints
the accuracy table, and writes ROC curves (PNG) and ``results_<step>.json`` to
``<workdir>/eval``. ``--config`` must describe the same model as the run
(``model.*``, ``image_size``); ``--targets`` defaults to
``config.eval.targets``. A target is a ``config.evals`` entry's name, a
type name (``lfw_dev``, ``synthetic``, ``sop``, ...) or ``<type>:<path>``
(``bin:``, ``ijbb:``, ``ijbc:``, ``megaface:``, ``ytf:``, ``sop:`` ...): the
registry of ``broadface_jax.evaluation.targets``, the same as in training.
Every target is checked (type, options, close matches) before the
checkpoint is loaded. With several processes each embeds its share of the
images (``broadface_jax.evaluation.embedding``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional, Sequence

from absl import app, flags, logging

from broadface_jax import cli, distributed  # distributed defines the multi-host flags

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The run's directory; results go to <workdir>/eval.")
_CONFIG = cli.define_config_flag("Config of the run (configs/X.py or configs/X.py:variant).")
_TARGETS = flags.DEFINE_list(
    "targets", None, "Comma-separated targets: config.evals entries, type names (lfw_dev, "
    "cfp_fp, cfp_ff, lfw_people_test, synthetic, sop, inshop, ...) or <type>:<path> (bin:, "
    "ijbb:, ijbc:, megaface:, ytf:); default: config.eval.targets. 'list': print every type "
    "with its options.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Checkpoint to evaluate (workdir, checkpoints folder or step "
    "folder); default: the latest in --workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def restore_encoder(config: Any, mesh: Any, path: str, step: Optional[int] = None,
                    model: Any = None) -> tuple[Any, Any, int]:
    """Loads only the encoder of a checkpoint (not the classifier, optimizer or queue).

    Returns:
      ``(encoder_params, batch_stats, step)``, replicated on ``mesh``.

    Raises:
      FileNotFoundError: ``path`` holds no checkpoint (or not ``step``).
      checkpointing.CheckpointError: the checkpoint's encoder does not match
        ``config.model`` / ``config.image_size`` (every differing leaf named).
    """
    import jax

    from broadface_jax import checkpointing, models, sharding

    folder, step = checkpointing.resolve(path, step)
    if model is None:
        model = models.build_encoder(config.model)
    variables = jax.eval_shape(functools.partial(models.init_variables, model,
                                                 int(config.image_size)), jax.random.PRNGKey(0))
    part = {"params": {"encoder": variables["params"]},
            "batch_stats": variables.get("batch_stats", {})}
    replicated = sharding.replicated(mesh)
    target = checkpointing.abstract_like(part, jax.tree.map(lambda _: replicated, part))
    loaded = checkpointing.restore_partial(folder, target, step)
    return loaded["params"]["encoder"], loaded["batch_stats"], step


def evaluate_checkpoint(config: Any, workdir: str, targets: Sequence[str],
                        checkpoint: Optional[str] = None, model: Any = None
                        ) -> tuple[int, dict[str, dict[str, float]]]:
    """Restores the encoder, runs ``targets``, writes ``<workdir>/eval`` outputs.

    Returns:
      ``(step, {target: metrics})``.
    """
    import jax

    from broadface_jax import evaluation, sharding, train
    from broadface_jax.evaluation import embedding

    if not targets:
        raise ValueError("no evaluation targets: pass --targets or set config.eval.targets")
    mesh = sharding.make_mesh(config.mesh)
    params, batch_stats, step = restore_encoder(config, mesh, checkpoint or workdir,
                                                model=model)
    logging.info("evaluating step %d of %s on %s", step, checkpoint or workdir,
                 ", ".join(targets))
    embed_fn = embedding.make_uint8_embed_fn(config, mesh, model)(params, batch_stats)
    out_dir = os.path.join(workdir, train.EVAL_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    results = evaluation.run_targets(tuple(targets), embed_fn, config, out_dir=out_dir)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, f"results_{step}.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "checkpoint": checkpoint or workdir,
                       "results": results}, f, indent=2, default=float)
    return step, results


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from broadface_jax import checkpointing, cli

    config = cli.load_config()
    from broadface_jax.evaluation import targets as targets_lib

    targets = _TARGETS.value if _TARGETS.value else list(config.eval.targets)
    if targets == ["list"]:
        print(targets_lib.describe_types(), flush=True)
        return
    problems = targets_lib.target_problems(
        config, targets, "--targets" if _TARGETS.value else "config.eval.targets")
    if problems:
        cli.fail("\n".join(problems), cli.EXIT_USAGE)
    try:
        checkpointing.resolve(_CHECKPOINT.value or _WORKDIR.value)  # fail fast, naming the path
    except FileNotFoundError as e:
        cli.fail(str(e), cli.EXIT_USAGE)
    from broadface_jax import input_pipeline

    input_pipeline.hide_gpus_from_tensorflow()  # image decoding beside JAX
    distributed.maybe_initialize()

    from broadface_jax import evaluation

    checkpointing.quiet_orbax_logging()
    step, results = evaluate_checkpoint(config, _WORKDIR.value, targets, _CHECKPOINT.value)
    print(f"\nVerification at step {step} ({_CHECKPOINT.value or _WORKDIR.value}):\n"
          f"{evaluation.format_table(results)}", flush=True)


if __name__ == "__main__":
    cli.run(main)  # one-line flag errors, exit 2
