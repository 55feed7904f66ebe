"""keeper_core.capture: capture time, camera body and burst tags read from a photo's bytes.

Every file here is built in the test: EXIF with PIL, maker-note tags with pyexiv2 (exiv2
creates the maker note it then decodes), DNG/HEIC with ``support_photos``, and a CR3, RAF and
Apple maker note laid out by hand after ExifTool's and exiv2's descriptions of them.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime

import numpy as np
import pyarrow as pa
import pytest
from PIL import ExifTags, Image, features
from support_photos import make_dng, make_heic

from keeper_core import capture as capture_module
from keeper_core.capture import (
    CAPTURE_COLUMNS,
    TIME_SOURCES,
    Capture,
    capture_row,
    given_capture,
    read_capture,
)
from keeper_core.errors import ConfigError

DTO, SUBSEC, OFFSET = 0x9003, 0x9291, 0x9011  # DateTimeOriginal, SubSecTimeOriginal, Offset...
DTD, SUBSEC_D, OFFSET_D = 0x9004, 0x9292, 0x9012  # ...Digitized
DATETIME, SUBSEC_0, OFFSET_0 = 0x0132, 0x9290, 0x9010  # IFD0 DateTime, SubSecTime, OffsetTime
MAKE, MODEL, BODY_SERIAL, IMAGE_NUMBER, MAKER_NOTE = 0x010F, 0x0110, 0xA431, 0x9211, 0x927C
MTIME = 1_000_000_000.0  # 2001-09-09T01:46:40Z
BURST = "0F2A8C5E-1B7D-4C1E-9A3B-2D4E6F8A0B1C"
CANON_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")  # exiv2's "cano" uuid box


def _utc(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _exif(
    ifd0: Mapping[int, object] | None = None, exif: Mapping[int, object] | None = None
) -> Image.Exif:
    block = Image.Exif()
    for tag, value in (ifd0 or {}).items():
        block[tag] = value
    sub = block.get_ifd(ExifTags.IFD.Exif)
    for tag, value in (exif or {}).items():
        sub[tag] = value
    return block


def _jpeg(block: Image.Exif | None = None, size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    kw = {} if block is None else {"exif": block}
    Image.new("RGB", size, (120, 80, 40)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _timed(
    dto: object = None, subsec: object = None, offset: object = None, **ifd0: object
) -> bytes:
    """A JPEG with the given DateTimeOriginal triple (None: tag absent)."""
    exif = {t: v for t, v in ((DTO, dto), (SUBSEC, subsec), (OFFSET, offset)) if v is not None}
    return _jpeg(_exif({MAKE: "Canon", MODEL: "Canon EOS R5"}, exif))


def _with_tags(data: bytes, tags: dict[str, str]) -> bytes:
    """``data`` with exiv2 keys written by pyexiv2 (maker-note keys create the maker note)."""
    import pyexiv2

    image = pyexiv2.ImageData(data)
    try:
        image.modify_exif(tags)
        return image.get_bytes()
    finally:
        image.close()


def _never() -> float:
    raise AssertionError("the modification time was asked for although EXIF has a time")


# --- time ---------------------------------------------------------------------------------

T8 = _utc("2024-05-01T08:00:00+00:00")
T10 = _utc("2024-05-01T10:00:00+00:00")


@pytest.mark.parametrize(
    ("dto", "subsec", "offset", "time", "ts", "source"),
    [
        (
            "2024:05:01 10:00:00",
            "12",
            "+02:00",
            "2024-05-01T10:00:00.12+02:00",
            T8 + 0.12,
            "exif_offset",
        ),
        (
            "2024:05:01 10:00:00",
            "120",
            "-05:30",
            "2024-05-01T10:00:00.120-05:30",
            T10 + 5.5 * 3600 + 0.12,
            "exif_offset",
        ),
        ("2024:05:01 10:00:00", "005", None, "2024-05-01T10:00:00.005", T10 + 0.005, "exif"),
        ("2024:05:01 10:00:00", None, None, "2024-05-01T10:00:00", T10, "exif"),
        (
            "2024:05:01 10:00:00",
            " 7 ",
            "+00:00",
            "2024-05-01T10:00:00.7+00:00",
            T10 + 0.7,
            "exif_offset",
        ),
        # garbled sub-seconds: the time stays, the fraction goes
        ("2024:05:01 10:00:00", "1 2", None, "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00", "ab", None, "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00", "   ", None, "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00", "-5", None, "2024-05-01T10:00:00", T10, "exif"),
        # offsets: the basic form and Z mean what they say; a garbled one is dropped
        ("2024:05:01 10:00:00", None, "+0200", "2024-05-01T10:00:00+02:00", T8, "exif_offset"),
        ("2024:05:01 10:00:00", None, "Z", "2024-05-01T10:00:00+00:00", T10, "exif_offset"),
        ("2024:05:01 10:00:00", None, "+25:00", "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00", None, "+05:75", "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00", None, "   :  ", "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00", None, "02:00", "2024-05-01T10:00:00", T10, "exif"),
        # software that rewrote the date with ISO separators
        ("2024-05-01 10:00:00", "5", None, "2024-05-01T10:00:00.5", T10 + 0.5, "exif"),
        ("2024/05/01T10:00:00", None, None, "2024-05-01T10:00:00", T10, "exif"),
        ("2024:05:01 10:00:00 ", None, None, "2024-05-01T10:00:00", T10, "exif"),
    ],
)
def test_exif_time_subseconds_and_offsets(
    dto: str, subsec: str | None, offset: str | None, time: str, ts: float, source: str
) -> None:
    c = read_capture(_timed(dto, subsec, offset), mtime=_never)
    assert (c.time, c.time_source) == (time, source)
    assert c.timestamp == pytest.approx(ts, abs=1e-6)


@pytest.mark.parametrize(
    "dto",
    [
        "0000:00:00 00:00:00",
        "    :  :     :  :  ",
        "2024:13:01 10:00:00",  # month 13
        "2024:02:30 10:00:00",  # February 30th
        "2024:05:01 24:00:00",
        "2024:05:01 10:00:60",
        "1600:01:01 00:00:00",  # before photography
        "2024_05_01 10:00:00",  # not a date separator
        "2024:05:01:10:00:00",
        "2024:05:01",
        "",
    ],
)
def test_garbled_original_time_falls_back_to_mtime(dto: str) -> None:
    c = read_capture(_timed(dto, "12", "+02:00"), mtime=MTIME)
    assert (c.time, c.timestamp, c.time_source) == ("2001-09-09T01:46:40+00:00", MTIME, "mtime")
    assert c.camera == "Canon EOS R5"  # the rest of the metadata is still read


def test_time_falls_back_to_digitized_then_ifd0_each_with_its_own_subsec_and_offset() -> None:
    # SubSecTimeOriginal/OffsetTimeOriginal belong to DateTimeOriginal: never mixed in.
    base = {DTO: "0000:00:00 00:00:00", SUBSEC: "99", OFFSET: "+09:00"}
    digitized = {DTD: "2024:05:01 11:00:00", SUBSEC_D: "5", OFFSET_D: "+01:00"}
    c = read_capture(_jpeg(_exif({}, base | digitized)), mtime=_never)
    assert (c.time, c.time_source) == ("2024-05-01T11:00:00.5+01:00", "exif_offset")
    assert c.timestamp == pytest.approx(T10 + 0.5)

    ifd0 = {DATETIME: "2024:05:01 12:00:00"}
    exif = base | {DTD: "    :  :     :  :  ", SUBSEC_0: "3", OFFSET_0: "-03:00"}
    c = read_capture(_jpeg(_exif(ifd0, exif)), mtime=_never)
    assert (c.time, c.time_source) == ("2024-05-01T12:00:00.3-03:00", "exif_offset")
    assert c.timestamp == pytest.approx(_utc("2024-05-01T15:00:00+00:00") + 0.3)


def test_one_garbled_tag_does_not_lose_the_others() -> None:
    # An odd-length UCS-2 XPComment makes pyexiv2's own read_exif() raise for the whole file.
    block = _exif({MAKE: "Canon", 0x9C9C: b"\x41\x00\x42"}, {DTO: "2024:05:01 10:00:00"})
    c = read_capture(_jpeg(block), mtime=_never)
    assert (c.time, c.make) == ("2024-05-01T10:00:00", "Canon")


def test_ignored_values_are_logged_with_their_source(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="keeper_core.capture"):
        read_capture(_timed("2024:05:01 10:00:00", "x1"), source="s3://b/IMG_1.JPG")
    assert "s3://b/IMG_1.JPG" in caplog.text
    assert "SubSecTimeOriginal" in caplog.text


def test_mtime_is_the_fallback_and_a_callable_is_called_only_when_needed() -> None:
    calls: list[int] = []

    def head() -> float:
        calls.append(1)
        return MTIME + 0.25

    no_time = _jpeg(_exif({MAKE: "Canon", MODEL: "EOS R5"}))
    c = read_capture(no_time, mtime=head)
    assert (c.time, c.timestamp, c.time_source) == (
        "2001-09-09T01:46:40.250000+00:00",
        MTIME + 0.25,
        "mtime",
    )
    assert calls == [1]
    assert read_capture(_jpeg(), mtime=MTIME).time_source == "mtime"  # no EXIF at all
    c = read_capture(_timed("2024:05:01 10:00:00"), mtime=head)
    assert c.time_source == "exif"
    assert calls == [1]  # EXIF had a time: no HEAD request


@pytest.mark.parametrize("mtime", [None, float("nan"), float("inf"), 1e20, lambda: None])
def test_no_time_anywhere_is_none(mtime: float | Callable[[], float | None] | None) -> None:
    c = read_capture(_jpeg(), mtime=mtime)
    assert (c.time, c.timestamp, c.time_source) == (None, None, "none")
    assert c.camera == "unknown"


def test_bad_argument_types_raise() -> None:
    with pytest.raises(TypeError, match="bytes"):
        read_capture("IMG_0001.JPG")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="epoch seconds"):
        read_capture(_jpeg(), mtime=lambda: "yesterday")  # type: ignore[arg-type,return-value]


# --- camera -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "model", "serial", "key", "stored_serial"),
    [
        ("Canon", "Canon EOS R5", None, "Canon EOS R5", None),
        ("NIKON CORPORATION", "NIKON D850", "3001234", "NIKON D850 #3001234", "3001234"),
        ("Apple", "iPhone 15 Pro", None, "Apple iPhone 15 Pro", None),
        ("SONY", "ILCE-7M4", "0000000", "SONY ILCE-7M4", None),  # a placeholder, not a serial
        ("FUJIFILM", "X-T4", "0012345", "FUJIFILM X-T4 #12345", "0012345"),
        ("Canon\x00\x00", "  Canon  EOS R5 \x00junk", None, "Canon EOS R5", None),
        ("  ", "\x00", "  AB 12 ", "unknown #AB 12", "AB 12"),
        (None, None, None, "unknown", None),
    ],
)
def test_camera_key(
    make: str | None, model: str | None, serial: str | None, key: str, stored_serial: str | None
) -> None:
    ifd0 = {t: v for t, v in ((MAKE, make), (MODEL, model)) if v is not None}
    exif = {DTO: "2024:05:01 10:00:00"} | ({BODY_SERIAL: serial} if serial is not None else {})
    c = read_capture(_jpeg(_exif(ifd0, exif)))
    assert c.camera == key
    assert c.serial == stored_serial


def test_mixed_cameras_give_one_key_per_body() -> None:
    def shot(make: str, model: str, serial: str, second: int) -> bytes:
        exif = {DTO: f"2024:05:01 10:00:{second:02d}", BODY_SERIAL: serial}
        return _jpeg(_exif({MAKE: make, MODEL: model}, exif))

    shots = [
        shot("Canon", "Canon EOS R5", "111", 0),
        shot("Canon", "Canon EOS R5", "111", 1),  # the same body
        shot("Canon", "Canon EOS R5", "222", 1),  # a second body of the same model
        shot("SONY", "ILCE-7M4", "111", 2),
    ]
    keys = [read_capture(s).camera for s in shots]
    assert keys[0] == keys[1]
    assert len(set(keys)) == 3
    assert keys[2:] == ["Canon EOS R5 #222", "SONY ILCE-7M4 #111"]


@pytest.mark.parametrize(
    ("make", "key", "value"),
    [
        ("Canon", "Exif.Canon.SerialNumber", "123456"),
        ("NIKON CORPORATION", "Exif.Nikon3.SerialNumber", "3001234"),
        ("FUJIFILM", "Exif.Fujifilm.SerialNumber", "FFDT2231"),
        ("SONY", "Exif.Sony2.SerialNumber", "5012345"),
        ("PENTAX", "Exif.Pentax.SerialNumber", "4455667"),
        ("OLYMPUS CORPORATION", "Exif.OlympusEq.SerialNumber", "BHP212345"),
    ],
)
def test_maker_note_serial_when_exif_has_none(make: str, key: str, value: str) -> None:
    base = _jpeg(_exif({MAKE: make, MODEL: "X"}, {DTO: "2024:05:01 10:00:00"}))
    c = read_capture(_with_tags(base, {key: value}))
    assert c.serial == value
    assert c.camera.endswith(f"#{value}")


def test_body_serial_wins_over_the_maker_note_serial() -> None:
    base = _jpeg(_exif({MAKE: "Canon", MODEL: "EOS R5"}, {BODY_SERIAL: "777"}))
    assert read_capture(_with_tags(base, {"Exif.Canon.SerialNumber": "123"})).serial == "777"


# --- burst tags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "tags", "sequence"),
    [
        ("Canon", {"Exif.CanonSi.Sequence": "3"}, 3),
        ("SONY", {"Exif.Sony2.SequenceNumber": "2"}, 2),
        ("SONY", {"Exif.Sony2.SequenceNumber": "65535"}, None),  # "n/a"
        ("FUJIFILM", {"Exif.Fujifilm.SequenceNumber": "4"}, 4),
        ("Panasonic", {"Exif.Panasonic.SequenceNumber": "5"}, 5),
        ("Canon", {"Exif.Image.ImageNumber": "6"}, 6),
        ("Canon", {"Exif.Image.ImageNumber": "6", "Exif.CanonSi.Sequence": "1"}, 1),
        ("Canon", {}, None),
    ],
)
def test_sequence_from_maker_notes_and_image_number(
    make: str, tags: dict[str, str], sequence: int | None
) -> None:
    base = _jpeg(_exif({MAKE: make, MODEL: "X"}, {DTO: "2024:05:01 10:00:00"}))
    assert read_capture(_with_tags(base, tags) if tags else base).sequence == sequence


def test_image_number_in_the_exif_ifd() -> None:
    # PIL writes 0x9211 into the Exif IFD, where exiv2 has no name for it.
    assert read_capture(_jpeg(_exif({MAKE: "Canon"}, {IMAGE_NUMBER: 7}))).sequence == 7


def _apple_note(burst: str, order: str = ">") -> bytes:
    """An Apple maker note: "Apple iOS\\0", version 1, byte order, IFD at 14, offsets from 0."""
    value = burst.encode() + b"\x00"
    bom = b"MM" if order == ">" else b"II"
    entries = [(0x0001, 9, 1, 14), (0x000B, 2, len(value), 14 + 2 + 12 * 2 + 4)]
    ifd = struct.pack(order + "H", len(entries))
    ifd += b"".join(struct.pack(order + "HHII", *e) for e in entries) + b"\x00" * 4
    return b"Apple iOS\x00" + struct.pack(">H", 1) + bom + ifd + value


@pytest.mark.parametrize("order", [">", "<"])
def test_apple_burst_uuid(order: str) -> None:
    block = _exif(
        {MAKE: "Apple", MODEL: "iPhone 15 Pro"},
        {DTO: "2024:05:01 10:00:00", MAKER_NOTE: _apple_note(BURST, order)},
    )
    c = read_capture(_jpeg(block))
    assert c.burst_id == BURST
    assert (
        read_capture(make_heic(Image.new("RGB", (64, 48)), exif=block.tobytes())).burst_id == BURST
    )


@pytest.mark.parametrize(
    "note",
    [
        _apple_note(BURST)[:20],  # the IFD runs off the end
        b"Apple iOS\x00\x00\x01XX" + _apple_note(BURST)[14:],  # no byte order mark
        b"Apple iOS",
        b"Nikon\x00\x02\x10\x00\x00" + b"\x00" * 40,
    ],
)
def test_damaged_or_foreign_maker_note_has_no_burst_id(note: bytes) -> None:
    c = read_capture(_jpeg(_exif({MAKE: "Apple"}, {DTO: "2024:05:01 10:00:00", MAKER_NOTE: note})))
    assert (c.burst_id, c.time) == (None, "2024-05-01T10:00:00")


# --- formats ----------------------------------------------------------------------------------

EXIF_BLOCK = _exif(
    {MAKE: "Canon", MODEL: "Canon EOS R5"},
    {DTO: "2024:05:01 10:00:00", SUBSEC: "25", OFFSET: "+02:00", BODY_SERIAL: "0042"},
)
EXPECTED = ("2024-05-01T10:00:00.25+02:00", "exif_offset", "Canon EOS R5 #42")


def _save(fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buf, fmt, exif=EXIF_BLOCK, **kw)
    return buf.getvalue()


def _tiff() -> bytes:
    # PIL's TIFF writer drops the Exif IFD of an Image.Exif: exiv2 writes that part.
    buf = io.BytesIO()
    ifd0 = {t: v for t, v in EXIF_BLOCK.items() if t != ExifTags.IFD.Exif}
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buf, "TIFF", tiffinfo=ifd0)
    sub = EXIF_BLOCK.get_ifd(ExifTags.IFD.Exif)
    names = {DTO: "DateTimeOriginal", SUBSEC: "SubSecTimeOriginal", OFFSET: "OffsetTimeOriginal"}
    names[BODY_SERIAL] = "BodySerialNumber"
    return _with_tags(buf.getvalue(), {f"Exif.Photo.{names[t]}": str(v) for t, v in sub.items()})


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _png_exif_after_idat() -> bytes:
    png = _save("PNG")
    at, chunks = 8, []
    while at < len(png):
        (n,) = struct.unpack_from(">I", png, at)
        chunks.append(png[at : at + 12 + n])
        at += 12 + n
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] not in (b"eXIf", b"IEND")]
    return png[:8] + b"".join(rest + exif + [_png_chunk(b"IEND", b"")])


def _junk_after_app0(jpeg: bytes) -> bytes:
    assert jpeg[2:4] == b"\xff\xe0"  # PIL writes JFIF first
    end = 4 + struct.unpack_from(">H", jpeg, 4)[0]
    return jpeg[:end] + b"\x00\x17\x2a" + jpeg[end:]


def _bare(block: Image.Exif) -> bytes:
    """The TIFF stream of an EXIF block, without the "Exif\\0\\0" header PIL puts in front."""
    data = block.tobytes()
    return data[6:] if data.startswith(b"Exif\x00\x00") else data


def _cr3(block: Image.Exif) -> bytes:
    """A CR3 as exiv2 reads one: ftyp "crx ", moov > uuid(Canon) > CMT1 (IFD0), CMT2 (Exif)."""

    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    ifd0 = Image.Exif()
    ifd0.update({t: v for t, v in block.items() if t != ExifTags.IFD.Exif})
    exif = Image.Exif()
    exif.update(block.get_ifd(ExifTags.IFD.Exif))
    cmt = box(b"CMT1", _bare(ifd0)) + box(b"CMT2", _bare(exif))
    ftyp = box(b"ftyp", b"crx " + struct.pack(">I", 1) + b"crx isom")
    return ftyp + box(b"moov", box(b"uuid", CANON_UUID + cmt)) + box(b"mdat", b"\x00" * 200_000)


def _raf(block: Image.Exif) -> bytes:
    """A RAF: a 'FUJIFILMCCD-RAW ' header whose bytes 84..91 locate the embedded JPEG."""
    jpeg = _jpeg(block)
    head = b"FUJIFILMCCD-RAW 0201FF383501" + b"X-T4".ljust(32, b"\x00") + b"0100" + b"\x00" * 20
    head += struct.pack(">II", 160, len(jpeg))
    return head.ljust(160, b"\x00") + jpeg + b"\x00" * 4096


FORMATS: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: _save("JPEG"),
    # stray bytes between segments, which PIL and libjpeg skip: the walk must skip them too
    "jpeg-junk-before-exif": lambda: _junk_after_app0(_save("JPEG")),
    "png": lambda: _save("PNG"),
    "png-exif-after-idat": _png_exif_after_idat,
    "webp": lambda: _save("WEBP"),
    "tiff": _tiff,
    "heic": lambda: make_heic(Image.new("RGB", (64, 48)), exif=EXIF_BLOCK.tobytes()),
    "cr3": lambda: _cr3(EXIF_BLOCK),
    "raf": lambda: _raf(EXIF_BLOCK),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_formats(fmt: str) -> None:
    c = read_capture(FORMATS[fmt](), mtime=_never)
    assert (c.time, c.time_source, c.camera) == EXPECTED


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF plugin")
def test_avif() -> None:
    c = read_capture(_save("AVIF", quality=30), mtime=_never)
    assert (c.time, c.time_source, c.camera) == EXPECTED


def test_dng_reads_only_its_directories() -> None:
    rng = np.random.default_rng(0)
    preview = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    dng = make_dng(
        None,
        preview=preview,
        make="Canon",
        model="EOS R5",
        datetime_original="2024:05:01 10:00:00",
        subsec="25",
        offset="-05:30",
    )
    c = read_capture(dng, mtime=_never)
    assert (c.time, c.time_source, c.camera) == (
        "2024-05-01T10:00:00.25-05:30",
        "exif_offset",
        "Canon EOS R5",
    )
    assert c.timestamp == pytest.approx(_utc("2024-05-01T15:30:00+00:00") + 0.25)
    # exiv2 gets the IFDs (and some slack), not the ~500 KB of preview after them ...
    stream = capture_module._metadata_stream(dng)
    assert stream is not None
    assert len(stream) < len(dng) // 4
    # ... and reads from them exactly what it reads from the whole file.
    assert capture_module._exiv2_tags(stream, "x") == capture_module._exiv2_tags(dng, "x")


def test_cr3_reads_only_the_boxes_before_mdat() -> None:
    cr3 = _cr3(EXIF_BLOCK)
    stream = capture_module._metadata_stream(cr3)
    assert stream is not None
    assert len(stream) < 10_000 < len(cr3)


def test_pixels_are_never_decoded() -> None:
    # A JPEG cut right after its scan header, and a PNG declaring 60000x60000 pixels over
    # garbage: decoding either would fail (or allocate 10 GB); their EXIF is read all the same.
    jpeg = _save("JPEG")
    cut = jpeg[: jpeg.index(b"\xff\xda") + 20]
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    )
    png += _png_chunk(b"eXIf", _bare(EXIF_BLOCK)) + _png_chunk(b"IDAT", b"junk" * 10)
    png += _png_chunk(b"IEND", b"")
    for data in (cut, png):
        c = read_capture(data, mtime=_never)
        assert (c.time, c.time_source, c.camera) == EXPECTED


def _junk_tiff() -> bytes:
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 3) + b"\xff" * 40


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 64,
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"\xff\xd8\xff\xe1\x00\x40Exif\x00\x00" + _junk_tiff() + b"\xff\xd9",
        b"\xff\xd8\xff\xe1\x00\x01",  # a segment length below 2
        b"\xff\xd8" + b"\x00" * 1000,  # no marker at all
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"eXIf", b"garbage!"),
        b"RIFF\x20\x00\x00\x00WEBPEXIF\xff\xff\xff\x7fMM",
        b"II*\x00\xff\xff\xff\x7f",  # IFD0 beyond the file
        b"MM\x00*\x00\x00\x00\x08\xff\xff",  # an IFD with 65535 entries
        _junk_tiff(),
        b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom" + b"\xff\xff\xff\xffmoov",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40,
        b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif" + b"\x00" * 40,
        b"FUJIFILMCCD-RAW " + b"\x00" * 68 + struct.pack(">II", 10**9, 10),
    ],
)
def test_damaged_files_never_raise(data: bytes) -> None:
    c = read_capture(data, mtime=MTIME)
    assert (c.time_source, c.camera) == ("mtime", "unknown")


def test_a_cut_exif_segment_keeps_what_it_holds() -> None:
    jpeg = _save("JPEG")
    exif_at = jpeg.index(b"Exif\x00\x00")
    # Cut after IFD0's values (Make, Model), before the Exif IFD with the times.
    cut = jpeg[: jpeg.index(b"Canon EOS R5", exif_at) + 13]
    c = read_capture(cut, mtime=MTIME)
    assert (c.time_source, c.camera) == ("mtime", "Canon EOS R5")


# --- rows and given captures ------------------------------------------------------------------


def test_capture_row_matches_capture_columns() -> None:
    full = read_capture(_with_tags(_save("JPEG"), {"Exif.CanonSi.Sequence": "2"}))
    empty = read_capture(b"")
    rows = [capture_row(full), capture_row(empty)]
    assert all(list(row) == list(CAPTURE_COLUMNS) for row in rows)
    table = pa.Table.from_pylist(rows, schema=pa.schema(CAPTURE_COLUMNS))
    assert table.column("capture_ts").to_pylist() == [pytest.approx(T8 + 0.25), None]
    assert table.column("camera").to_pylist() == ["Canon EOS R5 #42", "unknown"]
    assert table.column("sequence").to_pylist() == [2, None]
    assert table.column("time_source").to_pylist() == ["exif_offset", "none"]
    assert set(TIME_SOURCES) >= {r["time_source"] for r in rows}


@pytest.mark.parametrize(
    ("value", "time", "ts"),
    [
        ("2024-05-01T10:00:00.12+02:00", "2024-05-01T10:00:00.12+02:00", T8 + 0.12),
        ("2024-05-01T10:00:00", "2024-05-01T10:00:00", T10),
        ("2024-05-01 10:00:00Z", "2024-05-01T10:00:00+00:00", T10),
        ("2024:05:01 10:00:00", "2024-05-01T10:00:00", T10),
        (T8 + 0.25, "2024-05-01T08:00:00.250000+00:00", T8 + 0.25),
        (int(T8), "2024-05-01T08:00:00+00:00", T8),
    ],
)
def test_given_capture(value: str | float, time: str, ts: float) -> None:
    c = given_capture(value, camera="  phone  A ")
    assert (c.time, c.time_source, c.camera, c.model) == (time, "given", "phone A", "phone A")
    assert c.timestamp == pytest.approx(ts)


def test_given_capture_without_time() -> None:
    c = given_capture(None)
    assert (c.time, c.timestamp, c.time_source, c.camera) == (None, None, "none", "unknown")


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2024-13-01T00:00:00",
        "2024-05-01T10:00:00+25:00",
        "",
        math.nan,
        math.inf,
        1e20,
        True,
        [1],
    ],
)
def test_given_capture_refuses_bad_times(value: object) -> None:
    with pytest.raises(ConfigError, match="capture time") as info:
        given_capture(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


def test_given_capture_refuses_a_non_string_camera() -> None:
    with pytest.raises(ConfigError, match="camera"):
        given_capture(None, camera=5)  # type: ignore[arg-type]


def test_capture_is_frozen() -> None:
    c = Capture(None, None, "none", None, None, None, None, None)
    with pytest.raises(AttributeError):
        c.time = "now"  # type: ignore[misc]
