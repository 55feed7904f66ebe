"""keeper_core.culling.cull on random libraries: what must hold whatever the photos are.

Seeded libraries (``KEEPER_HISTORIES=400`` runs more): bursts and single shots on two bodies and
unknown cameras, recorded times with and without sub-seconds and UTC offsets, file times,
photos without a time, RAW files, byte copies and resized exports, features anywhere in their
range. Whatever they hold:

- one row per photo, each photo once, in group order;
- the same picks however the rows come in (the library as listed in another order);
- a group whose photos are all duplicates keeps none, one with a single other photo keeps it
  or demotes it to alternate (flawed), any other keeps exactly one; group sizes and ids agree
  with the rows;
- a duplicate points at another photo that is not itself a duplicate, is rejected, and an exact
  one holds the same bytes or content.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from keeper_core.culling import cull
from keeper_core.grouping import GroupingConfig
from keeper_core.quality import FEATURE_NAMES

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "24"))
CAMERAS = ("Canon EOS R5 012345", "Sony ILCE-7M4 998877", "unknown")


def _time(ts: float, offset_h: int | None, subseconds: bool) -> str:
    zone = timezone(timedelta(hours=offset_h)) if offset_h is not None else UTC
    t = datetime.fromtimestamp(ts, zone)
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if subseconds:
        text += f".{round(t.microsecond / 10_000) % 100:02d}"
    return text + (
        t.strftime("%z")[:3] + ":" + t.strftime("%z")[3:] if offset_h is not None else ""
    )


def library(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []
    for s in range(int(rng.integers(1, 8))):
        camera = str(rng.choice(CAMERAS))
        t0 = float(rng.uniform(1.7e9, 1.7e9 + 86_400))
        source = str(rng.choice(["exif", "exif_offset", "mtime"]))
        timed = rng.random() > 0.15
        offset = int(rng.integers(-5, 6)) if source == "exif_offset" else None
        subseconds = source != "mtime" and rng.random() < 0.6
        base = rng.normal(size=16)
        step = float(rng.choice([0.066, 0.1, 0.5, 3.0]))
        for k in range(int(rng.integers(1, 7))):
            emb = base + float(rng.choice([0.005, 0.05, 0.5])) * rng.normal(size=16)
            ts = t0 + k * step
            raw = rng.random() < 0.1
            w, h = [(6000, 4000), (4000, 3000), (1600, 1200)][int(rng.integers(3))]
            ident = f"{seed:04x}{s:02x}{k:02x}".ljust(64, "0")
            rows.append(
                {
                    "image_uri": f"/lib/{s}/IMG_{k:04d}.{'CR3' if raw else 'JPG'}",
                    "image_id": ident,
                    "content_id": ident,
                    "embedding": emb / np.linalg.norm(emb),
                    "capture_ts": ts if timed else np.nan,
                    "capture_time": _time(ts, offset, subseconds) if timed else None,
                    "time_source": source if timed else None,
                    "camera": camera,
                    "sequence": k if rng.random() < 0.3 else np.nan,
                    "dhash": int(rng.integers(0, 2**62)),
                    **{f: float(rng.uniform(0.0, 1.0)) for f in FEATURE_NAMES},
                    "sharpness": float(rng.uniform(0.5, 12.0)),
                    "noise": float(rng.uniform(0.0, 0.1)),
                    "clip_dark": float(rng.uniform(0.0, 0.3)),
                    "clip_bright": float(rng.uniform(0.0, 0.3)),
                    "width": w,
                    "height": h,
                }
            )
    for _ in range(int(rng.integers(0, 4))):  # copies and exports of some of them
        src = dict(rows[int(rng.integers(len(rows)))])
        name = f"/lib/copies/{len(rows)}_{str(src['image_uri']).rsplit('/', 1)[1]}"
        if rng.random() < 0.5:  # a byte copy (a card imported twice)
            rows.append({**src, "image_uri": name})
        else:  # a resized export that kept the EXIF
            emb = np.asarray(src["embedding"]) + 0.003 * rng.normal(size=16)
            rows.append(
                {
                    **src,
                    "image_uri": name.rsplit(".", 1)[0] + ".jpg",
                    "image_id": f"e{len(rows):03x}".ljust(64, "f"),
                    "content_id": f"e{len(rows):03x}".ljust(64, "f"),
                    "embedding": emb / np.linalg.norm(emb),
                    "dhash": int(src["dhash"]) ^ 1,  # type: ignore[call-overload]
                    "width": 1024,
                    "height": 683,
                }
            )
    return pd.DataFrame(rows)


def _comparable(picks: pd.DataFrame) -> pd.DataFrame:
    out = picks.drop(columns=["embedding"]).reset_index(drop=True)
    out["reasons"] = out["reasons"].map(tuple)
    return out


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_libraries_cull_to_one_consistent_table(seed: int) -> None:
    df = library(seed)
    grouping = GroupingConfig()
    p = cull(df, scorer=None, grouping=grouping).picks

    assert len(p) == len(df)
    assert sorted(p["image_uri"]) == sorted(df["image_uri"])
    assert p["group"].is_monotonic_increasing
    shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    again = cull(shuffled, scorer=None, grouping=grouping).picks
    pd.testing.assert_frame_equal(_comparable(again), _comparable(p))

    dup = p["duplicate_of"].to_numpy()
    for g, rows in p.groupby("group"):
        assert (rows["group_size"] == len(rows)).all()
        assert rows["group_id"].nunique() == 1
        keeps = int((rows["decision"] == "keep").sum())
        candidates = rows[rows["duplicate_of"] < 0]
        if len(candidates) == 1:  # a single shot is never rejected: kept, or demoted if flawed
            assert candidates["decision"].isin(["keep", "alternate"]).all(), g
        else:
            assert keeps == (1 if len(candidates) else 0), (g, rows[["image_uri", "decision"]])
    assert p.groupby("group_id")["group"].nunique().eq(1).all()
    for i in np.flatnonzero(dup >= 0):
        j = int(dup[i])
        assert j != i
        assert dup[j] < 0, f"{p.loc[i, 'image_uri']} -> {p.loc[j, 'image_uri']}, itself a duplicate"
        assert p.loc[i, "decision"] == "reject"
        if p.loc[i, "duplicate_kind"] == "exact":
            assert p.loc[j, "content_id"] == p.loc[i, "content_id"]
    assert (p.loc[dup < 0, "duplicate_kind"].isna()).all()
