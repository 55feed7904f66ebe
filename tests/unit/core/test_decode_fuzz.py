"""Seeded random mutations ("fuzz") of the untrusted files keeper_core reads: images, their
metadata, XMP sidecars and WebDataset shards.

The standard checked: bad input gets a clear, specific error and loses nothing; size and pixel
limits hold on every input. Every function handed a user's bytes succeeds or raises keeper's
typed error (``ImageDecodeError`` with a reason in ``DECODE_REASONS``, ``DataError``,
``StorageError``) with a message: never a raw PIL / struct / Index / Unicode / Recursion /
Memory error, never a hang (each call under ``CALL_S``), never a decode past the pixel limit
(the process's peak RSS is watched around each call).

Seeds, built in code: JPEG (EXIF with Make, Model, Orientation, DateTimeOriginal, SubSec,
OffsetTime, ImageNumber, a serial; a Display P3 profile; XMP), progressive (EXIF marked Adobe
RGB), CMYK, greyscale with restarts; PNG (RGBA with eXIf and iTXt XMP, 16-bit, palette); an
animated GIF; WebP (lossy with EXIF and XMP, animated lossless); TIFF (two pages with XMP,
16-bit); BMP; HEIC; a DNG; AVIF where Pillow has its codec. Mutations (``MUTATORS``):
bytes or bits set, cuts, runs inserted or deleted, a segment / chunk / box / IFD entry or a
JPEG's last scan repeated, length fields set to 0 / 1 / their maximum, another format's header,
two files spliced, headers claiming huge or tiny sizes, EXIF damage (IFD loops, offsets and
counts out of range, odd dates, offsets, sub-seconds), hostile XMP (``evil_packets``: entities,
external entities, invalid UTF-8, UTF-16, deep nesting, odd ratings). PNG CRCs and tar
checksums are fixed in half the cases, so that the damage reaches what is behind them.

Checked of a success: ``decode_image_alpha`` gives RGB uint8 within ``LIMITS`` of the size
``image_size`` reads, ``ImagePreparation`` the same verdict and finite features, and for JPEGs
``TurboDecoder`` PIL's verdict and pixels (test_decoders flips bytes of plain JPEGs; here every
mutation), a draft and ``decode_jpeg_band`` their contract; ``read_capture`` and ``file_ids``
never raise, a capture time is ISO in years 1800..9999; ``write_jpeg_xmp`` (``keeper pick --xmp
embed``) writes with the decode unchanged or refuses with the file as it was; sidecars parse,
read, merge and write alike or are refused untouched, no entity expanded or fetched;
``index_shard`` lists only members inside the file, each readable, its JSON round trip exact.

Environment: ``KEEPER_FUZZ``, cases per seed (default 6: ~13 s on a 2-core machine, 8 s of it
the bug reproductions; 60: ~17 s; 300: ~35 s; the first cases of a seed take the mutation kinds
in turn, later ones one to three at random); ``KEEPER_FUZZ_SEED``, the base seed (default 0: a
case is a function of it, the seed's name and its number); ``KEEPER_FUZZ_REPLAY=SEED:NUMBER``
runs that case alone (a failure prints the line). The bugs it found are kept at the end as
minimal reproductions, each failing before its fix.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import re
import resource
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, features
from support import photo, tar_bytes, xmp_packet

from keeper_core import handback
from keeper_core.capture import TIME_SOURCES, read_capture
from keeper_core.color import DISPLAY_P3, rgb_profile
from keeper_core.decoders import TurboDecoder, simplejpeg
from keeper_core.embedded_xmp import file_ids, jpeg_header, read_embedded_xmp
from keeper_core.errors import DECODE_REASONS, DataError, ImageDecodeError, StorageError
from keeper_core.formats import raw_format
from keeper_core.handback import KeeperXmp, merge_packet, parse_xmp_packet, read_sidecar
from keeper_core.images import DecodeLimits, decode_jpeg_band, image_size
from keeper_core.images import decode_image_alpha as decode
from keeper_core.jpeg_xmp import write_jpeg_xmp
from keeper_core.models import PreprocessConfig
from keeper_core.preparation import ImagePreparation
from keeper_core.webdataset import ShardIndex, index_shard, read_member

CASES = int(os.environ.get("KEEPER_FUZZ", "6"))
BASE_SEED = int(os.environ.get("KEEPER_FUZZ_SEED", "0"))
REPLAY = os.environ.get("KEEPER_FUZZ_REPLAY", "")
CALL_S = 30.0  # one call on a file of a few KB takes milliseconds: this catches a hang only
RSS_GROWTH_KB = 512 * 1024  # a decode within LIMITS allocates tens of MB at most
LIMITS = DecodeLimits(
    max_pixels=2_000_000, min_side=8, max_bytes=1 << 20, max_raw_bytes=4 << 20, max_jpeg_scans=64
)
DEC, DATA = (ImageDecodeError,), (DataError,)
URI = "fuzz://case"
SOI, PNG = b"\xff\xd8", b"\x89PNG\r\n\x1a\n"
MARKER = "KEEPER-SECRET-7f3a"  # in the file an external XML entity names: never to be read

# ---------------------------------------------------------------------------- seeds


def enc(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def exif(orientation: int, adobe: bool = False) -> bytes:
    """A camera's EXIF; ``adobe``: marked Adobe RGB as DCF cameras do (no ICC profile)."""
    block = Image.Exif()
    block[0x010F], block[0x0110], block[0x0112] = "Canon", "Canon EOS R5", orientation
    block[0x0132], block[0x9211] = "2024:05:01 09:59:58", 7  # DateTime, ImageNumber
    ifd = block.get_ifd(0x8769)
    ifd[0x9003], ifd[0x9291], ifd[0x9011] = "2024:05:01 10:00:00", "25", "+02:00"
    ifd[0xA431] = "012345"  # BodySerialNumber
    if adobe:  # ColorSpace "uncalibrated", InteroperabilityIndex "R03"
        ifd[0xA001], ifd[0xA005] = 0xFFFF, {0x0001: "R03"}
    return block.tobytes()


