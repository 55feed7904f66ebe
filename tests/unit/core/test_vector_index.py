"""keeper_core.vector_index: recall against exact search, incremental adds, refusals, round trips.

The ANN builds on 8k x 512 are the slow part (~5 s each on one thread), so each is made
once per module and shared.
"""

from __future__ import annotations

import numpy as np
import pytest

from keeper_core import storage, vector_index
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.vector_index import (
    CROSSOVER_N,
    META_FILE,
    IndexParams,
    VectorIndex,
    build,
    choose_backend,
    estimate_memory_bytes,
)

D, N, Q, K = 512, 8_000, 200, 10
SPEC = "ViT-B-32:laion2b_s34b_b79k"


def unit(n: int, seed: int, dim: int = D) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def names(n: int, start: int = 0) -> list[str]:
    return [f"img-{i:06d}" for i in range(start, start + n)]


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q.astype(np.float64) @ x.astype(np.float64).T
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(s, top, 1)


def recall(got: list[list[str]], truth: np.ndarray, ids: list[str]) -> float:
    return float(
        np.mean([len(set(g) & {ids[j] for j in t}) / K for g, t in zip(got, truth, strict=True)])
    )


@pytest.fixture(scope="module")
def data(one_torch_thread: None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, q = unit(N, 0), unit(Q, 1)
    return x, q, brute_force(x, q, K)[0]


@pytest.fixture(scope="module", params=["faiss", "usearch"])
def ann(request: pytest.FixtureRequest, data: tuple) -> VectorIndex:
    x, _, _ = data
    return build(x, names(N), model_spec=SPEC, params=IndexParams(backend=request.param))


def test_ann_recall_at_10_vs_exact(ann: VectorIndex, data: tuple) -> None:
    _, q, truth = data
    found = ann.search(q, K, model_spec=SPEC)
    r = recall(found.ids, truth, names(N))
    assert r >= 0.95, f"{ann.meta.params.backend}: recall@10 {r:.3f}"
    # The calibration's own measure agrees with this independent one.
    assert ann.meta.recall_at_10 is not None
    assert abs(ann.meta.recall_at_10 - r) < 0.03
    assert ann.meta.params.ef_search is not None
    assert np.all(np.diff(found.scores, axis=1) <= 1e-3)  # best first (f16 scores: ~1e-3)


def test_incremental_add_keeps_recall(data: tuple) -> None:
    x, q, truth = data
    index = build(x[:6_000], names(6_000), model_spec=SPEC, params=IndexParams(backend="faiss"))
    index.add(x[6_000:], names(2_000, start=6_000))
    assert len(index) == N
    r = recall(index.search(q, K, model_spec=SPEC).ids, truth, names(N))
    assert r >= 0.95, f"recall@10 after adding 2k to 6k: {r:.3f}"
    assert index.meta.updated_at >= index.meta.built_at


@pytest.mark.parametrize("backend", ["exact", "usearch"])
def test_added_rows_are_found(backend: str) -> None:
    x = unit(3_000, 2, dim=64)
    index = build(x[:2_000], names(2_000), model_spec=SPEC, params=IndexParams(backend=backend))
    index.add(x[2_000:], names(1_000, start=2_000))
    found = index.search(x[2_000:2_100], 1, model_spec=SPEC)
    assert [g[0] for g in found.ids] == names(100, start=2_000)
    one = index.search(x[2_500], 3, model_spec=SPEC)  # a single (D,) query
    assert one.ids[0][0] == "img-002500"
    assert one.scores.shape == (1, 3)
    assert one.scores[0, 0] == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_exact_equals_brute_force(dtype: str) -> None:
    x, q = unit(5_000, 3, dim=128), unit(50, 4, dim=128)
    index = build(x, names(5_000), model_spec=SPEC, params=IndexParams(dtype=dtype))
    top, scores = brute_force(x, q, K)
    found = index.search(q, K, model_spec=SPEC)
    tol = 1e-5 if dtype == "f32" else 2e-3
    np.testing.assert_allclose(found.scores, scores, atol=tol)
    if dtype == "f32":
        assert found.ids == [[names(5_000)[j] for j in row] for row in top]
    else:  # float16 rounding may swap near-ties; the scores above say they are ties
        assert recall(found.ids, top, names(5_000)) >= 0.99


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_exact_search_in_blocks(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks: 5k rows in 5 row blocks, 600 queries in 3 query passes, and both the
    # float16 gemv (one query) and upcast (many) paths; results equal one brute-force pass.
    monkeypatch.setattr(vector_index, "_ROW_BLOCK", 1000)
    monkeypatch.setattr(vector_index, "_QUERY_BLOCK", 256)
    x, q = unit(5_000, 5, dim=32), unit(600, 6, dim=32)
    index = build(x, names(5_000), model_spec=SPEC, params=IndexParams(dtype=dtype))
    top, scores = brute_force(x, q, 3)
    for queries in (q, q[:1]):
        found = index.search(queries, 3, model_spec=SPEC)
        np.testing.assert_allclose(found.scores, scores[: len(queries)], atol=2e-3)
        if dtype == "f32":
            assert found.ids == [[names(5_000)[j] for j in row] for row in top[: len(queries)]]


def test_model_spec_mismatch_is_refused() -> None:
    x = unit(100, 7, dim=16)
    index = build(x, names(100), model_spec=SPEC)
    with pytest.raises(DataError, match=r"'ViT-L-14:openai'.*'ViT-B-32:laion2b_s34b_b79k'"):
        index.search(x[:1], 5, model_spec="ViT-L-14:openai")


def test_refusals() -> None:
    x = unit(100, 8, dim=16)
    index = build(x, names(100), model_spec=SPEC)
    with pytest.raises(DataError, match="dimension 8, the index holds 16"):
        index.search(unit(1, 9, dim=8), 1, model_spec=SPEC)
    with pytest.raises(ConfigError, match=r"k must be in 1\.\.100"):
        index.search(x[:1], 101, model_spec=SPEC)
    bad = x[:3].copy()
    bad[1, 0] = np.nan
    with pytest.raises(DataError, match="NaN or inf") as e:
        index.search(bad, 1, model_spec=SPEC)
    assert e.value.rows == [1]
    with pytest.raises(DataError, match="not L2-normalised"):
        index.search(x[:2] * 2, 1, model_spec=SPEC)
    with pytest.raises(DataError, match="no vectors"):
        build(np.empty((0, 16), np.float32), [], model_spec=SPEC)
    with pytest.raises(DataError, match="already in the index"):
        index.add(unit(1, 10, dim=16), ["img-000003"])
    with pytest.raises(DataError, match="repeated among the new rows"):
        index.add(unit(2, 11, dim=16), ["new", "new"])
    assert len(index) == 100  # refused adds change nothing
    with pytest.raises(DataError, match="2 vectors but 1 ids"):
        build(x[:2], ["a"], model_spec=SPEC)
    with pytest.raises(ValueError, match="dtype 'i8' is not one exact stores"):
        IndexParams(backend="exact", dtype="i8")


@pytest.mark.parametrize(
    "params",
    [
        IndexParams(backend="exact", dtype="f16"),
        IndexParams(backend="faiss", dtype="f32"),
        IndexParams(backend="usearch", dtype="i8"),
    ],
    ids=["exact-f16", "faiss-f32", "usearch-i8"],
)
def test_save_load_round_trip_local(params: IndexParams, tmp_path) -> None:
    x, q = unit(2_000, 12, dim=64), unit(20, 13, dim=64)
    index = build(x, names(2_000), model_spec=SPEC, params=params, table_fingerprint="sha:abc")
    before = index.search(q, K, model_spec=SPEC)
    folder = str(tmp_path / "idx")
    index.save(folder)
    loaded = VectorIndex.load(folder)
    after = loaded.search(q, K, model_spec=SPEC)
    assert after.ids == before.ids
    np.testing.assert_array_equal(after.scores, before.scores)
    assert loaded.meta == index.meta
    assert loaded.meta.table_fingerprint == "sha:abc"
    # An add after a load continues the same rows; a second save replaces the first's files.
    loaded.add(unit(5, 14, dim=64), names(5, start=2_000))
    loaded.save(folder)
    assert len(VectorIndex.load(folder)) == 2_005
    assert len(storage.list_files(folder)) == 3  # index.json + one native file + one ids file
    # A save killed before its index.json left files no index.json names: the next save removes
    # them (and nothing else: other names in the folder stay).
    for orphan in ("index-0123456789abcdef.faiss", "ids-0123456789abcdef.parquet"):
        storage.write_bytes(storage.join(folder, orphan), b"a killed save's")
    storage.write_bytes(storage.join(folder, "notes.txt"), b"the user's")
    loaded.save(folder)
    left = {f.rsplit("/", 1)[-1] for f in storage.list_files(folder)}
    assert len(left) == 4
    assert "notes.txt" in left
    assert not left & {"index-0123456789abcdef.faiss", "ids-0123456789abcdef.parquet"}
    assert len(VectorIndex.load(folder)) == 2_005


def test_save_load_round_trip_s3(s3_bucket: str) -> None:
    x, q = unit(2_000, 15, dim=64), unit(20, 16, dim=64)
    index = build(x, names(2_000), model_spec=SPEC, params=IndexParams(backend="faiss"))
    before = index.search(q, K, model_spec=SPEC)
    prefix = f"s3://{s3_bucket}/tables/t1/index"
    assert index.save(prefix) == f"{prefix}/{META_FILE}"
    after = VectorIndex.load(prefix).search(q, K, model_spec=SPEC)
    assert after.ids == before.ids
    np.testing.assert_array_equal(after.scores, before.scores)


def test_load_refuses_tampered_or_missing(tmp_path) -> None:
    folder = str(tmp_path / "idx")
    with pytest.raises(StorageError, match="no vector index here"):
        VectorIndex.load(folder)
    index = build(unit(50, 17, dim=8), names(50), model_spec=SPEC)
    index.save(folder)
    native = storage.join(folder, index.meta.files["index"])
    storage.write_bytes(native, storage.read_bytes(native)[:-8])
    with pytest.raises(DataError, match="differs from the sha256"):
        VectorIndex.load(folder)


def test_choose_backend_and_memory() -> None:
    assert choose_backend(CROSSOVER_N - 1).backend == "exact"
    assert choose_backend(CROSSOVER_N).backend == "faiss"
    exact = estimate_memory_bytes(IndexParams(dtype="f16"), 1_000_000, 512)
    assert exact == 1_024_000_000
    hnsw = estimate_memory_bytes(IndexParams(backend="faiss"), 1_000_000, 512)
    assert exact < hnsw < 2 * exact
    index = build(unit(1_000, 18, dim=64), names(1_000), model_spec=SPEC)
    assert index.memory_bytes() == 1_000 * 64 * 2


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_exact_replace_gives_rows_new_vectors(dtype: str, tmp_path) -> None:
    x = unit(300, 1)
    ids = names(300)
    idx = build(x, ids, model_spec=SPEC, params=IndexParams(backend="exact", dtype=dtype))
    idx.add(unit(50, 2), names(50, start=300))  # a second chunk: rows in both are replaced
    new = unit(2, 3)
    idx.replace(new, [ids[7], "img-000320"])
    np.testing.assert_allclose(idx.vectors([ids[7], "img-000320"]), new, atol=1e-3)
    got = idx.search(new, 1, model_spec=SPEC)
    assert [h[0] for h in got.ids] == [ids[7], "img-000320"]
    idx.save(str(tmp_path / "i"))  # and the change is what is saved
    again = VectorIndex.load(str(tmp_path / "i"))
    np.testing.assert_allclose(again.vectors([ids[7]]), new[:1], atol=1e-3)


def test_replace_refuses_a_graph_and_unknown_ids() -> None:
    x = unit(300, 1)
    exact = build(x, names(300), model_spec=SPEC, params=IndexParams(backend="exact"))
    with pytest.raises(DataError, match="not in the index"):
        exact.replace(unit(1, 2), ["nope"])
    graph = build(x, names(300), model_spec=SPEC, params=IndexParams(backend="faiss"))
    with pytest.raises(DataError, match="rebuild it"):
        graph.replace(unit(1, 2), [names(1)[0]])
