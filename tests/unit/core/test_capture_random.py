"""keeper_core.capture over seeded random metadata, against a plain reference.

Seeded cases (``KEEPER_HISTORIES=2000`` runs more; a failure prints its seed and the tags it
wrote, so it replays) draw EXIF as cameras and the software after them write it, and worse:

- times: DateTimeOriginal in the Exif IFD and (TIFF/EP) in IFD0, DateTimeDigitized, IFD0
  DateTime, each with its own SubSecTime* and OffsetTime*, any of them absent, valid or
  garbled: leap days and February 30th, hour 24, second 60, years 0000 / 1600 / 1799 / 1800 /
  1900 / 2038 / 9999, blank placeholders, 2-digit fields, ISO separators and ``T``, tabs, inline
  fractions and offsets, trailing spaces and NULs, junk after the NUL; sub-seconds of 1 to 13
  digits, blank or with letters; offsets +05:30, -00:00, Z, +14:00, +15:00, +05:75, garbage;
- camera: Make, Model, DNG CameraSerialNumber and BodySerialNumber with NULs, tabs, control
  characters, bytes that are not UTF-8, letters beyond ASCII, 300-character strings, all-zero
  serials; ImageNumber as LONG, SHORT, ASCII, 65535;
- layout: little- and big-endian TIFF, directories and values in any order with gaps, tags
  unsorted, a repeated tag, a tag in the wrong IFD (where it is no time), and for TIFF files a
  "pixel" block of 70-140 KB anywhere, so that the cut of ``_tiff_metadata_end`` matters.

``reference`` is the documented contract written out by hand (module, ``Capture`` and
``_DATETIME`` docstrings, docs/picking.md): exiv2 prints an ASCII value up to its first NUL; the
first of the four (date-time, sub-seconds, offset) triples whose date-time is valid gives the
time, a garbled sub-second or offset is dropped alone, the dedicated tags win over an inline
fraction or offset, a fraction keeps at most 9 digits, an offset lies within +-14:00; else the
modification time (UTC, asked for only then), else nothing. Checked, per case:

- every container gives the reference's capture: a JPEG (the EXIF APP1 after APP0, ICC, an XMP
  APP1, a COM holding a decoy APP1, DQT or SOF, with junk and fill bytes between segments and a
  second EXIF APP1 after the first), a PNG (eXIf before or after IDAT, with or without the
  "Exif\\0\\0" header), a WebP (odd-sized chunks before EXIF), a TIFF, an ORF, a CR3, a RAF and,
  every few seeds, a HEIC and an AVIF; ``capture_row`` fits ``CAPTURE_COLUMNS``; ``given_capture`` of the
  time read gives that time back;
- hostile directories (IFD loops, Exif IFD pointers to itself or beyond the file, counts of
  2^32-1, unknown types, an entry count of 65,535, long IFD chains, cuts, overwritten bytes) and hostile
  containers never raise, answer in well under a second, and give a capture whose time is ASCII
  ISO 8601 whose timestamp is the reference's reading of that very string;
- ``given_capture`` of random epochs and ISO strings is the reference's, or a ConfigError where
  the reference refuses; its time round-trips through ``given_capture`` and ``epoch_time``.

The tests at the end are what this found, each a minimal reproduction, fixed since.
"""

from __future__ import annotations

import calendar
import io
import math
import os
import random
import struct
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image, features

from keeper_core.capture import (
    CAPTURE_COLUMNS,
    TIME_SOURCES,
    Capture,
    capture_row,
    epoch_time,
    given_capture,
    read_capture,
)
from keeper_core.errors import ConfigError

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "200"))
HOSTILE_SEEDS = max(SEEDS // 2, 1)
GIVEN_SEEDS = max(SEEDS // 6, 1)
GIVEN_CASES = 25  # per seed: each costs microseconds, a pytest item a few milliseconds
HEIF_EVERY = 6  # an encoder costs ~2-15 ms: a HEIC and an AVIF every few seeds
#: A hostile read may take this long before it counts as a blow-up (a normal one: ~0.1 ms).
HOSTILE_CALL_S = 1.0

# Tags (EXIF 2.32, TIFF/EP, DNG).
MAKE, MODEL, DATETIME, EXIF_IFD = 0x010F, 0x0110, 0x0132, 0x8769
DTO, DTD, IMAGE_NUMBER = 0x9003, 0x9004, 0x9211
OFFSET_0, OFFSET_O, OFFSET_D = 0x9010, 0x9011, 0x9012
SUBSEC_0, SUBSEC_O, SUBSEC_D = 0x9290, 0x9291, 0x9292
BODY_SERIAL, CAMERA_SERIAL = 0xA431, 0xC62F
STRIP_OFFSETS, STRIP_COUNTS = 0x0111, 0x0117
ASCII, SHORT, LONG, SLONG = 2, 3, 4, 9

# (IFD, date-time tag, sub-seconds tag, offset tag), most to least specific (module docstring;
# the TIFF/EP DateTimeOriginal of IFD0 takes the Exif IFD's SubSecTimeOriginal/OffsetTime...).
SOURCES = (
    ("exif", DTO, SUBSEC_O, OFFSET_O),
    ("ifd0", DTO, SUBSEC_O, OFFSET_O),
    ("exif", DTD, SUBSEC_D, OFFSET_D),
    ("ifd0", DATETIME, SUBSEC_0, OFFSET_0),
)
MAX_FRACTION = 9  # nanoseconds: "beyond that it is noise"
# +-14:00 both ways, as the code takes it (its comment names -12:00..+14:00 as the offsets in
# use; a camera writing -13:00 is believed).
MAX_OFFSET_MIN = 14 * 60
MIN_YEAR = 1800  # "before photography: a placeholder"
MAX_TEXT = 128
ASCII_DIGITS = frozenset("0123456789")


# ---------------------------------------------------------------------------------------------
# the reference


def digits(text: str) -> bool:
    # ISO 8601 and EXIF spell numbers in ASCII ("١٢" is no fraction: test_..._ascii_digits).
    return bool(text) and set(text) <= ASCII_DIGITS


def leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in(year: int, month: int) -> int:
    if month == 2:
        return 29 if leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


@dataclass(frozen=True)
class Parsed:
    """A date-time string read by hand: wall clock, fraction digits, inline offset text."""

    fields: tuple[int, int, int, int, int, int]
    fraction: str
    offset: str | None


def parse_datetime(text: str) -> Parsed | None:
    """ "YYYY:MM:DD HH:MM:SS", date separators any of ':-/.', time ones ':.', spaces or 'T'
    between, then optionally a fraction ('.' or ',') and an offset; NULs and surrounding
    whitespace ignored; fixed widths; a real calendar date of year 1800 or later."""
    t = text.replace("\x00", " ").strip()
    date, rest = t[:10], t[10:]
    if len(date) < 10 or date[4] not in ":-/." or date[7] not in ":-/.":
        return None
    if not (digits(date[:4]) and digits(date[5:7]) and digits(date[8:10])):
        return None
    if rest[:1] == "T":
        rest = rest[1:]
    else:  # one space or more (the code's " +"; its comment says " ")
        spaces = len(rest) - len(rest.lstrip(" "))
        if spaces == 0:
            return None
        rest = rest[spaces:]
    clock, rest = rest[:8], rest[8:]
    if len(clock) < 8 or clock[2] not in ":." or clock[5] not in ":.":
        return None
    if not (digits(clock[:2]) and digits(clock[3:5]) and digits(clock[6:8])):
        return None
    fraction = ""
    if rest[:1] in (".", ","):
        n = 0
        while n + 1 < len(rest) and rest[n + 1] in ASCII_DIGITS:
            n += 1
        if n == 0:
            return None
        fraction, rest = rest[1 : n + 1], rest[n + 1 :]
    rest = rest.lstrip()
    offset = None
    if rest:
        if not (rest == "Z" or offset_shape(rest)):
            return None
        offset = rest
    y, mo, d = int(date[:4]), int(date[5:7]), int(date[8:10])
    h, mi, s = int(clock[:2]), int(clock[3:5]), int(clock[6:8])
    if y < MIN_YEAR or not 1 <= mo <= 12 or not 1 <= d <= days_in(y, mo):
        return None
    if h > 23 or mi > 59 or s > 59:
        return None
    return Parsed((y, mo, d, h, mi, s), fraction, offset)


def offset_shape(text: str) -> bool:
    """'+HH:MM' or '+HHMM' (either sign), whatever the numbers."""
    body = text[1:].replace(":", "", 1) if text[3:4] == ":" else text[1:]
    return text[:1] in ("+", "-") and len(body) == 4 and digits(body)


def parse_offset(text: str) -> int | None:
    """Minutes east of UTC of "+02:00", "+0200" or "Z"; None beyond +-14:00 or minutes >= 60."""
    t = text.replace("\x00", " ").strip()
    if t == "Z":
        return 0
    if not offset_shape(t):
        return None
    body = t[1:].replace(":", "")
    hours, minutes = int(body[:2]), int(body[2:])
    if minutes >= 60 or 60 * hours + minutes > MAX_OFFSET_MIN:
        return None
    return -(60 * hours + minutes) if t[0] == "-" else 60 * hours + minutes


def parse_subseconds(text: str) -> str | None:
    t = text.replace("\x00", " ").strip()
    return t if digits(t) else None


def compose(p: Parsed, fraction: str, offset: int | None) -> tuple[str, float, str]:
    y, mo, d, h, mi, s = p.fields
    fraction = fraction[:MAX_FRACTION]
    iso = f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}"
    ts = float(calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)))
    if fraction:
        iso += "." + fraction
        ts += int(fraction) / 10 ** len(fraction)
    if offset is None:
        return iso, ts, "exif"
    sign = "-" if offset < 0 else "+"
    iso += f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    return iso, ts - 60.0 * offset, "exif_offset"