def rgba(w: int, h: int) -> Image.Image:
    im = photo(w, h, seed=3).convert("RGBA")
    im.putalpha(Image.linear_gradient("L").resize((w, h)))
    return im


def _seeds() -> dict[str, Callable[[], bytes]]:
    """Seed name -> builder; AVIF only where this Pillow has its codec."""
    xmp, p3 = xmp_packet(4, "Red", padding=2048), rgb_profile(DISPLAY_P3)
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    info.add_text("Comment", "zipped " * 20, zip=True)
    grey16 = Image.fromarray(np.arange(40 * 24, dtype=np.uint16).reshape(24, 40) * 68)
    p = [photo(32, 24, seed=s).convert("P") for s in range(3)]
    anim = [rgba(24, 24), photo(24, 24, seed=5).convert("RGBA")]
    pages = {"save_all": True, "append_images": [photo(16, 16)], "tiffinfo": {700: xmp}}
    out = {
        "jpeg": lambda: enc(photo(48, 32), "JPEG", exif=exif(6), xmp=xmp, icc_profile=p3),
        "jpeg_progressive": lambda: enc(
            photo(40, 56), "JPEG", progressive=True, exif=exif(3, adobe=True), xmp=xmp
        ),
        "jpeg_cmyk": lambda: enc(photo(32, 32).convert("CMYK"), "JPEG"),
        "jpeg_grey_restarts": lambda: enc(
            photo(40, 40).convert("L"), "JPEG", restart_marker_rows=1
        ),
        "png_rgba": lambda: enc(rgba(40, 30), "PNG", exif=exif(8, adobe=True), pnginfo=info),
        "png_16bit": lambda: enc(grey16, "PNG"),
        "png_palette": lambda: enc(p[0], "PNG", transparency=0),
        "gif_animated": lambda: enc(p[0], "GIF", save_all=True, append_images=p[1:], loop=0),
        "webp": lambda: enc(photo(40, 32), "WEBP", exif=exif(6, adobe=True), xmp=xmp),
        "webp_animated": lambda: enc(
            anim[0], "WEBP", save_all=True, append_images=anim[1:], lossless=True
        ),
        "tiff_pages": lambda: enc(photo(32, 24), "TIFF", compression="tiff_deflate", **pages),
        "tiff_16bit": lambda: enc(grey16, "TIFF"),
        "bmp": lambda: enc(photo(24, 20), "BMP"),
    }
    if features.check("avif"):
        out["avif"] = lambda: enc(photo(40, 24), "AVIF", exif=exif(6), quality=60)
    # pillow-heif and rawpy are keeper_core's dependencies: their seeds are always there.
    from support_photos import make_dng, make_heic

    out["heic"] = lambda: make_heic(photo(48, 32), exif=exif(6))
    when = {"datetime_original": "2024:05:01 10:00:00", "subsec": "25", "offset": "+02:00"}
    out["dng"] = lambda: make_dng(None, preview=photo(64, 48), orientation=6, **when)
    return out


SEEDS = _seeds()


@functools.cache
def seed(name: str) -> bytes:
    return SEEDS[name]()


# ---------------------------------------------------------------------------- structure

Unit = tuple[int, int, int, int, str]  # (start, end, length field at, its width, byte order)


def units(b: bytes | bytearray) -> list[Unit]:
    """Structural units with their length fields: JPEG segments (to the first scan), PNG and
    RIFF chunks, ISO-BMFF boxes (top level and ``meta``'s), TIFF IFD0 entries (their counts),
    BMP headers; none for other formats."""
    out: list[Unit] = []
    n, at = len(b), 0
    if b[:2] == SOI:
        at = 2
        while at + 4 <= n and b[at] == 0xFF and b[at + 1] not in (0xD9, 0xDA):
            end = at + 2 + struct.unpack_from(">H", b, at + 2)[0]
            out.append((at, end, at + 2, 2, "big"))
            at = end
    elif b[:8] == PNG:
        at = 8
        while at + 12 <= n:
            end = at + 12 + struct.unpack_from(">I", b, at)[0]
            out.append((at, min(n, end), at, 4, "big"))
            at = end
    elif b[:4] == b"RIFF":
        out.append((0, n, 4, 4, "little"))
        at = 12
        while at + 8 <= n:
            size = struct.unpack_from("<I", b, at + 4)[0]
            out.append((at, min(n, at + 8 + size), at + 4, 4, "little"))
            at += 8 + size + (size & 1)
    elif b[4:8] == b"ftyp":
        stop = n
        while at + 8 <= stop and (size := struct.unpack_from(">I", b, at)[0]) >= 8:
            out.append((at, min(n, at + size), at, 4, "big"))
            if b[at + 4 : at + 8] == b"meta":  # a full box: its children follow its flags
                at, stop = at + 12, min(n, at + size)
            else:
                at += size
    elif b[:2] in (b"II", b"MM") and n >= 8:
        order = "little" if b[:2] == b"II" else "big"
        ifd0 = int.from_bytes(b[4:8], order)  # type: ignore[arg-type]
        count = int.from_bytes(b[ifd0 : ifd0 + 2], order)  # type: ignore[arg-type]
        entries = [ifd0 + 2 + 12 * k for k in range(min(count, 64))]
        out += [(e, e + 12, e + 4, 4, order) for e in entries if e + 12 <= n]
    elif b[:2] == b"BM" and n >= 18:
        out += [(0, 14, 2, 4, "little"), (14, n, 14, 4, "little")]
    return out


def tiff_at(b: bytes | bytearray) -> int | None:
    """Where the first TIFF header (a TIFF file's, or an EXIF block's) starts."""
    found = [i for i in (b.find(b"II*\x00"), b.find(b"MM\x00*")) if i >= 0]
    return min(found) if found else None


def fix_crcs(b: bytearray) -> None:
    """Recompute every PNG chunk's CRC, so that damage reaches the decoder behind the check."""
    for start, end, _, _, _ in units(b) if b[:8] == PNG else ():
        if end - start >= 12:
            b[end - 4 : end] = struct.pack(">I", zlib.crc32(bytes(b[start + 4 : end - 4])))


