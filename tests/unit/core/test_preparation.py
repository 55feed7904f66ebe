"""keeper_core.preparation: blockiness of draft-decoded JPEGs is measured at full resolution.

A draft decode downscales a 12 MP JPEG by 1/8 in the DCT domain, which erases the 8x8 block
grid: measured on those pixels, a quality-10 photo reads ~1.01, as clean as a quality-95 one.
Every image here is built in code.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from keeper_core.errors import ImageDecodeError
from keeper_core.images import decode_image
from keeper_core.preparation import DecodedImage, ImagePreparation
from keeper_core.quality import FEATURE_NAMES, quality_features

SPEC = "keeper-tiny:random"
BLOCK = FEATURE_NAMES.index("blockiness")
W, H = 4000, 3000
# Measured on photo_like(4000, 3000), seeds 0-2: quality 10 reads 3.96-4.18 on the band
# (3.84-3.86 on a full decode's central crop), quality 95 1.08 (1.06), the uncompressed pixels
# 1.01; the drafted pixels read 1.01-1.02 whatever the quality.
CRUSHED_MIN, CLEAN_MAX = 2.0, 1.2


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with a fine texture, no blocks and no 8-pixel period."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = base.resize((w, h), Image.Resampling.BICUBIC)
    # Texture at 1/3.7 scale: an integer factor would give it a period the grid search finds.
    tex = rng.normal(0.0, 12.0, (h * 10 // 37, w * 10 // 37)).astype(np.float32)
    up = np.asarray(Image.fromarray(tex, "F").resize((w, h), Image.Resampling.BICUBIC))
    arr = np.asarray(base, np.int16) + up.astype(np.int16)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image, quality: int, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def with_orientation(im: Image.Image, quality: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(im, quality, exif=exif.tobytes())


def blockiness(prep: ImagePreparation, data: bytes) -> tuple[DecodedImage, float]:
    decoded = prep.decode(data)
    return decoded, float(prep.quality([decoded])[0, BLOCK])


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return photo_like(W, H)


@pytest.fixture(scope="module")
def prep() -> ImagePreparation:
    return ImagePreparation(SPEC)


def test_drafted_12mp_crushed_and_clean_jpegs_differ(
    photo: Image.Image, prep: ImagePreparation
) -> None:
    crushed_data, clean_data = jpeg(photo, 10), jpeg(photo, 95)
    crushed, crushed_b = blockiness(prep, crushed_data)
    _, clean_b = blockiness(prep, clean_data)
    assert crushed.image.width <= W // 4  # really drafted: the grid is gone from these pixels
    assert (crushed.width, crushed.height) == (W, H)
    assert crushed_b >= CRUSHED_MIN
    assert clean_b <= CLEAN_MAX
    # The same measure as on a full decode's central crop (another region of the same photo).
    full = ImagePreparation(SPEC, draft=False)
    for data, value in ((crushed_data, crushed_b), (clean_data, clean_b)):
        reference = blockiness(full, data)[1]
        assert value == pytest.approx(reference, rel=0.15)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_undrafted_image_keeps_the_pixel_measure(fmt: str, prep: ImagePreparation) -> None:
    small = photo_like(400, 300, seed=1)  # under twice the draft size: decoded whole
    data = jpeg(small, 10) if fmt == "JPEG" else png(photo_like(1200, 900, seed=2))
    decoded, value = blockiness(prep, data)
    assert decoded.blockiness is None
    assert decoded.image.size == (decoded.width, decoded.height)
    before = quality_features([decode_image(data)])[0, BLOCK]
    assert value == before
    if fmt == "JPEG":
        assert value >= CRUSHED_MIN


def test_exif_rotated_jpeg(photo: Image.Image, prep: ImagePreparation) -> None:
    _, upright_b = blockiness(prep, jpeg(photo, 10))
    rotated, rotated_b = blockiness(prep, with_orientation(photo, 10, 6))
    assert (rotated.width, rotated.height) == (H, W)
    assert rotated.image.size[0] < rotated.image.size[1]  # drafted, displayed upright
    # The same stored pixels: the band is measured as stored, and the measure is symmetric.
    assert rotated_b == pytest.approx(upright_b, rel=1e-6)
    assert rotated_b >= CRUSHED_MIN
    assert blockiness(prep, with_orientation(photo, 95, 8))[1] <= CLEAN_MAX


def test_progressive_jpeg(photo: Image.Image, prep: ImagePreparation) -> None:
    crushed, crushed_b = blockiness(prep, jpeg(photo, 10, progressive=True))
    assert crushed.image.width <= W // 4
    # Same quantised coefficients as the baseline file, so the same pixels and value.
    assert crushed_b == pytest.approx(blockiness(prep, jpeg(photo, 10))[1], rel=1e-6)
    assert crushed_b >= CRUSHED_MIN
    assert blockiness(prep, jpeg(photo, 95, progressive=True))[1] <= CLEAN_MAX


def test_truncated_jpeg_fails_in_decode(photo: Image.Image, prep: ImagePreparation) -> None:
    data = jpeg(photo, 10)
    cut = data[: len(data) * 2 // 3]  # the top band is intact, the rest of the scan is not
    with pytest.raises(ImageDecodeError) as exc:
        prep.decode(cut, source="s3://b/cut.jpg")
    assert exc.value.reason == "truncated"
    assert "band" not in str(exc.value)  # the draft decode refused it, before any band
    assert exc.value.source == "s3://b/cut.jpg"
