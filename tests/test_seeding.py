"""The suite's reproducible randomness (tests/conftest.py): unseeded
``np.random.default_rng()`` draws from ``default_rng([seed, crc32(test id), k])``,
in module-scoped fixtures too (they are set up before function-scoped ones,
which is how a CI failure's seed once went unrecorded)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import tests.conftest as conftest_module


def _expected(test_id: str, k: int) -> np.ndarray:
    seed = conftest_module._SEED
    return np.random.Generator(np.random.PCG64([seed, zlib.crc32(test_id.encode()), k])).random(4)


@pytest.fixture(scope="module")
def module_draw(request):
    return np.random.default_rng().random(4)


def test_module_fixture_draws_from_the_recorded_seed(request, module_draw):
    # Built during this (the first) test's setup, under its id, as call 0.
    np.testing.assert_array_equal(module_draw, _expected(request.node.nodeid, 0))
    # The test's own first unseeded draw is the next call of the same test.
    np.testing.assert_array_equal(np.random.default_rng().random(4), _expected(request.node.nodeid, 1))
    assert request.node.numpy_seed == conftest_module._SEED


def test_each_test_has_its_own_stream(request, module_draw):
    np.testing.assert_array_equal(np.random.default_rng().random(4), _expected(request.node.nodeid, 0))
    assert not np.array_equal(np.random.default_rng().random(4), module_draw)


def test_seeded_calls_are_untouched():
    np.testing.assert_array_equal(np.random.default_rng(7).random(3),
                                  np.random.Generator(np.random.PCG64(7)).random(3))
