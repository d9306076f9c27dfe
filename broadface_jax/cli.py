"""What every command-line entry point shares: the checked config and one-line failures.

``define_config_flag(help)`` defines ``--config`` (``configs/X.py[:variant]``
plus ``--config.FIELD=VALUE`` overrides, locked: an unknown field is an
error); ``load_config()`` reads it and checks it whole with ``config_check``
before the command does anything else, so a missing file, a field that does
not parse or a value out of range ends the command at once with one message
and :data:`EXIT_USAGE`, before any folder or file is made.
``fail(message, code)`` prints ``broadface_jax: <message>`` and exits.
``run(main)`` is ``absl.app.run`` with the command line parsed by
:func:`parse_flags`: a flag the parser refuses (an unknown flag, a
misspelt ``--config.FIELD`` with the closest field names suggested, a value
of the wrong type, a missing required flag) is one line and
:data:`EXIT_USAGE`, not absl's traceback or two-line ``FATAL`` message.

``config_from_file(path, arg)`` loads a config file the same way from
Python (tests, benchmarks, notebooks): ``get_config(arg)`` of the file,
locked.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as py_logging
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

EXIT_USAGE = 2  # a bad command line or config: nothing was written
#: The repository root: relative config paths not found from the working directory are
#: looked up here, so ``configs/demo.py`` works from anywhere in a checkout.
REPO = pathlib.Path(__file__).resolve().parents[1]


def define_config_flag(help_text: str, flag_name: str = "config"):
    """Defines ``--config`` as every entry point does (a locked config file flag)."""
    return config_flags.DEFINE_config_file(flag_name, None, help_text, lock_config=True)


def config_from_file(path: str | os.PathLike, arg: str | None = None):
    """``get_config(arg)`` of a config file, locked, as ``--config=path:arg`` loads it.

    ``path`` may carry the variant itself (``configs/demo.py:smoke``); a
    relative path is taken from the working directory, else from the
    repository root.

    Raises:
      FileNotFoundError: naming the path when there is no such file.
    """
    path = os.fspath(path)
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    file = pathlib.Path(path)
    if not file.is_file() and not file.is_absolute() and (REPO / file).is_file():
        file = REPO / file
    if not file.is_file():
        raise FileNotFoundError(f"no such config file {path!r}")
    spec = importlib.util.spec_from_file_location(f"broadface_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg not in (None, "") else module.get_config()
    config.lock()
    return config


def load_config(flag_name: str = "config"):
    """The ``--config`` value, checked whole (``config_check``) before anything else runs.

    Exits with :data:`EXIT_USAGE` and one message when the config file does
    not exist, does not load, or has invalid fields (each named with its
    value and what is allowed).
    """
    from broadface_jax import config_check

    given = config_flags.get_config_filename(flags.FLAGS[flag_name])
    filename = given.split(":", 1)[0]  # configs/X.py:variant
    if not os.path.isfile(filename):
        fail(f"--{flag_name}={given}: no such config file {filename!r}", EXIT_USAGE)
    try:
        config = flags.FLAGS[flag_name].value
    except Exception as e:  # the config file raised, or an override did not parse
        cause = e.__cause__ or e
        fail(f"--{flag_name}={given}: {type(cause).__name__}: {cause}", EXIT_USAGE)
    try:
        config_check.validate(config)
    except config_check.ConfigError as e:
        fail(f"--{flag_name}={given}: {e}", EXIT_USAGE)
    return config


def _config_fields(config: Any, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict (``model.width``, ``queue.size_per_device``)."""
    out = []
    for key in config.keys():
        path = f"{prefix}{key}"
        out.append(path)
        value = config[key]
        if hasattr(value, "keys") and hasattr(value, "lock"):
            out.extend(_config_fields(value, path + "."))
    return out


def _close_fields(field: str, fields: list[str]) -> list[str]:
    """Close matches of a misspelt field: its siblings first, else any field path."""
    parent, _, leaf = field.rpartition(".")
    siblings = {f.rpartition(".")[2]: f for f in fields if f.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=2, cutoff=0.75)
    if close:
        return [siblings[c] for c in close]
    return difflib.get_close_matches(field, fields, n=2, cutoff=0.8)


