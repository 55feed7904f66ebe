"""WebDataset shards on ``s3://`` (a real moto_server): listed, indexed by ranged GETs only, and
read member by member, byte for byte as the same shards on disk; and storage.read_range on S3."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

from keeper_core import storage, webdataset
from keeper_core.errors import DataError, StorageError
from keeper_core.webdataset import (
    index_shard,
    is_webdataset,
    list_shards,
    load_or_index,
    read_member,
)

pytestmark = pytest.mark.integration
MAX = 1 << 20


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write_shards(folder: Path, n_shards: int, per_shard: int) -> dict[str, bytes]:
    """img2dataset's layout: jpg + txt + json per sample, parquet and stats sidecars per shard.
    Returns each image's bytes by ``<shard name>#<member>``."""
    folder.mkdir(parents=True)
    truth = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                truth[f"{s:05d}.tar#{key}.jpg"] = data = _jpeg(s * 100 + i)
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.txt", f"caption {key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")
        (folder / f"{s:05d}_stats.json").write_text("{}")
    return truth


def _upload(folder: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            s3.put_object(
                Bucket=bucket, Key=f"{prefix}/{p.relative_to(folder)}", Body=p.read_bytes()
            )


@contextlib.contextmanager
def s3_gets() -> Iterator[list[dict[str, Any]]]:
    """The parameters of every GetObject keeper_core.storage's client sends."""
    calls: list[dict[str, Any]] = []
    events = storage.s3_client().meta.events
    handler_id = f"gets-{uuid.uuid4().hex}"

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))  # the API's parameters: Bucket, Key, Range

    events.register("before-parameter-build.s3.GetObject", record, unique_id=handler_id)
    try:
        yield calls
    finally:
        events.unregister("before-parameter-build.s3.GetObject", unique_id=handler_id)


def test_s3_shards_index_and_read_like_local(s3_bucket: str, tmp_path: Path) -> None:
    truth = _write_shards(tmp_path / "shards", 3, 6)
    _upload(tmp_path / "shards", s3_bucket, "corpus/shards")
    prefix = f"s3://{s3_bucket}/corpus/shards"
    want = [f"{prefix}/{i:05d}.tar" for i in range(3)]

    assert is_webdataset(prefix)
    assert is_webdataset(f"{prefix}/{{00000..00002}}.tar")
    assert list_shards(prefix) == want
    assert list_shards(f"{prefix}/{{00000..00002}}.tar") == want
    assert list_shards(f"{prefix}/00001.tar") == want[1:2]
    with pytest.raises(DataError, match=r"1 of 4 shards do not exist, first .*00003\.tar"):
        list_shards(f"{prefix}/{{00000..00003}}.tar")
    with pytest.raises(DataError, match=r"no \.tar shards"):
        list_shards(f"s3://{s3_bucket}/elsewhere")
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="corpus/loose.jpg", Body=_jpeg(0))
    assert not is_webdataset(f"s3://{s3_bucket}/corpus")  # a loose image beside the shards

    for shard in want:
        local = index_shard(str(tmp_path / "shards" / shard.rsplit("/", 1)[-1]))
        with s3_gets() as gets:
            index = index_shard(shard)
        assert gets, "indexing read nothing"
        assert all("Range" in g for g in gets), "indexing must use ranged GETs only"
        assert index.error is None
        assert index.samples == local.samples
        assert index.size == local.size
        for row in index.rows():
            name = row["image_uri"].rsplit("/", 1)[-1]
            assert (
                read_member(row["image_uri"], row["offset"], row["size"], max_bytes=MAX)
                == (truth[name])
            )
            assert row["caption"] == f"caption {row['key']}"


def test_s3_index_skips_members_larger_than_a_chunk(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            _add(tar, f"{i}.jpg", big)
            _add(tar, f"{i}.txt", b"c")
    uri = f"s3://{s3_bucket}/00000.tar"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="00000.tar", Body=path.read_bytes())
    monkeypatch.setattr(webdataset, "_INDEX_CHUNK", 4096)
    with s3_gets() as gets:
        index = index_shard(uri)
    fetched = 0
    for g in gets:
        a, b = g["Range"].removeprefix("bytes=").split("-")
        fetched += int(b) - int(a) + 1
    assert index.error is None
    assert [r["caption"] for r in index.rows()] == ["c"] * 3
    assert fetched < 10 * 4096 < path.stat().st_size  # headers and captions, not the images
    row = index.rows()[2]
    assert read_member(row["image_uri"], row["offset"], row["size"], max_bytes=MAX) == big


def test_s3_cached_index_does_not_read_the_shard_again(s3_bucket: str, tmp_path: Path) -> None:
    _write_shards(tmp_path / "shards", 1, 4)
    _upload(tmp_path / "shards", s3_bucket, "shards")
    shard = f"s3://{s3_bucket}/shards/00000.tar"
    cache_dir = f"s3://{s3_bucket}/out/_shards"
    first = load_or_index(shard, cache_dir)
    with s3_gets() as gets:
        again = load_or_index(shard, cache_dir)
    assert again == first
    assert [g["Key"] for g in gets] == [f"out/_shards/{webdataset.index_cache_name(shard)}"]


def test_read_range_s3(s3_bucket: str) -> None:
    data = bytes(range(256)) * 40
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="blob.bin", Body=data)
    uri = f"s3://{s3_bucket}/blob.bin"
    assert storage.read_range(uri, 0, len(data)) == data
    assert storage.read_range(uri, 1000, 333) == data[1000:1333]
    assert storage.read_range(uri, len(data) - 1, 1) == data[-1:]
    with s3_gets() as gets:
        assert storage.read_range(uri, 10, 0) == b""
    assert gets == []
    with pytest.raises(DataError, match=r"read 40 of 100 bytes at offset 10200"):
        storage.read_range(uri, len(data) - 40, 100)
    with pytest.raises(DataError, match="read 0 of 5 bytes"):
        storage.read_range(uri, len(data) + 10, 5)
    with pytest.raises(StorageError, match="no such object") as e:
        storage.read_range(f"s3://{s3_bucket}/absent.bin", 0, 5)
    assert not e.value.retryable
