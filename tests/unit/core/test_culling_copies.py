"""File times that record a copy are no capture times (grouping.copy_runs, culling.cull).

Photos without EXIF time are timed by their file's mtime. A folder of them copied with
``cp -r``, unzipped or synced got the copy's time, every file within milliseconds: chained by
time they were one "burst" of unrelated pictures, one kept and the rest rejected.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from keeper_core.culling import cull, mark_duplicates, table_frame
from keeper_core.errors import DataError
from keeper_core.grouping import GroupingConfig, copy_runs
from keeper_core.quality import FEATURE_NAMES

DAY = 86_400.0
T0 = 1_714_557_600.0  # 2024-05-01 10:00:00 UTC
OFF = GroupingConfig(copy_gap_s=0, copy_window_s=0)  # as keeper grouped before: time alone


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _photo(uri: str, ts: float, emb: np.ndarray, **kw: object) -> dict[str, object]:
    """A photo without EXIF (a screenshot, a download): timed by its file, no camera."""
    return {
        "image_uri": uri,
        "image_id": uri.encode().hex()[:64].ljust(64, "0"),
        "embedding": _unit(emb),
        "capture_ts": ts,
        "capture_time": None,
        "time_source": "mtime",
        "camera": "unknown",
        "dhash": int.from_bytes(hashlib.sha256(uri.encode()).digest()[:8], "big", signed=True),
        **dict.fromkeys(FEATURE_NAMES, 1.0),
        "clip_bright": 0.0,
        "clip_dark": 0.0,
        "sharpness": 5.0,
        "width": 1170,
        "height": 2532,
        **kw,
    }


def _alike(n: int, seed: int = 0) -> np.ndarray:
    """n different pictures that look alike to an embedding (one app's screens): cosine ~0.9."""
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=16) + 0.3 * rng.normal(size=(n, 16)))


def _folder(times: np.ndarray, emb: np.ndarray | None = None) -> pd.DataFrame:
    emb = _alike(len(times)) if emb is None else emb
    return pd.DataFrame(
        [_photo(f"/lib/Screenshots/IMG_{i:04d}.PNG", t, emb[i]) for i, t in enumerate(times)]
    )


# ------------------------------------------------------------------------------ copy_runs


def test_files_written_milliseconds_apart_are_a_copy() -> None:
    ts = T0 + np.array([0.0, 0.002, 0.004, 0.011, 60.0, 60.03, DAY, 2 * DAY])
    runs = copy_runs(ts, np.ones(8, dtype=bool), GroupingConfig())
    # Two copies (in time order); a file on its own keeps its time, however many there are.
    assert runs.tolist() == [0, 0, 0, 0, 1, 1, -1, -1]
    # Equal times (FAT, zip: even seconds) are a copy too; 0 turns the test off.
    assert copy_runs(np.full(2, T0), np.ones(2, bool), GroupingConfig()).tolist() == [0, 0]
    assert (copy_runs(ts, np.ones(8, bool), OFF) == -1).all()


def test_many_files_in_seconds_are_a_copy_and_a_few_are_not() -> None:
    cfg = GroupingConfig()
    # A sync at one file a second: ten within 10 s, though each is a second from the next.
    ten = T0 + np.arange(10.0)
    assert (copy_runs(ten, np.ones(10, bool), cfg) == 0).all()
    # Nine, or ten spread over more than 10 s: a person's pace, times kept.
    assert (copy_runs(ten[:9], np.ones(9, bool), cfg) == -1).all()
    assert (copy_runs(T0 + 1.2 * np.arange(10.0), np.ones(10, bool), cfg) == -1).all()
    # The window's own figures decide.
    narrow = GroupingConfig(copy_files=3, copy_window_s=2.5)
    assert copy_runs(T0 + np.array([0, 1, 2, 10, 20.0]), np.ones(5, bool), narrow).tolist() == [
        0,
        0,
        0,
        -1,
        -1,
    ]


