"""keeper_core.images: every case is built in code (no binary fixtures)."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from PIL import Image, ImageFile, features
from pydantic import ValidationError
from support import jpeg_with_scans, png_declaring

from keeper_core.errors import ConfigError, ImageDecodeError
from keeper_core.images import (
    DecodeLimits,
    decode_image,
    decode_image_alpha,
    decode_jpeg_band,
    image_size,
    jpeg_scan_count,
    sniff_is_image,
)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """Incompressible content, so a file cut in half really loses pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg_with_orientation(w: int, h: int, orientation: int, block: int = 16) -> bytes:
    """A white w x h JPEG with a red stored top-left and a blue stored top-right block."""
    im = Image.new("RGB", (w, h), WHITE)
    im.paste(RED, (0, 0, block, block))
    im.paste(BLUE, (w - block, 0, w, block))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def corner(im: Image.Image, where: str, inset: int = 6) -> tuple[int, int, int]:
    w, h = im.size
    x = inset if where[1] == "L" else w - 1 - inset
    y = inset if where[0] == "T" else h - 1 - inset
    return im.getpixel((x, y))  # type: ignore[return-value]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- limits


def test_limits_defaults_and_validation() -> None:
    lim = DecodeLimits()
    assert (lim.max_pixels, lim.min_side, lim.max_bytes) == (64_000_000, 16, 64 * 1024 * 1024)
    with pytest.raises(ValidationError, match="max_pixels"):
        DecodeLimits(max_pixels=0)
    with pytest.raises(ValidationError, match="min_side"):
        DecodeLimits(min_side=0)
    with pytest.raises(ValidationError, match="max_byte"):
        DecodeLimits(max_byte=10)  # type: ignore[call-arg]  # typo: extra fields are refused
    with pytest.raises(ValidationError):
        lim.max_pixels = 1  # frozen


