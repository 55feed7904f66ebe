"""One exposure recorded twice in a burst: a resized export that kept its original's EXIF.

Such an export has its original's body and capture instant, so it lands in its original's group,
where pixels alone cannot tell a copy from a burst sibling (a sharp and a blurred frame of one
burst have nearly the same dHash). What names the exposure is the body plus the instant to a
fraction of a second: burst frames at <= 15 frames/s are >= 66 ms apart. Without sub-seconds
many frames share a reading, and nothing is marked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from keeper_core.culling import cull, has_subseconds
from keeper_core.grouping import GroupingConfig, find_duplicates
from keeper_core.quality import FEATURE_NAMES

BODY = "Canon EOS R6 #32021001234"
WALL = 1714557600.0  # 2024-05-01 10:00:00 UTC
HASH = 0x0F0F_3C3C_5A5A_A5A5


def _row(uri: str, second: str, *, emb: np.ndarray, **kw: object) -> dict:
    """A shot at 2024-05-01T12:00:<second>+02:00 (``second`` like "00.37" or "00")."""
    return {
        "image_uri": uri,
        "image_id": uri.encode().hex()[:64].ljust(64, "0"),
        "embedding": emb / np.linalg.norm(emb),
        "capture_ts": WALL + float(second),
        "capture_time": f"2024-05-01T12:00:{second}+02:00",
        "time_source": "exif_offset",
        "camera": BODY,
        "sequence": None,
        "dhash": HASH,
        **dict.fromkeys(FEATURE_NAMES, 1.0),
        "clip_dark": 0.0,
        "clip_bright": 0.0,
        "noise": 0.01,
        "brightness": 0.5,
        "sharpness": 5.0,
        "width": 6000,
        "height": 4000,
        **kw,
    }


def _burst(**export: object) -> pd.DataFrame:
    """A burst of three at 5 frames/s, and the middle frame's export (``export`` overrides).

    The frames' dHashes are 1-2 bits apart and their cosines ~0.9999: pixels and embeddings
    alone would call them copies of one another.
    """
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    frames = [base + 0.05 * rng.normal(size=16) for _ in range(3)]
    rows = [
        _row("/card/IMG_0041.JPG", "00.17", emb=frames[0], dhash=HASH ^ 0b1),
        _row("/card/IMG_0042.JPG", "00.37", emb=frames[1], sharpness=6.0),
        _row("/card/IMG_0043.JPG", "00.57", emb=frames[2], dhash=HASH ^ 0b11),
    ]
    # Downscaling makes the export measure sharper than its original and every sibling.
    copy: dict[str, Any] = {
        "second": "00.37",
        "emb": frames[1] + 1e-3 * rng.normal(size=16),
        "sharpness": 9.0,
        "width": 1500,
        "height": 1000,
        **export,
    }
    rows.append(_row("/web/IMG_0042.jpg", **copy))
    return pd.DataFrame(rows)


def _picks(df: pd.DataFrame) -> pd.DataFrame:
    p = cull(df, scorer=None).picks
    p["target"] = [p.loc[j, "image_uri"] if j >= 0 else None for j in p["duplicate_of"]]
    assert p["group"].nunique() == 1, "the export belongs in its original's burst"
    return p.set_index("image_uri")


def test_a_resized_export_with_its_originals_exif_is_a_duplicate_of_it() -> None:
    p = _picks(_burst())
    export = p.loc["/web/IMG_0042.jpg"]
    assert export["duplicate_kind"] == "near"
    assert export["target"] == "/card/IMG_0042.JPG"
    assert export["decision"] == "reject"
    assert any("near duplicate of IMG_0042.JPG" in r for r in export["reasons"])
    # The original (the larger file) is kept, though its export measured sharper.
    assert p.loc["/card/IMG_0042.JPG", "decision"] == "keep"
    assert p.loc[["/card/IMG_0041.JPG", "/card/IMG_0043.JPG"], "duplicate_kind"].isna().all()


def test_an_export_that_wrote_the_fraction_with_more_digits_is_the_same_instant() -> None:
    # SubSecTimeOriginal "37" (the camera's centiseconds) and "370" are one reading.
    p = _picks(_burst(second="00.370"))
    assert p.loc["/web/IMG_0042.jpg", "target"] == "/card/IMG_0042.JPG"


@pytest.mark.parametrize(
    ("export", "why"),
    [
        ({"second": "00.47"}, "another instant (100 ms on): another frame"),
        ({"second": "00.38"}, "10 ms apart: two frames of a fast burst"),
        ({"time_source": "mtime"}, "a file time names no exposure"),
        ({"dhash": HASH ^ 0b11111}, "5 dHash bits from the original: other pixels"),
    ],
)
def test_what_is_not_one_exposure_is_left_to_ranking(export: dict[str, object], why: str) -> None:
    p = _picks(_burst(**export))
    assert p["duplicate_kind"].isna().all(), why
    assert p.loc["/web/IMG_0042.jpg", "decision"] == "keep"  # the sharpest, as before


@pytest.mark.parametrize("second", ["00", "00.00"])
def test_whole_second_times_never_mark_a_burst(second: str) -> None:
    # A body writing whole seconds (or "00" sub-seconds for every frame) gives every frame of a
    # burst one reading; a sharp and a blurred frame share a dHash and a cosine near 1.
    rng = np.random.default_rng(1)
    base = rng.normal(size=16)
    df = pd.DataFrame(
        [
            _row(f"/card/IMG_{k}.JPG", second, emb=base + 1e-3 * rng.normal(size=16), sharpness=s)
            for k, s in ((1, 9.0), (2, 3.0), (3, 5.0))
        ]
    )
    p = cull(df, scorer=None).picks
    assert p["group"].nunique() == 1
    assert p["duplicate_kind"].isna().all()
    assert p.set_index("image_uri").loc["/card/IMG_1.JPG", "decision"] == "keep"


def test_no_body_recorded_names_no_exposure() -> None:
    # Two photos without Make/Model (or sent over HTTP without a camera key) at one sub-second
    # instant: "unknown" is no body, so they may be two phones.
    df = _burst(camera="unknown")
    df["camera"] = "unknown"
    p = cull(df, scorer=None).picks
    assert p["group"].nunique() == 1
    assert p["duplicate_kind"].isna().all()


# ------------------------------------------------------------------------------ find_duplicates


def _find(emb: np.ndarray | None = None, **kw: object) -> list[int]:
    """Two rows of one group, alike in pixels and embedding, one instant unless ``kw`` says."""
    args: dict[str, Any] = {
        "cameras": [BODY, BODY],
        "subsecond": np.array([True, True]),
        "moments": np.array([WALL + 0.37, WALL + 0.37]),
        "hashes": np.array([HASH, HASH]),
        "prefer": np.array([6000 * 4000, 1500 * 1000.0]),
        **kw,
    }
    if emb is None:
        emb = np.ones((2, 4), np.float32) / 2.0
    dup, kind = find_duplicates(
        ["a", "b"], emb, np.array([0, 0]), ["b", "a"], GroupingConfig(), **args
    )
    assert kind == ["near" if d >= 0 else None for d in dup]
    return dup.tolist()


def test_find_duplicates_same_exposure_rule() -> None:
    assert _find() == [-1, 0]  # the larger is kept, though its key sorts second
    assert _find(prefer=None) == [1, -1]  # equal size: the first by key
    # Another body (serial) at the very same instant: two cameras, two exposures.
    assert _find(cameras=[BODY, "Canon EOS R6 #32021005678"]) == [-1, -1]
    assert _find(subsecond=np.array([True, False])) == [-1, -1]
    assert _find(moments=np.array([WALL + 0.37, WALL + 0.371])) == [-1, -1]
    assert _find(moments=np.array([WALL + 0.37, np.nan])) == [-1, -1]
    assert _find(hashes=np.array([HASH, HASH ^ 0b11111])) == [-1, -1]
    unlike = np.array([[1.0, 0, 0, 0], [0.97, 0.243, 0, 0]], np.float32)  # cosine 0.97
    assert _find(emb=unlike / np.linalg.norm(unlike, axis=1, keepdims=True)) == [-1, -1]
    # Frame numbers: two known and different are two frames; one unknown (an export that
    # dropped the maker note) vetoes nothing.
    assert _find(sequences=np.array([4.0, 5.0])) == [-1, -1]
    assert _find(sequences=np.array([4.0, np.nan])) == [-1, 0]
    # No pixel evidence, no mark within a group (the cosine alone marks burst siblings).
    assert _find(hashes=None) == [-1, -1]
    # Without the exposure columns, a same-group pair is a burst sibling, as before.
    assert _find(cameras=None) == [-1, -1]


def test_marks_across_groups_are_the_same_with_the_exposure_rule() -> None:
    """The rule only adds marks: on a random library with exports in and out of their bursts,
    every row marked without it is marked the same way with it."""
    rng = np.random.default_rng(7)
    n = 240
    emb = rng.normal(size=(n, 8))
    src = rng.choice(n // 2, 60, replace=False)
    emb[n // 2 : n // 2 + 60] = emb[src] + 0.01 * rng.normal(size=(60, 8))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    groups = rng.integers(0, 40, size=n)
    groups[n // 2 : n // 2 + 30] = groups[src[:30]]  # half the copies in their source's group
    hashes = rng.integers(0, 2**62, size=n)
    hashes[n // 2 : n // 2 + 60] = hashes[src] ^ rng.integers(0, 4, size=60)
    moments = np.round(rng.uniform(0, 60, size=n), 2)
    moments[n // 2 : n // 2 + 60] = moments[src]
    cameras = [f"body {g % 3}" for g in groups]
    ids = [str(i) for i in range(n)]
    keys = [f"k{i:04d}" for i in range(n)]
    prefer = rng.uniform(1, 2, size=n)
    common = {"prefer": prefer, "hashes": hashes, "moments": moments}
    cfg = GroupingConfig(near_duplicate_similarity=0.95)
    before, kind_before = find_duplicates(ids, emb, groups, keys, cfg, **common)
    after, kind_after = find_duplicates(
        ids, emb, groups, keys, cfg, cameras=cameras, subsecond=np.ones(n, bool), **common
    )
    marked = before >= 0
    np.testing.assert_array_equal(after[marked], before[marked])
    assert [kind_after[i] for i in np.flatnonzero(marked)] == [
        kind_before[i] for i in np.flatnonzero(marked)
    ]
    added = np.flatnonzero(after != before)
    assert added.size, "some copies in their source's group are marked"
    assert (groups[added] == groups[after[added]]).all()
    # Every mark points at a more preferred row: chains end, never loop.
    assert (prefer[after[after >= 0]] > prefer[after >= 0]).all()


def test_has_subseconds() -> None:
    got = has_subseconds(
        pd.Series(
            [
                "2024-05-01T10:00:00.12+02:00",
                "2024-05-01T10:00:00.120",
                "2024-05-01T10:00:00.000001+00:00",
                "2024-05-01T10:00:00+02:00",
                "2024-05-01T10:00:00.00",
                "2024-05-01T10:00:00",
                None,
            ]
        )
    )
    assert got.tolist() == [True, True, True, False, False, False, False]


def test_of_a_raw_and_jpeg_pair_the_raw_is_kept_whatever_its_preview_size() -> None:
    # The camera's JPEG is full size, the RAW is read through a smaller embedded preview: the
    # RAW is still the original a photographer keeps (--copy-keepers copies it).
    df = _burst(second="00.37", width=6000, height=4000, sharpness=9.0)
    df.loc[df["image_uri"] == "/web/IMG_0042.jpg", "image_uri"] = "/card/IMG_0042.JPG"
    df.loc[df["image_uri"].eq("/card/IMG_0042.JPG").idxmax(), ["image_uri", "width", "height"]] = [
        "/card/IMG_0042.CR3",
        1620,
        1080,
    ]
    p = _picks(df)
    assert p.loc["/card/IMG_0042.JPG", "target"] == "/card/IMG_0042.CR3"
    assert p.loc["/card/IMG_0042.CR3", "decision"] == "keep"
    assert pd.isna(p.loc["/card/IMG_0042.CR3", "duplicate_kind"])
