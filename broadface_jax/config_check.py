"""Checks a whole config in one pass, before anything is written.

``validate(config)`` looks at every field of ``configs/default.py`` whose
value can be wrong on its own (a type, a range, a name) and raises one
:class:`ConfigError` that lists every field at fault, with its value and
what is allowed::

    config has 2 invalid fields:
      config.queue.chunk_size=-2: must be an integer >= 0 (0 = unchunked)
      config.loss.name='arcfase': must be one of 'arcface', 'cosface', 'combined', 'curricularface' (did you mean 'arcface'?)

It runs in milliseconds and imports neither TensorFlow nor a model: the
entry points call it before the workdir, ``metrics.jsonl`` or TensorBoard
files exist, so a typo costs a second, not a minute of start-up. Checks that
need the devices (mesh shape, queue shards, memory per device, the kept
checkpoints of ``restore_step``) run next, still before anything is written
(``train.check_before_writing``), and raise the same :class:`ConfigError`.

A data set name (``dataset.tfds_name``) must be one of this package's
builders or a data set already prepared in ``dataset.data_dir``; close
matches are suggested among those names only.

Every rule on a config field lives here, once (:func:`rules`, and the rules
across fields); the names and options come from the registries that own them
(``models``, ``losses`` with each loss's declared hyperparameters, ``optim``,
``input_pipeline``, ``datasets``, ``evaluation``). Code that needs a field
valid calls :func:`check` with the fields it reads (``models.build_encoder``,
``train_step.validate_config`` / ``build_optimizer``,
``train.Schedule.from_config``, the input pipeline) and raises the same line.
A field missing from a config is an error: every config starts from
``configs/default.py``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

from broadface_jax.suggest import did_you_mean as _suggest

CLASSIFIER_SHARDINGS = ("replicated", "model", "all")
DATASET_KINDS = ("tfds", "synthetic")
#: config.queue.matmul_dtype: the dtype of the inputs of the queue's products (queue.py).
QUEUE_MATMUL_DTYPES = ("float32", "bfloat16")
#: The parts with their own optimizer (``config.optimizer.<part>``).
PARTS = ("encoder", "classifier")


class ConfigError(ValueError):
    """One or more config fields are invalid; the message lists each of them."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(choices: Iterable[str]) -> Callable[[Any], str | None]:
    choices = tuple(choices)

    def check(v: Any) -> str | None:
        if v in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}{_suggest(v, choices)}"

    return check


