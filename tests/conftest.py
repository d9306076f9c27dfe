"""Test configuration: 8 fake CPU devices, set before JAX initialises.

Also what makes the suite safe to run in parallel (``make test`` runs
``pytest -n 2 --dist loadfile``, pytest-xdist; pytest.ini registers the
``slow`` mark): every xdist worker is its own Python process that imports
this file before any test module, so each worker sets the device count before
its own JAX starts. The flag is set, not appended: a worker inherits the
controller's environment (already holding the flag) and must not get it
twice; another device count a user put in ``XLA_FLAGS`` is replaced, as the
tests assume 8. Tests share no fixed paths (``tmp_path`` is per worker); the
evaluation cache under ``~/.cache/broadface_jax/eval`` is written atomically
(temporary file + ``os.replace``), so two workers building the same entry
both end with a complete file.

Random inputs are reproducible: ``np.random.default_rng()`` called without a
seed draws from ``default_rng([seed, crc32(test id), k])`` for the k-th such
call of the test being set up or run. ``seed`` is fresh for each worker
process, or ``$BROADFACE_TEST_SEED``, and a failing test's report names it::

    numpy seed: unseeded np.random.default_rng() calls drew from seed 123456;
    rerun with BROADFACE_TEST_SEED=123456

The patch is installed for the whole process (not per test) so that module-
and session-scoped fixtures, which pytest sets up before any function-scoped
fixture, draw from it too: they are built during the setup of the first test
that uses them (with ``--dist loadfile`` the same test on every run), under
that test's id. Outside any test's setup or call (imports, collection) the
call is NumPy's own: scipy draws at import; test inputs must not be drawn
there.
"""

import os
import re

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    re.sub(rf"{_DEVICE_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).split() + [f"{_DEVICE_FLAG}=8"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import itertools  # noqa: E402
import pathlib  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SEED_ENV = "BROADFACE_TEST_SEED"

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The read-only real face data beside the repository (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


_SEED = int(os.environ.get(SEED_ENV, "0")) or 1 + int.from_bytes(os.urandom(4), "little") % 10**6
_current_test: dict = {"id": None, "calls": None}
_original_default_rng = np.random.default_rng


def _default_rng(*args, **kwargs):
    """Unseeded ``np.random.default_rng()`` -> ``default_rng([seed, crc32(test id), k])``."""
    if (not args or args[0] is None) and not kwargs:
        if _current_test["id"] is None:  # imports (scipy draws at import), collection
            return _original_default_rng(*args, **kwargs)
        return _original_default_rng([_SEED, zlib.crc32(_current_test["id"].encode()),
                                      next(_current_test["calls"])])
    return _original_default_rng(*args, **kwargs)


np.random.default_rng = _default_rng


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture of this test, module- and session-scoped ones included.
    _current_test.update(id=item.nodeid, calls=itertools.count())
    item.numpy_seed = _SEED


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _current_test.update(id=None, calls=None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "numpy_seed", None)
    if report.failed and seed is not None:
        report.sections.append((
            "numpy seed", f"unseeded np.random.default_rng() calls drew from seed {seed}; "
                          f"rerun with {SEED_ENV}={seed}"))