@pytest.mark.parametrize("bad", [(0, 10), (10,), (10.0, 10), (-1, 5), "224", (True, 10)])
def test_bad_draft_size_is_config_error(bad: object) -> None:
    data = encode(Image.new("RGB", (32, 32)), "JPEG")
    with pytest.raises(ConfigError, match="draft_size"):
        decode_image(data, draft_size=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- orientation


# orientation -> (display size swapped?, where stored top-left lands, where stored top-right lands)
ORIENTATIONS = {
    1: (False, "TL", "TR"),
    2: (False, "TR", "TL"),  # mirrored horizontally
    3: (False, "BR", "BL"),  # rotated 180
    4: (False, "BL", "BR"),  # mirrored vertically
    5: (True, "TL", "BL"),  # transposed (x, y) -> (y, x)
    6: (True, "TR", "BR"),  # rotated 90 clockwise
    7: (True, "BR", "TR"),  # transversed
    8: (True, "BL", "TL"),  # rotated 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_applied(orientation: int) -> None:
    swapped, red_at, blue_at = ORIENTATIONS[orientation]
    data = jpeg_with_orientation(64, 48, orientation)
    out = decode_image(data)
    assert out.mode == "RGB"
    assert out.size == ((48, 64) if swapped else (64, 48))
    assert image_size(data) == out.size
    assert close(corner(out, red_at), RED), corner(out, red_at)
    assert close(corner(out, blue_at), BLUE), corner(out, blue_at)
    for other in {"TL", "TR", "BL", "BR"} - {red_at, blue_at}:
        assert close(corner(out, other), WHITE), other


# ---------------------------------------------------------------- modes


def _rgba_png() -> bytes:
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    im.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    return encode(im, "PNG")


def _palette_png_with_transparency() -> bytes:
    im = Image.new("P", (20, 20), 1)
    im.putpalette([255, 0, 0, 0, 255, 0])  # index 0 red, index 1 green
    im.putpixel((0, 0), 0)
    return encode(im, "PNG", transparency=0)  # index 0 is fully transparent


def _la_png() -> bytes:
    im = Image.new("LA", (20, 20), (50, 255))
    im.putpixel((0, 0), (0, 0))
    return encode(im, "PNG")


def _one_bit_png() -> bytes:
    im = Image.new("1", (20, 20), 1)
    im.putpixel((0, 0), 0)
    return encode(im, "PNG")


def _cmyk_jpeg() -> bytes:
    im = Image.new("CMYK", (32, 32), (0, 0, 0, 0))  # no ink: white
    im.paste((255, 0, 0, 0), (16, 0, 32, 32))  # full cyan
    return encode(im, "JPEG", quality=95)


# (encoded image, pixel, expected RGB, tolerance)
MODE_CASES = {
    "rgba_transparent_is_white": (_rgba_png, (0, 0), WHITE, 0),
    "rgba_half_alpha_blends": (_rgba_png, (1, 0), (127, 127, 127), 1),
    "rgba_opaque_kept": (_rgba_png, (5, 5), RED, 0),
    "palette_transparent_is_white": (_palette_png_with_transparency, (0, 0), WHITE, 0),
    "palette_opaque_colour": (_palette_png_with_transparency, (5, 5), GREEN, 0),
    "la_transparent_is_white": (_la_png, (0, 0), WHITE, 0),
    "la_grey": (_la_png, (5, 5), (50, 50, 50), 0),
    "one_bit_black": (_one_bit_png, (0, 0), (0, 0, 0), 0),
    "one_bit_white": (_one_bit_png, (5, 5), WHITE, 0),
    "grey_l": (lambda: encode(Image.new("L", (20, 20), 100), "PNG"), (3, 3), (100, 100, 100), 0),
    "cmyk_no_ink_is_white": (_cmyk_jpeg, (4, 4), WHITE, 8),
    "cmyk_cyan": (_cmyk_jpeg, (28, 4), (0, 255, 255), 8),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_mode_conversion(case: str) -> None:
    make, xy, expected, tol = MODE_CASES[case]
    out = decode_image(make())
    assert out.mode == "RGB"
    assert close(out.getpixel(xy), expected, tol), out.getpixel(xy)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "transparent"),
    [
        (_rgba_png, (0, 0)),
        (_palette_png_with_transparency, (0, 0)),
        (_la_png, (0, 0)),
    ],
)
def test_decode_image_alpha_keeps_the_alpha_it_composited(
    make: object, transparent: tuple[int, int]
) -> None:
    data = make()  # type: ignore[operator]
    rgb, alpha = decode_image_alpha(data)
    assert rgb.tobytes() == decode_image(data).tobytes()  # the pixels are decode_image's
    assert alpha is not None
    assert (alpha.mode, alpha.size) == ("L", rgb.size)
    assert alpha.getpixel(transparent) == 0
    assert alpha.getpixel((5, 5)) == 255


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("RGBA", (20, 20), (10, 20, 30, 255)), "PNG"),  # RGBA, every pixel opaque
        encode(Image.new("RGB", (20, 20), (10, 20, 30)), "PNG"),
        encode(Image.new("L", (20, 20), 9), "PNG"),
        encode(noise(32, 24), "JPEG"),
    ],
    ids=["opaque_rgba", "rgb", "grey", "jpeg"],
)
def test_decode_image_alpha_is_none_without_a_transparent_pixel(data: bytes) -> None:
    rgb, alpha = decode_image_alpha(data)
    assert alpha is None
    assert rgb.tobytes() == decode_image(data).tobytes()


def test_alpha_turns_with_the_pixels() -> None:
    """EXIF orientation applies to the alpha as to the pixels: the transparent corner (white
    once composited) is where the alpha says it is."""
    im = Image.new("RGBA", (30, 20), (200, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 8, 5))  # stored top-left corner transparent
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb, alpha = decode_image_alpha(encode(im, "PNG", exif=exif.tobytes()))
    assert rgb.size == (20, 30)  # turned
    assert alpha is not None
    white = (np.asarray(rgb) == 255).all(axis=-1)
    assert white.sum() == 40
    np.testing.assert_array_equal(np.asarray(alpha) == 0, white)


