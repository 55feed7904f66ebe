"""CMYK images with an embedded CMYK profile decode through that profile (littlecms) to sRGB.

No profile file ships with keeper or its tests: :func:`cmyk_profile` writes a small ICC v2
output profile by hand, a lut8 (``mft1``) A2B0 table CMYK -> Lab whose 2x2x2x2 grid holds the
16 "Neugebauer primaries" (paper, each ink, their overprints) of a SWOP-like press, and the
B2A0 table littlecms's black-point detection needs. At those grid points the profile's colour
is exact, so the expected sRGB comes from the stored Lab by the book (CIE Lab -> XYZ D50 ->
Bradford -> sRGB), not from littlecms.
"""

from __future__ import annotations

import io
import itertools
import logging
import struct
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from test_color_matrix import icc
from test_images import encode

from keeper_core import color
from keeper_core.color import rgb_profile, srgb_matrix, srgb_transform
from keeper_core.decoders import GpuDecoder, TurboDecoder
from keeper_core.errors import ImageDecodeError
from keeper_core.images import DecodeLimits, decode_image

_D50 = np.array([0.9642, 1.0, 0.8249])

# Relative-colorimetric Lab of a SWOP-like press (paper white = L 100): each ink alone, the
# overprints, and the same over 100 % black. Approximate: what matters here is that they are
# far from PIL's formula, and exact at the grid points.
_PRESS = {
    (0, 0, 0): (100, 0, 0),
    (1, 0, 0): (55, -37, -50),  # cyan
    (0, 1, 0): (48, 74, -3),  # magenta
    (0, 0, 1): (89, -5, 93),  # yellow
    (1, 1, 0): (24, 22, -46),  # blue
    (1, 0, 1): (50, -65, 27),  # green
    (0, 1, 1): (47, 68, 48),  # red
    (1, 1, 1): (23, 0, 0),  # three-colour black
}


def press(black_400: float = 6.0) -> Callable[[tuple[int, int, int, int]], tuple[float, ...]]:
    """The press's Lab at a grid corner (C, M, Y, K in 0/1); ``black_400``: L* of 400 % ink."""

    def lab(cmyk: tuple[int, int, int, int]) -> tuple[float, ...]:
        c, m, y, k = cmyk
        L, a, b = _PRESS[(c, m, y)]
        if not k:
            return (L, a, b)
        if (c, m, y) == (1, 1, 1):
            return (black_400, 0, 0)
        return (16 if (c, m, y) == (0, 0, 0) else max(0.3 * L, 8), 0.3 * a, 0.3 * b)

    return lab


def _s15(values: Iterable[float]) -> bytes:
    return b"".join(struct.pack(">i", round(float(v) * 65536)) for v in values)


def _quantised(lab: tuple[float, ...]) -> tuple[float, float, float]:
    """A Lab as a lut8 table stores it: L* in 255 steps of 100/255, a* and b* in whole units."""
    return (round(lab[0] * 255 / 100) * 100 / 255, round(lab[1]), round(lab[2]))


def _lut8(n_in: int, n_out: int, grid: Sequence[Sequence[int]]) -> bytes:
    ident = bytes(range(256))
    head = b"mft1" + bytes(4) + struct.pack(">BBBB", n_in, n_out, 2, 0) + _s15(np.eye(3).ravel())
    return head + ident * n_in + b"".join(bytes(p) for p in grid) + ident * n_out


def cmyk_profile(
    lab: Callable[[tuple[int, int, int, int]], tuple[float, ...]] = press(),
    name: str = "Test SWOP-like CMYK",
) -> bytes:
    """An ICC v2 output profile CMYK -> Lab: lut8 A2B0 over the 16 corners, a minimal B2A0."""
    a2b0 = []
    for c, m, y, k in itertools.product((0, 1), repeat=4):  # C slowest, K fastest: ICC's order
        L, a, b = _quantised(lab((c, m, y, k)))
        a2b0.append((round(L * 255 / 100), round(a) + 128, round(b) + 128))
    # Lab -> CMYK: L* 0 is 400 % ink, L* 100 none. littlecms's black-point detection for a
    # CMYK output profile round-trips Lab 0 through it; a real profile's is a full table.
    b2a0 = [(255 * (1 - L),) * 4 for L, _, _ in itertools.product((0, 1), repeat=3)]
    desc_name = name.encode("ascii") + b"\x00"
    desc = (
        b"desc"
        + bytes(4)
        + struct.pack(">I", len(desc_name))
        + desc_name
        + bytes(8 + 3 + 67)  # no Unicode, no ScriptCode description
    )
    tags = [
        (b"desc", desc),
        (b"wtpt", b"XYZ " + bytes(4) + _s15(_D50)),
        (b"cprt", b"text" + bytes(4) + b"No copyright\x00"),
        (b"A2B0", _lut8(4, 3, a2b0)),
        (b"B2A0", _lut8(3, 4, b2a0)),
    ]
    return icc(tags, space=b"CMYK", pcs=b"Lab ", device_class=b"prtr")