def exif_time(dt: str, sub: str | None, off: str | None) -> tuple[str, float, str] | None:
    p = parse_datetime(dt)
    if p is None:
        return None
    fraction = p.fraction
    offset = parse_offset(p.offset) if p.offset else None
    if sub is not None and (s := parse_subseconds(sub)) is not None:
        fraction = s
    if off is not None and (o := parse_offset(off)) is not None:
        offset = o
    return compose(p, fraction, offset)


def mtime_time(mtime: float | None) -> tuple[str | None, float | None, str]:
    if mtime is None or not math.isfinite(mtime):
        return None, None, "none"
    try:
        return datetime.fromtimestamp(mtime, UTC).isoformat(), float(mtime), "mtime"
    except (OverflowError, OSError, ValueError):  # beyond year 9999
        return None, None, "none"


def text_of(raw: bytes | None) -> str | None:
    """Make/Model/serial: unprintable characters dropped, then whitespace collapsed (in
    ``_text``'s order: a tab or newline joins the words around it), 128 characters at most;
    past 512 bytes it is garbage ("longer ... strings are garbage, not names")."""
    if raw is None:
        return None
    s = raw[: MAX_TEXT * 4].decode("utf-8", "replace")
    s = " ".join("".join(c for c in s if c.isprintable()).split())[:MAX_TEXT]
    return s or None


def serial_of(raw: bytes | None) -> str | None:
    s = text_of(raw)
    return None if s is None or set(s) == {"0"} else s


def camera_key(make: str | None, model: str | None, serial: str | None) -> str:
    """The ``Capture.camera`` docstring: "Make Model #serial", make left out when the model
    starts with its first word, an all-digit serial without leading zeros, never empty."""
    words_make, words_model = (make or "").casefold().split(), (model or "").casefold().split()
    if words_make and words_model[:1] == words_make[:1]:
        make = None  # "NIKON CORPORATION" + "NIKON D850": "NIKON D850"
    name = f"{make or ''} {model or ''}".strip() or "unknown"
    if serial and serial.isascii() and serial.isdigit():
        serial = serial.lstrip("0")
    return f"{name} #{serial}" if serial else name


def sequence_of(printed: str | None) -> int | None:
    """The first number exiv2 prints, unless garbled or 65535 ("not applicable") and up."""
    if printed is None or not printed.split():
        return None
    first = printed.split()[0]
    return int(first) if digits(first) and int(first) < 0xFFFF else None


@dataclass(frozen=True)
class Expected:
    time: str | None
    timestamp: float | None
    time_source: str
    make: str | None
    model: str | None
    serial: str | None
    camera: str
    sequence: int | None


# ---------------------------------------------------------------------------------------------
# metadata and TIFF streams


@dataclass
class Entry:
    tag: int
    kind: int
    count: int
    payload: bytes  # the value's bytes (count * size of kind, save for hostile entries)
    printed: str | None = None  # what exiv2 prints of it (None: not a value the reference reads)


