"""Capture metadata of a photo, read from its bytes: when, with which camera body, which burst.

``keeper pick`` groups shots into bursts by capture time per camera body, so this module reads
just that, cheaply and without ever decoding a pixel:

- time: EXIF DateTimeOriginal + SubSecTimeOriginal + OffsetTimeOriginal, else the Digitized
  triple, else IFD0 DateTime + SubSecTime + OffsetTime, else the file's modification time,
  else nothing. A garbled tag is ignored (the next source is tried): bad metadata never raises.
- camera: Make, Model and a body serial (BodySerialNumber, DNG CameraSerialNumber or a maker
  note's serial, in exiv2's ``serialNumber()`` order), folded into one key per body.
- burst: Apple's maker-note BurstUUID, and a frame number within a drive sequence (TIFF/EP
  ImageNumber, or the Canon, Sony, Fujifilm or Panasonic maker-note sequence number).

How the bytes are read (measured on a 5 MB 12 MP JPEG, whose full decode costs ~80 ms here):
exiv2 (pyexiv2) decodes its EXIF stream, maker notes included, in ~0.05 ms, plus ~1-2 ms for a
40 KB maker note (exiv2 prints every value as text). PIL's header-only ``getexif()`` costs
~0.1 ms but decodes no maker note. pyexiv2 copies all the bytes it is given first (~0.6-0.9 ms
per MB: 3 ms for that JPEG, 27 ms for a 29 MB DNG), so it is never handed a whole file when a
smaller piece holds the metadata: the EXIF segment of a JPEG, the eXIf/EXIF chunk of a
PNG/WebP, the Exif item of a HEIF/AVIF (container parsed by pillow-heif / PIL, no pixel
decoded), the directories of a TIFF-based RAW (CR2, NEF, ARW, DNG, ORF, RW2: the bytes up to
the end of IFD0 and Exif IFD values, maker note included), the boxes before ``mdat`` of a CR3,
and the EXIF segment of a RAF's embedded JPEG.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import pyarrow as pa

from keeper_core.errors import PIL_ERRORS, ConfigError
from keeper_core.exiv2_session import exiv2
from keeper_core.images import HEIF_BRANDS

__all__ = [
    "CAPTURE_COLUMNS",
    "TIME_SOURCES",
    "Capture",
    "capture_row",
    "epoch_time",
    "given_capture",
    "read_capture",
]

_log = logging.getLogger(__name__)

#: Where a capture time came from: EXIF with its UTC offset, EXIF local time (offset
#: unknown), the file's modification time, a caller's value, or nowhere.
TIME_SOURCES = ("exif_offset", "exif", "mtime", "given", "none")

#: Arrow types of the capture columns, in the order :func:`capture_row` writes them.
CAPTURE_COLUMNS: dict[str, pa.DataType] = {
    "capture_time": pa.string(),
    "capture_ts": pa.float64(),
    "time_source": pa.string(),
    "camera_make": pa.string(),
    "camera_model": pa.string(),
    "camera_serial": pa.string(),
    "camera": pa.string(),
    "burst_id": pa.string(),
    "sequence": pa.int32(),
}

# (date-time, sub-seconds, UTC offset) keys, most to least specific to the moment of capture.
_TIME_KEYS = (
    (
        "Exif.Photo.DateTimeOriginal",
        "Exif.Photo.SubSecTimeOriginal",
        "Exif.Photo.OffsetTimeOriginal",
    ),
    # TIFF/EP puts DateTimeOriginal in IFD0: some RAW files carry it only there.
    (
        "Exif.Image.DateTimeOriginal",
        "Exif.Photo.SubSecTimeOriginal",
        "Exif.Photo.OffsetTimeOriginal",
    ),
    (
        "Exif.Photo.DateTimeDigitized",
        "Exif.Photo.SubSecTimeDigitized",
        "Exif.Photo.OffsetTimeDigitized",
    ),
    ("Exif.Image.DateTime", "Exif.Photo.SubSecTime", "Exif.Photo.OffsetTime"),
)
# exiv2's easyaccess serialNumber() list, in its order.
_SERIAL_KEYS = (
    "Exif.Image.CameraSerialNumber",
    "Exif.Photo.BodySerialNumber",
    "Exif.Canon.SerialNumber",
    "Exif.Nikon3.SerialNumber",
    "Exif.Nikon3.SerialNO",
    "Exif.Fujifilm.SerialNumber",
    "Exif.Olympus.SerialNumber2",
    "Exif.OlympusEq.SerialNumber",
    "Exif.Pentax.SerialNumber",
    "Exif.PentaxDng.SerialNumber",
    "Exif.Sigma.SerialNumber",
    "Exif.Sony1.SerialNumber",
    "Exif.Sony2.SerialNumber",
)
# Frame numbers within a drive sequence: the makers' own burst counters first, then TIFF/EP
# ImageNumber (exiv2 names 0x9211 only in IFD0; in the Exif IFD it stays a bare number).
_SEQUENCE_KEYS = (
    "Exif.CanonSi.Sequence",
    "Exif.Sony1.SequenceNumber",
    "Exif.Sony2.SequenceNumber",
    "Exif.Fujifilm.SequenceNumber",
    "Exif.Panasonic.SequenceNumber",
    "Exif.Image.ImageNumber",
    "Exif.Photo.0x9211",
)
_SEQUENCE_NA = 0xFFFF  # unsigned-short "not applicable" (Sony writes it outside a sequence)
_MAKER_NOTE = "Exif.Photo.MakerNote"
# exiv2 has no decoder for Apple's maker note and prints it as decimal bytes, in which its
# "Apple iOS\0" header reads:
_APPLE_PREFIX = b"65 112 112 108 101 32 105 79 83 0 "
_APPLE_BURST_UUID = 0x000B  # ExifTool Apple.pm: "unique ID for all images in a burst"
_MAX_TEXT = 128  # longer Make/Model/serial strings are garbage, not names
_MAX_IFD_ENTRIES = 1024  # a real IFD has a few dozen entries
_MAX_BOXES = 256  # top-level ISO-BMFF boxes before mdat in a CR3: a handful
# Values a little past the directories (a maker note's own out-of-line data) survive the cut.
_TIFF_SLACK = 64 * 1024
# The last bytes of a TIFF stream that hold EXIF are found by following IFD0 -> Exif IFD.
_TAG_EXIF_IFD = 0x8769
_TIFF_TYPE_SIZES = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
}
_JPEG_BARE = frozenset((0x01, *range(0xD0, 0xD9)))  # markers without a length field
_RAW_TIFF_MAGIC = (42, 0x4F52, 0x5352, 0x55)  # TIFF, ORF "RO" / "RS", RW2 "U"
_RAF_JPEG = 84  # a RAF header's (offset, length) of its embedded JPEG, big-endian
# What pybind11 turns exiv2's C++ exceptions into.
_EXIV2_ERRORS = (RuntimeError, ValueError, IndexError, OverflowError)
# What pillow-heif / PIL raise on a damaged container: PIL's (errors.PIL_ERRORS, IndexError
# included: pillow-heif's ``info`` of a file that lists no image).
_CONTAINER_ERRORS = PIL_ERRORS

# EXIF writes "2024:05:01 10:00:00"; software that rewrote it may use ISO separators, so any of
# ":-/." in the date and ":." in the time, " " or "T" between, and (rarely) an inline fraction
# and offset. Fixed-width fields: anything else is not a time.
# ASCII digits only: \d alone matches any script's ("١٢"), which int() reads but ISO is not.
_DATETIME = re.compile(
    r"(\d{4})[:\-/.](\d{2})[:\-/.](\d{2})(?:T| +)(\d{2})[:.](\d{2})[:.](\d{2})"
    r"(?:[.,](\d+))?\s*(Z|[+-]\d{2}:?\d{2})?",
    re.ASCII,
)
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})", re.ASCII)
_DIGITS = re.compile(r"\d+", re.ASCII)
# What exiv2 0.28 prints for a value of a type it does not know: its bytes in decimal. Exif 3.0's
# UTF-8 type (129; Make, Model, serials may use it) is one (Exiv2/exiv2#2659).
_DECIMAL_BYTES = re.compile(rb"\d{1,3}(?: \d{1,3})*", re.ASCII)
_MIN_YEAR = 1800  # before photography: a placeholder such as "0001:01:01", not a capture time
_MAX_OFFSET_MIN = 14 * 60  # UTC-12:00 .. UTC+14:00 are the offsets in use
_MAX_FRACTION_DIGITS = 9  # nanoseconds; beyond that it is noise


@dataclass(frozen=True)
class Capture:
    """When and with what a photo was taken, as far as its metadata tells.

    Attributes:
        time: ISO 8601 as recorded ("2024-05-01T10:00:00.12+02:00"), sub-seconds included, an
            offset only when known (a modification time is UTC, "+00:00"); None if unknown.
        timestamp: seconds; a UTC epoch when the offset is known, else the local wall clock
            read as if it were UTC (one camera is one clock, so gaps within a camera stay
            right, while times of different cameras compare only as far as their clocks do).
        time_source: one of :data:`TIME_SOURCES`.
        make, model, serial: the camera body as recorded (NULs and extra whitespace removed;
            an all-zero serial, a placeholder, is None).
        burst_id: a maker's burst group id (Apple's BurstUUID) where present.
        sequence: the frame number within a burst/drive sequence where present, as the maker
            counts (some from 0, some from 1; 0 may also mean "single shot").
    """

    time: str | None
    timestamp: float | None
    time_source: str
    make: str | None
    model: str | None
    serial: str | None
    burst_id: str | None
    sequence: int | None

    @property
    def camera(self) -> str:
        """One key per camera body: "Make Model #serial", never empty ("unknown").

        The make is left out when the model already starts with it ("Canon EOS R5", not
        "Canon Canon EOS R5"); an all-digit serial loses its leading zeros, so a body writing
        "012345" in one format and 12345 in another keeps one key.
        """
        make, model = self.make or "", self.model or ""
        if make and model.casefold().split()[:1] == make.casefold().split()[:1]:
            make = ""  # "NIKON CORPORATION" + "NIKON D850" -> "NIKON D850"
        name = f"{make} {model}".strip() or "unknown"
        serial = self.serial or ""
        if serial.isascii() and serial.isdigit():
            serial = serial.lstrip("0")
        return f"{name} #{serial}" if serial else name


def capture_row(c: Capture) -> dict[str, Any]:
    """One table row of ``c``: the keys and types of :data:`CAPTURE_COLUMNS` (None = null)."""
    return {
        "capture_time": c.time,
        "capture_ts": c.timestamp,
        "time_source": c.time_source,
        "camera_make": c.make,
        "camera_model": c.model,
        "camera_serial": c.serial,
        "camera": c.camera,
        "burst_id": c.burst_id,
        "sequence": c.sequence,
    }


def read_capture(
    data: bytes,
    *,
    mtime: float | Callable[[], float | None] | None = None,
    source: str | None = None,
) -> Capture:
    """Read a photo's capture metadata from its bytes, without decoding any pixel.

    JPEG, PNG, WebP, HEIF/HEIC, AVIF, TIFF and camera RAW (CR2, NEF, ARW, DNG, ORF, RW2, CR3,
    RAF) are read; other bytes have no metadata. Missing, damaged or garbled metadata never
    raises: what is valid is used, the rest ignored, and the time falls back along the
    sources in the module docstring.

    Args:
        data: the file's bytes.
        mtime: the file's modification time in epoch seconds, or a callable returning it (or
            None), called only when the metadata holds no valid time: on S3 it costs a HEAD.
        source: where the bytes came from (a URI), named in debug logs of ignored values.

    Returns:
        The :class:`Capture`. ``time_source`` is "none" when neither metadata nor ``mtime``
        gave a valid time.

    Raises:
        TypeError: ``data`` is not bytes-like, or ``mtime`` (or what it returned) is neither a
            number nor None. Whatever the ``mtime`` callable raises propagates.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if not callable(mtime):  # refused whatever the file holds, not only when it has no time
        epoch_time(mtime, "mtime")
    where = source or "<bytes>"
    tags = _read_tags(bytes(data), where)
    make, model = _text(tags.get("Exif.Image.Make")), _text(tags.get("Exif.Image.Model"))
    serial = next(filter(None, (_serial(tags.get(k)) for k in _SERIAL_KEYS)), None)
    sequence = next(
        (s for s in (_sequence(tags.get(k)) for k in _SEQUENCE_KEYS) if s is not None), None
    )
    burst_id = _apple_burst_uuid(tags.get(_MAKER_NOTE))
    when: tuple[str | None, float | None, str] | None = next(
        filter(None, (_exif_time(tags, keys, where) for keys in _TIME_KEYS)), None
    )
    if when is None:  # only now: on S3 the modification time costs a HEAD request
        when = epoch_time(mtime() if callable(mtime) else mtime, "mtime")
    return Capture(*when, make, model, serial, burst_id, sequence)


