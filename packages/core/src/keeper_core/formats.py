"""Photo formats beyond PIL's own: camera RAW files (their embedded preview) and HEIC/HEIF.

keeper never develops a RAW file: it decodes the JPEG preview the camera embedded in it (a
full-size or ~1-2 MP JPEG rendered with the camera's own settings), read by libraw (rawpy)
from the bytes in memory. The RAW itself is never written. :func:`extract_raw_preview` hands
the preview's bytes and the RAW's orientation to ``keeper_core.images``, whose safe decoder
then checks and decodes them like any JPEG. HEIC/HEIF decode through pillow-heif's PIL plugin,
registered on first use by :func:`register_heif` (never at import: it costs ~40 ms, rawpy
~70 ms, and a process that never meets such a file should not pay it).

Which bytes are a RAW (:func:`raw_format`):

- by magic: CR2 (a TIFF header with "CR" at offset 8), CR3 (ISO-BMFF ``ftyp`` brand "crx "),
  ORF ("IIRO", "IIRS", "MMOR"), RW2 ("IIU\\0"), RAF ("FUJIFILMCCD-RAW");
- TIFF-based (DNG, NEF, NRW, ARW, PEF, SRW): IFD0 has DNGVersion (tag 0xC612), or its Make
  starts with a RAW camera maker's name AND IFD0 looks like a RAW container: SubIFDs (0x014A),
  a reduced-resolution NewSubfileType (IFD0 is the preview), a CFA or LinearRaw
  PhotometricInterpretation (IFD0 is the raw data), or DNGPrivateData (0xC634, where Sony,
  Pentax and Samsung point to their maker data). The Make alone is not enough: a TIFF that
  Lightroom or a camera exported keeps the camera's Make, and it is an ordinary TIFF.

The preview libraw extracts is its pick of the largest embedded image (measured: a 192x128
RGB thumbnail wins over a 96x64 JPEG preview, and then the file is refused, below). A JPEG preview comes back as stored; when the
stored JPEG does not begin with its own Exif segment, libraw puts one in front carrying the
RAW's orientation (and a 1970 DateTime: read capture times from the RAW, never the preview).
An uncompressed (bitmap) preview is refused, never read: rawpy wraps libraw's buffer in an
array shaped (height, width, 3) without checking its length, and a grey or damaged bitmap is
then read past its end (a segfault on a fuzzed DNG here; NegPy's pull request #868 found the
same on Coolscan DNGs). A JPEG preview is copied with its exact length.

The preview's colour space. A camera set to Adobe RGB renders its preview in Adobe RGB, and the
JPEG it embeds often carries no EXIF or profile of its own (libraw's Exif segment in front of
such a preview holds the orientation, no colour space): the RAW's own metadata says so, and
:func:`raw_color_space` reads it from the file's TIFF structure (DCF's ColorSpace 0xFFFF +
"R03", or Nikon's and Canon's maker-note ColorSpace; a DNG's PreviewColorSpace).
``keeper_core.color`` applies it to a preview that names no colour space itself. CR3 and RAF
(not TIFF-structured) name none here.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass

from keeper_core.errors import ImageDecodeError

__all__ = [
    "IMAGE_SUFFIXES",
    "RAW_SUFFIXES",
    "RawPreview",
    "extract_raw_preview",
    "raw_color_space",
    "raw_format",
    "register_heif",
]

#: Camera RAW file name extensions keeper lists as images (lower case, with the dot).
RAW_SUFFIXES = (
    ".cr2",
    ".cr3",
    ".nef",
    ".nrw",
    ".arw",
    ".dng",
    ".orf",
    ".rw2",
    ".raf",
    ".pef",
    ".srw",
)
#: Every file name extension keeper lists as an image (lower case, with the dot).
IMAGE_SUFFIXES = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".hif",
    ".avif",
    *RAW_SUFFIXES,
)

# Makes (lower-case prefixes of IFD0 Make) whose TIFF-based files may be RAW containers.
_RAW_MAKERS = (
    "canon",
    "nikon",
    "sony",
    "pentax",
    "ricoh",
    "asahi",
    "samsung",
    "olympus",
    "om digital",
    "panasonic",
    "leica",
    "fujifilm",
    "hasselblad",
    "phase one",
    "leaf",
    "mamiya",
    "kodak",
    "eastman kodak",
    "sigma",
    "minolta",
    "konica minolta",
    "epson",
    "seiko epson",
)
# For messages only: the extension a TIFF-based RAW of this maker usually has.
_MAKER_FORMAT = {"nikon": "NEF", "sony": "ARW", "pentax": "PEF", "ricoh": "PEF", "samsung": "SRW"}
_TAG_SUBFILE, _TAG_PHOTOMETRIC, _TAG_MAKE, _TAG_SUBIFDS = 0x00FE, 0x0106, 0x010F, 0x014A
_TAG_DNG_VERSION, _TAG_DNG_PRIVATE = 0xC612, 0xC634
_TAG_EXIF_IFD, _TAG_MAKER_NOTE, _TAG_PREVIEW_COLOR_SPACE = 0x8769, 0x927C, 0xC71A
_TAG_COLOR_SPACE, _TAG_INTEROP_IFD, _TAG_INTEROP_INDEX = 0xA001, 0xA005, 0x0001
_EXIF_SRGB, _EXIF_UNCALIBRATED = 1, 0xFFFF
# DNG PreviewColorSpace -> the name keeper_core.color converts from (1, grey gamma 2.2, is a
# greyscale preview's: nothing to convert).
_DNG_PREVIEW_SPACES = {2: "sRGB", 3: "Adobe RGB", 4: "ProPhoto RGB"}
# The ColorSpace tags of Nikon's (type 3) and Canon's maker notes: 1 sRGB, 2 Adobe RGB.
_NIKON_COLOR_SPACE, _CANON_COLOR_SPACE = 0x001E, 0x00B4
_MAKER_SPACES = {1: "sRGB", 2: "Adobe RGB"}
_NIKON_NOTE = b"Nikon\x00\x02"  # then 2 version bytes, 2 zero bytes, a TIFF header of its own
# A DNG's SubIFDs: the raw image and a preview or two; more is not a file worth reading on.
_MAX_SUBIFDS = 16
_PHOTOMETRIC_RAW = frozenset((32803, 34892))  # CFA, LinearRaw
# IFD0 of a real file has a few dozen entries; more is not a TIFF worth parsing further.
_MAX_IFD_ENTRIES = 1024
_MAX_MAKE_BYTES = 64
# Where the preview's bytes are looked for in the file: this many leading bytes, at most this
# many places (a preview's tables often repeat in a smaller thumbnail's).
_NEEDLE, _MAX_MATCHES = 64, 16
# libraw's sizes.flip (dcraw's bits: 1 mirror, 2 flip, 4 transpose) -> EXIF orientation;
# the same table libraw uses for the Exif block it writes in front of a preview.
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}


@dataclass(frozen=True)
class RawPreview:
    """The image keeper decodes for a camera RAW file: its embedded preview.

    Attributes:
        data: the camera's JPEG preview as stored (or with libraw's Exif segment in front).
        orientation: the RAW's EXIF orientation 1..8 (from libraw's ``sizes.flip``). It
            applies when the preview has no orientation of its own.
        format: the RAW's kind, as :func:`raw_format` names it ("DNG", "CR3", ...).
        color_space: the colour space the RAW's own metadata names for the pictures the
            camera rendered (:func:`raw_color_space`): "sRGB", "Adobe RGB", "ProPhoto RGB"
            (DNG only), or None when it names none. It applies when the preview names none
            of its own (``keeper_core.color``).
    """

    data: bytes
    orientation: int
    format: str
    color_space: str | None = None


_Tags = dict[int, tuple[int, int, int]]  # tag -> (type, count, file offset of the value)


def _order(data: bytes) -> str | None:
    """The struct byte order of a TIFF-structured file ("II" / "MM"), or None."""
    return {b"II": "<", b"MM": ">"}.get(bytes(data[:2]))


def _ifd0(data: bytes) -> _Tags | None:
    """IFD0 of a classic TIFF: tag -> (type, count, offset of the value), or None if unreadable."""
    order = _order(data)
    if order is None or len(data) < 8:
        return None
    (at,) = struct.unpack_from(order + "I", data, 4)
    return _ifd(data, at, order)


def _ifd(data: bytes, at: int, order: str, base: int = 0) -> _Tags | None:
    """The IFD at file offset ``at``, or None when it does not fit in ``data``.

    ``base``: what the IFD's value offsets count from (0, the file's TIFF header; a Nikon
    maker note's own header for its IFD).
    """
    if at < 8 or at + 2 > len(data):
        return None
    (n,) = struct.unpack_from(order + "H", data, at)
    if n == 0 or n > _MAX_IFD_ENTRIES or at + 2 + 12 * n > len(data):
        return None
    size = {1: 1, 2: 1, 3: 2, 4: 4, 7: 1, 8: 2, 9: 4, 13: 4}  # byte, ascii, short, long, ...
    tags = {}
    for i in range(n):
        entry = at + 2 + 12 * i
        tag, kind, count = struct.unpack_from(order + "HHI", data, entry)
        inline = size.get(kind, 8) * count <= 4
        value_at = (
            entry + 8 if inline else base + struct.unpack_from(order + "I", data, entry + 8)[0]
        )
        tags[tag] = (kind, count, value_at)
    return tags


def _tag_int(data: bytes, tags: _Tags, tag: int, order: str, index: int = 0) -> int | None:
    """The ``index``-th value of a SHORT, LONG or IFD tag, or None (absent, another type, cut)."""
    kind, count, at = tags.get(tag, (0, 0, 0))
    code = {3: "H", 4: "I", 13: "I"}.get(kind)
    if code is None or not 0 <= index < count:
        return None
    at += index * struct.calcsize(code)
    if at + struct.calcsize(code) > len(data):
        return None
    return int(struct.unpack_from(order + code, data, at)[0])


def _ifd0_int(data: bytes, tags: _Tags, tag: int) -> int | None:
    order = _order(data)
    return None if order is None else _tag_int(data, tags, tag, order)


def _ifd0_make(data: bytes, tags: _Tags) -> str:
    kind, count, at = tags.get(_TAG_MAKE, (0, 0, 0))
    if kind != 2 or count < 1:
        return ""
    raw = data[at : at + min(count, _MAX_MAKE_BYTES)]
    return raw.split(b"\x00", 1)[0].decode("latin-1").strip()


def _tiff_raw_format(data: bytes) -> str | None:
    tags = _ifd0(data)
    if tags is None:
        return None
    if _TAG_DNG_VERSION in tags:
        return "DNG"
    make = _ifd0_make(data, tags).lower()
    maker = next((m for m in _RAW_MAKERS if make.startswith(m)), None)
    if maker is None:
        return None
    subfile = _ifd0_int(data, tags, _TAG_SUBFILE) or 0
    container = (
        _TAG_SUBIFDS in tags
        or _TAG_DNG_PRIVATE in tags
        or subfile & 1  # IFD0 is a reduced-resolution copy: the full image lies elsewhere
        or _ifd0_int(data, tags, _TAG_PHOTOMETRIC) in _PHOTOMETRIC_RAW
    )
    return _MAKER_FORMAT.get(maker.split()[0], "RAW") if container else None


def raw_format(data: bytes) -> str | None:
    """Name the camera RAW format of ``data``, or None when it is not one (see module doc).

    Looks at the magic bytes and, for TIFF-based files, at IFD0 (its entries and Make),
    wherever in ``data`` IFD0 lies; a head of the file that ends before it reads as None.

    Args:
        data: the file's bytes (or a head of them).

    Returns:
        "CR2", "CR3", "ORF", "RW2", "RAF", "DNG", "NEF", "ARW", "PEF", "SRW", "RAW" (another
        maker's TIFF-based RAW), or None.
    """
    head = bytes(data[:16])
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        if head[8:10] == b"CR":
            return "CR2"
        return _tiff_raw_format(bytes(data))
    if head[4:12] == b"ftypcrx ":
        return "CR3"
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR"):
        return "ORF"
    if head[:4] == b"IIU\x00":
        return "RW2"
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "RAF"
    return None


def extract_raw_preview(data: bytes, *, source: str | None = None) -> RawPreview:
    """Extract the largest embedded preview of a camera RAW file, with the RAW's orientation.

    libraw parses the container from the bytes in memory (no copy, nothing written) and
    copies the preview out; the raw sensor data is neither unpacked nor developed. No limit is
    checked here: ``keeper_core.images`` checks the RAW's size before and the preview's after.

    Args:
        data: the RAW file's bytes.
        source: where the bytes came from (a URI); carried into errors.

    Returns:
        The preview's JPEG bytes and the RAW's orientation.

    Raises:
        ImageDecodeError: "truncated" when the preview's bytes are not all in the file (cut
            short: libraw would hand over uninitialised memory in their place) or libraw gives
            up on a damaged file; "unsupported" when rawpy is missing, libraw does not read
            this file (damaged, or a camera newer than libraw), the file has no embedded JPEG
            preview (none, or only an uncompressed one), or the preview is in a format libraw
            cannot extract (libraw says so too for a preview starting past the end of the
            file); "too_many_pixels" when libraw refuses the sizes.
    """
    try:
        import rawpy
    except ImportError as e:  # a dependency of keeper-core, but say so rather than crash
        raise ImageDecodeError(
            "unsupported", f"no RAW decoder installed (rawpy): {e}", source=source
        ) from e
    kind = raw_format(data) or "RAW"
    data = bytes(data)  # a no-op for bytes; BytesIO then shares them and read() returns them
    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            flip = raw.sizes.flip
            thumb = raw.extract_thumb()
    except rawpy.LibRawNoThumbnailError as e:
        raise ImageDecodeError(
            "unsupported",
            f"{kind} file without an embedded preview (or cut short before it)",
            source=source,
        ) from e
    # rawpy raises NotImplementedError itself for a thumbnail format it has no branch for.
    except (rawpy.LibRawUnsupportedThumbnailError, NotImplementedError) as e:
        raise ImageDecodeError(
            "unsupported",
            f"{kind} preview libraw cannot extract (a preview format it does not know, or "
            f"one cut off by the end of the file): {e!s}",
            source=source,
        ) from e
    except rawpy.LibRawFileUnsupportedError as e:
        version = ".".join(map(str, rawpy.libraw_version))
        raise ImageDecodeError(
            "unsupported",
            f"libraw {version} cannot read this {kind} file (damaged, or a camera newer "
            f"than this libraw): {e!s}",
            source=source,
        ) from e
    except (
        rawpy.LibRawTooBigError,
        rawpy.LibRawUnsufficientMemoryError,
        rawpy.LibRawMemPoolOverflowError,
    ) as e:
        raise ImageDecodeError("too_many_pixels", f"{kind}: libraw: {e!s}", source=source) from e
    except (rawpy.LibRawError, OSError) as e:  # OSError: a positive (errno) libraw code
        # The calls above always come in this order, so even "out of order call" (measured on
        # damaged DNGs) means libraw gave up on the data.
        raise ImageDecodeError(
            "truncated", f"{kind}: libraw: {type(e).__name__}: {e!s}", source=source
        ) from e
    if thumb.format != rawpy.ThumbFormat.JPEG:
        # rawpy shapes a bitmap preview (height, width, 3) over libraw's buffer without its
        # length: a grey or damaged one is read past its end (a segfault, measured). Never read.
        raise ImageDecodeError(
            "unsupported",
            f"{kind} file without an embedded JPEG preview (its largest is an uncompressed "
            "bitmap, which rawpy cannot hand over safely)",
            source=source,
        )
    jpeg = bytes(thumb.data)
    if not _stored_in(data, jpeg):
        raise ImageDecodeError(
            "truncated", f"{kind} preview runs past the end of the file", source=source
        )
    return RawPreview(
        data=jpeg,
        orientation=_FLIP_TO_ORIENTATION.get(flip, 1),
        format=kind,
        color_space=raw_color_space(data),
    )


def raw_color_space(data: bytes) -> str | None:
    """The colour space a TIFF-structured RAW's own metadata names for its rendered pictures.

    What a camera set to Adobe RGB writes (its JPEG preview often carries no EXIF or profile
    of its own), read from the file's TIFF structure in place: IFD0, the Exif IFD and what they
    point to, each entry bounds-checked. Nothing else of the file is parsed.

    - DNG: PreviewColorSpace (0xC71A) of IFD0 or its SubIFDs, the one tag the DNG spec gives
      a preview's colour space (2 sRGB, 3 Adobe RGB, 4 ProPhoto RGB; none means sRGB). The
      Exif ColorSpace of a DNG describes the camera's setting, not the preview a converter
      rendered, so it is not read.
    - Other TIFF-based RAWs (CR2, NEF, ARW, PEF, SRW, ORF, RW2): the Exif IFD's ColorSpace, as
      DCF cameras write it: 1 is sRGB, 0xFFFF ("uncalibrated") with the Interoperability IFD's
      index "R03" Adobe RGB ("R98": sRGB). When it names neither, the maker note's own
      ColorSpace (1 sRGB, 2 Adobe RGB): Nikon's (tag 0x1E of its type-3 note; NEFs often leave
      the Exif tag out or "uncalibrated") and Canon's (tag 0xB4).

    Args:
        data: the RAW file's bytes.

    Returns:
        "sRGB", "Adobe RGB", "ProPhoto RGB", or None: not TIFF-structured (CR3, RAF), no such
        tag, an unknown value, or an offset outside the file (malformed: no information).
    """
    data = bytes(data)
    try:
        return _raw_color_space(data)
    except struct.error:  # every read is bounds-checked first; a malformed file says nothing
        return None


def _raw_color_space(data: bytes) -> str | None:
    order, ifd0 = _order(data), _ifd0(data)
    if order is None or ifd0 is None:
        return None
    if _TAG_DNG_VERSION in ifd0:
        return _dng_preview_space(data, ifd0, order)
    exif = _pointed_ifd(data, ifd0, _TAG_EXIF_IFD, order)
    if exif is None:
        return None
    space = _tag_int(data, exif, _TAG_COLOR_SPACE, order)
    if space == _EXIF_SRGB:
        return "sRGB"
    if space == _EXIF_UNCALIBRATED:
        interop = _pointed_ifd(data, exif, _TAG_INTEROP_IFD, order)
        index = None if interop is None else _tag_text(data, interop, _TAG_INTEROP_INDEX)
        if index in ("R03", "R98"):
            return "Adobe RGB" if index == "R03" else "sRGB"
    return _maker_note_space(data, exif, order, _ifd0_make(data, ifd0).lower())


def _pointed_ifd(data: bytes, tags: _Tags, tag: int, order: str, index: int = 0) -> _Tags | None:
    at = _tag_int(data, tags, tag, order, index)
    return None if at is None else _ifd(data, at, order)


def _tag_text(data: bytes, tags: _Tags, tag: int) -> str | None:
    """A short ASCII (or UNDEFINED) tag's text, NULs and spaces stripped; None if absent."""
    kind, count, at = tags.get(tag, (0, 0, 0))
    if kind not in (2, 7) or not 0 < count <= _MAX_MAKE_BYTES or at + count > len(data):
        return None
    return data[at : at + count].decode("latin-1").strip("\x00 ")