@dataclass
class Meta:
    ifd0: list[Entry] = field(default_factory=list)
    exif: list[Entry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def first(self, ifd: str, tag: int) -> Entry | None:
        return next((e for e in getattr(self, ifd) if e.tag == tag), None)

    def printed(self, ifd: str, tag: int) -> str | None:
        e = self.first(ifd, tag)
        return None if e is None else e.printed

    def describe(self) -> str:
        def show(entries: list[Entry]) -> str:
            return ", ".join(f"{e.tag:#06x}/{e.kind}:{e.payload[:60]!r}" for e in entries)

        return f"ifd0=[{show(self.ifd0)}] exif=[{show(self.exif)}] {' '.join(self.notes)}"


def reference(meta: Meta, mtime: float | None) -> Expected:
    when = None
    for ifd, dt, sub, off in SOURCES:
        raw = meta.printed(ifd, dt)
        if raw is not None:
            when = exif_time(raw, meta.printed("exif", sub), meta.printed("exif", off))
            if when is not None:
                break
    time_, ts, source = when if when is not None else mtime_time(mtime)
    make = text_of(raw_of(meta.printed("ifd0", MAKE)))
    model = text_of(raw_of(meta.printed("ifd0", MODEL)))
    serials = [meta.printed("ifd0", CAMERA_SERIAL), meta.printed("exif", BODY_SERIAL)]
    serial = next(filter(None, (serial_of(raw_of(s)) for s in serials)), None)
    seqs = [meta.printed("ifd0", IMAGE_NUMBER), meta.printed("exif", IMAGE_NUMBER)]
    sequence = next((q for q in map(sequence_of, seqs) if q is not None), None)
    return Expected(
        time_, ts, source, make, model, serial, camera_key(make, model, serial), sequence
    )


def raw_of(printed: str | None) -> bytes | None:
    return None if printed is None else printed.encode("utf-8", "surrogateescape")


def ascii_entry(tag: int, value: bytes, rng: random.Random) -> Entry:
    """An ASCII entry whose count covers ``value`` and one of the paddings writers use."""
    pad = rng.choice([b"\x00"] * 5 + [b"", b"\x00\x00\x00\x00", b"\x00junk\x00", b"\x00\xff\x01"])
    payload = value + pad
    if not payload:
        payload = b"\x00"
    # exiv2 prints an ASCII value up to its first NUL.
    printed = payload.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
    return Entry(tag, ASCII, len(payload), payload, printed)


def number_entry(tag: int, kind: int, values: list[int], order: str) -> Entry:
    fmt = {SHORT: "H", LONG: "I", SLONG: "i"}[kind]
    payload = struct.pack(order + fmt * len(values), *values)
    return Entry(tag, kind, len(values), payload, " ".join(map(str, values)))


@dataclass
class Layout:
    order: str  # "<" or ">"
    magic: int = 42
    shuffle: bool = False  # directories and values in a random order, with gaps
    unsorted: bool = False  # entries not in tag order
    pixels: int = 0  # a block of this many bytes among them, named by StripOffsets


def tiff_stream(
    ifd0: list[Entry], exif: list[Entry] | None, lay: Layout, rng: random.Random
) -> bytes:
    """A TIFF stream: header, IFD0 (with an Exif IFD pointer when ``exif`` is not None), the
    Exif IFD and every value longer than 4 bytes, placed as ``lay`` says."""
    o = lay.order
    ifd0 = list(ifd0)
    extra = []
    if lay.pixels:
        extra += [Entry(STRIP_OFFSETS, LONG, 1, b"\0" * 4), Entry(STRIP_COUNTS, LONG, 1, b"\0" * 4)]
    if exif is not None:
        extra.append(Entry(EXIF_IFD, LONG, 1, b"\0" * 4))
    for e in extra:
        ifd0.insert(rng.randrange(len(ifd0) + 1) if lay.unsorted else len(ifd0), e)
    if not lay.unsorted:
        ifd0.sort(key=lambda e: e.tag)  # stable: a repeated tag keeps its first first
    dirs = {"ifd0": ifd0, "exif": list(exif or [])}
    blocks: list[tuple[str, int]] = [("ifd0", 2 + 12 * len(ifd0) + 4)]
    if exif is not None:
        blocks.append(("exif", 2 + 12 * len(exif) + 4))
    for name, entries in dirs.items():
        blocks += [
            (f"{name}.{i}", len(e.payload)) for i, e in enumerate(entries) if len(e.payload) > 4
        ]
    if lay.pixels:
        blocks.append(("pixels", lay.pixels))
    if lay.shuffle:
        rng.shuffle(blocks)
    at, where = 8, {}
    for name, size in blocks:
        at += 2 * rng.randrange(4) if lay.shuffle else 0
        where[name] = at
        at += size + (size & 1)
    out = bytearray(at)
    bom = b"II" if o == "<" else b"MM"
    out[:8] = bom + struct.pack(o + "HI", lay.magic, where["ifd0"])
    for name, entries in dirs.items():
        if name == "exif" and exif is None:
            continue
        base = where[name]
        out[base : base + 2] = struct.pack(o + "H", len(entries))
        for i, e in enumerate(entries):
            payload = e.payload
            if e.tag == EXIF_IFD and name == "ifd0":
                payload = struct.pack(o + "I", where["exif"])
            elif e.tag == STRIP_OFFSETS and lay.pixels:
                payload = struct.pack(o + "I", where["pixels"])
            elif e.tag == STRIP_COUNTS and lay.pixels:
                payload = struct.pack(o + "I", lay.pixels)
            if len(payload) > 4:
                value = struct.pack(o + "I", where[f"{name}.{i}"])
                out[where[f"{name}.{i}"] : where[f"{name}.{i}"] + len(payload)] = payload
            else:
                value = payload.ljust(4, b"\0")
            out[base + 2 + 12 * i : base + 14 + 12 * i] = (
                struct.pack(o + "HHI", e.tag, e.kind, e.count) + value
            )
        out[base + 2 + 12 * len(entries) : base + 6 + 12 * len(entries)] = b"\0\0\0\0"
    if lay.pixels:
        p = where["pixels"]
        out[p : p + lay.pixels] = rng.randbytes(lay.pixels)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# random values

YEARS = [1800, 1899, 1900, 1970, 1999, 2000, 2004, 2023, 2024, 2037, 2038, 2100, 2400, 9999]
BAD_DATES = [
    "0000:00:00 00:00:00",
    "    :  :     :  :  ",
    "",
    " ",
    "1600:01:01 00:00:00",
    "0001:01:01 00:00:00",
    "1799:12:31 23:59:59",
    "24:05:01 10:00:00",
    "2024:5:1 10:00:00",
    "2024:05:01",
    "10:00:00",
    "2024:05:01 10:00",
    "2024_05_01 10:00:00",
    "2024:05:01:10:00:00",
    "yesterday",
    "2024:05:01 10:00:00 PM",
    "2024:05:01 10:00:00.",
    "2024:05:01 10:00:00+2:00",
]
INLINE_OFFSETS = [
    "Z",
    "+02:00",
    "+0200",
    " +05:30",
    "-14:00",
    "+14:00",
    "+15:00",
    "+05:75",
    "-00:00",
]
SUBSECONDS = ["5", "050", "123456789", "1234567890123", " 12", "12 ", "0", "00", "007"]
BAD_SUBSECONDS = ["", "   ", "1 2", "ab", "-5", "1.5", "\t7x", "5\x7f", "+1"]
OFFSETS = ["+05:30", "-00:00", "+00:00", "Z", "+14:00", "-14:00", "-12:00", "+0530", "+09:45"]
BAD_OFFSETS = [
    "+15:00",
    "+14:01",
    "   :  ",
    "",
    "02:00",
    "+5:30",
    "+05:75",
    "UTC+2",
    "z",
    "+02:00:00",
]
NAMES = [
    "Canon",
    "Canon EOS R5",
    "NIKON CORPORATION",
    "NIKON D850",
    "SONY",
    "ILCE-7M4",
    "Apple",
    "iPhone 15 Pro",
    "FUJIFILM",
    "X-T4",
    "Leica Camera AG",
    "LEICA Q2",
    "OLYMPUS",
    "é",
    "日本",
    "#1",
]
SERIALS = ["0", "000000", "0042", "12345", "AB 12", "3001234", "FFDT2231", "007"]
GLUE = [" ", " ", "  ", "\t", "\n", "\x01", "\x7f", "\u200b", "\u00a0", "-"]


def draw_datetime(rng: random.Random, *, iso: bool = False) -> str:
    """A date-time as a camera (or software after it) writes it, valid or not."""
    if rng.random() < 0.12:
        return rng.choice(BAD_DATES)
    y = rng.choice(YEARS) if rng.random() < 0.5 else rng.randint(MIN_YEAR, 9999)
    mo = rng.randint(1, 12) if rng.random() < 0.97 else rng.choice([0, 13, 99])
    last = days_in(y, mo) if 1 <= mo <= 12 else 31
    if mo == 2 and rng.random() < 0.4:
        d = rng.choice([28, 29, 30])
    elif rng.random() < 0.1:
        d = rng.choice([0, last, last + 1, 31, 32])
    else:
        d = rng.randint(1, last)
    h, mi, s = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    if rng.random() < 0.05:
        h, mi, s = rng.choice([(24, 0, 0), (23, 60, 0), (23, 59, 60), (99, 0, 0)])
    seps = "-" if iso else ":"
    d1, d2 = (rng.choice(seps * 8 + "-/._") for _ in range(2))
    t1, t2 = (rng.choice(":" * 8 + ".-") for _ in range(2))
    between = rng.choice(["T" if iso else " "] * 8 + [" ", "T", "  ", "t", "\t", "", ":"])
    year = f"{y:04d}" if rng.random() < 0.97 else f"{y % 100:02d}"
    day = f"{d:02d}" if rng.random() < 0.97 else str(d)
    text = f"{year}{d1}{mo:02d}{d2}{day}{between}{h:02d}{t1}{mi:02d}{t2}{s:02d}"
    if rng.random() < 0.15:
        n = rng.choice([1, 2, 3, 6, 9, 12])
        text += rng.choice(".,") + "".join(rng.choice("0123456789") for _ in range(n))
    if rng.random() < 0.12:
        text += rng.choice(INLINE_OFFSETS)
    if rng.random() < 0.1:
        text = rng.choice([" ", "  "]) + text
    if rng.random() < 0.15:
        text += rng.choice([" ", "  ", "   "])
    return text


def draw_text(rng: random.Random, names: list[str]) -> bytes:
    """Make / Model / serial bytes: names glued with odd characters, bad UTF-8, long runs."""
    r = rng.random()
    if r < 0.05:
        return b"X" * rng.choice([127, 128, 129, 300]) + rng.choice([b"", b" tail"])
    if r < 0.08:
        return rng.choice([b"", b" ", b"\x01\x02", b"\xff\xfe", b"\t\n"])
    parts = [rng.choice(names) for _ in range(rng.randint(1, 3))]
    text = "".join(p + rng.choice(GLUE) for p in parts[:-1]) + parts[-1]
    if rng.random() < 0.2:
        text = rng.choice([" ", "  ", "\t"]) + text + rng.choice([" ", "   "])
    raw = text.encode()
    if rng.random() < 0.08:
        raw = raw[: rng.randint(0, len(raw))] + rng.choice([b"\xff", b"\xc3", b"\xe6\x97"])
    if rng.random() < 0.05:
        raw += b"\x00" + rng.choice(names).encode()  # exiv2 stops at the NUL
    return raw


def draw_meta(rng: random.Random, order: str) -> Meta:
    meta = Meta()
    n_sources = rng.choice([0, 1, 1, 2, 2, 3, 4])
    for ifd, dt, sub, off in rng.sample(SOURCES, n_sources):
        getattr(meta, ifd).append(ascii_entry(dt, draw_datetime(rng).encode(), rng))
        for tag, good, bad in ((sub, SUBSECONDS, BAD_SUBSECONDS), (off, OFFSETS, BAD_OFFSETS)):
            if rng.random() < 0.55 and meta.first("exif", tag) is None:
                value = rng.choice(good) if rng.random() < 0.75 else rng.choice(bad)
                meta.exif.append(ascii_entry(tag, value.encode(), rng))
    if rng.random() < 0.15:  # a sub-second or offset without its date-time
        tag = rng.choice([SUBSEC_O, SUBSEC_D, SUBSEC_0, OFFSET_O, OFFSET_D, OFFSET_0])
        if meta.first("exif", tag) is None:
            meta.exif.append(
                ascii_entry(tag, rng.choice(SUBSECONDS[:3] + OFFSETS[:3]).encode(), rng)
            )
    if rng.random() < 0.1:  # a time tag in the other IFD: exiv2 names it by number, no time
        ifd, tag = rng.choice(
            [("exif", DATETIME), ("ifd0", SUBSEC_O), ("ifd0", OFFSET_O), ("ifd0", DTD)]
        )
        entry = ascii_entry(tag, draw_datetime(rng).encode(), rng)
        entry.printed = None
        getattr(meta, ifd).append(entry)
        meta.notes.append(f"misplaced {tag:#06x} in {ifd}")
    for tag, names, p in ((MAKE, NAMES, 0.8), (MODEL, NAMES, 0.8)):
        if rng.random() < p:
            meta.ifd0.append(ascii_entry(tag, draw_text(rng, names), rng))
    if rng.random() < 0.4:
        meta.exif.append(ascii_entry(BODY_SERIAL, draw_text(rng, SERIALS), rng))
    if rng.random() < 0.15:
        meta.ifd0.append(ascii_entry(CAMERA_SERIAL, draw_text(rng, SERIALS), rng))
    for ifd, p in (("ifd0", 0.25), ("exif", 0.15)):
        if rng.random() < p:
            getattr(meta, ifd).append(draw_number(rng, order))
    if rng.random() < 0.08:  # a repeated tag: exiv2 lists both, the first is read
        ifd = rng.choice(["ifd0", "exif"])
        entries = getattr(meta, ifd)
        if entries:
            twin = rng.choice(entries)
            value = draw_datetime(rng) if twin.tag in (DTO, DTD, DATETIME) else "twin"
            entries.append(ascii_entry(twin.tag, value.encode(), rng))
            meta.notes.append(f"repeated {twin.tag:#06x} in {ifd}")
    return meta


def draw_number(rng: random.Random, order: str) -> Entry:
    """An ImageNumber, as a LONG, SHORT, SLONG or text."""
    kind = rng.choice([LONG, LONG, SHORT, SLONG, ASCII])
    if kind == ASCII:
        text = rng.choice(
            ["7", "007", "12 ", "x1", "65535", "65534", "99999", " 3", "3 4", "1" * 30]
        )
        return ascii_entry(IMAGE_NUMBER, text.encode(), rng)
    top = {SHORT: 0xFFFF, LONG: 0xFFFFFFFF, SLONG: 0x7FFFFFFF}[kind]
    values = [
        rng.choice([0, 1, 7, 250, 65534, 65535, 70000, top, rng.randint(0, top)])
        for _ in range(rng.choice([1, 1, 2]))
    ]
    values = [min(v, top) for v in values]
    if kind == SLONG and rng.random() < 0.5:
        values[0] = -values[0] - 1
    return number_entry(IMAGE_NUMBER, kind, values, order)


def order_entries(meta: Meta, rng: random.Random, unsorted: bool) -> None:
    """Entries in tag order (stable: a repeated tag keeps its first first), or shuffled."""
    for entries in (meta.ifd0, meta.exif):
        if unsorted:
            rng.shuffle(entries)
        else:
            entries.sort(key=lambda e: e.tag)


# ---------------------------------------------------------------------------------------------
# containers

CANON_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")  # exiv2's CR3 "cano" uuid box
XMP = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"


@cache
def tiny(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buf, fmt)
    return buf.getvalue()


def segment(marker: int, payload: bytes) -> bytes:
    assert len(payload) <= 0xFFFD
    return bytes((0xFF, marker)) + struct.pack(">H", 2 + len(payload)) + payload


def jpeg_file(stream: bytes, rng: random.Random, decoy: bytes) -> bytes:
    """PIL's JPEG with the EXIF APP1 among its segments before the scan, beside others."""
    data = tiny("JPEG")
    pre, at = [], 2
    while data[at + 1] != 0xDA:
        (n,) = struct.unpack_from(">H", data, at + 2)
        pre.append(data[at : at + 2 + n])
        at += 2 + n
    icc = segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + rng.randbytes(rng.randint(0, 300)))
    xmp = segment(0xE1, XMP)
    # A comment holding what looks like an EXIF APP1: skipped by its length, never read.
    com = segment(0xFE, segment(0xE1, b"Exif\x00\x00" + decoy)[: rng.randint(10, 40)])
    extras = [s for s in (icc, xmp, com) if rng.random() < 0.4]
    exif = segment(0xE1, b"Exif\x00\x00" + stream)
    before = [*extras, exif]
    rng.shuffle(before)
    before = before[: before.index(exif) + 1]  # what follows the EXIF goes after it
    after = [s for s in extras if s not in before]
    if rng.random() < 0.2:  # a second EXIF segment: the first one is the file's
        after.append(segment(0xE1, b"Exif\x00\x00" + decoy))
    cut = rng.randint(0, len(pre))
    segs = pre[:cut] + before + pre[cut:] + after
    out = bytearray(b"\xff\xd8")
    for s in segs:
        r = rng.random()
        if r < 0.08:  # junk between segments, which PIL and libjpeg skip
            out += bytes(rng.randrange(255) for _ in range(rng.randint(1, 5)))
        elif r < 0.15:
            out += b"\xff" * rng.randint(1, 4)  # fill bytes before a marker
        elif r < 0.18:
            out += b"\xff\x01"  # TEM: a marker without a length
        out += s
    return bytes(out + data[at:])


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_file(stream: bytes, rng: random.Random) -> bytes:
    data, at, chunks = tiny("PNG"), 8, []
    while at < len(data):
        (n,) = struct.unpack_from(">I", data, at)
        chunks.append(data[at : at + 12 + n])
        at += 12 + n
    ihdr, rest, iend = chunks[0], chunks[1:-1], chunks[-1]
    payload = (b"Exif\x00\x00" if rng.random() < 0.3 else b"") + stream
    extras = [
        png_chunk(b"tEXt", b"Comment\x00eXIf " + rng.randbytes(rng.randint(0, 9)).hex().encode())
    ]
    extras += [png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + XMP[29:])]
    body = [*rest, *(e for e in extras if rng.random() < 0.5)]
    body.insert(rng.randint(0, len(body)), png_chunk(b"eXIf", payload))  # after IDAT too
    return data[:8] + ihdr + b"".join(body) + iend


