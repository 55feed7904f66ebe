"""The XMP packet a photo tool wrote into an image file itself, read without decoding pixels.

Lightroom Classic keeps a RAW's rating in an ``.xmp`` sidecar, but writes a JPEG's, TIFF's,
DNG's or HEIC's into the file; cameras that rate in camera write ``xmp:Rating`` there too.

    fields = read_embedded_xmp("photos/IMG_1.JPG")  # None: the file holds no packet
    fields and fields.get("Xmp.xmp.Rating")         # "4", as handback.read_sidecar gives it

Where the packet is, by the file's first bytes (never its name):

- JPEG: the APP1 segment headed ``http://ns.adobe.com/xap/1.0/\\0``, found by walking the
  segments up to the first scan (SOS); only segment headers are read on the way.
- TIFF, DNG (and other classic or Big TIFF files): tag 700 (XMLPacket) of IFD0, either byte
  order, every offset checked against the file.
- HEIF/HEIC: the XMP item (``application/rdf+xml``) through pillow-heif's ``info["xmp"]``, which
  parses the boxes and decodes no image; libheif takes the file whole, so only a file up to
  :data:`MAX_HEIF_BYTES` is read.
- Anything else (PNG, WebP, CR3, ...): not read; None.

The packet is parsed as a sidecar is (:func:`keeper_core.handback.parse_xmp_packet`). Reads
are ranged (``storage.read_head`` / ``read_range``, local or ``s3://``) and bounded: at most
:data:`MAX_PACKET_BYTES` of packet, and a JPEG's segments only within its first
:data:`MAX_JPEG_HEADER_BYTES`. A file whose structure cannot be followed (a truncated segment,
an offset past its end) or whose packet does not parse is a :class:`DataError` naming why.
Nothing here opens a file for writing.

:func:`content_digest` hashes a photo's bytes without a JPEG's metadata segments, so that what
keeper and photo tools write there (a rating) does not read as a new photo (:func:`file_ids`).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from collections.abc import Iterator
from typing import NamedTuple

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.handback import XmpValue, parse_xmp_packet

#: The most bytes of packet taken from a TIFF or HEIF (a JPEG's segment holds at most 65,502).
#: A DNG's packet with Lightroom's develop settings is tens to hundreds of KB.
MAX_PACKET_BYTES = 16 * 1024 * 1024
#: How far into a JPEG its segments are walked: EXIF, ICC and Photoshop segments before the
#: first scan come to well under 1 MB; past this the file is not one to trust.
MAX_JPEG_HEADER_BYTES = 16 * 1024 * 1024
#: The largest HEIF file read for its packet (libheif parses a file from memory, whole). An
#: iPhone's HEIC is 1-5 MB, a 48 MP one under 20 MB.
MAX_HEIF_BYTES = 64 * 1024 * 1024

_FIRST = 256 * 1024  # read at once: a JPEG's APP segments and a TIFF's IFD0 are almost always in it
#: What heads the body of a JPEG's standard XMP segment (APP1), before the packet.
JPEG_XMP_SIGNATURE = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_APP1, _JPEG_SOS, _JPEG_EOI = 0xE1, 0xDA, 0xD9
_JPEG_APP13, _JPEG_COM = 0xED, 0xFE
#: What heads an Extended XMP segment (APP1): the rest of a packet over 64 KB.
JPEG_EXTENDED_XMP_SIGNATURE = b"http://ns.adobe.com/xmp/extension/\x00"
_JPEG_BARE = frozenset((0x01, *range(0xD0, 0xD9)))  # markers without a length field (TEM, RSTn)
# A marker inside entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart
# marker (RST0-7) nor another 0xFF (a fill byte).
_JPEG_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MAX_JPEG_SEGMENTS = 4096
_MAX_IFD_ENTRIES = 4096  # a real IFD0 has a few dozen
_TAG_XMP = 700
_BYTE_TYPES = frozenset((1, 2, 6, 7))  # BYTE, ASCII, SBYTE, UNDEFINED: what tag 700 may be
_HEIF_BRANDS = frozenset(
    (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"mif2")
)


class _File:
    """Ranged reads of one file or object: its first :data:`_FIRST` bytes at once, the rest on
    demand; a read past the end is a DataError naming what was being read. Given ``data``, the
    file's whole bytes already read, nothing more is read."""

    def __init__(self, uri: str, data: bytes | None = None) -> None:
        self.uri = uri
        self.whole = data is not None
        self.head = data if data is not None else storage.read_head(uri, _FIRST)

    def at(self, offset: int, n: int, what: str) -> bytes:
        if offset < 0 or n < 0:
            raise DataError(f"{what}: a negative offset or size", source=self.uri)
        if offset + n <= len(self.head):
            return self.head[offset : offset + n]
        if self.whole or len(self.head) < _FIRST:  # the head is the whole file
            raise DataError(
                f"{what} ({n} bytes at byte {offset}) runs past the end of the "
                f"{len(self.head)}-byte file",
                source=self.uri,
            )
        try:
            return storage.read_range(self.uri, offset, n)
        except DataError as e:
            raise DataError(
                f"{what} ({n} bytes at byte {offset}) runs past the end of the file ({e})",
                source=self.uri,
            ) from e