GRADIENT16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (16, 1))


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("png_i16", lambda: encode(Image.fromarray(GRADIENT16), "PNG")),
        (
            "tiff_i16b",
            lambda: encode(
                Image.frombytes("I;16B", (256, 16), GRADIENT16.astype(">u2").tobytes()), "TIFF"
            ),
        ),
        ("tiff_i32", lambda: encode(Image.fromarray(GRADIENT16.astype(np.int32)), "TIFF")),
    ],
)
def test_16bit_scaled_not_clipped(name: str, make: object) -> None:
    src = Image.open(io.BytesIO(make()))  # type: ignore[operator]
    assert src.mode in ("I;16", "I;16B", "I"), src.mode  # the test really exercises deep modes
    out = np.asarray(decode_image(make()))  # type: ignore[operator]
    expected = np.rint(GRADIENT16[0] / 257.0).astype(np.uint8)  # 65535 -> 255 exactly
    assert np.array_equal(out[0, :, 0], expected)
    assert np.array_equal(out[..., 0], out[..., 2])  # grey stays grey
    assert out[0, 0, 0] == 0
    assert out[0, 255, 0] == 255
    assert 126 <= out[0, 128, 0] <= 129  # the middle is mid-grey, not clipped to white


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # in-range data keeps its absolute scale: a dark frame stays dark
        (np.array([0.2, 0.4, 0.6], dtype=np.float32), [51, 102, 153]),
        (np.array([np.nan, 0.2, np.inf], dtype=np.float32), [0, 51, 0]),  # non-finite -> 0
        (np.linspace(0, 32767, 5).astype(np.int32), [0, 32, 64, 96, 127]),
        # out-of-range data is stretched over its own min..max
        (np.array([-1, 0, 3], dtype=np.float32), [0, 64, 255]),
        (np.array([-10, 0, 10], dtype=np.int32), [0, 128, 255]),
    ],
)
def test_float_and_int32_scaling(values: np.ndarray, expected: list[int]) -> None:
    data = encode(Image.fromarray(np.tile(values, (16, 1))), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == ("F" if values.dtype == np.float32 else "I")
    out = np.asarray(decode_image(data, limits=DecodeLimits(min_side=1)))
    assert out[0, :, 1].tolist() == expected


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})],
)
def test_animated_gives_first_frame(fmt: str, kw: dict[str, object]) -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3  # really animated
    out = decode_image(data)
    assert out.mode == "RGB"
    assert out.size == (32, 32)
    assert out.getpixel((16, 16)) == RED


# ---------------------------------------------------------------- limits and refusals


def test_pixel_bomb_refused_fast_before_decode() -> None:
    data = png_declaring(30_000, 30_000)
    assert len(data) < 200
    t = time.process_time()  # CPU time: the cost of the refusal, not the machine's load
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, source="s3://b/bomb.png")
    assert time.process_time() - t < 1.0
    assert err.value.reason == "too_many_pixels"
    assert err.value.source == "s3://b/bomb.png"


def test_own_pixel_check_does_not_need_pil_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's guard off: ours must still hold
    data = png_declaring(30_000, 30_000)
    assert image_size(data) == (30_000, 30_000)  # header only: nothing allocated
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == "too_many_pixels"
    assert "900000000" in str(err.value)


@pytest.mark.parametrize(
    ("max_pixels", "reason"),
    [(3_999_999, "too_many_pixels"), (4_000_000, "truncated")],  # 2000 x 2000 = 4,000,000
)
def test_pixel_limit_is_configurable_and_checked_first(max_pixels: int, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(png_declaring(2000, 2000), limits=DecodeLimits(max_pixels=max_pixels))
    assert err.value.reason == reason  # under the limit it gets decoded, and the IDAT is short


@pytest.mark.parametrize(
    ("size", "min_side", "ok"),
    [((10, 40), 16, False), ((40, 15), 16, False), ((16, 16), 16, True), ((10, 40), 8, True)],
)
def test_min_side(size: tuple[int, int], min_side: int, ok: bool) -> None:
    data = encode(Image.new("RGB", size, RED), "PNG")
    limits = DecodeLimits(min_side=min_side)
    if ok:
        assert decode_image(data, limits=limits).size == size
    else:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data, limits=limits)
        assert err.value.reason == "too_small"