def m_size(rng: random.Random, b: bytearray, other: bytes = b"") -> str:
    """Make the header claim a huge (or zero, or tiny) size, in the format's own fields."""
    w = rng.choice([0xFFFF, 0x7FFF, 0x4000, 0, 3])
    sof = max(b.find(b"\xff\xc0\x00\x11"), b.find(b"\xff\xc2\x00\x11"))
    if sof >= 0:
        b[sof + 5 : sof + 9] = struct.pack(">HH", w, 0xFFFF)
        return f"SOF claims 65535x{w}"
    if b[:8] == PNG and len(b) >= 24:
        b[16:24] = struct.pack(">II", 0x7FFFFFFF if w else 0, 0x7FFFFFFF)
        return "IHDR claims 2^31-1 square"
    if b[:3] == b"GIF" and len(b) >= 10:
        b[6:10] = struct.pack("<HH", 0xFFFF, w)
        if (at := b.find(b"\x2c", 13)) > 0:  # the first image descriptor
            b[at + 5 : at + 9] = struct.pack("<HH", 0xFFFF, w)
        return f"GIF screen and frame claim 65535x{w}"
    if b[:2] == b"BM" and len(b) >= 26:
        b[18:26] = struct.pack("<ii", 0x7FFFFFFF, -0x7FFFFFFF)
        return "BMP claims 2^31-1 square, top-down"
    for tag, at, value in ((b"VP8X", 12, b"\xff" * 6), (b"VP8 ", 14, b"\xff\x3f" * 2)):
        if b[:4] == b"RIFF" and (i := b.find(tag)) > 0:
            b[i + at : i + at + len(value)] = value
            return f"WebP {tag.decode()} claims its largest size"
    if b[4:8] == b"ftyp" and (i := b.find(b"ispe")) > 0:
        b[i + 8 : i + 16] = struct.pack(">II", 0x7FFFFFFF, 0x7FFFFFFF)
        return "ISO-BMFF ispe claims 2^31-1 square"
    for start, _, _, _, order in units(b) if tiff_at(b) == 0 else ():
        fmt = "<" if order == "little" else ">"
        if struct.unpack_from(fmt + "H", b, start)[0] in (256, 257):  # ImageWidth, ImageLength
            b[start + 2 : start + 12] = struct.pack(fmt + "HII", 4, 1, 0xFFFFFFFF)
    return "TIFF ImageWidth/Length claim 2^32-1 (or nothing to enlarge)"


# ---------------------------------------------------------------------------- mutations

ODD_DATES = (
    (  # a year 0, the last second, February 30th, month 13, blanks, ISO, not UTF-8,
        "0000:00:00 00:00:00|9999:12:31 23:59:59|2024:02:30 10:00:00|2024:13:01 25:61:61|"  # digits
        "    :  :     :  :  |2024-05-01T10:00:00|\udcff\udcfe\udcfd:05:01 10:00:00|"  # of another
        "\u0661\u0669\u0667\u0660:05:01 10|1799:12:31 23:59:59|2024:05:01 10:00:00.99999"  # script
    )
    .encode("utf-8", "surrogateescape")
    .split(b"|")
)
ODD_SHORT = [b"+99:99", b"-14:01", b"Z\x00\x00\x00\x00\x00", b"999999", b"\xff\xff", b"-00:00"]

Mutator = Callable[[random.Random, bytearray, bytes], str]