def read_packet(uri: str) -> bytes | None:
    """The XMP packet embedded in an image file, as bytes; None when it holds none or is a
    format whose packet is not read here (see the module docstring).

    Raises:
        StorageError: the file cannot be read (missing, access denied), or is a HEIF larger
            than :data:`MAX_HEIF_BYTES`.
        DataError: its structure cannot be followed to the packet (truncated, an offset past
            its end, a packet over :data:`MAX_PACKET_BYTES`).
    """
    f = _File(uri)
    head = f.head
    if head[:2] == b"\xff\xd8":
        packet = _jpeg_packet(f)
    elif head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        packet = _tiff_packet(f)
    elif head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        packet = _heif_packet(uri)
    else:
        return None
    if packet is None:
        return None
    # Writers pad a packet for in-place edits, some with NULs; exiv2 wants "<" first.
    packet = packet.strip(b"\x00 \t\r\n")
    return packet or None


def read_embedded_xmp(uri: str) -> dict[str, XmpValue] | None:
    """Every XMP field of the packet embedded in an image file (``{"Xmp.xmp.Rating": "4",
    ...}``, as :func:`keeper_core.handback.read_sidecar` reads a sidecar); None when it holds
    no packet (:func:`read_packet`).

    Raises:
        StorageError: the file cannot be read.
        DataError: the packet cannot be found for a damaged structure, or does not parse.
    """
    packet = read_packet(uri)
    if packet is None:
        return None
    return parse_xmp_packet(packet, uri, what="an XMP packet")


def _jpeg_packet(f: _File) -> bytes | None:
    """The first standard XMP segment's packet, walking segment headers up to the first scan.

    Extended XMP (``http://ns.adobe.com/xmp/extension/``) is not joined: xmp:Rating and
    xmp:Label are always in the standard packet.
    """
    for seg in _jpeg_segments(f):
        if _is_xmp(f, seg):
            body = seg.start + 4 + len(JPEG_XMP_SIGNATURE)
            return f.at(body, seg.end - body, "the JPEG's XMP segment")
    return None


class JpegSegment(NamedTuple):
    """One marker segment of a JPEG's header, as :func:`jpeg_header` finds it."""

    marker: int  # the byte after 0xFF: 0xE1 for APP1, 0xDA for SOS
    start: int  # the offset of its 0xFF
    end: int  # the offset just past it; for SOS and EOI, just past the marker itself


class JpegHeader(NamedTuple):
    """A JPEG's segments up to its first scan (:func:`jpeg_header`)."""

    #: every segment after SOI in file order; the last is the first SOS (or an EOI before any)
    segments: list[JpegSegment]
    #: indices into ``segments`` of the standard XMP segments (APP1 ``http://ns.adobe.com/xap/...``)
    xmp: list[int]


def jpeg_header(data: bytes, uri: str) -> JpegHeader:
    """The segments of a whole JPEG (``data``, SOI first) up to its first scan, by the walk
    :func:`read_packet` makes.

    Raises:
        DataError: the segments cannot be followed (a damaged length, a segment past the end, no
            scan within :data:`MAX_JPEG_HEADER_BYTES`).
    """
    f = _File(uri, data)
    segments = list(_jpeg_segments(f))
    return JpegHeader(segments, [k for k, seg in enumerate(segments) if _is_xmp(f, seg)])


