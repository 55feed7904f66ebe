"""keeper_core.color: photos tagged with another RGB colour space decode as sRGB.

Expected pixels come from the colour spaces' definitions (chromaticities, tone curves) with
plain matrix arithmetic, not from littlecms: the conversion is checked, not restated.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageCms
from test_images import encode

from keeper_core import color
from keeper_core.color import (
    ADOBE_RGB,
    DISPLAY_P3,
    PROPHOTO_RGB,
    SRGB,
    ColorSpace,
    rgb_profile,
    srgb_transform,
)
from keeper_core.decoders import GpuDecoder, TurboDecoder
from keeper_core.formats import register_heif
from keeper_core.images import decode_image

COLOURS = np.array(
    [[200, 100, 50], [128, 128, 128], [30, 200, 90], [250, 250, 10], [10, 10, 10], [90, 60, 240]],
    dtype=np.uint8,
)


def _decode_trc(v: np.ndarray, trc: str | float) -> np.ndarray:
    v = v / 255.0
    if trc == "srgb":
        return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    assert isinstance(trc, float)
    return v**trc


def _srgb_encode(lin: np.ndarray) -> np.ndarray:
    lin = np.clip(lin, 0.0, 1.0)
    return 255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)


def _rgb_to_xyz(space: ColorSpace) -> np.ndarray:
    def xyz(x: float, y: float) -> np.ndarray:
        return np.array([x / y, 1.0, (1 - x - y) / y])

    prim = np.stack([xyz(*space.red), xyz(*space.green), xyz(*space.blue)], 1)
    return prim * np.linalg.solve(prim, xyz(*space.white))


def expected_srgb(rgb: np.ndarray, space: ColorSpace) -> np.ndarray:
    """Colours of ``space`` in sRGB by the book (von Kries-free: both whites are D65 here)."""
    to_srgb = np.linalg.solve(_rgb_to_xyz(SRGB), _rgb_to_xyz(space))
    return _srgb_encode((to_srgb @ _decode_trc(rgb.astype(float), space.trc).T).T)


def swatch(colours: np.ndarray = COLOURS, block: int = 8) -> Image.Image:
    """Flat blocks of each colour, so a JPEG keeps them (chroma subsampling off) to +-1."""
    row = np.repeat(colours[None], block, axis=0).repeat(block, axis=1)
    return Image.fromarray(np.ascontiguousarray(np.tile(row, (2, 1, 1))))


def block_means(im: Image.Image, n: int = len(COLOURS), block: int = 8) -> np.ndarray:
    a = np.asarray(im, np.float64)[2:-2]
    return np.stack([a[:, i * block + 2 : (i + 1) * block - 2].mean((0, 1)) for i in range(n)])


@pytest.mark.parametrize("space", [DISPLAY_P3, ADOBE_RGB], ids=lambda s: s.name)
def test_profile_converts_like_the_colour_space_says(space: ColorSpace) -> None:
    transform = srgb_transform({"icc_profile": rgb_profile(space)}, "RGB")
    assert transform is not None
    out = np.asarray(color.convert_to_srgb(Image.fromarray(COLOURS[None]), transform))[0]
    assert np.abs(out - expected_srgb(COLOURS, space)).max() <= 1.0


def test_written_profiles_read_back_as_what_they_name() -> None:
    for space in (DISPLAY_P3, ADOBE_RGB, PROPHOTO_RGB):
        profile = ImageCms.ImageCmsProfile(io.BytesIO(rgb_profile(space))).profile
        assert (profile.profile_description, profile.xcolor_space) == (space.name, "RGB ")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_decode_converts_a_display_p3_photo_to_srgb(fmt: str) -> None:
    kw = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    if fmt == "WEBP":
        kw = {"lossless": True}
    tagged = encode(swatch(), fmt, icc_profile=rgb_profile(DISPLAY_P3), **kw)
    untagged = encode(swatch(), fmt, **kw)
    want = expected_srgb(COLOURS, DISPLAY_P3)
    assert np.abs(block_means(decode_image(tagged)) - want).max() <= 1.5
    # the same numbers without a profile are sRGB already: left as they are
    assert np.abs(block_means(decode_image(untagged)) - COLOURS).max() <= 1.5
    assert np.abs(want - COLOURS).max() > 10  # the conversion is visible, not rounding


def test_prophoto_mid_grey_is_lighter_in_srgb() -> None:
    # Gamma 1.8 against sRGB's curve: 128 is (128/255)^1.8 = 0.289 linear, 146 in sRGB.
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    out = decode_image(encode(grey, "PNG", icc_profile=rgb_profile(PROPHOTO_RGB)))
    assert out.getpixel((5, 5)) == (146, 146, 146)


def test_srgb_profiles_leave_pixels_untouched() -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8))
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for icc in (srgb_icc, rgb_profile(SRGB)):
        assert srgb_transform({"icc_profile": icc}, "RGB") is None
        out = decode_image(encode(photo, "PNG", icc_profile=icc))
        assert np.array_equal(np.asarray(out), np.asarray(photo))


def test_a_profile_littlecms_cannot_read_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    photo = Image.new("RGB", (32, 32), (200, 100, 50))
    junk = b"\x00\x00\x02\x00" + b"not an icc profile" * 20
    with caplog.at_level(logging.WARNING, logger="keeper_core.color"):
        out = decode_image(encode(photo, "PNG", icc_profile=junk))
    assert out.getpixel((3, 3)) == (200, 100, 50)
    assert "ICC profile" in caplog.text


def test_alpha_is_composited_before_the_conversion() -> None:
    # Transparent pixels are white on the page; white is white in every display space.
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((30, 200, 90, 255), (0, 0, 16, 32))
    out = decode_image(encode(rgba, "PNG", icc_profile=rgb_profile(DISPLAY_P3)))
    assert out.getpixel((30, 5)) == (255, 255, 255)
    want = expected_srgb(np.array([[30, 200, 90]], np.uint8), DISPLAY_P3)[0]
    assert np.abs(np.array(out.getpixel((5, 5))) - want).max() <= 1.0


def test_greyscale_and_palette_images() -> None:
    grey = Image.new("L", (32, 32), 90)
    # an RGB profile on a greyscale image does not describe it: left alone
    assert decode_image(encode(grey, "PNG", icc_profile=rgb_profile(DISPLAY_P3))).getpixel(
        (1, 1)
    ) == (90, 90, 90)
    palette = Image.new("RGB", (32, 32), (30, 200, 90)).quantize(4)
    out = decode_image(encode(palette, "PNG", icc_profile=rgb_profile(DISPLAY_P3)))
    want = expected_srgb(np.array([[30, 200, 90]], np.uint8), DISPLAY_P3)[0]
    assert np.abs(np.array(out.getpixel((5, 5))) - want).max() <= 1.0


def _heif(nclx: dict[str, int] | None, icc: bytes | None = None) -> bytes:
    register_heif()
    kw: dict[str, object] = {"quality": -1}  # lossless
    if nclx is not None:
        kw["nclx_profile"] = nclx
    if icc is not None:
        kw["icc_profile"] = icc
    return encode(swatch(), "HEIF", **kw)


def _nclx(primaries: int, transfer: int) -> dict[str, int]:
    return {
        "color_primaries": primaries,
        "transfer_characteristics": transfer,
        "matrix_coefficients": 6,
        "full_range_flag": 1,
    }


def test_heif_nclx_display_p3_is_converted() -> None:
    out = decode_image(_heif(_nclx(12, 13)))  # P3 primaries, sRGB curve: an iPhone's HEIC
    want = expected_srgb(COLOURS, DISPLAY_P3)
    assert np.abs(block_means(out) - want).max() <= 2.0


@pytest.mark.parametrize(
    ("nclx", "why"),
    [(_nclx(1, 13), "sRGB's own primaries"), (_nclx(9, 16), "BT.2020 PQ: HDR, no SDR mapping")],
)
def test_heif_nclx_left_alone(nclx: dict[str, int], why: str) -> None:
    out = decode_image(_heif(nclx))
    assert np.abs(block_means(out) - COLOURS).max() <= 2.0, why


def test_heif_icc_profile_wins_over_nclx() -> None:
    out = decode_image(_heif(None, icc=rgb_profile(ADOBE_RGB)))
    assert np.abs(block_means(out) - expected_srgb(COLOURS, ADOBE_RGB)).max() <= 2.0


def test_other_backends_convert_tagged_jpegs_as_the_reference_does() -> None:
    tagged = encode(
        swatch(), "JPEG", quality=100, subsampling=0, icc_profile=rgb_profile(ADOBE_RGB)
    )
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = encode(swatch(), "JPEG", quality=100, subsampling=0, icc_profile=srgb_icc)
    reference = np.asarray(decode_image(tagged))
    turbo = TurboDecoder()
    assert np.array_equal(np.asarray(turbo.decode(tagged)), reference)
    turbo.decode(plain)
    # Both decoded here (the Adobe RGB one converted, the sRGB one left alone), none delegated
    assert (dict(turbo.delegated), turbo.decoded, turbo.color_converted) == ({}, 2, 1)
    gpu = GpuDecoder(device="cpu")
    (out,) = gpu.decode_batch([(tagged, "p3.jpg")])
    assert not isinstance(out, Exception)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), reference)
    assert (dict(gpu.delegated), gpu.color_converted) == ({}, 1)
