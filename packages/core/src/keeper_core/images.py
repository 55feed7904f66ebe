"""Safe image decoding: bytes in, an RGB ``PIL.Image`` out, or a typed ``ImageDecodeError``.

Every image keeper looks at passes through :func:`decode_image`. It identifies the format from
magic bytes (so only a short allow-list of photo formats ever reaches a PIL plugin: no EPS via
Ghostscript, no exotic decoders), checks the declared size from the header before any pixel is
decoded (decompression bombs are refused without allocating them; so are a TIFF's tiles far
larger than its image, and a JPEG's scans beyond a limit), forces a full decode (so a
truncated file is an error, never a grey-padded image), applies the EXIF orientation and
converts every mode to 8-bit RGB (alpha composited on white) in sRGB: pixels tagged with another
RGB colour space (an ICC profile, a HEIF nclx box, or a camera's EXIF mark for Adobe RGB) are
converted, and so are CMYK pixels with an embedded CMYK profile (``keeper_core.color``).
:func:`decode_image_alpha` also hands back the alpha it composited, for the quality features,
which measure exposure where an image is opaque (a cut-out's transparent area is no highlight).

Phone and camera formats (``keeper_core.formats``). HEIC/HEIF decode through pillow-heif,
registered on first use: it applies the HEIF rotation (irot/imir) itself and reports the EXIF
orientation as 1, so the rotation happens exactly once. A camera RAW file is decoded as its
embedded JPEG preview (libraw), whose bytes then go through this same path (byte and pixel
limits, full decode). The RAW's orientation applies when the preview carries none but 1 (libraw
writes it into a preview stored without an Exif block); a preview's own orientation wins, and
neither is applied twice. The colour space the RAW's own metadata names (Adobe RGB; a DNG's
PreviewColorSpace) applies the same way, when the preview names none of its own. Sizes, limits
and errors are the preview's; the RAW file is only read, under its own byte limit (RAW files are
20-200 MB).

Nothing here touches PIL's global settings (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``): the limits travel with each call in :class:`DecodeLimits`.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import ExifTags, Image, ImageFile
from pydantic import BaseModel, ConfigDict, Field

from keeper_core.color import convert_to_srgb, srgb_transform
from keeper_core.errors import PIL_ERRORS, ConfigError, ImageDecodeError
from keeper_core.formats import RawPreview, extract_raw_preview, raw_format, register_heif

__all__ = [
    "DecodeLimits",
    "RawPreview",
    "check_header_size",
    "decode_image",
    "decode_image_alpha",
    "decode_jpeg_band",
    "image_size",
    "raw_preview",
    "sniff_is_image",
    "split_alpha",
]


class DecodeLimits(BaseModel):
    """Per-call limits that :func:`decode_image` enforces before decoding pixels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 64 MP admits every full-frame camera sold today (61 MP = 9504x6336 is the largest) and
    # bounds one decode to ~192 MB of RGB (~256 MB while a 16-bit or float frame is rescaled),
    # so 16 decode processes per node stay within a few GB. It also sits below PIL's own
    # warning threshold (~89 MP), so normal images never trigger DecompressionBombWarning.
    # Raise it for medium-format (100 MP) or stitched panoramas.
    max_pixels: int = Field(default=64_000_000, gt=0)
    # Thumbnails and tracking pixels below this are not photos worth ranking.
    min_side: int = Field(default=16, ge=1)
    # A compressed photo above 64 MiB is almost certainly not a photo (or a hostile one).
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # A camera RAW file is read whole, but only its embedded preview is decoded (and checked
    # against the limits above). 256 MiB covers an uncompressed 102 MP Fujifilm GFX RAF.
    max_raw_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Every scan of a progressive JPEG is a pass over all of the image's blocks, and a scan can
    # be a few bytes (one end-of-band run covers 32,767 blocks), so within max_bytes a hostile
    # file can hold far more scans than any encoder writes (3,000 repeated scans of a 12 MP
    # photo took 13 s to decode here). libjpeg's default progressive script writes 10 (6 for
    # greyscale); 256 is nvImageCodec's default limit.
    max_jpeg_scans: int = Field(default=256, gt=0)

    @property
    def max_read_bytes(self) -> int:
        """The most bytes worth reading of one file: no file over it can decode.

        ``max_raw_bytes`` for a camera RAW, ``max_bytes`` for any other image: a reader caps
        its read at the larger (``storage.read_bytes(uri, max_bytes=limits.max_read_bytes)``),
        so a huge file is refused without being held in memory whole first.
        """
        return max(self.max_bytes, self.max_raw_bytes)