def given_capture(time: str | float | None, camera: str | None = None) -> Capture:
    """A capture a client supplied (the HTTP API), instead of one read from the bytes.

    Args:
        time: an ISO 8601 date-time ("2024-05-01T10:00:00.12+02:00"; without an offset it is
            a camera's local clock, as in EXIF; the EXIF form "2024:05:01 10:00:00" is
            accepted too), epoch seconds (a number, UTC), or None (unknown).
        camera: an opaque camera key (shots with the same key are one body); kept as the
            model, so :attr:`Capture.camera` is this string with whitespace normalised.

    Returns:
        A :class:`Capture` with ``time_source`` "given" ("none" when ``time`` is None).

    Raises:
        ConfigError: ``time`` is not a valid date-time string or finite number (the message
            names the value), or ``camera`` is not a string.
    """
    if camera is not None and not isinstance(camera, str):
        raise ConfigError(f"camera must be a string, got {camera!r}")
    # An opaque key, whole: _text would cut it at 128 characters and drop a tab, making two
    # keys one camera.
    model = (" ".join(camera.split()) or None) if camera is not None else None
    if time is None:
        return Capture(None, None, "none", None, model, None, None, None)
    if isinstance(time, str):
        parts = _split_datetime(time)
        offset = _offset_minutes(parts[2]) if parts is not None and parts[2] else None
        if parts is None or (parts[2] and offset is None):
            raise ConfigError(
                f"capture time {time!r} is not an ISO 8601 date-time "
                "(e.g. '2024-05-01T10:00:00.12+02:00')"
            )
        iso, ts, _ = _compose(parts[0], parts[1], offset)
        return Capture(iso, ts, "given", None, model, None, None, None)
    if isinstance(time, bool) or not isinstance(time, int | float):
        raise ConfigError(
            f"capture time must be an ISO 8601 string or epoch seconds, got {_shown(time)}"
        )
    epoch_iso, epoch_ts, time_source = epoch_time(time, "given")
    if epoch_iso is None:
        raise ConfigError(f"capture time {_shown(time)} is not a finite epoch in range")
    return Capture(epoch_iso, epoch_ts, time_source, None, model, None, None, None)


