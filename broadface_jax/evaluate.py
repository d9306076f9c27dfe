"""Evaluate a trained run's encoder on evaluation targets.

    python -m broadface_jax.evaluate --workdir runs/lfw
    python -m broadface_jax.evaluate --workdir runs/demo \\
        --targets synthetic,lfw_dev --checkpoint runs/demo/checkpoints/400
    python -m broadface_jax.evaluate --workdir runs/paper --config.eval.batch_size=64 \\
        --targets ijbc:/data/IJB_release/IJBC,megaface:/data/megaface,bin:agedb_30

Restores the encoder (parameters and BatchNorm statistics) from the latest
checkpoint of ``--workdir`` (or from ``--checkpoint``: a workdir, checkpoints
folder or step folder), embeds each target's faces with flip-and-sum, prints
the accuracy table, and writes ROC curves (PNG) and ``results_<step>.json`` to
``<workdir>/eval``. The config is the run's own (``config.json`` in the
workdir, written by training and by ``convert``; ``--config.FIELD=VALUE``
overrides apply to it); a ``--config`` file given instead must describe the
same model (``model.*``, ``image_size``: each differing field is named, exit
status 2); evaluation fields (targets, batch size, data folders) may differ.
``--targets`` defaults to ``config.eval.targets``. Each target shows a
progress bar on stderr (images embedded, rate, ETA) and a line with its time
when done; third-party log lines are hidden unless ``--verbosity`` is given. A target is a ``config.evals`` entry's name, a
type name (``lfw_dev``, ``synthetic``, ``sop``, ...) or ``<type>:<path>``
(``bin:``, ``ijbb:``, ``ijbc:``, ``megaface:``, ``ytf:``, ``sop:`` ...): the
registry of ``broadface_jax.evaluation``, the same as in training.
Every target is checked (type, options, close matches) before the
checkpoint is loaded. With several processes each embeds its share of the
images (``broadface_jax.evaluation.embedding``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app, flags, logging

from broadface_jax import cli


def evaluate_checkpoint(config: Any, workdir: str, targets: Sequence[str],
                        checkpoint: Optional[str] = None, model: Any = None,
                        progress: Any = None) -> tuple[int, dict[str, dict[str, float]]]:
    """Restores the encoder, runs ``targets``, writes ``<workdir>/eval`` outputs.

    ``progress``: per-target progress reporting (``evaluation.run_targets``). The
    targets' evaluators are this call's own (built from ``config``, then dropped).

    Returns:
      ``(step, {target: metrics})``.
    """
    import jax

    from broadface_jax import evaluation, restore, sharding
    from broadface_jax import workdir as workdir_lib
    from broadface_jax.evaluation import embedding

    if not targets:
        raise ValueError("no evaluation targets: pass --targets or set config.eval.targets")
    mesh = sharding.make_mesh(config.mesh)
    encoder = restore.restore_encoder(checkpoint or workdir, config,
                                      sharding=sharding.replicated(mesh), model=model)
    step = encoder.step
    logging.info("evaluating step %d of %s on %s", step, checkpoint or workdir,
                 ", ".join(targets))
    embed_fn = embedding.make_uint8_embed_fn(config, mesh, model)(encoder.params,
                                                                  encoder.batch_stats)
    out_dir = os.path.join(workdir, workdir_lib.EVAL_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    results = evaluation.run_targets(tuple(targets), embed_fn, config, out_dir=out_dir,
                                     progress=progress)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, f"results_{step}.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "checkpoint": checkpoint or workdir,
                       "results": results}, f, indent=2, default=float)
    return step, results


def _define_flags() -> None:
    """The command-line flags, defined only when run as a program (importing stays flag-free)."""
    global _CONFIG, _WORKDIR, _TARGETS, _CHECKPOINT, _CLEAR_CACHE
    from broadface_jax import distributed  # noqa: F401  (defines the multi-host flags)

    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "The run's directory; results go to <workdir>/eval.")
    _CONFIG = cli.define_config_flag(
        "Config of the run (configs/X.py or configs/X.py:variant); default: the workdir's "
        "config.json.")
    _TARGETS = flags.DEFINE_list(
        "targets", None, "Comma-separated targets: config.evals entries, type names (lfw_dev, "
        "cfp_fp, cfp_ff, lfw_people_test, synthetic, sop, inshop, ...) or <type>:<path> (bin:, "
        "ijbb:, ijbc:, megaface:, ytf:); default: config.eval.targets. 'list': print every type "
        "with its options.")
    _CHECKPOINT = flags.DEFINE_string(
        "checkpoint", None, "Checkpoint to evaluate (workdir, checkpoints folder or step "
        "folder); default: the latest in --workdir.")
    _CLEAR_CACHE = flags.DEFINE_bool(
        "clear_cache", False, "Delete the evaluation image cache (config.eval.cache_dir, "
        "$BROADFACE_EVAL_CACHE or ~/.cache/broadface_jax/eval), say what it held, and exit.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_third_party_logs()
    from broadface_jax import checkpointing, distributed

    if _CLEAR_CACHE.value:
        from broadface_jax.evaluation import cache

        config = cli.load_config() if flags.FLAGS["config"].value is not None else None
        print(cache.clear_cache(config), flush=True)
        return
    if not _WORKDIR.value:
        cli.fail("--workdir is required (the run to evaluate; results go to <workdir>/eval)",
                 cli.EXIT_USAGE)
    config = cli.load_config_for_run(_CHECKPOINT.value or _WORKDIR.value)
    from broadface_jax import evaluation

    targets = _TARGETS.value if _TARGETS.value else list(config.eval.targets)
    if targets == ["list"]:
        print(evaluation.describe_types(), flush=True)
        return
    problems = evaluation.target_problems(
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

    from broadface_jax.evaluation import embedding

    start = time.perf_counter()
    try:
        step, results = evaluate_checkpoint(config, _WORKDIR.value, targets, _CHECKPOINT.value,
                                            progress=embedding.BarProgress)
    except checkpointing.CheckpointError as e:
        cli.fail(str(e), 1)
    print(f"\nVerification at step {step} ({_CHECKPOINT.value or _WORKDIR.value}, "
          f"{time.perf_counter() - start:.0f} s):\n{evaluation.format_table(results)}",
          file=sys.stdout, flush=True)


def cli_main() -> None:
    """The ``broadface-evaluate`` console script: ``python -m broadface_jax.evaluate``."""
    _define_flags()
    cli.run(main, flags_parser=cli.workdir_config_parser())  # one-line flag errors, exit 2


if __name__ == "__main__":
    cli_main()
