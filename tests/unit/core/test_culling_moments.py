"""Near-duplicate moments: an export that dropped OffsetTimeOriginal is still its original's moment.

The original's capture_ts is a UTC instant (EXIF with OffsetTimeOriginal); an export that kept
DateTimeOriginal but not the offset has the camera's wall clock read as UTC, hours away. The
moment guard must compare wall clock with wall clock there, and instants with instants.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from keeper_core.culling import cull, utc_offsets
from keeper_core.grouping import GroupingConfig, find_duplicates
from keeper_core.quality import FEATURE_NAMES

WALL = 1714557600.0  # 2024-05-01 10:00:00, the wall clock read as UTC


def _row(uri: str, ts: float, time: str, source: str, emb: np.ndarray, **kw: object) -> dict:
    features = {
        **dict.fromkeys(FEATURE_NAMES, 1.0),
        "clip_dark": 0.0,
        "clip_bright": 0.0,
        "noise": 0.01,
        "brightness": 0.5,
        "sharpness": 5.0,
        "width": 4000,
        "height": 3000,
    }
    return {
        "image_uri": uri,
        "image_id": uri.encode().hex()[:64].ljust(64, "0"),
        "embedding": emb / np.linalg.norm(emb),
        "capture_ts": ts,
        "capture_time": time,
        "time_source": source,
        "camera": "Apple iPhone 15",
        "dhash": 123,
        **features,
        **kw,
    }


def _library(export_ts: float, export_time: str, export_source: str) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    return pd.DataFrame(
        [
            _row("/lib/IMG_1.HEIC", WALL - 7200, "2024-05-01T10:00:00+02:00", "exif_offset", base),
            _row(
                "/lib/IMG_2.HEIC",
                WALL - 7200 + 60,
                "2024-05-01T10:01:00+02:00",
                "exif_offset",
                rng.normal(size=16),
                dhash=999,
            ),
            _row(
                "/exports/IMG_1.jpg",
                export_ts,
                export_time,
                export_source,
                base + 1e-3,
                width=2000,
                height=1500,
            ),
        ]
    )


def test_export_without_offset_is_a_near_duplicate_of_its_original() -> None:
    df = _library(WALL, "2024-05-01T10:00:00", "exif")
    p = cull(df, scorer=None).picks.set_index("image_uri")
    assert p.loc["/exports/IMG_1.jpg", "duplicate_kind"] == "near"
    target = int(p.loc["/exports/IMG_1.jpg", "duplicate_of"])
    assert cull(df, scorer=None).picks.loc[target, "image_uri"] == "/lib/IMG_1.HEIC"
    assert p.loc["/exports/IMG_1.jpg", "decision"] == "reject"
    assert p.loc["/lib/IMG_1.HEIC", "decision"] == "keep"


def test_wall_clocks_hours_apart_are_still_different_moments() -> None:
    # The same pixels recorded at 13:00 wall clock (no offset): a re-shoot, not a copy.
    df = _library(WALL + 3 * 3600, "2024-05-01T13:00:00", "exif")
    p = cull(df, scorer=None).picks.set_index("image_uri")
    assert p["duplicate_kind"].isna().all()


def test_instants_compare_as_instants() -> None:
    # 10:00 at +02:00 and 09:00 at +01:00 are one instant: a copy re-stamped in another zone.
    df = _library(WALL - 7200, "2024-05-01T09:00:00+01:00", "exif_offset")
    # Same camera, same instant: one group with the original, so a burst sibling, not marked.
    p = cull(df, scorer=None).picks.set_index("image_uri")
    assert p.loc["/exports/IMG_1.jpg", "group"] == p.loc["/lib/IMG_1.HEIC", "group"]
    # Same wall clock, offsets two hours apart: two instants two hours apart, never copies.
    emb = np.stack([np.ones(4), np.ones(4)]) / 2.0
    dup, _ = find_duplicates(
        ["a", "b"],
        emb.astype(np.float32),
        np.array([0, 1]),
        ["a", "b"],
        GroupingConfig(),
        moments=np.array([WALL - 7200, WALL]),
        offsets=np.array([7200.0, 0.0]),
    )
    assert dup.tolist() == [-1, -1]


def test_utc_offsets() -> None:
    got = utc_offsets(
        pd.Series(
            [
                "2024-05-01T10:00:00+02:00",
                "2024-05-01T10:00:00.12-05:30",
                "2024-05-01T10:00:00+00:00",
                "2024-05-01T10:00:00",
                "2024-05-01T10:00:00.500",
                None,
            ]
        )
    )
    assert got[:3].tolist() == [7200.0, -19800.0, 0.0]
    assert np.isnan(got[3:]).all()