def riff_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)


def webp_file(stream: bytes, rng: random.Random) -> bytes:
    vp8 = tiny("WEBP")[12:]
    payload = (b"Exif\x00\x00" if rng.random() < 0.3 else b"") + stream
    vp8x = riff_chunk(b"VP8X", struct.pack("<I", 0x2C) + (7).to_bytes(3, "little") * 2)
    odd = [
        riff_chunk(b"ICCP", rng.randbytes(rng.choice([1, 3, 57]))),
        riff_chunk(b"XMP ", XMP[29:] + b"!"),
    ]
    chunks = [vp8, riff_chunk(b"EXIF", payload), *(c for c in odd if rng.random() < 0.5)]
    rng.shuffle(chunks)
    body = b"WEBP" + vp8x + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def bmff_box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def cr3_file(meta: Meta, order: str, rng: random.Random) -> bytes:
    """A CR3 as exiv2 reads one: moov > uuid(Canon) > CMT1 (IFD0), CMT2 (the Exif IFD)."""
    lay = Layout(order)
    cmt = bmff_box(b"CMT1", tiff_stream(meta.ifd0, None, lay, rng))
    cmt += bmff_box(b"CMT2", tiff_stream(meta.exif, None, lay, rng))
    ftyp = bmff_box(b"ftyp", b"crx " + struct.pack(">I", 1) + b"crx isom")
    return (
        ftyp
        + bmff_box(b"moov", bmff_box(b"uuid", CANON_UUID + cmt))
        + bmff_box(b"mdat", bytes(4096))
    )


