"""The evaluation registry: target types, how a target name resolves, option checks, running targets.

A target is named in ``config.eval.targets`` (or ``broadface_jax.evaluate
--targets``) in one of three ways (:func:`resolve_target`):

* the name of a ``config.evals`` entry, as big_vision's ``config.evals``:
  ``c.evals.ijbc = dict(type="ijbc", root="/data/IJB_release/IJBC", flip=True)``
  (``type`` defaults to the entry's name; the other keys are the type's options);
* a type name, every option at its default: ``lfw_dev``, ``cfp_fp``, ``sop``;
* ``'<type>:<value>'``, setting the type's positional option:
  ``bin:agedb_30``, ``ijbc:/data/IJB_release/IJBC``, ``megaface:/data/megaface``.

Types live in :data:`TYPES`. Each is registered by the module that defines
its evaluator (``register(name, TargetType(build, options, ...))``): the
face-pair types in :mod:`.face_targets`, Recall@K in :mod:`.retrieval_targets`,
IJB / MegaFace / YTF in :mod:`.benchmark_targets`; ``broadface_jax.evaluation``
imports those modules, so importing anything of the package fills the
registry. This module imports none of them.

Adding an evaluator is one class and one ``register`` call in one module:
``__init__(name, config, options)`` (every option, defaults filled in) and
``run(embed_fn, out_dir=None) -> {metric: value}``, then
``register("mine", TargetType(MineEvaluator, {"option": default}))``.
Nothing else lists types or config fields: evaluators are built per run
(:class:`Evaluators`, owned by the trainer's run and by each ``evaluate``
call), so an evaluator may read any config field and never sees another
run's config.

Options are checked before anything runs: an unknown type or option, a
missing required one or a value of the wrong type is a :class:`TargetError`
naming the entry and option, with close matches (``config_check`` reports
them with the other config faults).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Mapping, Protocol, Sequence

from broadface_jax.evaluation.common import EmbedFn
from broadface_jax.suggest import did_you_mean as _suggest

REQUIRED = "<required>"  # an option default: the option must be given


class Evaluator(Protocol):
    """An evaluation target: ``run(embed_fn, out_dir=None) -> {metric: value}``."""

    name: str

    def run(self, embed_fn: EmbedFn, out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        ...


@dataclasses.dataclass(frozen=True)
class TargetType:
    """One kind of evaluation target: how to build its evaluator and which options it takes.

    ``options`` maps each option to its default (:data:`REQUIRED`: must be
    given); a given value must have the default's type (an int passes for a
    float, a list for a tuple). ``positional`` is the option that a
    ``'<type>:<value>'`` target string sets (``bin:agedb_30``, ``ijbc:/data/IJBC``).
    ``build(name, config, options)`` (an evaluator class, or a function) gets
    every option, defaults filled in.
    """

    build: Callable[[str, Any, dict[str, Any]], Evaluator]
    options: Mapping[str, Any]
    positional: str | None = None
    summary: str = ""
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)  # option -> allowed values


class TargetError(ValueError):
    """An evaluation target that cannot be built; ``problems`` lists each fault on its own."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A resolved evaluation target: its name (the key of the results), type and options."""

    name: str
    type: str
    options: Mapping[str, Any]
    where: str  # the config field it came from, for errors


#: type name -> :class:`TargetType`; filled by the target modules (module docstring).
TYPES: dict[str, TargetType] = {}


def register(type_name: str, target_type: TargetType) -> None:
    """Adds an evaluation type; called by the module that defines its evaluator, on import."""
    if type_name in TYPES:
        raise ValueError(f"evaluation type {type_name!r} is already registered")
    TYPES[type_name] = target_type


