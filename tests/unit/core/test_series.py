"""Series manifests: reading, validation, pairwise conversion, splits, groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keeper_core.errors import ConfigError, DataError
from keeper_core.series import (
    pairwise_to_series,
    read_series_manifest,
    series_groups,
    split_series,
    validate_series,
)

GOOD_CSV = """series_id,image_uri,is_best,base_photo
007,a.jpg,1,x
007,b.jpg,0,x
2,c.jpg,false,y
2,d.jpg,TRUE,y
2,e.jpg,0,y
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_read_csv_normalises_types_and_keeps_extra_columns(tmp_path: Path) -> None:
    df = read_series_manifest(write(tmp_path, "m.csv", GOOD_CSV))
    assert df["series_id"].tolist() == ["007", "007", "2", "2", "2"]  # leading zero kept
    assert df["is_best"].tolist() == [1, 0, 0, 1, 0]
    assert df["is_best"].dtype == np.int64
    assert df["base_photo"].tolist() == ["x", "x", "y", "y", "y"]


@pytest.mark.parametrize("name", ["m.parquet", "no_extension"])
def test_read_parquet_by_extension_or_magic(tmp_path: Path, name: str) -> None:
    src = pd.DataFrame(
        {
            "series_id": [10, 10, 11, 11],
            "image_uri": ["a", "b", "c", "d"],
            "is_best": [True, False, False, True],
            "score": [0.5, 0.25, 1.0, 2.0],
        }
    )
    src.to_parquet(tmp_path / name)
    df = read_series_manifest(str(tmp_path / name))
    assert df["series_id"].tolist() == ["10", "10", "11", "11"]
    assert df["is_best"].tolist() == [1, 0, 0, 1]
    assert df["score"].tolist() == [0.5, 0.25, 1.0, 2.0]


def test_float_series_ids_read_as_integers() -> None:
    df = pd.DataFrame({"series_id": [1.0, 1.0], "image_uri": ["a", "b"], "is_best": [1.0, 0.0]})
    out = validate_series(df)
    assert out["series_id"].tolist() == ["1", "1"]
    assert out["is_best"].tolist() == [1, 0]


def test_a_float_is_best_column_reads_the_same_from_csv_as_from_parquet(tmp_path: Path) -> None:
    """pandas writes a float is_best (one that held a NaN) to CSV as 1.0/0.0; Parquet gives the
    same column as 1.0/0.0 floats, which were always taken. Other decimals stay refused."""
    df = pd.DataFrame({"series_id": [1, 1], "image_uri": ["a", "b"], "is_best": [1.0, 0.0]})
    df.to_csv(tmp_path / "m.csv", index=False)
    assert "1.0" in (tmp_path / "m.csv").read_text()
    df.to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        assert read_series_manifest(str(tmp_path / name))["is_best"].tolist() == [1, 0]
    for bad in ("1.5", "1.", "1e0", "01"):
        uri = write(tmp_path, "bad.csv", f"series_id,image_uri,is_best\n1,a,{bad}\n1,b,0\n")
        with pytest.raises(DataError, match="is_best must be 0/1"):
            read_series_manifest(uri)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    uri = write(tmp_path, "m.csv", "series_id,path\n1,a\n")
    with pytest.raises(DataError, match=r"missing columns \['image_uri', 'is_best'\]") as e:
        read_series_manifest(uri)
    assert e.value.source == uri


@pytest.mark.parametrize("text", ["", "series_id,image_uri,is_best\n"])
def test_empty_manifest(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="empty manifest"):
        read_series_manifest(write(tmp_path, "m.csv", text))


