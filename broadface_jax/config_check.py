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
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

from broadface_jax.suggest import did_you_mean as _suggest

OPTIMIZER_NAMES = ("sgd", "adam")
CLASSIFIER_SHARDINGS = ("replicated", "model", "all")
DATASET_KINDS = ("tfds", "synthetic")
#: Smallest input side each backbone family reduces to >= 1x1 (total stride).
MIN_IMAGE_SIZE = {"resnet50": 32}
DEFAULT_MIN_IMAGE_SIZE = 16


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


def problems(config: Any) -> list[str]:
    """Every invalid field as ``'config.<field>=<value>: <what is allowed>'``."""
    found: list[str] = []

    def check(dotted: str, rule: Callable[[Any], str | None]) -> None:
        present, value = _field(config, dotted)
        if not present:
            return  # configs written for older versions; the code using it says so
        why = rule(value)
        if why:
            found.append(f"config.{dotted}={value!r}: {why}")

    from broadface_jax import models

    model_names = sorted(models.REGISTRY)
    check("seed", _int_at_least(0))
    check("model.name", _one_of(model_names))
    check("model.embedding_dim", _int_at_least(1))
    check("model.width", _number(0, lo_open=True))
    check("model.dropout", _number(0, 1, hi_open=True))
    check("model.dtype", _one_of(("float32", "bfloat16")))
    check("model.batch_norm", _one_of(models.BATCH_NORM_MODES))

    from broadface_jax import losses  # light: the loss modules load on demand

    check("loss.name", _one_of(losses.names()))
    check("loss.s", _number(0, lo_open=True))
    check("loss.m1", _optional(_number(0, lo_open=True)))
    check("loss.m2", _optional(_number(0, math.pi, hi_open=True)))
    check("loss.m3", _optional(_number(0, 2, hi_open=True)))
    present, loss_config = _field(config, "loss")
    if present:
        found.extend(losses.field_problems(loss_config))

    check("queue.size_per_device", _int_at_least(0, " (0 = no queue: plain ArcFace/CosFace)"))
    check("queue.compensate", _bool)
    check("queue.chunk_size", _int_at_least(0, " (0 = unchunked)"))
    check("queue.matmul_dtype", _one_of(("float32", "bfloat16")))
    check("queue.prefill_steps", _int_at_least(0, " (0 = the queue starts empty)"))

    check("num_classes", lambda v: None if _is_int(v) and (v == 0 or v >= 2) else
          "must be an integer >= 2, or 0 to take it from the data set's metadata")
    check("per_device_batch_size", _int_at_least(1))
    _, name = _field(config, "model.name")
    min_size = MIN_IMAGE_SIZE.get(name, DEFAULT_MIN_IMAGE_SIZE)
    check("image_size", _int_at_least(min_size, f" (the smallest input {name!r} reduces "
                                                "to at least 1x1)"))
    _, q = _field(config, "queue.size_per_device")
    _, b = _field(config, "per_device_batch_size")
    if _is_int(q) and _is_int(b) and q > 0 and b > 0 and q % b:
        found.append(f"config.queue.size_per_device={q}: must be a multiple of "
                     f"config.per_device_batch_size={b} (the ring buffer writes whole batches)")

    check("dataset.name", _one_of(DATASET_KINDS))
    check("dataset.random_flip", _bool)
    check("dataset.split", lambda v: None if isinstance(v, str) and v else
          "must be a non-empty split name")
    _, kind = _field(config, "dataset.name")
    if kind == "tfds":
        _, data_dir = _field(config, "dataset.data_dir")
        present, tfds_name = _field(config, "dataset.tfds_name")
        if present:
            names = _data_set_names(str(data_dir or ""))
            if tfds_name not in names:
                where = f" or prepared in {data_dir!r}" if data_dir else ""
                found.append(
                    f"config.dataset.tfds_name={tfds_name!r}: not one of broadface_jax's "
                    f"data sets{where}{_suggest(tfds_name, names)}; known: {', '.join(names)}")
    elif kind == "synthetic":
        check("dataset.synthetic.num_identities", _int_at_least(2))
        check("dataset.synthetic.heldout_identities", _int_at_least(0))
        check("dataset.synthetic.samples_per_identity", _int_at_least(1))

    check("total_steps", _int_at_least(1))
    check("lr", _number(0, lo_open=True))
    check("lr_boundaries", _boundaries)
    check("lr_decay", _number(0, lo_open=True))
    check("warmup_steps", _int_at_least(0))
    for part in ("encoder", "classifier"):
        check(f"optimizer.{part}.name", _one_of(OPTIMIZER_NAMES))
        check(f"optimizer.{part}.momentum", _number(0, 1, hi_open=True))
        check(f"optimizer.{part}.weight_decay", _number(0))
        check(f"optimizer.{part}.lr_scale", _number(0))
    check("grad_clip_norm", _number(0))

    check("mesh.data", lambda v: None if _is_int(v) and (v == -1 or v >= 1) else
          "must be -1 (all devices not used by 'model') or an integer >= 1")
    check("mesh.model", _int_at_least(1))
    check("classifier_sharding", _one_of(CLASSIFIER_SHARDINGS))
    check("classifier.sample_rate", _number(0, 1, lo_open=True))

    check("init_from", _string)
    check("init_classifier", _bool)
    check("restore_step", _int_at_least(0, " (0 = the latest checkpoint)"))
    check("allow_resume_changes", _string)
    check("start_over", _bool)

    for field in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        check(field, lambda v: None if _is_int(v) else
              "must be an integer number of steps (0 or less: only at the end)")
    check("profile_steps", _int_at_least(0, " (0 = no profile)"))
    check("keep_checkpoints", _int_at_least(0, " (0 = keep all)"))
    check("eval.targets", _targets)
    found.extend(_target_problems(config))
    check("eval.batch_size", _int_at_least(1))
    check("eval.data_root", _string)
    check("eval.bin_dir", _string)
    check("eval.cache_dir", _string)
    return found


def validate(config: Any) -> None:
    """Raises :class:`ConfigError` listing every invalid field (see the module doc)."""
    found = problems(config)
    if found:
        plural = "s" if len(found) > 1 else ""
        raise ConfigError(f"config has {len(found)} invalid field{plural}:\n  "
                          + "\n  ".join(found))
