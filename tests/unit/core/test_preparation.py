"""keeper_core.preparation: blockiness of draft-decoded JPEGs is measured at full resolution,
and a cut-out on transparency where it is opaque.

A draft decode downscales a 12 MP JPEG by 1/8 in the DCT domain, which erases the 8x8 block
grid: measured on those pixels, a quality-10 photo reads ~1.01, as clean as a quality-95 one.
Every image here is built in code.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from keeper_core.decoders import PilDecoder, TurboDecoder
from keeper_core.errors import ImageDecodeError
from keeper_core.images import decode_image
from keeper_core.picking import PickConfig, decide, rank_in_groups, zero_shot_scores
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


def cut_out(mode: str = "RGBA", transparent: float = 0.6) -> tuple[Image.Image, Image.Image]:
    """A product cut-out: a textured mid-grey, slightly warm subject in the middle of a 400 x 300
    frame whose outer ``transparent`` share is fully transparent (black behind it, as many
    editors leave it), in ``mode`` ("RGBA", "LA" or "P" with a transparent index 0); and the
    same subject filling the frame, opaque, in that mode without its alpha (the reference)."""
    rng = np.random.default_rng(0)
    w, h = 400, 300
    subject = np.clip(rng.normal((140, 126, 112), 12, (h, w, 3)), 0, 255).astype(np.uint8)
    sw, sh = int(w * math.sqrt(1 - transparent)), int(h * math.sqrt(1 - transparent))
    x0, y0 = (w - sw) // 2, (h - sh) // 2
    alpha = np.zeros((h, w), np.uint8)
    alpha[y0 : y0 + sh, x0 : x0 + sw] = 255
    behind = np.where(alpha[..., None] > 0, subject, 0).astype(np.uint8)
    if mode == "P":  # a palette of the subject's colours at 1..255; index 0 is transparent
        quantized = Image.fromarray(subject).quantize(255)
        palette = [0, 0, 0, *quantized.getpalette()[: 255 * 3]]  # type: ignore[index]
        index = np.asarray(quantized) + 1
        full = Image.fromarray(index.astype(np.uint8), "P")
        full.putpalette(palette)
        cut = Image.fromarray(np.where(alpha > 0, index, 0).astype(np.uint8), "P")
        cut.putpalette(palette)
        cut.info["transparency"] = 0
        return cut, full
    rgba = Image.fromarray(np.dstack([behind, alpha]), "RGBA")
    if mode == "LA":
        return rgba.convert("LA"), Image.fromarray(subject).convert("L")
    return rgba, Image.fromarray(subject)


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


# ---------------------------------------------------------------- transparency


def _encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


CUT_OUTS = {  # name: (mode, file format)
    "rgba_png": ("RGBA", "PNG"),
    "rgba_webp": ("RGBA", "WEBP"),
    "rgba_tiff": ("RGBA", "TIFF"),
    "la_png": ("LA", "PNG"),
    "palette_png": ("P", "PNG"),
}


@pytest.mark.parametrize("decoder", ["pil", "turbo"])
@pytest.mark.parametrize("name", sorted(CUT_OUTS))
def test_a_cut_out_is_measured_where_opaque_and_embedded_composited(
    name: str, decoder: str
) -> None:
    if decoder == "turbo":
        pytest.importorskip("simplejpeg")
    mode, fmt = CUT_OUTS[name]
    cut, subject = cut_out(mode)
    data = _encoded(cut, fmt)
    prep = ImagePreparation(SPEC, decoder=PilDecoder() if decoder == "pil" else TurboDecoder())
    decoded = prep.decode(data)
    assert decoded.alpha is not None
    assert decoded.alpha.size == decoded.image.size == (400, 300)
    got = dict(zip(FEATURE_NAMES, prep.quality([decoded])[0], strict=True))
    alone = dict(zip(FEATURE_NAMES, quality_features([subject])[0], strict=True))
    assert got["clip_bright"] == 0.0  # composited and measured whole: 0.60
    assert got["brightness"] == pytest.approx(alone["brightness"], abs=0.005)
    # What the model sees is unchanged: the pixels composited on white.
    composited = decode_image(data)
    assert decoded.image.tobytes() == composited.tobytes()
    np.testing.assert_array_equal(
        prep.resize(decoded), prep.resize(DecodedImage(composited, 400, 300))
    )


def test_an_opaque_rgba_png_is_measured_as_its_rgb(prep: ImagePreparation) -> None:
    photo = photo_like(640, 480, seed=3)
    as_rgba, as_rgb = prep.decode(png(photo.convert("RGBA"))), prep.decode(png(photo))
    assert as_rgba.alpha is None
    np.testing.assert_array_equal(prep.quality([as_rgba]), prep.quality([as_rgb]))


def test_a_single_cut_out_is_kept_without_a_clipping_reason(prep: ImagePreparation) -> None:
    """keeper pick's zero-shot decision for a lone product shot on transparency: it used to be
    demoted to an alternate for "highlights clipped 60 %" (its backdrop, composited white)."""
    decoded = prep.decode(png(cut_out("RGBA")[0]))
    row = dict(zip(FEATURE_NAMES, prep.quality([decoded])[0].tolist(), strict=True))
    frame = pd.DataFrame(
        [{"image_uri": "/shop/mug.png", "group": 0, "duplicate_of": -1, **row, "group_size": 1}]
    )
    frame["duplicate_kind"] = None
    picks = decide(rank_in_groups(frame, zero_shot_scores(frame)), PickConfig())
    assert picks["decision"].tolist() == ["keep"]
    assert picks["reasons"].tolist() == [["single shot"]]
