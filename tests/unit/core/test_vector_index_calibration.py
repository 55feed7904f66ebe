"""Calibration with byte-identical copies, no input copy on build, usearch reload parameters."""

from __future__ import annotations

import tempfile
import tracemalloc

import numpy as np
import pytest

from keeper_core.vector_index import IndexParams, VectorIndex, build

SPEC = "s"


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("backend", ["faiss", "usearch"])
def test_calibration_with_byte_identical_copies(one_torch_thread: None, backend: str) -> None:
    # Every image three times (copies share an image_id): a tied copy is no miss, and the held-out
    # queries have no twin in the graph, so the recorded recall is what novel queries get.
    rng = np.random.default_rng(0)
    c = _norm(rng.standard_normal((50, 64)))
    base = _norm(c[rng.integers(0, 50, 3000)] + 0.35 * _norm(rng.standard_normal((3000, 64))))
    x = np.repeat(base, 3, axis=0)
    ids = [f"d{i}" for i in range(len(x))]
    index = build(x, ids, model_spec=SPEC, params=IndexParams(backend=backend))
    assert index.meta.recall_at_10 is not None
    assert index.meta.recall_at_10 >= 0.95
    assert index.meta.params.ef_search is not None
    assert index.meta.params.ef_search <= 256
    q = _norm(c[rng.integers(0, 50, 300)] + 0.35 * _norm(rng.standard_normal((300, 64))))
    got = index.search(q, 10, model_spec=SPEC)
    s = q @ x.T
    kth = np.sort(s, axis=1)[:, -10]
    found = np.array([[s[i, int(u[1:])] for u in row] for i, row in enumerate(got.ids)])
    tie_recall = float((found >= kth[:, None] - 1e-5).mean())
    assert tie_recall >= 0.93  # 300 queries: the mean wanders ~0.01-0.02
    assert abs(tie_recall - index.meta.recall_at_10) < 0.03


def test_exact_build_makes_no_copy_of_the_input(one_torch_thread: None) -> None:
    x = _norm(np.random.default_rng(1).standard_normal((20_000, 256)))
    tracemalloc.start()
    try:
        build(x, [f"i{i}" for i in range(len(x))], model_spec=SPEC)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * x.nbytes


def test_usearch_keeps_ef_construction_after_load(one_torch_thread: None) -> None:
    x = _norm(np.random.default_rng(2).standard_normal((500, 32)))
    index = build(
        x,
        [f"u{i}" for i in range(500)],
        model_spec=SPEC,
        params=IndexParams(backend="usearch", ef_construction=40),
    )
    with tempfile.TemporaryDirectory() as d:
        index.save(d)
        assert VectorIndex.load(d)._impl.index.expansion_add == 40
