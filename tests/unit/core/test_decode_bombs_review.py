"""Decode bombs a header check missed (security review): a TIFF's oversized tiles, ICC profiles
kept alive by the transform caches, and junk bytes that sent keeper's JPEG header walks astray.

Every file is built in code. Nothing here allocates what the old code did: the TIFF cases
refuse before any load (a load would fail the test), the ICC cases use profiles of a few MiB.
"""

from __future__ import annotations

import io
import logging
import struct
import sys
import uuid
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin, TiffImagePlugin
from support import jpeg_with_scans
from test_color_cmyk import NEUTRAL_BLACK, cmyk_jpeg, cmyk_profile
from test_images import encode, noise

from keeper_core import color, preparation
from keeper_core.color import DISPLAY_P3, ColorSpace, matrix_profile, rgb_profile, srgb_transform
from keeper_core.decoders import _complete
from keeper_core.errors import ImageDecodeError
from keeper_core.images import (
    DecodeLimits,
    _jpeg_frame_offset,
    decode_image,
    decode_jpeg_band,
    jpeg_scan_count,
)
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES, quality_features

SPEC = "keeper-tiny:random"
BLOCK, WIDTH, HEIGHT = (FEATURE_NAMES.index(f) for f in ("blockiness", "width", "height"))

# ---------------------------------------------------------------- TIFF tiles


def tiff(
    pixels: np.ndarray,
    *,
    tile: tuple[int, int] | None = None,
    rows_per_strip: int | None = None,
    chunks: list[bytes] | None = None,
) -> bytes:
    """A little-endian 8-bit RGB deflate TIFF of ``pixels`` (H, W, 3), tiled or in one strip.

    ``chunks`` replaces the compressed tiles or strip (what the header declares stays).
    """
    h, w = pixels.shape[:2]
    if chunks is None:
        if tile is None:
            chunks = [zlib.compress(pixels.tobytes())]
        else:  # tiles left to right, top to bottom, padded past the image's edge
            tw, th = tile
            chunks = []
            for y in range(0, h, th):
                for x in range(0, w, tw):
                    t = np.zeros((th, tw, 3), np.uint8)
                    part = pixels[y : y + th, x : x + tw]
                    t[: part.shape[0], : part.shape[1]] = part
                    chunks.append(zlib.compress(t.tobytes()))
    n = len(chunks)
    place = (273, 279) if tile is None else (324, 325)  # offsets, byte counts
    layout = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 8), (262, 3, 2), (277, 3, 3)]
    layout += [(284, 3, 1), (339, 3, 1)]  # 8-bit RGB, deflate, contiguous, unsigned
    if tile is None:
        layout.append((278, 4, rows_per_strip or h))
    else:
        layout += [(322, 4, tile[0]), (323, 4, tile[1])]
    count = len(layout) + 2
    bps_at = 8 + 2 + 12 * count + 4
    offsets_at = bps_at + 6
    sizes_at = offsets_at + 4 * n
    first = sizes_at + 4 * n
    offsets = [first + sum(len(c) for c in chunks[:k]) for k in range(n)]
    sizes = [len(c) for c in chunks]
    ifd = []
    for tag, typ, value in layout:
        if tag == 258:  # BitsPerSample 8, 8, 8: three SHORTs, out of line
            ifd.append(struct.pack("<HHII", tag, typ, 3, bps_at))
        elif typ == 3:
            ifd.append(struct.pack("<HHIHH", tag, typ, 1, value, 0))
        else:
            ifd.append(struct.pack("<HHII", tag, typ, 1, value))
    for tag, values, at in ((place[0], offsets, offsets_at), (place[1], sizes, sizes_at)):
        ifd.append(struct.pack("<HHII", tag, 4, n, values[0] if n == 1 else at))
    ifd.sort(key=lambda entry: struct.unpack_from("<H", entry)[0])  # TIFF: ascending tags
    out = b"II*\x00" + struct.pack("<IH", 8, count) + b"".join(ifd) + struct.pack("<I", 0)
    out += struct.pack("<3H", 8, 8, 8) + struct.pack(f"<{n}I", *offsets)
    out += struct.pack(f"<{n}I", *sizes)
    assert len(out) == first
    return out + b"".join(chunks)