def _config_file_arg(argv: Sequence[str], flag_name: str) -> str | None:
    """The ``--config`` file argument on a command line (``configs/X.py[:variant]``)."""
    for i, arg in enumerate(argv):
        if arg in (f"--{flag_name}", f"-{flag_name}") and i + 1 < len(argv):
            return argv[i + 1]
        for dash in ("--", "-"):
            if arg.startswith(f"{dash}{flag_name}="):
                return arg.split("=", 1)[1]
    return None


def _overrides(argv: Sequence[str], flag_name: str) -> list[tuple[str, str, str]]:
    """``(argument as given, field, value)`` of every ``--config.FIELD[=VALUE]``."""
    out = []
    for i, arg in enumerate(argv):
        for dash in ("--", "-"):
            head = f"{dash}{flag_name}."
            if arg.startswith(head):
                field, eq, value = arg[len(head):].partition("=")
                if not eq and i + 1 < len(argv):
                    value, arg = argv[i + 1], f"{arg} {argv[i + 1]}"
                out.append((arg, field, value))
                break
    return out


def flag_error_message(error: BaseException, argv: Sequence[str],
                       flag_name: str = "config") -> str:
    """One line for a command line the flag parser refused.

    An override of a field the config does not have names the argument and
    the closest field names; an override whose value does not parse as the
    field's type names the argument, the field's type and the parser's
    reason; anything else is the parser's own message on one line.
    """
    text = " ".join(str(error).replace("\\n", " ").split())
    if isinstance(error, (AttributeError, KeyError)):
        text = text.strip("'\"")
    overrides = _overrides(argv, flag_name)
    config = None
    if overrides:
        given = _config_file_arg(argv, flag_name)
        if given:
            try:
                config = config_from_file(given)
            except Exception:  # the file itself is at fault: say what the parser said
                config = None
    if config is not None:
        fields = _config_fields(config)
        for arg, field, value in overrides:
            if field not in fields:
                close = _close_fields(field, fields)
                hint = (f" (did you mean {' or '.join(repr(c) for c in close)}?)"
                        if close else "")
                return f"{arg}: no such config field {field!r}{hint}"
        for arg, field, value in overrides:
            if f"{flag_name}.{field}=" in text or f"'{flag_name}.{field}'" in text:
                node = config
                for part in field.split("."):
                    node = node[part]
                if hasattr(node, "keys"):
                    return (f"{arg}: config.{field} is a group of fields; set them one by "
                            f"one (--{flag_name}.{field}.NAME=VALUE)")
                reason = text.split(": ", 1)[-1] if text.startswith("flag ") else text
                return (f"{arg}: {value!r} is not a valid {type(node).__name__} for "
                        f"config.{field} (now {node!r}): {reason}")
    if text.startswith("flag "):  # absl: "flag --x=v: reason"
        text = text[len("flag "):]
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """``absl.flags.FLAGS(argv)`` with any refusal turned into one line and exit 2.

    ml_collections raises ``AttributeError`` / ``KeyError`` for an unknown
    override field and absl ``flags.Error`` for a bad value or flag; each
    ends the command with :func:`flag_error_message` and :data:`EXIT_USAGE`.
    """
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        fail(flag_error_message(e, argv), EXIT_USAGE)
        raise  # not reached