# --- time ---------------------------------------------------------------------------------


def _split_datetime(text: str) -> tuple[datetime, str, str | None] | None:
    """(wall clock as a UTC datetime, fraction digits, inline offset) of a date-time, or None."""
    m = _DATETIME.fullmatch(text.replace("\x00", " ").strip())
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    if y < _MIN_YEAR:
        return None
    try:
        local = datetime(y, mo, d, h, mi, s, tzinfo=UTC)
    except ValueError:  # month 13, February 30th, hour 24, second 60
        return None
    return local, m.group(7) or "", m.group(8)


def _compose(local: datetime, fraction: str, offset: int | None) -> tuple[str, float, bool]:
    """ISO string and timestamp of a wall-clock time (in a UTC datetime) + fraction + offset."""
    fraction = fraction[:_MAX_FRACTION_DIGITS]
    iso = local.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "")
    ts = local.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)
    if offset is None:
        return iso, ts, False
    sign = "-" if offset < 0 else "+"
    iso += f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    return iso, ts - 60.0 * offset, True


def _offset_minutes(text: str) -> int | None:
    """Minutes east of UTC of "+02:00" (also "+0200", and "Z"), or None if not an offset."""
    text = text.replace("\x00", " ").strip()
    if text == "Z":
        return 0
    m = _OFFSET.fullmatch(text)
    if m is None:
        return None
    hours, minutes = int(m.group(2)), int(m.group(3))
    total = hours * 60 + minutes
    if minutes >= 60 or total > _MAX_OFFSET_MIN:
        return None
    return -total if m.group(1) == "-" else total


