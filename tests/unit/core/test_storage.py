"""keeper_core.storage against local tmp folders and a real moto_server (the s3_bucket fixture)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from botocore.response import StreamingBody

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.storage import (
    ObjectInfo,
    download_cached,
    exists,
    is_s3,
    join,
    list_files,
    object_info,
    read_bytes,
    read_parquet,
    s3_client,
    split_s3,
    with_retries,
    write_bytes,
    write_parquet,
)

# ---------------------------------------------------------------------------------------------
# URIs


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.jpg", ("bucket", "a/b.jpg")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/dir/", ("my.bucket-1", "dir/")),
    ],
)
def test_split_s3(uri: str, expected: tuple[str, str]) -> None:
    assert is_s3(uri)
    assert split_s3(uri) == expected


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3://b/x", "s3://-bad/x", "/local/path"])
def test_split_s3_rejects_malformed(uri: str) -> None:
    with pytest.raises(StorageError) as e:
        split_s3(uri)
    assert e.value.uri == uri


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://b", ("x", "y.pt"), "s3://b/x/y.pt"),
        ("s3://b/runs/", ("/a/", "x.pt"), "s3://b/runs/a/x.pt"),
        ("s3://b/", (), "s3://b/"),
        ("/data", ("a", "b.jpg"), "/data/a/b.jpg"),
        ("/", ("a",), "/a"),
        ("rel/dir/", ("/a",), "rel/dir/a"),
        ("file:///data", ("a",), "file:///data/a"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join(base, *parts) == expected


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        read_bytes("gs://bucket/x")


# ---------------------------------------------------------------------------------------------
# Bytes, existence, object info


def test_local_bytes_round_trip_is_atomic_and_makes_parents(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "x.bin"
    write_bytes(str(target), b"hello")
    assert read_bytes(str(target)) == b"hello"
    write_bytes(f"file://{target}", b"second")  # overwrite through the file:// form
    assert read_bytes(f"file://{target}") == b"second"
    # Only the target remains: the temporary file was renamed, not left behind.
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]


def test_local_errors_name_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(StorageError, match="no such file") as e:
        read_bytes(missing)
    assert e.value.uri == missing
    with pytest.raises(StorageError, match="is a directory"):
        read_bytes(str(tmp_path))
    with pytest.raises(StorageError, match="no such directory"):
        list_files(missing)


def test_s3_bytes_round_trip_exists_and_info(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/dir/a.bin"
    data = b"\x00\x01keeper" * 100
    write_bytes(uri, data)
    assert read_bytes(uri) == data
    # moto, like S3, gives a single-part object the MD5 of its bytes as ETag.
    info = object_info(uri)
    assert (info.size, info.etag) == (800, hashlib.md5(data).hexdigest())
    assert info.mtime is not None
    assert abs(info.mtime - time.time()) < 300
    assert exists(uri)
    assert exists(f"s3://{s3_bucket}/dir")  # a non-empty prefix, like a local folder
    assert exists(f"s3://{s3_bucket}/dir/")
    assert not exists(f"s3://{s3_bucket}/di")  # not a folder boundary
    assert not exists(f"s3://{s3_bucket}/dir/missing.bin")


def test_local_exists_and_info(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_bytes(b"12345")
    st = f.stat()
    expected = hashlib.sha256(f"{st.st_mtime_ns}:5".encode()).hexdigest()
    assert object_info(str(f)) == ObjectInfo(size=5, etag=expected, mtime=st.st_mtime)
    assert exists(str(f))
    assert exists(str(tmp_path))
    assert not exists(str(tmp_path / "b.txt"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert object_info(str(f)).etag != expected  # a touched file reads as a new version
    with pytest.raises(StorageError, match="is a directory"):
        object_info(str(tmp_path))


def test_s3_missing_object_and_bucket(s3_bucket: str) -> None:
    missing = f"s3://{s3_bucket}/nope.bin"
    for fn in (read_bytes, object_info, download_cached):
        with pytest.raises(StorageError) as e:
            fn(missing)
        assert e.value.uri == missing
        assert e.value.cause == "no such object"
        assert not e.value.retryable  # another run will not find it either
    no_bucket = "s3://keeper-no-such-bucket/x.bin"
    for fn in (read_bytes, object_info, exists, list_files, download_cached):
        with pytest.raises(StorageError) as e:
            fn(no_bucket)
        assert e.value.uri == no_bucket
        assert e.value.cause == "bucket does not exist"
        assert not e.value.retryable
    with pytest.raises(StorageError, match="not an object"):
        read_bytes(f"s3://{s3_bucket}/dir/")


def test_unreachable_endpoint_fails_fast(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on once the socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("KEEPER_S3_CONNECT_TIMEOUT", "1")
    start = time.monotonic()
    with pytest.raises(StorageError) as e:
        read_bytes(f"s3://{s3_bucket}/a.bin")
    assert time.monotonic() - start < 10
    assert e.value.uri == f"s3://{s3_bucket}/a.bin"
    assert e.value.cause.startswith("endpoint unreachable")
    assert str(port) in e.value.cause
    assert e.value.retryable  # a later run may reach it: keeper embed retries it by default


# ---------------------------------------------------------------------------------------------
# Client


def test_s3_client_honours_env_and_is_cached_per_process(
    s3_bucket: str, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    client = s3_client()
    assert client.meta.endpoint_url == moto_server
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert client.meta.config.connect_timeout == 5.0
    assert s3_client() is client
    # A forked child has another pid and must not reuse the parent's pooled sockets.
    monkeypatch.setattr(storage.os, "getpid", lambda: -1)
    assert s3_client() is not client
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "zero")
    with pytest.raises(ConfigError, match="zero"):
        s3_client()


# ---------------------------------------------------------------------------------------------
# Listings


def test_list_files_local_recursive_with_suffixes(tmp_path: Path) -> None:
    for rel in ["b.jpg", "a/c.JPG", "a/z/d.png", "a/notes.txt"]:
        write_bytes(str(tmp_path / rel), b"x")
    root = str(tmp_path)
    assert list_files(root, suffixes=[".jpg", ".png"]) == [
        f"{root}/a/c.JPG",
        f"{root}/a/z/d.png",
        f"{root}/b.jpg",
    ]
    assert len(list_files(root)) == 4
    assert list_files(f"file://{root}/a", suffixes=[".txt"]) == [f"file://{root}/a/notes.txt"]


def test_list_files_s3_pages_and_respects_prefix(s3_bucket: str) -> None:
    keys = [f"data/{i:02d}.jpg" for i in range(7)] + ["data/sub/x.jpg", "data/sub/y.txt"]
    for k in [*keys, "data2/not-me.jpg", "data/"]:  # "data/" is a console folder marker
        write_bytes(f"s3://{s3_bucket}/{k}", b"x") if not k.endswith(
            "/"
        ) else s3_client().put_object(Bucket=s3_bucket, Key=k, Body=b"")
    # page_size=2 needs 5 list requests: a listing that stopped at the first page would hold 2.
    got = list_files(f"s3://{s3_bucket}/data", suffixes=[".jpg"], page_size=2)
    assert got == [f"s3://{s3_bucket}/{k}" for k in sorted(keys) if k.endswith(".jpg")]
    assert len(got) == 8
    assert len(list_files(f"s3://{s3_bucket}/", page_size=3)) == 10
    assert list_files(f"s3://{s3_bucket}/empty") == []


# ---------------------------------------------------------------------------------------------
# Parquet


def _table(start: int, n: int) -> pa.Table:
    return pa.table(
        {"id": pa.array(range(start, start + n), pa.int64()), "name": [f"n{i}" for i in range(n)]}
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_file_and_folder(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    write_parquet(_table(0, 3), join(base, "one.parquet"))
    one = read_parquet(join(base, "one.parquet"))
    assert one.equals(_table(0, 3))
    assert read_parquet(join(base, "one.parquet"), columns=["id"]).column("id").to_pylist() == [
        0,
        1,
        2,
    ]
    # A folder of part files, written out of order: read back in name order.
    write_parquet(_table(10, 2), join(base, "parts", "part-00001.parquet"))
    write_parquet(_table(0, 3), join(base, "parts", "part-00000.parquet"))
    write_bytes(join(base, "parts", "_SUCCESS"), b"")  # not Parquet: skipped by suffix
    for uri in (join(base, "parts"), join(base, "parts") + "/"):
        got = read_parquet(uri)
        assert got.column("id").to_pylist() == [0, 1, 2, 10, 11]
        assert got.column("name").to_pylist() == ["n0", "n1", "n2", "n0", "n1"]
    with (
        pytest.raises(StorageError, match=r"no \*\.parquet files")
        if where == "s3"
        else (pytest.raises(StorageError, match="no such file"))
    ):
        read_parquet(join(base, "nothing"))


def test_parquet_bad_content_is_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as e:
        read_parquet(str(bad))
    assert e.value.source == str(bad)
    write_parquet(_table(0, 2), str(tmp_path / "mixed" / "a.parquet"))
    first = read_parquet(str(tmp_path / "mixed" / "a.parquet"))
    # A part with a column the others lack (a newer writer): the rest read it as null.
    write_parquet(
        first.append_column("extra", pa.array([1.5, 2.5])), str(tmp_path / "mixed" / "b.parquet")
    )
    both = read_parquet(str(tmp_path / "mixed"))
    assert both.num_rows == 4
    assert both.column("extra").to_pylist() == [None, None, 1.5, 2.5]
    # A column whose type differs between parts is not papered over.
    first_col = first.schema.names[0]
    clash = first.set_column(0, first_col, pa.array(["x"] * first.num_rows))
    write_parquet(clash, str(tmp_path / "mixed" / "c.parquet"))
    with pytest.raises(DataError, match="different schemas"):
        read_parquet(str(tmp_path / "mixed"))
    with pytest.raises(DataError, match="missing"):
        read_parquet(str(tmp_path / "mixed" / "a.parquet"), columns=["missing"])


# ---------------------------------------------------------------------------------------------
# Download cache


def test_download_cached_reuses_and_refreshes(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/models/w.pt"
    cache = tmp_path / "cache"
    write_bytes(uri, b"version one")
    first = download_cached(uri, cache_dir=cache)
    assert first.read_bytes() == b"version one"
    assert first.name == "w.pt"  # the suffix survives for loaders that dispatch on it
    assert hashlib.md5(b"version one").hexdigest() in first.parts
    st = first.stat()
    # A re-download would rename a new file into place: a new inode. Same inode and mtime means
    # the cached file was reused.
    again = download_cached(uri, cache_dir=cache)
    assert again == first
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    write_bytes(uri, b"version two!")
    second = download_cached(uri, cache_dir=cache)
    assert second != first
    assert second.read_bytes() == b"version two!"
    assert first.read_bytes() == b"version one"  # old entry left for whoever holds it
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert files == sorted([first, second])  # no temporary files left behind


def test_download_cached_default_dir_and_local(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEPER_CACHE_DIR", str(tmp_path / "root"))
    write_bytes(f"s3://{s3_bucket}/x.bin", b"abc")
    got = download_cached(f"s3://{s3_bucket}/x.bin")
    assert got.is_relative_to(tmp_path / "root" / "s3" / s3_bucket)
    local = tmp_path / "l.bin"
    local.write_bytes(b"l")
    assert download_cached(str(local)) == local
    assert download_cached(f"file://{local}") == local
    with pytest.raises(StorageError, match="no such file"):
        download_cached(str(tmp_path / "missing.bin"))


# ---------------------------------------------------------------------------------------------
# Retries


def test_with_retries_recovers_then_gives_up() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert with_retries(flaky, attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3

    calls.clear()

    def always() -> str:
        calls.append(1)
        raise ConnectionResetError(f"reset #{len(calls)}")

    with pytest.raises(ConnectionResetError, match="reset #4"):
        with_retries(always, attempts=4, base_delay=0.001)
    assert len(calls) == 4

    calls.clear()

    def broken() -> str:
        calls.append(1)
        raise ValueError("a bug, not a hiccup")

    with pytest.raises(ValueError, match="a bug"):
        with_retries(broken, attempts=4, base_delay=0.001)
    assert len(calls) == 1  # not retryable: raised at once


class _TruncatingClient:
    """The real client, except the first ``n`` GET bodies end early (a dropped connection)."""

    def __init__(self, real: Any, n: int) -> None:
        self.real, self.left = real, n

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        resp = self.real.get_object(**kwargs)
        if self.left > 0:
            self.left -= 1
            full = resp["Body"].read()
            resp["Body"] = StreamingBody(io.BytesIO(full[:3]), len(full))
        return dict(resp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_truncated_body_is_retried(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    uri = f"s3://{s3_bucket}/t.bin"
    write_bytes(uri, b"0123456789")
    fake = _TruncatingClient(s3_client(), n=2)
    monkeypatch.setattr(storage, "s3_client", lambda: fake)
    assert read_bytes(uri) == b"0123456789"
    fake.left = 2
    assert download_cached(uri, cache_dir=tmp_path).read_bytes() == b"0123456789"
    sleeps.clear()
    fake.left = 99  # more truncations than attempts: a StorageError, not a botocore error
    with pytest.raises(StorageError, match="transfer failed") as e:
        read_bytes(uri)
    assert e.value.uri == uri
    # 5 attempts, 4 jittered exponential delays: 0.2 * 2**i scaled into [0.5, 1].
    assert len(sleeps) == 4
    for i, d in enumerate(sleeps):
        assert 0.1 * 2**i <= d <= 0.2 * 2**i


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_head_and_delete(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/dir/blob.bin"
    else:
        uri = str(tmp_path / "dir" / "blob.bin")
    storage.write_bytes(uri, bytes(range(200)))
    assert storage.read_head(uri, 5) == bytes(range(5))
    assert storage.read_head(uri, 1000) == bytes(range(200))
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # idempotent
    with pytest.raises(StorageError):
        storage.read_head(uri)


def test_local_replace_if_unchanged_compares_again_after_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change that lands while the new file is written and fsynced (milliseconds on a busy
    disk) is not written over: the bytes are compared again just before the rename."""
    uri = str(tmp_path / "lock.json")
    tag = storage.write_new(uri, b"mine, v1")
    assert tag is not None
    new = storage.replace_if_unchanged(uri, b"mine, v2", tag)
    assert new == hashlib.sha256(b"mine, v2").hexdigest()
    assert storage.replace_if_unchanged(uri, b"mine, v3", tag) is None  # v1's tag: stale

    real = storage.replace_file

    def someone_writes_meanwhile(path: str, data: bytes, *, check: Any) -> Any:
        def slow_fsync_then_check(tmp: str) -> None:
            Path(uri).write_bytes(b"theirs")  # lands during our write and fsync
            check(tmp)

        return real(path, data, check=slow_fsync_then_check)

    monkeypatch.setattr(storage, "replace_file", someone_writes_meanwhile)
    assert storage.replace_if_unchanged(uri, b"mine, v3", new) is None
    assert Path(uri).read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock.json"]  # no temporary left