def test_only_file_times_count_and_the_rows_order_does_not() -> None:
    # A camera's 30 frames/s burst carries EXIF times 33 ms apart: a capture, never a copy.
    burst = T0 + np.arange(6) / 30.0
    assert (copy_runs(burst, np.zeros(6, bool), GroupingConfig()) == -1).all()
    # Nor do EXIF times count towards a copy of file times around them.
    ts = np.r_[burst, T0 + 0.01, np.nan, np.nan]
    file_time = np.r_[np.zeros(6, bool), True, True, True]  # two file times unknown (NaN)
    assert (copy_runs(ts, file_time, GroupingConfig()) == -1).all()
    # Any camera: a copy is the file system's doing.
    rng = np.random.default_rng(1)
    ts = np.r_[T0 + rng.uniform(0, 0.02, 20), T0 + DAY * np.arange(1, 6)]
    runs = copy_runs(ts, np.ones(25, bool), GroupingConfig())
    assert runs.tolist() == [0] * 20 + [-1] * 5
    perm = rng.permutation(25)
    assert (copy_runs(ts[perm], np.ones(25, bool), GroupingConfig()) == runs[perm]).all()


def test_a_time_that_stands_between_two_copies_ends_a_run() -> None:
    ts = T0 + np.array([0.0, 0.001, 5.0, 9.0, 9.001])
    assert copy_runs(ts, np.ones(5, bool), GroupingConfig()).tolist() == [0, 0, -1, 1, 1]


def test_copy_runs_checks_its_input() -> None:
    with pytest.raises(DataError, match="file_time"):
        copy_runs(np.zeros(3), np.ones(2, bool), GroupingConfig())
    with pytest.raises(DataError, match="file_time"):
        copy_runs(np.zeros(2), np.ones(2), GroupingConfig())
    with pytest.raises(ValueError, match="copy_files"):
        GroupingConfig(copy_files=1)
    assert copy_runs(np.zeros(0), np.zeros(0, bool), GroupingConfig()).shape == (0,)


# ------------------------------------------------------------------------------ cull


def test_a_copied_folder_is_not_one_burst() -> None:
    # 40 screenshots taken a day apart, then copied with `cp -r`: every mtime within 40 ms.
    df = _folder(T0 + np.arange(40) * 0.001)
    before = cull(df, scorer=None, grouping=OFF)
    assert before.picks["group"].nunique() == 1  # the defect: one keeper, the rest cut
    assert (before.picks["decision"] == "keep").sum() == 1

    result = cull(df, scorer=None)
    p = result.picks
    assert p["group"].nunique() == 40
    assert (p["decision"] == "keep").all()
    assert result.copy_timed == 40
    assert result.counts()["groups"] == 40
    assert set(p["time_source"]) == {"mtime"}  # the table still says where the time came from
    for reasons in p["reasons"]:
        assert reasons[0] == "single shot"
        assert reasons[-1] == (
            "not grouped by time: no EXIF time, and its file time is a copy's, not a "
            "capture's (40 files within 39.0 ms)"
        )
    # Same picks whatever order the rows came in.
    again = cull(df.sample(frac=1.0, random_state=3), scorer=None).picks
    pd.testing.assert_frame_equal(
        p[["image_uri", "group", "decision"]], again[["image_uri", "group", "decision"]]
    )


def test_a_slow_copy_is_not_one_burst_either() -> None:
    # 30 downloads synced at ~3 files a second: 0.3 s apart, which group_shots chained.
    df = _folder(T0 + np.arange(30) * 0.3)
    assert cull(df, scorer=None, grouping=OFF).picks["group"].nunique() == 1
    result = cull(df, scorer=None)
    assert result.picks["group"].nunique() == 30
    assert "(30 files within 8.7 s)" in result.picks["reasons"].iloc[0][-1]


def test_file_times_spread_out_still_group_as_before() -> None:
    # A screenshot folder built up over days: pairs taken a second apart, a day between pairs.
    times = np.sort(np.r_[T0 + DAY * np.arange(5), T0 + DAY * np.arange(5) + 1.0])
    df = _folder(times)
    result = cull(df, scorer=None)
    assert result.copy_timed == 0
    assert sorted(result.picks.groupby("group").size().tolist()) == [2] * 5
    cols = ["image_uri", "group", "decision", "reasons"]
    pd.testing.assert_frame_equal(
        result.picks[cols], cull(df, scorer=None, grouping=OFF).picks[cols]
    )
    # Minutes apart, with a scene's gap (a setting for screenshots of one session): grouped
    # as before where alike, split where not.
    emb = _alike(6)
    emb[5] = -emb[5]  # the last screen shows something else: cosine ~-0.9 to the one before
    minutes = _folder(T0 + 180.0 * np.arange(6), emb)
    cfg = GroupingConfig(max_gap_s=600, max_group_s=3600)
    groups = cull(minutes, scorer=None, grouping=cfg).picks.set_index("image_uri")["group"]
    assert groups.nunique() == 2
    assert groups.value_counts().sort_values().tolist() == [1, 5]


