"""Colour management: pixels tagged with another RGB colour space are converted to sRGB.

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
- a profile that says sRGB (its description), a missing one, a greyscale or CMYK profile (PIL's
  own CMYK conversion stays the reference), and a profile littlecms cannot read (logged, once
  per profile) leave the pixels as decoded.

Transforms are built once per profile per process (a few ms) and cost ~2-4 ms on a 500x375
draft. :func:`rgb_profile` writes a minimal ICC v2 matrix/TRC profile from chromaticities: how
nclx boxes are converted, and how tests make Display P3, Adobe RGB and ProPhoto RGB photos
without shipping profile files.

    profile = rgb_profile(DISPLAY_P3)                  # bytes of an ICC profile
    img.save(buf, "JPEG", icc_profile=profile)         # a "Display P3" JPEG
    transform = srgb_transform(img.info, img.mode)     # None: nothing to convert
"""

from __future__ import annotations

import functools
import io
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageCms

__all__ = [
    "ADOBE_RGB",
    "DISPLAY_P3",
    "PROPHOTO_RGB",
    "SRGB",
    "ColorSpace",
    "convert_to_srgb",
    "rgb_profile",
    "srgb_transform",
]

log = logging.getLogger(__name__)

#: Modes whose pixels an RGB profile describes (a palette's entries are RGB).
_RGB_MODES = frozenset(("RGB", "RGBA", "RGBa", "RGBX", "P", "PA"))
#: nclx transfer_characteristics (ITU-T H.273) keeper converts: SDR curves only.
_NCLX_SRGB_TRC = 13
_NCLX_709_TRCS = frozenset((1, 6, 14, 15))  # BT.709 / BT.601 / BT.2020 (10, 12 bit): one curve
_NCLX_GAMMA = {4: 2.2, 5: 2.8, 8: 1.0}  # BT.470 M, BT.470 BG, linear
_D50 = (0.9642, 1.0, 0.8249)  # the ICC profile connection space's white


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


def srgb_transform(info: Mapping[Any, Any], mode: str) -> ImageCms.ImageCmsTransform | None:
    """The RGB -> sRGB transform for an image with PIL ``info`` and ``mode``, or None.

    None when there is nothing to convert: no profile or nclx box, an sRGB one, a mode an RGB
    profile does not describe, HDR, or a profile littlecms cannot read (logged once).
    The transform takes and gives 8-bit "RGB" (alpha and palettes are resolved first).
    """
    if mode not in _RGB_MODES:
        return None
    icc = info.get("icc_profile")
    if isinstance(icc, bytes | bytearray) and icc:
        return _icc_transform(bytes(icc))
    nclx = info.get("nclx_profile")
    if isinstance(nclx, Mapping):
        space = _nclx_space(nclx)
        return None if space is None else _icc_transform(rgb_profile(space))
    return None


def convert_to_srgb(rgb: Image.Image, transform: ImageCms.ImageCmsTransform) -> Image.Image:
    """Apply :func:`srgb_transform`'s result to an 8-bit RGB image (a new image)."""
    out = ImageCms.applyTransform(rgb, transform)
    assert out is not None  # not in place: applyTransform returns the new image
    return out


@functools.lru_cache(maxsize=64)
def _icc_transform(icc: bytes) -> ImageCms.ImageCmsTransform | None:
    # Keyed by the profile's bytes: a library holds a handful of distinct profiles.
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if profile.profile.xcolor_space.strip() != "RGB":
            return None  # GRAY or CMYK: PIL's own conversion is the reference
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
