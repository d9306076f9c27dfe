"""``get_config(workdir)``: the config a run recorded in ``<workdir>/config.json``.

The read-only commands (``evaluate``, ``embed``, ``export``) load it as their
``--config`` when none is given (``cli.workdir_config_parser``), so
``--config.FIELD=VALUE`` overrides apply to it as to a config file.
"""

from broadface_jax import restore


def get_config(workdir: str):
    return restore.workdir_config(workdir)