def test_a_copy_among_timed_photos_leaves_them_grouped() -> None:
    # A camera burst (EXIF times) shot while a folder of downloads was copied beside it.
    rng = np.random.default_rng(2)
    burst = [
        _photo(
            f"/lib/DCIM/IMG_{i:04d}.JPG",
            T0 + i / 30.0,
            rng.normal(size=16),
            time_source="exif",
            camera="Sony ILCE-1 #1",
            sharpness=5.0 + i,
        )
        for i in range(5)
    ]
    base = np.stack([b["embedding"] for b in burst]).mean(axis=0)
    for b in burst:
        b["embedding"] = _unit(base + 0.05 * np.asarray(b["embedding"]))
    df = pd.concat([pd.DataFrame(burst), _folder(T0 + np.arange(12) * 0.002)], ignore_index=True)
    result = cull(df, scorer=None)
    p = result.picks.set_index("image_uri")
    assert p.loc[[b["image_uri"] for b in burst], "group"].nunique() == 1
    assert p.loc["/lib/DCIM/IMG_0004.JPG", "decision"] == "keep"
    assert result.copy_timed == 12
    assert result.picks["group"].nunique() == 13


def test_duplicates_in_a_copied_folder_are_still_found() -> None:
    emb = _alike(12, seed=4)
    rows = [_photo(f"/lib/dl/IMG_{i:04d}.PNG", T0 + 0.001 * i, emb[i]) for i in range(12)]
    # A byte copy of IMG_0003 and a resized re-save of IMG_0007 in the same copied folder.
    rows.append({**rows[3], "image_uri": "/lib/dl/saved/IMG_0003.PNG", "capture_ts": T0 + 0.02})
    near = _unit(emb[7] + 0.01 * emb[0])
    rows.append(
        {
            **rows[7],
            "image_uri": "/lib/dl/IMG_0007_small.PNG",
            "image_id": "ab" * 32,
            "embedding": near,
            "dhash": rows[7]["dhash"] ^ 0b101,  # two bits off: the same pixels resized
            "width": 585,
            "height": 1266,
            "capture_ts": T0 + 0.021,
        }
    )
    df = pd.DataFrame(rows)
    by = cull(df, scorer=None).picks.set_index("image_uri")
    assert by.loc["/lib/dl/saved/IMG_0003.PNG", "duplicate_kind"] == "exact"
    assert by.loc["/lib/dl/IMG_0007_small.PNG", "duplicate_kind"] == "near"
    assert by.loc["/lib/dl/IMG_0007_small.PNG", "decision"] == "reject"
    assert by.loc["/lib/dl/IMG_0007.PNG", "decision"] == "keep"
    assert (by["duplicate_kind"].notna()).sum() == 2
    # Chained into one burst, the re-save was only a sibling ranked against the others.
    old = cull(df, scorer=None, grouping=OFF).picks.set_index("image_uri")
    assert old.loc["/lib/dl/saved/IMG_0003.PNG", "duplicate_kind"] == "exact"
    assert pd.isna(old.loc["/lib/dl/IMG_0007_small.PNG", "duplicate_kind"])


def test_table_frame_keeps_64_bit_hashes_beside_a_null_and_floats_are_refused() -> None:
    high = 0x4000000000000000
    t = pa.table({"image_uri": ["a", "b", "c"], "dhash": pa.array([high, high | 0x1FF, None])})
    df = table_frame(t)
    assert df["dhash"].tolist()[:2] == [high, high | 0x1FF]
    assert df["dhash"].isna().tolist() == [False, False, True]
    lossy = t.to_pandas()  # float64: the two hashes read as one
    assert lossy["dhash"][0] == lossy["dhash"][1]
    lossy["image_id"] = ["1", "2", "3"]
    emb = np.eye(3, dtype=np.float32)
    with pytest.raises(DataError, match="lost bits"):
        mark_duplicates(lossy, emb, np.arange(3), GroupingConfig(), prefer=np.ones(3))
