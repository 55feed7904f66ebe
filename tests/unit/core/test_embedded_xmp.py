"""keeper_core.embedded_xmp: the XMP packet inside a JPEG, TIFF/DNG or HEIC, found by walking the
file's structure (never decoding pixels), read in bounded ranges, and parsed as a sidecar is;
a damaged structure or packet is a DataError naming why (real files written by PIL and
pillow-heif, damaged ones spliced by hand)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from PIL import Image, TiffImagePlugin
from support import xmp_packet

from keeper_core import embedded_xmp, storage
from keeper_core.embedded_xmp import read_embedded_xmp, read_packet
from keeper_core.errors import DataError, StorageError
from keeper_core.handback import parse_xmp_packet, read_sidecar, write_sidecar

RATING, LABEL = "Xmp.xmp.Rating", "Xmp.xmp.Label"


def packet(rating: int | None = 4, label: str | None = "Red") -> bytes:
    return xmp_packet(rating, label)


def jpeg(xmp: bytes | None = None, size: tuple[int, int] = (16, 12)) -> bytes:
    out = io.BytesIO()
    kw = {} if xmp is None else {"xmp": xmp}
    Image.new("RGB", size, (120, 80, 40)).save(out, "JPEG", **kw)
    return out.getvalue()


def segment(marker: int, body: bytes) -> bytes:
    return b"\xff" + bytes([marker]) + struct.pack(">H", 2 + len(body)) + body


def app1_xmp(body: bytes) -> bytes:
    return segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + body)


def after_soi(data: bytes, *segments: bytes) -> bytes:
    """A JPEG with ``segments`` inserted right after its SOI marker."""
    return data[:2] + b"".join(segments) + data[2:]


def tiff(xmp: bytes, order: str = "<", offset: int | None = None, kind: int = 7) -> bytes:
    """A minimal TIFF: IFD0 with one entry, tag 700 (XMP), its packet after the IFD."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    at = 8 + 2 + 12 + 4
    entry = struct.pack(order + "HHII", 700, kind, len(xmp), at if offset is None else offset)
    return (
        magic
        + struct.pack(order + "I", 8)
        + struct.pack(order + "H", 1)
        + entry
        + struct.pack(order + "I", 0)
        + xmp
    )


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------------------------
# JPEG


def test_a_jpegs_packet_written_by_pil_is_read_as_a_sidecar_is(tmp_path: Path) -> None:
    uri = write(tmp_path, "IMG_1.JPG", jpeg(packet(4, "Red")))
    fields = read_embedded_xmp(uri)
    assert fields is not None
    assert (fields[RATING], fields[LABEL]) == ("4", "Red")
    # the same fields as the same packet in a sidecar file
    side = write(tmp_path, "IMG_1.xmp", packet(4, "Red"))
    assert fields == read_sidecar(side)


def test_a_jpeg_without_xmp_and_other_formats_hold_no_packet(tmp_path: Path) -> None:
    assert read_embedded_xmp(write(tmp_path, "a.jpg", jpeg())) is None
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    assert read_packet(write(tmp_path, "a.png", png.getvalue())) is None
    assert read_packet(write(tmp_path, "empty.jpg", b"")) is None


def test_a_packet_after_the_first_scan_is_not_looked_for(tmp_path: Path) -> None:
    # Metadata segments come before SOS; the walk stops there, as readers do.
    data = jpeg()
    assert data.endswith(b"\xff\xd9")
    late = data[:-2] + app1_xmp(packet()) + b"\xff\xd9"
    assert read_packet(write(tmp_path, "late.jpg", late)) is None