def m_set(rng: random.Random, b: bytearray, other: bytes) -> str:
    at, bits = [rng.randrange(len(b) * 8) for _ in range(rng.randint(1, 8))], rng.random() < 0.5
    for bit in at:
        b[bit // 8] = b[bit // 8] ^ (1 << bit % 8) if bits else rng.randrange(256)
    return f"{'bits flipped' if bits else 'bytes set'} at bits {at}"


def m_cut(rng: random.Random, b: bytearray, other: bytes) -> str:
    at = max(0, rng.choice([rng.randrange(len(b)), len(b) - rng.randint(1, 4), rng.randint(0, 40)]))
    del b[at:]
    return f"cut at byte {at}"


def m_insert(rng: random.Random, b: bytearray, other: bytes) -> str:
    at, n = rng.randrange(len(b) + 1), rng.choice([1, 2, 17, 256, 4096])
    run = bytes([rng.choice([0, 0xFF, rng.randrange(256)])]) * n if rng.random() < 0.5 else b""
    b[at:at] = run or rng.randbytes(n)
    return f"{n} {'repeated' if run else 'random'} bytes inserted at {at}"


def m_delete(rng: random.Random, b: bytearray, other: bytes) -> str:
    at, n = rng.randrange(len(b)), rng.choice([1, 2, 4, 64, 1024])
    del b[at : at + n]
    return f"{n} bytes deleted at {at}"


def m_repeat(rng: random.Random, b: bytearray, other: bytes) -> str:
    sos, eoi = b.rfind(b"\xff\xda"), b.rfind(b"\xff\xd9")
    if b[:2] == SOI and 0 < sos < eoi and rng.random() < 0.4:  # a scan bomb
        b[eoi:eoi] = bytes(b[sos:eoi]) * 100
        return "the last scan repeated 100 times"
    start = rng.randrange(len(b))
    start, end = rng.choice(units(b) or [(start, start + rng.randint(1, 512))])[:2]
    times = rng.choice([1, 2, 300])
    b[end:end] = bytes(b[start:end]) * times
    return f"bytes [{start}:{end}] repeated {times} more times"


def m_length(rng: random.Random, b: bytearray, other: bytes) -> str:
    at = rng.randrange(max(1, len(b) - 4))
    _, _, at, width, order = rng.choice(units(b) or [(0, 0, at, rng.choice([2, 4]), "big")])
    top = (1 << (8 * width)) - 1
    value = rng.choice([0, 1, 2, top, top - 1, top >> 1, rng.randrange(top)])
    b[at : at + width] = value.to_bytes(width, order)  # type: ignore[arg-type]
    return f"length field at {at} set to {value}"


def m_header(rng: random.Random, b: bytearray, other: bytes) -> str:
    n = rng.choice([2, 4, 12, 16, 32])
    b[:n] = other[:n]
    return f"first {n} bytes from another format"


def m_splice(rng: random.Random, b: bytearray, other: bytes) -> str:
    i, j = rng.randrange(len(b)), rng.randrange(len(other))
    b[i:] = other[j:]
    return f"spliced: ours to {i}, then another file's from {j}"


def m_exif(rng: random.Random, b: bytearray, other: bytes) -> str:
    """Damage the first EXIF/TIFF structure: loops, offsets and counts out of range, odd text."""
    kind = rng.choice(["date", "date", "short", "loop", "pointer", "offset", "count", "ifd0"])
    dates = [m.start() for m in re.finditer(rb"\d{4}:\d\d:\d\d \d\d:\d\d:\d\d", b)]
    shorts = [m.start() for m in re.finditer(rb"\+02:00|25\x00|012345", b)]
    if kind == "date" and dates:
        at, odd = rng.choice(dates), rng.choice(ODD_DATES)
        b[at : at + 19] = odd[:19].ljust(19, b"\x00")
        return f"EXIF date at {at}: {odd[:19]!r}"
    if kind == "short" and shorts:
        at, odd = rng.choice(shorts), rng.choice(ODD_SHORT)
        b[at : at + len(odd)] = odd
        return f"EXIF offset, sub-seconds or serial at {at}: {odd!r}"
    base = tiff_at(b)
    if base is None or base + 8 > len(b):
        return m_set(rng, b, other)
    o = "<" if b[base : base + 2] == b"II" else ">"
    ifd0 = struct.unpack_from(o + "I", b, base + 4)[0]
    count = struct.unpack_from(o + "H", b, base + ifd0)[0] if base + ifd0 + 2 <= len(b) else 0
    entries = list(range(base + ifd0 + 2, len(b) - 11, 12))[: min(count, 64)]
    if kind == "loop" and entries and entries[-1] + 16 <= len(b):
        b[entries[-1] + 12 : entries[-1] + 16] = struct.pack(o + "I", ifd0)
        return "IFD0's next IFD is IFD0 (a loop)"
    if kind == "pointer" and entries:
        for e in entries:
            if struct.unpack_from(o + "H", b, e)[0] in (0x8769, 0x8825, 0xA005):
                b[e + 8 : e + 12] = struct.pack(o + "I", ifd0)
        return "the Exif, GPS and Interop IFD pointers point at IFD0 (a loop)"
    if kind in ("offset", "count") and entries:
        e, value = rng.choice(entries), rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(b), 0])
        at = e + (4 if kind == "count" else 8)
        b[at : at + 4] = struct.pack(o + "I", value)
        return f"IFD entry at {e}: {kind} set to {value}"
    value = rng.choice([0, 1, 7, 0xFFFFFFFF, len(b) - base])
    b[base + 4 : base + 8] = struct.pack(o + "I", value)
    return f"IFD0 offset set to {value}"