def _is_xmp(f: _File, seg: JpegSegment) -> bool:
    sig = len(JPEG_XMP_SIGNATURE)
    if seg.marker != _JPEG_APP1 or seg.end - seg.start - 4 < sig:
        return False
    return f.at(seg.start + 4, sig, "a JPEG APP1 segment") == JPEG_XMP_SIGNATURE


def _jpeg_segments(f: _File) -> Iterator[JpegSegment]:
    """Each segment after SOI, reading only the headers, through the first SOS or EOI."""
    i = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        if i > MAX_JPEG_HEADER_BYTES:
            break
        b = f.at(i, 2, "a JPEG segment marker")
        if b[0] != 0xFF:
            raise DataError(
                f"no JPEG segment marker at byte {i} (0x{b[0]:02x}): a damaged segment length",
                source=f.uri,
            )
        marker = b[1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker in (_JPEG_EOI, _JPEG_SOS):  # the metadata segments all come before
            yield JpegSegment(marker, i, i + 2)
            return
        if marker in _JPEG_BARE:
            yield JpegSegment(marker, i, i + 2)
            i += 2
            continue
        (length,) = struct.unpack(
            ">H", f.at(i + 2, 2, f"the length of JPEG segment 0x{marker:02x}")
        )
        if length < 2:
            raise DataError(f"JPEG segment at byte {i} has length {length}", source=f.uri)
        yield JpegSegment(marker, i, i + 2 + length)
        i += 2 + length
    raise DataError(
        f"no image data within the first {min(i, MAX_JPEG_HEADER_BYTES)} bytes "
        f"({_MAX_JPEG_SEGMENTS} segments at most are walked)",
        source=f.uri,
    )


def jpeg_image_end(data: bytes, sos: int, uri: str) -> int:
    """Just past the EOI that ends the JPEG in ``data`` whose first scan starts at ``sos``
    (:func:`jpeg_header`'s last segment): every scan's entropy-coded data and the segments
    between scans (a progressive JPEG's) walked to it. What follows (a multi-picture file's
    other images, a phone's trailer) is not read.

    Raises:
        DataError: the file ends before its EOI (truncated), or a segment there is damaged.
    """
    i = sos
    while i + 2 <= len(data):
        if data[i] != 0xFF:
            raise DataError(f"no JPEG marker at byte {i}, after a scan", source=uri)
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker == _JPEG_EOI:
            return i + 2
        if marker in _JPEG_BARE:
            i += 2
            continue
        if i + 4 > len(data):
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            raise DataError(f"JPEG segment at byte {i} has length {length}", source=uri)
        i += 2 + length
        if marker == _JPEG_SOS:  # its entropy-coded data runs up to the next marker
            m = _JPEG_SCAN_MARKER.search(data, i)
            if m is None:
                break
            i = m.start()
    raise DataError(
        f"cut short: its image data ends at byte {len(data)} without an end-of-image marker "
        "(a truncated JPEG)",
        source=uri,
    )


def _tiff_packet(f: _File) -> bytes | None:
    """IFD0's tag 700, classic TIFF or BigTIFF, either byte order."""
    order = "<" if f.head[:2] == b"II" else ">"
    (magic,) = struct.unpack(order + "H", f.at(2, 2, "the TIFF header"))
    if magic == 42:
        (ifd0,) = struct.unpack(order + "I", f.at(4, 4, "the TIFF header"))
        count_fmt, entry_fmt, inline, header = "H", "HHII", 4, 8
    else:  # 43: BigTIFF
        size, zero, ifd0 = struct.unpack(order + "HHQ", f.at(4, 12, "the BigTIFF header"))
        if (size, zero) != (8, 0):
            raise DataError(f"a BigTIFF header with offset size {size}", source=f.uri)
        count_fmt, entry_fmt, inline, header = "Q", "HHQQ", 8, 16
    if ifd0 < header:
        raise DataError(f"IFD0 at byte {ifd0}, inside the header", source=f.uri)
    count_size = struct.calcsize(order + count_fmt)
    (count,) = struct.unpack(order + count_fmt, f.at(ifd0, count_size, "IFD0's entry count"))
    if count > _MAX_IFD_ENTRIES:
        raise DataError(f"IFD0 at byte {ifd0} claims {count} entries", source=f.uri)
    entry_size = struct.calcsize(order + entry_fmt)
    entries = f.at(ifd0 + count_size, count * entry_size, f"IFD0's {count} entries")
    for k in range(count):
        tag, kind, n, value = struct.unpack_from(order + entry_fmt, entries, k * entry_size)
        if tag != _TAG_XMP:
            continue
        if kind not in _BYTE_TYPES:
            raise DataError(f"the XMP tag (700) is of TIFF type {kind}, not bytes", source=f.uri)
        if n > MAX_PACKET_BYTES:
            raise DataError(
                f"an XMP packet of {n} bytes (more than {MAX_PACKET_BYTES} are not read)",
                source=f.uri,
            )
        if n <= inline:  # the value itself, in the entry's last field
            start = k * entry_size + entry_size - inline
            return entries[start : start + n]
        return f.at(value, n, "the XMP packet (tag 700)")
    return None


def _heif_packet(uri: str) -> bytes | None:
    try:
        data = storage.read_bytes(uri, max_bytes=MAX_HEIF_BYTES)
    except storage.TooLargeError as e:
        raise StorageError(uri, f"a HEIF file too large to read for its XMP: {e.cause}") from e
    import pillow_heif  # here: it costs ~40 ms to load, paid only by HEIF files

    try:
        # parses the boxes, decodes nothing; ``info`` of a file listing no image: IndexError
        packet = pillow_heif.open_heif(io.BytesIO(data)).info.get("xmp")
    except (ValueError, SyntaxError, RuntimeError, EOFError, OSError, IndexError) as e:
        raise DataError(f"a HEIF file libheif cannot parse: {e}", source=uri) from e
    if packet is not None and len(packet) > MAX_PACKET_BYTES:
        raise DataError(f"an XMP packet of {len(packet)} bytes", source=uri)
    return bytes(packet) if packet else None


def file_ids(data: bytes, uri: str = "") -> tuple[str, str]:
    """A file's ``image_id`` (sha256 of its bytes) and ``content_id`` (the same, a JPEG's
    without its metadata segments: :func:`content_digest`): what ``keeper embed`` records of
    each file, and ``/v1/pick`` of each request image."""
    image_id = hashlib.sha256(data).hexdigest()
    return image_id, content_digest(data, uri) if data[:2] == b"\xff\xd8" else image_id


def content_digest(data: bytes, uri: str = "") -> str:
    """sha256 (hex) of a photo's bytes, a JPEG's without its metadata that no decoder reads.

    Left out of a JPEG: its XMP segments (standard and extended: ratings, labels, keywords,
    keeper's own fields), Photoshop's APP13 (IPTC captions and credits) and comments; what
    photo tools rewrite when they save metadata into the file. Everything a decoder reads
    stays in, EXIF (its orientation turns the picture) and the ICC profile (its colours)
    included. Any other format, and a JPEG whose segments cannot be followed, is hashed
    whole: such a file saved with new metadata reads as changed, at the cost of one more
    embedding.
    """
    if data[:2] != b"\xff\xd8":
        return hashlib.sha256(data).hexdigest()
    try:
        header = jpeg_header(data, uri)
    except DataError:
        return hashlib.sha256(data).hexdigest()
    f = _File(uri, data)
    h = hashlib.sha256()
    view = memoryview(data)
    at = 0
    for seg in header.segments:
        if _is_metadata(f, seg):
            h.update(view[at : seg.start])
            at = seg.end
    h.update(view[at:])
    return h.hexdigest()


def _is_metadata(f: _File, seg: JpegSegment) -> bool:
    if seg.marker in (_JPEG_APP13, _JPEG_COM):
        return True
    if seg.marker != _JPEG_APP1:
        return False
    if _is_xmp(f, seg):
        return True
    n = len(JPEG_EXTENDED_XMP_SIGNATURE)
    return (
        seg.end - seg.start - 4 >= n
        and f.at(seg.start + 4, n, "a JPEG APP1 segment") == JPEG_EXTENDED_XMP_SIGNATURE
    )
