"""keeper_core.storage at its edges, each test pinning a defect it reproduced.

Against local tmp folders and a real moto_server (the s3_bucket fixture)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from keeper_core import storage
from keeper_core.errors import ConfigError, StorageError
from keeper_core.storage import (
    download_cached,
    exists,
    join,
    list_files,
    list_stamped,
    object_info,
    parent,
    read_bytes,
    read_head,
    resolve,
    write_bytes,
    write_parquet,
)

# ---------------------------------------------------------------------------------------------
# Local atomic writes


@pytest.fixture
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.mark.usefixtures("umask_022")
def test_local_writes_get_the_umask_mode_not_0600(s3_bucket: str, tmp_path: Path) -> None:
    # mkstemp made every file 0600, so a file one job wrote was unreadable to the group (the
    # server's user, a teammate on a shared NFS corpus) although umask allowed 0644.
    write_bytes(str(tmp_path / "a.bin"), b"x")
    write_parquet(pa.table({"x": [1]}), str(tmp_path / "t.parquet"))
    write_bytes(f"s3://{s3_bucket}/m.bin", b"model")
    cached = download_cached(f"s3://{s3_bucket}/m.bin", cache_dir=tmp_path / "cache")
    for p in (tmp_path / "a.bin", tmp_path / "t.parquet", cached):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_a_killed_write_leaves_nothing_a_listing_returns(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    code = (
        "import os, pathlib\n"
        "from keeper_core import storage\n"
        "def half(f):\n"
        "    f.write(b'PAR1 half a table')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), 9)\n"
        f"storage._atomic_write(pathlib.Path({str(folder)!r}) / 'part-0.parquet', half)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    write_bytes(str(folder / "ok.bin"), b"ok")
    leftovers = [p.name for p in folder.iterdir() if p.name != "ok.bin"]
    assert len(leftovers) == 1  # the killed writer's temporary file is there...
    assert list_files(str(folder)) == [str(folder / "ok.bin")]  # ...but is not listed as data

    seen: list[list[str]] = []

    def listing_mid_write(f: object) -> None:  # a reader listing while a writer is at work
        seen.append(list_files(str(folder)))

    storage._atomic_write(folder / "new.bin", listing_mid_write)
    assert seen == [[str(folder / "ok.bin")]]


def test_a_long_file_name_can_be_written(tmp_path: Path) -> None:
    # The temporary name added 14 bytes to the target's: a valid 250-byte name failed to write.
    for name in ["a" * 250, "é" * 125 + ".bin"]:  # 250 and 254 bytes
        write_bytes(str(tmp_path / name), b"x")
        assert read_bytes(str(tmp_path / name)) == b"x"
    assert len(list(tmp_path.iterdir())) == 2


def test_a_file_where_a_folder_should_be_is_not_retryable(tmp_path: Path) -> None:
    write_bytes(str(tmp_path / "f"), b"x")
    for call in (
        lambda: read_bytes(str(tmp_path / "f" / "g")),
        lambda: object_info(str(tmp_path / "f" / "g")),
        lambda: write_bytes(str(tmp_path / "f" / "g"), b"y"),
    ):
        with pytest.raises(StorageError, match="not a directory") as e:
            call()
        assert not e.value.retryable  # the next run finds the same file there


# ---------------------------------------------------------------------------------------------
# Reads


def test_a_capped_local_read_allocates_by_the_file_not_the_cap(tmp_path: Path) -> None:
    # read(max_bytes + 1) allocated the cap up front: a generous cap failed on a tiny file.
    (tmp_path / "small").write_bytes(b"12345")
    assert read_bytes(str(tmp_path / "small"), max_bytes=1 << 50) == b"12345"
    assert read_bytes(str(tmp_path / "small"), max_bytes=5) == b"12345"
    with pytest.raises(storage.TooLargeError):
        read_bytes(str(tmp_path / "small"), max_bytes=4)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_head_of_an_empty_object_is_empty(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # S3 answers a range on a 0-byte object with 416 InvalidRange: read_head raised a retryable
    # StorageError (retried by every later run) where a local empty file gave b"".
    base = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    write_bytes(join(base, "empty.jpg"), b"")
    assert read_head(join(base, "empty.jpg")) == b""
    with pytest.raises(StorageError) as e:
        read_head(join(base, "missing.jpg"))
    assert not e.value.retryable


# ---------------------------------------------------------------------------------------------
# Client settings


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("AWS_PROFILE", "keeper-no-such-profile"),
        ("AWS_RETRY_MODE", "bogus"),
        ("AWS_REGION", "not a region!"),
        ("AWS_ENDPOINT_URL", "localhost:9000"),  # no scheme
    ],
)
def test_bad_aws_settings_are_config_errors(
    var: str, value: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each escaped as a raw botocore exception (or ValueError) from read_bytes/exists, and as a
    # *retryable* StorageError from list_files: a batch job retried a typo forever.
    monkeypatch.setenv(var, value)
    uri = f"s3://{s3_bucket}/x.bin"
    for call in (
        lambda: read_bytes(uri),
        lambda: read_bytes(uri, max_bytes=10),
        lambda: read_head(uri),
        lambda: exists(uri),
        lambda: object_info(uri),
        lambda: list_files(f"s3://{s3_bucket}/"),
        lambda: write_bytes(uri, b"x"),
    ):
        with pytest.raises(ConfigError, match=r"bad (AWS setting|S3 endpoint)"):
            call()


# ---------------------------------------------------------------------------------------------
# URIs


def test_join_and_parent_at_the_file_uri_root() -> None:
    # join("file:///", "data") was "file:/data" (a relative local path named "file:"), and
    # parent("file:///a") was "file://" (the current directory).
    assert join("file:///", "data", "a.jpg") == "file:///data/a.jpg"
    assert join("file://", "data") == "file:///data"
    assert parent("file:///a.csv") == "file:///"
    assert parent("file:///") == "file:///"
    assert parent("file:///data/a.csv") == "file:///data"
    assert storage._local_path(parent("file:///a.csv")) == Path("/")
    # Unchanged elsewhere.
    assert join("s3://b/", "x") == "s3://b/x"
    assert join("/", "a") == "/a"
    assert parent("s3://b/x/y.csv") == "s3://b/x"
    assert parent("s3://b/x.csv") == "s3://b"
    assert parent("/a") == "/"
    assert parent("a.csv") == "."


def test_resolve_dot_segments_on_s3_names_the_object_a_local_manifest_would(
    s3_bucket: str, tmp_path: Path
) -> None:
    # S3 keys are literal: "manifests/../images/a.jpg" is no object there, while the same
    # manifest on a local disk reaches images/a.jpg. Every image of such a manifest failed on S3.
    for base in (f"s3://{s3_bucket}", str(tmp_path)):
        write_bytes(join(base, "images", "a.jpg"), b"jpeg")
        write_bytes(join(base, "manifests", "m.csv"), b"image_uri\n../images/a.jpg\n")
        folder = parent(join(base, "manifests", "m.csv"))
        for ref in ("../images/a.jpg", "./../images/./a.jpg", "../manifests/../images/a.jpg"):
            assert read_bytes(resolve(ref, folder)) == b"jpeg", (base, ref)
    s3 = f"s3://{s3_bucket}"
    assert resolve("../images/a.jpg", f"{s3}/manifests") == f"{s3}/images/a.jpg"
    assert resolve("./x/./y.jpg", f"{s3}/m/") == f"{s3}/m/x/y.jpg"
    assert resolve("a.jpg", f"{s3}/m") == f"{s3}/m/a.jpg"  # plain refs as before
    assert resolve("../../x", f"{s3}/m") == f"{s3}/m/../../x"  # above the bucket: as written


# ---------------------------------------------------------------------------------------------
# Download cache


def test_download_cached_keys_no_file_can_be_named_after(s3_bucket: str, tmp_path: Path) -> None:
    # "a/.." failed (a rename onto the version folder's parent), "a/." cached the object *as*
    # the version folder's path, and a 300-byte last segment exceeded NAME_MAX: every one a
    # "retryable" failure that no retry fixes.
    client = storage.s3_client()
    long = "n" * 300 + ".safetensors"
    for key in ("a/..", "b/.", f"c/{long}"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
        got = download_cached(f"s3://{s3_bucket}/{key}", cache_dir=tmp_path)
        assert got.read_bytes() == key.encode()
        assert got.parent.name == object_info(f"s3://{s3_bucket}/{key}").etag
        assert download_cached(f"s3://{s3_bucket}/{key}", cache_dir=tmp_path) == got
    assert got.suffix == ".safetensors"


# ---------------------------------------------------------------------------------------------
# Local listings


def test_list_files_follows_symlinked_folders_without_looping(tmp_path: Path) -> None:
    # A symlinked folder's files were silently missing (while a symlinked file was listed):
    # corpus/batch1 -> /mnt/nfs/batch1 embedded nothing of batch1.
    (tmp_path / "nfs" / "batch1").mkdir(parents=True)
    (tmp_path / "nfs" / "batch1" / "b.jpg").write_bytes(b"b")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jpg").write_bytes(b"a")
    (corpus / "batch1").symlink_to(tmp_path / "nfs" / "batch1")
    (corpus / "loop").symlink_to(corpus)  # back up to itself: not followed
    (corpus / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    # Links that lead to themselves, one named as a photo: they stopped the whole listing
    # (ELOOP), where a dangling link was skipped.
    (corpus / "IMG_0001.jpg").symlink_to("IMG_0001.jpg")
    (corpus / "ping").symlink_to("pong")
    (corpus / "pong").symlink_to("ping")
    want = [str(corpus / "a.jpg"), str(corpus / "batch1" / "b.jpg")]
    assert list_files(str(corpus)) == want
    assert [u for u, _ in list_stamped(str(corpus))] == want


_AS_NOBODY = """
import os, sys
from keeper_core import storage
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
for call in sys.argv[1:]:
    try:
        print(eval(call, {"storage": storage}))
    except storage.StorageError as e:
        print("StorageError", e.retryable, e)
    except OSError as e:
        print("raw", type(e).__name__, e)