def lab_to_xyz(lab: tuple[float, ...]) -> np.ndarray:
    """CIE Lab to XYZ, both relative to D50 (the ICC connection space's white)."""
    L, a, b = lab
    fy = (L + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    return np.asarray(_D50 * np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)))


def xyz_to_srgb(xyz: np.ndarray) -> np.ndarray:
    """XYZ (D50) to 8-bit sRGB by the book: Bradford to D65, sRGB's matrix and curve."""
    bradford = np.array(
        [[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]]
    )
    d65 = np.array([0.3127 / 0.3290, 1.0, (1 - 0.3127 - 0.3290) / 0.3290])
    adapt = np.linalg.solve(bradford, np.diag((bradford @ d65) / (bradford @ _D50)) @ bradford)
    to_srgb = np.array(
        [[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]
    )
    lin = np.clip(to_srgb @ (adapt @ xyz), 0.0, 1.0)
    return np.asarray(
        255 * np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    )


def lab_to_srgb(lab: tuple[float, ...]) -> np.ndarray:
    """Lab to sRGB: what a relative colorimetric conversion to sRGB means, without BPC."""
    return xyz_to_srgb(lab_to_xyz(lab))


# Grid corners: paper, each ink, two overprints, black alone, black over cyan.
CORNERS = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 1, 1, 0), (1, 0, 1, 0)]
CORNERS += [(0, 0, 0, 1), (1, 0, 0, 1)]


def cmyk_swatch(corners: list[tuple[int, int, int, int]] = CORNERS, block: int = 8) -> Image.Image:
    values = np.array(corners, dtype=np.uint8) * 255
    row = np.repeat(values[None], block, axis=0).repeat(block, axis=1)
    return Image.fromarray(np.ascontiguousarray(np.tile(row, (2, 1, 1))), mode="CMYK")


def block_means(im: Image.Image, n: int = len(CORNERS), block: int = 8) -> np.ndarray:
    a = np.asarray(im, np.float64)[2:-2]
    return np.stack([a[:, i * block + 2 : (i + 1) * block - 2].mean((0, 1)) for i in range(n)])


def expected(lab: Callable[[tuple[int, int, int, int]], tuple[float, ...]]) -> np.ndarray:
    return np.stack([lab_to_srgb(_quantised(lab(c))) for c in CORNERS])


def cmyk_jpeg(icc: bytes | None = None, image: Image.Image | None = None) -> bytes:
    kw = {} if icc is None else {"icc_profile": icc}
    return encode(cmyk_swatch() if image is None else image, "JPEG", quality=100, **kw)


# A press whose 400 % black is L* 0: black-point compensation has nothing to move, so every
# corner's sRGB is the book's.
NEUTRAL_BLACK = press(black_400=0.0)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_photo_converts_through_its_embedded_profile(fmt: str) -> None:
    icc = cmyk_profile(NEUTRAL_BLACK)
    data = cmyk_jpeg(icc) if fmt == "JPEG" else encode(cmyk_swatch(), "TIFF", icc_profile=icc)
    out = decode_image(data)
    assert out.mode == "RGB"
    want = expected(NEUTRAL_BLACK)
    assert np.abs(block_means(out) - want).max() <= 2.0
    # PIL's formula on the same pixels is far off: cyan (0, 255, 255) against about (0, 150, 217)
    naive = block_means(cmyk_swatch().convert("RGB"))
    assert np.abs(naive - want).max() > 60


def test_adobe_inverted_cmyk_jpeg_reaches_littlecms_uninverted() -> None:
    # PIL writes (and reads) CMYK JPEGs the Adobe way: an APP14 "Adobe" segment and every
    # sample stored inverted (255 = no ink). littlecms must see 0 = no ink, as the profile does.
    cyan = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    data = cmyk_jpeg(cmyk_profile(NEUTRAL_BLACK), image=cyan)
    assert data[2:4] == b"\xff\xee"
    assert data[6:11] == b"Adobe"
    assert simplejpeg.decode_jpeg(data, colorspace="CMYK")[5, 5].tolist() == [0, 255, 255, 255]
    out = np.asarray(decode_image(data), np.float64)[5, 5]
    # the profile's cyan; the inverted samples would be 300 % ink plus black: near black
    assert np.abs(out - lab_to_srgb(_quantised(NEUTRAL_BLACK((1, 0, 0, 0))))).max() <= 2.0