def test_max_bytes() -> None:
    data = encode(noise(32, 32), "PNG")
    assert decode_image(data, limits=DecodeLimits(max_bytes=len(data))).size == (32, 32)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, limits=DecodeLimits(max_bytes=len(data) - 1))
    assert err.value.reason == "too_large"


def _cut(fmt: str, fraction: float) -> bytes:
    data = encode(noise(96, 64), fmt)
    return data[: int(len(data) * fraction)]


BAD_INPUTS = {
    "empty": (lambda: b"", "empty"),
    "jpeg_scan_bomb": (lambda: jpeg_with_scans(300), "too_many_scans"),
    "random_bytes": (lambda: np.random.default_rng(3).bytes(4096), "not_image"),
    "text": (lambda: b"hello, this is not an image\n" * 10, "not_image"),
    "bm_text": (lambda: b"BMW is a car, not a bitmap\n" * 4, "not_image"),
    "jpeg_half": (lambda: _cut("JPEG", 0.5), "truncated"),
    "jpeg_most": (lambda: _cut("JPEG", 0.95), "truncated"),
    "jpeg_header_only": (lambda: _cut("JPEG", 0.02), "truncated"),
    "png_half": (lambda: _cut("PNG", 0.5), "truncated"),
    "png_signature_only": (lambda: b"\x89PNG\r\n\x1a\n\x00\x00", "truncated"),
    "gif_half": (lambda: _cut("GIF", 0.5), "truncated"),
    "webp_half": (lambda: _cut("WEBP", 0.5), "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_reasons(case: str) -> None:
    make, reason = BAD_INPUTS[case]
    with pytest.raises(ImageDecodeError) as err:
        decode_image(make(), source=f"mem://{case}")
    assert err.value.reason == reason
    assert err.value.source == f"mem://{case}"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped globally


def test_lab_is_unsupported_not_miscoloured() -> None:
    data = encode(Image.new("LAB", (20, 20), (50, 0, 0)), "TIFF")  # PIL's convert() garbles it
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == "unsupported"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the metadata we break
def test_corrupted_bytes_never_escape_as_other_errors() -> None:
    """Flip a few bytes of real files: the result is an RGB image or an ImageDecodeError."""
    rng = np.random.default_rng(7)
    base = noise(40, 32)
    reasons: set[str] = set()
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"):
        data = encode(base, fmt)
        for _ in range(60):
            b = bytearray(data)
            for pos in rng.integers(0, len(b), size=3):
                b[pos] = int(rng.integers(0, 256))
            try:
                assert decode_image(bytes(b)).mode == "RGB"
            except ImageDecodeError as e:
                reasons.add(e.reason)
    assert "truncated" in reasons


@pytest.mark.parametrize("bad", ["not bytes", None, 123])
def test_non_bytes_input_is_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="bytes"):
        decode_image(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- draft mode


def test_draft_decodes_smaller_but_not_below_request() -> None:
    data = encode(noise(2000, 1500), "JPEG", quality=90)
    full = decode_image(data)
    small = decode_image(data, draft_size=(224, 224))
    assert full.size == (2000, 1500)
    # scale = min(2000 // 224, 1500 // 224) = 6 -> the largest DCT step <= 6 is 1/4
    assert small.size == (500, 375)
    assert small.mode == "RGB"
    assert min(small.size) >= 224


def test_draft_ignored_for_non_jpeg_and_small_jpeg() -> None:
    png = encode(noise(600, 400), "PNG")
    assert decode_image(png, draft_size=(100, 100)).size == (600, 400)
    jpg = encode(noise(300, 200), "JPEG")
    assert decode_image(jpg, draft_size=(224, 224)).size == (300, 200)  # < 2x: no gain


@pytest.mark.parametrize(
    ("draft", "expected"),
    [
        # displayed 1500x2000; stored 2000x1500 with orientation 6
        ((224, 224), (375, 500)),  # stored 1/4 -> 500x375, displayed 375x500
        # swapped to stored (200, 1000): scale = min(10, 1) = 1. Unswapped it would pick 1/2
        # and return 750x1000, narrower than the 1000 asked for.
        ((1000, 200), (1500, 2000)),
        ((300, 900), (750, 1000)),  # stored request (900, 300): scale = min(2, 5) -> 1/2
    ],
)
def test_draft_with_exif_orientation(draft: tuple[int, int], expected: tuple[int, int]) -> None:
    data = jpeg_with_orientation(2000, 1500, 6, block=160)
    out = decode_image(data, draft_size=draft)
    assert out.size == expected
    assert out.size[0] >= draft[0]
    assert out.size[1] >= draft[1]
    # orientation 6: stored top-left -> displayed top-right, stored top-right -> bottom-right
    assert close(corner(out, "TR", inset=10), RED)
    assert close(corner(out, "BR", inset=10), BLUE)
    assert close(corner(out, "TL", inset=10), WHITE)


# ---------------------------------------------------------------- header-only helpers


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("TIFF", {}),
        ("BMP", {}),
        pytest.param(
            "AVIF", {}, marks=pytest.mark.skipif(not features.check("avif"), reason="no AVIF")
        ),
    ],
)
def test_sniff_and_size_for_real_files(fmt: str, kw: dict[str, object]) -> None:
    data = encode(noise(37, 23), fmt, **kw)
    assert sniff_is_image(data)
    assert sniff_is_image(data[:32])  # a file's head is enough
    assert image_size(data) == (37, 23)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xd8",
        b"GIF8",
        b"BM" + b"x" * 40,
        b"RIFF\x00\x00\x00\x00WAVE",
        b"%PDF-1.7\n",
        b"PK\x03\x04",
    ],
)
def test_sniff_rejects_non_images(data: bytes) -> None:
    assert not sniff_is_image(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"plain text, no image here", "not_image"),
        (b"\xff\xd8\xff\xe0\x00", "truncated"),
    ],
)
def test_image_size_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as err:
        image_size(data)
    assert err.value.reason == reason


