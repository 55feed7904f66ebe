"""keeper index re-run with other parameters into an existing index: refused, never ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import write_unit_parts

from keeper_core.errors import ConfigError, DataError
from keeper_train.jobs.index import IndexConfig, run


def test_index_rerun_with_other_params_is_refused(tmp_path: Path) -> None:
    table = str(tmp_path / "emb")
    write_unit_parts(table, [40, 40])
    first = run(IndexConfig(table=table, backend="exact", dtype="f16"))
    assert (first.dtype, first.rows, first.added) == ("f16", 80, 80)

    # The same command again: nothing to add, the index as it was.
    again = run(IndexConfig(table=table, backend="exact", dtype="f16"))
    assert (again.dtype, again.rows, again.added, again.stale) == ("f16", 80, 0, 0)
    # No parameter given: grows what is there.
    plain = run(IndexConfig(table=table))
    assert (plain.backend, plain.dtype, plain.rows) == ("exact", "f16", 80)

    # Asked for f32: the f16 index was grown and reported as f16, the setting ignored silently.
    with pytest.raises(ConfigError, match=r"dtype=f32 \(the index has f16\).*rebuild=true"):
        run(IndexConfig(table=table, backend="exact", dtype="f32"))
    with pytest.raises(ConfigError, match="target_recall"):
        run(IndexConfig(table=table, target_recall=0.9))
    # HNSW-only parameters mean nothing to an exact index: not a reason to refuse.
    run(IndexConfig(table=table, backend="exact", m=16))

    rebuilt = run(IndexConfig(table=table, backend="exact", dtype="f32", rebuild=True))
    assert (rebuilt.dtype, rebuilt.rows, rebuilt.added) == ("f32", 80, 80)
    assert run(IndexConfig(table=table, dtype="f32")).dtype == "f32"


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("exact", "f32"), ("exact", "f16"), ("faiss", "f16"), ("usearch", "i8")],
)
def test_rows_embedded_again_are_counted_as_changed(
    tmp_path: Path, backend: str, dtype: str
) -> None:
    import numpy as np
    import pyarrow as pa

    from keeper_core import storage
    from keeper_core.vector_index import VectorIndex
    from keeper_train.jobs.index import describe

    table = str(tmp_path / "emb")
    write_unit_parts(table, [40, 40])
    run(IndexConfig(table=table, backend=backend, dtype=dtype))
    # keeper embed embeds 3 photos saved over in place again: same URIs, new vectors.
    (part, *_) = sorted((tmp_path / "emb" / "embeddings").glob("*.parquet"))
    t = storage.read_parquet(str(part))
    emb = np.array(t.column("embedding").to_pylist(), np.float32)
    new = np.random.default_rng(9).normal(size=(3, emb.shape[1])).astype(np.float32)
    emb[[0, 5, 7]] = new / np.linalg.norm(new, axis=1, keepdims=True)
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    storage.write_parquet(
        t.set_column(t.column_names.index("embedding"), "embedding", col), str(part)
    )
    again = run(IndexConfig(table=table))
    if backend == "exact":  # the new vectors take the rows' places
        assert (again.added, again.stale, again.changed, again.replaced) == (0, 0, 0, 3)
        assert "3 rows the table has embedded again took their new vectors" in describe(again)
        index = VectorIndex.load(str(tmp_path / "emb" / "index"))
        uris = t.column("image_uri").to_pylist()
        got = index.search(emb[[0, 5, 7]], 1, model_spec=index.model_spec)
        assert [hits[0] for hits in got.ids] == [uris[0], uris[5], uris[7]]
    else:  # a graph cannot take them out: counted, rebuild says how
        assert (again.added, again.stale, again.changed, again.replaced) == (0, 0, 3, 0)
        assert "3 rows the table has embedded again (photos saved over) keep" in describe(again)
    rebuilt = run(IndexConfig(table=table, rebuild=True))
    assert (rebuilt.changed, run(IndexConfig(table=table)).changed) == (0, 0)


@pytest.mark.parametrize(("backend", "dtype"), [("exact", "f16"), ("faiss", "f16")])
def test_rows_the_table_no_longer_holds_leave_an_exact_index(
    tmp_path: Path, backend: str, dtype: str
) -> None:
    """keeper embed prune=true took rows out of the table: an exact index takes them out too
    (a search no longer finds photos that are gone); an HNSW graph counts them as stale."""
    import numpy as np

    from keeper_core import storage
    from keeper_core.vector_index import VectorIndex
    from keeper_train.jobs.index import describe

    table = str(tmp_path / "emb")
    write_unit_parts(table, [40, 40])
    run(IndexConfig(table=table, backend=backend, dtype=dtype))
    (part, *_) = sorted((tmp_path / "emb" / "embeddings").glob("*.parquet"))
    t = storage.read_parquet(str(part))
    uris = t.column("image_uri").to_pylist()
    emb = np.array(t.column("embedding").to_pylist(), np.float32)
    keep = np.ones(t.num_rows, dtype=bool)
    keep[[2, 3, 30]] = False
    storage.write_parquet(t.filter(keep), str(part))
    again = run(IndexConfig(table=table))
    index = VectorIndex.load(str(tmp_path / "emb" / "index"))
    if backend == "exact":
        assert (again.rows, again.removed, again.stale, again.added) == (77, 3, 0, 0)
        assert "3 rows the table no longer holds were taken out" in describe(again)
        assert not {uris[2], uris[3], uris[30]} & set(index.ids)
        # the rows left still find themselves, in their places after the removed ones
        got = index.search(emb[[0, 4, 31, 39]], 1, model_spec=index.model_spec)
        assert [hits[0] for hits in got.ids] == [uris[0], uris[4], uris[31], uris[39]]
        assert run(IndexConfig(table=table)).removed == 0
    else:
        assert (again.rows, again.removed, again.stale) == (80, 0, 3)
        assert "3 rows the table no longer holds stay in the index: rebuild=true" in describe(again)
        with pytest.raises(DataError, match="cannot take a row out"):
            index.remove([uris[2]])


def test_an_hnsw_index_mostly_outdated_is_built_anew(tmp_path: Path) -> None:
    """A graph can neither drop nor move a row: past rebuild_over (10 %) of its rows outdated,
    the run builds it anew from the table instead of growing it (rebuild_over=1: never)."""
    from keeper_core import storage
    from keeper_core.vector_index import VectorIndex
    from keeper_train.jobs.index import describe

    table = str(tmp_path / "emb")
    write_unit_parts(table, [40, 40])
    run(IndexConfig(table=table, backend="faiss", dtype="f16"))
    (part, *_) = sorted((tmp_path / "emb" / "embeddings").glob("*.parquet"))
    t = storage.read_parquet(str(part))
    storage.write_parquet(t.slice(10), str(part))  # 10 of 80 rows pruned: 12.5 %
    kept = run(IndexConfig(table=table, rebuild_over=1.0))
    assert (kept.rows, kept.stale, kept.rebuilt_for) == (80, 10, 0)
    again = run(IndexConfig(table=table))
    assert (again.rows, again.stale, again.rebuilt_for, again.backend) == (70, 0, 10, "faiss")
    assert "built anew: 10 rows of the old index were outdated" in describe(again)
    index = VectorIndex.load(str(tmp_path / "emb" / "index"))
    assert not set(t.column("image_uri").to_pylist()[:10]) & set(index.ids)
    assert run(IndexConfig(table=table)).rebuilt_for == 0