def _subseconds(text: str) -> str | None:
    """The digits of a SubSecTime value ("12" is .12 s, "120" is .120 s), or None if garbled."""
    text = text.replace("\x00", " ").strip()
    return text if _DIGITS.fullmatch(text) else None


def _exif_time(
    tags: dict[str, bytes], keys: tuple[str, str, str], where: str
) -> tuple[str, float, str] | None:
    """(ISO, timestamp, time_source) from one (date-time, sub-seconds, offset) key triple."""
    raw = tags.get(keys[0])
    if raw is None:
        return None
    parts = _split_datetime(_decode(raw))
    if parts is None:
        _log.debug("%s: ignoring %s %r", where, keys[0], _decode(raw))
        return None
    local, fraction, inline_offset = parts
    offset = _offset_minutes(inline_offset) if inline_offset else None
    # The dedicated tags win over a fraction or offset written inline.
    if (sub := tags.get(keys[1])) is not None:
        if (digits := _subseconds(_decode(sub))) is not None:
            fraction = digits
        else:
            _log.debug("%s: ignoring %s %r", where, keys[1], _decode(sub))
    if (off := tags.get(keys[2])) is not None:
        if (minutes := _offset_minutes(_decode(off))) is not None:
            offset = minutes
        else:
            _log.debug("%s: ignoring %s %r", where, keys[2], _decode(off))
    iso, ts, has_offset = _compose(local, fraction, offset)
    return iso, ts, "exif_offset" if has_offset else "exif"