def raf_file(stream: bytes, rng: random.Random, decoy: bytes) -> bytes:
    """A RAF: bytes 84..91 of its header locate the embedded JPEG, whose EXIF it is."""
    jpeg = jpeg_file(stream, rng, decoy)
    head = b"FUJIFILMCCD-RAW 0201FF383501" + b"X-T4".ljust(32, b"\x00") + b"0100" + bytes(20)
    head += struct.pack(">II", 160, len(jpeg))
    return head.ljust(160, b"\x00") + jpeg + bytes(4096)


def heic_file(stream: bytes, rng: random.Random) -> bytes:
    import pillow_heif

    buf = io.BytesIO()
    exif = (b"Exif\x00\x00" if rng.random() < 0.5 else b"") + stream
    pillow_heif.encode("RGB", (16, 16), bytes(16 * 16 * 3), buf, quality=10, exif=exif)
    return buf.getvalue()


@cache
def decoy_stream(order: str) -> bytes:
    """EXIF that must never be read: a second segment's, a comment's."""
    rng = random.Random(0)
    ifd0 = [ascii_entry(MAKE, b"Decoy", rng), ascii_entry(DATETIME, b"1999:09:09 09:09:09", rng)]
    return tiff_stream(ifd0, [ascii_entry(DTO, b"1999:09:09 09:09:09", rng)], Layout(order), rng)


