"""Import PyTorch / ONNX weights as an orbax checkpoint that evaluate and warm starts read.

    python -m broadface_jax.convert --config configs/default.py \\
        --from ~/models/ms1mv3_arcface_r100/backbone.pth --workdir runs/r100_imported
    python -m broadface_jax.evaluate --workdir runs/r100_imported \\
        --targets bin:data/lfw.bin,bin:data/cfp_fp.bin

``--from`` is an arcface_torch ``backbone.pth`` / ``model.pt``, all rank files
of an arcface_torch checkpoint (``'ckpt/checkpoint_gpu_*.pt'``: their softmax
rows become the classifier when their count is ``config.num_classes``), a
torchvision ResNet-50 ``.pth``, or an insightface ONNX pack (see
:mod:`broadface_jax.interop`). ``--config`` says which of our encoders the
weights are for (``model.*``, ``image_size``).

Writes ``<workdir>/checkpoints/0`` holding ``params.encoder``
(+ ``params.classifier``) and ``batch_stats`` — the parts that
``broadface_jax.evaluate`` and ``--config.init_from=<workdir>`` read — and
``<workdir>/import.json`` (source, leaves without a counterpart, folded
BatchNorms) and ``<workdir>/config.json`` (the ``--config`` given, as training
records its own), so ``evaluate`` / ``embed`` / ``export`` on this folder need
no ``--config``. The folder is an import, not a run: train into another workdir
with ``--config.init_from`` pointing here (or at the weights file itself).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app, flags

from broadface_jax import cli



def convert(config: Any, spec: str, workdir: str, with_classifier: bool = True) -> dict:
    """Imports ``spec`` for ``config.model`` and writes checkpoint 0 into ``workdir``.

    Returns:
      The ``import.json`` record.

    Raises:
      FileExistsError: ``workdir`` already holds checkpoints or a ``config.json``.
      and everything ``interop.import_model`` raises.
    """
    import jax
    import numpy as np

    from broadface_jax import checkpointing, interop
    from broadface_jax import workdir as workdir_lib

    if checkpointing.latest_step(workdir) is not None:
        raise FileExistsError(f"--workdir={workdir!r} already holds checkpoints "
                              f"({checkpointing.checkpoint_dir(workdir)}); choose a new folder")
    recorded = os.path.join(checkpointing.absolute(workdir), workdir_lib.CONFIG_FILE)
    if os.path.exists(recorded):
        raise FileExistsError(f"--workdir={workdir!r} already holds a run's config ({recorded}); "
                              "choose a new folder")
    imported = interop.import_model(spec, config, with_classifier=with_classifier)
    params: dict = {"encoder": imported.params}
    if imported.classifier is not None:
        params["classifier"] = {"kernel": imported.classifier}
    tree = jax.tree.map(np.asarray, {"params": params, "batch_stats": imported.batch_stats})
    manager = checkpointing.create_manager(workdir, max_to_keep=None)
    checkpointing.save(manager, 0, tree, force=True)
    manager.wait_until_finished()
    manager.close()
    record = {
        "source": imported.source,
        "model": dict(config.model),
        "image_size": int(config.image_size),
        "classifier_rows": None if imported.classifier is None else int(imported.classifier.shape[0]),
        "fresh_leaves": imported.fresh,
        "folded_conv_bn": imported.folded,
        "checkpoint": os.path.join(checkpointing.checkpoint_dir(workdir), "0"),
    }
    if jax.process_index() == 0:
        with open(os.path.join(checkpointing.absolute(workdir), "import.json"), "w",
                  encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        workdir_lib.record_config(checkpointing.absolute(workdir), config)
    return record


def _define_flags() -> None:
    """The command-line flags, defined only when run as a program (importing stays flag-free)."""
    global _CONFIG, _FROM, _WORKDIR, _CLASSIFIER
    _CONFIG = cli.define_config_flag("Config whose model.* / image_size the weights are for.")
    _FROM = flags.DEFINE_string(
        "from", None, "Weights file: .pth / .pt / .onnx, or a comma list / glob of arcface_torch "
        "rank files checkpoint_gpu_*.pt.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (must not hold checkpoints yet).")
    _CLASSIFIER = flags.DEFINE_bool(
        "classifier", True, "Also write the softmax rows as the classifier when the files have them "
        "(their count must equal config.num_classes).")
    flags.mark_flags_as_required(["config", "from", "workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from broadface_jax import interop

    cli.quiet_third_party_logs()
    config = cli.load_config()
    try:
        record = convert(config, _FROM.value, _WORKDIR.value, _CLASSIFIER.value)
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        kind = type(e).__name__ if not isinstance(e, interop.ImportMismatch) else "mismatch"
        print(f"broadface_jax.convert: {kind}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    rows = record["classifier_rows"]
    print(f"imported {record['source']} as {record['model']['name']} -> {record['checkpoint']}"
          f"\n  classifier: {'%d rows' % rows if rows else 'none (encoder only)'}"
          f"\n  folded Conv+BN pairs: {record['folded_conv_bn']}"
          f"\n  leaves without a counterpart (fresh, seed {config.seed}): "
          f"{len(record['fresh_leaves'])}", flush=True)


def cli_main() -> None:
    """The ``broadface-convert`` console script: ``python -m broadface_jax.convert``."""
    _define_flags()
    cli.run(main)  # one-line flag errors, exit 2


if __name__ == "__main__":
    cli_main()
