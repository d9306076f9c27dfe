"""Losses by name: margin softmax losses on L2-normalised embeddings and classifier rows.

``config.loss.name`` picks a loss from :data:`REGISTRY`; ``losses.build(config.loss)``
returns a :class:`~broadface_jax.losses.core.Loss` whose ``per_example`` is used
for **both** BroadFace terms: the batch (Eqs. 8-9) in ``train_step.py`` and every
chunk of compensated queue rows (Eq. 9) in ``queue.py``. A loss added here is
therefore BroadFace's queue loss as well.

Adding a loss = one module in this package + one line in :data:`REGISTRY`. The
module defines a logits function::

    logits(cos, onehot, cos_y, state, *, s, <its fields>) -> f32[N, C]

``cos`` f32[N, C] are the cosines between the normalised embeddings and the
normalised classifier rows, ``onehot`` bool[N, C] marks each row's label,
``cos_y`` f32[N] is the cosine at the label (taken with the mask: no gather
along the class axis, so a class-sharded classifier needs no change), and
``state`` is the loss's state (``{}`` for a stateless loss). It returns the
scaled logits of every class, the label's included; the per-example loss is the
softmax cross-entropy at the label, padding classes excluded
(``core.Loss.per_example``). A stateful loss also names ``init_state() ->
pytree`` and ``update_state(state, cos_y) -> pytree``: the state lives in
``TrainState.loss_state`` (checkpointed and resumed with the rest), is updated
once per step from the batch's target cosines, and the updated state scores the
batch and the queue of that step.

Fields: ``config.loss.s`` (the scale, used by every loss) and the
hyperparameters the registry entries declare (:class:`Hyperparameter`: default
and allowed range; today ``m1``, ``m2``, ``m3``). ``configs/default.py`` makes
one ``config.loss`` field per declared name (:func:`hyperparameter_names`),
None by default: None takes the loss's default, ``config_check`` checks a set
value against the chosen loss's range, and a field that the chosen loss does
not use must stay None (:func:`field_problems`): setting ``m1`` for ArcFace is
an error naming the field, its value and the loss, not a silently ignored
number. A loss with a new hyperparameter is its module and its registry line;
nothing else lists the fields.

This module is light (no JAX): ``config_check`` reads the names and fields
from it. The JAX parts are imported on first use (``losses.build``,
``losses.l2_normalize``, ``losses.scale_gradient``, ...).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A loss hyperparameter: its default and allowed range (``config_check`` asks it)."""

    default: float
    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False


def _m1(default: float) -> Hyperparameter:  # angle multiplier, > 0
    return Hyperparameter(default, 0.0, low_open=True)


def _m2(default: float) -> Hyperparameter:  # additive angular margin, in [0, pi)
    return Hyperparameter(default, 0.0, math.pi, high_open=True)


def _m3(default: float) -> Hyperparameter:  # additive cosine margin, in [0, 2)
    return Hyperparameter(default, 0.0, 2.0, high_open=True)


#: ``config.loss.s``, used by every loss: the scale of the logits.
SCALE = Hyperparameter(64.0, 0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Where a loss lives and which hyperparameters it uses (default and range of each)."""

    module: str  # module in this package ('margin'), or a dotted module path elsewhere
    logits: str  # its logits function
    fields: Mapping[str, Hyperparameter]  # hyperparameters it uses besides s
    init_state: str | None = None  # stateful losses: () -> pytree
    update_state: str | None = None  # (state, cos_y f32[N]) -> state
    doc: str = ""


#: name -> LossSpec. ``s`` is used by every loss and is not listed. Each name in
#: a ``fields`` mapping is a ``config.loss`` field (``configs/default.py`` makes one
#: per name, None by default); ``config_check`` checks a set value against the
#: chosen loss's range and refuses one the loss does not use.
REGISTRY: dict[str, LossSpec] = {
    "arcface": LossSpec("margin", "arcface", {"m2": _m2(0.5)},
                        doc="s * cos(theta_y + m2) (Deng et al. 2019)"),
    "cosface": LossSpec("margin", "cosface", {"m3": _m3(0.35)},
                        doc="s * (cos(theta_y) - m3) (Wang et al. 2018)"),
    "combined": LossSpec("margin", "combined", {"m1": _m1(1.0), "m2": _m2(0.3), "m3": _m3(0.2)},
                         doc="s * (cos(m1 * theta_y + m2) - m3) (insightface)"),
    "curricularface": LossSpec("curricularface", "logits", {"m2": _m2(0.5)},
                               init_state="init_state", update_state="update_state",
                               doc="ArcFace target, hard negatives cos(t + cos) with t an EMA "
                                   "of the positive cosine (Huang et al. 2020)"),
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def hyperparameter_names() -> tuple[str, ...]:
    """Every hyperparameter any registered loss uses besides ``s``: the optional
    ``config.loss`` fields (None = the chosen loss's default), sorted."""
    return tuple(sorted({f for spec in REGISTRY.values() for f in spec.fields}))


def _get(loss_config: Any, name: str) -> Any:
    if isinstance(loss_config, Mapping):
        return loss_config.get(name)
    return getattr(loss_config, name, None)


def field_problems(loss_config: Any) -> list[str]:
    """Hyperparameters set in ``loss_config`` that its loss does not use, as
    ``'config.loss.<field>=<value>: ...'`` lines (empty for an unknown name:
    the name check reports that)."""
    name = _get(loss_config, "name")
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        return []
    used = ", ".join(["s", *spec.fields])
    out = []
    for field in hyperparameter_names():
        value = _get(loss_config, field)
        if value is not None and field not in spec.fields:
            out.append(f"config.loss.{field}={value!r}: loss {name!r} does not use {field} "
                       f"(it uses {used}); leave it unset (None) or choose a loss that uses it")
    return out


def resolve(loss_config: Any) -> tuple[str, dict[str, float]]:
    """(name, {'s': ..., each used hyperparameter: its value or default}).

    Raises:
      ValueError: an unknown name, or a hyperparameter set that the loss ignores
        (the message names the field, its value and the loss).
    """
    name = _get(loss_config, "name")
    if name not in REGISTRY:
        raise ValueError(f"config.loss.name={name!r} is not a known loss; expected one of "
                         + ", ".join(repr(n) for n in REGISTRY))
    problems = field_problems(loss_config)
    if problems:
        raise ValueError("; ".join(problems))
    spec = REGISTRY[name]
    fields = {"s": float(_get(loss_config, "s"))}
    for field, hyper in spec.fields.items():
        value = _get(loss_config, field)
        fields[field] = float(hyper.default if value is None else value)
    return name, fields


def spec_function(spec: LossSpec, attr: str | None):
    """The function named ``attr`` in the spec's module (imports it).

    ``spec.module`` is a module of this package (``'margin'``) or, with a dot,
    any importable module (``'mypkg.my_loss'``): a loss defined elsewhere.
    """
    if attr is None:
        return None
    module = spec.module if "." in spec.module else f"{__name__}.{spec.module}"
    return getattr(importlib.import_module(module), attr)


# The JAX API, imported on first use (PEP 562) so that this package stays light.
_LAZY = {
    "build": "core", "Loss": "core", "l2_normalize": "core", "scale_gradient": "core",
    "softmax_cross_entropy": "core",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
