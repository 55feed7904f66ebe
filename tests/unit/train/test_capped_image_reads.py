"""A file too large to decode is refused without being read whole first.

The decode limits (``max_bytes``, ``max_raw_bytes``) were checked only after the whole file had
been read into memory, so a multi-GB file with a JPEG signature cost its full size in RAM in a
decode task (whose memory is reserved for ``max(max_bytes, max_raw_bytes)``) before it was
refused. Files are sparse here: large on paper, nothing on disk.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from keeper_core.errors import ImageDecodeError, StorageError
from keeper_core.images import DecodeLimits
from keeper_train.jobs import embed, evaluate, pick

MIB = 1024 * 1024
SMALL = {"max_pixels": 64_000_000, "max_bytes": MIB, "max_raw_bytes": 2 * MIB, "min_side": 16}


def sparse_jpeg(path: Path, size: int) -> str:
    """A file of ``size`` bytes that starts like a JPEG (sparse: costs no disk)."""
    with path.open("wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(size)
    return str(path)


def peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result (or the exception it raised) and the peak Python allocation during it."""
    tracemalloc.start()
    try:
        try:
            result: Any = fn()
        except Exception as e:
            result = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_tracemalloc_sees_a_whole_file_read(tmp_path: Path) -> None:
    # The measure the tests below rely on: an uncapped read shows up in full.
    uri = sparse_jpeg(tmp_path / "big.jpg", 32 * MIB)
    _, peak = peak_bytes(lambda: Path(uri).read_bytes())
    assert peak >= 32 * MIB


def test_embed_read_of_a_huge_file_is_capped_at_the_larger_limit(tmp_path: Path) -> None:
    uri = sparse_jpeg(tmp_path / "huge.jpg", 64 * MIB)
    err, peak = peak_bytes(lambda: embed._read(uri, -1, -1, MIB, 2 * MIB))
    assert isinstance(err, ImageDecodeError)
    assert err.reason == "too_large"
    assert "limit 2097152" in err.detail
    assert peak < 4 * MIB  # at most max_raw_bytes + 1 was read, never the 64 MiB


def test_embed_read_still_reads_a_raw_sized_file_whole(tmp_path: Path) -> None:
    # Between max_bytes and max_raw_bytes: read (a RAW may be that large); the decoder decides.
    uri = sparse_jpeg(tmp_path / "mid.jpg", MIB + 10)
    assert len(embed._read(uri, -1, -1, MIB, 2 * MIB)) == MIB + 10


def test_prepare_batch_records_a_huge_file_as_too_large(tmp_path: Path) -> None:
    uri = sparse_jpeg(tmp_path / "huge.jpg", 64 * MIB)
    errors = tmp_path / "errors"
    out = embed.prepare_batch(
        {"image_uri": np.array([uri], dtype=object)},
        spec="keeper-tiny:random",
        limits=SMALL,
        draft=True,
        errors_dir=str(errors),
        run_id="r",
        decode="pil",
    )
    assert len(out["image_uri"]) == 0
    (part,) = sorted(errors.glob("*.parquet"))
    (row,) = pq.read_table(part).to_pylist()
    assert (row["stage"], row["reason"], row["retryable"]) == ("read", "too_large", False)


def test_read_failure_keeps_a_decode_reason() -> None:
    e = ImageDecodeError("too_large", "9 bytes > limit 1", source="s3://b/k")
    row = embed._read_failure("s3://b/k", "r", e)
    assert (row["stage"], row["reason"]) == ("read", "too_large")
    row = embed._read_failure("s3://b/k", "r", StorageError("s3://b/k", "gone"))
    assert row["reason"] == "unreadable"


def test_max_read_bytes_is_the_larger_byte_limit() -> None:
    assert DecodeLimits().max_read_bytes == 256 * MIB
    assert DecodeLimits(max_bytes=512 * MIB).max_read_bytes == 512 * MIB


@pytest.fixture
def over_default_cap(tmp_path: Path) -> str:
    return sparse_jpeg(tmp_path / "huge.jpg", DecodeLimits().max_read_bytes + 64 * MIB)


def test_evaluate_thumbnail_source_does_not_read_a_huge_file_whole(over_default_cap: str) -> None:
    got, peak = peak_bytes(lambda: evaluate.thumbnail_source(over_default_cap))
    assert got is None
    assert peak < DecodeLimits().max_read_bytes + 16 * MIB  # not the 320 MiB file


def test_pick_backfill_does_not_read_a_huge_file_whole(
    over_default_cap: str, tmp_path: Path
) -> None:
    frame, peak = peak_bytes(
        lambda: pick.backfill_batch(
            __import__("pandas").DataFrame({"image_uri": [over_default_cap]}),
            thumbnails=str(tmp_path / "thumbs"),
        )
    )
    assert not isinstance(frame, Exception), frame
    assert frame["dhash"].tolist() == [None]
    assert peak < DecodeLimits().max_read_bytes + 16 * MIB
