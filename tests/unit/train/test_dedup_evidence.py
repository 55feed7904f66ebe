"""keeper dedup reads every piece of evidence keeper pick's marking does, exactly, and finds a
photo's copies however many places it is stored in and whatever an index scored them.

Tables are written by keeper embed's own writer (``write_batch``); the photos' files need not
exist (the report's thumbnails of missing files are only left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from keeper_core import storage
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs import dedup
from keeper_train.jobs import index as index_job
from keeper_train.jobs.embed import write_batch

SPEC = "keeper-tiny:random"


def unit(v: Any) -> np.ndarray:
    x = np.asarray(v, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_part(
    table: Path,
    names: list[str],
    ids: list[str],
    emb: np.ndarray,
    *,
    sharpness: list[float],
    dhash: list[int] | None = None,
    **extra: Any,
) -> list[str]:
    """One part of an embedding table at ``table``; returns the rows' URIs."""
    n = len(names)
    uris = [str(table.parent / "photos" / name) for name in names]
    batch: dict[str, Any] = {
        "image_uri": np.array(uris, dtype=object),
        "image_id": np.array(ids, dtype=object),
        "embedding": np.asarray(emb, np.float32),
        "t_decode": np.zeros(n),
        "t_embed": np.zeros(n),
    }
    for name in FEATURE_NAMES:
        batch[name] = np.full(n, 1000) if name in ("width", "height") else np.full(n, 0.5)
    batch["sharpness"] = np.asarray(sharpness, np.float64)
    if dhash is not None:
        batch["dhash"] = np.asarray(dhash, np.int64)
    batch.update({k: np.asarray(v, dtype=object) for k, v in extra.items()})
    write_batch(batch, spec=SPEC, embeddings_dir=storage.join(str(table), "embeddings"))
    return uris


def run(table: Path, out: Path, **kw: Any) -> tuple[dedup.DedupSummary, pd.DataFrame]:
    s = dedup.run(dedup.DedupConfig(table=str(table), output=str(out), **kw))
    groups = pd.read_parquet(out / "groups.parquet") if s.groups else pd.DataFrame()
    return s, groups


def test_a_part_without_dhash_leaves_every_hash_exact(tmp_path: Path) -> None:
    # Two photos alike to CLIP whose dHashes are 9 bits apart (the bound is 8): not copies. A
    # part written before dhash existed read the column as float64, hashes lost their low bits
    # and the two read 0 bits apart: a near copy.
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    a, b = unit(base + 0.01 * rng.normal(size=64)), unit(base + 0.01 * rng.normal(size=64))
    table = tmp_path / "table"
    high = 0x4000000000000000
    write_part(table, ["a.jpg", "b.jpg"], ["aa01", "bb02"], np.stack([a, b]),
               sharpness=[1.0, 2.0], dhash=[high, high | 0x1FF])  # fmt: skip
    write_part(table, ["old.jpg"], ["cc03"], unit(rng.normal(size=(1, 64))), sharpness=[1.0])
    s, _ = run(table, tmp_path / "out")
    assert (s.groups, s.duplicates) == (0, 0)


def test_an_export_that_dropped_its_utc_offset_is_a_copy(tmp_path: Path) -> None:
    # Same wall clock, no OffsetTimeOriginal: its capture_ts is 2 h from the original's. keeper
    # pick reads capture_time's offset and calls it a copy; dedup did not read capture_time.
    rng = np.random.default_rng(1)
    base = rng.normal(size=64)
    emb = np.stack([unit(base + 0.005 * rng.normal(size=64)) for _ in range(2)])
    wall = 1714557600.0
    table = tmp_path / "table"
    uris = write_part(
        table, ["orig.jpg", "export.jpg"], ["aa01", "bb02"], emb, sharpness=[2.0, 1.0],
        dhash=[0x1234, 0x1234],
        capture_time=["2024-05-01T10:00:00+02:00", "2024-05-01T10:00:00"],
        capture_ts=[wall - 7200, wall], time_source=["exif_offset", "exif"],
    )  # fmt: skip
    s, groups = run(table, tmp_path / "out")
    assert (s.groups, s.near) == (1, 1)
    assert groups.set_index("image_uri").loc[uris[1], "duplicate_of"] == uris[0]