@functools.cache
def evil_packets(secret: Path | None = None) -> dict[str, bytes]:
    """XMP packets no reader may expand, fetch or choke on (``secret``: the file an external
    entity names)."""
    base = xmp_packet(4, "Red")
    head, rest = base.split(b"\n", 1)
    refs = (b"&a%d;" % (i - 1) if i > 1 else b"&a;" for i in range(1, 10))
    laughs = b'<!ENTITY a "aaaaaaaaaa">' + b"".join(
        b'<!ENTITY a%d "%s">' % (i, ref * 10) for i, ref in enumerate(refs, 1)
    )
    target = (secret or Path("/etc/hostname")).as_uri().encode()
    doctypes = {
        "billion_laughs": (b"<!DOCTYPE x:xmpmeta [" + laughs + b"]>", b"&a9;"),
        "external_entity": (b'<!DOCTYPE x:xmpmeta [<!ENTITY e SYSTEM "' + target + b'">]>', b"&e;"),
        "parameter_entity": (b'<!DOCTYPE x [<!ENTITY % p SYSTEM "' + target + b'"> %p;]>', b"R"),
    }
    out = {}
    for name, (decl, ref) in doctypes.items():
        out[name] = (head + b"\n" + decl + rest).replace(b'"Red"', b'"' + ref + b'"')
        out[name + "_first"] = decl + base.replace(b'"Red"', b'"' + ref + b'"')
    nest = b"<rdf:Bag><rdf:li>" * 5000 + b"x" + b"</rdf:li></rdf:Bag>" * 5000
    out["deep"] = base.replace(
        b"/></rdf:RDF>", b"><xmp:N>" + nest + b"</xmp:N></rdf:Description></rdf:RDF>"
    )
    out["wide"] = base.replace(
        b' xmp:Label="Red"', b"".join(b' xmp:A%d="v"' % i for i in range(800))
    )
    out["long_value"] = base.replace(b'"Red"', b'"' + b"R" * 60_000 + b'"')
    for bad in (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00"):
        out[f"utf8_{bad.hex()}"] = base.replace(b'"Red"', b'"R' + bad + b'd"')
    for codec in ("utf-16", "utf-16-be", "utf-32"):
        out[codec] = base.decode().encode(codec)
    for value in ("NaN", "1e309", "9" * 5000, " 3 ", "\u0663", "-0", ""):
        out[f"rating_{value[:8]!r}"] = base.replace(b'"4"', b'"' + value.encode() + b'"')
    out["two_ratings"] = base.replace(b' xmp:Label="Red"', b' xmp:Rating="1"')
    return out


def m_xmp(rng: random.Random, b: bytearray, other: bytes) -> str:
    """The XMP packet swapped for a hostile one: in a JPEG's segment (its length fixed), else
    in place (cut or padded to the old packet's length)."""
    start = b.find(b"<?xpacket begin")
    end = b.find(b'<?xpacket end="w"?>', start) + len(b'<?xpacket end="w"?>')
    if start < 0 or end < start:
        return m_set(rng, b, other)
    name, packet = rng.choice(sorted(evil_packets().items()))
    seg = next((u for u in units(b) if u[0] < start and end <= u[1]), None)
    length = 0x10000 if seg is None else seg[1] - seg[0] - 2 - (end - start) + len(packet)
    if seg is not None and length <= 0xFFFF:
        b[start:end] = packet
        b[seg[2] : seg[2] + 2] = struct.pack(">H", length)
    else:
        b[start:end] = packet[: end - start].ljust(end - start, b" ")
    return f"XMP packet swapped for {name!r}"


MUTATORS: list[Mutator] = [
    *(m_set, m_set, m_cut, m_insert, m_delete, m_repeat),
    *(m_length, m_header, m_splice, m_size, m_exif, m_xmp),
]


def mutate(name: str, number: int, others: list[bytes]) -> tuple[bytes, str]:
    """Case ``number`` of seed ``name``: a function of KEEPER_FUZZ_SEED, the name, the number."""
    rng = random.Random(f"{BASE_SEED}:{name}:{number}")
    if number < len(MUTATORS):  # every kind in turn, each seed starting elsewhere
        chosen = [MUTATORS[(number + 5 * sorted(SEEDS).index(name)) % len(MUTATORS)]]
    else:
        chosen = [rng.choice(MUTATORS) for _ in range(rng.choice([1, 1, 2, 3]))]
    b, desc = bytearray(seed(name)), []
    for m in chosen:
        desc += [m(rng, b, rng.choice(others))] if b else []
    if rng.random() < 0.5 and b[:8] == PNG:
        fix_crcs(b)
        desc.append("CRCs fixed")
    return bytes(b), "; ".join(desc)


def cases(name: str) -> list[int]:
    if REPLAY:
        want, _, number = REPLAY.partition(":")
        return [int(number)] if want == name else []
    return list(range(CASES))


# ---------------------------------------------------------------------------- checking


class Case:
    """One case: every failure names it, with the line that replays it."""

    def __init__(self, name: str, number: int, desc: str, data: bytes = b"") -> None:
        self.name, self.number, self.desc, self.data = name, number, desc, data

    def __str__(self) -> str:
        return (
            f"seed {self.name} case {self.number}: {self.desc}\n"
            f"  replay: KEEPER_FUZZ_SEED={BASE_SEED} KEEPER_FUZZ_REPLAY={self.name}:{self.number}"
        )

    def call(self, what: str, fn: Callable[..., Any], *args: Any, ok: tuple = (), **kw: Any) -> Any:
        """``fn(*args, **kw)``, or the error of ``ok`` it raised (with a message); any other
        error, a slow call or a jump in peak memory fails the test, naming the case."""
        rss, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            out = fn(*args, **kw)
        except ok as e:
            out = e
        except Exception as e:
            raise AssertionError(f"{what}: {type(e).__name__} escaped: {e}\n{self}") from e
        took = time.perf_counter() - t0
        if isinstance(out, Exception):  # one of ok
            assert str(out).strip(), f"{what}: {type(out).__name__} without a message\n{self}"
            assert getattr(out, "reason", DECODE_REASONS[0]) in DECODE_REASONS, str(self)
        assert took < CALL_S, f"{what} took {took:.1f} s\n{self}"
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        assert grew < RSS_GROWTH_KB, f"{what}: peak memory grew by {grew // 1024} MB\n{self}"
        return out


def verdict(out: Any) -> str:
    return out.reason if isinstance(out, ImageDecodeError) else "ok"


@functools.cache
def preparation() -> ImagePreparation:
    # The config keeper embed hands its CPU decode tasks: no open_clip or torch imported.
    config = PreprocessConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    return ImagePreparation("keeper-tiny:random", limits=LIMITS, preprocess=config)


def check_decoded(c: Case, rgb: Image.Image, alpha: Image.Image | None, data: bytes) -> None:
    (w, h), size = rgb.size, c.call("image_size", image_size, data, ok=DEC)
    assert size == rgb.size, f"image_size {size} != decoded {rgb.size}\n{c}"
    assert LIMITS.min_side <= min(w, h) <= w * h <= LIMITS.max_pixels, f"{rgb.size}\n{c}"
    assert (rgb.mode, np.asarray(rgb).shape) == ("RGB", (h, w, 3)), str(c)
    assert alpha is None or (alpha.mode, alpha.size) == ("L", rgb.size), str(c)


def check_capture(c: Case, data: bytes) -> None:
    cap = c.call("read_capture", read_capture, data, source=URI)
    assert cap.time_source in TIME_SOURCES, str(c)
    if cap.timestamp is not None:  # years 1800..9999
        assert -5.5e9 < cap.timestamp < 2.6e11, f"timestamp {cap.timestamp}\n{c}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+([+-]\d\d:\d\d)?", cap.time), str(c)
    for text in (cap.make, cap.model, cap.serial):
        assert text is None or (0 < len(text) <= 128 and text.isprintable()), f"{text!r}\n{c}"