def test_image_size_does_not_decode_pixels() -> None:
    # A truncated file still has a readable header: size works, a full decode does not.
    cut = _cut("PNG", 0.5)
    assert image_size(cut) == (96, 64)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(cut)


# ---------------------------------------------------------------- full-resolution JPEG band


def _luma(data: bytes) -> np.ndarray:
    """A full decode of the same JPEG as greyscale: what the band must be the top rows of."""
    im = Image.open(io.BytesIO(data))
    im.draft("L", None)  # no-op for CMYK, converted below
    im.load()
    return np.asarray(im.convert("L"))


@pytest.mark.parametrize(
    ("mode", "kw"),
    [
        ("RGB", {}),  # baseline 4:2:0
        ("RGB", {"progressive": True}),
        ("RGB", {"subsampling": 0}),  # 4:4:4: 8-row MCUs
        ("RGB", {"restart_marker_rows": 1}),  # RST markers in the skipped rest of the scan
        ("L", {}),
        ("CMYK", {}),
    ],
)
def test_jpeg_band_is_the_top_rows_at_full_resolution(mode: str, kw: dict[str, object]) -> None:
    data = encode(noise(1000, 700).convert(mode), "JPEG", quality=80, **kw)
    full = _luma(data)
    # 100_000 pixels of a 1000-wide image: 100 rows, rounded up to whole 16-row stripes.
    band = decode_jpeg_band(data, pixels=100_000)
    assert (band.mode, band.size) == ("L", (1000, 112))
    np.testing.assert_array_equal(np.asarray(band), full[:112])
    assert decode_jpeg_band(data, pixels=1).size == (1000, 64)  # at least 8 rows of blocks
    assert decode_jpeg_band(data, pixels=10**9).size == (1000, 700)  # at most the image


