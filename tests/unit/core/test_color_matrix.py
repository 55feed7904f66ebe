"""keeper_core.color's matrix/TRC conversion (MatrixProfile) and the EXIF Adobe RGB rule.

The torch conversion is checked against littlecms (``convert_to_srgb``, the reference) on a
dense colour grid for every tone-curve encoding a matrix/TRC profile can use: a ``curv`` gamma,
a ``curv`` table, ``para`` function types 0-4. Profiles are written here, tag by tag, beside
``color.rgb_profile``'s helpers, so no profile file is shipped.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageCms
from test_images import encode

from keeper_core import color
from keeper_core.color import (
    ADOBE_RGB,
    DISPLAY_P3,
    PROPHOTO_RGB,
    ColorSpace,
    MatrixProfile,
    convert_to_srgb,
    matrix_profile,
    rgb_profile,
    srgb_matrix,
    srgb_transform,
)
from keeper_core.images import decode_image

# ---------------------------------------------------------------- an ICC tag writer

SRGB_PARAMS = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)


def icc(
    tags: list[tuple[bytes, bytes]],
    *,
    space: bytes = b"RGB ",
    pcs: bytes = b"XYZ ",
    device_class: bytes = b"mntr",
) -> bytes:
    """An ICC v2 profile with these tags, laid out as ``color.rgb_profile`` lays out its own."""
    offset = 128 + 4 + 12 * len(tags)
    entries, blobs = [], []
    for sig, data in tags:
        entries.append(struct.pack(">4sII", sig, offset, len(data)))
        blobs.append(data + bytes(-len(data) % 4))
        offset += len(blobs[-1])
    body = struct.pack(">I", len(tags)) + b"".join(entries) + b"".join(blobs)
    header = (
        struct.pack(">I4sI4s4s4s", 128 + len(body), b"lcms", 0x02100000, device_class, space, pcs)
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 0)
        + color._s15(color._D50)
        + b"kpr "
        + bytes(44)
    )
    assert len(header) == 128
    return header + body


def para(func: int, params: tuple[float, ...]) -> bytes:
    return b"para" + bytes(4) + struct.pack(">HH", func, 0) + color._s15(params)


def curv(values: list[int]) -> bytes:
    return b"curv" + bytes(4) + struct.pack(f">I{len(values)}H", len(values), *values)


def curv_gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))


def colorant_tags(space: ColorSpace) -> list[tuple[bytes, bytes]]:
    d50 = color._d50_colorants(space)
    return [(sig, color._xyz_tag(d50[:, k])) for k, sig in enumerate((b"rXYZ", b"gXYZ", b"bXYZ"))]


def matrix_trc(space: ColorSpace, trcs: list[bytes], name: str = "test RGB") -> bytes:
    """A matrix/TRC profile: ``space``'s colorants, one tone curve tag a channel."""
    return icc(
        [
            (b"desc", color._desc_tag(name)),
            (b"wtpt", color._xyz_tag(color._D50)),
            *colorant_tags(space),
            *zip((b"rTRC", b"gTRC", b"bTRC"), trcs, strict=True),
        ]
    )


def lut_a2b0(space: ColorSpace) -> bytes:
    """A lut16 A2B0 tag (gamma 2.2 input tables, a 2x2x2 CLUT of ``space``'s colorants)."""
    grid = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
    xyz = grid @ color._d50_colorants(space).T  # the CLUT's corners, red slowest
    clut = np.clip(np.round(xyz * 32768), 0, 65535).astype(int)  # XYZ in lut16: u1Fixed15
    inputs = np.round(65535 * np.linspace(0, 1, 256) ** 2.2).astype(int)
    identity = color._s15((1, 0, 0, 0, 1, 0, 0, 0, 1))
    return (
        b"mft2"
        + bytes(4)
        + struct.pack(">BBBx", 3, 3, 2)
        + identity
        + struct.pack(">HH", 256, 2)
        + struct.pack(">768H", *np.tile(inputs, 3))
        + struct.pack(f">{clut.size}H", *clut.ravel())
        + struct.pack(">6H", 0, 65535, 0, 65535, 0, 65535)
    )


