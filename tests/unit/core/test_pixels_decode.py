"""Pixels as decoded and as measured agree: orientation applied once, modes converted alike.

Every image here is built in code.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from keeper_core.images import decode_image, decode_image_alpha, image_size
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES, quality_features

SPEC = "keeper-tiny:random"
_W, _H = FEATURE_NAMES.index("width"), FEATURE_NAMES.index("height")


def _png(im: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _marked() -> Image.Image:
    """80 x 60, a white block in the top-left corner: its place tells the orientation."""
    a = np.zeros((60, 80, 3), np.uint8)
    a[:10, :20] = 255
    return Image.fromarray(a)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _exif_after_idat(im: Image.Image, orientation: int) -> bytes:
    """A PNG whose eXIf chunk follows the pixel data (ImageMagick and others write it there)."""
    data = _png(im)
    body = _exif(orientation)
    body = body[6:] if body.startswith(b"Exif\x00\x00") else body
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + body))
    iend = data.rindex(b"IEND") - 4
    return data[:iend] + chunk + data[iend:]


def test_png_exif_before_idat_is_applied() -> None:
    data = _png(_marked(), exif=_exif(6))
    im = decode_image(data)
    assert im.size == image_size(data) == (60, 80)
    assert np.asarray(im)[:10, -10:].min() == 255  # rotated 90 degrees clockwise: top right


def test_png_exif_after_idat_decodes_at_the_size_image_size_reports() -> None:
    """Orientation comes from the header, once: image_size, the decode and the features agree.

    A late eXIf becomes readable only after the pixels are decoded; it used to rotate the
    pixels while image_size (header only) reported the stored size, so the features' width and
    height were swapped against the pixels and the image counted as drafted (a second decode).
    """
    data = _exif_after_idat(_marked(), 6)
    im = decode_image(data)
    assert im.size == image_size(data) == (80, 60)
    prep = ImagePreparation(SPEC)
    decoded = prep.decode(data)
    assert (decoded.width, decoded.height) == decoded.image.size == (80, 60)
    assert decoded.blockiness is None  # not mistaken for a drafted JPEG
    feats = prep.quality([decoded])[0]
    assert (feats[_W], feats[_H]) == (80, 60)


def test_quality_features_convert_rgba_as_decode_image() -> None:
    """Transparent pixels are not measured, whether the image was decoded (its alpha kept beside
    the pixels composited on white) or handed over with its alpha; the composited pixels alone
    read the transparent half as white, as keeper shows it."""
    a = np.zeros((64, 64, 4), np.uint8)
    a[:32, :, 3] = 255  # opaque black top half, transparent (black underneath) bottom half
    rgba = Image.fromarray(a, "RGBA")
    rgb, alpha = decode_image_alpha(_png(rgba))
    assert rgb.tobytes() == decode_image(_png(rgba)).tobytes()
    direct, decoded, composited = quality_features([rgba, rgb, rgb], alpha=[None, alpha, None])
    np.testing.assert_array_equal(direct, decoded)
    brightness = FEATURE_NAMES.index("brightness")
    assert direct[brightness] == pytest.approx(0.0, abs=0.01)  # the opaque black half
    assert composited[brightness] == pytest.approx(0.5, abs=0.01)


def test_quality_features_scale_16_bit_grey_as_decode_image() -> None:
    """A dark 16-bit frame stays dark: PIL's convert("RGB") would clip it to white."""
    grey = Image.fromarray(np.full((64, 64), 1000, np.uint16))
    direct, decoded = quality_features([grey, decode_image(_png(grey))])
    np.testing.assert_allclose(direct, decoded)
    assert direct[FEATURE_NAMES.index("clip_bright")] == 0.0


@pytest.mark.parametrize("value", [0, 128, 255])
@pytest.mark.parametrize("size", [(1, 1), (16, 16), (300, 17)])
def test_uniform_images_give_finite_features(value: int, size: tuple[int, int]) -> None:
    feats = quality_features([Image.new("RGB", size, (value, value, value))])[0]
    assert np.isfinite(feats).all()
    assert feats[FEATURE_NAMES.index("sharpness")] == 0.0
    assert feats[FEATURE_NAMES.index("noise")] == 0.0