# ------------------------------------------------------------------ option checks
def _type_ok(value: Any, default: Any) -> bool:
    if default is REQUIRED or default is None:
        return value is not None
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def option_problems(spec: TargetSpec) -> list[str]:
    """Every fault of ``spec`` as ``'<where>.<option>=<value>: <why>'`` (empty when it is valid)."""
    if spec.type not in TYPES:
        return [f"{spec.where}: unknown evaluation type {spec.type!r}{_suggest(spec.type, TYPES)}; "
                f"known: {', '.join(TYPES)}"]
    kind = TYPES[spec.type]
    found = []
    for key, value in spec.options.items():
        if key not in kind.options:
            found.append(f"{spec.where}.{key}={value!r}: not an option of type {spec.type!r}"
                         f"{_suggest(key, kind.options)}; its options: {', '.join(kind.options) or 'none'}")
        elif not _type_ok(value, kind.options[key]):
            default = kind.options[key]
            want = "a value" if default is REQUIRED else f"a {type(default).__name__} like {default!r}"
            found.append(f"{spec.where}.{key}={value!r}: must be {want}")
        elif key in kind.choices and value not in kind.choices[key]:
            found.append(f"{spec.where}.{key}={value!r}: must be one of "
                         f"{', '.join(repr(c) for c in kind.choices[key])}{_suggest(value, kind.choices[key])}")
    for key, default in kind.options.items():
        if default is REQUIRED and key not in spec.options:
            found.append(f"{spec.where}.{key}: required by type {spec.type!r} (not set)")
    return found


def _entries(config: Any) -> Mapping[str, Any]:
    # A config read back from a workdir's config.json (restore.workdir_config) has no
    # `evals` when it was empty: workdir.flatten records leaves only. Optional data.
    return config.evals if "evals" in config else {}


def resolve_target(item: str, config: Any, where: str = "config.eval.targets") -> TargetSpec:
    """The :class:`TargetSpec` of one entry of ``config.eval.targets`` / ``--targets``.

    ``item`` is the name of a ``config.evals`` entry (``{type: ..., <options>}``;
    ``type`` defaults to the entry's name), a type name (all options default:
    ``lfw_dev``, ``synthetic``, ``sop``, ...) or ``'<type>:<value>'`` setting
    the type's positional option (``bin:agedb_30``, ``ijbc:/data/IJB_release/IJBC``).
    Options are checked here; the data is not touched.

    Raises:
      TargetError: (a ValueError) naming ``where`` (the entry / field), with close matches.
    """
    if not isinstance(item, str) or not item:
        raise TargetError([f"{where}={item!r}: a target must be a non-empty string"])
    entries = _entries(config)
    if item in entries:
        entry = entries[item]
        options = dict(entry.items()) if hasattr(entry, "items") else None
        if options is None:
            raise TargetError([f"config.evals.{item}={entry!r}: an entry must be a dict "
                               "{'type': ..., <options>}"])
        type_name = str(options.pop("type", item))
        spec = TargetSpec(item, type_name, options, f"config.evals.{item}")
    elif item in TYPES:
        spec = TargetSpec(item, item, {}, where)
        needs = [k for k, v in TYPES[item].options.items() if v is REQUIRED]
        if needs:
            raise TargetError([f"{where}={item!r}: type {item!r} needs {', '.join(needs)}: write "
                               f"'{item}:<{needs[0]}>' or name a config.evals entry of this type"])
    elif ":" in item and item.split(":", 1)[0] in TYPES:
        type_name, value = item.split(":", 1)
        kind = TYPES[type_name]
        if kind.positional is None:
            raise TargetError([f"{where}={item!r}: type {type_name!r} takes no ':<value>' "
                               "(define a config.evals entry for its options)"])
        if not value:
            raise TargetError([f"{where}={item!r}: empty {kind.positional} after '{type_name}:'"])
        spec = TargetSpec(item, type_name, {kind.positional: value}, where)
    else:
        head = item.split(":", 1)[0]
        names = sorted(set(TYPES) | set(entries))
        raise TargetError([f"{where}: unknown evaluation target {item!r}{_suggest(head, names)}; "
                           f"known types: {', '.join(TYPES)}"
                           + (f"; config.evals entries: {', '.join(entries)}" if entries else "")
                           + " (or '<type>:<path>', e.g. 'bin:agedb_30', 'ijbc:/data/IJB_release/IJBC')"])
    found = option_problems(spec)
    if found:
        raise TargetError(found)
    return spec


def target_problems(config: Any, targets: Any = None, field: str = "config.eval.targets") -> list[str]:
    """Every fault of ``config.eval.targets`` (or ``targets``, named ``field`` in messages), unraised."""
    targets = tuple(config.eval.targets) if targets is None else targets
    found = []
    for i, item in enumerate(targets):
        try:
            resolve_target(item, config, f"{field}[{i}]")
        except TargetError as e:
            found.extend(e.problems)
    return found


