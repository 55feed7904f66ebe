"""keeper_core.culling.cull: the one path of keeper pick and /v1/pick, on hand-built frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from keeper_core.culling import PICK_COLUMNS, cull, picks_csv, picks_table
from keeper_core.errors import DataError
from keeper_core.grouping import GroupingConfig
from keeper_core.picking import ZERO_SHOT_RULE
from keeper_core.quality import FEATURE_NAMES


def frame(seed: int = 0) -> pd.DataFrame:
    """Three bursts of 3 (two cameras), a single, an exact copy and a near copy (other group)."""
    rng = np.random.default_rng(seed)
    rows = []
    scenes = [("A", 0.0), ("B", 5.0), ("A", 100.0), ("B", 300.0)]
    for s, (cam, t0) in enumerate(scenes):
        base = rng.normal(size=16)
        for k in range(1 if s == 3 else 3):
            emb = base + 0.01 * rng.normal(size=16)
            rows.append(
                {
                    "image_uri": f"/lib/{cam}/s{s}_{k}.jpg",
                    "image_id": f"{s:02x}{k:02x}" + "0" * 60,
                    "embedding": emb / np.linalg.norm(emb),
                    "capture_ts": t0 + 0.1 * k,
                    "camera": cam,
                    "dhash": s * 1000 + k,
                    **dict.fromkeys(FEATURE_NAMES, 1.0),
                    "sharpness": 5.0 + (2.0 if k == 1 else 0.0),  # the middle shot is the sharpest
                    "width": 640,
                    "height": 480,
                }
            )
    # An exact copy of s0_1 (same bytes) and a near copy of s2_0 exported much later.
    rows.append({**rows[1], "image_uri": "/lib/export/s0_1.jpg"})
    near = {"image_uri": "/lib/export/web.jpg", "image_id": "ff" * 32, "capture_ts": 9999.0}
    rows.append({**rows[6], **near, "dhash": rows[6]["dhash"] ^ 1, "width": 320})
    return pd.DataFrame(rows)


def test_groups_duplicates_and_picks() -> None:
    df = frame()
    result = cull(df, scorer=None, grouping=GroupingConfig(near_duplicate_similarity=0.95))
    p = result.picks
    assert result.ranker == ZERO_SHOT_RULE
    assert len(p) == len(df)
    assert set(p["image_uri"]) == set(df["image_uri"])
    by = p.set_index("image_uri")
    # Bursts are per camera and time: s0 and s1 are 5 s apart on different bodies.
    assert by.loc["/lib/A/s0_0.jpg", "group"] == by.loc["/lib/A/s0_2.jpg", "group"]
    assert by.loc["/lib/A/s0_0.jpg", "group"] != by.loc["/lib/B/s1_0.jpg", "group"]
    assert p["group"].is_monotonic_increasing
    # Every duplicate points at a row of the same bytes (exact) or a similar row (near).
    for i, row in p.iterrows():
        j = int(row["duplicate_of"])
        if row["duplicate_kind"] is None or row["duplicate_kind"] != row["duplicate_kind"]:
            assert j == -1, f"row {i} points at {j} without a kind"
            continue
        assert j >= 0
        if row["duplicate_kind"] == "exact":
            assert p.loc[j, "image_id"] == row["image_id"]
        assert row["decision"] == "reject"
    assert by.loc["/lib/export/s0_1.jpg", "duplicate_kind"] == "exact"
    assert by.loc["/lib/export/web.jpg", "duplicate_kind"] == "near"
    assert p.loc[int(by.loc["/lib/export/web.jpg", "duplicate_of"]), "image_uri"] == (
        "/lib/A/s2_0.jpg"
    )
    assert by.loc["/lib/export/web.jpg", "duplicate_cosine"] > 0.95
    # The sharpest shot of each burst is its keeper.
    for s in range(3):
        cam = "A" if s != 1 else "B"
        assert by.loc[f"/lib/{cam}/s{s}_1.jpg", "decision"] == "keep"


def test_input_order_does_not_matter() -> None:
    df = frame(3)
    a = cull(df, scorer=None).picks
    b = cull(df.sample(frac=1.0, random_state=1), scorer=None).picks
    cols = ["image_uri", "group", "rank", "decision", "duplicate_of", "duplicate_kind"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_a_scorer_ranks_groups_in_its_order() -> None:
    df = frame()
    seen: list[pd.DataFrame] = []

    def scorer(f: pd.DataFrame) -> np.ndarray:
        seen.append(f)
        return -f["sharpness"].to_numpy()  # prefers the blurriest: the picks must follow it

    p = cull(df, scorer=scorer, ranker="test v1").picks
    assert (seen[0]["series_id"].to_numpy() == sorted(seen[0]["series_id"])).all()
    by = p.set_index("image_uri")
    assert by.loc["/lib/A/s0_1.jpg", "decision"] != "keep"
    with pytest.raises(DataError, match="scores"):
        cull(df, scorer=lambda f: np.zeros(3), ranker="bad")
    with pytest.raises(DataError, match="label"):
        cull(df, scorer=scorer)


def test_tables_and_missing_columns() -> None:
    p = cull(frame(), scorer=None).picks
    t = picks_table(p)
    assert t.column_names == list(PICK_COLUMNS)
    assert t.schema.field("reasons").type == pa.list_(pa.string())
    dup = t.column("duplicate_of").to_pylist()
    assert "/lib/A/s0_1.jpg" in dup  # the exact copy's target, as a URI
    csv = picks_csv(p).decode()
    assert csv.splitlines()[0].split(",")[0] == "group_id"
    with pytest.raises(DataError, match="camera"):
        cull(frame().drop(columns=["camera"]), scorer=None)
    empty = cull(frame().iloc[:0], scorer=None)
    assert empty.picks.empty


def test_a_scene_shot_again_later_is_not_a_duplicate() -> None:
    # The near copy of s2_0 is a re-shoot whose camera recorded another moment: not a copy.
    df = frame().assign(time_source="exif")
    cfg = GroupingConfig(near_duplicate_similarity=0.95)
    p = cull(df, scorer=None, grouping=cfg).picks.set_index("image_uri")
    assert pd.isna(p.loc["/lib/export/web.jpg", "duplicate_kind"])
    # An export that kept only its file time (EXIF stripped) is still found.
    df.loc[df["image_uri"] == "/lib/export/web.jpg", "time_source"] = "mtime"
    p = cull(df, scorer=None, grouping=cfg).picks.set_index("image_uri")
    assert p.loc["/lib/export/web.jpg", "duplicate_kind"] == "near"
    # The exact copy is the same bytes: marked whatever the times say.
    assert p.loc["/lib/export/s0_1.jpg", "duplicate_kind"] == "exact"


def test_a_shot_without_pixels_hashed_is_never_a_near_duplicate() -> None:
    # The export's file vanished before its dHash was taken: no pixel evidence, no near mark,
    # and the other rows keep their pixel guard (the random-weight cosine alone marks anything).
    df = frame()
    df["dhash"] = df["dhash"].astype(object)
    df.loc[df["image_uri"] == "/lib/export/web.jpg", "dhash"] = None
    p = cull(df, scorer=None, grouping=GroupingConfig(near_duplicate_similarity=0.95))
    by = p.picks.set_index("image_uri")
    assert pd.isna(by.loc["/lib/export/web.jpg", "duplicate_kind"])
    assert by.loc["/lib/export/s0_1.jpg", "duplicate_kind"] == "exact"
    assert (p.picks["duplicate_kind"] == "near").sum() == 0


def test_a_copy_of_an_export_points_at_the_photo_that_stays_in_competition() -> None:
    """A byte copy of a resized export: its mark points at the export (exact), the export's at
    the photo (near). The picks name the photo, and call the copy a near duplicate of it: what
    it is to the photo, whose pixels it does not share."""
    df = frame()
    export = df[df["image_uri"] == "/lib/export/web.jpg"].iloc[0]
    df = pd.concat([df, export.to_frame().T.assign(image_uri="/lib/export/web copy.jpg")])
    df = df.reset_index(drop=True).infer_objects()
    p = cull(df, scorer=None, grouping=GroupingConfig(near_duplicate_similarity=0.95)).picks
    by = p.set_index("image_uri")
    original = int(np.flatnonzero(p["image_uri"] == "/lib/A/s2_0.jpg")[0])
    for uri in ("/lib/export/web.jpg", "/lib/export/web copy.jpg"):
        assert int(by.loc[uri, "duplicate_of"]) == original, uri
        assert by.loc[uri, "duplicate_kind"] == "near", uri
        assert by.loc[uri, "reasons"][0].startswith("near duplicate of s2_0.jpg (cosine"), uri
        assert by.loc[uri, "decision"] == "reject"
    table = picks_table(p).to_pylist()
    assert {r["image_uri"]: r["duplicate_of"] for r in table}["/lib/export/web copy.jpg"] == (
        "/lib/A/s2_0.jpg"
    )