def _dng_preview_space(data: bytes, ifd0: _Tags, order: str) -> str | None:
    """PreviewColorSpace of a DNG's IFD0 and SubIFDs, when those that have one agree."""
    _, count, _ = ifd0.get(_TAG_SUBIFDS, (0, 0, 0))
    ifds = [ifd0]
    for i in range(min(count, _MAX_SUBIFDS)):
        sub = _pointed_ifd(data, ifd0, _TAG_SUBIFDS, order, i)
        if sub is not None:
            ifds.append(sub)
    values = (_tag_int(data, ifd, _TAG_PREVIEW_COLOR_SPACE, order) for ifd in ifds)
    found = {v for v in values if v is not None}
    return _DNG_PREVIEW_SPACES.get(found.pop()) if len(found) == 1 else None


def _maker_note_space(data: bytes, exif: _Tags, order: str, make: str) -> str | None:
    """The ColorSpace of a Nikon (type 3) or Canon maker note, or None."""
    _, count, at = exif.get(_TAG_MAKER_NOTE, (0, 0, 0))
    if count < 14 or at + count > len(data):  # 14: an IFD of one entry
        return None
    if data[at : at + len(_NIKON_NOTE)] == _NIKON_NOTE:
        base = at + 10  # the note's own TIFF header: its byte order, its IFD, offsets from it
        note_order = _order(data[base : base + 2])
        if note_order is None:
            return None
        (first,) = struct.unpack_from(note_order + "I", data, base + 4)
        note = _ifd(data, base + first, note_order, base)
        tag = _NIKON_COLOR_SPACE
    elif make.startswith("canon"):  # an IFD right at the note's start, in the file's order
        note, note_order, tag = _ifd(data, at, order), order, _CANON_COLOR_SPACE
    else:
        return None
    value = None if note is None else _tag_int(data, note, tag, note_order)
    return None if value is None else _MAKER_SPACES.get(value)