def lut_profile(with_matrix: bool = False) -> bytes:
    """An RGB profile littlecms converts through its A2B0 LUT (colorants too, if asked: the LUT
    still wins in littlecms)."""
    tags = [(b"desc", color._desc_tag("LUT RGB")), (b"wtpt", color._xyz_tag(color._D50))]
    if with_matrix:
        tags += colorant_tags(ADOBE_RGB) + [
            (t, curv_gamma(2.2)) for t in (b"rTRC", b"gTRC", b"bTRC")
        ]
    return icc([*tags, (b"A2B0", lut_a2b0(ADOBE_RGB))])


def table(n: int, f: object) -> list[int]:
    x = np.linspace(0.0, 1.0, n)
    return [int(v) for v in np.round(65535 * f(x))]  # type: ignore[operator]


# The profiles the fast conversion must agree with littlecms on.
MATRIX_PROFILES = {
    "display_p3": lambda: rgb_profile(DISPLAY_P3),  # para type 3 (sRGB's curve)
    "adobe_rgb": lambda: rgb_profile(ADOBE_RGB),  # curv gamma 563/256
    "prophoto_rgb": lambda: rgb_profile(PROPHOTO_RGB),  # curv gamma 1.8, D50 white
    "para3_srgb_like": lambda: matrix_trc(ADOBE_RGB, [para(3, SRGB_PARAMS)] * 3),
    "curv_table_1024": lambda: matrix_trc(PROPHOTO_RGB, [curv(table(1024, lambda x: x**2.2))] * 3),
    "curv_tables_mixed": lambda: matrix_trc(
        DISPLAY_P3,
        [
            curv(table(37, lambda x: np.where(x < 0.1, x / 5, x**1.7))),
            curv([0, 65535]),
            curv([]),  # no entries: identity
        ],
    ),
    "para_types_0_1_2": lambda: matrix_trc(
        DISPLAY_P3, [para(0, (1.9,)), para(1, (2.2, 1.0, 0.0)), para(2, (2.0, 1.0, 0.0, 0.0))]
    ),
    "para4": lambda: matrix_trc(
        DISPLAY_P3, [para(4, (*SRGB_PARAMS, 0.0, 0.0))] * 2 + [para(3, SRGB_PARAMS)]
    ),
}

# Every 8th level and the top one: 33^3 colours, extremes included.
LEVELS = np.array([*range(0, 256, 8), 255], dtype=np.uint8)
GRID = np.stack(np.meshgrid(LEVELS, LEVELS, LEVELS, indexing="ij"), -1).reshape(33, 33 * 33, 3)


def littlecms(rgb: np.ndarray, profile: bytes) -> np.ndarray:
    transform = srgb_transform({"icc_profile": profile}, "RGB")
    assert transform is not None
    return np.asarray(convert_to_srgb(Image.fromarray(rgb), transform))


def fast(rgb: np.ndarray, matrix: MatrixProfile) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    return matrix.to_srgb(chw).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- the parser


@pytest.mark.parametrize("case", sorted(MATRIX_PROFILES))
def test_matrix_trc_profiles_parse(case: str) -> None:
    matrix = matrix_profile(MATRIX_PROFILES[case]())
    assert matrix is not None
    assert matrix.matrix.shape == (3, 3)
    assert matrix.linear.shape == (3, 256)
    assert (matrix.linear[:, 0] == 0).all()
    assert np.allclose(matrix.linear[:, 255], 1.0, atol=1e-4)  # every curve here ends at 1
    # white stays white: the D50 colorants of any of these spaces sum to sRGB's (D50) white
    assert np.allclose(matrix.matrix.sum(axis=1), 1.0, atol=2e-3)


