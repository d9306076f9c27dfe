"""The suite's one config builder, ``tiny_config(preset, **overrides)``: locked.

Not in conftest.py: worker processes of the multi-process and fault tests
import it, and conftest.py sets ``XLA_FLAGS`` (8 devices) on import, which
would override the device count a worker was started with.
"""

from __future__ import annotations

import pathlib

STEP_CLASSES, STEP_EMBED_DIM, STEP_IMAGE = 11, 6, 8  # the "step" preset's sizes
RUN_EMBED_DIM = 8  # the "run" preset's embedding size

_PRESETS = {
    "default": {},  # configs/default.py as it is
    # A whole training run: BroadFace on 16x16 synthetic faces, 8 devices x 2
    # images, a queue of 2 batches, no evaluation, metrics every step.
    "run": {
        "model.embedding_dim": RUN_EMBED_DIM, "loss.s": 16.0, "loss.m2": 0.3,
        "dataset.name": "synthetic", "dataset.synthetic.num_identities": 12,
        "dataset.synthetic.heldout_identities": 6, "dataset.synthetic.samples_per_identity": 4,
        "num_classes": 12, "image_size": 16, "per_device_batch_size": 2,
        "queue.size_per_device": 4, "queue.chunk_size": 4, "total_steps": 4, "lr": 0.05,
        "lr_boundaries": (), "log_every_steps": 1, "checkpoint_every_steps": 2,
        "keep_checkpoints": 10, "eval_every_steps": 0, "eval.targets": (), "eval.batch_size": 16,
    },
    # The train step alone (tests/test_train_step.py's float64 references).
    "step": {
        "num_classes": STEP_CLASSES, "image_size": STEP_IMAGE, "model.embedding_dim": STEP_EMBED_DIM,
        "per_device_batch_size": 4, "queue.size_per_device": 8, "queue.chunk_size": 4, "lr": 0.05,
    },
}


def tiny_config(preset: str = "run", **overrides):
    """The suite's one config builder: configs/default.py shrunk for CPU tests, locked.

    ``preset``: "run" (a whole training run), "step" (the train step alone) or
    "default" (configs/default.py unchanged),
    see ``_PRESETS``. ``overrides``: field paths with ``__`` for ``.``
    (``queue__size_per_device=16``). The config comes back locked, so a
    misspelt override or a later ``config.quue.size = 4`` raises instead of
    silently adding a field the code never reads.
    """
    from broadface_jax import cli

    config = cli.config_from_file(pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py")
    config.lock()
    fields = dict(_PRESETS[preset])
    fields.update({key.replace("__", "."): value for key, value in overrides.items()})
    for path, value in fields.items():
        node = config
        *parents, leaf = path.split(".")
        for name in parents:
            node = getattr(node, name)
        if leaf not in node:
            raise KeyError(f"tiny_config: no field {path!r} in configs/default.py")
        setattr(node, leaf, value)
    return config