def containers(meta: Meta, lay: Layout, rng: random.Random, *, heif: bool) -> dict[str, bytes]:
    """The same metadata in every format read_capture reads."""
    stream = tiff_stream(
        meta.ifd0, meta.exif, Layout(lay.order, 42, lay.shuffle, lay.unsorted), rng
    )
    decoy = decoy_stream(lay.order)
    pixels = rng.choice([0, 0, 70_000, 140_000])
    files = {
        "jpeg": jpeg_file(stream, rng, decoy),
        "png": png_file(stream, rng),
        "webp": webp_file(stream, rng),
        "tiff": tiff_stream(
            meta.ifd0, meta.exif, Layout(lay.order, 42, True, lay.unsorted, pixels), rng
        ),
        "cr3": cr3_file(meta, lay.order, rng),
        "raf": raf_file(stream, rng, decoy),
    }
    if lay.order == "<":
        files["orf"] = tiff_stream(
            meta.ifd0, meta.exif, Layout("<", 0x4F52, lay.shuffle, lay.unsorted), rng
        )
    if heif:
        files["heic"] = heic_file(stream, rng)
        if features.check("avif"):
            buf = io.BytesIO()
            exif = (b"Exif\x00\x00" if rng.random() < 0.5 else b"") + stream
            Image.new("RGB", (16, 16)).save(buf, "AVIF", exif=exif, quality=10)
            files["avif"] = buf.getvalue()
    return files


# ---------------------------------------------------------------------------------------------
# checks


class Mtime:
    """A modification time read only when needed: on S3 it costs a HEAD request."""

    def __init__(self, value: float | None) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> float | None:
        self.calls += 1
        return self.value


MTIMES: list[float | int | None] = [
    None,
    1_000_000_000.25,
    1_714_557_600,
    0,
    -1_000_000_000.5,
    -5_364_662_400.0,  # 1800-01-01
    253_402_300_799.0,  # 9999-12-31T23:59:59
    253_402_300_800.0,  # 10000-01-01: beyond datetime
    math.nan,
    math.inf,
    1e20,
]


def same(c: Capture, want: Expected, what: str) -> None:
    got = (c.time, c.time_source, c.make, c.model, c.serial, c.camera, c.sequence, c.burst_id)
    exp = (
        want.time,
        want.time_source,
        want.make,
        want.model,
        want.serial,
        want.camera,
        want.sequence,
        None,
    )
    assert got == exp, f"{what}\n  got  {got}\n  want {exp}"
    if want.timestamp is None:
        assert c.timestamp is None, what
    else:
        assert c.timestamp == pytest.approx(want.timestamp, rel=1e-15, abs=1e-6), what


def check_row(c: Capture, what: str) -> None:
    row = capture_row(c)
    assert list(row) == list(CAPTURE_COLUMNS), what
    table = pa.Table.from_pylist([row], schema=pa.schema(CAPTURE_COLUMNS))
    assert table.to_pylist() == [row], what
    assert c.time_source in TIME_SOURCES, what


def iso_consistent(c: Capture, what: str) -> None:
    """A time is ASCII ISO 8601 and its timestamp is what that very string says."""
    if c.time is None:
        assert (c.timestamp, c.time_source) == (None, "none"), what
        return
    assert c.time.isascii(), f"{c.time!r} is not ASCII ISO 8601\n{what}"
    p = parse_datetime(c.time)
    assert p is not None, f"{c.time!r}\n{what}"
    assert c.time[4] == c.time[7] == "-", f"{c.time!r}\n{what}"
    assert c.time[10] == "T", f"{c.time!r}\n{what}"
    offset = parse_offset(p.offset) if p.offset else None
    assert (p.offset is None) == (offset is None), f"{c.time!r}\n{what}"
    iso, ts, source = compose(p, p.fraction, offset)
    if c.time_source == "mtime":  # datetime.isoformat: always an offset, microseconds or none
        assert offset == 0, f"{c.time!r}\n{what}"
        assert len(p.fraction) in (0, 6), f"{c.time!r}\n{what}"
    else:
        assert (iso, c.time_source) == (c.time, source), f"{c.time!r} {c.time_source}\n{what}"
    assert c.timestamp == pytest.approx(ts, rel=1e-15, abs=1e-6), what


# ---------------------------------------------------------------------------------------------
# the properties


def draw_case(seed: int) -> tuple[Meta, Layout, random.Random]:
    rng = random.Random(seed)
    lay = Layout(rng.choice("<>"), shuffle=rng.random() < 0.4, unsorted=rng.random() < 0.15)
    meta = draw_meta(rng, lay.order)
    order_entries(meta, rng, lay.unsorted)
    return meta, lay, rng


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_container_gives_the_reference_capture(seed: int) -> None:
    meta, lay, rng = draw_case(seed)
    mtime = rng.choice(MTIMES)
    want = reference(meta, mtime)
    what = f"seed {seed} order {lay.order!r} {lay} {meta.describe()} mtime={mtime}"
    for fmt, data in containers(meta, lay, rng, heif=seed % HEIF_EVERY == 0).items():
        ask = Mtime(mtime)
        c = read_capture(data, mtime=ask, source=f"{fmt}:{seed}")
        same(c, want, f"{fmt}: {what}")
        # The modification time is asked for once, and only when EXIF has no valid time.
        assert ask.calls == (want.time_source in ("mtime", "none")), f"{fmt}: {what}"
        check_row(c, what)
        iso_consistent(c, what)
        if c.time is not None and c.time_source != "mtime":
            # A key over 128 characters is cut (test_a_given_camera_key_is_never_cut).
            key = c.camera if len(c.camera) <= MAX_TEXT else None
            g = given_capture(c.time, camera=key)
            assert (g.time, g.time_source, g.model) == (c.time, "given", key), what
            assert g.timestamp == pytest.approx(c.timestamp, rel=1e-15, abs=1e-6), what
    # A plain number for mtime reads as a callable returning it; any bytes-like object as bytes.
    jpeg = containers(meta, lay, rng, heif=False)["jpeg"]
    for view in (bytearray(jpeg), memoryview(jpeg)):
        same(read_capture(view, mtime=mtime), want, f"{type(view).__name__}: {what}")


def directories(stream: bytes, order: str) -> list[int]:
    """Offsets of IFD0 and (where its pointer is in IFD0) the Exif IFD of a stream built here."""
    (ifd0,) = struct.unpack_from(order + "I", stream, 4)
    (n,) = struct.unpack_from(order + "H", stream, ifd0)
    for i in range(n):
        tag, _, _, value = struct.unpack_from(order + "HHII", stream, ifd0 + 2 + 12 * i)
        if tag == EXIF_IFD:
            return [ifd0, value]
    return [ifd0]