@pytest.fixture
def no_tiff_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TIFF load fails the test: the refusal must come from the header, before any tile is
    inflated (and the old code's gigabytes are never allocated here)."""

    def load(self: TiffImagePlugin.TiffImageFile) -> None:
        raise AssertionError(f"a {self.size} TIFF was loaded")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", load)


@pytest.mark.parametrize(
    ("size", "tile", "why"),
    [
        # the reviewer's file: 2 GiB of zeros inflated for a 64x64 image, from ~2 MB
        ((64, 64), (26752, 26752), "at most 1024x1024"),
        ((64, 64), (16, 2048), "at most 1024x1024"),  # one side is enough
        ((64, 64), (1040, 1040), "at most 1024x1024"),  # just past the floor
        # sides within the image's (3008) and the floor (1024), area 9x the image's
        ((3000, 100), (3008, 1024), "3080192 for a 3000x100 image"),
    ],
)
def test_tiff_tile_far_larger_than_its_image_is_refused_before_decode(
    size: tuple[int, int], tile: tuple[int, int], why: str, no_tiff_load: None
) -> None:
    w, h = size
    data = tiff(np.zeros((h, w, 3), np.uint8), tile=tile, chunks=[zlib.compress(b"\0" * 64)])
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, source="s3://b/tile.tif")
    assert err.value.reason == "too_many_pixels"
    assert f"TIFF tile {tile[0]}x{tile[1]}" in str(err.value)
    assert why in str(err.value)
    assert err.value.source == "s3://b/tile.tif"


def test_tiff_tile_is_refused_above_max_pixels(no_tiff_load: None) -> None:
    pixels = np.zeros((1224, 1225, 3), np.uint8)  # 1,499,400 pixels; tiles 1232x1232 = 1,517,824
    data = tiff(pixels, tile=(1232, 1232), chunks=[zlib.compress(b"\0" * 64)])
    with pytest.raises(ImageDecodeError, match="1517824 for a 1225x1224") as err:
        decode_image(data, limits=DecodeLimits(max_pixels=1_500_000))
    assert err.value.reason == "too_many_pixels"


@pytest.mark.parametrize(
    ("size", "tile"),
    [
        ((100, 80), (256, 256)),  # libtiff's default tile, whatever the image's size
        ((64, 64), (1024, 1024)),  # the floor
        ((300, 200), (128, 128)),  # 6 tiles, 4 of them cut by the edges
        ((1000, 40), (1008, 48)),  # one tile: the image rounded up to 16
    ],
)
def test_tiled_tiff_within_bounds_decodes_exactly(
    size: tuple[int, int], tile: tuple[int, int]
) -> None:
    w, h = size
    pixels = np.asarray(noise(w, h))
    out = decode_image(tiff(pixels, tile=tile))
    assert out.size == (w, h)
    np.testing.assert_array_equal(np.asarray(out), pixels)


@pytest.mark.parametrize("rows_per_strip", [64, 100_000, 2**32 - 1])
def test_strips_longer_than_the_image_are_not_refused(rows_per_strip: int) -> None:
    # libtiff caps a strip's rows at the image's height: nothing to refuse (writers often put
    # 2^32 - 1, "one strip", or any large value here).
    pixels = np.asarray(noise(512, 64))
    out = decode_image(tiff(pixels, rows_per_strip=rows_per_strip))
    np.testing.assert_array_equal(np.asarray(out), pixels)


# ---------------------------------------------------------------- ICC profile caches

CAP = 4 * 1024 * 1024


def unique_p3(name: str) -> bytes:
    """A Display P3 profile whose bytes no other test shares (so no cache holds it yet)."""
    p3 = DISPLAY_P3
    return rgb_profile(ColorSpace(name, p3.red, p3.green, p3.blue, p3.white, p3.trc))


