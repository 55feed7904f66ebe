"""Colour management: pixels tagged with another colour space (RGB, or CMYK) become sRGB.

Phones shoot Display P3 (an iPhone's JPEG carries a "Display P3" ICC profile, its HEIC the same
profile or an nclx box naming P3 primaries), cameras and editors export Adobe RGB and ProPhoto
RGB. The numbers in such a file mean other colours than the same numbers in sRGB: read as sRGB,
a P3 photo looks washed out, and a ProPhoto export (gamma 1.8, very wide primaries) grey and
flat. CLIP was trained on web images, which are sRGB, the quality features (exposure, clipping,
colourfulness) assume it, and browsers show untagged thumbnails as sRGB. So every image keeper
decodes is converted to sRGB when its file says it is something else (:func:`srgb_transform`,
applied by :func:`keeper_core.images.decode_image`):

- an embedded **ICC profile** of an RGB colour space (JPEG APP2, PNG iCCP, WebP, TIFF, HEIF
  ``prof``) is converted with littlecms (Pillow's ``ImageCms``), perceptual intent (a
  matrix-shaper profile, as the photo ones are, falls back to relative colorimetric);
- a HEIF **nclx** box without a profile is converted when its primaries are not sRGB's and its
  transfer function is one of the SDR curves below; HDR (PQ, HLG) is left as decoded;
- an untagged photo whose **EXIF** says Adobe RGB the way cameras write it (DCF: ColorSpace
  0xFFFF "uncalibrated" and the Interoperability IFD's index "R03") is converted as Adobe RGB
  (1998); ColorSpace 1 or index "R98" is sRGB;
- a camera **RAW's preview** that names no colour space itself (no profile, no nclx, EXIF that
  says neither sRGB nor Adobe RGB: libraw's Exif segment in front of a bare preview) takes the
  one the RAW file's own metadata names (``RawPreview.color_space``, read by
  ``keeper_core.formats.raw_color_space``: Adobe RGB, or ProPhoto RGB from a DNG);
- a **CMYK** image (print and stock files from Photoshop: JPEG, TIFF) with an embedded CMYK
  profile (U.S. Web Coated SWOP, FOGRA39, ...) is converted by littlecms from that profile
  (:func:`srgb_transform` takes the CMYK pixels), relative colorimetric with black-point
  compensation: Photoshop's default for such a conversion; the paper is white and the darkest
  ink black is black, the colours between are the print's as measured. PIL has already undone
  the Adobe inversion of a CMYK JPEG (APP14) when it decodes, so littlecms gets 0 = no ink. A
  CMYK image without a profile, or with one littlecms cannot use (logged, once per profile),
  keeps PIL's own conversion: R = (255 - C)(255 - K) / 255 and likewise, no ink or paper
  colours, visibly off (cyan ink comes out (0, 255, 255), a colour no press prints; the tests'
  SWOP-like profile gives (0, 150, 217));
- a profile that says sRGB (its description), a missing one, a greyscale profile, and a
  profile littlecms cannot read (logged, once per profile) leave the pixels as decoded;
- a profile over :data:`MAX_ICC_BYTES` (4 MiB) is one keeper does not use: it is neither
  parsed nor cached, and the image is converted as one littlecms cannot use (RGB left as
  decoded, CMYK by PIL's formula; logged, each time). Real profiles are far smaller, and a
  JPEG's APP2 segments can carry ~16 MiB, which a client could send in image after image.

Transforms are built once per profile per process (a few ms; ~25 ms for a CMYK one), kept in
LRUs of 64 keyed by the profile's SHA-256 (not by its bytes, which would stay alive as keys:
64 profiles of up to 4 MiB per cache, chosen by whoever sends images), and cost
~2-4 ms on a 500x375 draft; a CMYK (LUT) one ~8 ms there and ~0.5 s on 12 MP, ~9x PIL's
formula (measured on two busy cores). :func:`rgb_profile` writes a minimal ICC v2 matrix/TRC
profile from chromaticities: how nclx boxes are converted, and how tests make Display P3, Adobe
RGB and ProPhoto RGB photos without shipping profile files.

Matrix/TRC profiles (every photo profile above: three colorants and three tone curves) also have
a conversion without littlecms, :class:`MatrixProfile` (:func:`srgb_matrix`): littlecms's own
8-bit matrix-shaper arithmetic (curves to 1.14 fixed point, the 3x3 matrix in integers, a
16,385-entry table back to sRGB), in torch on any device, so the fast decode backends
(``keeper_core.decoders``) convert on the GPU what they decode there. Its pixels equal
littlecms's (all 2^24 colours of Display P3, Adobe RGB and ProPhoto RGB, littlecms 2.19). A
profile with LUTs (A2B0), or curves littlecms would black-point-compensate, has none: littlecms
converts it.

    profile = rgb_profile(DISPLAY_P3)                  # bytes of an ICC profile
    img.save(buf, "JPEG", icc_profile=profile)         # a "Display P3" JPEG
    transform = srgb_transform(img.info, img.mode)     # None: nothing to convert
    srgb = convert_to_srgb(img, transform)             # img in transform's mode: RGB or CMYK
    matrix = srgb_matrix(img.info, img.mode)           # the same conversion, in torch
    srgb = matrix.to_srgb(chw_uint8_tensor)            # on the tensor's device
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageCms

from keeper_core.errors import PIL_ERRORS

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADOBE_RGB",
    "DISPLAY_P3",
    "MAX_ICC_BYTES",
    "PROPHOTO_RGB",
    "SRGB",
    "ColorSpace",
    "MatrixProfile",
    "convert_to_srgb",
    "matrix_profile",
    "rgb_profile",
    "srgb_matrix",
    "srgb_transform",
]

log = logging.getLogger(__name__)

#: The largest embedded ICC profile keeper uses. A photo's RGB profile is a few KB (Display P3
#: and Adobe RGB: under 1 KB, sRGB IEC61966-2.1: 3 KB); the largest in use are CMYK press
#: profiles with 16-bit tables, at 0.5-2 MB. A larger one is treated as unusable, unread.
MAX_ICC_BYTES = 4 * 1024 * 1024
_T = TypeVar("_T")


class _CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class _ByDigest(Generic[_T]):
    """An LRU memo of what is built from an ICC profile, keyed by the profile's SHA-256.

    ``functools.lru_cache`` keys on the profile's bytes and so keeps each alive: ``maxsize``
    profiles per cache for the life of the process, chosen by whoever sends images. What is
    built (a littlecms transform, a :class:`MatrixProfile`) holds no reference to the bytes.
    ``cache_info`` and ``cache_clear`` as ``lru_cache``'s.
    """

    def __init__(self, build: Callable[[bytes], _T], maxsize: int = 64) -> None:
        functools.update_wrapper(self, build)
        self._build = build
        self._maxsize = maxsize
        self._items: OrderedDict[bytes, _T] = OrderedDict()
        self._lock = threading.Lock()  # decode threads share the caches
        self._hits = self._misses = 0

    def __call__(self, icc: bytes) -> _T:
        key = hashlib.sha256(icc).digest()
        with self._lock:
            if key in self._items:
                self._hits += 1
                self._items.move_to_end(key)
                return self._items[key]
            self._misses += 1
        built = self._build(icc)  # unlocked: a CMYK transform takes ~25 ms
        with self._lock:
            value = self._items.setdefault(key, built)  # another thread's, if it was first
            self._items.move_to_end(key)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value

    def cache_info(self) -> _CacheInfo:
        with self._lock:
            return _CacheInfo(self._hits, self._misses, self._maxsize, len(self._items))

    def cache_clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._hits = self._misses = 0


_PIL_CMYK = "converted with PIL's CMYK formula instead (no ink or paper colours)"


def _within_cap(icc: bytes | bytearray, instead: str) -> bool:
    """Whether an embedded profile is at most MAX_ICC_BYTES; logs what happens instead if not."""
    if len(icc) <= MAX_ICC_BYTES:
        return True
    log.warning(
        "an embedded ICC profile of %d bytes, above MAX_ICC_BYTES (%d), is not used; %s",
        len(icc),
        MAX_ICC_BYTES,
        instead,
    )
    return False


#: Modes whose pixels an RGB profile describes (a palette's entries are RGB).
_RGB_MODES = frozenset(("RGB", "RGBA", "RGBa", "RGBX", "P", "PA"))
#: nclx transfer_characteristics (ITU-T H.273) keeper converts: SDR curves only.
_NCLX_SRGB_TRC = 13
_NCLX_709_TRCS = frozenset((1, 6, 14, 15))  # BT.709 / BT.601 / BT.2020 (10, 12 bit): one curve
_NCLX_GAMMA = {4: 2.2, 5: 2.8, 8: 1.0}  # BT.470 M, BT.470 BG, linear
_D50 = (0.9642, 1.0, 0.8249)  # the ICC profile connection space's white
_EXIF_SRGB, _EXIF_UNCALIBRATED = 1, 0xFFFF  # EXIF ColorSpace
_INTEROP_INDEX = 0x0001  # InteroperabilityIndex, in the Interoperability IFD


@dataclass(frozen=True)
class ColorSpace:
    """An RGB colour space by its chromaticities and tone curve.

    Attributes:
        name: what the profile's description says.
        red, green, blue, white: CIE xy chromaticities.
        trc: "srgb" (the sRGB piecewise curve), "bt709" (the BT.709 camera curve's inverse),
            or a float gamma.
    """

    name: str
    red: tuple[float, float]
    green: tuple[float, float]
    blue: tuple[float, float]
    white: tuple[float, float]
    trc: str | float


_D65_XY = (0.3127, 0.3290)
SRGB = ColorSpace("sRGB", (0.64, 0.33), (0.30, 0.60), (0.15, 0.06), _D65_XY, "srgb")
DISPLAY_P3 = ColorSpace(
    "Display P3", (0.680, 0.320), (0.265, 0.690), (0.150, 0.060), _D65_XY, "srgb"
)
ADOBE_RGB = ColorSpace(
    "Adobe RGB (1998)", (0.64, 0.33), (0.21, 0.71), (0.15, 0.06), _D65_XY, 563 / 256
)
PROPHOTO_RGB = ColorSpace(
    "ProPhoto RGB", (0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001), (0.3457, 0.3585), 1.8
)
#: The colour spaces other than sRGB a RAW's own metadata may name for its preview, by the
#: names ``keeper_core.formats.raw_color_space`` gives.
_RAW_SPACES = {"Adobe RGB": ADOBE_RGB, "ProPhoto RGB": PROPHOTO_RGB}


def srgb_transform(
    info: Mapping[Any, Any], mode: str, raw_space: str | None = None
) -> ImageCms.ImageCmsTransform | None:
    """The transform to sRGB for an image with PIL ``info`` and ``mode``, or None.

    None when there is nothing to convert: no profile or nclx box, an sRGB one, a mode the
    profile does not describe, HDR, a profile littlecms cannot use (logged once), or one over
    :data:`MAX_ICC_BYTES` (logged). For an RGB (or palette, alpha) mode the transform takes and
    gives 8-bit "RGB" (alpha and palettes are resolved first); for "CMYK" with a CMYK profile
    it takes the "CMYK" pixels themselves.

    Args:
        info: the decoded image's ``info`` (its ICC profile, nclx box, EXIF).
        mode: the decoded image's mode.
        raw_space: for a camera RAW's preview, the colour space the RAW's own metadata names
            (``RawPreview.color_space``); it applies when the preview names none.
    """
    if mode == "CMYK":
        icc = info.get("icc_profile")
        if not (isinstance(icc, bytes | bytearray) and icc) or not _within_cap(icc, _PIL_CMYK):
            return None
        return _cmyk_transform(bytes(icc))
    icc = _source_profile(info, mode, raw_space)
    return None if icc is None else _icc_transform(icc)


def srgb_matrix(
    info: Mapping[Any, Any], mode: str, raw_space: str | None = None
) -> MatrixProfile | None:
    """:func:`srgb_transform`'s conversion as a :class:`MatrixProfile`, or None.

    None when there is nothing to convert (``srgb_transform`` gives None) and when the profile
    is not matrix/TRC (LUT-based, every CMYK one, or curves littlecms would
    black-point-compensate): only littlecms converts those.
    """
    icc = _source_profile(info, mode, raw_space)
    if icc is None or _icc_transform(icc) is None:
        return None
    return matrix_profile(icc)


def _source_profile(info: Mapping[Any, Any], mode: str, raw_space: str | None) -> bytes | None:
    """The RGB ICC profile that says what the pixels mean, when they are not sRGB as they stand."""
    if mode not in _RGB_MODES:
        return None
    icc = info.get("icc_profile")
    if isinstance(icc, bytes | bytearray) and icc:
        return bytes(icc) if _within_cap(icc, "pixels left as sRGB") else None
    nclx = info.get("nclx_profile")
    if isinstance(nclx, Mapping):
        space = _nclx_space(nclx)
        return None if space is None else rgb_profile(space)
    exif = info.get("exif")
    exif = bytes(exif) if isinstance(exif, bytes | bytearray) else b""
    if _exif_says_adobe_rgb(exif):
        return _named_profile("Adobe RGB")
    if raw_space is None or raw_space not in _RAW_SPACES or _exif_says_srgb(exif):
        return None  # the RAW names none (or sRGB), or the preview's own EXIF says sRGB
    return _named_profile(raw_space)


def _exif_says_adobe_rgb(exif: bytes) -> bool:
    """Whether EXIF marks untagged Adobe RGB pixels as DCF cameras do.

    ColorSpace 0xFFFF ("uncalibrated") with InteroperabilityIndex "R03" (DCF's option file
    space, Adobe RGB); "R98" with ColorSpace 1 is sRGB. Cameras set to Adobe RGB write this and
    no ICC profile.
    """
    if b"R03" not in exif:  # nearly every photo: no EXIF parse
        return False
    space, index = _exif_color_tags(exif)
    return space == _EXIF_UNCALIBRATED and index == "R03"


def _exif_says_srgb(exif: bytes) -> bool:
    """Whether EXIF's ColorSpace is 1 (sRGB). Parsed only for a RAW preview that names no
    profile while its RAW names a colour space (libraw's own Exif segment has no ColorSpace)."""
    return bool(exif) and _exif_color_tags(exif)[0] == _EXIF_SRGB


def _exif_color_tags(exif: bytes) -> tuple[object, str | None]:
    """EXIF's ColorSpace and InteroperabilityIndex (stripped), None where absent or corrupt."""
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        space = parsed.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.ColorSpace)
        index = parsed.get_ifd(ExifTags.IFD.Interop).get(_INTEROP_INDEX)
    except PIL_ERRORS:
        return None, None  # a corrupt EXIF block says nothing
    if isinstance(index, bytes):
        index = index.decode("ascii", "replace")
    return space, index.strip("\x00 ") if isinstance(index, str) else None


@functools.cache
def _named_profile(name: str) -> bytes:
    return rgb_profile(_RAW_SPACES[name])


def convert_to_srgb(image: Image.Image, transform: ImageCms.ImageCmsTransform) -> Image.Image:
    """Apply :func:`srgb_transform`'s result (a new 8-bit RGB image).

    Args:
        image: 8-bit "RGB", or "CMYK" for the transform of a CMYK profile (its input mode).
        transform: what :func:`srgb_transform` gave for the image.
    """
    out = ImageCms.applyTransform(image, transform)
    assert out is not None  # not in place: applyTransform returns the new image
    return out


@_ByDigest
def _icc_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    # Cached: a library holds a handful of distinct profiles. Callers cap the size.
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return None  # GRAY, or CMYK on RGB pixels: nothing an RGB image can use
        if "srgb" in (profile.profile.profile_description or "").lower():
            return None  # the usual sRGB profiles: converting would round the pixels for nothing
        # NOCACHE: decode threads share a transform, and littlecms's one-pixel cache is per
        # transform; a photo gains nothing from it.
        return ImageCms.buildTransform(
            profile,
            _srgb_profile(),
            "RGB",
            "RGB",
            renderingIntent=ImageCms.Intent.PERCEPTUAL,
            flags=ImageCms.Flags.NOCACHE,
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        log.warning("an embedded ICC profile littlecms cannot use; pixels left as sRGB: %s", e)
        return None


@_ByDigest
def _cmyk_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    """littlecms's CMYK -> sRGB transform from a CMYK image's embedded profile, or None.

    Relative colorimetric with black-point compensation, Photoshop's default for converting
    out of CMYK: the colorimetric table is the print as measured relative to its paper (white
    comes out white), and BPC maps the darkest ink the profile can print to sRGB black instead
    of a dark grey. (Perceptual tables differ by profiling tool; littlecms falls back to A2B0
    where a profile has no A2B1.)
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if space != "CMYK":
            log.warning(
                "a CMYK image whose embedded ICC profile is %s, not CMYK; %s", space, _PIL_CMYK
            )
            return None
        return ImageCms.buildTransform(
            profile,
            _srgb_profile(),
            "CMYK",
            "RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            flags=ImageCms.Flags.NOCACHE | ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        log.warning(
            "a CMYK image's embedded ICC profile littlecms cannot use; %s: %s", _PIL_CMYK, e
        )
        return None


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _nclx_space(nclx: Mapping[str, Any]) -> ColorSpace | None:
    """The colour space an SDR nclx box names, or None for sRGB, HDR or anything unreadable."""
    try:
        primaries = int(nclx["color_primaries"])
        trc_code = int(nclx["transfer_characteristics"])
        xy = [
            (float(nclx[f"color_primary_{c}_x"]), float(nclx[f"color_primary_{c}_y"]))
            for c in ("red", "green", "blue", "white")
        ]
    except (KeyError, TypeError, ValueError):
        return None
    if primaries in (1, 2):  # BT.709 (sRGB's primaries) or unspecified: nothing to convert
        return None
    trc: str | float
    if trc_code == _NCLX_SRGB_TRC or trc_code == 2:  # 2: unspecified, taken as sRGB's
        trc = "srgb"
    elif trc_code in _NCLX_709_TRCS:
        trc = "bt709"
    elif trc_code in _NCLX_GAMMA:
        trc = _NCLX_GAMMA[trc_code]
    else:
        return None  # PQ, HLG and the rest: HDR or exotic, no SDR conversion to make
    if not all(0 < y < 1 and 0 <= x < 1 for x, y in xy):
        return None
    return ColorSpace(f"nclx primaries {primaries}", xy[0], xy[1], xy[2], xy[3], trc)


# ---------------------------------------------------------------------------------------------
# A minimal ICC v2 display profile (matrix/TRC), written from chromaticities


def rgb_profile(space: ColorSpace) -> bytes:
    """An ICC v2 RGB display profile (matrix/TRC, colorants adapted to D50 by Bradford).

    What littlecms needs for a matrix-shaper profile, nothing else: description, white point,
    the three colorants and tone curves, copyright.
    """
    colorants = _d50_colorants(space)
    trc = _trc_tag(space.trc)
    tags: list[tuple[bytes, bytes]] = [
        (b"desc", _desc_tag(space.name)),
        (b"wtpt", _xyz_tag(_D50)),
        (b"rXYZ", _xyz_tag(colorants[:, 0])),
        (b"gXYZ", _xyz_tag(colorants[:, 1])),
        (b"bXYZ", _xyz_tag(colorants[:, 2])),
        (b"rTRC", trc),
        (b"gTRC", trc),
        (b"bTRC", trc),
        (b"cprt", b"text" + bytes(4) + b"No copyright, use freely\x00"),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    entries, blobs = [], []
    for sig, data in tags:
        entries.append(struct.pack(">4sII", sig, offset, len(data)))
        padded = data + bytes(-len(data) % 4)
        blobs.append(padded)
        offset += len(padded)
    body = struct.pack(">I", len(tags)) + b"".join(entries) + b"".join(blobs)
    size = 128 + len(body)
    header = (
        struct.pack(">I4sI4s4s4s", size, b"lcms", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8)  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # perceptual
        + _s15(_D50)
        + b"kpr "
        + bytes(16 + 28)  # profile id, reserved
    )
    assert len(header) == 128
    return header + body


def _xy_to_xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _d50_colorants(space: ColorSpace) -> np.ndarray:
    """RGB -> XYZ (D50) columns: the space's primaries scaled to its white, adapted by Bradford."""
    prim = np.stack([_xy_to_xyz(*space.red), _xy_to_xyz(*space.green), _xy_to_xyz(*space.blue)], 1)
    white = _xy_to_xyz(*space.white)
    rgb_to_xyz = prim * np.linalg.solve(prim, white)  # each column scaled so RGB 1,1,1 = white
    bradford = np.array(
        [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
    )
    cone = bradford @ np.array(_D50) / (bradford @ white)
    adapt = np.linalg.solve(bradford, np.diag(cone) @ bradford)
    return np.asarray(adapt @ rgb_to_xyz)


def _s15(values: Any) -> bytes:
    return b"".join(struct.pack(">i", round(float(v) * 65536)) for v in values)


def _xyz_tag(xyz: Any) -> bytes:
    return b"XYZ " + bytes(4) + _s15(xyz)


def _trc_tag(trc: str | float) -> bytes:
    if isinstance(trc, float | int):  # curv with one entry: a gamma in u8Fixed8
        return b"curv" + bytes(4) + struct.pack(">IH", 1, round(float(trc) * 256))
    # parametricCurveType 3: Y = (aX + b)^g for X >= d, else cX (lcms reads it in v2 profiles)
    g, a, b, c, d = {
        "srgb": (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045),
        "bt709": (1 / 0.45, 1 / 1.099, 0.099 / 1.099, 1 / 4.5, 0.081),
    }[trc]
    return b"para" + bytes(4) + struct.pack(">HH", 3, 0) + _s15((g, a, b, c, d))


def _desc_tag(name: str) -> bytes:
    ascii_name = name.encode("ascii", "replace") + b"\x00"
    return (
        b"desc"
        + bytes(4)
        + struct.pack(">I", len(ascii_name))
        + ascii_name
        + struct.pack(">II", 0, 0)  # no Unicode description
        + struct.pack(">HB", 0, 0)  # no ScriptCode description
        + bytes(67)
    )


# ---------------------------------------------------------------------------------------------
# Matrix/TRC profiles without littlecms: its 8-bit matrix-shaper arithmetic, in torch

#: ICC ``para`` function types 0-4: how many s15Fixed16 parameters each has.
_PARA_PARAMS = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}
#: Tags that make littlecms convert with a LUT instead of the colorants and curves.
_LUT_TAGS = frozenset((b"A2B0", b"A2B1", b"A2B2", b"D2B0", b"D2B1", b"D2B2"))
_DET_TOLERANCE = 0.0001  # littlecms's MATRIX_DET_TOLERANCE: a parameter this small counts as 0
_ONE14 = 1 << 14  # 1.0 in littlecms's 1.14 fixed point
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, one per profile (cached)
class MatrixProfile:
    """An RGB matrix/TRC ICC profile as a conversion of 8-bit pixels to sRGB.

    The conversion is littlecms's for 8-bit RGB between two matrix-shaper profiles (its
    ``OptimizeMatrixShaper``): each channel's tone curve at the 256 levels, to linear light in
    1.14 fixed point; the 3x3 matrix (the profile's D50 colorants, then the inverse of sRGB's)
    in integers, rounded and clipped to [0, 1]; sRGB's inverse curve from a 16,385-entry table
    to 8 bits. Same arithmetic, same pixels, on any device.

    Attributes:
        matrix: (3, 3) float64, the profile's linear RGB to linear sRGB (through D50 XYZ).
        linear: (3, 256) float64, each channel's tone curve at the 8-bit levels (linear light).
        matrix14: ``matrix`` in 1.14 fixed point, int32: what is multiplied.
        linear14: ``linear`` in 1.14 fixed point, int32: what is looked up.
    """

    matrix: np.ndarray
    linear: np.ndarray
    matrix14: np.ndarray
    linear14: np.ndarray

    def to_srgb(self, pixels: torch.Tensor) -> torch.Tensor:
        """Convert uint8 RGB pixels in this profile's space to sRGB, on their device.

        Args:
            pixels: uint8, channels at dim -3: ``(3, H, W)``, ``(N, 3, H, W)`` (any strides).

        Returns:
            A new uint8 tensor of the same shape, device and strides.

        Raises:
            ValueError: not uint8, or no 3 channels at dim -3.
        """
        import torch

        if pixels.dtype != torch.uint8 or pixels.ndim < 3 or pixels.shape[-3] != 3:
            raise ValueError(
                f"to_srgb takes uint8 (..., 3, H, W), got {pixels.dtype} {tuple(pixels.shape)}"
            )
        shaper, encode = _device_tables(self, pixels.device)
        # int32 all the way: matrix14 times linear14 sums stay below 2^31 (checked at parse)
        lin = [
            shaper[c].index_select(0, pixels.select(-3, c).reshape(-1).to(torch.int32))
            for c in range(3)
        ]
        out = torch.empty_like(pixels)
        for row, dst in zip(self.matrix14.tolist(), out.unbind(-3), strict=True):
            acc = lin[0] * row[0]
            acc.add_(lin[1], alpha=row[1]).add_(lin[2], alpha=row[2]).add_(_ONE14 // 2)
            acc.bitwise_right_shift_(14).clamp_(0, _ONE14)
            dst.copy_(encode.index_select(0, acc).view(dst.shape))
        return out


def matrix_profile(icc: bytes) -> MatrixProfile | None:
    """Read an ICC profile as a :class:`MatrixProfile`, or None when it is not one.

    None (never an exception) for a profile with A2B/D2B LUTs (littlecms prefers them), a
    grey, CMYK or other non-RGB one, a device link, an XYZ-less PCS, tone curves not 0 at black
    (littlecms would black-point-compensate), sums beyond int32, anything malformed, and one
    over :data:`MAX_ICC_BYTES`. Cached by the profile's SHA-256, like the littlecms transforms.
    """
    return None if len(icc) > MAX_ICC_BYTES else _matrix_profile(bytes(icc))


@_ByDigest
def _matrix_profile(icc: bytes) -> MatrixProfile | None:
    try:
        return _parse_matrix_profile(icc)
    except (struct.error, ValueError, IndexError, KeyError, ZeroDivisionError, OverflowError):
        return None


def _parse_matrix_profile(icc: bytes) -> MatrixProfile | None:
    if len(icc) < 132 or icc[36:40] != b"acsp":
        return None
    if icc[12:16] not in (b"mntr", b"scnr", b"spac") or icc[16:24] != b"RGB XYZ ":
        return None
    (count,) = struct.unpack_from(">I", icc, 128)
    if count > (len(icc) - 132) // 12:
        return None
    tags: dict[bytes, bytes] = {}
    for k in range(count):
        sig, offset, size = struct.unpack_from(">4sII", icc, 132 + 12 * k)
        if offset + size > len(icc):
            return None
        tags.setdefault(sig, icc[offset : offset + size])  # littlecms reads the first one
    if _LUT_TAGS & tags.keys():
        return None
    colorants = np.stack([_read_xyz(tags[c]) for c in (b"rXYZ", b"gXYZ", b"bXYZ")], axis=1)
    curves = [_read_curve(tags[c]) for c in (b"rTRC", b"gTRC", b"bTRC")]
    if any(curve is None for curve in curves):
        return None
    linear = np.stack([c for c in curves if c is not None])
    if not np.isfinite(linear).all() or (linear[:, 0] != 0).any():
        return None  # black not at 0: littlecms compensates the black point, this would not
    matrix = np.linalg.solve(_d50_colorants(SRGB), colorants)
    matrix14 = np.floor(matrix * _ONE14 + 0.5)
    # littlecms's DOUBLE_TO_1FIXED14, and its cap for values that do not fit
    linear14 = np.where(linear < 131072.0, np.floor(linear * _ONE14 + 0.5), _INT32_MAX)
    if np.abs(matrix14).sum(axis=1).max() * np.abs(linear14).max() + _ONE14 > _INT32_MAX:
        return None  # an int32 sum would overflow (no real photo profile comes near)
    return MatrixProfile(
        matrix=matrix,
        linear=linear,
        matrix14=matrix14.astype(np.int32),
        linear14=linear14.astype(np.int32),
    )


def _read_xyz(tag: bytes) -> np.ndarray:
    if tag[:4] != b"XYZ ":
        raise ValueError("not an XYZ tag")
    return np.array(struct.unpack_from(">3i", tag, 8), dtype=np.float64) / 65536


def _read_curve(tag: bytes) -> np.ndarray | None:
    """A TRC tag at the 256 8-bit levels, as littlecms evaluates it for an 8-bit transform.

    littlecms evaluates at float32(i / 255) in double precision and keeps a float32 result;
    a ``curv`` table is interpolated in 16 bits (its LinLerp1D). None for an unknown type.
    """
    x = (np.arange(256) / 255.0).astype(np.float32).astype(np.float64)
    kind = tag[:4]
    if kind == b"curv":
        (n,) = struct.unpack_from(">I", tag, 8)
        if n == 0:
            y = x  # identity
        elif n == 1:
            y = x ** (struct.unpack_from(">H", tag, 12)[0] / 256)  # u8Fixed8 gamma
        else:
            table = np.array(struct.unpack_from(f">{n}H", tag, 12), dtype=np.int64)
            y = _lerp16(table, np.floor(x * 65535 + 0.5).astype(np.int64)) / 65535.0
    elif kind == b"para":
        func = struct.unpack_from(">H", tag, 8)[0]
        if func not in _PARA_PARAMS:
            return None
        params = struct.unpack_from(f">{_PARA_PARAMS[func]}i", tag, 12)
        y = _para(func, [p / 65536 for p in params], x)
    else:
        return None
    return np.asarray(y, dtype=np.float32).astype(np.float64)


def _lerp16(table: np.ndarray, v: np.ndarray) -> np.ndarray:
    """littlecms's 16-bit linear interpolation of a 1-D table (LinLerp1D) at 16-bit ``v``."""
    domain = len(table) - 1
    val3 = domain * v
    val3 = val3 + (val3 + 0x7FFF) // 0xFFFF  # _cmsToFixedDomain: to 16.16 fixed point
    cell, rest = val3 >> 16, val3 & 0xFFFF
    y0 = table[np.minimum(cell, domain)]
    y1 = table[np.minimum(cell + 1, domain)]
    out = (((y1 - y0) * rest + 0x8000) >> 16) + y0
    return np.where(v == 0xFFFF, table[domain], out)


def _para(func: int, p: list[float], x: np.ndarray) -> np.ndarray:
    """An ICC parametric curve (function types 0-4) as littlecms evaluates it."""
    g = p[0]

    def power(e: np.ndarray) -> np.ndarray:
        return np.where(e > 0, np.power(np.maximum(e, 0.0), g), 0.0)

    if func == 0:  # Y = X^g
        return np.power(x, g)
    a, b = p[1], p[2]
    if func in (1, 2):  # Y = (aX + b)^g (+ c) for X >= -b/a, else 0 (or c)
        if abs(a) < _DET_TOLERANCE:
            return np.zeros_like(x)
        c = p[3] if func == 2 else 0.0
        disc = max(-b / a, 0.0) if func == 2 else -b / a
        e = a * x + b
        return np.where(x >= disc, np.where(e > 0, power(e) + c, 0.0), c)
    c, d = p[3], p[4]
    if func == 3:  # Y = (aX + b)^g for X >= d, else cX
        return np.where(x >= d, power(a * x + b), c * x)
    e_, f = p[5], p[6]  # func 4: Y = (aX + b)^g + e for X >= d, else cX + f
    e = a * x + b
    return np.where(x >= d, np.where(e > 0, power(e) + e_, e_), c * x + f)


@functools.cache
def _srgb_encode8() -> np.ndarray:
    """littlecms's output shaper for 8-bit sRGB: linear light at i / 16384 to a byte."""
    x = (np.arange(_ONE14 + 1) / _ONE14).astype(np.float32).astype(np.float64)
    g, a, b, c, d = 2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045  # lcms's sRGB curve
    with np.errstate(invalid="ignore"):
        v = np.where(x >= (a * d + b) ** g, (x ** (1 / g) - b) / a, x / c)
    v = np.clip(v.astype(np.float32).astype(np.float64), 0.0, 1.0)
    word = np.floor(v * 65535 + 0.5).astype(np.int64)
    return (((word * 65281 + 8388608) >> 24) & 0xFF).astype(np.uint8)  # FROM_16_TO_8


@functools.lru_cache(maxsize=64)
def _device_tables(
    profile: MatrixProfile, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A profile's lookup tables on a device: (3, 256) int32 shaper, (16385,) uint8 encode."""
    import torch

    return (
        torch.from_numpy(profile.linear14).to(device),
        torch.from_numpy(_srgb_encode8()).to(device),
    )