def run(main: Callable[[list[str]], Any],
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
    """``absl.app.run(main)`` with :func:`parse_flags` (one-line flag errors, exit 2).

    ``flags_parser``: one that rewrites the command line and then calls
    :func:`parse_flags` (:func:`workdir_config_parser`).
    """
    app.run(main, flags_parser=flags_parser)


def fail(message: str, code: int) -> None:
    """One readable message on stderr, then exit ``code``."""
    logging.flush()
    print(f"broadface_jax: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ------------------------------------------------- --config from the workdir (read-only commands)

#: A config file whose ``get_config(workdir)`` is the config ``<workdir>/config.json`` records.
WORKDIR_CONFIG_FILE = str(pathlib.Path(__file__).with_name("workdir_config.py"))
_CONFIG_FROM_WORKDIR: dict[str, str] = {}  # flag name -> the workdir whose config.json was read


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def recorded_config_dir(path: str | None) -> str | None:
    """The run folder whose ``config.json`` describes ``path`` (a workdir, its checkpoints, a step)."""
    if not path or "://" in path:
        return path or None
    p = pathlib.Path(path).absolute()
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / "config.json").is_file():
            return str(candidate)
    return None


def workdir_config_parser(sources: tuple[str, ...] = ("checkpoint", "workdir"),
                          flag_name: str = "config"):
    """An ``app.run`` ``flags_parser`` that makes ``--config`` optional.

    Without ``--config`` on the command line, the config the run recorded
    (``config.json`` of the first of ``--checkpoint`` / ``--workdir`` given,
    found in it or in a folder above a step folder) is loaded instead, as if
    ``--config`` had named it: ``--config.FIELD=VALUE`` overrides still
    apply. :func:`load_config_for_run` then refuses model fields that differ
    from the run's.
    """
    def parse(argv: list[str]) -> list[str]:
        args = list(argv)
        given = any(a == f"--{flag_name}" or a.startswith(f"--{flag_name}=") for a in args[1:])
        if not given:
            for source in sources:
                run = recorded_config_dir(_flag_value(args[1:], source))
                if run:
                    args.insert(1, f"--{flag_name}={WORKDIR_CONFIG_FILE}:{run}")
                    _CONFIG_FROM_WORKDIR[flag_name] = run
                    break
        return parse_flags(args)

    return parse


def load_config_for_run(run: str | None, flag_name: str = "config"):
    """:func:`load_config`, for a command on a run (``evaluate``, ``embed``, ``export``).

    ``--config`` absent: the run's recorded config (see
    :func:`workdir_config_parser`); absent with no recorded config: one line
    asking for it. ``--config`` given and ``run`` recording a config: the
    fields that give the encoder its shape (``model.*``, ``image_size``)
    must be the run's, else one line per field (``model.width: workdir
    0.125, given 1.0``) and :data:`EXIT_USAGE`. Evaluation fields (targets,
    batch size, data folders) may differ.
    """
    from broadface_jax import restore  # noqa: PLC0415

    if flags.FLAGS[flag_name].value is None and not flags.FLAGS[flag_name].present:
        if run and "://" not in run and not os.path.exists(run):
            fail(f"{run}: no such run folder (--workdir / --checkpoint)", EXIT_USAGE)
        where = f" ({run} records no config.json)" if run else ""
        fail(f"--{flag_name} is required{where}: give configs/X.py[:variant] describing the "
             "model, or --workdir of a run that recorded its config", EXIT_USAGE)
    config = load_config(flag_name)
    recorded_run = _CONFIG_FROM_WORKDIR.get(flag_name) or recorded_config_dir(run)
    if recorded_run:  # also catches --config.model.* overrides of a recorded config
        try:
            recorded = restore.read_recorded(recorded_run)
        except (OSError, ValueError) as e:
            fail(str(e), EXIT_USAGE)
        differences = restore.model_differences(recorded, config)
        if differences:
            fail(f"--{flag_name} describes another model than the one in {recorded_run} "
                 f"({restore.config_path(recorded_run)}); leave --{flag_name} out to use the "
                 "run's, or make these fields agree:\n  " + "\n  ".join(differences),
                 EXIT_USAGE)
    return config


# ------------------------------------------------- a few lines, not a log dump (read-only commands)


class _OwnLinesOnly(py_logging.Filter):
    """Keeps broadface_jax's own log records and every ERROR; drops other libraries' INFO/WARNING."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.ERROR:
            return True
        return "/broadface_jax/" in record.pathname.replace("\\", "/")


def quiet_third_party_logs(flag_name: str = "verbosity") -> bool:
    """Hides other libraries' INFO / WARNING lines unless ``--verbosity`` was given; True if hidden.

    For the commands that only read a run (``evaluate``, ``embed``,
    ``export``, ``convert``, ``prepare``): orbax's "Given directory is read
    only" and manager options, JAX's backend probing, TensorFlow's C++
    notices (oneDNN; ``TF_CPP_MIN_LOG_LEVEL``, so call this before
    TensorFlow is imported) and Python warnings. Errors always show. Orbax's
    INFO chatter stays off either way (``checkpointing.quiet_orbax_logging``).
    """
    from broadface_jax import checkpointing  # noqa: PLC0415

    checkpointing.quiet_orbax_logging()
    if flag_name in flags.FLAGS and flags.FLAGS[flag_name].present:
        return False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    py_logging.captureWarnings(True)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnLinesOnly) for f in handler.filters):
        handler.addFilter(_OwnLinesOnly())
    return True