_DEFAULT_LIMITS = DecodeLimits()


def read_image_bytes(uri: str, limits: DecodeLimits | None = None) -> bytes:
    """One image file's bytes, read at most up to ``limits.max_read_bytes`` (default limits):
    a file no decode would accept is refused without being held in memory whole first.

    Raises:
        StorageError: unreadable; ``storage.TooLargeError`` (a StorageError) over the cap.
    """
    from keeper_core import storage

    return storage.read_bytes(uri, max_bytes=(limits or _DEFAULT_LIMITS).max_read_bytes)


_WHITE = (255, 255, 255)
# EXIF orientations whose display size is the stored size with width and height swapped.
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})
# EXIF orientation -> the transpose that displays it (what ImageOps.exif_transpose applies).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Modes with a faithful path to RGB. Others (LAB, HSV TIFFs) would need colour management:
# PIL's convert() "succeeds" on LAB with meaningless colours, so they are refused instead.
_CONVERTIBLE_MODES = frozenset(
    ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", *_DEEP_MODES)
)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
#: ISO-BMFF brands of HEIF files (HEIC, HEVC sequences, the generic mif1/msf1).
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
# JPEG start-of-frame markers (SOF0-3, 5-7, 9-11, 13-15: every coding process); C4, C8 and CC
# share the range but are DHT, JPG and DAC segments.
_JPEG_SOF = frozenset(
    (*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF)
)
# Markers without a length field: TEM, RST0-7 and SOI (EOI ends the walk).
_JPEG_BARE = frozenset((0x01, *range(0xD0, 0xD9)))
# A band is whole 16-row stripes: the tallest MCU of common (4:2:0) sampling.
_BAND_STEP = 16
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
# The largest tile side accepted whatever the image's size: writers tile a small image with
# their default tile (libtiff's tiffcp 256x256, GDAL and COGs 256-512), and a 1024x1024 tile
# costs 3 MB of 8-bit RGB. Larger tiles must fit the image (``check_tiff_tiles``).
_TIFF_TILE_FLOOR = 1024


def _sniff_format(head: bytes) -> str | None:
    """Return the PIL format name the magic bytes announce, "RAW", or None (reads <= 32 bytes).

    A TIFF-based RAW (DNG, NEF, ARW...) reads as "TIFF" here: telling it apart needs IFD0,
    which :func:`_source_format` looks at.
    """
    if raw_format(head) is not None:
        return "RAW"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"  # PIL's JPEG plugin also opens MPO (multi-picture JPEGs from phones)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF and BigTIFF
        return "TIFF"
    # "BM" alone matches text; the DIB header size that follows is one of a few values.
    if (
        head[:2] == b"BM"
        and len(head) >= 18
        and struct.unpack_from("<I", head, 14)[0] in _BMP_HEADER_SIZES
    ):
        return "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in HEIF_BRANDS:
            # mif1/msf1 are generic HEIF brands: AVIF files name "avif" among the compatible ones.
            return "AVIF" if brand in (b"mif1", b"msf1") and b"avif" in head[16:32] else "HEIF"
    return None


def _source_format(data: bytes) -> str | None:
    fmt = _sniff_format(bytes(data[:32]))
    return "RAW" if fmt == "TIFF" and raw_format(data) is not None else fmt