def _shown(value: object) -> str:
    """A client's value as a message repeats it: its repr, cut to 40 characters.

    An int's repr can itself fail (more than sys.get_int_max_str_digits() digits).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def epoch_time(seconds: object, time_source: str) -> tuple[str | None, float | None, str]:
    """(ISO in UTC, timestamp, time_source) of epoch seconds; (None, None, "none") if unusable."""
    if seconds is None:
        return None, None, "none"
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"a modification time must be epoch seconds, got {_shown(seconds)}")
    try:
        finite = math.isfinite(seconds)
    except OverflowError:  # an int beyond any float (10**400): beyond any date too
        return None, None, "none"
    if not finite:
        return None, None, "none"
    try:
        when = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):  # beyond year 9999 or the platform's range
        return None, None, "none"
    return when.isoformat(), float(seconds), time_source


# --- camera and burst -----------------------------------------------------------------------


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _text(raw: bytes | None) -> str | None:
    """A tag's text up to its first NUL, unprintable characters dropped, whitespace collapsed."""
    if raw is None:
        return None
    text = _decode(raw.split(b"\x00", 1)[0][: _MAX_TEXT * 4])
    text = " ".join("".join(c for c in text if c.isprintable()).split())[:_MAX_TEXT]
    return text or None


def _serial(raw: bytes | None) -> str | None:
    text = _text(raw)
    if text is None or not text.strip("0"):  # "0", "000000": a body that never set one
        return None
    return text


def _sequence(raw: bytes | None) -> int | None:
    """The first integer of a sequence tag, or None when absent, garbled or "not applicable"."""
    if raw is None:
        return None
    first = _decode(raw).split()[:1]
    if not first or not _DIGITS.fullmatch(first[0]):
        return None
    digits = first[0].lstrip("0") or "0"
    if len(digits) > len(str(_SEQUENCE_NA)):  # past "not applicable" (int() refuses 4,301+)
        return None
    value = int(digits)
    return value if value < _SEQUENCE_NA else None


def _apple_burst_uuid(raw: bytes | None) -> str | None:
    """BurstUUID (tag 0x000b) of an Apple maker note, which exiv2 leaves as decimal bytes.

    Layout (ExifTool MakerNotes.pm, MakerNoteApple): "Apple iOS\\0", a 2-byte version, a
    byte order mark ("MM"), then an IFD at offset 14 whose value offsets count from the
    maker note's first byte.
    """
    if raw is None or not raw.startswith(_APPLE_PREFIX):
        return None
    try:
        note = bytes(int(b) for b in raw.split())
    except ValueError:  # a value out of 0..255 or not a number: not what exiv2 prints
        return None
    order = {b"MM": ">", b"II": "<"}.get(note[12:14])
    if order is None:
        return None
    try:
        (n,) = struct.unpack_from(order + "H", note, 14)
        for i in range(min(n, _MAX_IFD_ENTRIES)):
            at = 16 + 12 * i
            tag, kind, count, offset = struct.unpack_from(order + "HHII", note, at)
            if tag == _APPLE_BURST_UUID and kind == 2:  # ASCII
                value = (
                    note[at + 8 : at + 8 + count] if count <= 4 else note[offset : offset + count]
                )
                return _text(value)
    except struct.error:  # an IFD running off the end of the note
        return None
    return None


