"""storage.read_if_exists: one request for a file that may be absent, and write_sidecar using it
(a new sidecar on S3 is a GET and a PUT, no HEAD)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import import_benchmark

from keeper_core import storage
from keeper_core.errors import StorageError
from keeper_core.handback import read_sidecar, write_sidecar


def test_local_absent_present_and_errors(tmp_path: Path) -> None:
    assert storage.read_if_exists(str(tmp_path / "none.xmp")) is None
    assert storage.read_if_exists(str(tmp_path / "no" / "folder" / "x.xmp")) is None
    (tmp_path / "a.xmp").write_bytes(b"abc")
    assert storage.read_if_exists(str(tmp_path / "a.xmp")) == b"abc"
    (tmp_path / "empty.xmp").write_bytes(b"")
    assert storage.read_if_exists(str(tmp_path / "empty.xmp")) == b""
    (tmp_path / "dir.xmp").mkdir()
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_if_exists(str(tmp_path / "dir.xmp"))
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match="not a directory"):
        storage.read_if_exists(str(tmp_path / "file" / "x.xmp"))


def test_s3_absent_present_and_a_missing_bucket(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/xmp/IMG_1.xmp"
    assert storage.read_if_exists(uri) is None
    storage.write_bytes(uri, b"<x/>")
    assert storage.read_if_exists(uri) == b"<x/>"
    with pytest.raises(StorageError, match=r"NoSuchBucket|bucket does not exist|no such bucket"):
        storage.read_if_exists("s3://keeper-no-such-bucket-7f3a/IMG_1.xmp")


@pytest.fixture
def s3_calls() -> Iterator[Counter[str]]:
    """The S3 API calls keeper's client makes in the test, by operation name."""
    with import_benchmark("sidecar_s3_requests").counted_s3_calls() as calls:
        yield calls


def test_a_new_sidecar_on_s3_is_one_read_and_one_write(
    s3_bucket: str, s3_calls: Counter[str]
) -> None:
    uri = f"s3://{s3_bucket}/out/xmp/IMG_0001.xmp"
    fields = {"group": "g000001", "rank": "1"}
    assert write_sidecar(uri, rating=5, label="Green", keeper_fields=fields).changed
    assert dict(s3_calls) == {"GetObject": 1, "PutObject": 1}
    s3_calls.clear()
    assert not write_sidecar(uri, rating=5, label="Green", keeper_fields=fields).changed
    assert dict(s3_calls) == {"GetObject": 1}  # a re-run: read, nothing to write
    assert read_sidecar(uri)["Xmp.xmp.Rating"] == "5"
