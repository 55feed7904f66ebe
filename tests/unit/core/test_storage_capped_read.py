"""storage.read_bytes(uri, max_bytes=...): one bounded read, never the whole of a larger object.

Against local tmp folders and a real moto_server (the s3_bucket fixture)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.storage import TooLargeError, read_bytes, write_bytes

CAP = 1000


def uri_for(where: str, tmp_path: Path, request: pytest.FixtureRequest, name: str) -> str:
    if where == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/capped/{name}"
    return str(tmp_path / "capped" / name)


class CountingClient:
    """The real client, recording each GET's arguments and the bytes its body handed out."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gets: list[dict[str, Any]] = []
        self.delivered = 0

    def get_object(self, **kw: Any) -> dict[str, Any]:
        self.gets.append(kw)
        resp = dict(self.real.get_object(**kw))
        body, outer = resp["Body"], self

        class Body:
            def read(self, amt: int | None = None) -> bytes:
                data: bytes = body.read(amt)
                outer.delivered += len(data)
                return data

            def close(self) -> None:
                body.close()

        resp["Body"] = Body()
        return resp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch, s3_bucket: str) -> CountingClient:
    fake = CountingClient(storage.s3_client())
    monkeypatch.setattr(storage, "s3_client", lambda: fake)
    return fake


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("size", [0, 1, CAP - 1, CAP])
def test_at_or_under_the_cap_is_read_whole(
    where: str, size: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = uri_for(where, tmp_path, request, f"ok-{size}.bin")
    data = bytes(i % 251 for i in range(size))
    write_bytes(uri, data)
    assert read_bytes(uri, max_bytes=CAP) == data
    assert read_bytes(uri, max_bytes=size) == data  # exactly at the cap
    assert read_bytes(uri) == data  # uncapped, as before


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("size", [CAP + 1, 5 * CAP])
def test_over_the_cap_is_refused_with_its_size(
    where: str, size: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = uri_for(where, tmp_path, request, f"big-{size}.bin")
    write_bytes(uri, b"x" * size)
    with pytest.raises(TooLargeError) as e:
        read_bytes(uri, max_bytes=CAP)
    assert isinstance(e.value, StorageError)  # callers catching StorageError still catch it
    assert e.value.uri == uri
    assert e.value.max_bytes == CAP
    assert e.value.size == size  # S3 says so in Content-Range, locally the stat
    assert not e.value.retryable
    assert e.value.cause == f"{size} bytes > limit {CAP}"
    with pytest.raises(TooLargeError):
        read_bytes(uri, max_bytes=0)


def test_s3_over_the_cap_transfers_at_most_cap_plus_one_bytes(
    counting: CountingClient, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/huge.bin"
    write_bytes(uri, b"y" * (50 * CAP))
    with pytest.raises(TooLargeError) as e:
        read_bytes(uri, max_bytes=CAP)
    assert e.value.size == 50 * CAP
    assert len(counting.gets) == 1  # one GET: no HEAD first, no retry
    assert counting.gets[0]["Range"] == f"bytes=0-{CAP}"
    assert counting.delivered == CAP + 1


def test_s3_at_the_cap_is_one_ranged_get(counting: CountingClient, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/exact.bin"
    write_bytes(uri, b"z" * CAP)
    assert read_bytes(uri, max_bytes=CAP) == b"z" * CAP
    assert [g["Range"] for g in counting.gets] == [f"bytes=0-{CAP}"]
    assert counting.delivered == CAP


def test_a_store_that_ignores_the_range_is_still_read_only_to_cap_plus_one(
    counting: CountingClient, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"s3://{s3_bucket}/ignored.bin"
    write_bytes(uri, b"w" * (20 * CAP))
    real_get = counting.real.get_object

    def no_range(**kw: Any) -> Any:
        kw.pop("Range", None)
        return real_get(**kw)

    monkeypatch.setattr(counting.real, "get_object", no_range)
    with pytest.raises(TooLargeError) as e:
        read_bytes(uri, max_bytes=CAP)
    assert e.value.size == 20 * CAP  # from Content-Length when no Content-Range came back
    assert counting.delivered == CAP + 1


def test_local_over_the_cap_reads_at_most_cap_plus_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"q" * (10 * CAP))
    asked: list[int] = []
    real_open = Path.open

    def spy_open(self: Path, *a: Any, **kw: Any) -> Any:
        f = real_open(self, *a, **kw)
        real_read = f.read

        class Spy:
            def __enter__(self) -> Spy:
                return self

            def __exit__(self, *exc: object) -> None:
                f.close()

            def fileno(self) -> int:
                return f.fileno()

            def read(self, n: int = -1) -> bytes:
                asked.append(n)
                data: bytes = real_read(n)
                return data

        return Spy()

    monkeypatch.setattr(Path, "open", spy_open)
    with pytest.raises(TooLargeError) as e:
        read_bytes(str(path), max_bytes=CAP)
    assert e.value.size == 10 * CAP
    assert asked == [CAP + 1]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_errors_map_as_read_bytes_maps_them(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    missing = uri_for(where, tmp_path, request, "missing.bin")
    with pytest.raises(StorageError) as e:
        read_bytes(missing, max_bytes=CAP)
    assert not isinstance(e.value, TooLargeError)
    assert e.value.uri == missing
    assert "no such" in e.value.cause
    assert not e.value.retryable
    with pytest.raises(ValueError, match="max_bytes"):
        read_bytes(missing, max_bytes=-1)


def test_a_local_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="directory"):
        read_bytes(str(tmp_path), max_bytes=CAP)


def test_s3_transfer_failures_are_retried_as_read_bytes_retries_them(
    counting: CountingClient, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ResponseStreamingError

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    uri = f"s3://{s3_bucket}/flaky.bin"
    write_bytes(uri, b"0123456789")
    real_get = counting.real.get_object
    left = [2]

    def flaky(**kw: Any) -> Any:
        resp = dict(real_get(**kw))
        if left[0]:
            left[0] -= 1

            class Broken:
                def read(self, amt: int | None = None) -> bytes:
                    raise ResponseStreamingError(error="connection reset")

                def close(self) -> None:
                    pass

            resp["Body"] = Broken()
        return resp

    monkeypatch.setattr(counting.real, "get_object", flaky)
    assert read_bytes(uri, max_bytes=CAP) == b"0123456789"
    assert len(counting.gets) == 3
    left[0] = 99
    with pytest.raises(StorageError, match="transfer failed") as e:
        read_bytes(uri, max_bytes=CAP)
    assert e.value.retryable


def test_too_large_error_pickles_as_itself() -> None:
    e = TooLargeError("s3://b/k", 10, 20)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is TooLargeError
    assert (back.uri, back.max_bytes, back.size, back.cause) == ("s3://b/k", 10, 20, e.cause)
    assert str(back) == str(e)


def test_read_head_and_read_range_stay_bounded_when_the_store_ignores_the_range(
    counting: CountingClient, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # read_head returned the whole object (not its first n bytes) and read_range read a whole
    # shard to refuse one member.
    uri = f"s3://{s3_bucket}/shard.tar"
    blob = bytes(range(256)) * 4096  # 1 MiB
    write_bytes(uri, blob)
    real_get = counting.real.get_object

    def no_range(**kw: Any) -> Any:
        kw.pop("Range", None)
        return real_get(**kw)

    monkeypatch.setattr(counting.real, "get_object", no_range)
    assert storage.read_head(uri, 5) == blob[:5]
    assert counting.delivered <= 5
    counting.delivered = 0
    with pytest.raises(DataError, match="ignored the range"):
        storage.read_range(uri, 1000, 10)
    assert counting.delivered <= 11
