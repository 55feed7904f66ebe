"""PAX extended headers in WebDataset shards: bounded and checked before tarfile parses them.

Python 3.11.7's tarfile (CVE-2024-6232, fixed in 3.11.10) searches a PAX payload with regular
expressions that take time quadratic in a run of digits: one crafted header of 64 KiB held a
task 5.5 s, a megabyte half an hour. ``index_shard`` now refuses a PAX header that is not
well-formed records, holds a digit run longer than any real size or time, or is over
``PAX_MAX_BYTES``, and indexes the members before it, as for any damaged shard.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from support import tar_bytes

from keeper_core.webdataset import PAX_MAX_BYTES, PAX_MAX_DIGITS, check_pax_header, index_shard


def _pax_member(payload: bytes) -> bytes:
    """A PAX extended header (type 'x') carrying ``payload`` as its records, padded to blocks."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(payload)
    pad = -len(payload) % tarfile.BLOCKSIZE
    return info.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * pad


def _shard(tmp_path: Path, payload: bytes) -> str:
    """good.jpg, then the PAX header before bad.jpg, then the end of the archive."""
    head = tar_bytes([("good.jpg", b"abc")])[: 2 * tarfile.BLOCKSIZE]  # its header and data
    rest = tar_bytes([("bad.jpg", b"xyz")])
    path = tmp_path / "s.tar"
    path.write_bytes(bytes(head) + _pax_member(payload) + bytes(rest))
    return str(path)


def _record(keyword: str, value: bytes) -> bytes:
    body = b" " + keyword.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"1" * 16_000, "no length"),  # no record at all: 3.11.7 searched it, 0.3 s
        (_record("comment", b"7" * (PAX_MAX_DIGITS + 1)), f"run of over {PAX_MAX_DIGITS} digits"),
        (_record("path", b"x.jpg") + b"1 hdrcharset=" * 50, "length 1"),  # not a record
        (_record("path", b"x.jpg")[:-1] + b"!", "length"),  # no newline where it ends
        (b"99 path=x.jpg\n", "length"),  # longer than the payload
        (b"6 =ab\n", "no keyword=value"),
        (b"6 abc\n", "no keyword=value"),
        (_record("path", b"x.jpg") + b"\0\0junk", "bytes after its records"),
    ],
    ids=[
        "digits",
        "long-run",
        "trailing-search-bait",
        "no-newline",
        "overlong",
        "no-keyword",
        "no-equals",
        "after-padding",
    ],
)
def test_a_bad_pax_header_ends_the_index_there_with_the_reason(
    tmp_path: Path, payload: bytes, reason: str
) -> None:
    index = index_shard(_shard(tmp_path, payload))
    assert index.error is not None
    assert reason in index.error, index.error
    assert "after member 'good.jpg'" in index.error
    assert [s.key for s in index.samples] == ["good"]  # the members before it are kept


def test_a_pax_header_over_the_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    index = index_shard(_shard(tmp_path, _record("comment", b"x" * PAX_MAX_BYTES)))
    assert index.error is not None
    assert f"at most {PAX_MAX_BYTES} are read" in index.error
    assert [s.key for s in index.samples] == ["good"]


def test_pax_headers_tarfile_writes_pass_and_their_names_are_read(tmp_path: Path) -> None:
    long = "d/" * 80 + "ü-名前.jpg"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in (long, "plain.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 3
            info.mtime = 1_700_000_000.123456789
            info.pax_headers = {"comment": "a=b c", "hdrcharset": "BINARY"}
            tf.addfile(info, io.BytesIO(b"abc"))
    path = tmp_path / "pax.tar"
    path.write_bytes(buf.getvalue())
    index = index_shard(str(path))
    assert index.error is None
    assert [s.key for s in index.samples] == [long.removesuffix(".jpg"), "plain"]


@pytest.mark.parametrize(
    "payload",
    [b"", _record("path", b"a" * 5000), _record("mtime", b"1700000000.123456789") + b"\0" * 100],
)
def test_well_formed_records_pass_the_check(payload: bytes) -> None:
    check_pax_header(payload)