def _stored_in(data: bytes, jpeg: bytes) -> bool:
    """Whether the preview's JPEG stream lies in the file byte for byte.

    libraw copies a JPEG preview's declared length from the file into a buffer it does not
    clear: a preview cut off by the end of the file comes back with uninitialised memory as its
    tail (measured: now and then it even decodes). Every format keeper lists stores its JPEG
    previews contiguously, so the stream after SOI and the first APP1 segment (libraw's Exif
    in front, or the camera's own) must be found in the file as it is.
    """
    at = 2
    if jpeg[2:4] == b"\xff\xe1" and len(jpeg) >= 6:
        at = 4 + struct.unpack_from(">H", jpeg, 4)[0]
    body = jpeg[at:]
    if not body:
        return False
    needle, view, start = body[:_NEEDLE], memoryview(data), 0
    for _ in range(_MAX_MATCHES):
        found = data.find(needle, start)
        if found < 0:
            return False
        if view[found : found + len(body)] == body:
            return True
        start = found + 1
    return False


@functools.cache
def register_heif() -> bool:
    """Register pillow-heif's HEIF opener with PIL, once per process (idempotent, lazy).

    pillow-heif's global options are left as they are. Its decoder applies the HEIF
    transforms (``irot``/``imir``/``clap``) itself, reports the displayed size, and resets
    the EXIF Orientation it hands to PIL to 1 (keeping the original in
    ``info["original_orientation"]``), so PIL's EXIF transpose does not rotate a second time.

    Returns:
        True when a HEIF opener is registered, False when pillow-heif is not installed.
    """
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True