"""


def _as_nobody(*calls: str) -> list[str]:
    """Each of ``calls`` (Python, with ``storage`` in scope) as user nobody when run as root (to
    whom every folder is readable), else as this user; one printed line each."""
    out = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, *calls],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    return out.splitlines()


@pytest.fixture
def locked_folder(tmp_path: Path) -> Iterator[Path]:
    """``<base>/corpus/{ok,locked}/x.jpg`` where ``locked`` (0700) is unreadable to nobody."""
    base = tmp_path
    if os.geteuid() == 0:  # the child runs as nobody: pytest's tmp root (0700) is closed to it
        base = Path(tempfile.mkdtemp(dir="/tmp", prefix="keeper-storage-"))
    for sub in ("ok", "locked"):
        (base / "corpus" / sub).mkdir(parents=True)
        (base / "corpus" / sub / "x.jpg").write_bytes(b"x")
    for p in (base, base / "corpus", base / "corpus" / "ok"):
        p.chmod(0o755)
    (base / "corpus" / "ok" / "x.jpg").chmod(0o644)
    (base / "corpus" / "locked").chmod(0o700 if os.geteuid() == 0 else 0o000)
    yield base / "corpus"
    (base / "corpus" / "locked").chmod(0o755)
    if base != tmp_path:
        shutil.rmtree(base)


def test_list_files_does_not_skip_an_unreadable_folder(locked_folder: Path) -> None:
    # rglob ignores PermissionError: files in a folder the job cannot read vanished from the
    # listing and the run "succeeded" on part of the corpus.
    (out,) = _as_nobody(f"storage.list_files({str(locked_folder)!r})")
    assert out.startswith("StorageError True"), out
    assert "permission denied" in out


def test_local_permission_errors_are_storage_errors(locked_folder: Path) -> None:
    # exists, list_files, read_parquet and download_cached let a raw PermissionError out (a
    # job catching StorageError per item crashed on it).
    x = str(locked_folder / "locked" / "x.jpg")
    outs = _as_nobody(
        f"storage.exists({x!r})",
        f"storage.list_files({str(locked_folder / 'locked' / 'sub')!r})",
        f"storage.read_parquet({x!r})",
        f"storage.download_cached({x!r})",
    )
    assert len(outs) == 4
    for out in outs:
        assert out.startswith("StorageError True"), out


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("KeyTooLongError", False),
        ("InvalidBucketName", False),
        ("InvalidObjectState", False),  # archived in Glacier: the same until restored
        ("EntityTooLarge", False),
        ("NoSuchKey", False),
        ("SlowDown", True),
        ("InternalError", True),
        ("AccessDenied", True),  # credentials may be fixed before the next run (documented)
    ],
)
def test_s3_refusals_of_the_request_itself_are_not_retryable(code: str, retryable: bool) -> None:
    from botocore.exceptions import ClientError

    err = ClientError({"Error": {"Code": code, "Message": "m"}}, "PutObject")
    assert storage._retryable(err) is retryable


def test_a_custom_endpoint_gets_checksums_only_where_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Older MinIO and Ceph RGW refuse the CRC checksums botocore >= 1.36 sends by default.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    cfg = storage.s3_client().meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert storage.s3_client().meta.config.request_checksum_calculation == "when_supported"


def test_stale_temporary_files_of_the_given_paths_are_removed(tmp_path: Path) -> None:
    """What a write killed before its rename left (named as _open_temp names it, a long name cut
    to fit): removed once old enough; a fresh one, another file's, and a photo stay."""
    import time

    long = "L" * 250 + ".JPG"
    targets = [str(tmp_path / "IMG_1.JPG"), str(tmp_path / long)]
    stale = [storage._open_temp(tmp_path, Path(t).name) for t in targets]
    fresh_fd, fresh = storage._open_temp(tmp_path, "IMG_1.JPG")
    other_fd, other = storage._open_temp(tmp_path, "IMG_2.JPG")
    for fd, _ in (*stale, (fresh_fd, fresh), (other_fd, other)):
        os.close(fd)
    old = time.time() - 600
    for _, path in stale:
        os.utime(path, (old, old))
    os.utime(other, (old, old))
    (tmp_path / "IMG_1.JPG").write_bytes(b"photo")

    assert storage.remove_stale_temps(targets, older_than_s=300) == 2
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["IMG_1.JPG", Path(fresh).name, Path(other).name])
    assert storage.remove_stale_temps([*targets, "s3://b/k.jpg"], older_than_s=300) == 0


@pytest.mark.parametrize(
    "uri",
    [
        "/lib/photos/IMG_1.JPG",
        "/lib/photos/../photos/IMG_1.JPG",
        "/lib/./photos/IMG_1.JPG",
        "/lib//photos/IMG_1.JPG",
        "//lib/photos/IMG_1.JPG",
        "/lib/photos/",
        "/lib/.hidden/IMG_1.JPG",
        "/lib/photos/IMG_1.JPG.",
        "/",
        "photos/IMG_1.JPG",
        "./photos/IMG_1.JPG",
        "file:///lib/photos/IMG_1.JPG",
        "s3://bucket/photos/IMG_1.JPG",
    ],
)
def test_same_key_fast_path_agrees_with_normpath(uri: str) -> None:
    """An absolute path already normal is returned as it is (a million table rows a plan); every
    other spelling goes through abspath + normpath, as before."""
    if storage.is_s3(uri):
        want = uri
    else:
        want = os.path.normpath(os.path.abspath(uri.removeprefix("file://")))
    assert storage.same_key(uri) == want