def test_parsed_curves_and_matrix_are_the_colour_spaces() -> None:
    matrix = matrix_profile(rgb_profile(ADOBE_RGB))
    assert matrix is not None
    levels = np.arange(256) / 255
    np.testing.assert_allclose(matrix.linear[1], levels ** (563 / 256), atol=1e-6)
    # Adobe RGB's red and blue primaries are sRGB's, its green is greener: pure green has
    # negative sRGB red and blue (clipped), and sRGB red needs more than Adobe red
    np.testing.assert_allclose(matrix.matrix[1], [0.0, 1.0, 0.0], atol=2e-3)
    assert matrix.matrix[0, 0] > 1.3
    assert matrix.matrix[0, 1] < -0.3
    assert matrix.matrix[2, 1] < -0.03
    p3 = matrix_profile(rgb_profile(DISPLAY_P3))
    assert p3 is not None
    srgb_curve = np.where(levels <= 0.04045, levels / 12.92, ((levels + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(p3.linear[0], srgb_curve, atol=1e-4)  # s15Fixed16 parameters


# Tone curves that do not start at 0: littlecms compensates the black point for them.
BLACK_LIFTED_TRC = {
    "para4": para(4, (2.2, 1.0, 0.0, 1.0, 0.1, 0.0, 0.02)),  # Y = X + 0.02 below 0.1
    "table": curv([512, 65535]),
}


def black_lifted(case: str) -> bytes:
    return matrix_trc(ADOBE_RGB, [BLACK_LIFTED_TRC[case]] * 3)


def grey_profile() -> bytes:
    return icc(
        [(b"desc", color._desc_tag("grey")), (b"kTRC", curv_gamma(2.2))],
        space=b"GRAY",
    )


def truncated(profile: bytes) -> bytes:
    return profile[: len(profile) - 40]


NOT_MATRIX = {
    "lut_a2b0": lut_profile,
    "lut_a2b0_with_colorants": lambda: lut_profile(with_matrix=True),
    "grey": grey_profile,
    "cmyk": lambda: icc([(b"A2B0", lut_a2b0(ADOBE_RGB))], space=b"CMYK"),
    "lab_pcs": lambda: icc(colorant_tags(ADOBE_RGB), pcs=b"Lab "),
    "device_link": lambda: rgb_profile(ADOBE_RGB)[:12] + b"link" + rgb_profile(ADOBE_RGB)[16:],
    "missing_btrc": lambda: matrix_trc(ADOBE_RGB, [curv_gamma(2.2)] * 3).replace(b"bTRC", b"xTRC"),
    "xyz_tag_of_wrong_type": lambda: matrix_trc(ADOBE_RGB, [curv_gamma(2.2)] * 3).replace(
        b"XYZ \x00\x00\x00\x00", b"XYZZ\x00\x00\x00\x00"
    ),
    "para_type_7": lambda: matrix_trc(ADOBE_RGB, [para(7, (2.2,))] * 3),
    "black_lifted_para4": lambda: black_lifted("para4"),
    "black_lifted_table": lambda: black_lifted("table"),
    "truncated": lambda: truncated(rgb_profile(DISPLAY_P3)),
    "tag_count_lies": lambda: (p := rgb_profile(DISPLAY_P3))[:128] + b"\xff\xff\xff\xff" + p[132:],
    "empty": lambda: b"",
    "garbage": lambda: np.random.default_rng(0).integers(0, 256, 600, np.uint8).tobytes(),
    "garbage_with_signature": lambda: bytes(36) + b"acsp" + bytes(200),
}


@pytest.mark.parametrize("case", sorted(NOT_MATRIX))
def test_other_profiles_are_not_matrix_profiles(case: str) -> None:
    assert matrix_profile(NOT_MATRIX[case]()) is None


@pytest.mark.parametrize("case", sorted(BLACK_LIFTED_TRC))
def test_black_lifted_curves_are_left_to_littlecms(case: str) -> None:
    """Their black is not 0 (the matrix would give grey) but littlecms makes it black: BPC."""
    curve = color._read_curve(BLACK_LIFTED_TRC[case])
    assert curve is not None
    assert curve[0] > 0.001
    black = np.zeros((1, 1, 3), np.uint8)
    assert littlecms(black, black_lifted(case)).tolist() == [[[0, 0, 0]]]


def test_lut_profiles_are_ones_littlecms_converts() -> None:
    """The LUT cases above are real: littlecms converts them (so only it may)."""
    for profile in (lut_profile(), lut_profile(with_matrix=True)):
        assert srgb_transform({"icc_profile": profile}, "RGB") is not None
        assert srgb_matrix({"icc_profile": profile}, "RGB") is None
        out = littlecms(GRID, profile)
        assert np.abs(out.astype(int) - GRID).max() > 10  # it did convert


def test_srgb_matrix_follows_srgb_transform() -> None:
    p3 = rgb_profile(DISPLAY_P3)
    assert srgb_matrix({"icc_profile": p3}, "RGB") is matrix_profile(p3)  # cached, one object
    assert srgb_matrix({"icc_profile": p3}, "L") is None  # an RGB profile on grey: no conversion
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert matrix_profile(srgb_icc) is not None  # matrix/TRC, but sRGB: nothing to convert
    assert srgb_matrix({"icc_profile": srgb_icc}, "RGB") is None
    assert srgb_matrix({}, "RGB") is None
    nclx = {
        "color_primaries": 12,
        "transfer_characteristics": 13,
        **{
            f"color_primary_{c}_{a}": v
            for c, xy in zip(
                ("red", "green", "blue", "white"),
                (DISPLAY_P3.red, DISPLAY_P3.green, DISPLAY_P3.blue, DISPLAY_P3.white),
                strict=True,
            )
            for a, v in zip("xy", xy, strict=True)
        },
    }
    assert srgb_matrix({"nclx_profile": nclx}, "RGB") is not None


# ---------------------------------------------------------------- agreement with littlecms


@pytest.mark.parametrize("case", sorted(MATRIX_PROFILES))
def test_conversion_agrees_with_littlecms(case: str) -> None:
    profile = MATRIX_PROFILES[case]()
    matrix = matrix_profile(profile)
    assert matrix is not None
    want = littlecms(GRID, profile).astype(int)
    diff = np.abs(fast(GRID, matrix).astype(int) - want)
    assert diff.max() <= 1, diff.max()
    assert diff.mean() < 0.3, diff.mean()
    assert np.abs(want - GRID).max() > 10  # the profile really converts: not a vacuous check


@pytest.mark.parametrize("case", sorted(MATRIX_PROFILES))
def test_conversion_is_littlecms_bit_for_bit(case: str) -> None:
    """littlecms's own fixed-point matrix-shaper arithmetic: the same bytes (measured on all
    2^24 colours). The fast backends' pixels equal the reference's because of it."""
    profile = MATRIX_PROFILES[case]()
    matrix = matrix_profile(profile)
    assert matrix is not None
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (64, 512, 3), np.uint8)
    for rgb in (GRID, noise):
        np.testing.assert_array_equal(fast(rgb, matrix), littlecms(rgb, profile))


def test_to_srgb_takes_batches_and_any_strides() -> None:
    matrix = matrix_profile(rgb_profile(DISPLAY_P3))
    assert matrix is not None
    rng = np.random.default_rng(2)
    hwc = rng.integers(0, 256, (4, 24, 40, 3), np.uint8)
    want = np.stack([littlecms(im, rgb_profile(DISPLAY_P3)) for im in hwc])
    nchw = torch.from_numpy(hwc).permute(0, 3, 1, 2)  # channels-last strides
    out = matrix.to_srgb(nchw)
    assert out.shape == nchw.shape
    assert out.dtype == torch.uint8
    assert out.stride() == nchw.stride()  # so the HWC view back is contiguous
    np.testing.assert_array_equal(out.permute(0, 2, 3, 1).numpy(), want)
    np.testing.assert_array_equal(matrix.to_srgb(nchw[1].contiguous()).numpy(), out[1].numpy())
    for bad in (nchw.float(), nchw[:, :2], torch.zeros(3, 5, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            matrix.to_srgb(bad)


# ---------------------------------------------------------------- EXIF: untagged Adobe RGB

ADOBE_GREEN = (40, 220, 40)  # saturated, inside Adobe RGB, outside sRGB


def exif(color_space: int | None, index: str | None) -> bytes:
    """EXIF with ColorSpace in the Exif IFD and InteroperabilityIndex in the Interop IFD."""
    data = Image.Exif()
    exif_ifd = data.get_ifd(ExifTags.IFD.Exif)
    if color_space is not None:
        exif_ifd[ExifTags.Base.ColorSpace] = color_space
    if index is not None:
        exif_ifd[ExifTags.IFD.Interop] = {0x0001: index}
    data[ExifTags.Base.Make] = "test"
    return data.tobytes()


def green_jpeg(exif_bytes: bytes | None, **kw: object) -> bytes:
    im = Image.new("RGB", (48, 32), ADOBE_GREEN)
    im.paste((200, 100, 50), (0, 0, 16, 32))
    extra = {} if exif_bytes is None else {"exif": exif_bytes}
    return encode(im, "JPEG", quality=100, subsampling=0, **extra, **kw)


def test_exif_tags_are_written_as_cameras_write_them() -> None:
    info = Image.open(io.BytesIO(green_jpeg(exif(0xFFFF, "R03")))).info
    assert "icc_profile" not in info
    parsed = Image.Exif()
    parsed.load(info["exif"])
    assert parsed.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.ColorSpace] == 0xFFFF
    assert parsed.get_ifd(ExifTags.IFD.Interop)[1] == "R03"


def test_exif_adobe_rgb_is_converted_as_littlecms_says() -> None:
    plain = decode_image(green_jpeg(None))
    out = decode_image(green_jpeg(exif(0xFFFF, "R03")))
    want = littlecms(np.asarray(plain), rgb_profile(ADOBE_RGB))
    np.testing.assert_array_equal(np.asarray(out), want)
    before = np.asarray(plain)[16, 40].astype(int)
    assert np.abs(before - ADOBE_GREEN).max() <= 1  # q100 4:4:4: the colour as written
    r, g, b = np.asarray(out)[16, 40].astype(int)
    assert (r, b) == (0, 0)  # outside sRGB: red and blue clip
    assert g >= before[1]  # and green stays as bright: a more saturated green


@pytest.mark.parametrize(
    ("exif_bytes", "why"),
    [
        pytest.param(exif(1, "R98"), "sRGB, as DCF writes it", id="srgb"),
        pytest.param(exif(0xFFFF, "R98"), "uncalibrated, the sRGB index", id="ffff_r98"),
        pytest.param(exif(1, "R03"), "ColorSpace says sRGB", id="1_r03"),
        pytest.param(exif(0xFFFF, None), "no Interoperability IFD", id="no_interop"),
        pytest.param(exif(None, "R03"), "no ColorSpace", id="no_colorspace"),
        pytest.param(b"Exif\x00\x00MM\x00*R03" + bytes(20), "broken EXIF holding R03", id="broken"),
    ],
)
def test_other_exif_stays_srgb(exif_bytes: bytes, why: str) -> None:
    plain = np.asarray(decode_image(green_jpeg(None)))
    np.testing.assert_array_equal(np.asarray(decode_image(green_jpeg(exif_bytes))), plain, why)


def test_an_icc_profile_wins_over_exif() -> None:
    srgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    plain = np.asarray(decode_image(green_jpeg(None)))
    tagged_srgb = green_jpeg(exif(0xFFFF, "R03"), icc_profile=srgb_icc)
    np.testing.assert_array_equal(np.asarray(decode_image(tagged_srgb)), plain)
    tagged_p3 = green_jpeg(exif(0xFFFF, "R03"), icc_profile=rgb_profile(DISPLAY_P3))
    np.testing.assert_array_equal(
        np.asarray(decode_image(tagged_p3)), littlecms(plain, rgb_profile(DISPLAY_P3))
    )


def test_exif_rule_needs_rgb_pixels() -> None:
    grey = encode(Image.new("L", (32, 32), 90), "JPEG", exif=exif(0xFFFF, "R03"))
    assert decode_image(grey).getpixel((4, 4)) == (90, 90, 90)
    info = {"exif": exif(0xFFFF, "R03")}
    assert srgb_transform(info, "L") is None
    assert srgb_transform(info, "RGB") is not None
    assert srgb_matrix(info, "RGB") is matrix_profile(rgb_profile(ADOBE_RGB))


def test_damaged_profiles_parse_or_give_none_never_raise() -> None:
    """Seeded random damage to real matrix/TRC profiles: matrix_profile answers a profile or
    None (the image keeps littlecms's path, or none), never an exception; and a profile it
    does answer converts pixels without error."""
    import random

    rng = random.Random("matrix-profile-damage")
    answered = none = 0
    for space in (DISPLAY_P3, ADOBE_RGB, PROPHOTO_RGB):
        base = rgb_profile(space)
        for _ in range(200):
            data = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                if rng.random() < 0.8:
                    data[at] = rng.randrange(256)
                else:
                    del data[at:]
            got = matrix_profile(bytes(data))
            if got is None:
                none += 1
                continue
            answered += 1
            px = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
            out = got.to_srgb(px)
            assert out.dtype == torch.uint8
            assert out.shape == px.shape
    assert answered  # the damage reached both answers
    assert none
