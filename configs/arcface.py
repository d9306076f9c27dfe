"""ArcFace baseline: the paper's recipe with the BroadFace queue switched off.

Everything else (IResNet-100, s=64, m=0.5, 128 images per device, SGD) is the
default config, so the only difference from a BroadFace run is
``queue.size_per_device = 0``. The paper warm-starts BroadFace from such a
model: train this, then point ``--config.init_from`` of a BroadFace run
(``configs/default.py``) at this run's workdir.

Variants (``--config configs/arcface.py:<variant>``):
  r50        IResNet-50 backbone.
"""

import pathlib

import ml_collections

from broadface_jax.cli import config_from_file  # the one config loader (locked)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = config_from_file(pathlib.Path(__file__).with_name("default.py"))
    c.queue.size_per_device = 0  # BroadFace off: plain ArcFace
    if arg in (None, ""):
        pass
    elif arg == "r50":
        c.model.name = "iresnet50"
    else:
        raise ValueError(f"configs/arcface.py: unknown variant {arg!r}; "
                         "expected '' or 'r50'")
    return c