def check_image_bytes(c: Case, data: bytes, path: Path) -> str:
    """Every reader of image bytes on one file; the PIL decode's verdict."""
    got = c.call("decode", decode, data, limits=LIMITS, source=URI, ok=DEC)
    if isinstance(got, ImageDecodeError):
        c.call("image_size", image_size, data, ok=DEC)
    else:
        check_decoded(c, *got, data)
    prepared = c.call("prepare", preparation().decode, data, source=URI, ok=DEC)
    both = {verdict(prepared), verdict(got)}
    # A RAW whose preview lies past its end: libraw reads it into a buffer it does not clear and
    # calls it a JPEG when a freed one's bytes are there, which keeper finds is not in the file
    # ("truncated"), else an unknown format ("unsupported"): both documented.
    raw_cut = both == {"truncated", "unsupported"} and raw_format(data) is not None
    assert len(both) == 1 or raw_cut, f"prepare {verdict(prepared)} vs {verdict(got)}\n{c}"
    if not isinstance(prepared, ImageDecodeError):
        assert preparation().resize(prepared).shape == (3, 64, 64), str(c)
        feats = c.call("quality", preparation().quality, [prepared])
        assert np.isfinite(feats).all(), f"quality features {feats}\n{c}"
    if data[:3] == b"\xff\xd8\xff" and simplejpeg is not None:
        turbo = c.call("turbo", TurboDecoder().decode, data, limits=LIMITS, ok=DEC)
        assert verdict(turbo) == verdict(got), f"turbo {verdict(turbo)} vs PIL {verdict(got)}\n{c}"
        if not isinstance(got, ImageDecodeError):
            np.testing.assert_array_equal(np.asarray(turbo), np.asarray(got[0]), err_msg=str(c))
            band = c.call("band", decode_jpeg_band, data, pixels=1024, ok=DEC)  # accepted bytes
            assert isinstance(band, ImageDecodeError) or band.mode == "L", str(c)
        draft = c.call("draft", decode, data, limits=LIMITS, draft_size=(8, 8), ok=DEC)
        assert isinstance(draft, ImageDecodeError) or min(draft[0].size) >= 8, str(c)
        c.call("jpeg_header", jpeg_header, data, URI, ok=DATA)
    check_capture(c, data)
    ids = c.call("file_ids", file_ids, data, URI)
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids), str(c)
    path.write_bytes(data)
    fields = c.call("read_embedded_xmp", read_embedded_xmp, str(path), ok=(*DATA, StorageError))
    assert fields is None or isinstance(fields, dict | Exception), str(c)
    if data[:2] == SOI:
        check_write_jpeg_xmp(c, data, path, got)
    return verdict(got)


def check_write_jpeg_xmp(c: Case, data: bytes, path: Path, before: Any) -> None:
    """keeper pick --xmp embed: written with nothing else changed, or refused and untouched."""
    kw = {"rating": 2, "label": "Green", "keeper_fields": {"rank": "1"}}
    done = c.call("write_jpeg_xmp", write_jpeg_xmp, str(path), **kw, ok=(*DATA, StorageError))
    if isinstance(done, Exception):
        assert path.read_bytes() == data, f"a refused write changed the file\n{c}"
        return
    got = c.call("decode after", decode, path.read_bytes(), limits=LIMITS, ok=DEC)
    assert verdict(got) == verdict(before), f"decode {verdict(before)} -> {verdict(got)}\n{c}"
    if not isinstance(got, ImageDecodeError):
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(before[0]), err_msg=str(c))
    fields = c.call("re-read", read_embedded_xmp, str(path), ok=DATA)
    assert isinstance(fields, dict), f"{fields}\n{c}"
    assert fields.get("Xmp.keeper.rank") == "1", f"{fields}\n{c}"


# ---------------------------------------------------------------------------- images


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the metadata we break
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_image_bytes_fuzz(name: str, tmp_path: Path) -> None:
    pristine = Case(name, -1, "the seed itself", seed(name))
    assert check_image_bytes(pristine, seed(name), tmp_path / "seed") == "ok"
    others = [seed(n) for n in sorted(SEEDS) if n != name]
    verdicts: dict[str, int] = {}
    for number in cases(name):
        data, desc = mutate(name, number, others)
        got = check_image_bytes(Case(name, number, desc, data), data, tmp_path / str(number))
        verdicts[got] = verdicts.get(got, 0) + 1
    print(f"{name}: {verdicts}")


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_headers_claiming_huge_sizes_are_refused_before_decoding(name: str) -> None:
    """Each format's header enlarged (PNG CRCs fixed): refused fast, nothing allocated; where
    the size lives elsewhere (a GIF's frames, a DNG's preview), the decode within limits."""
    for w in (0xFFFF, 0):
        b = bytearray(seed(name))
        desc = m_size(random.Random(w), b)
        fix_crcs(b)
        c = Case(name, -2, desc, bytes(b))
        got = c.call("decode", decode, bytes(b), limits=LIMITS, ok=DEC)
        if not isinstance(got, ImageDecodeError):
            check_decoded(c, *got, bytes(b))


# ---------------------------------------------------------------------------- XMP


def check_packet(c: Case, packet: bytes, folder: Path) -> None:
    """A sidecar's bytes through every reader and writer of sidecars."""
    parsed = c.call("parse_xmp_packet", parse_xmp_packet, packet, URI, ok=DATA)
    side = folder / f"{c.name}-{c.number}.xmp"
    side.write_bytes(packet)
    read = c.call("read_sidecar", read_sidecar, str(side), ok=DATA)
    assert type(read) is type(parsed), str(c)
    assert isinstance(read, DataError) or read == parsed, str(c)
    for value in map(str, parsed.values() if isinstance(parsed, dict) else ()):
        assert MARKER not in value, f"an external entity was read\n{c}"
        assert "a" * 1000 not in value, f"an entity was expanded\n{c}"
    choice = KeeperXmp(3, "Green", {"rank": "1"})
    merged = c.call("merge_packet", merge_packet, packet, choice, source=URI, ok=DATA)
    assert isinstance(merged, DataError) or isinstance(parsed, dict) or not packet.strip(), str(c)
    kw = {"rating": 3, "label": "Green", "keeper_fields": {"rank": "1"}}
    done = c.call("write_sidecar", handback.write_sidecar, str(side), **kw, ok=DATA)
    if isinstance(done, DataError):
        assert side.read_bytes() == packet, f"a refused sidecar write changed the file\n{c}"
        return
    after = c.call("read_sidecar after", read_sidecar, str(side))
    assert after.get("Xmp.keeper.rank") == "1", f"{after}\n{c}"
    old = parsed if isinstance(parsed, dict) else {}
    want = old.get("Xmp.xmp.Rating") if "rating" in done.kept else "3"
    assert after.get("Xmp.xmp.Rating") == want, f"rating {after.get('Xmp.xmp.Rating')}\n{c}"


