"""BroadFace for image retrieval (paper section 4.3, Table 5, Fig. 7).

An ImageNet-trained ResNet-50 with a 512-d embedding, ArcFace (s=64, m=0.5)
as the baseline and BroadFace with a 32k queue and compensation, trained on
the standard retrieval splits (``broadface_jax/datasets/retrieval.py``) with
the protocol of Song et al. (2016) as in the authors' release
(kakaoenterprise/BroadFace: ``run_stanford.py``, ``run_inshop.py``):
images resized to 256x256, random resized crops to 224 (area 0.16-1, aspect
0.75-1.33) and flips for training, the centre 224 crop for evaluation,
ImageNet mean/std; Adam, lr 1e-4 for the encoder and the classifier, L2
weight decay 1e-5, batch 128, 100 epochs with lr x0.2 after epochs 40, 60
and 80; Recall@K of the test protocol every 10 epochs and at the end.

    python -m broadface_jax.prepare --dataset sop \\
        --manual_dir /data/Stanford_Online_Products --data_dir /data/tfds
    python -m broadface_jax.main --config configs/retrieval.py:sop \\
        --config.dataset.data_dir=/data/tfds \\
        --config.init_from=<ImageNet ResNet-50> --workdir runs/sop_broadface

ImageNet initialisation: ``config.init_from`` is empty here (training would
start from a random ResNet-50, which is not the paper's setting). Pass
either torchvision's ``resnet50-*.pth`` (``ResNet50_Weights.IMAGENET1K_V1``
or ``_V2``) once ``config.init_from`` accepts a ``.pth`` (the torchvision
import of ``broadface_jax/interop``), or the workdir of a run whose encoder is
this ResNet-50 (an orbax checkpoint); keep ``config.init_classifier=False``
(the classifier rows are new). The torchvision weights expect ImageNet
normalisation, which ``dataset.normalize='imagenet'`` gives.

Variants (``--config configs/retrieval.py:<variant>``):
  sop, inshop, cub200, cars196            BroadFace, queue 32,000, compensation
  sop_arcface, inshop_arcface, ...        the ArcFace baseline (queue off)
  <variant>,smoke                         the same data set with a tiny ResNet-50
                                          (width 1/16, 32x32 crops of 40x40) for a
                                          few steps: tests and a first check
The queue is per device (``queue.size_per_device``): the paper's 32k is for
its total, so divide 32,000 by the number of devices when you use several.
"""

import math
import pathlib

import ml_collections

from broadface_jax.cli import config_from_file  # the one config loader (locked)

# TFDS short name -> (training images, training classes, evaluation target)
DATASETS = {
    "sop": (59_551, 11_318, "sop"),
    "inshop": (25_882, 3_997, "inshop"),
    "cub200": (5_864, 100, "cub200"),
    "cars196": (8_054, 98, "cars196"),
}
EPOCHS = 100
LR_DECAY_EPOCHS = (40, 60, 80)
EVAL_EVERY_EPOCHS = 10
BATCH = 128
QUEUE = 32_000


def _variants() -> list[str]:
    names = [f"{d}{s}" for d in DATASETS for s in ("", "_arcface")]
    return names + [f"{n},smoke" for n in names]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "sop").split(",") if p]
    name, modifiers = (parts[0] if parts else "sop"), parts[1:]
    arcface = name.endswith("_arcface")
    dataset = name[: -len("_arcface")] if arcface else name
    if dataset not in DATASETS or any(m != "smoke" for m in modifiers) or len(modifiers) > 1:
        raise ValueError(f"configs/retrieval.py: unknown variant {arg!r}; expected one of "
                         f"{', '.join(_variants())}")
    images, classes, target = DATASETS[dataset]

    c = config_from_file(pathlib.Path(__file__).with_name("default.py"))
    c.model.name = "resnet50"
    c.model.embedding_dim = 512
    c.model.width = 1.0

    c.loss.name = "arcface"
    c.loss.s = 64.0
    c.loss.m2 = 0.5

    c.queue.size_per_device = 0 if arcface else QUEUE
    c.queue.compensate = True
    c.queue.chunk_size = 4000

    c.num_classes = classes  # printed by broadface_jax.prepare (metadata num_classes)
    c.per_device_batch_size = BATCH
    c.image_size = 224
    c.dataset.name = "tfds"
    c.dataset.tfds_name = dataset
    c.dataset.split = "train"
    c.dataset.data_dir = ""  # the --data_dir given to broadface_jax.prepare
    c.dataset.random_flip = True
    c.dataset.augment = "retrieval"
    c.dataset.normalize = "imagenet"
    c.dataset.resize_to = 256
    c.dataset.crop_scale = (0.16, 1.0)
    c.dataset.crop_ratio = (0.75, 1.33)

    steps_per_epoch = images / BATCH
    c.total_steps = int(math.ceil(EPOCHS * steps_per_epoch))
    c.lr = 1e-4
    c.lr_boundaries = tuple(int(round(e * steps_per_epoch)) for e in LR_DECAY_EPOCHS)
    c.lr_decay = 0.2
    c.warmup_steps = 0
    for part in (c.optimizer.encoder, c.optimizer.classifier):
        part.name = "adam"
        part.weight_decay = 1e-5  # L2 added to the gradient, as torch.optim.Adam(weight_decay=...)
        part.lr_scale = 1.0

    c.init_from = ""  # ImageNet ResNet-50: see the module docstring
    c.init_classifier = False

    c.log_every_steps = 50
    c.checkpoint_every_steps = int(round(EVAL_EVERY_EPOCHS * steps_per_epoch))
    c.keep_checkpoints = 2
    c.eval_every_steps = int(round(EVAL_EVERY_EPOCHS * steps_per_epoch))
    c.eval.targets = (target,)
    c.eval.batch_size = 128

    if modifiers == ["smoke"]:
        c.model.width = 1 / 16
        c.model.embedding_dim = 16
        c.image_size = 32
        c.dataset.resize_to = 40
        c.per_device_batch_size = 2
        c.queue.size_per_device = 0 if arcface else 8
        c.queue.chunk_size = 8
        c.lr = 1e-3
        c.total_steps = 3
        c.lr_boundaries = ()
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.eval_every_steps = 0
        c.eval.batch_size = 16
    return c
