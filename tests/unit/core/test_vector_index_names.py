"""keeper_core.vector_index: ``index.json`` names only files ``save`` writes.

A tampered ``index.json`` whose ``files`` point outside the index folder (or at anything keeper
did not name) is refused at load, naming the entry, and a ``save`` never deletes such a name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keeper_core.errors import DataError
from keeper_core.vector_index import (
    META_FILE,
    IndexMeta,
    IndexParams,
    VectorIndex,
    build,
)

D = 16
SPEC = "ViT-B-32:laion2b_s34b_b79k"
EXACT = IndexParams(backend="exact", dtype="f32")


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def names(n: int, start: int = 0) -> list[str]:
    return [f"img-{i:04d}" for i in range(start, start + n)]


def saved_index(folder: Path, n: int = 20) -> dict[str, Any]:
    build(unit(n, 0), names(n), model_spec=SPEC, params=EXACT).save(str(folder))
    return json.loads((folder / META_FILE).read_text())


def rewrite(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_FILE).write_text(json.dumps(meta))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_tampered_file_name_is_refused_and_never_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    victim = tmp_path / "victim.txt"
    victim.write_text("not keeper's")
    meta = saved_index(folder)
    meta["files"]["extra"] = "../victim.txt"
    rewrite(folder, meta)

    with pytest.raises(DataError, match="extra") as e:
        VectorIndex.load(str(folder))
    assert e.value.source == str(folder / META_FILE)

    # A save over it (keeper index re-saves at its output) cannot read the old names either:
    # it deletes nothing, the victim included.
    grown = build(unit(5, 1), names(5), model_spec=SPEC, params=EXACT)
    grown.save(str(folder))
    assert victim.read_text() == "not keeper's"
    assert VectorIndex.load(str(folder)).meta.count == 5


@pytest.mark.parametrize(
    ("role", "name"),
    [
        ("index", "../victim.txt"),
        ("index", "/etc/passwd"),
        ("ids", "sub/ids-0123456789abcdef.parquet"),
        ("ids", "ids-0123456789ABCDEF.parquet"),  # keeper writes lowercase hex
        ("ids", "index-0123456789abcdef.parquet"),  # another role's name
        ("index", "index-0123456789abcdef.faiss"),  # another backend's extension
        ("index", "index-0123456789abcdef.npy.bak"),
        ("ids", "ids-0123456789abcdef.parquet\n"),
    ],
)
@pytest.mark.usefixtures("one_torch_thread")
def test_names_save_does_not_write_are_malformed_metadata(
    tmp_path: Path, role: str, name: str
) -> None:
    folder = tmp_path / "index"
    meta = saved_index(folder)
    meta["files"][role] = name
    rewrite(folder, meta)
    with pytest.raises(DataError, match=f"files\\[{role!r}\\]"):
        VectorIndex.load(str(folder))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_name_must_match_its_recorded_sha256(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    meta = saved_index(folder)
    meta["files"]["ids"] = "ids-0000000000000000.parquet"
    rewrite(folder, meta)
    with pytest.raises(DataError, match="does not match its sha256"):
        VectorIndex.load(str(folder))

    meta = saved_index(tmp_path / "other")
    meta["sha256"]["ids"] = "../x"
    rewrite(tmp_path / "other", meta)
    with pytest.raises(DataError, match="not a sha256"):
        VectorIndex.load(str(tmp_path / "other"))


def test_only_known_roles_are_accepted() -> None:
    base = {
        "params": EXACT.model_dump(),
        "model_spec": SPEC,
        "dim": D,
        "count": 0,
        "built_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T00:00:00+00:00",
    }
    for field in ("files", "sha256"):
        with pytest.raises(ValueError, match="unknown file role"):
            IndexMeta.model_validate({**base, field: {"extra": "x"}})
    IndexMeta.model_validate(base)  # none at all: a fresh build's metadata


@pytest.mark.usefixtures("one_torch_thread")
def test_save_load_grow_cycle_removes_its_own_superseded_files(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    neighbour = tmp_path / "neighbour.txt"
    neighbour.write_text("kept")
    index = build(unit(20, 0), names(20), model_spec=SPEC, params=EXACT)
    index.save(str(folder))
    first = {p.name for p in folder.iterdir()}
    assert len(first) == 3  # index.json, the matrix, the ids

    loaded = VectorIndex.load(str(folder))
    loaded.add(unit(7, 2), names(7, start=20))
    loaded.save(str(folder))

    second = {p.name for p in folder.iterdir()}
    assert len(second) == 3
    assert first & second == {META_FILE}  # both data files superseded, and deleted
    again = VectorIndex.load(str(folder))
    assert again.meta.count == 27
    got = again.search(unit(7, 2)[:1], 1, model_spec=SPEC)
    assert got.ids[0] == ["img-0020"]
    assert neighbour.read_text() == "kept"

    # Saving the same content again keeps its files (same names), deletes nothing.
    again.save(str(folder))
    assert {p.name for p in folder.iterdir()} == second