def test_a_packet_beyond_the_first_window_is_read_by_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Six 60 KB APP2 segments (an ICC profile's size) push the XMP past the first 256 KB, and
    # 8 MB of scan data follow: only segment headers, the packet and the first window are read.
    icc = [segment(0xE2, b"ICC_PROFILE\x00" + b"\x00" * 60_000) for _ in range(6)]
    data = after_soi(jpeg(), *icc, app1_xmp(packet(2, None)))
    data = data[:-2] + b"\x00" * 8_000_000 + b"\xff\xd9"
    uri = write(tmp_path, "big.jpg", data)
    got: list[int] = []
    head, rng = storage.read_head, storage.read_range

    def read_head(u: str, n: int = 64) -> bytes:
        out = head(u, n)
        got.append(len(out))
        return out

    def read_range(u: str, offset: int, size: int) -> bytes:
        got.append(size)
        return rng(u, offset, size)

    monkeypatch.setattr(storage, "read_head", read_head)
    monkeypatch.setattr(storage, "read_range", read_range)
    fields = read_embedded_xmp(uri)
    assert fields is not None
    assert fields[RATING] == "2"
    assert sum(got) < 300_000 < len(data)
    assert len(got) > 2  # the ranged path was taken, not one read of the head


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        # the XMP segment says 2 KB, the file ends after 100 bytes of it
        (after_soi(jpeg(), app1_xmp(packet()))[:160], "runs past the end"),
        # a segment length of 1 (it counts its own two bytes: at least 2)
        (after_soi(jpeg(), b"\xff\xe1\x00\x01"), "has length 1"),
        # a length that lands in the middle of the next segment
        (after_soi(jpeg(), b"\xff\xe4\x00\x06abc" + app1_xmp(packet())), "no JPEG segment marker"),
        # SOI and nothing after it
        (b"\xff\xd8", "runs past the end"),
    ],
    ids=["truncated-xmp", "length-1", "bad-length", "soi-only"],
)
def test_a_damaged_jpeg_is_a_data_error_naming_why(
    tmp_path: Path, data: bytes, reason: str
) -> None:
    uri = write(tmp_path, "bad.jpg", data)
    with pytest.raises(DataError, match=reason) as e:
        read_embedded_xmp(uri)
    assert uri in str(e.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"rating five, no XML", "not an XMP packet"),
        (packet()[:-90] + b"<rdf:RDF", "XMLValidator|cannot parse"),
    ],
    ids=["not-xmp", "broken-xml"],
)
def test_a_malformed_packet_is_a_data_error(tmp_path: Path, body: bytes, reason: str) -> None:
    uri = write(tmp_path, "bad.jpg", after_soi(jpeg(), app1_xmp(body)))
    assert read_packet(uri) is not None
    with pytest.raises(DataError, match=reason):
        read_embedded_xmp(uri)


def test_padding_around_a_packet_is_dropped(tmp_path: Path) -> None:
    uri = write(tmp_path, "pad.jpg", after_soi(jpeg(), app1_xmp(b"\n  " + packet(5) + b"\x00")))
    fields = read_embedded_xmp(uri)
    assert fields is not None
    assert fields[RATING] == "5"


def test_walking_stops_at_the_segment_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_xmp, "MAX_JPEG_HEADER_BYTES", 1000)
    pad = [segment(0xE2, b"\x00" * 400) for _ in range(4)]
    uri = write(tmp_path, "long.jpg", after_soi(jpeg(), *pad, app1_xmp(packet())))
    with pytest.raises(DataError, match="no image data within the first"):
        read_packet(uri)


# ----------------------------------------------------------------------------------------------
# TIFF / DNG


def test_a_tiffs_tag_700_written_by_pil_is_read(tmp_path: Path) -> None:
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[700] = packet(3, "Green")
    info.tagtype[700] = 1  # BYTE, as Lightroom and exiftool write it
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF", tiffinfo=info)
    fields = read_embedded_xmp(write(tmp_path, "IMG_1.TIF", out.getvalue()))
    assert fields is not None
    assert (fields[RATING], fields[LABEL]) == ("3", "Green")
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, "TIFF")
    assert read_packet(write(tmp_path, "plain.tif", plain.getvalue())) is None


@pytest.mark.parametrize("order", ["<", ">"], ids=["II", "MM"])
def test_both_byte_orders_and_bigtiff(tmp_path: Path, order: str) -> None:
    fields = read_embedded_xmp(write(tmp_path, "a.dng", tiff(packet(-1, None), order)))
    assert fields == {RATING: "-1"}
    # BigTIFF: 16-byte header, 8-byte counts and offsets
    body = packet(1, None)
    magic = b"II+\x00" if order == "<" else b"MM\x00+"
    at = 16 + 8 + 20 + 8
    big = (
        magic
        + struct.pack(order + "HHQ", 8, 0, 16)
        + struct.pack(order + "Q", 1)
        + struct.pack(order + "HHQQ", 700, 1, len(body), at)
        + struct.pack(order + "Q", 0)
        + body
    )
    assert read_embedded_xmp(write(tmp_path, "big.tif", big)) == {RATING: "1"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (tiff(packet(), offset=0xFFFF_FF00), "runs past the end"),
        (tiff(packet(), offset=60), "runs past the end"),  # inside the file, the end outside
        (b"II*\x00" + struct.pack("<I", 4) + b"\x00" * 8, "inside the header"),
        (b"II*\x00" + struct.pack("<I", 9_000_000), "runs past the end"),
        (b"II*\x00" + struct.pack("<IH", 8, 40_000), "claims 40000 entries"),
        (b"II*\x00" + struct.pack("<IH", 8, 50) + b"\x00" * 20, "IFD0's 50 entries"),
        (tiff(packet(), kind=3), "type 3, not bytes"),
    ],
    ids=["offset-far", "offset-near", "ifd-in-header", "ifd-past-end", "count", "short", "type"],
)
def test_a_bogus_tiff_is_a_data_error_naming_why(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(DataError, match=reason):
        read_embedded_xmp(write(tmp_path, "bad.tif", data))


def test_a_packet_over_the_cap_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_xmp, "MAX_PACKET_BYTES", 100)
    with pytest.raises(DataError, match=r"XMP packet of \d+ bytes"):
        read_packet(write(tmp_path, "a.tif", tiff(packet())))


