"""``content_digest``: a JPEG's metadata saved again is the same photo; its pixels, EXIF or
colour profile changed is another."""

from __future__ import annotations

import hashlib
import io
import struct

import pytest
from PIL import Image

from keeper_core.embedded_xmp import content_digest

XMP = b"http://ns.adobe.com/xap/1.0/\x00"
EXT_XMP = b"http://ns.adobe.com/xmp/extension/\x00"


def jpeg(colour: tuple[int, int, int] = (120, 60, 30), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "JPEG", quality=90, **save)  # type: ignore[arg-type]
    return buf.getvalue()


def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def insert(data: bytes, *segments: bytes) -> bytes:
    """``data`` with ``segments`` right after SOI."""
    return data[:2] + b"".join(segments) + data[2:]


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


BASE = jpeg()


@pytest.mark.parametrize(
    "added",
    [
        segment(0xE1, XMP + b"<x:xmpmeta>rating 5</x:xmpmeta>"),
        segment(0xE1, XMP + b"<x:xmpmeta>rating 1</x:xmpmeta>" + b" " * 2048),
        segment(0xE1, EXT_XMP + b"0" * 40 + b"more packet"),
        segment(0xED, b"Photoshop 3.0\x008BIM caption"),
        segment(0xFE, b"a comment"),
    ],
    ids=["xmp", "xmp-padded", "extended-xmp", "iptc", "comment"],
)
def test_metadata_segments_are_left_out(added: bytes) -> None:
    assert content_digest(insert(BASE, added)) == content_digest(BASE)


def test_what_a_decoder_reads_is_kept() -> None:
    with_exif = jpeg(exif=exif(1))
    assert content_digest(jpeg(exif=exif(6))) != content_digest(with_exif)  # turned 90 degrees
    assert content_digest(jpeg((121, 60, 30))) != content_digest(BASE)  # other pixels
    icc = segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + b"profile")
    assert content_digest(insert(BASE, icc)) != content_digest(BASE)
    # an APP1 that is neither XMP nor extended XMP stays in
    assert content_digest(insert(BASE, segment(0xE1, b"Exif\x00\x00MM"))) != content_digest(BASE)


def test_other_files_and_damaged_jpegs_are_hashed_whole() -> None:
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    assert content_digest(png.getvalue()) == hashlib.sha256(png.getvalue()).hexdigest()
    damaged = BASE[:2] + b"\xff\xe1\xff\xff" + b"short"  # a segment length past the end
    assert content_digest(damaged) == hashlib.sha256(damaged).hexdigest()