def test_cached_transforms_do_not_keep_the_profile_bytes_alive() -> None:
    # The caches keyed on the bytes: 64 profiles of up to ~16 MiB (a JPEG's APP2 segments) per
    # cache stayed referenced after their requests, ~1 GiB per cache for a client to pin.
    rgb = unique_p3(f"keep-alive {uuid.uuid4()}")
    cmyk = cmyk_profile(name=f"keep-alive CMYK {uuid.uuid4()}")
    before = sys.getrefcount(rgb), sys.getrefcount(cmyk)
    transform = srgb_transform({"icc_profile": rgb}, "RGB")
    assert transform is not None
    assert srgb_transform({"icc_profile": cmyk}, "CMYK") is not None
    matrix = matrix_profile(rgb)
    assert matrix is not None
    assert (sys.getrefcount(rgb), sys.getrefcount(cmyk)) == before
    # still cached, by digest: equal bytes in another object find the same transform
    assert srgb_transform({"icc_profile": bytes(bytearray(rgb))}, "RGB") is transform
    assert matrix_profile(bytes(bytearray(rgb))) is matrix


def _p3_jpeg(icc: bytes | None) -> bytes:
    photo = Image.new("RGB", (32, 32), (200, 40, 30))
    return encode(photo, "JPEG", quality=95, **({} if icc is None else {"icc_profile": icc}))


def cache_misses() -> tuple[int, int]:
    """Profiles the two transform caches have been asked to build so far."""
    return color._icc_transform.cache_info().misses, color._cmyk_transform.cache_info().misses


def test_rgb_profile_over_the_cap_is_left_unused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    icc = unique_p3("oversized P3")
    big = icc + bytes(CAP + 1 - len(icc))  # a valid profile, padded: littlecms would use it
    data = _p3_jpeg(big)
    before = cache_misses()
    with caplog.at_level(logging.WARNING, logger="keeper_core.color"):
        out = decode_image(data)
    assert cache_misses() == before  # neither parsed nor cached
    # as a profile littlecms cannot use: the pixels as decoded, read as sRGB
    np.testing.assert_array_equal(np.asarray(out), np.asarray(decode_image(_p3_jpeg(None))))
    assert f"ICC profile of {CAP + 1} bytes" in caplog.text
    assert "pixels left as sRGB" in caplog.text
    assert color.MAX_ICC_BYTES == CAP


def test_rgb_profile_at_the_cap_is_used() -> None:
    icc = unique_p3("P3 at the cap")
    converted = np.asarray(decode_image(_p3_jpeg(icc)))
    assert not np.array_equal(converted, np.asarray(decode_image(_p3_jpeg(None))))
    padded = decode_image(_p3_jpeg(icc + bytes(CAP - len(icc))))
    np.testing.assert_array_equal(np.asarray(padded), converted)


def test_cmyk_profile_over_the_cap_converts_with_pil_formula_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    icc = cmyk_profile(NEUTRAL_BLACK, name="oversized CMYK")
    data = cmyk_jpeg(icc + bytes(CAP + 1 - len(icc)))
    before = cache_misses()
    with caplog.at_level(logging.WARNING, logger="keeper_core.color"):
        out = decode_image(data)
    assert cache_misses() == before
    reference = Image.open(io.BytesIO(data)).convert("RGB")  # PIL's CMYK formula
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))
    assert f"ICC profile of {CAP + 1} bytes" in caplog.text
    assert "PIL's CMYK formula" in caplog.text


def test_oversized_profile_is_not_read_as_a_matrix_profile() -> None:
    icc = unique_p3("oversized matrix")
    assert matrix_profile(icc) is not None
    assert matrix_profile(icc + bytes(CAP + 1 - len(icc))) is None


# ---------------------------------------------------------------- JPEG header walks

JUNK = {
    # libjpeg and PIL skip all of these between segments (libjpeg warns of extraneous bytes)
    "ff00_ffff": b"\xff\x00\xff\xff",  # the reviewer's: read as a segment 0xFFFF long
    "ff00_only": b"\xff\x00",
    "fill_run": b"\xff\x00\xff\xff\xff\xff\xff",
    "stray_bytes": b"\x00\x12\x34\xff\x00",
}


