"""The evaluation image cache (broadface_jax.evaluation.cache): keys, rebuilds, folder choice, clearing."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections
import numpy as np

from broadface_jax.evaluation import cache


@dataclasses.dataclass(frozen=True)
class _Faces:
    images: np.ndarray
    labels: np.ndarray


def _builder(rng, calls):
    def build() -> _Faces:
        calls.append(1)
        return _Faces(rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8), rng.integers(0, 9, 3))

    return build


def test_entry_is_built_once_per_key_and_rebuilt_when_unreadable(tmp_path, caplog):
    rng, calls = np.random.default_rng(), []
    build = _builder(rng, calls)
    first = cache.cached(str(tmp_path), "lfw dev", ["a", b"\x01"], build, _Faces)
    again = cache.cached(str(tmp_path), "lfw dev", ["a", b"\x01"], build, _Faces)
    assert len(calls) == 1  # the second call read the file
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    (entry,) = os.listdir(tmp_path)
    assert entry.startswith("lfw_dev-") and entry.endswith(".npz")

    other = cache.cached(str(tmp_path), "lfw dev", ["a", b"\x02"], build, _Faces)  # another key part
    assert len(calls) == 2 and len(os.listdir(tmp_path)) == 2
    assert not np.array_equal(other.images, first.images)
    cache.cached(str(tmp_path), "lfw dev", ["ab", "c"], build, _Faces)
    cache.cached(str(tmp_path), "lfw dev", ["a", "bc"], build, _Faces)  # parts are delimited: another key
    assert len(calls) == 4 and len(os.listdir(tmp_path)) == 4

    path = tmp_path / entry
    path.write_bytes(path.read_bytes()[:100])  # a partial write
    with caplog.at_level(logging.WARNING):
        rebuilt = cache.cached(str(tmp_path), "lfw dev", ["a", b"\x01"], build, _Faces)
    assert len(calls) == 5 and "ignoring unreadable evaluation cache" in caplog.text and entry in caplog.text
    with np.load(path) as z:  # replaced by a complete file
        np.testing.assert_array_equal(z["images"], rebuilt.images)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

    cache.cached(None, "lfw dev", ["a", b"\x01"], build, _Faces)  # no folder: built, nothing written
    assert len(calls) == 6 and len(os.listdir(tmp_path)) == 4


def test_folder_choice_and_clearing(tmp_path, monkeypatch):
    config = ml_collections.ConfigDict({"eval": {"cache_dir": ""}})
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_path(config) == str(tmp_path / "env")
    config.eval.cache_dir = str(tmp_path / "configured")
    assert cache.cache_path(config) == str(tmp_path / "configured")  # the config wins
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_path(None) == os.path.join(os.path.expanduser("~"), ".cache", "broadface_jax", "eval")

    folder = cache.cache_dir(config)  # created
    assert folder == str(tmp_path / "configured") and os.path.isdir(folder)
    (tmp_path / "configured" / "a.npz").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "configured" / "notes.txt").write_text("kept")
    assert cache.clear_cache(config) == f"evaluation cache {folder}: removed 1 files (3.0 MiB)"
    assert os.listdir(folder) == ["notes.txt"]
    config.eval.cache_dir = str(tmp_path / "none")
    assert cache.clear_cache(config) == f"evaluation cache {tmp_path / 'none'}: nothing there"

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    config.eval.cache_dir = str(blocked / "sub")
    assert cache.cache_dir(config) is None  # caching off, the evaluation still runs


def test_module_digest_is_the_source_files_sha1():
    import hashlib

    from broadface_jax import align

    with open(align.__file__, "rb") as f:
        assert cache.module_digest("broadface_jax.align") == hashlib.sha1(f.read()).digest()
