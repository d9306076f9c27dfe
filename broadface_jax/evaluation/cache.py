"""The evaluation image cache: a target's decoded / aligned images kept on disk as an ``.npz``.

The folder is ``config.eval.cache_dir`` if the config has that field, else
``$BROADFACE_EVAL_CACHE``, else ``~/.cache/broadface_jax/eval``
(:func:`cache_path`). An entry's file name hashes what made it (the
protocol files, the image list, the alignment code: ``key_parts`` of
:func:`cached`), so a change to any of them makes a new entry; a partial or
unreadable file is rebuilt, and files are written atomically (temporary file,
then ``os.replace``), so processes building the same entry at once each end
with a complete file. ``broadface_jax.evaluate --clear_cache`` runs
:func:`clear_cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import re
from typing import Any, Callable

import numpy as np

#: Environment variable naming the evaluation cache folder (``config.eval.cache_dir`` wins).
CACHE_ENV = "BROADFACE_EVAL_CACHE"


def cache_path(config: Any = None) -> str:
    """The evaluation cache folder: ``config.eval.cache_dir``, ``$BROADFACE_EVAL_CACHE`` or the default."""
    configured = config.eval.cache_dir if config is not None else ""  # None: no config at hand
    return configured or os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "broadface_jax", "eval")


def clear_cache(config: Any = None) -> str:
    """Deletes the evaluation cache's ``.npz`` files (nothing else); returns what it did, one line."""
    path = cache_path(config)
    if not os.path.isdir(path):
        return f"evaluation cache {path}: nothing there"
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz")]
    size = sum(os.path.getsize(f) for f in files)
    for f in files:
        os.remove(f)
    return f"evaluation cache {path}: removed {len(files)} files ({size / 2**20:.1f} MiB)"


def cache_dir(config: Any) -> str | None:
    """The cache folder, created; ``None`` (caching off, with a warning) when it cannot be."""
    path = cache_path(config)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        logging.warning("evaluation image cache disabled: cannot create %s (%s)", path, e)
        return None
    return path


def file_digest(path: str) -> bytes:
    """SHA-1 of a file's bytes (a cache key part)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def module_digest(module_name: str) -> bytes:
    """SHA-1 of a module's source file, so that a change to e.g. the alignment code makes new entries."""
    return file_digest(importlib.import_module(module_name).__file__)


def cached(folder: str | None, name: str, key_parts: list[bytes | str],
           build: Callable[[], Any], cls: type) -> Any:
    """``build()``'s result (a dataclass ``cls`` of arrays), from ``<folder>/<name>-<hash>.npz`` if there.

    Built and stored when the file is missing or unreadable; ``folder=None``
    builds without caching.
    """
    if folder is None:
        return build()
    h = hashlib.sha1()
    for part in key_parts:
        h.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        h.update(b"\0")
    path = os.path.join(folder, f"{re.sub(r'[^A-Za-z0-9_]+', '_', name)}-{h.hexdigest()[:16]}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})
        except Exception as e:  # a partial / corrupt cache file: rebuild it
            logging.warning("ignoring unreadable evaluation cache %s (%s)", path, e)
    data = build()
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, **dataclasses.asdict(data))
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("could not write evaluation cache %s (%s)", path, e)
    return data