def _int_at_least(lo: int, note: str = "") -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if _is_int(v) and v >= lo:
            return None
        return f"must be an integer >= {lo}{note}"

    return check


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        ok = _is_number(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if ok:
            return None
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            where = f"in {left}, {right}"
        elif lo is not None:
            where = f"{'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            where = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            where = "finite"
        return f"must be a finite number {where}"

    return check


def _optional(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        why = None if v is None else rule(v)
        return f"{why} or None (the loss's default)" if why else None

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True or False"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _boundaries(v: Any) -> str | None:
    if isinstance(v, str) or not isinstance(v, (tuple, list)):
        return ("must be a tuple of increasing positive step numbers, e.g. "
                "--config.lr_boundaries='(50000, 70000)' or '()'")
    if not all(_is_int(b) and b > 0 for b in v):
        return ("must hold positive integer step numbers, e.g. "
                "--config.lr_boundaries='(50000, 70000)'")
    if any(b >= a for b, a in zip(v, v[1:])) and len(v) > 1:
        return "must be strictly increasing"
    return None


def _targets(v: Any) -> str | None:
    if isinstance(v, str) or not isinstance(v, (tuple, list)):
        return "must be a tuple of target names, e.g. \"('lfw_dev', 'cfp_fp')\" or '()'"
    if not all(isinstance(t, str) and t for t in v):
        return "must hold non-empty target names"
    return None


def _target_problems(config: Any) -> list[str]:
    """Each target of ``config.eval.targets`` and each ``config.evals`` entry: type and options.

    The evaluation registry resolves them (no data is read); its messages name
    the entry and option at fault, with close matches.
    """
    from broadface_jax import evaluation  # light: NumPy only

    present, names = _field(config, "eval.targets")
    names = tuple(names) if present and _targets(names) is None else ()
    found = evaluation.target_problems(config, names)
    _, entries = _field(config, "evals")
    for name in (entries or {}):
        if name not in names:  # not run, but a typo in it is still an error
            found += evaluation.target_problems(config, (name,))
    return found


def _field(config: Any, dotted: str) -> tuple[bool, Any]:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False, None
    return True, node


def _data_set_names(data_dir: str) -> list[str]:
    """Our builders' names plus the data sets prepared in ``data_dir``."""
    from broadface_jax import datasets  # light: builder modules load on demand

    names = set(datasets.known_names())
    if data_dir and "://" not in data_dir and os.path.isdir(data_dir):
        names.update(d for d in os.listdir(data_dir)
                     if os.path.isdir(os.path.join(data_dir, d)) and not d.startswith("."))
    return sorted(names)


def _pair(lo: float, hi: float | None, what: str) -> Callable[[Any], str | None]:
    """(a, b) with lo < a <= b (<= hi): a random resized crop's range."""
    bound = f"0 < lo <= hi <= {hi:g}" if hi is not None else "0 < lo <= hi"

    def check(v: Any) -> str | None:
        ok = (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v)
              and lo < v[0] <= v[1] and (hi is None or v[1] <= hi))
        return None if ok else f"must be (lo, hi) with {bound} ({what})"

    return check


def _hyperparameter(h: Any) -> Callable[[Any], str | None]:
    """The range rule of a loss hyperparameter declared in ``losses.REGISTRY``."""
    return _number(h.low, h.high, lo_open=h.low_open, hi_open=h.high_open)


def rules(config: Any) -> list[tuple[str, Callable[[Any], str | None]]]:
    """(dotted field, rule) for every field of ``configs/default.py`` checked on its own.

    A rule maps the value to ``None`` (fine) or what is allowed. Some depend on
    other fields (the smallest ``image_size`` on ``model.name``, a loss's
    hyperparameters on ``loss.name``, the synthetic sizes on ``dataset.name``).
    The names and options come from the registries that own them: encoders
    and dtypes (``models``), losses and their hyperparameters (``losses``),
    optimizers (``optim``), augmentations and normalisations
    (``input_pipeline``), data sets (``datasets``).
    """
    from broadface_jax import input_pipeline, losses, models, optim  # light: no JAX

    _, model_name = _field(config, "model.name")
    min_size = models.min_image_size(model_name)
    out: list[tuple[str, Callable[[Any], str | None]]] = [
        ("seed", _int_at_least(0)),
        ("model.name", _one_of(sorted(models.REGISTRY))),
        ("model.embedding_dim", _int_at_least(1)),
        ("model.width", _number(0, lo_open=True)),
        ("model.dropout", _number(0, 1, hi_open=True)),
        ("model.dtype", _one_of(models.DTYPES)),
        ("model.batch_norm", _one_of(models.BATCH_NORM_MODES)),
        ("loss.name", _one_of(losses.names())),
        ("loss.s", _hyperparameter(losses.SCALE)),
    ]
    _, loss_name = _field(config, "loss.name")
    spec = losses.REGISTRY.get(loss_name) if isinstance(loss_name, str) else None
    for name in losses.hyperparameter_names():  # unused ones: losses.field_problems
        if spec is not None and name in spec.fields:
            out.append((f"loss.{name}", _optional(_hyperparameter(spec.fields[name]))))
        else:
            out.append((f"loss.{name}", lambda v: None))  # present; unused: field_problems
    out += [
        ("queue.size_per_device", _int_at_least(0, " (0 = no queue: plain ArcFace/CosFace)")),
        ("queue.compensate", _bool),
        ("queue.chunk_size", _int_at_least(0, " (0 = unchunked)")),
        ("queue.matmul_dtype", _one_of(QUEUE_MATMUL_DTYPES)),
        ("queue.prefill_steps", _int_at_least(0, " (0 = the queue starts empty)")),
        ("num_classes", lambda v: None if _is_int(v) and (v == 0 or v >= 2) else
         "must be an integer >= 2, or 0 to take it from the data set's metadata"),
        ("per_device_batch_size", _int_at_least(1)),
        ("image_size", _int_at_least(min_size, f" (the smallest input {model_name!r} reduces "
                                               "to at least 1x1)")),
        ("dataset.name", _one_of(DATASET_KINDS)),
        ("dataset.tfds_name", _string),
        ("dataset.data_dir", _string),
        ("dataset.split", lambda v: None if isinstance(v, str) and v else
         "must be a non-empty split name"),
        ("dataset.random_flip", _bool),
        ("dataset.augment", _one_of(input_pipeline.AUGMENTATIONS)),
        ("dataset.normalize", _one_of(input_pipeline.NORMALIZATIONS)),
    ]
    _, image_size = _field(config, "image_size")
    out += [
        ("dataset.resize_to", lambda v: None if _is_int(v) and _is_int(image_size)
         and v >= image_size else f"must be an integer >= config.image_size ({image_size!r})"),
        ("dataset.crop_scale", _pair(0.0, 1.0, "area fraction")),
        ("dataset.crop_ratio", _pair(0.0, None, "aspect ratio w/h")),
    ]
    _, kind = _field(config, "dataset.name")
    if kind == "synthetic":
        out += [
            ("dataset.synthetic.num_identities", _int_at_least(2)),
            ("dataset.synthetic.heldout_identities", _int_at_least(0)),
            ("dataset.synthetic.samples_per_identity", _int_at_least(1)),
        ]
    out += [
        ("total_steps", _int_at_least(1)),
        ("lr", _number(0, lo_open=True)),
        ("lr_boundaries", _boundaries),
        ("lr_decay", _number(0, lo_open=True)),
        ("warmup_steps", _int_at_least(0)),
    ]
    for part in PARTS:
        out += [
            (f"optimizer.{part}.name", _one_of(optim.names())),
            (f"optimizer.{part}.momentum", _number(0, 1, hi_open=True)),
            (f"optimizer.{part}.weight_decay", _number(0)),
            (f"optimizer.{part}.lr_scale", _number(0)),
        ]
    out += [
        ("grad_clip_norm", _number(0)),
        ("mesh.data", lambda v: None if _is_int(v) and (v == -1 or v >= 1) else
         "must be -1 (all devices not used by 'model') or an integer >= 1"),
        ("mesh.model", _int_at_least(1)),
        ("classifier_sharding", _one_of(CLASSIFIER_SHARDINGS)),
        ("classifier.sample_rate", _number(0, 1, lo_open=True)),
        ("init_from", _string),
        ("init_classifier", _bool),
        ("restore_step", _int_at_least(0, " (0 = the latest checkpoint)")),
        ("allow_resume_changes", _string),
        ("start_over", _bool),
    ]
    for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        out.append((field, lambda v: None if _is_int(v) else
                    "must be an integer number of steps (0 or less: only at the end)"))
    out += [
        ("profile_steps", _int_at_least(0, " (0 = no profile)")),
        ("keep_checkpoints", _int_at_least(0, " (0 = keep all)")),
        ("eval.targets", _targets),
        ("eval.batch_size", _int_at_least(1)),
        ("eval.data_root", _string),
        ("eval.bin_dir", _string),
        ("eval.cache_dir", _string),
        ("eval.tfds_data_dir", _string),
    ]
    return out


def ring_buffer_problem(queue_per_device: Any, batch_per_device: Any) -> str | None:
    """The queue is written a whole batch at a time: its size must be a multiple of the batch."""
    q, b = queue_per_device, batch_per_device
    if _is_int(q) and _is_int(b) and q > 0 and b > 0 and q % b:
        return (f"config.queue.size_per_device={q}: must be a multiple of "
                f"config.per_device_batch_size={b} (the ring buffer writes whole batches)")
    return None


def _across_fields(config: Any) -> list[tuple[tuple[str, ...], Callable[[], list[str]]]]:
    """Rules on several fields (or on the registries' own checks): (fields, problems)."""

    def ring() -> list[str]:
        why = ring_buffer_problem(_field(config, "queue.size_per_device")[1],
                                  _field(config, "per_device_batch_size")[1])
        return [why] if why else []

    def normalize() -> list[str]:
        _, augment = _field(config, "dataset.augment")
        _, norm = _field(config, "dataset.normalize")
        if augment == "face" and norm == "imagenet":  # an unknown name: its own rule
            return [f"config.dataset.normalize={norm!r}: needs config.dataset.augment="
                    "'retrieval' (the face pipeline normalises to [-1, 1])"]
        return []

    def data_set() -> list[str]:
        _, kind = _field(config, "dataset.name")
        _, tfds_name = _field(config, "dataset.tfds_name")
        if kind != "tfds" or not isinstance(tfds_name, str):
            return []
        _, data_dir = _field(config, "dataset.data_dir")
        names = _data_set_names(str(data_dir or ""))
        if tfds_name in names:
            return []
        where = f" or prepared in {data_dir!r}" if data_dir else ""
        return [f"config.dataset.tfds_name={tfds_name!r}: not one of broadface_jax's "
                f"data sets{where}{_suggest(tfds_name, names)}; known: {', '.join(names)}"]

    def loss_fields() -> list[str]:
        from broadface_jax import losses  # noqa: PLC0415

        present, loss_config = _field(config, "loss")
        return losses.field_problems(loss_config) if present else []

    return [
        (("loss",), loss_fields),
        (("queue.size_per_device", "per_device_batch_size"), ring),
        (("dataset.tfds_name", "dataset.name", "dataset.data_dir"), data_set),
        (("dataset.augment", "dataset.normalize"), normalize),
        (("eval.targets", "evals"), lambda: _target_problems(config)),
    ]


def _selected(dotted: str, only: Iterable[str] | None) -> bool:
    return only is None or any(dotted == p or dotted.startswith(p + ".") for p in only)


def problems(config: Any, only: Iterable[str] | None = None) -> list[str]:
    """Every invalid field as ``'config.<field>=<value>: <what is allowed>'``.

    ``only``: dotted fields or groups (``'queue'``, ``'model.dtype'``) to check
    (None: all); a rule on several fields runs when all of them are. A field
    missing from ``config`` is a problem too (every config starts from
    ``configs/default.py``, which has them all).
    """
    only = None if only is None else tuple(only)
    found: list[str] = []
    for dotted, rule in rules(config):
        if not _selected(dotted, only):
            continue
        present, value = _field(config, dotted)
        if not present:
            parent, _, leaf = dotted.rpartition(".")
            found.append(f"config{'.' + parent if parent else ''} has no field {leaf!r} "
                         "(configs/default.py lists every field)")
            continue
        why = rule(value)
        if why:
            found.append(f"config.{dotted}={value!r}: {why}")
    for fields, rule in _across_fields(config):
        if all(_selected(f, only) for f in fields):
            found.extend(rule())
    return found


def check(config: Any, only: Iterable[str] | None = None) -> None:
    """:func:`validate` of the fields in ``only`` (see :func:`problems`)."""
    found = problems(config, only)
    if found:
        plural = "s" if len(found) > 1 else ""
        raise ConfigError(f"config has {len(found)} invalid field{plural}:\n  "
                          + "\n  ".join(found))


def validate(config: Any) -> None:
    """Raises :class:`ConfigError` listing every invalid field (see the module doc)."""
    check(config)