def test_black_point_compensation_maps_the_darkest_ink_to_black() -> None:
    # Relative colorimetric with black-point compensation. A real press's 400 % ink is never
    # L* 0 (here 6): BPC scales XYZ so that it lands on sRGB black, each component by
    # D50 * (XYZ - black) / (D50 - black); without it, it would be a dark grey (19, 19, 19).
    lab = press(black_400=6.0)
    corners = [*CORNERS, (1, 1, 1, 1)]
    image = cmyk_swatch(corners)
    out = block_means(decode_image(cmyk_jpeg(cmyk_profile(lab), image=image)), n=len(corners))
    black = lab_to_xyz(_quantised(lab((1, 1, 1, 1))))
    want = [
        xyz_to_srgb(_D50 * (lab_to_xyz(_quantised(lab(c))) - black) / (_D50 - black))
        for c in corners
    ]
    assert np.abs(out - want).max() <= 1.5
    assert out[-1].max() <= 1.0
    assert out[0].min() >= 254.0
    assert np.abs(lab_to_srgb(_quantised(lab((1, 1, 1, 1)))) - 19).max() < 1  # without BPC


def test_cmyk_without_a_profile_keeps_pil_conversion() -> None:
    out = decode_image(cmyk_jpeg())
    reference = Image.open(io.BytesIO(cmyk_jpeg())).convert("RGB")
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    assert srgb_transform({}, "CMYK") is None


@pytest.mark.parametrize(
    ("icc", "said"),
    [
        (b"\x00\x00\x02\x00" + b"not an icc profile" * 20, "cannot use"),
        (rgb_profile(color.ADOBE_RGB), "is RGB, not CMYK"),
    ],
    ids=["unreadable", "rgb_profile_on_cmyk"],
)
def test_a_cmyk_profile_littlecms_cannot_use_is_logged_and_pil_converts(
    icc: bytes, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = cmyk_jpeg(icc)
    with caplog.at_level(logging.WARNING, logger="keeper_core.color"):
        out = decode_image(data)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(np.asarray(out), np.asarray(reference))
    assert said in caplog.text
    assert "PIL's CMYK formula" in caplog.text


def test_cmyk_profile_on_rgb_pixels_is_ignored() -> None:
    photo = Image.new("RGB", (32, 32), (200, 100, 50))
    assert srgb_transform({"icc_profile": cmyk_profile()}, "RGB") is None
    assert decode_image(encode(photo, "PNG", icc_profile=cmyk_profile())).getpixel((3, 3)) == (
        200,
        100,
        50,
    )


def test_draft_decode_converts_too() -> None:
    big = cmyk_swatch(block=64)  # 512 x 128: drafted to 1/4 for a 128 x 32 target
    data = cmyk_jpeg(cmyk_profile(NEUTRAL_BLACK), image=big)
    out = decode_image(data, draft_size=(128, 32))
    assert out.size == (128, 32)
    assert np.abs(block_means(out, block=16) - expected(NEUTRAL_BLACK)).max() <= 2.0


def test_pixel_limit_is_checked_before_any_conversion() -> None:
    data = cmyk_jpeg(cmyk_profile())
    with pytest.raises(ImageDecodeError) as e:
        decode_image(data, limits=DecodeLimits(max_pixels=100))
    assert e.value.reason == "too_many_pixels"


def test_fast_backends_hand_cmyk_to_the_reference() -> None:
    # CMYK is no JPEG the turbo or GPU paths decode: they delegate it by rule ("mode:CMYK"; a
    # TIFF by its format) and return the reference's converted pixels.
    icc = cmyk_profile()
    jpeg, tiff = cmyk_jpeg(icc), encode(cmyk_swatch(), "TIFF", icc_profile=icc)
    reference = [np.asarray(decode_image(d)) for d in (jpeg, tiff)]
    turbo = TurboDecoder()
    for data, ref in zip((jpeg, tiff), reference, strict=True):
        assert np.array_equal(np.asarray(turbo.decode(data)), ref)
    assert dict(turbo.delegated) == {"mode:CMYK": 1, "format:TIFF": 1}
    gpu = GpuDecoder(device="cpu")
    out = gpu.decode_batch([(jpeg, "cmyk.jpg"), (tiff, "cmyk.tif")])
    for got, ref in zip(out, reference, strict=True):
        assert not isinstance(got, Exception)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)
    assert dict(gpu.delegated) == {"mode:CMYK": 1, "format:TIFF": 1}
    assert gpu.color_converted == 0  # converted by the reference, not on the device
    assert srgb_matrix({"icc_profile": icc}, "CMYK") is None