def _with_junk(data: bytes, junk: bytes, before: bytes) -> bytes:
    at = data.index(before)
    return data[:at] + junk + data[at:]


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    # drafted to 1/4 for the preparation's 256 px; blocky enough to tell the band apart
    return encode(noise(2048, 1536), "JPEG", quality=20)


WHERE = {"app0": b"\xff\xe0", "dqt": b"\xff\xdb", "sof": b"\xff\xc0"}


@pytest.mark.parametrize(
    ("junk", "where"),
    # right after SOI, only junk starting FF: a JPEG's signature is FF D8 FF
    [(j, w) for j in sorted(JUNK) for w in WHERE if JUNK[j][0] == 0xFF or w != "app0"],
)
def test_junk_between_segments_does_not_lose_the_frame_header(
    big_jpeg: bytes, junk: str, where: str
) -> None:
    evil = _with_junk(big_jpeg, JUNK[junk], WHERE[where])
    # libjpeg (through PIL) decodes it as the same image
    np.testing.assert_array_equal(
        np.asarray(decode_image(evil)), np.asarray(decode_image(big_jpeg))
    )
    sof = big_jpeg.index(b"\xff\xc0")
    assert _jpeg_frame_offset(evil) == sof + len(JUNK[junk])
    band = decode_jpeg_band(evil, pixels=2048 * 64)
    np.testing.assert_array_equal(
        np.asarray(band), np.asarray(decode_jpeg_band(big_jpeg, pixels=2048 * 64))
    )
    assert _complete(evil)


@pytest.fixture
def full_size_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of every JPEG decode that ran at 2048x1536, the full size of ``big_jpeg``."""
    loads: list[tuple[int, int]] = []
    real = JpegImagePlugin.JpegImageFile.load

    def load(self: JpegImagePlugin.JpegImageFile) -> object:
        out = real(self)
        if self.size == (2048, 1536):
            loads.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    return loads


def test_junk_before_the_frame_header_is_measured_on_the_band(
    big_jpeg: bytes, full_size_loads: list[tuple[int, int]]
) -> None:
    prep = ImagePreparation(SPEC)
    plain = prep.decode(big_jpeg)
    evil = prep.decode(_with_junk(big_jpeg, JUNK["ff00_ffff"], b"\xff\xc0"))
    assert plain.image.size == evil.image.size == (512, 384)  # drafted by 1/4
    assert evil.blockiness is not None
    assert evil.blockiness == plain.blockiness
    assert full_size_loads == []


def test_no_band_means_the_draft_is_measured_never_a_full_decode(
    big_jpeg: bytes, full_size_loads: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever else defeats the band (a header keeper's walk cannot follow): the old fallback
    # decoded the whole image: 16x the pixels a request's budget counted for this draft (64x
    # for a draft at 1/8).
    def no_band(data: bytes, *, pixels: int, source: str | None = None) -> Image.Image:
        raise ImageDecodeError("unsupported", "no JPEG frame header", source=source)

    monkeypatch.setattr(preparation, "decode_jpeg_band", no_band)
    prep = ImagePreparation(SPEC)
    decoded = prep.decode(big_jpeg)
    assert decoded.image.size == (512, 384)
    assert full_size_loads == []
    assert decoded.blockiness is None  # measured on the draft, as an undrafted image is
    feats = prep.quality([decoded])[0]
    on_draft = quality_features([decoded.image])[0]
    assert feats[BLOCK] == on_draft[BLOCK]
    assert (feats[WIDTH], feats[HEIGHT]) == (2048, 1536)


def test_junk_between_segments_does_not_hide_scans() -> None:
    # 310 scans (10 + 300 repeated); the walk read FF 00 as a segment 0xFFFF long, jumped past
    # the end of this 24 KB file and counted 0: the scan limit never applied.
    data = jpeg_with_scans(300)
    for junk in JUNK.values():
        evil = _with_junk(data, junk, b"\xff\xdb")
        assert jpeg_scan_count(evil) == 310
        with pytest.raises(ImageDecodeError) as err:
            decode_image(evil)
        assert err.value.reason == "too_many_scans"
