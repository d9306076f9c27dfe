"""What every command-line entry point shares: the checked config and one-line failures.

``define_config_flag(help)`` defines ``--config`` (``configs/X.py[:variant]``
plus ``--config.FIELD=VALUE`` overrides, locked: an unknown field is an
error); ``load_config()`` reads it and checks it whole with ``config_check``
before the command does anything else, so a missing file, a field that does
not parse or a value out of range ends the command at once with one message
and :data:`EXIT_USAGE`, before any folder or file is made.
``fail(message, code)`` prints ``broadface_jax: <message>`` and exits.

``config_from_file(path, arg)`` loads a config file the same way from
Python (tests, benchmarks, notebooks): ``get_config(arg)`` of the file,
locked.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

from absl import flags, logging
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


def fail(message: str, code: int) -> None:
    """One readable message on stderr, then exit ``code``."""
    logging.flush()
    print(f"broadface_jax: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