@pytest.mark.parametrize("which", ["keeper", "lightroom", "evil"])
def test_xmp_sidecar_fuzz(which: str, tmp_path: Path) -> None:
    from support_jpeg import lightroom_packet

    bases = {
        "keeper": [xmp_packet(4, "Red")],
        "lightroom": [lightroom_packet(2, "Blue", pad=256)],
        "evil": list(evil_packets().values()),
    }[which]
    name = f"xmp_{which}"
    for k, packet in enumerate(bases if which == "evil" else []):  # each hostile one as it is
        check_packet(Case(name, -1 - k, f"hostile packet {k}", packet), packet, tmp_path)
    kinds = [m_set, m_set, m_cut, m_insert, m_delete, m_repeat, m_splice]
    for number in cases(name):
        rng = random.Random(f"{BASE_SEED}:{name}:{number}")
        b, desc = bytearray(rng.choice(bases)), []
        for m in [rng.choice(kinds) for _ in range(rng.choice([1, 1, 2, 3]))]:
            desc += [m(rng, b, xmp_packet(None, None))] if b else []
        check_packet(Case(name, number, "; ".join(desc), bytes(b)), bytes(b), tmp_path)


def test_xml_entities_are_never_expanded_nor_fetched(tmp_path: Path) -> None:
    """Billion laughs and external entities, in a sidecar and in a JPEG's and a TIFF's own XMP:
    refused (a DataError) or read without the entity's text, quickly; the files unchanged."""
    secret = tmp_path / "secret.txt"
    secret.write_text(MARKER)
    for k, (name, packet) in enumerate(evil_packets(secret).items()):
        if not name.startswith(("billion", "external", "parameter")):
            continue
        c = Case("entities", k, name, packet)
        check_packet(c, packet, tmp_path)
        jpeg, tiff = tmp_path / f"{k}.jpg", tmp_path / f"{k}.tif"
        jpeg.write_bytes(before := enc(photo(32, 24), "JPEG", xmp=packet))
        tiff.write_bytes(enc(photo(16, 16), "TIFF", tiffinfo={700: packet}))
        for path in (jpeg, tiff):
            fields = c.call("read_embedded_xmp", read_embedded_xmp, str(path), ok=DATA)
            assert isinstance(fields, DataError) or MARKER not in str(fields), str(c)
        done = c.call("write_jpeg_xmp", write_jpeg_xmp, str(jpeg), rating=1, label=None, ok=DATA)
        assert not isinstance(done, DataError) or jpeg.read_bytes() == before, str(c)
        assert MARKER.encode() not in jpeg.read_bytes(), f"the entity's target was read\n{c}"


# ---------------------------------------------------------------------------- shards


def tar_headers(b: bytearray) -> list[int]:
    return [at for at in range(0, len(b) - 511, 512) if b[at + 257 : at + 262] == b"ustar"]


def fix_checksums(b: bytearray) -> None:
    for at in tar_headers(b):
        chk = sum(b[at : at + 512]) - sum(b[at + 148 : at + 156]) + 8 * 32  # the field as spaces
        b[at + 148 : at + 156] = b"%06o\x00 " % chk


def m_tar_size(rng: random.Random, b: bytearray, other: bytes) -> str:
    at = rng.choice(tar_headers(b) or [0])
    value = rng.choice([0, 1, 511, 512, 0o77777777777, len(b), len(b) - at])
    b[at + 124 : at + 136] = b"%011o\x00" % value
    return f"member at {at}: size {value}"


def m_tar_name(rng: random.Random, b: bytearray, other: bytes) -> str:
    at = rng.choice(tar_headers(b) or [0])
    names = [b"\xff\xfe.jpg", b"../../x.jpg", b"/abs.jpg", b".hidden.jpg", b"", b"a" * 100]
    name = rng.choice([*names, b"x.JPG\x00junk"])
    b[at : at + 100] = name.ljust(100, b"\x00")
    return f"member at {at}: name {name[:20]!r}"


@pytest.mark.parametrize("fmt", ["USTAR", "GNU", "PAX"])
def test_webdataset_shard_fuzz(fmt: str, tmp_path: Path) -> None:
    jpg, name = seed("jpeg"), f"tar_{fmt.lower()}"
    extra = {"GNU": [("d" * 120 + "/4.jpg", jpg)], "PAX": [("\u00e9t\u00e9/5.jpg", jpg)]}
    base = tar_bytes(
        [
            *(("0.jpg", jpg), ("0.txt", b"a caption"), ("0.json", b'{"url": "x", "n": [1]}')),
            *(("1.png", seed("png_palette")), ("d/2.webp", seed("webp")), ("3.txt", b"\xc3\xa9")),
            *extra.get(fmt, []),
        ],
        getattr(tarfile, f"{fmt}_FORMAT"),
    )
    kinds = [m_set, m_cut, m_insert, m_delete, m_repeat, m_tar_size, m_tar_name]
    for number in cases(name):
        rng = random.Random(f"{BASE_SEED}:{name}:{number}")
        b, desc = bytearray(base), []
        for m in [rng.choice(kinds) for _ in range(rng.randint(1, 3))]:
            desc += [m(rng, b, bytes(base))] if b else []
        if rng.random() < 0.5:
            fix_checksums(b)
            desc.append("checksums fixed")
        shard = tmp_path / f"{number}.tar"
        shard.write_bytes(b)
        c = Case(name, number, "; ".join(desc))
        index = c.call("index_shard", index_shard, str(shard), ok=(StorageError,))
        assert isinstance(index, ShardIndex), str(c)
        assert index.error is None or str(shard) in index.error, f"{index.error}\n{c}"
        for row in index.rows():
            assert 0 <= row["offset"] <= row["offset"] + row["size"] <= len(b), f"{row}\n{c}"
            args = (row["image_uri"], row["offset"], row["size"])
            got = c.call("read_member", read_member, *args, max_bytes=LIMITS.max_bytes, ok=DEC)
            assert isinstance(got, ImageDecodeError) or len(got) == row["size"], str(c)
        for s in index.samples:
            assert s.metadata is None or json.loads(s.metadata) is not None, str(c)
        assert c.call("from_json", ShardIndex.from_json, index.to_json()) == index, str(c)


# ---------------------------------------------------------------------------- bugs found