# ----------------------------------------------------------------------------------------------
# HEIF


def test_a_heics_xmp_item_is_read_through_pillow_heif(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    out = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (16, 16))).save(out, xmp=packet(5, None), quality=50)
    uri = write(tmp_path, "IMG_1.HEIC", out.getvalue())
    assert read_embedded_xmp(uri) == {RATING: "5"}
    plain = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (16, 16))).save(plain, quality=50)
    assert read_packet(write(tmp_path, "plain.heic", plain.getvalue())) is None
    cut = write(tmp_path, "cut.heic", out.getvalue()[:40])
    with pytest.raises(DataError, match="libheif cannot parse"):
        read_packet(cut)
    monkeypatch.setattr(embedded_xmp, "MAX_HEIF_BYTES", 100)
    with pytest.raises(StorageError, match="too large to read for its XMP"):
        read_packet(uri)


# ----------------------------------------------------------------------------------------------
# Sidecar parsing is shared, and unchanged


def test_parse_xmp_packet_is_what_read_sidecar_reads(tmp_path: Path) -> None:
    side = tmp_path / "IMG_1.xmp"
    write_sidecar(str(side), rating=3, label="Green", keeper_fields={"rank": "1"})
    assert parse_xmp_packet(side.read_bytes(), str(side)) == read_sidecar(str(side))
    side.write_bytes(b"\x00\x01 not xmp")
    with pytest.raises(DataError, match="not an XMP sidecar"):
        read_sidecar(str(side))


def test_a_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        read_embedded_xmp(str(tmp_path / "gone.jpg"))


def test_a_jpeg_on_s3_is_read_by_ranges(s3_bucket: str) -> None:
    icc = [segment(0xE2, b"ICC_PROFILE\x00" + b"\x00" * 60_000) for _ in range(5)]
    uri = f"s3://{s3_bucket}/photos/IMG_1.JPG"
    storage.write_bytes(uri, after_soi(jpeg(), *icc, app1_xmp(packet(4, None))))
    assert read_embedded_xmp(uri) == {RATING: "4"}


@pytest.mark.parametrize("kind", ["jpeg", "tiff_le", "tiff_be"])
def test_damaged_files_give_a_packet_none_or_a_data_error_never_a_crash(
    tmp_path: Path, kind: str
) -> None:
    """Seeded random damage (bytes overwritten, cut short, runs inserted) to files holding a
    packet: the reader answers fields, None or a DataError naming the file, nothing else."""
    import random

    base = {
        "jpeg": lambda: jpeg(packet(3, "Green")),
        "tiff_le": lambda: tiff(packet(3, "Green"), order="<"),
        "tiff_be": lambda: tiff(packet(3, "Green"), order=">"),
    }[kind]()
    rng = random.Random(f"embedded-xmp-{kind}")
    outcomes = {"fields": 0, "none": 0, "error": 0}
    named: list[bool] = []
    for i in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            how = rng.random()
            at = rng.randrange(len(data))
            if how < 0.6:
                data[at] = rng.randrange(256)
            elif how < 0.8:
                del data[at:]
                if not data:
                    data = bytearray(base[:2])
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        uri = write(tmp_path, f"f{i}.bin", bytes(data))
        try:
            got = read_embedded_xmp(uri)
        except DataError as e:
            named.append(uri in str(e) or e.source == uri)
            outcomes["error"] += 1
        else:
            outcomes["fields" if got is not None else "none"] += 1
    assert all(named)  # every error names the file
    assert all(outcomes.values()), outcomes  # the damage reached every outcome