def test_a_copy_with_a_rating_saved_in_is_exact(tmp_path: Path) -> None:
    # The same but a JPEG's metadata segment: another image_id, the same content_id.
    rng = np.random.default_rng(2)
    e, o = unit(rng.normal(size=64)), unit(rng.normal(size=64))
    table = tmp_path / "table"
    write_part(
        table, ["a.jpg", "a-rated.jpg", "other.jpg"], ["aa01", "aa02", "cc03"],
        np.stack([e, e, o]), sharpness=[2.0, 1.0, 0.5], dhash=[0x1234, 0x1234, 0x9999 << 30],
        content_id=["c0de", "c0de", "c1de"],
    )  # fmt: skip
    s, _ = run(table, tmp_path / "out")
    assert (s.groups, s.exact, s.near) == (1, 1, 0)


@pytest.mark.parametrize("copies", [3, 12])
def test_a_photo_stored_in_more_places_than_k_still_finds_its_export(
    tmp_path: Path, copies: int
) -> None:
    # An original and its export each stored in `copies` folders: with k=10, a search of each
    # row found only its own copies once they were 11.
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=64))
    y = unit(x + 0.05 * unit(rng.normal(size=64)))
    others = unit(rng.normal(size=(20, 64)))
    names = [f"f{i}/orig.jpg" for i in range(copies)] + [f"f{i}/export.jpg" for i in range(copies)]
    table = tmp_path / "table"
    write_part(
        table, [*names, *(f"o{i}.jpg" for i in range(20))],
        ["aa01"] * copies + ["bb02"] * copies + [f"cc{i:02x}" for i in range(20)],
        np.concatenate([np.tile(x, (copies, 1)), np.tile(y, (copies, 1)), others]),
        sharpness=[2.0] * copies + [1.0] * copies + [0.5] * 20,
        dhash=[0xABC] * copies + [0xABD] * copies + [(i + 1) << 40 for i in range(20)],
    )  # fmt: skip
    s, groups = run(table, tmp_path / "out", k=10)
    assert s.groups == 1
    # The original's other copies are exact; the export and its copies near copies of it.
    assert (s.exact, s.near) == (copies - 1, copies)
    assert groups["image_uri"].str.endswith("export.jpg").sum() == copies


def test_a_quantised_index_does_not_drop_copies_its_scores_put_below_the_threshold(
    tmp_path: Path,
) -> None:
    # 300 pairs at cosine ~0.98 (the threshold), found by a usearch i8 index whose scores read
    # a few thousandths low: a cut on those scores dropped most of them.
    pytest.importorskip("usearch")
    rng = np.random.default_rng(0)
    n, d = 300, 512
    a = unit(rng.normal(size=(n, d)))
    b = unit(a + 0.193 * unit(rng.normal(size=(n, d))))
    table = tmp_path / "table"
    write_part(
        table, [f"{i}.jpg" for i in range(2 * n)], [f"{i:08x}" for i in range(2 * n)],
        np.concatenate([a, b]), sharpness=list(np.arange(2 * n, dtype=float)),
        dhash=list(np.concatenate([np.arange(n), np.arange(n)]) << 20),
    )  # fmt: skip
    exact, _ = run(table, tmp_path / "exact")
    index_job.run(index_job.IndexConfig(table=str(table), backend="usearch", dtype="i8"))
    indexed, _ = run(table, tmp_path / "indexed", index=str(table / "index"))
    assert exact.groups > 250  # the pairs the float32 tests pass
    assert (indexed.groups, indexed.duplicates) == (exact.groups, exact.duplicates)