def damage(stream: bytes, order: str, rng: random.Random) -> tuple[bytes, str]:
    """One hostile change to a TIFF stream: loops, pointers and counts out of range, cuts."""
    data = bytearray(stream)
    try:
        dirs = directories(stream, order)
        at = rng.choice(dirs)
        (n,) = struct.unpack_from(order + "H", data, at)
        struct.unpack_from(order + "I", data, at + 2 + 12 * n)
    except struct.error:  # damaged already past following: bytes, then
        dirs, at, n = [], 0, 0
    entry = at + 2 + 12 * rng.randrange(n) if n else None
    size = len(data)
    kind = rng.choice(["pointer", "next", "count", "type", "offset", "entries", "chain"])
    if not dirs or rng.random() < 0.25:
        kind = rng.choice(["cut", "bytes"])
    if kind == "pointer" and entry is not None:  # an IFD pointer to IFD0, itself, or nowhere
        tag = rng.choice([EXIF_IFD, 0x8825, 0xA005, 0x014A])
        target = rng.choice([*dirs, 0xFFFFFFFF, size - 2, size, 1, 7, dirs[-1] + 1])
        struct.pack_into(order + "HHII", data, entry, tag, LONG, 1, target)
    elif kind == "next":  # the next-IFD pointer
        struct.pack_into(
            order + "I", data, at + 2 + 12 * n, rng.choice([*dirs, 0xFFFFFFFF, size - 1])
        )
    elif kind == "count" and entry is not None:
        struct.pack_into(
            order + "I", data, entry + 4, rng.choice([0, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF])
        )
    elif kind == "type" and entry is not None:
        struct.pack_into(order + "H", data, entry + 2, rng.choice([0, 5, 13, 14, 0xFFFF]))
    elif kind == "offset" and entry is not None:
        struct.pack_into(order + "I", data, entry + 8, rng.choice([0, 8, size, 0xFFFFFFF0, *dirs]))
    elif kind == "entries":
        struct.pack_into(order + "H", data, at, rng.choice([0, n + 1, 1025, 0xFFFF]))
    elif kind == "cut":
        del data[rng.randrange(len(data) + 1) :]
    elif kind == "bytes":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "chain":  # an IFD -> thousands of one-entry IFDs, the last back or to none
        k = rng.choice([100, 1000, 3000])
        base = len(data) + (len(data) & 1)
        data += bytes(base - len(data))
        struct.pack_into(order + "I", data, at + 2 + 12 * n, base)
        for i in range(k):
            nxt = base + 18 * (i + 1) if i + 1 < k else rng.choice([0, dirs[0], base])
            data += struct.pack(order + "HHHII", 1, DTO, ASCII, 4, 0x30303030) + struct.pack(
                order + "I", nxt
            )
    return bytes(data), kind


