"""What every command-line entry point shares: the checked config and one-line failures.

``load_config()`` reads ``--config`` (``configs/X.py[:variant]`` plus
``--config.FIELD=VALUE`` overrides) and checks it whole with
``config_check`` before the command does anything else, so a missing file,
a field that does not parse or a value out of range ends the command at once
with one message and :data:`EXIT_USAGE`, before any folder or file is made.
``fail(message, code)`` prints ``broadface_jax: <message>`` and exits.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

EXIT_USAGE = 2  # a bad command line or config: nothing was written


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
