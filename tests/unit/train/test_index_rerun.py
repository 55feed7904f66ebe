"""keeper index re-run with other parameters into an existing index: refused, never ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import write_unit_parts

from keeper_core.errors import ConfigError
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