def hostile_container(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The damaged stream in a container, perhaps itself damaged."""
    fmt = rng.choice(["jpeg", "png", "webp", "tiff", "raf", "bare"])
    decoy = decoy_stream("<")
    if fmt == "jpeg" and len(data) <= 0xFFF0:
        out = bytearray(jpeg_file(data, rng, decoy))
        if rng.random() < 0.3:  # a segment length of 0, 1, 2, or past the end
            at = out.index(b"Exif\x00\x00") - 2
            struct.pack_into(">H", out, at, rng.choice([0, 1, 2, 8, 0xFFFF]))
        if rng.random() < 0.1:
            out[2:2] = b"\xff" * 20_000  # fill bytes, each a step of the segment walk
        return bytes(out), fmt
    if fmt == "png":
        out = bytearray(png_file(data, rng))
        if rng.random() < 0.3:
            struct.pack_into(
                ">I", out, out.index(b"eXIf") - 4, rng.choice([0, 0x7FFFFFFF, 0xFFFFFFFF])
            )
        return bytes(out), fmt
    if fmt == "webp":
        out = bytearray(webp_file(data, rng))
        if rng.random() < 0.3:
            struct.pack_into("<I", out, out.index(b"EXIF") + 4, rng.choice([0, 1, 0xFFFFFFFF]))
        return bytes(out), fmt
    if fmt == "raf" and len(data) <= 0xFFF0:
        out = bytearray(raf_file(data, rng, decoy))
        if rng.random() < 0.3:
            struct.pack_into(">II", out, 84, rng.choice([0, 160, 10**9]), rng.choice([0, 2, 10**9]))
        return bytes(out), fmt
    if fmt == "tiff" and rng.random() < 0.2:  # IFD0 at the header, past the end, odd
        out = bytearray(data)
        order = "<" if out[:2] == b"II" else ">"
        if len(out) >= 8:
            struct.pack_into(order + "I", out, 4, rng.choice([0, 4, 7, len(out), 0xFFFFFFFF]))
        return bytes(out), "tiff-header"
    return data, "bare"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(HOSTILE_SEEDS))
def test_hostile_metadata_never_raises_nor_hangs(seed: int) -> None:
    meta, lay, rng = draw_case(10**6 + seed)
    stream = tiff_stream(
        meta.ifd0, meta.exif, Layout(lay.order, 42, lay.shuffle, lay.unsorted), rng
    )
    kinds = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        stream, kind = damage(stream, lay.order, rng) if len(stream) >= 8 else (stream, "short")
        kinds.append(kind)
    data, fmt = hostile_container(stream, rng)
    mtime = rng.choice([None, 1_000_000_000.25])
    what = f"seed {seed} {fmt} damage {kinds} {meta.describe()} mtime={mtime}"
    start = time.process_time()  # CPU time: a blow-up in the parser, not the machine's load
    c = read_capture(data, mtime=mtime)
    took = time.process_time() - start
    assert took < HOSTILE_CALL_S, f"read_capture took {took:.2f} s\n{what}"
    check_row(c, what)
    iso_consistent(c, what)
    if c.time_source in ("mtime", "none"):
        assert (c.time, c.timestamp, c.time_source) == mtime_time(mtime), what
    for text in (c.make, c.model, c.serial):
        assert text is None or (0 < len(text) <= MAX_TEXT and text.isprintable()), what
    assert c.sequence is None or 0 <= c.sequence < 0xFFFF, what


EPOCHS: list[object] = [
    0,
    1,
    -1,
    1_000_000_000.25,
    1_714_557_600,
    2**31,  # 2038
    -5_364_662_400,  # 1800
    253_402_300_799,  # the last second of 9999
    253_402_300_799.999_999,
    253_402_300_800,  # 10000
    -62_135_596_801,  # before year 1
    math.nan,
    math.inf,
    -math.inf,
    1e20,
    10**400,  # beyond any float
    True,
    "1714557600",
    [1],
]


def draw_epoch(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.3:
        return rng.choice(EPOCHS)
    if r < 0.6:
        return rng.randint(-5_364_662_400, 253_402_300_799)
    return round(rng.uniform(-5e9, 2.6e11), rng.choice([0, 3, 6, 9, 12]))


def given_reference(value: object) -> tuple[str | None, float | None, str] | None:
    """(time, timestamp, time_source) of a client's capture time; None where it is refused."""
    if value is None:
        return None, None, "none"
    if isinstance(value, str):
        p = parse_datetime(value)
        if p is None:
            return None
        offset = parse_offset(p.offset) if p.offset else None
        if p.offset and offset is None:
            return None
        iso, ts, _ = compose(p, p.fraction, offset)
        return iso, ts, "given"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and abs(value) > 10**20:
        return None
    if not math.isfinite(value):
        return None
    try:  # epoch seconds, UTC: "a finite epoch within datetime's years (1-9999)"
        return datetime.fromtimestamp(value, UTC).isoformat(), float(value), "given"
    except (OverflowError, OSError, ValueError):
        return None


@pytest.mark.parametrize("seed", range(GIVEN_SEEDS))
def test_given_capture_and_epoch_time_are_the_reference(seed: int) -> None:
    for case in range(GIVEN_CASES):
        check_given(
            random.Random(2 * 10**6 + GIVEN_CASES * seed + case), f"seed {seed} case {case}"
        )


def check_given(rng: random.Random, where: str) -> None:
    r = rng.random()
    value: Any = (  # ill-typed on purpose, sometimes
        draw_epoch(rng) if r < 0.4 else draw_datetime(rng, iso=r < 0.85) if r < 0.97 else None
    )
    camera = rng.choice([None, "A", "  phone  A ", "Canon EOS R5 #42", "x" * MAX_TEXT, "日本 é"])
    what = f"{where}: given_capture({value!r}, camera={camera!r})"
    want = given_reference(value)
    if want is None:
        with pytest.raises(ConfigError, match="capture time") as info:
            given_capture(value, camera)
        assert len(str(info.value)) < 300, what  # a huge number is not spelled out
        return
    c = given_capture(value, camera)
    key = " ".join(camera.split()) if camera is not None else None
    assert (c.time, c.time_source, c.model, c.camera) == (*want[::2], key, key or "unknown"), what
    assert (c.make, c.serial, c.burst_id, c.sequence) == (None, None, None, None), what
    check_row(c, what)
    if want[1] is None:
        assert c.timestamp is None, what
        return
    assert c.timestamp == pytest.approx(want[1], rel=1e-15, abs=1e-6), what
    assert c.time is not None
    if isinstance(value, str):  # as given, then as read back: the same time
        again = given_capture(c.time)
        assert (again.time, again.timestamp) == (c.time, c.timestamp), what
    else:  # epoch_time, which a copied row's file time goes through, agrees
        assert epoch_time(value, "mtime") == (c.time, c.timestamp, "mtime"), what
        if c.time >= "1800":  # read back from its ISO form: the same instant to 1 us
            again = given_capture(c.time)
            assert again.time == c.time, what
            assert again.timestamp == pytest.approx(c.timestamp, rel=1e-15, abs=1e-6), what


@pytest.mark.parametrize("value", ["1714557600", [1], b"1", True, False, object()])
def test_epoch_time_refuses_what_is_no_number(value: Any) -> None:
    with pytest.raises(TypeError, match="epoch seconds"):
        epoch_time(value, "mtime")
    with pytest.raises(TypeError, match="epoch seconds"):
        read_capture(b"", mtime=lambda: value)


# ---------------------------------------------------------------------------------------------
# what the random cases found, each fixed since


def text(tag: int, value: str | bytes, kind: int = ASCII) -> Entry:
    raw = (value.encode() if isinstance(value, str) else value) + b"\x00"
    return Entry(tag, kind, len(raw), raw)


def jpeg_of(ifd0: list[Entry], exif: list[Entry]) -> bytes:
    rng = random.Random(0)
    return jpeg_file(tiff_stream(ifd0, exif, Layout("<"), rng), rng, b"")


# Found by the random cases (fixed since): capture._DIGITS/_DATETIME/_OFFSET use \d, which matches
# any Unicode digit: a SubSecTimeOriginal of '١٢' is kept, and Capture.time is not ISO 8601
def test_a_capture_time_is_spelled_in_ascii_digits() -> None:
    exif = [text(DTO, "2024:05:01 10:00:00"), text(SUBSEC_O, "\u0661\u0662")]  # Arabic-Indic 1, 2
    c = read_capture(jpeg_of([text(MAKE, "Canon")], exif))
    # As any sub-seconds that are not digits ("ab", "1 2"): dropped, the time kept.
    assert (c.time, c.timestamp) == ("2024-05-01T10:00:00", 1_714_557_600.0)


# Found by the random cases (fixed since): capture._DATETIME matches any Unicode digit:
# given_capture accepts what is no ISO 8601 date-time instead of raising ConfigError
@pytest.mark.parametrize(
    "value",
    [
        "\uff12\uff10\uff12\uff14-05-01T10:00:00",  # fullwidth
        "2024-05-01T10:00:00.\u0661\u0662",  # Arabic-Indic
        "2024-05-01T10:00:00+\u0660\u0662:00",
    ],
)
def test_given_capture_refuses_digits_beyond_ascii(value: str) -> None:
    try:
        c = given_capture(value)
    except ConfigError:
        return
    raise AssertionError(f"accepted as {c.time!r}")


# Found by the random cases (fixed since): given_capture passes the key through capture._text,
# which cuts it to 128 characters and drops a tab: two keys the HTTP API accepts (1-256
# characters) become one camera, and their shots one burst
@pytest.mark.parametrize(("a", "b"), [("x" * 129, "x" * 130), ("phone\tA", "phoneA")])
def test_a_given_camera_key_is_never_cut(a: str, b: str) -> None:
    ca, cb = given_capture(None, a), given_capture(None, b)
    assert ca.camera != cb.camera
    assert ca.camera == " ".join(a.split())  # "this string with whitespace normalised"


# Found by the random cases (fixed since): exiv2 0.28 has no Exif 3.0 UTF-8 type (129;
# Exiv2/exiv2#2659) and prints such a Make as decimal bytes, which capture reads as the name: '67
# 97 110 111 110 0'
def test_an_exif_3_utf8_make_and_model_are_read_as_recorded() -> None:
    utf8 = 129  # Exif 3.0: Make, Model, BodySerialNumber may be ASCII or UTF-8
    ifd0 = [text(MAKE, "Canon", utf8), text(MODEL, "Canon EOS R5", utf8)]
    c = read_capture(jpeg_of(ifd0, [text(DTO, "2024:05:01 10:00:00")]))
    assert (c.make, c.model, c.camera) == ("Canon", "Canon EOS R5", "Canon EOS R5")


# Found by the random cases (fixed since): read_capture looks at mtime only when EXIF has no time,
# so a modification time that is no number raises for some files and passes silently for others
def test_a_modification_time_that_is_no_number_is_refused_whatever_the_file() -> None:
    bad: Any = "yesterday"
    with pytest.raises(TypeError, match="epoch seconds"):
        read_capture(jpeg_of([], [text(DTO, "2024:05:01 10:00:00")]), mtime=bad)