def test_unparseable_parquet(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot parse as Parquet"):
        read_series_manifest(write(tmp_path, "m.parquet", "series_id,image_uri\n"))


def test_null_and_blank_values_name_rows(tmp_path: Path) -> None:
    text = "series_id,image_uri,is_best\n1,a,1\n1,,0\n2,c,1\n ,d,0\n"
    with pytest.raises(DataError, match=r"columns \['series_id', 'image_uri'\], rows 1, 3") as e:
        read_series_manifest(write(tmp_path, "m.csv", text))
    assert e.value.rows == [1, 3]


def test_bad_is_best_values_name_rows() -> None:
    df = pd.DataFrame(
        {"series_id": ["s"] * 4, "image_uri": list("abcd"), "is_best": ["1", "yes", "2", "0"]}
    )
    with pytest.raises(DataError, match=r"1 \('yes'\), 2 \('2'\)") as e:
        validate_series(df)
    assert e.value.rows == [1, 2]


def test_duplicate_image_uri() -> None:
    df = pd.DataFrame(
        {"series_id": ["s", "s", "t", "t"], "image_uri": list("abca"), "is_best": [1, 0, 1, 0]}
    )
    with pytest.raises(DataError, match="duplicate image_uri in rows 0, 3") as e:
        validate_series(df)
    assert e.value.rows == [0, 3]


def test_per_series_problems_are_reported_together() -> None:
    df = pd.DataFrame(
        {
            "series_id": ["none", "none", "two", "two", "two", "ok", "ok", "solo"],
            "image_uri": list("abcdefgh"),
            "is_best": [0, 0, 1, 1, 0, 0, 1, 1],
        }
    )
    with pytest.raises(DataError) as e:
        validate_series(df, source="m.csv")
    msg = str(e.value)
    assert msg.startswith("m.csv: ")
    assert "1 series without a best image (is_best=1): 'none' (rows 0, 1)" in msg
    assert "1 series with more than one best image: 'two' (rows 2, 3, 4)" in msg
    assert "1 series of a single image: 'solo' (rows 7)" in msg
    assert e.value.rows == [0, 1, 2, 3, 4, 7]


def test_long_lists_are_cut_in_the_message_but_not_in_rows() -> None:
    n = 25
    df = pd.DataFrame(
        {"series_id": [str(i) for i in range(n)], "image_uri": list(map(str, range(n))),
         "is_best": [1] * n}
    )  # fmt: skip
    with pytest.raises(DataError, match=r"\.\.\. \(15 more\)") as e:
        validate_series(df)
    assert e.value.rows == list(range(n))


def test_validate_does_not_mutate_input_and_resets_index() -> None:
    df = pd.DataFrame(
        {"series_id": [1, 1], "image_uri": ["a", "b"], "is_best": ["0", "1"]}, index=[5, 9]
    )
    out = validate_series(df)
    assert df["is_best"].tolist() == ["0", "1"]
    assert out.index.tolist() == [0, 1]


# --- pairwise ----------------------------------------------------------------------------


def pairs(*rows: tuple[object, ...]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["series_id", "image_a", "image_b", "prefer_a", "prefer_b"])


def test_pairwise_bradley_terry_matches_an_independent_solve() -> None:
    out = pairwise_to_series(pairs(("s", "a", "b", 3, 1)))
    assert out["image_uri"].tolist() == ["a", "b"]
    assert out["is_best"].tolist() == [1, 0]
    p = out["pref_score"].to_numpy()
    q = _solve_two(3.0, 1.0)
    np.testing.assert_allclose(p, q / q.sum(), rtol=1e-8)
    # The prior shrinks the plain maximum-likelihood share (3/4) towards 1/2.
    assert 0.5 < p[0] < 0.75


def _solve_two(wa: float, wb: float) -> np.ndarray:
    """Solves the two BT likelihood equations (with the 1-win-1-loss reference prior)."""
    from scipy.optimize import fsolve

    def eq(v: np.ndarray) -> np.ndarray:
        a, b = np.exp(v)
        n = wa + wb
        return np.array(
            [
                a * (n / (a + b) + 2 / (a + 1)) - (wa + 1),
                b * (n / (a + b) + 2 / (b + 1)) - (wb + 1),
            ]
        )

    return np.exp(fsolve(eq, np.zeros(2), xtol=1e-13))


def test_pairwise_transitive_votes_rank_in_order() -> None:
    out = pairwise_to_series(
        pairs(
            ("s", "b", "a", 1, 5),
            ("s", "a", "c", 6, 0),
            ("s", "b", "c", 4, 1),
            ("t", "x", "y", 0, 2),
        )
    )
    s = out[out["series_id"] == "s"].set_index("image_uri")["pref_score"]
    assert s["a"] > s["b"] > s["c"]
    assert out["image_uri"].tolist() == ["b", "a", "c", "x", "y"]  # first appearance
    assert out["is_best"].tolist() == [0, 1, 0, 0, 1]
    assert out.groupby("series_id")["pref_score"].sum().tolist() == pytest.approx([1.0, 1.0])


def test_pairwise_tie_goes_to_first_appearance_and_zero_vote_pairs_add_nothing() -> None:
    out = pairwise_to_series(
        pairs(("s", "b", "a", 2, 2), ("s", "a", "c", 0, 0), ("s", "c", "b", 1, 1))
    )
    # b and a are symmetric (2:2); c only has 1:1 vs b and a zero-vote pair with a.
    assert out["image_uri"].tolist() == ["b", "a", "c"]
    assert out["is_best"].tolist() == [1, 0, 0]
    np.testing.assert_allclose(out["pref_score"], [1 / 3, 1 / 3, 1 / 3], rtol=1e-9)


def test_pairwise_reads_csv(tmp_path: Path) -> None:
    uri = write(
        tmp_path,
        "pairs.csv",
        "series_id,image_a,image_b,prefer_a,prefer_b\n01,p.jpg,q.jpg,0,3\n01,q.jpg,r.jpg,2,2\n",
    )
    out = pairwise_to_series(uri)
    assert out["series_id"].tolist() == ["01"] * 3
    assert out.loc[out["is_best"] == 1, "image_uri"].tolist() == ["q.jpg"]


@pytest.mark.parametrize(
    ("rows", "match", "bad_rows"),
    [
        ([("s", "a", "b", 1, -1), ("s", "b", "c", 1, 0)], "prefer_b must be a vote count", [0]),
        ([("s", "a", "b", 1, 0), ("s", "b", "c", "x", 0)], "prefer_a must be a vote count", [1]),
        ([("s", "a", "b", 1, 0), ("s", "c", "c", 1, 0)], r"image_a == image_b in rows 1", [1]),
        (
            [("s", "a", "b", 1, 0), ("t", "c", "d", 0, 0), ("t", "d", "e", 0, 0)],
            r"1 series without any votes: 't' \(rows 1, 2\)",
            [1, 2],
        ),
        (
            [("s", "a", "b", 1, 0), ("t", "c", "a", 1, 0)],
            r"more than one series, rows 0, 1",
            [0, 1],
        ),
        ([("s", None, "b", 1, 0)], r"null or empty values in columns \['image_a'\]", [0]),
    ],
)
def test_pairwise_validation(
    rows: list[tuple[object, ...]], match: str, bad_rows: list[int]
) -> None:
    with pytest.raises(DataError, match=match) as e:
        pairwise_to_series(pairs(*rows))
    assert e.value.rows == bad_rows


def test_pairwise_missing_columns() -> None:
    with pytest.raises(DataError, match=r"missing columns \['prefer_a', 'prefer_b'\]"):
        pairwise_to_series(pd.DataFrame({"series_id": [1], "image_a": ["a"], "image_b": ["b"]}))


# --- splits --------------------------------------------------------------------------------


def manifest(n_series: int, per: int = 3, start: int = 0) -> pd.DataFrame:
    ids = [f"s{i}" for i in range(start, start + n_series) for _ in range(per)]
    return pd.DataFrame(
        {
            "series_id": ids,
            "image_uri": [f"{sid}/{j}.jpg" for j, sid in enumerate(ids)],
            "is_best": [int(j % per == 0) for j in range(len(ids))],
        }
    )


def test_split_is_stable_when_series_are_added() -> None:
    small = split_series(manifest(300))
    big = split_series(manifest(2000))
    assert (big["split"].iloc[: len(small)].to_numpy() == small["split"].to_numpy()).all()
    # Each series sits in exactly one split.
    assert big.groupby("series_id")["split"].nunique().max() == 1
    # Another seed gives another assignment.
    other = split_series(manifest(2000), seed=1)
    assert (other["split"] != big["split"]).mean() > 0.2


def test_split_fractions_are_approximately_met() -> None:
    per_series = split_series(manifest(4000, per=2)).drop_duplicates("series_id")["split"]
    share = per_series.value_counts(normalize=True)
    # Binomial sd at n=4000 is <= 0.0064: 4 sd tolerance.
    assert share["train"] == pytest.approx(0.8, abs=0.026)
    assert share["val"] == pytest.approx(0.1, abs=0.02)
    assert share["test"] == pytest.approx(0.1, abs=0.02)
    only_test = split_series(manifest(50), fractions=(0.0, 0.0, 1.0))
    assert set(only_test["split"]) == {"test"}


def test_split_by_group_keeps_groups_together() -> None:
    df = manifest(600)
    df["base_photo"] = df["series_id"].str[1:].astype(int) // 4  # 4 series per base photo
    out = split_series(df, by="base_photo", fractions=(0.5, 0.25, 0.25))
    assert out.groupby("base_photo")["split"].nunique().max() == 1
    assert set(out["split"]) == {"train", "val", "test"}


def test_split_validation() -> None:
    df = manifest(4)
    with pytest.raises(ConfigError, match="sum to 1"):
        split_series(df, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match=">= 0"):
        split_series(df, fractions=(1.2, -0.2, 0.0))
    with pytest.raises(DataError, match="'base_photo' not in columns"):
        split_series(df, by="base_photo")
    df["base_photo"] = np.arange(len(df))  # every image its own group: series would straddle
    with pytest.raises(DataError, match="4 series spanning several base_photo values") as e:
        split_series(df, by="base_photo")
    assert e.value.rows == list(range(12))
    df["base_photo"] = [1.0] * 11 + [None]
    with pytest.raises(DataError, match="null base_photo in rows 11"):
        split_series(df, by="base_photo")


# --- groups ----------------------------------------------------------------------------------


def test_series_groups_positions_and_best() -> None:
    df = pd.DataFrame(
        {
            "series_id": ["b", "a", "b", "a", "b"],
            "image_uri": list("vwxyz"),
            "is_best": [0, 1, 0, 0, 1],
        }
    )
    groups = series_groups(df)
    assert [g.series_id for g in groups] == ["b", "a"]
    assert [g.positions.tolist() for g in groups] == [[0, 2, 4], [1, 3]]
    assert [g.best for g in groups] == [2, 0]
    sid, _positions, best = groups[0]  # still a plain tuple
    assert (sid, best) == ("b", 2)


def test_series_groups_validates() -> None:
    with pytest.raises(DataError, match="without a best image"):
        series_groups(manifest(2).assign(is_best=0))
