"""The table's URI lookups cost the rows looked up, not the set they are looked up in.

``keeper embed``'s plan and summary check every errors part (one per decode task that failed an
image) against the set of embedded URIs. ``Series.isin(set)`` walks the whole set on every call,
which made that parts x embedded images (25 s at 100k inputs, ~1 h at 1M extrapolated:
benchmarks/plan_scale.py). A set that refuses to be walked pins the lookups.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from keeper_core import storage
from keeper_train.jobs import embed
from keeper_train.table import ErrorRows, in_set


class LookupOnly(set[str]):
    """A set of URIs that may be asked for a member but never walked."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the whole set was walked: a lookup per row was expected")


@pytest.mark.parametrize("dtype", ["str", "object"])
@pytest.mark.parametrize(
    ("values", "members"),
    [
        ([], set()),
        (["a"], set()),
        ([], {"a"}),
        (["a", "b", "a", "c"], {"a", "c", "z"}),
        (["s3://b/x y.jpg", "/p/café.jpg"], {"/p/café.jpg"}),
    ],
)
def test_in_set_answers_as_isin_does(values: list[str], members: set[str], dtype: str) -> None:
    col = pd.Series(values, dtype=dtype)
    got = in_set(col, LookupOnly(members))
    assert got.dtype == bool
    assert got.tolist() == col.isin(members).tolist()


def write_part(folder: Path, name: str, uris: list[str]) -> None:
    rows = [
        {"image_uri": u, "stage": "read", "reason": "unreadable", "error": "x", "retryable": True}
        | {"run_id": "old", "at": "2025-01-01T00:00:00+00:00"}
        for u in uris
    ]
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=embed.ERRORS_SCHEMA), str(folder / name)
    )


def test_removing_embedded_images_from_many_errors_parts_looks_each_row_up(tmp_path: Path) -> None:
    folder = tmp_path / embed.ERRORS
    parts = {f"part-{p:03d}.parquet": [f"/p/{p}/{i}.jpg" for i in range(3)] for p in range(40)}
    for name, uris in parts.items():
        write_part(folder, name, uris)
    errors = ErrorRows.read(str(folder))
    # Part 0 loses every row (the part goes), parts 1..9 their first row, the rest nothing.
    embedded = {
        *parts["part-000.parquet"],
        *(parts[f"part-{p:03d}.parquet"][0] for p in range(1, 10)),
    }
    removed = errors.remove(LookupOnly(embedded | {"/p/elsewhere.jpg"}))
    assert removed == 3 + 9
    left = sorted(storage.read_parquet(str(folder)).column("image_uri").to_pylist())
    assert left == sorted(u for uris in parts.values() for u in uris if u not in embedded)
    assert not (folder / "part-000.parquet").exists()
    assert sorted(errors.rows()["image_uri"]) == left  # the in-memory table agrees with disk