def _has_decoder(fmt: str) -> bool:
    if fmt not in Image.OPEN:
        Image.init()  # registers every installed plugin (what Image.open does lazily too)
    if fmt == "HEIF" and fmt not in Image.OPEN:
        register_heif()  # pillow-heif, on first use
    return fmt in Image.OPEN


def sniff_is_image(data: bytes) -> bool:
    """Tell from magic bytes alone whether ``data`` is an image format keeper handles.

    Cheap enough for scanning folders by content: only the first 32 bytes are looked at, so a
    file's head is enough. Formats recognised but not decodable here (HEIC without a HEIF
    plugin) count as images, so that decoding them is recorded as "unsupported" instead of
    the files being skipped silently.

    Args:
        data: the file's bytes, or at least its first 32 bytes.

    Returns:
        True for JPEG/MPO, PNG/APNG, GIF, WebP, TIFF, BMP, AVIF and HEIF signatures, and for
        camera RAW files (CR2, CR3, ORF, RW2, RAF by magic; DNG, NEF, ARW, PEF, SRW are TIFFs).
    """
    return _sniff_format(bytes(data[:32])) is not None


def _check_bytes(data: object, source: str | None, max_bytes: int | None) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty", "zero bytes", source=source)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError("too_large", f"{len(data)} bytes > limit {max_bytes}", source=source)


def raw_preview(
    data: bytes, *, limits: DecodeLimits | None = None, source: str | None = None
) -> RawPreview | None:
    """The embedded preview of a camera RAW file, or None when ``data`` is not a RAW file.

    :func:`decode_image` and :func:`image_size` do this themselves; a caller that needs more
    than one of them (or :func:`decode_jpeg_band` on the preview's JPEG) extracts once and
    passes the :class:`RawPreview` on. Which bytes are a RAW: ``keeper_core.formats``.

    Args:
        data: the file's bytes.
        limits: only ``max_raw_bytes`` applies here (the preview meets the others later);
            None: no byte limit, as for :func:`image_size`.
        source: where the bytes came from (a URI); carried into errors.

    Returns:
        The preview's bytes and the RAW's orientation, or None for any other file.

    Raises:
        ImageDecodeError: "empty", "too_large" (above ``max_raw_bytes``), and the reasons of
            ``keeper_core.formats.extract_raw_preview``.
    """
    _check_bytes(data, source, None)
    if _source_format(data) != "RAW":
        return None
    _check_bytes(data, source, None if limits is None else limits.max_raw_bytes)
    return extract_raw_preview(bytes(data), source=source)


def _resolve(
    data: bytes | RawPreview, limits: DecodeLimits | None, source: str | None
) -> tuple[bytes, int, str | None]:
    """The bytes to decode, and the orientation and colour space that apply when they name none
    (a RAW's, for its preview)."""
    if isinstance(data, RawPreview):
        return data.data, data.orientation, data.color_space
    preview = raw_preview(data, limits=limits, source=source)
    if preview is None:
        return data, 1, None
    return preview.data, preview.orientation, preview.color_space