@pytest.mark.parametrize(
    "clap",
    [
        pytest.param((16, 1, 16, 1, 1 - 2**31, 2, 1 - 2**31, 2), id="offsets_out_of_range"),
        pytest.param((16, 1, 16, 1, 0, 1, 0, 1), id="valid_crop_of_a_larger_image"),
    ],
)
def test_a_heif_crop_does_not_hide_the_coded_size(clap: tuple[int, ...]) -> None:
    """Found by the fuzz (a byte of a HEIC's clap box). The header reads 16x16, so every limit
    passed; libheif decodes the whole coded image (measured: a 30 KB HEIC coded 11001x12001
    under a 16x16 clap, default limits: +600 MB peak RSS, 1.7 s) and, with the offsets out of
    range, hands it back uncropped: here 202x152 > max_pixels 10,000. The HEIC: 201x151, coded
    202x152 (pillow-heif writes a clap for odd sizes), its clap (width, height, horizontal and
    vertical offsets as fractions) set."""
    from support_photos import make_heic

    data = bytearray(make_heic(Image.new("RGB", (201, 151), (90, 140, 200)), quality=10))
    at = data.find(b"clap") + 4
    data[at : at + 32] = struct.pack(">IIIIiIiI", *clap)
    assert image_size(bytes(data)) == (16, 16)
    with pytest.raises(ImageDecodeError, match="too_many_pixels"):
        decode(bytes(data), limits=DecodeLimits(max_pixels=10_000, min_side=8))


@pytest.mark.parametrize("reader", ["read_capture", "read_embedded_xmp"])
def test_a_heif_without_images_is_refused_by_the_metadata_readers(
    reader: str, tmp_path: Path
) -> None:
    """Found by the fuzz (one bit of ipma). The HEIC's image is associated with a property that
    does not exist: libheif parses the file and lists no image. read_capture promises never to
    raise, read_embedded_xmp a DataError (pillow-heif's IndexError escaped both); decode_image
    refuses the file ("truncated")."""
    from support_photos import make_heic

    data = bytearray(make_heic(photo(48, 32), exif=exif(6)))
    at = data.find(b"ipma") + 8  # its entries: count (4), then item id (2), associations (1)
    data[at + 6 + data[at + 6]] = 0x7F  # the item's last association: property 127 (of 6)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode(bytes(data))
    (tmp_path / "x.heic").write_bytes(data)
    if reader == "read_capture":
        assert read_capture(bytes(data)).time_source == "none"
    else:
        with pytest.raises(DataError):
            read_embedded_xmp(str(tmp_path / "x.heic"))


def test_a_capture_number_of_5000_digits_is_no_number() -> None:
    """An ImageNumber (0x9211, IFD0) of 5,000 ASCII digits: read_capture, which promises never
    to raise on bad metadata, raised int()'s ValueError. The picture itself decodes."""
    digits = b"1" * 5000 + b"\x00"
    ifd = struct.pack("<HHHII", 1, 0x9211, 2, len(digits), 26) + b"\x00" * 4
    block = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + digits
    data = enc(photo(32, 24), "JPEG", exif=block)
    assert decode(data)[0].size == (32, 24)
    assert read_capture(data).sequence is None


def tar_with_size(size: int, member: int) -> bytes:
    """Two members, the size of member ``member`` (0 or 1) set to ``size`` (base-256 when
    negative, as tar allows) and its checksum fixed."""
    data, at = tar_bytes([("0.jpg", b"x" * 100), ("1.jpg", b"y" * 100)]), 1024 * member + 124
    data[at : at + 12] = b"\xff" + (size % (1 << 88)).to_bytes(11, "big")
    fix_checksums(data)
    return bytes(data)


def test_a_tar_member_of_negative_size_does_not_hang_index_shard(tmp_path: Path) -> None:
    """Python's tarfile (3.11.7 here: CVE-2025-8194) reads such a member for ever; in a child
    process, killed after 60 s, index_shard returns with the shard's error."""
    (tmp_path / "neg.tar").write_bytes(tar_with_size(-512, 1))
    code = "import sys; from keeper_core.webdataset import index_shard as i; print(i(sys.argv[1]).error)"
    argv = [sys.executable, "-c", code, str(tmp_path / "neg.tar")]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("index_shard did not return in 60 s: a member of size -512 is read for ever")
    assert "corrupt or truncated tar" in out.stdout, out.stderr[-2000:]
    assert "negative size" in out.stdout, out.stdout


@pytest.mark.parametrize("size", [-1, -2048])
def test_a_tar_member_of_negative_size_is_the_shards_error(size: int, tmp_path: Path) -> None:
    """Was: -1 listed with size -1 (read_member then raised a bare ValueError); -2048 an
    OSError [Errno 22] out of index_shard (keeper embed's listing died with a traceback)."""
    (tmp_path / "neg.tar").write_bytes(tar_with_size(size, 0))
    index = index_shard(str(tmp_path / "neg.tar"))
    assert list(index.samples) == [], index.samples
    assert index.error is not None, index
    assert "'0.jpg' has a negative size" in index.error, index.error
    with pytest.raises(DataError, match="size -1"):
        read_member(f"{tmp_path / 'neg.tar'}#0.jpg", 512, -1, max_bytes=10**6)


@pytest.mark.skipif(not features.check("avif"), reason="no AVIF codec in this Pillow")
@pytest.mark.parametrize("reader", ["decode", "image_size", "read_capture"])
def test_an_avif_exif_of_another_type_is_a_decode_error(reader: str) -> None:
    """Found by the fuzz (bits of an AVIF's EXIF). Its Make (ASCII) made a RATIONAL, with
    Orientation 6: each reader must answer or refuse with an ImageDecodeError (read_capture:
    never raise); PIL's AttributeError escaped all three."""
    block = Image.Exif()
    block[0x010F], block[0x0112] = "Canon Inc.", 6
    data = bytearray(enc(Image.new("RGB", (32, 24), (10, 200, 30)), "AVIF", exif=block.tobytes()))
    at = data.find(struct.pack(">HH", 0x010F, 2))  # Make, ASCII
    data[at + 2 : at + 8] = struct.pack(">HI", 5, 1)  # RATIONAL, one
    read = {"decode": decode, "image_size": image_size, "read_capture": read_capture}[reader]
    with contextlib.suppress(ImageDecodeError):
        read(bytes(data))
