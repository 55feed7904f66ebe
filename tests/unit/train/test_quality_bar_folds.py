"""benchmarks/quality_bar.py never tunes on the photos it tests on (nested selection)."""

from __future__ import annotations

import pytest
from support import import_benchmark


@pytest.fixture(scope="module")
def qb():
    return import_benchmark("quality_bar")


def test_every_photo_is_tested_once(qb):
    tests = [t for _, t in qb.photo_folds()]
    assert sorted(p for t in tests for p in t) == sorted(qb.PHOTOS)


@pytest.mark.parametrize("k", range(4))
def test_inner_folds_never_see_the_outer_test_photos(qb, k):
    _, test = qb.photo_folds()[k]
    inner = qb.inner_folds(k)
    assert len(inner) == qb.N_FOLDS - 1
    for val, held_out in inner:
        assert set(held_out) == set(test)  # kept out of the inner train split
        assert not set(val) & set(test)  # and out of the inner val split
    vals = [p for v, _ in inner for p in v]
    assert len(vals) == len(set(vals))  # the inner val sets are disjoint