def _open(data: bytes, source: str | None, max_bytes: int | None) -> ImageFile.ImageFile:
    """Identify ``data`` and parse its header; no pixel is decoded here."""
    _check_bytes(data, source, max_bytes)
    fmt = _sniff_format(bytes(data[:32]))
    if fmt == "RAW":  # _resolve swaps a RAW for its preview: only a RawPreview of a RAW gets here
        raise ImageDecodeError("unsupported", "a RAW file inside a RawPreview", source=source)
    if fmt is None:
        raise ImageDecodeError("not_image", "no known image signature", source=source)
    if not _has_decoder(fmt):
        raise ImageDecodeError("unsupported", f"no {fmt} decoder installed", source=source)
    try:
        # formats=[fmt]: only the plugin the signature names may parse these bytes.
        return Image.open(io.BytesIO(data), formats=[fmt])
    except _BOMB_ERRORS as e:  # PIL's own guard (2x its global limit) fires inside open()
        raise ImageDecodeError("too_many_pixels", str(e), source=source) from e
    except PIL_ERRORS as e:  # the signature matched, so the header itself is damaged
        raise ImageDecodeError("truncated", f"{fmt} header unreadable: {e}", source=source) from e


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8 from what the header already holds (1 when absent or broken)."""
    # PngImageFile.getexif() decodes the whole image when no eXIf chunk preceded the pixel
    # data: header-only callers must not trigger that (it would bypass the pixel check).
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except PIL_ERRORS:
        return 1  # a corrupt EXIF block should not cost us good pixels
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _display_orientation(im: Image.Image, fallback: int) -> int:
    """The image's own EXIF orientation, or ``fallback`` (a RAW's) when it has none but 1."""
    own = _orientation(im)
    return own if own != 1 else fallback


def image_size(data: bytes | RawPreview) -> tuple[int, int]:
    """Return an image's displayed ``(width, height)`` reading only its header.

    The size is EXIF-oriented, so it equals the size :func:`decode_image` returns (without
    ``draft_size``). No pixel is decoded and no byte or pixel limit applies. A camera RAW
    file's size is its embedded preview's: libraw extracts it (~2 ms), and checking it against
    the file's bytes costs up to ~0.5 ms per MB of RAW.

    Args:
        data: the encoded image, or a RAW file's :func:`raw_preview`.

    Returns:
        ``(width, height)`` after EXIF orientation.

    Raises:
        ImageDecodeError: "empty", "not_image", "unsupported", "truncated" (damaged header),
            or "too_many_pixels" when PIL's own bomb guard refuses even to open it.
    """
    encoded, fallback, _ = _resolve(data, None, None)
    im = _open(encoded, None, None)
    w, h = im.size
    return (h, w) if _display_orientation(im, fallback) in _SWAPPED_ORIENTATIONS else (w, h)


def _next_marker(data: bytes, i: int) -> int:
    """Offset of the next marker at or after ``i`` between segments, or -1 at the end.

    What libjpeg's ``next_marker`` (and PIL's header parser) skip there, skipped the same way:
    bytes other than FF, an FF 00 pair (no marker: a stuffed zero out of place), and fill FFs
    before a marker. Read as a segment instead, a 4-byte ``FF 00 FF FF`` sent the walk 64 KiB
    astray, past the frame header and the scans that libjpeg decodes.
    """
    n = len(data)
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= n:
            return -1
        following = data[i + 1]
        if following == 0xFF:  # fill
            i += 1
        elif following == 0x00:
            i += 2
        else:
            return i


def _jpeg_frame_offset(data: bytes) -> int | None:
    """Offset of the first SOF marker, walking the header segment by segment (None if absent).

    Walking by segment lengths, not searching, skips an EXIF thumbnail's own SOF; junk between
    segments is skipped as libjpeg skips it (:func:`_next_marker`).
    """
    i, n = 2, len(data)
    while (i := _next_marker(data, i)) >= 0 and i + 4 <= n:
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            return i if i + 9 <= n else None
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        i += 2 if marker in _JPEG_BARE else 2 + struct.unpack_from(">H", data, i + 2)[0]
    return None


def decode_jpeg_band(data: bytes, *, pixels: int, source: str | None = None) -> Image.Image:
    """Decode the top rows of a JPEG at full resolution, cheaply, as greyscale.

    The frame header is rewritten to declare only the band's height, so libjpeg decodes those
    rows and skips the rest of every scan as junk before the next marker: a baseline file is
    read only as far as the band, a progressive one entropy-decodes the band of every scan.
    On a 12 MP photo, 64 rows cost ~2 % of a full decode. The band is in stored coordinates (no
    EXIF orientation) and is the luma (Y) channel libjpeg decodes, before colour conversion.
    No limit is checked here: call it on bytes :func:`decode_image` accepted.

    Args:
        data: a JPEG (or MPO: its first picture).
        pixels: at least this many pixels: the band is whole 16-row stripes, at least 64 rows
            (8 rows of blocks), or the whole image when it is smaller.
        source: where the bytes came from (a URI); carried into errors.

    Returns:
        A loaded image of the full stored width, mode "L" (or "L" converted from CMYK).

    Raises:
        ImageDecodeError: "unsupported" when no frame header gives the height (not a JPEG, or
            the height is deferred to a DNL marker), "truncated" when the band does not decode.
    """
    data = bytes(data)
    at = _jpeg_frame_offset(data) if data[:2] == b"\xff\xd8" else None
    if at is None:
        raise ImageDecodeError("unsupported", "no JPEG frame header", source=source)
    height, width = struct.unpack_from(">HH", data, at + 5)
    if height == 0 or width == 0:  # height 0: given by a DNL marker after the first scan
        raise ImageDecodeError("unsupported", "JPEG height deferred to DNL", source=source)
    rows = max(64, -(-pixels // width))
    rows = min(height, -(-rows // _BAND_STEP) * _BAND_STEP)
    band = data[: at + 5] + struct.pack(">H", rows) + data[at + 7 :]
    try:
        im = Image.open(io.BytesIO(band), formats=["JPEG"])
        im.draft("L", None)  # grey straight from libjpeg: no chroma upsampling or conversion
        im.load()
    except PIL_ERRORS as e:
        raise ImageDecodeError("truncated", f"JPEG band: {e}", source=source) from e
    return im if im.mode == "L" else im.convert("L")


def _deep_to_l(im: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float greyscale image linearly to 8-bit "L"."""
    a = np.array(im, dtype=np.float32)
    if im.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        a[~np.isfinite(a)] = 0.0
        lo, hi = float(a.min()), float(a.max())
        # PIL hands 16-bit TIFF/PGM data over as "I" and normalised floats as "F": keep those
        # ranges absolute so a dark frame stays dark; stretch only data outside them.
        if im.mode == "I" and lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return Image.fromarray(np.clip(np.rint((a - lo) * scale), 0, 255).astype(np.uint8))


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB the way every keeper path converts: alpha composited on white,
    16-bit and float greys scaled (not clipped to white as PIL's ``convert`` does)."""
    return split_alpha(im)[0]


def split_alpha(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """``im`` as :func:`to_rgb` converts it, and its alpha channel where it has transparency.

    Returns:
        The RGB image (alpha composited on white), and its alpha as a mode "L" image of the
        same size: from an alpha band, a palette's transparent index or a transparency key.
        None when ``im`` has none, or when every pixel is fully opaque (an RGBA export of an
        opaque photo), so such an image is measured exactly as one without alpha.
    """
    if im.mode in _DEEP_MODES:
        im = _deep_to_l(im)  # PIL's own convert() clips these to white instead of scaling
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        out = Image.new("RGB", im.size, _WHITE)
        out.paste(rgba, mask=alpha)
        return out, None if alpha.getextrema()[0] == 255 else alpha
    return im if im.mode == "RGB" else im.convert("RGB"), None


def _check_draft_size(draft_size: tuple[int, int] | None) -> None:
    if draft_size is None:
        return
    if (
        not isinstance(draft_size, tuple | list)
        or len(draft_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in draft_size)
    ):
        raise ConfigError(
            f"draft_size must be two positive ints (width, height), got {draft_size!r}"
        )


_SOS_MARKER = b"\xff\xda"


def jpeg_scan_count(data: bytes) -> int:
    """Start-of-scan markers of a JPEG's first image, walking it marker by marker to its EOI.

    Segment lengths skip metadata (an EXIF thumbnail's scans, bytes that happen to read FF DA in
    an ICC profile), junk between segments is skipped as libjpeg skips it (:func:`_next_marker`);
    in entropy-coded data every FF is a stuffed FF 00, a restart marker or fill, so the next
    other marker ends the scan. A file cut short counts the scans it has.
    """
    n, i, end = 0, 2, len(data)
    while (i := _next_marker(data, i)) >= 0 and i + 4 <= end:
        marker = data[i + 1]
        if marker == 0xD9:  # EOI: the first image ends (an MPO's next pictures follow)
            break
        if marker in _JPEG_BARE:
            i += 2
            continue
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
        if marker != 0xDA:
            continue
        n += 1
        while True:  # the scan's entropy-coded data, up to the next real marker
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= end:
                return n
            following = data[j + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7:
                i = j + 2
            elif following == 0xFF:
                i = j + 1
            else:
                i = j
                break
    return n


def check_jpeg_scans(data: bytes, limits: DecodeLimits, source: str | None) -> None:
    """Refuse a JPEG with more scans than ``limits.max_jpeg_scans``, before any decode.

    A count of FF DA pairs over the whole file bounds the scans from above at C speed, so a
    normal file costs a byte search; only a file over the limit by that count is walked.

    Raises:
        ImageDecodeError: "too_many_scans".
    """
    if data.count(_SOS_MARKER) <= limits.max_jpeg_scans:
        return
    scans = jpeg_scan_count(data)
    if scans > limits.max_jpeg_scans:
        raise ImageDecodeError(
            "too_many_scans", f"{scans} scans > limit {limits.max_jpeg_scans}", source=source
        )


def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """The ISO BMFF boxes in ``data[start:end]``: (type, body start, body end); a box whose size
    runs past ``end`` ends the list (what is left is damaged)."""
    out, i = [], start
    while i + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, i)
        head = 8
        if size == 1:  # a 64-bit size follows the type
            if i + 16 > end:
                break
            size, head = struct.unpack_from(">Q", data, i + 8)[0], 16
        elif size == 0:  # to the end of the enclosing box
            size = end - i
        if size < head or i + size > end:
            break
        out.append((kind, i + head, i + size))
        i += size
    return out


def heif_coded_sizes(data: bytes) -> list[tuple[int, int]]:
    """The sizes of a HEIF/AVIF file's images as coded (its ``ispe`` properties), header only.

    What libheif decodes: the size PIL reports is after the clean-aperture crop (``clap``), so
    a large image cropped to a few pixels reads as small. Tiles of a grid image have their own
    ``ispe``, at most the grid's. Empty when the file has none (damaged: its decode fails).
    """
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind != b"meta":
            continue
        sizes = []
        for iprp in (b for b in _boxes(data, start + 4, end) if b[0] == b"iprp"):  # FullBox
            for ipco in (b for b in _boxes(data, iprp[1], iprp[2]) if b[0] == b"ipco"):
                for prop, p0, p1 in _boxes(data, ipco[1], ipco[2]):
                    if prop == b"ispe" and p1 - p0 >= 12:  # version and flags, width, height
                        sizes.append(struct.unpack_from(">II", data, p0 + 4))
        return sizes
    return []


def check_heif_coded_size(data: bytes, limits: DecodeLimits, source: str | None) -> None:
    """Refuse a HEIF/AVIF file any of whose images is coded over ``limits.max_pixels``, before
    any decode (the size its header reports may be a small crop of it).

    Raises:
        ImageDecodeError: "too_many_pixels".
    """
    for w, h in heif_coded_sizes(data):
        if w * h > limits.max_pixels:
            raise ImageDecodeError(
                "too_many_pixels",
                f"coded {w}x{h} = {w * h} > limit {limits.max_pixels} (the header shows a crop)",
                source=source,
            )


def _tag_int(value: object) -> int:
    """A TIFF tag's value as one int (the largest, if a malformed entry has several); 0 if none."""
    out = 0
    for v in value if isinstance(value, tuple) else (value,):
        try:
            out = max(out, int(v))
        except (TypeError, ValueError, OverflowError):  # None, bytes, a NaN rational
            continue
    return out


def check_tiff_tiles(im: Image.Image, limits: DecodeLimits, source: str | None) -> None:
    """Refuse a tiled TIFF whose tiles are far larger than its image, before any decode.

    libtiff decodes a tile whole, into a buffer of the tile's declared size, however little of
    it lies inside the image: a 64x64 image whose one tile is declared 26752x26752 inflates
    2 GB (from 2 MB of deflated zeros) while its header's size passes every limit. So a tile
    side may be at most the image's, rounded up to the multiple of 16 TIFF requires of tiles,
    or ``_TIFF_TILE_FLOOR``, whichever is larger; the tile's area at most that of the image so
    rounded (or the floor squared), and never above ``limits.max_pixels``. What a decode then
    allocates beyond the image is at most one such tile. Strips need no check: libtiff caps a
    strip's RowsPerStrip at the image's height, and the rows are the image's width.

    Raises:
        ImageDecodeError: "too_many_pixels".
    """
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return
    tw, th = _tag_int(tags.get(_TIFF_TILE_WIDTH)), _tag_int(tags.get(_TIFF_TILE_LENGTH))
    if tw == 0 and th == 0:  # stripped
        return
    w, h = im.size
    rw, rh = -(-w // 16) * 16, -(-h // 16) * 16
    most_w, most_h = max(rw, _TIFF_TILE_FLOOR), max(rh, _TIFF_TILE_FLOOR)
    most_area = min(max(rw * rh, _TIFF_TILE_FLOOR**2), max(limits.max_pixels, _TIFF_TILE_FLOOR**2))
    if tw > most_w or th > most_h or tw * th > most_area:
        raise ImageDecodeError(
            "too_many_pixels",
            f"TIFF tile {tw}x{th} = {tw * th} for a {w}x{h} image; libtiff decodes a tile "
            f"whole, and a tile may be at most {most_w}x{most_h} and {most_area} pixels here",
            source=source,
        )


def check_header_size(w: int, h: int, limits: DecodeLimits, source: str | None) -> None:
    """The pixel-count and shortest-side refusals, from the header's size, before any decode.

    Raises:
        ImageDecodeError: "too_many_pixels" or "too_small".
    """
    if w * h > limits.max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"{w}x{h} = {w * h} > limit {limits.max_pixels}", source=source
        )
    if min(w, h) < limits.min_side:
        raise ImageDecodeError(
            "too_small", f"{w}x{h}: shortest side < {limits.min_side}", source=source
        )


def decode_image(
    data: bytes | RawPreview,
    *,
    limits: DecodeLimits | None = None,
    source: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode encoded image bytes into an 8-bit RGB image, safely.

    Order matters: byte limit, signature, header size checks (pixel count, shortest side), a
    JPEG's scan count, a HEIF's coded size, a TIFF's tile size (:func:`check_tiff_tiles`),
    optional JPEG draft, then a full decode, EXIF orientation and RGB conversion (to sRGB where
    the file names another colour space). Animated images (GIF, APNG, WebP) yield their first
    frame. A camera RAW file yields its embedded preview (``max_raw_bytes`` applies to the RAW,
    every other limit to the preview).

    Args:
        data: the encoded image, or a RAW file's :func:`raw_preview`.
        limits: byte, pixel and minimum-side limits (defaults: :class:`DecodeLimits`).
            ``max_pixels`` above twice ``PIL.Image.MAX_IMAGE_PIXELS`` (~179 MP) is still
            refused by PIL's guard unless the process raises that setting.
        source: where the bytes came from (a URI); carried into errors.
        draft_size: displayed ``(width, height)`` the caller will resize to. JPEGs larger
            than twice that are decoded downscaled by 1/2, 1/4 or 1/8 in the DCT domain
            (2-5x faster); the result is never smaller than ``draft_size`` on either side.
            Other formats ignore it. ``min_side`` applies to the stored size, before draft.

    Returns:
        A loaded image in mode "RGB", EXIF orientation applied, alpha composited on white,
        converted to sRGB from the colour space its ICC profile or nclx box names (or, untagged,
        its EXIF: ColorSpace 0xFFFF with interoperability index "R03" is Adobe RGB; a RAW's
        preview that names none, the RAW's own). CMYK is converted from its embedded CMYK
        profile, else by PIL's formula.

    Raises:
        ImageDecodeError: with ``reason`` "empty", "too_large", "not_image", "unsupported",
            "truncated", "too_many_pixels", "too_many_scans" or "too_small".
        ConfigError: ``draft_size`` is not two positive ints.
    """
    return decode_image_alpha(data, limits=limits, source=source, draft_size=draft_size)[0]


def decode_image_alpha(
    data: bytes | RawPreview,
    *,
    limits: DecodeLimits | None = None,
    source: str | None = None,
    draft_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, Image.Image | None]:
    """:func:`decode_image`'s image, and the alpha composited into it.

    The quality features measure exposure where an image is opaque (``keeper_core.quality``),
    so the decode that feeds them keeps the alpha it composites: no second decode.

    Returns:
        The RGB image, exactly as :func:`decode_image` returns it, and its alpha (mode "L",
        the same size and orientation; see :func:`split_alpha`), or None for an image without
        transparency (every JPEG, and an image whose every pixel is opaque).

    Raises:
        ImageDecodeError, ConfigError: as :func:`decode_image`.
    """
    limits = _DEFAULT_LIMITS if limits is None else limits
    _check_draft_size(draft_size)
    encoded, fallback, raw_space = _resolve(data, limits, source)
    im = _open(encoded, source, limits.max_bytes)
    w, h = im.size
    # Image.open only parsed the header: refuse here, before a byte of pixels is allocated.
    check_header_size(w, h, limits, source)
    if im.format in ("JPEG", "MPO"):
        check_jpeg_scans(encoded, limits, source)
    elif im.format in ("HEIF", "AVIF"):
        check_heif_coded_size(encoded, limits, source)
    elif im.format == "TIFF":
        check_tiff_tiles(im, limits, source)
    orientation = _display_orientation(im, fallback)
    if draft_size is not None and im.format in ("JPEG", "MPO"):
        tw, th = draft_size
        # draft_size is in displayed coordinates; draft() works on the stored ones.
        im.draft("RGB", (th, tw) if orientation in _SWAPPED_ORIENTATIONS else (tw, th))
    try:
        im.load()  # the full decode: truncation surfaces here (LOAD_TRUNCATED_IMAGES stays off)
    except _BOMB_ERRORS as e:  # GIF/TIFF re-check frame and tile sizes while loading
        raise ImageDecodeError("too_many_pixels", str(e), source=source) from e
    except PIL_ERRORS as e:
        raise ImageDecodeError("truncated", f"{im.format}: {e}", source=source) from e
    if im.size != (w, h) and draft_size is None:  # a decoder that disagrees with its header
        raise ImageDecodeError(
            "truncated",
            f"{im.format}: decoded {im.size[0]}x{im.size[1]}, header {w}x{h}",
            source=source,
        )
    # The orientation read from the header above, applied once: the image's own, else (a RAW
    # preview without one) the RAW's. Not ImageOps.exif_transpose after the load: a PNG's
    # eXIf chunk after IDAT becomes readable only once the pixels are decoded, and applying it
    # here would rotate pixels that image_size (header only), the draft bound and the other
    # backends all take as unrotated.
    out: Image.Image = im if orientation == 1 else im.transpose(_TRANSPOSE[orientation])
    if out.mode not in _CONVERTIBLE_MODES:
        raise ImageDecodeError("unsupported", f"{im.format} in mode {out.mode}", source=source)
    transform = srgb_transform(im.info, out.mode, raw_space)  # the opened image's own info
    if transform is not None and out.mode == "CMYK":
        # A CMYK profile takes the CMYK pixels (PIL has undone a JPEG's Adobe inversion already).
        return convert_to_srgb(out, transform), None
    rgb, alpha = split_alpha(out)
    # No transform: nothing to convert (CMYK without a usable profile: PIL's formula).
    return rgb if transform is None else convert_to_srgb(rgb, transform), alpha