# ------------------------------------------------------------------ building and running
def build_evaluator(target: str | TargetSpec, config: Any) -> Evaluator:
    """A new evaluator of a target (:func:`resolve_target`) for ``config``; nothing is kept.

    Its data is read on its first ``run`` (or ``data()``), once. A run keeps
    its evaluators in an :class:`Evaluators`.
    """
    spec = target if isinstance(target, TargetSpec) else resolve_target(target, config)
    options = {k: v for k, v in TYPES[spec.type].options.items() if v is not REQUIRED}
    options.update({k: tuple(v) if isinstance(v, list) else v for k, v in spec.options.items()})
    return TYPES[spec.type].build(spec.name, config, options)


class Evaluators:
    """The evaluators of one run, each built on first use from that run's config and then kept.

    The trainer's run (``train._Run``) holds one for its life, so a target's
    images are read once however often the run evaluates; each
    :func:`run_targets` call without one (``broadface_jax.evaluate``) makes
    its own. Nothing is shared between two of them: two configs in one
    process get two evaluators, whatever config fields they read.
    """

    def __init__(self, config: Any):
        self.config = config
        self._built: dict[str, Evaluator] = {}

    def get(self, target: str | TargetSpec) -> Evaluator:
        """The evaluator of ``target`` (a name resolves against this run's config), built once."""
        spec = target if isinstance(target, TargetSpec) else resolve_target(target, self.config)
        if spec.name not in self._built:
            self._built[spec.name] = build_evaluator(spec, self.config)
        return self._built[spec.name]

    def run(self, names: str | Sequence[str], embed_fn: EmbedFn,
            out_dir: str | os.PathLike | None = None,
            progress: Callable[[str], Any] | None = None) -> dict[str, dict[str, float]]:
        """Runs each target of ``names`` (comma-separated or a sequence); ``{name: metrics}`` in order.

        Every target is resolved (and its options checked) before the first
        one runs, so a typo in the last target costs no evaluation time. With
        several processes every process must call this with the same targets
        (the embedding is shared, :mod:`.embedding`); all get the same
        results. ``progress(name)`` makes each target's progress reporter
        (``embedding.BarProgress`` / ``embedding.LogProgress``), open while
        the target runs.
        """
        from broadface_jax.evaluation import embedding  # noqa: PLC0415

        if isinstance(names, str):
            names = [n for n in names.split(",") if n]
        specs = [resolve_target(n, self.config, f"target {n!r}") for n in names]
        results = {}
        for spec in specs:
            with (embedding.reporting(progress(spec.name)) if progress is not None
                  else contextlib.nullcontext()):
                results[spec.name] = self.get(spec).run(embed_fn, out_dir)
        return results


def run_targets(names: str | Sequence[str], embed_fn: EmbedFn, config: Any,
                out_dir: str | os.PathLike | None = None,
                progress: Callable[[str], Any] | None = None) -> dict[str, dict[str, float]]:
    """``Evaluators(config).run(names, embed_fn, out_dir, progress)``: one call, its own evaluators."""
    return Evaluators(config).run(names, embed_fn, out_dir, progress)


# ------------------------------------------------------------------ reporting
def describe_types() -> str:
    """One line per registered type: name, summary, options with defaults (``evaluate --targets=list``)."""
    lines = []
    for name, kind in TYPES.items():
        opts = ", ".join(f"{k}={'<required>' if v is REQUIRED else repr(v)}" for k, v in kind.options.items())
        pos = f"  ('{name}:<{kind.positional}>')" if kind.positional else ""
        lines.append(f"{name}: {kind.summary}{pos}\n    options: {opts or 'none'}")
    return "\n".join(lines)


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A Markdown table: one row per target, one column per metric (first-seen order)."""
    columns: list[str] = []
    for metrics in results.values():
        for k in metrics:
            if k not in columns:
                columns.append(k)
    header = ["target"] + columns
    rows = [[name] + [f"{m[c]:.{digits}f}" if c in m else "-" for c in columns]
            for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
