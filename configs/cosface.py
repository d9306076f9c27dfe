"""BroadFace with the CosFace margin: s * (cos(theta) - m3), s=64, m3=0.35.

The CosFace paper uses m=0.35; insightface's arcface_torch uses 0.4
(``:m04``). The queue stays on (BroadFace); ``:baseline`` turns it off for
the plain CosFace comparison.

Variants (``--config configs/cosface.py:<variant>``):
  m04        margin 0.4 (insightface's CosFace setting).
  baseline   queue off: plain CosFace.
"""

import pathlib

import ml_collections

from broadface_jax.cli import config_from_file  # the one config loader (locked)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = config_from_file(pathlib.Path(__file__).with_name("default.py"))
    c.loss.name = "cosface"
    c.loss.s = 64.0
    c.loss.m3 = 0.35  # m1, m2 stay unset: CosFace does not use them
    if arg in (None, ""):
        pass
    elif arg == "m04":
        c.loss.m3 = 0.4
    elif arg == "baseline":
        c.queue.size_per_device = 0
    else:
        raise ValueError(f"configs/cosface.py: unknown variant {arg!r}; "
                         "expected '', 'm04' or 'baseline'")
    return c
