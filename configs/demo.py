"""A BroadFace run that trains on a 2-core CPU in a few minutes.

Built-in synthetic identities (``broadface_jax.datasets.synthetic``: random
face-like patterns under random pose, light and noise; no files needed), a
small IResNet-18 (width 0.125) at 32x32, the BroadFace queue on, ArcFace
margin. Training starts from scratch (the paper starts from an ArcFace model;
a demo has none), so the learning rate is larger than the paper's fine-tuning
rate. At the end the run prints verification accuracy on synthetic
identities that training never saw (chance: 50%).

    python -m broadface_jax.main --config configs/demo.py --workdir runs/demo

Variants (``--config configs/demo.py:<variant>``):
  smoke      a few steps of a tiny run, for tests (accuracy is meaningless).
  arcface    the same run with the queue off (the baseline).
"""

import pathlib

import ml_collections

from broadface_jax.cli import config_from_file  # the one config loader (locked)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = config_from_file(pathlib.Path(__file__).with_name("default.py"))
    c.model.name = "iresnet18"
    c.model.width = 0.125
    c.model.embedding_dim = 64

    c.loss.s = 32.0
    c.loss.m2 = 0.3

    c.dataset.name = "synthetic"
    c.dataset.synthetic.num_identities = 200
    c.dataset.synthetic.heldout_identities = 100
    c.dataset.synthetic.samples_per_identity = 40
    c.num_classes = 200
    c.image_size = 32
    c.per_device_batch_size = 64
    c.dataset.random_flip = True

    c.queue.size_per_device = 512  # 8 batches
    c.queue.chunk_size = 512

    c.total_steps = 600
    c.lr = 0.1
    c.lr_boundaries = (400, 520)
    c.warmup_steps = 50
    c.grad_clip_norm = 0.0

    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    c.keep_checkpoints = 2
    c.eval_every_steps = 0  # only at the end
    c.eval.targets = ("synthetic",)
    c.eval.batch_size = 256

    if arg in (None, ""):
        pass
    elif arg == "smoke":
        c.model.embedding_dim = 16
        c.dataset.synthetic.num_identities = 16
        c.dataset.synthetic.heldout_identities = 8
        c.dataset.synthetic.samples_per_identity = 4
        c.num_classes = 16
        c.image_size = 16
        c.per_device_batch_size = 4
        c.queue.size_per_device = 8
        c.queue.chunk_size = 8
        c.total_steps = 3
        c.lr_boundaries = ()
        c.warmup_steps = 0
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.eval.batch_size = 64
    elif arg == "arcface":
        c.queue.size_per_device = 0
    else:
        raise ValueError(f"configs/demo.py: unknown variant {arg!r}; "
                         "expected '', 'smoke' or 'arcface'")
    return c
