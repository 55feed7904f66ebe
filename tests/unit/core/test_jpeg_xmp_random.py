"""keeper_core.jpeg_xmp.write_jpeg_xmp over seeded random JPEGs, against the splice it documents.

Seeded cases (``KEEPER_HISTORIES=2000`` runs more; a failure prints its seed, the file's segments
and keeper's choice, and ``-k "nothing_else[SEED]"`` replays it) build a JPEG segment by segment:
SOI; a random mix, in a camera's order or shuffled, some after the tables, of JFIF and JFXX
(APP0), EXIF with and without a thumbnail (APP1, either byte order), a standard XMP packet another
tool wrote (attributes or elements, with and without the xpacket wrapper, unpadded, padded with
spaces or NULs, empty, tiny, up to a whole 65,533-byte segment), Extended XMP, a multi-chunk ICC
profile (APP2), a multi-picture index (APP2 MPF), Photoshop IRB with IPTC (APP13), Adobe (APP14),
other APPn (sometimes 64 KB ones, so that the XMP lies past keeper's first 256 KB read) and
comments, 0xFF fill bytes before markers; then PIL's tables and scans (baseline or progressive,
restart markers, a comment between scans), the EOI and sometimes bytes after it (a second JPEG).
Some are damaged (cut short, a length past the end or under 2, no scan, junk between segments,
not a JPEG, two XMP segments, a packet exiv2 cannot parse) and some odd (two SOIs, a bare marker
in the header, XMP between the scans, a near-miss XMP signature). keeper's choice is random too
(ratings, labels, fields with non-ASCII and XML's special characters, a bad label), as is what the
file already holds (a person's rating and label, an earlier run's fields and record, keeper's own
packet from an earlier run) and the file itself (its name, a ``file://`` URI, its mode, user
xattrs, a hard link, a symlink, read-only).

The reference is the module docstring written out, over a JPEG walk of the test's own:

- damaged input, two standard XMP segments, a packet exiv2 cannot parse, a symlink: a DataError
  naming the file, "left as it is" (a bad label: a ConfigError, before the file is read);
- else the packet is :func:`keeper_core.handback.merge_packet`'s (the one merge, tested with the
  sidecars; its fields are also checked against the ownership rules of ``handback``'s
  docstrings); a packet that would not change is not written (``changed`` False, same bytes,
  same mtime), even in a hard-linked or read-only file; one that would is refused in those, or
  when it is over ``MAX_PACKET``, or when it must grow behind an MPF index, or when exiv2 cannot
  read the file at all (ICC chunks out of order: the check that exiv2 finds the packet fails);
- a written file is the original's bytes with the one XMP segment replaced, or inserted after the
  leading APP0/APP1 segments: everything before and after it identical (every other segment, the
  scans, the bytes after EOI, in order), the segment padded to its old size when the packet fits
  (the file keeps its length), else given ``PADDING`` bytes of room (less at the limit); the
  segment's packet is the merged one (read by the test's walk, by exiv2 on the whole file, by
  PIL and by ElementTree for rating and label); exiv2's EXIF, IPTC, ICC and comment are as
  before; PIL decodes the same pixels; the mode and xattrs stay; ``stamp`` and ``content_id``
  are the new file's; writing again is a no-op (same bytes, same mtime);
- odd input is either refused (the file as it was) or written under the same rules;
- after every call the folder holds no temporary file.

``test_a_new_file_failing_a_check_is_never_renamed`` corrupts the new file between its write and
its check (a byte outside the segment, the segment dropped, doubled, moved, cut, a value in it
changed), changes the original meanwhile, or fails the fsync or the rename: always refused, the
original as it was (or as the other program left it), no temporary file left.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import stat
import struct
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pyexiv2
import pytest
from PIL import Image, ImageCms

from keeper_core import jpeg_xmp
from keeper_core.embedded_xmp import content_digest
from keeper_core.errors import ConfigError, DataError, KeeperError, StorageError
from keeper_core.handback import KEEPER_NS, KeeperXmp, merge_packet
from keeper_core.jpeg_xmp import embeds_into, write_jpeg_xmp

#: cases in the suite (~15 ms each); KEEPER_HISTORIES=2000 looks further
SEEDS = int(os.environ.get("KEEPER_HISTORIES", "80"))
FAULT_SEEDS = max(SEEDS // 4, 1)

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
XMP_SIG = b"http://ns.adobe.com/xap/1.0/\x00"
EXT_SIG = b"http://ns.adobe.com/xmp/extension/\x00"
MAX_PACKET = 0xFFFF - 2 - len(XMP_SIG)  # a segment's 16-bit length counts its own 2 bytes
PADDING = 2048  # the XMP specification's 2 KB, as the module docstring promises
BARE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn and SOI: no length field
WS = b"\x00 \t\r\n"
TRAILER = re.compile(rb"[ \t\r\n]*(<\?xpacket end=)")
RATING, LABEL = "Xmp.xmp.Rating", "Xmp.xmp.Label"
RECORD, REASONS = "Xmp.keeper.xmp", "Xmp.keeper.reasons"
OWN = re.compile(r"^Xmp\.keeper\.[^/\[]+$")
NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "dc": "http://purl.org/dc/elements/1.1/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "crs": "http://ns.adobe.com/camera-raw-settings/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "keeper": KEEPER_NS,
}
TEXTS = [
    "Lisbon",
    "Zu prüfen",
    "日本語のキーワード",
    "a & b <c> \"q\" 'z'",
    "tab\there",
    "two\nlines",
    " padded ",
    "ümlaut 🌿 emoji",
]
LABELS = ["Red", "Green", "Blue", "Zu prüfen", "緑", "a&b<c>"]
NAMES = ["IMG_0001.JPG", "img 1 é.jpeg", "日本.jpg", "a" * 200 + ".jpg", "x.JPEG", "#1?%.jpg"]


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def seg(marker: int, body: bytes) -> bytes:
    assert len(body) <= 0xFFFD, len(body)
    return b"\xff" + bytes([marker]) + struct.pack(">H", 2 + len(body)) + body


# ---------------------------------------------------------------------------------------------
# the test's own walk of a JPEG


class Damaged(Exception):
    """What a whole JPEG must not be: keeper refuses it."""


class Seg(NamedTuple):
    marker: int
    start: int  # its 0xFF (after any fill bytes)
    end: int


class Layout(NamedTuple):
    header: list[Seg]  # every segment after SOI, before the first SOS
    sos: int
    end: int  # just past the EOI


def _length(data: bytes, i: int) -> int:
    if i + 4 > len(data):
        raise Damaged(f"a length field past the end at {i}")
    (n,) = struct.unpack(">H", data[i + 2 : i + 4])
    if n < 2:
        raise Damaged(f"length {n} at {i}")
    return int(n)


def layout(data: bytes) -> Layout:
    """SOI, segments to the first SOS, the scans (entropy-coded data up to a marker that is
    neither a stuffed 0x00 nor RSTn; other segments between them), EOI."""
    if data[:2] != SOI:
        raise Damaged("not a JPEG")
    header: list[Seg] = []
    i = 2
    while True:
        if i + 2 > len(data) or data[i] != 0xFF:
            raise Damaged(f"no marker at {i}")
        m = data[i + 1]
        if m == 0xFF:
            i += 1
        elif m == 0xD9:
            raise Damaged("EOI before any scan")
        elif m == 0xDA:
            break
        elif m in BARE:
            header.append(Seg(m, i, i + 2))
            i += 2
        else:
            n = _length(data, i)
            if i + 2 + n > len(data):
                raise Damaged(f"segment at {i} runs past the end")
            header.append(Seg(m, i, i + 2 + n))
            i += 2 + n
    sos = i
    while True:
        if i + 2 > len(data) or data[i] != 0xFF:
            raise Damaged(f"no marker at {i} after a scan")
        m = data[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m == 0xD9:
            return Layout(header, sos, i + 2)
        if m in BARE:
            i += 2
            continue
        i += 2 + _length(data, i)
        if m == 0xDA:
            while True:  # entropy-coded data
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= len(data):
                    raise Damaged("a scan without an end")
                if data[i + 1] == 0xFF:
                    i += 1
                elif data[i + 1] == 0 or 0xD0 <= data[i + 1] <= 0xD7:
                    i += 2
                else:
                    break


def is_xmp(data: bytes, s: Seg) -> bool:
    return s.marker == 0xE1 and data[s.start + 4 : s.end].startswith(XMP_SIG)


def unpadded(body: bytes) -> bytes:
    """A packet as it reads without its padding: stripped, one newline before its trailer."""
    return TRAILER.sub(rb"\n\1", body.strip(WS), count=1)


class Place(NamedTuple):
    """Where keeper's segment goes: the old one's bytes, or an empty range to insert at."""

    start: int
    end: int
    packet: bytes | None  # the old segment's body after the signature
    mpf_before: bool  # an APP2 MPF index starts before ``start``


def place(data: bytes, lay: Layout) -> Place | str:
    """The module docstring's rule; a refusal's reason instead, where there are two packets."""
    xmps = [s for s in lay.header if is_xmp(data, s)]
    if len(xmps) > 1:
        return f"holds {len(xmps)} standard XMP segments"
    if xmps:
        s = xmps[0]
        start, end, packet = s.start, s.end, data[s.start + 4 + len(XMP_SIG) : s.end]
    else:
        start = 2
        for s in lay.header:  # after the leading APP0/APP1 segments (JFIF, EXIF)
            if s.marker not in (0xE0, 0xE1):
                break
            start = s.end
        end, packet = start, None
    mpf = any(
        s.marker == 0xE2 and data[s.start + 4 : s.start + 8] == b"MPF\x00" and s.start < start
        for s in lay.header
    )
    return Place(start, end, packet, mpf)


# ---------------------------------------------------------------------------------------------
# random segments


def scans(rng: np.random.Generator, desc: list[str]) -> tuple[list[bytes], bytes]:
    """PIL's tables (DQT, SOF, DHT, DRI) and everything from its first SOS to its EOI, for a
    small random picture."""
    mode = pick(rng, ["RGB", "RGB", "L"])
    w, h = int(rng.integers(8, 41)), int(rng.integers(8, 41))
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    if chance(rng, 0.5):
        px = rng.integers(0, 256, shape, np.uint8)
    else:  # smooth: long runs of zero coefficients
        px = np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[:, None].T, (h, w))
        px = np.ascontiguousarray(np.stack([px] * 3, -1) if mode == "RGB" else px)
    kw: dict[str, Any] = {"quality": int(rng.integers(20, 100))}
    if chance(rng, 0.4):
        kw["progressive"] = True
    if chance(rng, 0.3):
        kw["restart_marker_blocks"] = int(rng.integers(1, 4))
    if mode == "RGB" and chance(rng, 0.5):
        kw["subsampling"] = int(rng.integers(0, 3))
    if chance(rng, 0.3):
        kw["optimize"] = True
    buf = io.BytesIO()
    Image.fromarray(px, mode).save(buf, "JPEG", **kw)
    data = buf.getvalue()
    lay = layout(data)
    desc.append(f"{mode} {w}x{h} {kw}")
    tables = [data[s.start : s.end] for s in lay.header if not (0xE0 <= s.marker <= 0xEF)]
    assert lay.end == len(data)
    return tables, data[lay.sos :]


def tiny_jpeg(rng: np.random.Generator, xmp: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    px = rng.integers(0, 256, (8, 8, 3), np.uint8)
    Image.fromarray(px).save(buf, "JPEG", **({} if xmp is None else {"xmp": xmp}))
    return buf.getvalue()


def jfif() -> bytes:
    return seg(0xE0, b"JFIF\x00\x01\x02\x01\x00H\x00H\x00\x00")


def jfxx(rng: np.random.Generator) -> bytes:
    return seg(0xE0, b"JFXX\x00\x10" + tiny_jpeg(rng))


def exif(rng: np.random.Generator, thumbnail: bool) -> bytes:
    """EXIF as a camera writes it: IFD0 (make, model, orientation), and IFD1 pointing at a JPEG
    thumbnail (with its own XMP, sometimes) when asked."""
    order = pick(rng, ["<", ">"])
    thumb = tiny_jpeg(rng, b"<x:xmpmeta/>" if chance(rng, 0.3) else None) if thumbnail else b""

    def ifd(at: int, entries: list[tuple[int, int, bytes]], nxt: int) -> bytes:
        """One IFD at byte ``at`` of the TIFF, its values over 4 bytes after it."""
        head = struct.pack(order + "H", len(entries))
        values = b""
        tail_at = at + 2 + 12 * len(entries) + 4
        for tag, kind, value in entries:
            size = {2: 1, 3: 2, 4: 4}[kind]
            if len(value) <= 4:
                head += struct.pack(order + "HHI", tag, kind, len(value) // size)[:8]
                head += value.ljust(4, b"\x00")
            else:
                head += struct.pack(order + "HHII", tag, kind, len(value) // size, tail_at)
                values += value + b"\x00" * (len(value) % 2)
                tail_at = at + 2 + 12 * len(entries) + 4 + len(values)
        return head + struct.pack(order + "I", nxt) + values

    def short(v: int) -> bytes:
        return struct.pack(order + "H", v)

    def long(v: int) -> bytes:
        return struct.pack(order + "I", v)

    entries0 = [
        (0x010F, 2, b"Keeper Camera Co.\x00"),
        (0x0110, 2, pick(rng, [b"KC-1\x00", b"KC-2 Mark III\x00"])),
        (0x0112, 3, short(1)),
    ]
    size0 = len(ifd(8, entries0, 0))
    at1 = 8 + size0 + size0 % 2
    entries1 = [(0x0103, 3, short(6)), (0x0201, 4, long(0)), (0x0202, 4, long(len(thumb)))]
    size1 = len(ifd(at1, entries1, 0))
    entries1[1] = (0x0201, 4, long(at1 + size1))
    tiff = (b"II*\x00" if order == "<" else b"MM\x00*") + long(8)
    tiff += ifd(8, entries0, at1 if thumbnail else 0)
    if thumbnail:
        tiff = tiff.ljust(at1, b"\x00") + ifd(at1, entries1, 0) + thumb
    return seg(0xE1, b"Exif\x00\x00" + tiff)


def xml_escape(value: str) -> str:
    out = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return out.replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


@dataclass
class Packet:
    """An XMP packet another tool (or an earlier keeper) wrote."""

    data: bytes
    what: str


def xmp_packet(rng: np.random.Generator, size: str, choice_rating: int) -> Packet:
    simple: dict[str, str] = {}
    what = [size]
    if chance(rng, 0.5):
        simple["xmp:Rating"] = pick(rng, ["-1", "0", "1", "2", "3", "4", "5", "3.0"])
    if chance(rng, 0.4):
        simple["xmp:Label"] = pick(rng, LABELS)
    if chance(rng, 0.4):
        simple["photoshop:City"] = pick(rng, TEXTS)
    if chance(rng, 0.3):
        simple["crs:Exposure2012"] = "+0.35"
    if chance(rng, 0.3):
        simple["xmpMM:DocumentID"] = "xmp.did:0001"
    if chance(rng, 0.35):  # an earlier keeper run's fields
        simple["keeper:group"] = "g000007"
        if chance(rng, 0.5):
            simple["keeper:rank"] = pick(rng, ["1", "2"])
        if chance(rng, 0.3):
            simple["keeper:reasons"] = "sharpest of 3"
        r = simple.get("xmp:Rating", "")
        lab = simple.get("xmp:Label", "")
        record = pick(rng, [None, f"{r}|{lab}", f"{r}|{lab}", f"{choice_rating}|", "2|Red", "junk"])
        if record is not None:
            simple["keeper:xmp"] = record
    elements = chance(rng, 0.4)
    keywords = [pick(rng, TEXTS) for _ in range(int(rng.integers(0, 4)))]
    title = pick(rng, TEXTS) if chance(rng, 0.3) else None
    used = {"x", "rdf"} | {k.split(":")[0] for k in simple}
    inner = ""
    if keywords:
        used.add("dc")
        items = "".join(f"<rdf:li>{xml_escape(k)}</rdf:li>" for k in dict.fromkeys(keywords))
        inner += f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>\n"
    if title is not None:
        used.add("dc")
        inner += (
            '<dc:title><rdf:Alt><rdf:li xml:lang="x-default">'
            f"{xml_escape(title)}</rdf:li></rdf:Alt></dc:title>\n"
        )
    attrs = ""
    for k, v in simple.items():
        if elements:
            inner += f"<{k}>{xml_escape(v)}</{k}>\n"
        else:
            attrs += f'\n    {k}="{xml_escape(v)}"'
    wrapped = chance(rng, 0.8)
    what.append("elements" if elements else "attributes")
    what.append("wrapped" if wrapped else "bare")

    def build(description: str, pad: int) -> bytes:
        body = inner
        names = set(used)
        if description:
            names.add("dc")
            body += (
                '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
                f"{description}</rdf:li></rdf:Alt></dc:description>\n"
            )
        xmlns = "".join(f' xmlns:{p}="{NS[p]}"' for p in sorted(names - {"x", "rdf"}))
        text = (
            '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="Some Tool 1.0">\n'
            f' <rdf:RDF xmlns:rdf="{NS["rdf"]}">\n'
            f'  <rdf:Description rdf:about=""{xmlns}{attrs}>\n{body}  </rdf:Description>\n'
            " </rdf:RDF>\n</x:xmpmeta>"
        ).encode()
        padding = ((b" " * 99 + b"\n") * (pad // 100 + 1))[:pad]
        if not wrapped:
            return text + padding
        begin = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'.encode()
        return begin + text + b"\n" + padding + b'<?xpacket end="w"?>'

    pad = pick(rng, [0, 0, 100, 2048, int(rng.integers(0, 4000))])
    if size == "empty":  # room a camera reserved: whitespace or NULs, or nothing
        return Packet(pick(rng, [b"", b" " * pad, b"\x00" * pad, b"\n" * 3]), f"empty, {pad}")
    if size == "tiny":
        data = build("", pad)
    elif size == "small":
        data = build(xml_escape(pick(rng, TEXTS)), pad)
    elif size == "big":
        data = build("d" * int(rng.integers(20_000, 60_000)), pad)
    else:  # "full": the segment as large as a segment gets, or nearly
        target = MAX_PACKET - int(rng.integers(0, 400))
        pad = pick(rng, [0, 0, 50, 3000, 20_000])
        base = len(build("d", pad)) - 1  # the description's element and namespace too
        data = build("é" * ((target - base) // 2) + "d" * ((target - base) % 2), pad)
    tail = pick(rng, [b"", b"", b"\x00" * int(rng.integers(1, 64)), b"\n  "])
    data = data + tail if len(data) + len(tail) <= MAX_PACKET else data
    nuls = ", NULs after" if tail.startswith(b"\x00") else ""
    what.append(f"{len(data)} B, padded {pad}{nuls}")
    return Packet(data, " ".join(what))


def extended_xmp(rng: np.random.Generator) -> list[bytes]:
    """Extended XMP: the rest of a packet too large for one segment, in chunks."""
    total = int(rng.integers(100, 3000))
    rest = (b"<rdf:Description xmlns:crs='c'>" + b"h" * total)[:total]
    guid = b"0123456789ABCDEF0123456789ABCDEF"
    cut = int(rng.integers(1, total))
    return [
        seg(0xE1, EXT_SIG + guid + struct.pack(">II", total, at) + rest[at:to])
        for at, to in ((0, cut), (cut, total))
    ]


@functools.cache
def srgb() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def icc(rng: np.random.Generator) -> list[bytes]:
    profile = srgb()
    n = int(rng.integers(1, 4))
    step = -(-len(profile) // n)
    chunks = [profile[k : k + step] for k in range(0, len(profile), step)]
    return [
        seg(0xE2, b"ICC_PROFILE\x00" + bytes([k + 1, len(chunks)]) + c)
        for k, c in enumerate(chunks)
    ]


def mpf() -> bytes:
    """A multi-picture index (naming no image: keeper goes by its signature alone)."""
    return seg(0xE2, b"MPF\x00MM\x00*\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00")


def iptc(rng: np.random.Generator) -> bytes:
    value = pick(rng, TEXTS).encode()
    record = b"\x1c\x02\x19" + struct.pack(">H", len(value)) + value
    record += b"\x00" * (len(record) % 2)
    irb = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(record))
    return seg(0xED, b"Photoshop 3.0\x00" + irb + record)


def adobe(mode_rgb: bool) -> bytes:
    return seg(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00" + (b"\x01" if mode_rgb else b"\x00"))


def comment(rng: np.random.Generator) -> bytes:
    return seg(0xFE, pick(rng, TEXTS).encode() + bytes(rng.integers(0, 256, 8, np.uint8)))


def other_app(rng: np.random.Generator) -> bytes:
    marker = pick(rng, [0xE3, 0xE4, 0xE9, 0xEC, 0xEF])
    return seg(
        marker, b"Maker\x00" + bytes(rng.integers(0, 256, int(rng.integers(0, 80)), np.uint8))
    )


# ---------------------------------------------------------------------------------------------
# random files


@dataclass
class Case:
    seed: int
    data: bytes
    desc: list[str]
    damage: str | None = None  # a refusal expected: the reason's words
    odd: bool = False  # keeper may refuse it or write it
    packet: Packet | None = None
    rating: int = 3
    label: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    overwrite: bool = False
    bad_choice: bool = False
    mode: int = 0o644
    xattrs: dict[str, bytes] = field(default_factory=dict)
    link: str | None = None  # "hard" or "sym"
    name: str = "IMG_0001.JPG"
    file_uri: bool = False  # given as file://...
    earlier: dict[str, Any] | None = None  # an earlier run's choice, written first

    def kw(self) -> dict[str, Any]:
        return {
            "rating": self.rating,
            "label": self.label,
            "keeper_fields": self.fields,
            "overwrite_ratings": self.overwrite,
        }

    def __str__(self) -> str:
        choice = {**self.kw(), "mode": oct(self.mode), "xattrs": self.xattrs, "link": self.link}
        fields = f"{choice!r:.600}"
        return (
            f"seed {self.seed}\n  "
            + "\n  ".join(self.desc)
            + f"\n  packet: {self.packet.what if self.packet else None}\n  choice: {fields}"
        )


def draw(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    desc: list[str] = []
    tables, rest = scans(rng, desc)
    rgb = desc[0].startswith("RGB")
    c = Case(seed, b"", desc)
    c.rating = int(rng.integers(-1, 6))
    c.label = pick(rng, [None, None, *LABELS])
    names = ["group", "rank", "decision", "reasons", "score_1", "x-y"]
    for name in names:
        if chance(rng, 0.4):
            c.fields[name] = pick(rng, ["g000123", "1", "keep", *TEXTS])
    c.overwrite = chance(rng, 0.25)

    meta: list[tuple[str, bytes]] = []
    if chance(rng, 0.6):
        meta.append(("JFIF", jfif()))
    if chance(rng, 0.15):
        meta.append(("JFXX", jfxx(rng)))
    if chance(rng, 0.6):
        thumb = chance(rng, 0.4)
        meta.append((f"EXIF{' + thumbnail' if thumb else ''}", exif(rng, thumb)))
    if chance(rng, 0.6):
        size = pick(rng, ["empty", "tiny", "small", "small", "small", "big", "full"])
        c.packet = xmp_packet(rng, size, c.rating)
        meta.append(("XMP", seg(0xE1, XMP_SIG + c.packet.data)))
    if chance(rng, 0.15):
        meta += [("extended XMP", s) for s in extended_xmp(rng)]
    if chance(rng, 0.4):
        meta += [("ICC", s) for s in icc(rng)]
    if chance(rng, 0.2):  # anywhere: before the XMP, its segment may not grow
        meta.insert(int(rng.integers(0, len(meta) + 1)), ("MPF", mpf()))
    if chance(rng, 0.4):
        meta.append(("IPTC", iptc(rng)))
    if chance(rng, 0.2):
        meta.append(("Adobe", adobe(rgb)))
    meta += [("COM", comment(rng)) for _ in range(int(rng.integers(0, 3)))]
    meta += [("APPn", other_app(rng)) for _ in range(int(rng.integers(0, 2)))]
    if chance(rng, 0.06):  # maker data enough to put what follows past keeper's first read
        big = [seg(0xEF, bytes([k]) * 0xFFFD) for k in range(int(rng.integers(3, 6)))]
        at = int(rng.integers(0, len(meta) + 1))
        meta[at:at] = [("APP15 64 KB", s) for s in big]
    if chance(rng, 0.3):
        order = rng.permutation(len(meta))
        meta = [meta[k] for k in order]
    # Some after the first tables, as some writers put them.
    cut = int(rng.integers(0, len(meta) + 1)) if chance(rng, 0.2) else len(meta)
    parts = [*meta[:cut], *(("table", t) for t in tables[:1]), *meta[cut:]]
    parts += [("table", t) for t in tables[1:]]
    out = bytearray(SOI)
    for name, s in parts:
        if chance(rng, 0.1):
            fill = int(rng.integers(1, 4))
            out += b"\xff" * fill
            name = f"{fill} fill + {name}"
        if name != "table":
            desc.append(f"{name} ({len(s)} B) at {len(out)}")
        out += s
    if chance(rng, 0.15) and rest.count(b"\xff\xda") > 1:  # a comment between scans
        at = rest.index(b"\xff\xda", 2)
        rest = rest[:at] + comment(rng) + rest[at:]
        desc.append("COM between scans")
    if chance(rng, 0.1):
        rest = rest[:-2] + b"\xff" * int(rng.integers(1, 3)) + EOI
        desc.append("fill before EOI")
    out += rest
    if chance(rng, 0.25):
        tail = (
            tiny_jpeg(rng, b"<x:xmpmeta/>")
            if chance(rng, 0.5)
            else bytes(rng.integers(0, 256, 50, np.uint8))
        )
        out += tail
        desc.append(f"{len(tail)} B after EOI")
    c.data = bytes(out)

    r = rng.random()
    if r < 0.22:
        hostile(rng, c)
    elif r < 0.3:
        odd(rng, c)
    if chance(rng, 0.04):
        c.bad_choice = True
        c.label = pick(rng, ["", "bad\x01label", "type=seq"])
        desc.append(f"a bad label {c.label!r}")
    c.mode = pick(rng, [0o644, 0o600, 0o640, 0o664])
    if chance(rng, 0.1):
        c.mode = pick(rng, [0o444, 0o400])
    if chance(rng, 0.4):
        for k in range(int(rng.integers(1, 3))):
            c.xattrs[f"user.keeper.t{k}"] = bytes(
                rng.integers(0, 256, int(rng.integers(0, 40)), np.uint8)
            )
    c.link = pick(rng, [None] * 12 + ["hard", "sym"])
    c.name = pick(rng, NAMES)
    c.file_uri = chance(rng, 0.2)
    if c.packet is not None and chance(rng, 0.3):  # keeper wrote into this file before
        c.earlier = c.kw() if chance(rng, 0.5) else {**c.kw(), "rating": (c.rating + 2) % 6}
        desc.append(f"keeper wrote it before: {c.earlier}")
    return c


def hostile(rng: np.random.Generator, c: Case) -> None:
    """Damage keeper must refuse (``c.damage``: the reason's words, or "" for any reason)."""
    data, lay = c.data, layout(c.data)
    kind = pick(
        rng, ["cut", "cut", "past", "short", "no scan", "junk", "not jpeg", "tiny", "two", "broken"]
    )
    if kind == "cut":
        at = int(rng.integers(4, lay.end))
        c.data, c.damage = data[:at], ""
    elif kind == "past" and lay.header:
        s = pick(rng, lay.header)
        n = len(data) - s.start - 2 + int(rng.integers(1, 100))
        if s.marker in BARE or n > 0xFFFF:
            return
        c.data, c.damage = data[: s.start + 2] + struct.pack(">H", n) + data[s.start + 4 :], ""
    elif kind == "short" and lay.header:
        s = pick(rng, lay.header)
        if s.marker in BARE:
            return
        n = int(rng.integers(0, 2))
        c.data = data[: s.start + 2] + struct.pack(">H", n) + data[s.start + 4 :]
        c.damage = "has length"
    elif kind == "no scan":
        c.data, c.damage = data[: lay.sos] + pick(rng, [EOI, b""]), ""
    elif kind == "junk":  # after a segment (before any fill bytes: after one, it is a marker)
        at = pick(rng, [2, *(s.end for s in lay.header)])
        junk = bytes([int(rng.integers(0, 255))])
        c.data, c.damage = data[:at] + junk + data[at:], "no JPEG segment marker"
    elif kind == "not jpeg":
        c.data, c.damage = pick(rng, [b"\x89PNG", b"II*\x00", b"\xff\xd9"]) + data[2:], "not a JPEG"
    elif kind == "tiny":
        c.data, c.damage = pick(rng, [b"", SOI, SOI + EOI, SOI + b"\xff"]), ""
    elif kind == "two":
        extra = seg(0xE1, XMP_SIG + xmp_packet(rng, "tiny", 3).data)
        extra *= 1 if c.packet is not None else 2
        at = pick(rng, [2, *(s.end for s in lay.header)])
        c.data, c.damage = data[:at] + extra + data[at:], "standard XMP segments"
    elif kind == "broken" and c.packet is not None and b"</rdf:RDF>" in c.packet.data:
        xmp = next(s for s in lay.header if is_xmp(data, s))
        unclosed = c.packet.data[: c.packet.data.index(b"</rdf:RDF>")]
        bad = pick(rng, [unclosed, b"not xml at all <", b"<x:xmpmeta"])
        c.data = data[: xmp.start] + seg(0xE1, XMP_SIG + bad) + data[xmp.end :]
        c.damage = ""
    else:
        return
    c.desc.append(f"damaged: {kind}")


def odd(rng: np.random.Generator, c: Case) -> None:
    """Structures keeper may accept or refuse; either way no silent damage."""
    data, lay = c.data, layout(c.data)
    kind = pick(rng, ["two SOIs", "bare marker", "near-miss signature", "XMP between scans"])
    if kind == "two SOIs":
        c.data = data[:2] + SOI + data[2:]
    elif kind == "bare marker":
        at = pick(rng, [2, *(s.end for s in lay.header)])
        c.data = data[:at] + pick(rng, [b"\xff\xd0", b"\xff\x01", b"\xff\xd7"]) + data[at:]
    elif kind == "near-miss signature":
        body = b"http://ns.adobe.com/xap/1.0/" + xmp_packet(rng, "tiny", 3).data
        c.data = data[:2] + seg(0xE1, body) + data[2:]
    else:
        at = data.find(b"\xff\xda", lay.sos + 2)
        if at < 0:
            return
        extra = seg(0xE1, XMP_SIG + xmp_packet(rng, "tiny", 3).data)
        c.data = data[:at] + extra + data[at:]
    c.odd = True
    c.desc.append(f"odd: {kind}")


# ---------------------------------------------------------------------------------------------
# readers the test trusts


def decoded(data: bytes) -> tuple[str, np.ndarray | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.mode, np.asarray(im)
        except (OSError, SyntaxError, ValueError) as e:
            return type(e).__name__, None  # (its message names the buffer's address)


def exiv2_view(data: bytes) -> dict[str, Any]:
    """What exiv2 reads of a whole JPEG: its XMP fields and the other metadata."""
    pyexiv2.set_log_level(4)  # a damaged maker note must not hide the rest
    try:
        img = pyexiv2.ImageData(data)
        try:
            return {
                "xmp": img.read_xmp(),
                "exif": img.read_exif(),
                "iptc": img.read_iptc(),
                "icc": img.read_icc(),
                "comment": img.read_comment(encoding="latin-1"),
            }
        finally:
            img.close()
    finally:
        pyexiv2.set_log_level(3)  # handback's level


def exiv2_fields(packet: bytes) -> dict[str, Any]:
    pyexiv2.set_log_level(4)
    try:
        img = pyexiv2.ImageData(packet)
        try:
            return dict(img.read_xmp())
        finally:
            img.close()
    finally:
        pyexiv2.set_log_level(3)


def rating_and_label(packet: bytes) -> tuple[str | None, str | None]:
    """xmp:Rating and xmp:Label by ElementTree: attributes of rdf:Description, or elements."""
    root = ET.fromstring(
        packet.strip(WS).split(b"?>", 1)[1]
        if packet.lstrip().startswith(b"<?xpacket")
        else packet.strip(WS)
    )
    out: dict[str, str | None] = {"Rating": None, "Label": None}
    for desc in root.iter(f"{{{NS['rdf']}}}Description"):
        for name in out:
            q = f"{{{NS['xmp']}}}{name}"
            if q in desc.attrib:
                out[name] = desc.attrib[q]
            for el in desc.iter(q):
                out[name] = el.text or ""
    return out["Rating"], out["Label"]


def same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def owns(old: dict[str, Any], key: str) -> bool:
    """handback.keeper_owns's docstring: whose is the value at ``key``."""
    now, record = old.get(key), old.get(RECORD)
    if isinstance(record, str) and "|" in record:
        rating, _, label = record.partition("|")
        text = now if isinstance(now, str) else ""
        return same_number(text, rating) if key == RATING else text == label
    if record is not None:
        return now is None
    return now is None or any(OWN.match(k) for k in old)


def expected_fields(old: dict[str, Any], c: Case) -> tuple[dict[str, Any], tuple[str, ...], bool]:
    """The merged packet's fields by handback's docstrings, what was kept, and whether the
    packet changes at all (a packet changing only in keeper's reasons does not)."""
    new = {k: v for k, v in old.items() if not OWN.match(k)}
    new.update({f"Xmp.keeper.{k}": v for k, v in c.fields.items()})
    record = old.get(RECORD)
    prior = record.split("|", 1) if isinstance(record, str) and "|" in record else None
    parts, kept = [], []
    for i, (key, value, name) in enumerate(
        ((RATING, str(c.rating), "rating"), (LABEL, c.label, "label"))
    ):
        if c.overwrite or owns(old, key):
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
            parts.append(value or "")
        else:
            kept.append(name)
            parts.append(prior[i] if prior is not None else "")
    new[RECORD] = "|".join(parts)

    def but(f: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in f.items() if k != REASONS}

    same = but(new) == but(old) and (REASONS in new) == (REASONS in old)
    return new, tuple(kept), not same


# ---------------------------------------------------------------------------------------------
# the property


def folder_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def setup_file(c: Case, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The photo keeper is given, and the file holding its bytes (its target, when a link)."""
    path = tmp_path / c.name
    path.write_bytes(c.data)
    if c.earlier is not None:
        with contextlib.suppress(KeeperError):  # refused: the file as it was
            write_jpeg_xmp(str(path), **c.earlier)
        c.data = path.read_bytes()
    real = path
    if c.link == "sym":
        real = tmp_path / "elsewhere.jpg"
        path.rename(real)
        path.symlink_to(real)
    elif c.link == "hard":
        os.link(path, tmp_path / "keepers-copy.jpg")
    for name, value in c.xattrs.items():
        os.setxattr(real, name, value)
    real.chmod(c.mode)
    os.utime(real, ns=(1_000_000_000, 1_000_000_000))
    return path, real, folder_names(tmp_path)


def uri(c: Case, path: Path) -> str:
    return f"file://{path}" if c.file_uri else str(path)


def check_refused(c: Case, path: Path, real: Path, names: list[str], e: KeeperError) -> None:
    assert isinstance(e, ConfigError) or uri(c, path) in str(e), f"{e}\n{c}"
    assert "left as it is" in str(e) or isinstance(e, ConfigError), f"{e}\n{c}"
    assert real.read_bytes() == c.data, f"a refused write changed the file\n{c}"
    assert real.stat().st_mtime_ns == 1_000_000_000, f"a refused write touched the file\n{c}"
    assert folder_names(path.parent) == names, f"a temporary file was left\n{c}"


def check_case(c: Case, tmp_path: Path) -> None:
    path, real, names = setup_file(c, tmp_path)
    error: KeeperError | None = None
    try:
        done = write_jpeg_xmp(uri(c, path), **c.kw())
    except (ConfigError, DataError) as e:
        error = e
    if error is not None:
        check_refused(c, path, real, names, error)
        if isinstance(error, ConfigError) or c.bad_choice:
            assert c.bad_choice, f"unexpected ConfigError {error}\n{c}"
            assert isinstance(error, ConfigError), f"a bad label read as {error}\n{c}"
            return
        if c.odd:
            return
        try:
            want = refusal(c)
        except Damaged:
            return  # any reason for damage the walk sees
        assert want is not None, f"refused: {error}\n{c}"
        assert not want or any(w in str(error) for w in want), f"refused for {error}: {want}\n{c}"
        return
    assert not c.bad_choice, f"a bad label was accepted\n{c}"
    try:
        want = None if c.odd else refusal(c)
    except Damaged as e:
        pytest.fail(f"wrote a damaged JPEG ({e})\n{c}")
    assert want is None, f"written, not refused for {want}\n{c}"
    check_written(c, path, real, names, done)


def refusal(c: Case) -> list[str] | None:
    """The reasons keeper may give for refusing ``c`` (None: it must write it, or find it
    unchanged); raises Damaged for a file whose walk fails."""
    if c.link == "sym":
        return ["a symlink"]
    if c.damage is not None:
        layout(c.data)  # damage the walk does not see must be refused for its own reason
        return [c.damage] if c.damage else []
    lay = layout(c.data)
    where = place(c.data, lay)
    if isinstance(where, str):
        return [where]
    old = unpadded(where.packet) if where.packet is not None else b""
    try:
        merged = merge_packet(
            old, KeeperXmp(c.rating, c.label, c.fields), source="x", overwrite_ratings=c.overwrite
        )
    except DataError:
        return ["XMP", "exiv2"]
    if merged.packet == old:
        return None
    reasons = []
    try:
        exiv2_view(c.data)
    except RuntimeError:  # exiv2 cannot read the file (ICC chunks out of order): the check fails
        reasons.append("not a file of type image/jpeg")
    if c.link == "hard":
        reasons.append("hard links")
    if not c.mode & stat.S_IWUSR:
        reasons.append("read-only")
    room = where.end - where.start - 4 - len(XMP_SIG)
    if len(merged.packet) > MAX_PACKET:
        reasons.append("more than a JPEG's XMP segment holds")
    elif where.mpf_before and not (where.packet is not None and len(merged.packet) <= room):
        reasons.append("comes after its multi-picture index")
    return reasons or None


def check_written(c: Case, path: Path, real: Path, names: list[str], done: Any) -> None:
    before, after = c.data, real.read_bytes()
    assert folder_names(path.parent) == names, f"a temporary file was left\n{c}"
    lay = layout(before)
    where = place(before, lay)
    assert isinstance(where, Place), str(c)
    old = unpadded(where.packet) if where.packet is not None else b""
    old_fields = exiv2_fields(old) if old else {}
    want_fields, want_kept, changes = expected_fields(old_fields, c)
    merged = merge_packet(
        old, KeeperXmp(c.rating, c.label, c.fields), source="x", overwrite_ratings=c.overwrite
    )
    assert done.changed == (merged.packet != old), f"{done}\n{c}"
    assert done.changed == changes or c.odd, f"changed {done.changed}, by the rules {changes}\n{c}"
    assert done.kept == merged.kept == want_kept, f"kept {done.kept}, not {want_kept}\n{c}"
    if not done.changed:
        assert (done.stamp, done.content_id) == (None, None), str(c)
        assert after == before, f"an unchanged packet rewrote the file\n{c}"
        assert real.stat().st_mtime_ns == 1_000_000_000, f"an unchanged file was touched\n{c}"
        return

    # The one segment, replaced or inserted; every other byte the original's, in order.
    assert after[: where.start] == before[: where.start], f"bytes before the XMP changed\n{c}"
    tail = len(before) - where.end
    assert after[len(after) - tail :] == before[where.end :], f"bytes after the XMP changed\n{c}"
    new = after[where.start : len(after) - tail]
    assert new[: 4 + len(XMP_SIG)] == b"\xff\xe1" + new[2:4] + XMP_SIG, f"{new[:40]!r}\n{c}"
    assert struct.unpack(">H", new[2:4])[0] == len(new) - 2, f"a wrong segment length\n{c}"
    body = new[4 + len(XMP_SIG) :]
    assert unpadded(body) == merged.packet, f"the segment does not hold the merged packet\n{c}"
    assert re.sub(rb"\s", b"", body) == re.sub(rb"\s", b"", merged.packet), f"padding\n{c}"
    room = where.end - where.start - 4 - len(XMP_SIG)
    if where.packet is not None and len(merged.packet) <= room:
        assert (len(body), len(after)) == (room, len(before)), f"not written in place\n{c}"
    else:
        want = len(merged.packet) + min(PADDING, MAX_PACKET - len(merged.packet))
        assert len(body) == want, f"a new segment of {len(body)} B, not {want}\n{c}"
    new_lay = layout(after)
    xmps = [s for s in new_lay.header if is_xmp(after, s)]
    assert [(s.start, s.end) for s in xmps] == [(where.start, where.start + len(new))], str(c)
    assert new_lay.end - len(after) == lay.end - len(before), f"the EOI moved\n{c}"

    # What readers see: keeper's values by the rules, everything else as before.
    got = exiv2_fields(body.strip(WS))
    assert got == exiv2_fields(merged.packet), str(c)
    if not c.odd:
        assert got == want_fields, f"fields {got}\n  not {want_fields}\n{c}"
    view = exiv2_view(after)
    assert view["xmp"] == got, f"exiv2 reads {view['xmp']} from the file\n{c}"
    try:
        was = exiv2_view(before)
    except RuntimeError:  # a bare TEM marker: exiv2 stops short of it once it found an XMP
        assert c.odd, str(c)
    else:
        del view["xmp"], was["xmp"]
        assert view == was, f"exiv2 reads other metadata\n{c}"
    rating, label = rating_and_label(body)
    assert (rating, label) == (got.get(RATING), got.get(LABEL)), str(c)
    assert decoded(after)[0] == decoded(before)[0], str(c)
    a, b = decoded(after)[1], decoded(before)[1]
    assert (a is None and b is None) or (
        a is not None and b is not None and np.array_equal(a, b)
    ), f"pixels changed\n{c}"
    if a is not None:
        with warnings.catch_warnings(action="ignore"), Image.open(io.BytesIO(after)) as im:
            assert im.info.get("xmp") == body, f"PIL reads another packet\n{c}"

    # The file: stamp, content id, mode, attributes; a re-run writes nothing.
    st = real.stat()
    assert done.stamp == (st.st_size, st.st_mtime_ns), str(c)
    assert done.content_id == content_digest(before) == content_digest(after), str(c)
    assert stat.S_IMODE(st.st_mode) == c.mode, f"mode {oct(st.st_mode)}\n{c}"
    assert {n: os.getxattr(real, n) for n in os.listxattr(real)} == c.xattrs, str(c)
    os.utime(real, ns=(2_000_000_000, 2_000_000_000))
    again = write_jpeg_xmp(uri(c, path), **c.kw())
    assert again == (False, done.kept, None, None), f"a re-run: {again}\n{c}"
    assert (real.read_bytes(), real.stat().st_mtime_ns) == (after, 2_000_000_000), str(c)
    assert folder_names(path.parent) == names, str(c)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_jpegs_change_their_xmp_segment_and_nothing_else(seed: int, tmp_path: Path) -> None:
    check_case(draw(seed), tmp_path)


def test_the_constants_are_the_documented_ones() -> None:
    assert (jpeg_xmp.MAX_PACKET, jpeg_xmp.PADDING) == (MAX_PACKET, PADDING) == (65504, 2048)


def test_embeds_into_goes_by_the_name_alone() -> None:
    """A JPEG by its name's last suffix, any case; the folder, scheme or file are not read."""
    rng = np.random.default_rng(0)
    for _ in range(20 * SEEDS):
        stem = pick(rng, ["IMG_1", "a.b", "photo.jpg", "x.jpeg", "日本"])
        ext = pick(
            rng,
            [".jpg", ".JPG", ".jpeg", ".JpEg", ".jpe", ".jfif", ".jpg.xmp", ".heic", ".jpg ", ""],
        )
        folder = pick(rng, ["", "/lib/", "file:///lib/", "s3://b/k/", "dir.jpg/"])
        uri = folder + stem + ext
        assert embeds_into(uri) == (PurePosixPath(uri).suffix.lower() in (".jpg", ".jpeg")), uri


# ---------------------------------------------------------------------------------------------
# a new file that fails a check


def writable(seed: int, value: str) -> Case:
    """A random case keeper must write (its new field ``run`` makes sure of that)."""
    for attempt in range(50):
        c = draw(10**6 + 50 * seed + attempt)
        c.mode, c.link, c.earlier, c.fields["run"] = 0o644, None, None, value
        if not c.odd and c.damage is None and not c.bad_choice and refusal(c) is None:
            return c
    raise AssertionError(f"no writable case in 50 draws from seed {seed}")


FAULTS = ["flip", "flip", "drop", "double", "move", "cut", "value", "meanwhile", "same size"]
FAULTS += ["fsync", "rename"]  # the disk fails: a StorageError


def corrupt(fault: str, new: bytes, rng: np.random.Generator, value: bytes) -> bytes:
    """``new`` (keeper's correct output) broken as a faulty splice would break it."""
    lay = layout(new)
    s = next(x for x in lay.header if is_xmp(new, x))
    segment = new[s.start : s.end]
    if fault == "flip":  # one byte outside the segment: a table, a scan, the bytes after EOI
        at = int(rng.integers(0, len(new) - (s.end - s.start)))
        at += (s.end - s.start) if at >= s.start else 0
        return new[:at] + bytes([new[at] ^ int(rng.integers(1, 256))]) + new[at + 1 :]
    if fault == "drop":
        return new[: s.start] + new[s.end :]
    if fault == "double":
        return new[: s.end] + segment + new[s.end :]
    if fault == "move":  # after the next segment (or before the one before)
        later = [x for x in lay.header if x.start >= s.end]
        if later:
            x = later[0]
            return new[: s.start] + new[s.end : x.end] + segment + new[x.end :]
        x = [x for x in lay.header if x.end <= s.start][-1]
        return new[: x.start] + segment + new[x.start : s.start] + new[s.end :]
    if fault == "cut":
        return new[: int(rng.integers(s.end, len(new)))]
    assert fault == "value"  # keeper's field written wrong
    return new[: s.start] + segment.replace(value, value.upper(), 1) + new[s.end :]


@pytest.mark.parametrize("seed", range(FAULT_SEEDS))
def test_a_new_file_failing_a_check_is_never_renamed(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_check`` stands between the new bytes and the rename: a new file that is not the
    original with the one segment replaced, or an original another program changed meanwhile,
    is refused, and the original stays (or keeps the other program's bytes); so it does when
    the fsync or the rename fails."""
    rng = np.random.default_rng(10**6 + seed)
    fault = pick(rng, FAULTS)
    value = f"run{seed:06d}x"
    c = writable(seed, value)
    c.desc.append(f"fault: {fault}")
    path, real, names = setup_file(c, tmp_path)
    theirs = c.data + b"theirs" if fault == "meanwhile" else c.data[:-1] + b"\x00"
    real_check = jpeg_xmp._check

    def checked(tmp: str, new: bytes, *args: Any) -> None:
        if fault in ("meanwhile", "same size"):  # a photo tool saves the file meanwhile
            real.write_bytes(theirs)
        else:
            new = corrupt(fault, new, rng, value.encode())
            Path(tmp).write_bytes(new)
        real_check(tmp, new, *args)

    def fail(*args: Any, **kw: Any) -> None:
        raise OSError(5, "Input/output error")

    if fault in ("fsync", "rename"):
        monkeypatch.setattr(os, "fsync" if fault == "fsync" else "replace", fail)
        with pytest.raises(StorageError, match="Input/output error"):
            write_jpeg_xmp(str(path), **c.kw())
        monkeypatch.undo()
        assert (real.read_bytes(), real.stat().st_mtime_ns) == (c.data, 1_000_000_000), str(c)
        assert folder_names(tmp_path) == names, f"a temporary file was left\n{c}"
        return
    monkeypatch.setattr(jpeg_xmp, "_check", checked)
    with pytest.raises(DataError, match="left as it is") as e:
        write_jpeg_xmp(str(path), **c.kw())
    if fault in ("meanwhile", "same size"):
        assert "changed since keeper read it" in str(e.value), str(c)
        assert real.read_bytes() == theirs, str(c)
    else:
        assert real.read_bytes() == c.data, f"{e.value}\n{c}"
        assert real.stat().st_mtime_ns == 1_000_000_000, str(c)
    assert folder_names(tmp_path) == names, f"a temporary file was left\n{c}"


@pytest.mark.parametrize(("name", "refused"), [("user.tag", True), ("security.selinux", False)])
def test_an_attribute_that_cannot_be_carried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, refused: bool
) -> None:
    """A user attribute the new file cannot take refuses the write; an SELinux label is left
    to the folder's default."""
    c = writable(0, "1")
    c.xattrs = {}
    path, real, names = setup_file(c, tmp_path)
    monkeypatch.setattr(os, "listxattr", lambda *a, **k: [name])
    monkeypatch.setattr(os, "getxattr", lambda *a, **k: b"v")

    def setxattr(*args: Any, **kw: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setxattr", setxattr)
    if refused:
        with pytest.raises(DataError, match=f"extended attribute {name} cannot be carried"):
            write_jpeg_xmp(str(path), **c.kw())
        assert real.read_bytes() == c.data
    else:
        assert write_jpeg_xmp(str(path), **c.kw()).changed
    assert folder_names(tmp_path) == names


@pytest.mark.parametrize("kind", ["folder", "fifo", "missing", "dangling symlink"])
def test_what_is_not_a_file_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    """Not a regular file: a DataError (a FIFO never opened, which would block); no file: a
    StorageError; nothing is created."""
    path = tmp_path / "IMG_0001.JPG"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "gone.jpg")
    names = folder_names(tmp_path)
    want = {"folder": "not a regular file", "fifo": "not a regular file", "missing": "cannot read"}
    with pytest.raises(StorageError if kind == "missing" else DataError) as e:
        write_jpeg_xmp(str(path), rating=3, label=None)
    assert want.get(kind, "a symlink") in str(e.value)
    assert folder_names(tmp_path) == names