def test_jpeg_band_skips_a_frame_header_inside_another_segment() -> None:
    data = encode(noise(300, 200), "JPEG", quality=80)
    # An APP segment (an EXIF thumbnail, say) holding a SOF that declares 16 x 16: walking by
    # segment lengths never reads it as the frame's.
    fake_sof = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + b"\x00" * 9
    app = b"\xff\xe9" + struct.pack(">H", 2 + len(fake_sof)) + fake_sof
    data = data[:2] + app + data[2:]
    band = decode_jpeg_band(data, pixels=300 * 80)
    assert band.size == (300, 80)
    np.testing.assert_array_equal(np.asarray(band), _luma(data)[:80])


def test_jpeg_band_refuses_what_it_cannot_band() -> None:
    with pytest.raises(ImageDecodeError) as err:
        decode_jpeg_band(encode(noise(64, 64), "PNG"), pixels=100, source="s3://b/x.png")
    assert (err.value.reason, err.value.source) == ("unsupported", "s3://b/x.png")
    data = bytearray(encode(noise(64, 64), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = b"\x00\x00"  # height 0: deferred to a DNL marker
    with pytest.raises(ImageDecodeError, match="DNL") as err:
        decode_jpeg_band(bytes(data), pixels=100)
    assert err.value.reason == "unsupported"


# ---------------------------------------------------------------- scan bombs


def test_scan_count_walks_markers_not_bytes() -> None:
    rgb = noise(96, 64)
    assert jpeg_scan_count(encode(rgb, "JPEG")) == 1
    assert jpeg_scan_count(encode(rgb, "JPEG", progressive=True)) == 10  # libjpeg's script
    assert jpeg_scan_count(encode(rgb.convert("L"), "JPEG", progressive=True)) == 6
    assert jpeg_scan_count(encode(rgb, "JPEG", restart_marker_rows=1)) == 1  # RSTn inside
    assert jpeg_scan_count(jpeg_with_scans(300)) == 310
    # Bytes reading FF DA inside another segment (an APP15 here, an ICC profile or a
    # thumbnail in the wild) are not scans; nor is an MPO's second picture after the EOI.
    base = encode(rgb, "JPEG")
    app = b"\xff\xef" + struct.pack(">H", 2 + 600) + b"\xff\xda" * 300
    fake = base[:2] + app + base[2:]
    assert fake.count(b"\xff\xda") == 301
    assert jpeg_scan_count(fake) == 1
    assert decode_image(fake, limits=DecodeLimits(max_jpeg_scans=1)).size == (96, 64)
    mpo = encode(rgb, "MPO", save_all=True, append_images=[noise(96, 64, seed=2)])
    assert mpo.count(b"\xff\xda") >= 2
    assert jpeg_scan_count(mpo) == 1
    assert jpeg_scan_count(base[: len(base) // 2]) == 1  # cut short: the scans it has


@pytest.mark.parametrize(("limit", "ok"), [(9, False), (10, True)])
def test_scan_limit_is_configurable(limit: int, ok: bool) -> None:
    data = encode(noise(96, 64), "JPEG", progressive=True)
    limits = DecodeLimits(max_jpeg_scans=limit)
    if ok:
        assert decode_image(data, limits=limits).size == (96, 64)
        return
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, limits=limits, source="s3://b/p.jpg")
    assert err.value.reason == "too_many_scans"
    assert "10 scans > limit 9" in str(err.value)
    assert err.value.source == "s3://b/p.jpg"


def test_scan_bomb_refused_fast_before_decode() -> None:
    """2,000 repeated scans of a 1600x1200 JPEG (13 MB): 0.7 s of libjpeg time here (3,000 on a
    12 MP photo took 13 s; a crafted file with end-of-band runs packs far more scans into the
    same bytes), refused from the bytes alone in ~0.03 s."""
    data = jpeg_with_scans(2000, (1600, 1200))
    assert len(data) <= DecodeLimits().max_bytes
    t = time.process_time()  # CPU time: the cost of the refusal, not the machine's load
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert time.process_time() - t < 1.0
    assert err.value.reason == "too_many_scans"