# --- reading the metadata ---------------------------------------------------------------------


def _read_tags(data: bytes, where: str) -> dict[str, bytes]:
    """exiv2's EXIF entries (key -> value as exiv2 prints it) of the file's metadata piece."""
    try:
        stream = _metadata_stream(data)
    except _CONTAINER_ERRORS as e:
        _log.debug("%s: no readable metadata container (%s)", where, e)
        return {}
    if not stream:
        return {}
    return _exiv2_tags(stream, where)


def _exiv2_tags(stream: bytes, where: str) -> dict[str, bytes]:
    # Muted, not just quiet: at its "error" level pyexiv2 turns exiv2's recoverable errors
    # (one bad maker-note entry) into an exception that loses every tag of the file. The level
    # is process-wide, so the read holds exiv2 for itself (keeper_core.exiv2_session).
    with exiv2("mute") as pyexiv2:
        return _read_tags_muted(pyexiv2, stream, where)


def _read_tags_muted(pyexiv2: ModuleType, stream: bytes, where: str) -> dict[str, bytes]:
    image = pyexiv2.ImageData.__new__(pyexiv2.ImageData)
    try:
        pyexiv2.ImageData.__init__(image, stream)
    except _EXIV2_ERRORS as e:
        # __init__ copied the bytes into a C buffer before exiv2 refused them; nothing else
        # frees it.
        buffer = getattr(image, "buffer", None)
        if buffer is not None:
            buffer.destroy()
        _log.debug("%s: exiv2 cannot read the metadata (%s)", where, e)
        return {}
    try:
        # The binding's own list, not ImageData.read_exif(): that decodes every value with one
        # codec (and XP* tags as UCS-2), so one garbled string raises for the whole file.
        entries = image._exiv2api_image.read_exif()
    except _EXIV2_ERRORS as e:
        _log.debug("%s: exiv2 cannot read the metadata (%s)", where, e)
        entries = []
    finally:
        image.close()
    tags: dict[str, bytes] = {}
    for entry in entries:
        key = entry["tag"].decode("ascii", "replace")
        value = entry["value"]
        if entry.get("typeName") == "unknown" and _DECIMAL_BYTES.fullmatch(value):
            numbers = [int(t) for t in value.split()]
            if max(numbers) < 256:  # the value's own bytes (UTF-8 text, for Exif 3.0's type)
                value = bytes(numbers)
        tags.setdefault(key, value)  # a repeated tag: its first value, as exiv2 lists it
    return tags


def _metadata_stream(data: bytes) -> bytes | None:
    """The smallest piece of ``data`` that exiv2 reads the EXIF (maker note included) from."""
    head = data[:16]
    if head.startswith(b"\xff\xd8"):
        return _jpeg_exif(data)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_exif(data)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_exif(data)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"crx ":
            return _bmff_before_mdat(data)
        if brand in (b"avif", b"avis") or (brand in (b"mif1", b"msf1") and b"avif" in data[16:32]):
            return _pil_exif(data, "AVIF")
        if brand in HEIF_BRANDS:
            return _heif_exif(data)
        return None
    if head[:2] in (b"II", b"MM") and len(data) >= 8:
        order = "<" if head[:2] == b"II" else ">"
        if struct.unpack_from(order + "H", data, 2)[0] in _RAW_TIFF_MAGIC:
            return data[: _tiff_metadata_end(data)]
        return None  # BigTIFF and CRW: exiv2 reads neither
    if head.startswith(b"FUJIFILMCCD-RAW") and len(data) >= _RAF_JPEG + 8:
        # The EXIF (Fujifilm maker note included) is the embedded JPEG's.
        at, length = struct.unpack_from(">II", data, _RAF_JPEG)
        return _jpeg_exif(data, at, min(at + length, len(data)))
    return None


def _strip_exif_header(blob: bytes | None) -> bytes | None:
    # PNG/WebP writers disagree on whether the block starts with JPEG's "Exif\0\0" header.
    if blob and blob.startswith(b"Exif\x00\x00"):
        return blob[6:]
    return blob or None


