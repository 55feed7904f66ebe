"""Camera and phone files built in code for tests: a minimal DNG that libraw opens, and HEIC.

``make_dng`` writes a little-endian TIFF by hand (no binary fixtures, no imagecodecs), the way
cameras and Adobe DNG Converter lay a DNG out: the IFDs first, then the pixel data.

- IFD0: the preview (NewSubfileType 1), one JPEG strip (Compression 7, YCbCr) or, with
  ``preview_format="RGB"``, an uncompressed 8-bit RGB strip (keeper refuses those: see
  ``keeper_core.formats``); Make, Model, UniqueCameraModel, Orientation, DNGVersion 1.4,
  ColorMatrix1 (libraw opens the file without it; a converter needs it to develop one), an
  Exif IFD with DateTimeOriginal / SubSecTimeOriginal / OffsetTimeOriginal when given, and
  SubIFDs pointing at the raw image.
- SubIFD: the raw image (NewSubfileType 0): 64x64 16-bit Bayer CFA (RGGB), uncompressed.
  Under 22 pixels a side libraw refuses the file as "not RAW" (measured: 20 fails, 22 opens).
- With ``thumbnail``: IFD0 is that small RGB thumbnail, the preview the second SubIFD.

Without a preview, IFD0 is the raw image itself (no SubIFDs): libraw opens it and finds no
thumbnail. Both helpers return the file's bytes; ``make_dng`` also writes them to a path.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_dng", "make_heic"]

_BYTE, _ASCII, _SHORT, _LONG, _SRATIONAL = 1, 2, 3, 4, 10
_TYPE_SIZE = {_BYTE: 1, _ASCII: 1, _SHORT: 2, _LONG: 4, _SRATIONAL: 8}
_TYPE_CODE = {_BYTE: "B", _SHORT: "H", _LONG: "I"}
# Offsets are not known while sizes are computed: a placeholder of the right width.
_LATER = 0

_Entry = tuple[int, int, object]  # (tag, type, value: str | bytes | tuple of numbers)
_RAW_SIDE = 64


def _count(kind: int, value: object) -> int:
    if kind == _ASCII:
        return len(str(value).encode("ascii")) + 1
    if kind == _SRATIONAL:
        return len(value) // 2  # type: ignore[arg-type]
    return len(value)  # type: ignore[arg-type]


def _payload(kind: int, value: object) -> bytes:
    if kind == _ASCII:
        return str(value).encode("ascii") + b"\x00"
    if kind == _SRATIONAL:
        return struct.pack(f"<{len(value)}i", *value)  # type: ignore[arg-type]
    return struct.pack(f"<{len(value)}{_TYPE_CODE[kind]}", *value)  # type: ignore[arg-type]


def _ifd_size(entries: list[_Entry]) -> int:
    size = 2 + 12 * len(entries) + 4
    for _, kind, value in entries:
        n = _count(kind, value) * _TYPE_SIZE[kind]
        if n > 4:
            size += n + (n & 1)  # values start on a word boundary
    return size


def _ifd(entries: list[_Entry], at: int) -> bytes:
    """One IFD written at file offset ``at``: entries sorted by tag, long values after them."""
    entries = sorted(entries, key=lambda e: e[0])
    head = struct.pack("<H", len(entries))
    extra = b""
    extra_at = at + 2 + 12 * len(entries) + 4
    for tag, kind, value in entries:
        payload = _payload(kind, value)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", extra_at + len(extra))
            extra += payload + b"\x00" * (len(payload) & 1)
        head += struct.pack("<HHI", tag, kind, _count(kind, value)) + field
    return head + struct.pack("<I", 0) + extra


def _strip_entries(width: int, height: int, n: int, *, kind: str, strip_at: int) -> list[_Entry]:
    """Tags of one single-strip page: "RAW" (16-bit CFA), "JPEG" or "RGB" (8-bit) preview."""
    if kind == "RAW":
        bits, compression, photometric, spp, subfile = (16,), 1, 32803, 1, 0
    else:
        # A JPEG preview is YCbCr (Compression 7), as Adobe DNG Converter writes it.
        bits, spp, subfile = (8, 8, 8), 3, 1
        compression, photometric = (7, 6) if kind == "JPEG" else (1, 2)
    entries: list[_Entry] = [
        (254, _LONG, (subfile,)),  # NewSubfileType: 0 main image, 1 reduced-resolution copy
        (256, _LONG, (width,)),
        (257, _LONG, (height,)),
        (258, _SHORT, bits),
        (259, _SHORT, (compression,)),
        (262, _SHORT, (photometric,)),
        (273, _LONG, (strip_at,)),  # StripOffsets
        (277, _SHORT, (spp,)),  # SamplesPerPixel
        (278, _LONG, (height,)),  # RowsPerStrip
        (279, _LONG, (n,)),  # StripByteCounts
        (284, _SHORT, (1,)),  # PlanarConfiguration: chunky
    ]
    if kind == "RAW":
        entries += [
            (33421, _SHORT, (2, 2)),  # CFARepeatPatternDim
            (33422, _BYTE, (0, 1, 1, 2)),  # CFAPattern: RGGB
            (50714, _LONG, (0,)),  # BlackLevel
            (50717, _LONG, (65535,)),  # WhiteLevel
        ]
    return entries


def _exif_entries(
    datetime_original: str | None, subsec: str | None, offset: str | None
) -> list[_Entry]:
    entries: list[_Entry] = []
    if datetime_original is not None:
        entries.append((36867, _ASCII, datetime_original))  # DateTimeOriginal
    if offset is not None:
        entries.append((36881, _ASCII, offset))  # OffsetTimeOriginal
    if subsec is not None:
        entries.append((37521, _ASCII, subsec))  # SubSecTimeOriginal
    return entries


def _encode_preview(image: Image.Image, kind: str, exif: bytes | None) -> bytes:
    rgb = image.convert("RGB")
    if kind == "RGB":
        return rgb.tobytes()
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95, subsampling=0, **({} if exif is None else {"exif": exif}))
    data = buf.getvalue()
    if exif is not None and data[2:4] == b"\xff\xe0":
        # Cameras put the APP1 Exif segment first (PIL writes JFIF first): drop the JFIF one.
        data = data[:2] + data[4 + struct.unpack_from(">H", data, 4)[0] :]
    return data


def make_dng(
    path: str | Path | None,
    *,
    preview: Image.Image | None,
    orientation: int = 1,
    make: str = "Canon",
    model: str = "EOS R5",
    datetime_original: str | None = None,
    subsec: str | None = None,
    offset: str | None = None,
    preview_format: str = "JPEG",
    preview_exif: bytes | None = None,
    thumbnail: Image.Image | None = None,
) -> bytes:
    """A minimal DNG that libraw opens, with ``preview`` as its embedded preview.

    Args:
        path: where to write the file too (None: only return the bytes).
        preview: the preview image, stored as given (a portrait shot's preview is stored
            landscape with ``orientation`` 6 or 8, as cameras do); None for a DNG without one.
        orientation: TIFF/EXIF Orientation 1..8 of IFD0 (what libraw reads as ``sizes.flip``).
        make, model: IFD0 Make and Model.
        datetime_original: EXIF DateTimeOriginal, "YYYY:MM:DD HH:MM:SS".
        subsec: EXIF SubSecTimeOriginal, e.g. "25".
        offset: EXIF OffsetTimeOriginal, e.g. "+02:00".
        preview_format: "JPEG" (quality 95, 4:4:4) or "RGB" (uncompressed 8-bit).
        preview_exif: an EXIF block for the JPEG preview's own APP1 (none by default).
        thumbnail: a smaller uncompressed RGB thumbnail for IFD0, the preview then moving to
            the second SubIFD (Adobe DNG Converter's layout: libraw must pick the larger one).

    Returns:
        The DNG's bytes.
    """
    if preview_format not in ("JPEG", "RGB"):
        raise ValueError(f"preview_format must be 'JPEG' or 'RGB', got {preview_format!r}")
    if thumbnail is not None and preview is None:
        raise ValueError("a thumbnail needs a preview beside it")
    raw = np.full((_RAW_SIDE, _RAW_SIDE), 16384, dtype="<u2").tobytes()
    # Pages in IFD order: IFD0 first, the others are its SubIFDs.
    pages: list[tuple[str, int, int, bytes]] = [("RAW", _RAW_SIDE, _RAW_SIDE, raw)]
    if preview is not None:
        strip = _encode_preview(preview, preview_format, preview_exif)
        page = (preview_format, preview.width, preview.height, strip)
        pages = [page, *pages] if thumbnail is None else [*pages, page]
    if thumbnail is not None:
        thumb = _encode_preview(thumbnail, "RGB", None)
        pages.insert(0, ("RGB", thumbnail.width, thumbnail.height, thumb))

    exif = _exif_entries(datetime_original, subsec, offset)
    dng: list[_Entry] = [
        (271, _ASCII, make),
        (272, _ASCII, model),
        (274, _SHORT, (orientation,)),  # Orientation
        (50706, _BYTE, (1, 4, 0, 0)),  # DNGVersion
        (50707, _BYTE, (1, 1, 0, 0)),  # DNGBackwardVersion
        (50708, _ASCII, f"{make} {model}"),  # UniqueCameraModel
        (50721, _SRATIONAL, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)),  # ColorMatrix1
        (50778, _SHORT, (21,)),  # CalibrationIlluminant1: D65
    ]
    if exif:
        dng.append((34665, _LONG, (_LATER,)))  # ExifIFD
    if len(pages) > 1:
        dng.append((330, _LONG, (_LATER,) * (len(pages) - 1)))  # SubIFDs

    # As cameras write it: the IFDs first, then the pixel data (raw, then the previews), so
    # a file cut short loses pixels, not its directory. Sizes do not depend on offsets: lay
    # everything out with placeholders, then fill the offsets in.
    def ifds(strip_at: list[int]) -> list[list[_Entry]]:
        out = [
            _strip_entries(w, h, len(strip), kind=kind, strip_at=at)
            for (kind, w, h, strip), at in zip(pages, strip_at, strict=True)
        ]
        out[0] += dng
        return out

    sizes = [_ifd_size(ifd) for ifd in ifds([_LATER] * len(pages))]
    exif_at = 8 + sizes[0]
    sub_at = [exif_at + (_ifd_size(exif) if exif else 0)]
    for size in sizes[1:]:
        sub_at.append(sub_at[-1] + size)
    order = [pages.index(p) for p in sorted(pages, key=lambda p: p[0] != "RAW")]
    strip_at, at = [0] * len(pages), sub_at[-1]
    for i in order:
        strip_at[i] = at
        at += len(pages[i][3]) + (len(pages[i][3]) & 1)
    final = ifds(strip_at)
    final[0] = [
        (tag, kind, (exif_at,) if tag == 34665 else tuple(sub_at[:-1]) if tag == 330 else value)
        for tag, kind, value in final[0]
    ]
    body = _ifd(final[0], 8)
    if exif:
        body += _ifd(exif, exif_at)
    for ifd, ifd_at in zip(final[1:], sub_at, strict=False):
        body += _ifd(ifd, ifd_at)
    for i in order:
        body += pages[i][3] + b"\x00" * (len(pages[i][3]) & 1)
    data = b"II*\x00" + struct.pack("<I", 8) + body
    if path is not None:
        Path(path).write_bytes(data)
    return data


def make_heic(
    image: Image.Image,
    *,
    exif: bytes | None = None,
    orientation: int | None = None,
    quality: int = 90,
) -> bytes:
    """Encode ``image`` as HEIC with pillow-heif, without registering its PIL plugin.

    Written as a phone writes a portrait shot: the pixels are stored as given, an EXIF
    Orientation becomes the HEIF ``irot``/``imir`` transforms, and the EXIF block keeps the
    Orientation too (pillow-heif's encoder does both), so ``orientation=6`` is displayed by a
    HEIF reader rotated 90 degrees clockwise, once.

    Args:
        image: the stored pixels (converted to RGB).
        exif: a raw EXIF block (``PIL.Image.Exif().tobytes()``) to embed.
        orientation: EXIF Orientation 1..8 to set in that block (or in a new one).
        quality: HEVC quality, 0..100.

    Returns:
        The HEIC file's bytes.
    """
    import pillow_heif  # here: importing this module must not need it

    block = Image.Exif()
    if exif is not None:
        block.load(exif)
    if orientation is not None:
        block[0x0112] = orientation
    kw: dict[str, object] = {"quality": quality}
    if exif is not None or orientation is not None:
        kw["exif"] = block.tobytes()
    rgb = image.convert("RGB")
    buf = io.BytesIO()
    pillow_heif.encode("RGB", rgb.size, rgb.tobytes(), buf, **kw)
    return buf.getvalue()


def camera_exif(
    when: str | None,
    subsec: str | None = None,
    *,
    make: str = "Canon",
    model: str = "Canon EOS R5",
) -> Image.Exif:
    """EXIF as a camera writes it: Make/Model in IFD0, DateTimeOriginal (``"YYYY:MM:DD
    HH:MM:SS"``) and SubSecTimeOriginal in the Exif IFD. ``.tobytes()`` is an APP1 payload."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    if when is not None:
        ifd = exif.get_ifd(0x8769)
        ifd[0x9003] = when  # DateTimeOriginal
        if subsec is not None:
            ifd[0x9291] = subsec  # SubSecTimeOriginal
    return exif
