"""A job stopped half-way through its writes and run again with the same command ends with the
outputs of one complete run: keeper export-embeddings and keeper index (no defect found; these
pin that behaviour)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import write_unit_parts

from keeper_core import storage
from keeper_core.vector_index import VectorIndex
from keeper_train.jobs import export_embeddings as X
from keeper_train.jobs import index as I


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no handler of the job catches it."""


def _kill_on(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, call: int) -> None:
    """Make the ``call``-th call of ``module.storage.<name>`` die before writing."""
    real = getattr(storage, name)
    calls = {"n": 0}

    def dying(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed
        return real(*a, **kw)

    monkeypatch.setattr(module.storage, name, dying)


def test_export_embeddings_killed_mid_partition_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table, out = tmp_path / "emb", tmp_path / "cr"
    write_unit_parts(str(table), [5, 7, 9])
    cfg = X.ExportEmbeddingsConfig(table=str(table), output=str(out))
    X.export(cfg)
    write_unit_parts(str(table), [4], offset=3)  # the table grew (keeper embed resumed)
    with monkeypatch.context() as m:
        _kill_on(m, X, "write_parquet", 3)  # the third metadata file of the re-export
        with pytest.raises(Killed):
            X.export(cfg)
    assert not (out / X.META).exists()  # no sidecar vouches for the half-written export
    s = X.export(cfg)
    assert (s.rows, s.partitions) == (25, 4)
    arrays = [np.load(io.BytesIO(p.read_bytes())) for p in sorted((out / X.IMG_EMB).iterdir())]
    assert sorted(len(a) for a in arrays) == [4, 5, 7, 9]
    assert json.loads((out / X.META).read_text())["rows"] == 25
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_index_killed_before_index_json_then_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "emb"
    write_unit_parts(str(table), [30])
    cfg = I.IndexConfig(table=str(table), backend="exact")
    I.run(cfg)
    write_unit_parts(str(table), [20], offset=1)
    with monkeypatch.context() as m:
        _kill_on(m, I, "write_bytes", 3)  # native file and ids written, index.json not
        with pytest.raises(Killed):
            I.run(cfg)
    assert len(VectorIndex.load(cfg.where())) == 30  # the old index, whole
    s = I.run(cfg)
    assert (s.rows, s.added, s.stale) == (50, 20, 0)
    index = VectorIndex.load(cfg.where())
    assert sorted(index.ids) == sorted(
        [f"s3://photos/0/{i}.jpg" for i in range(30)]
        + [f"s3://photos/1/{i}.jpg" for i in range(20)]
    )
    assert sorted(p.name for p in Path(cfg.where()).iterdir()) == sorted(
        ["index.json", *index.meta.files.values()]
    )
