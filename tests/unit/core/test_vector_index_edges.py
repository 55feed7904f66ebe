"""HNSW edges: a search for k near the row count, and a table of few distinct vectors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from keeper_core import vector_index
from keeper_core.vector_index import IndexParams, VectorIndex, build

SPEC = "s"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one build thread: the same graph


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, dim: int) -> np.ndarray:
    """A photo library's shape: n // 10 subjects, each a tight burst of shots."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(n // 10, dim))
    return _norm(centers[rng.integers(0, len(centers), n)] + 0.05 * rng.normal(size=(n, dim)))


def _copies(groups: int, copies: int, dim: int = 32) -> np.ndarray:
    """``groups`` distinct unit vectors, each ``copies`` times byte-identical, grouped."""
    base = _norm(np.random.default_rng(groups).normal(size=(groups, dim)))
    return np.repeat(base, copies, axis=0)


@pytest.mark.parametrize(("backend", "n", "dim"), [("faiss", 1000, 16), ("usearch", 2000, 8)])
def test_a_search_for_every_row_answers_rows_the_graph_cannot_reach(
    backend: str, n: int, dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph at m=4 over clustered rows leaves a row or two unreachable at any ef (measured
    here: faiss finds 998 of 1,000, usearch 1,999 of 2,000); k = len raised 'raise ef_search',
    and /v1/search, which fetches up to the row count when filters pass few rows, answered 500."""
    x = _clustered(n, dim)
    ids = [f"u{i}" for i in range(n)]
    index = build(x, ids, model_spec=SPEC, params=IndexParams(backend=backend, dtype="f32", m=4))
    assert index.meta.recall_at_10 is not None  # calibrated: searched through its graph
    raw = index._raw_search(x[:4], n, 1 << 16)[0]
    assert (raw < 0).any(), "the graph reaches every row now: this test needs other data"
    monkeypatch.setattr(vector_index, "_ROW_BLOCK", 1024)  # usearch's scan: two blocks of rows
    got = index.search(x[:4], n, model_spec=SPEC)
    for q, row in enumerate(got.ids):
        assert sorted(row) == sorted(ids), q
    truth = np.sort(x[:4] @ x.T, axis=1)[:, ::-1]
    np.testing.assert_allclose(got.scores, truth, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "usearch"])
def test_a_short_graph_answer_is_replaced_by_an_exact_one(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the queries the graph answered short are scanned; the others keep the graph's."""
    n = 400
    x = _norm(np.random.default_rng(1).normal(size=(n, 16)))
    index = build(
        x,
        [f"r{i}" for i in range(n)],
        model_spec=SPEC,
        params=IndexParams(backend=backend, dtype="f32"),
    )
    assert index.meta.recall_at_10 is not None
    graph_search = index._impl.search

    def short_on_odd_queries(q: np.ndarray, k: int, ef: int | None) -> tuple[Any, Any]:
        labels, scores = graph_search(q, k, ef)
        labels[1::2, -1] = -1  # as a graph answers when it cannot reach k rows
        return labels, scores

    monkeypatch.setattr(index._impl, "search", short_on_odd_queries)
    monkeypatch.setattr(vector_index, "_QUERY_BLOCK", 2)  # the 3 scanned queries: two passes
    q = x[:6]
    k = 25
    got = index.search(q, k, model_spec=SPEC)
    s = q @ x.T
    for i, row in enumerate(got.ids):
        assert len(row) == k
        if i % 2:  # scanned: the exact top k, in order
            assert row == [f"r{j}" for j in np.argsort(-s[i], kind="stable")[:k]], i
            np.testing.assert_allclose(got.scores[i], np.sort(s[i])[::-1][:k], atol=1e-5)
    graph = graph_search(q[::2], k, index.ef_search)[0]  # rows in the index's own order
    assert [got.ids[i] for i in range(0, 6, 2)] == [[index.ids[j] for j in r] for r in graph]


def _check_copies_index(index: VectorIndex, x: np.ndarray, copies: int) -> None:
    n = len(x)
    assert len(index) == n
    ids = [f"c{i}" for i in range(n)]
    everything = index.search(x[:1], n, model_spec=SPEC)
    assert sorted(everything.ids[0]) == sorted(ids)
    top = index.search(x[::copies], 1, model_spec=SPEC)
    for g, (row, score) in enumerate(zip(top.ids, top.scores[:, 0], strict=True)):
        assert int(row[0][1:]) // copies == g  # one of its own copies
        assert score == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("backend", ["faiss", "usearch"])
@pytest.mark.parametrize("groups", [20, 30])
def test_a_table_of_few_distinct_vectors_builds_uncalibrated(backend: str, groups: int) -> None:
    """groups x 10 byte-identical copies: every group was held out for calibration with all its
    copies, leaving an empty graph (IndexError at truth_s[:, -1]). Half the rows at most are held
    out now, which leaves under 20 queries: no calibration, a scan of the rows as too few rows
    get."""
    x = _copies(groups, 10)
    index = build(
        x, [f"c{i}" for i in range(len(x))], model_spec=SPEC, params=IndexParams(backend=backend)
    )
    assert index.meta.recall_at_10 is None
    assert index.meta.params.ef_search is None
    _check_copies_index(index, x, 10)


@pytest.mark.parametrize("backend", ["faiss", "usearch"])
def test_a_table_of_many_copies_calibrates_on_half_its_rows(backend: str) -> None:
    """50 vectors x 20 copies: 100 queries were due, 50 groups there; 25 groups (half the rows)
    are held out and calibrate a graph of the other 25."""
    x = _copies(50, 20)
    index = build(
        x, [f"c{i}" for i in range(len(x))], model_spec=SPEC, params=IndexParams(backend=backend)
    )
    assert index.meta.recall_at_10 is not None
    assert index.meta.params.ef_search is not None
    _check_copies_index(index, x, 20)