def _jpeg_exif(data: bytes, start: int = 0, stop: int | None = None) -> bytes | None:
    """The TIFF stream of the first APP1 "Exif" segment of the JPEG in ``data[start:stop]``.

    Walks the segments up to the first scan: the pixels are never looked at.
    """
    n = len(data) if stop is None else stop
    if data[start : start + 2] != b"\xff\xd8":
        return None
    i = start + 2
    while i + 4 <= n:
        if data[i] != 0xFF:  # junk between segments: PIL and libjpeg skip to the next marker
            i = data.find(b"\xff", i, n)
            if i < 0:
                return None
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0xD9, 0xDA):  # EOI or SOS: metadata comes before the first scan
            return None
        elif marker in _JPEG_BARE:
            i += 2
        else:
            (length,) = struct.unpack_from(">H", data, i + 2)
            if length < 2:
                return None
            if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
                return data[i + 10 : min(i + 2 + length, n)]
            i += 2 + length
    return None


def _png_exif(data: bytes) -> bytes | None:
    """The eXIf chunk (allowed after IDAT too: chunks are skipped by length, never inflated)."""
    at, n = 8, len(data)
    while at + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, at)
        if kind == b"eXIf":
            return _strip_exif_header(data[at + 8 : at + 8 + length])
        if kind == b"IEND":
            return None
        at += 12 + length
    return None


def _webp_exif(data: bytes) -> bytes | None:
    at, n = 12, len(data)
    while at + 8 <= n:
        kind, size = struct.unpack_from("<4sI", data, at)
        if kind == b"EXIF":
            return _strip_exif_header(data[at + 8 : at + 8 + size])
        at += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _heif_exif(data: bytes) -> bytes | None:
    import pillow_heif  # here: it costs ~40 ms to load, paid only by HEIF files

    heif = pillow_heif.open_heif(data, convert_hdr_to_8bit=False)  # parses boxes, no decode
    return _strip_exif_header(heif.info.get("exif"))


def _pil_exif(data: bytes, fmt: str) -> bytes | None:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=[fmt]) as im:  # header only: no pixel decoded
        return _strip_exif_header(im.info.get("exif"))


def _tiff_metadata_end(data: bytes) -> int:
    """Where the EXIF of a TIFF-based file ends: past IFD0, the Exif IFD and their values.

    Camera RAW files put these directories (maker note included) in their first few hundred
    KB and the pixels after, so exiv2 is handed that prefix instead of a 25-60 MB copy. Strips
    and tiles are not values of these IFDs and stay out; SubIFDs and IFD1 (previews) too.
    Returns ``len(data)`` when the structure cannot be followed.
    """
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd0,) = struct.unpack_from(order + "I", data, 4)
        end, exif_ifd = _ifd_extent(data, order, ifd0)
        if exif_ifd is not None and exif_ifd != ifd0:
            end = max(end, _ifd_extent(data, order, exif_ifd)[0])
    except (struct.error, ValueError):
        return len(data)
    return min(len(data), end + _TIFF_SLACK)


def _ifd_extent(data: bytes, order: str, at: int) -> tuple[int, int | None]:
    """(end of the IFD at ``at`` and of its out-of-line values, its Exif IFD pointer)."""
    (count,) = struct.unpack_from(order + "H", data, at)
    end = at + 2 + 12 * count + 4
    if at < 8 or count > _MAX_IFD_ENTRIES or end > len(data):
        raise ValueError("not a followable IFD")
    exif_ifd = None
    for i in range(count):
        tag, kind, n, value = struct.unpack_from(order + "HHII", data, at + 2 + 12 * i)
        size = _TIFF_TYPE_SIZES.get(kind, 1) * n
        if size > 4 and value + size <= len(data):  # values beyond the file: exiv2 drops them
            end = max(end, value + size)
        if tag == _TAG_EXIF_IFD and kind in (4, 13):  # LONG or IFD
            exif_ifd = value
    return end, exif_ifd


def _bmff_before_mdat(data: bytes) -> bytes:
    """A CR3 up to its first ``mdat`` box: its metadata (CMT1-4 in ``moov``) all comes before."""
    at, n = 0, len(data)
    for _ in range(_MAX_BOXES):
        if at + 8 > n:
            break
        size, kind = struct.unpack_from(">I4s", data, at)
        if kind == b"mdat":
            return data[:at]
        if size == 1 and at + 16 <= n:
            (size,) = struct.unpack_from(">Q", data, at + 8)
        if size < 8:  # 0: "to the end of the file"; smaller: damaged
            break
        at += size
    return data
