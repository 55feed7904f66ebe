"""keeper_train.data.join_series: a manifest with relative image_uris joins the table keeper embed
wrote from it, however the manifest's path is spelled; dropped series are counted and explained."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from support import write_embed_table

from keeper_core import storage
from keeper_core.errors import DataError
from keeper_train.data import join_series
from keeper_train.jobs import embed

SPEC = "keeper-tiny:random"
SERIES = {"a": 3, "b": 2, "c": 4}


def _manifest(folder: Path) -> Path:
    """A manifest with relative image_uris (some ``./``-prefixed), in its own folder."""
    rows = [
        {
            "series_id": sid,
            "image_uri": f"{'./' if i % 2 else ''}images/{sid}/{i}.jpg",
            "is_best": int(i == 0),
        }
        for sid, n in SERIES.items()
        for i in range(n)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_relative_manifest_joins_what_keeper_embed_recorded(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "corpus")
    uris, _ = embed.list_inputs(str(manifest))
    assert all(u.startswith(str(tmp_path / "corpus" / "images")) for u in uris)
    write_embed_table(tmp_path / "emb", uris)

    rows, spec, dropped, _ = join_series(str(tmp_path / "emb"), str(manifest))

    assert (spec, dropped) == (SPEC, 0)
    assert rows.groupby("series_id").size().to_dict() == SERIES
    assert rows["image_uri"].tolist() == uris  # manifest order, the URIs keeper embed recorded
    assert rows["embedding"].notna().all()


@pytest.mark.parametrize("spelling", ["corpus/manifest.csv", "./corpus/manifest.csv", "absolute"])
def test_manifest_path_spelled_differently_from_the_embed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    """keeper embed --input ./corpus/manifest.csv, then train-head --series corpus/manifest.csv:
    the recorded URIs are ``./corpus/images/...``, the manifest now resolves to
    ``corpus/images/...``; both name the same files and must join."""
    monkeypatch.chdir(tmp_path)
    _manifest(tmp_path / "corpus")
    uris, _ = embed.list_inputs("./corpus/manifest.csv")
    assert uris[0].startswith("./corpus/")
    write_embed_table(tmp_path / "emb", uris)
    series = str(tmp_path / "corpus" / "manifest.csv") if spelling == "absolute" else spelling

    rows, _, dropped, _ = join_series("emb", series)

    assert dropped == 0
    assert len(rows) == sum(SERIES.values())


STAMPS = embed.STAMP_COLUMNS


def test_dropped_series_are_counted_and_explained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = _manifest(tmp_path / "corpus")
    uris, _ = embed.list_inputs(str(manifest))
    lost = [u for u in uris if "/b/" in u]  # both images of series b
    write_embed_table(tmp_path / "emb", [u for u in uris if u not in lost])
    failed = pa.Table.from_pylist(
        [
            {
                f.name: False if f.name == "retryable" else None if f.name in STAMPS else "x"
                for f in embed.ERRORS_SCHEMA
            }
        ],
        schema=embed.ERRORS_SCHEMA,
    ).set_column(0, "image_uri", pa.array([lost[0]]))
    storage.write_parquet(failed, str(tmp_path / "emb" / "errors" / "part-0.parquet"))

    with caplog.at_level(logging.WARNING, logger="keeper.data"):
        rows, _, dropped, _ = join_series(str(tmp_path / "emb"), str(manifest))

    assert dropped == 1
    assert set(rows["series_id"]) == {"a", "c"}
    (message,) = [r.getMessage() for r in caplog.records]
    assert "dropped 1 of 3 series: 2 images have no embedding" in message
    assert "1 recorded as failed" in message
    assert "1 never embedded" in message


def test_no_match_at_all_says_what_each_side_holds(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "corpus")
    write_embed_table(tmp_path / "emb", [f"s3://elsewhere/{i}.jpg" for i in range(3)])

    with pytest.raises(DataError, match="no series has an embedding") as e:
        join_series(str(tmp_path / "emb"), str(manifest))

    assert "9 images have no embedding (0 recorded as failed" in str(e.value)
    assert "s3://elsewhere/0.jpg" in str(e.value)
    assert str(tmp_path / "corpus" / "images" / "a" / "0.jpg") in str(e.value)


def test_an_image_embedded_twice_is_refused(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "corpus")
    uris, _ = embed.list_inputs(str(manifest))
    write_embed_table(tmp_path / "emb", [*uris, uris[0]])

    with pytest.raises(DataError, match="embedded twice"):
        join_series(str(tmp_path / "emb"), str(manifest))


def test_a_table_without_quality_features_is_refused_naming_them(tmp_path: Path) -> None:
    # Rankers' quality features and the sharpness rule read them: it was a pandas KeyError.
    manifest = _manifest(tmp_path / "corpus")
    uris, _ = embed.list_inputs(str(manifest))
    write_embed_table(tmp_path / "emb", uris, drop=("sharpness", "noise"))

    with pytest.raises(
        DataError, match=r"lacks the quality feature columns \['sharpness', 'noise'\]"
    ):
        join_series(str(tmp_path / "emb"), str(manifest))
