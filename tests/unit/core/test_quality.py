"""Handcrafted quality features: hand-computed values and directions on a real photo."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter
from test_preparation import cut_out

from keeper_core.errors import DataError
from keeper_core.images import to_rgb
from keeper_core.quality import (
    FEATURE_NAMES,
    block_grid_ratio,
    image_blockiness,
    quality_features,
    quality_record,
)

skimage_data = pytest.importorskip("skimage.data")

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea())  # 451 x 300 RGB


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noisy(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    arr = arr + np.random.default_rng(seed).normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def test_shape_dtype_and_names() -> None:
    assert FEATURE_NAMES == (
        "sharpness",
        "brightness",
        "clip_dark",
        "clip_bright",
        "contrast",
        "noise",
        "colorfulness",
        "blockiness",
        "width",
        "height",
    )
    imgs = [Image.new("RGB", (40, 30), (10, 20, 30)), Image.new("RGB", (64, 64))]
    out = quality_features(imgs, size=32)
    assert out.shape == (2, len(FEATURE_NAMES))
    assert out.dtype == np.float32
    empty = quality_features([])
    assert empty.shape == (0, len(FEATURE_NAMES))
    assert empty.dtype == np.float32


def test_flat_grey_hand_computed() -> None:
    rec = quality_record(Image.new("RGB", (300, 200), (128, 128, 128)))
    assert rec["sharpness"] == 0.0  # var(Laplacian) of a constant is 0, log1p(0) = 0
    assert rec["brightness"] == pytest.approx(128 / 255, abs=1e-6)
    assert rec["clip_dark"] == 0.0
    assert rec["clip_bright"] == 0.0
    assert rec["contrast"] == pytest.approx(0.0, abs=1e-6)
    assert rec["noise"] == pytest.approx(0.0, abs=1e-6)
    assert rec["colorfulness"] == pytest.approx(0.0, abs=1e-6)
    assert rec["blockiness"] == pytest.approx(1.0)  # (0 + 0.5) / (0 + 0.5)
    assert (rec["width"], rec["height"]) == (300.0, 200.0)


def test_half_black_half_white_hand_computed() -> None:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:, 32:] = 255
    rec = quality_record(Image.fromarray(arr), size=64)  # same size: the resize is exact
    assert rec["brightness"] == pytest.approx(0.5, abs=1e-6)
    assert rec["clip_dark"] == pytest.approx(0.5)
    assert rec["clip_bright"] == pytest.approx(0.5)
    assert rec["contrast"] == pytest.approx(0.5, abs=1e-6)  # std of a 50/50 {0, 1} split
    # One Laplacian column of +255 and one of -255 out of 62 interior columns.
    var = 2 * 255.0**2 / 62
    assert rec["sharpness"] == pytest.approx(math.log1p(var), rel=1e-5)


def test_colorfulness_of_pure_red_hand_computed() -> None:
    rec = quality_record(Image.new("RGB", (50, 50), (255, 0, 0)))
    # rg = 1, yb = 0.5 everywhere: stds are 0, so 0.3 * sqrt(1 + 0.25).
    assert rec["colorfulness"] == pytest.approx(0.3 * math.sqrt(1.25), rel=1e-5)


def test_noise_estimate_matches_added_sigma() -> None:
    # A flat 256 x 256 image at size=256 is not resampled, so the estimate sees the raw noise.
    img = _noisy(Image.new("RGB", (256, 256), (120, 120, 120)), sigma=8.0)
    noise = quality_record(img)["noise"]
    # Per-channel sigma 8, luma weights average independent channels: sigma * ||w||_2.
    expected = 8.0 * float(np.linalg.norm([0.299, 0.587, 0.114])) / 255
    assert noise == pytest.approx(expected, rel=0.1)


def test_blockiness_on_a_synthetic_block_grid() -> None:
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    grid = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))  # 128 x 128 of flat 8x8 blocks
    img = Image.fromarray(grid).convert("RGB")
    assert quality_record(img)["blockiness"] > 20.0
    # The grid phase is found, not assumed: shifting it by 3 pixels still reads as blocky.
    shifted = Image.fromarray(grid[3:, 5:]).convert("RGB")
    assert quality_record(shifted)["blockiness"] > 20.0
    # A tiny image has no interior boundary on both sides: neutral 1.
    assert quality_record(Image.fromarray(grid[:12, :12]))["blockiness"] == 1.0


def test_block_grid_ratio_ignores_orientation(photo: Image.Image) -> None:
    # What lets a JPEG's stored (un-rotated) pixels stand for the displayed image.
    grey = np.asarray(_jpeg(photo, 10).convert("L"))[:296, :448]  # whole blocks both ways
    value = block_grid_ratio(grey)
    assert value > 1.5
    assert block_grid_ratio(grey.T) == pytest.approx(value, rel=1e-6)
    # A flip moves the grid phase (found again) and which edge steps the 8-phase trim drops.
    for turned in (grey[::-1], grey[:, ::-1], np.rot90(grey)):
        assert block_grid_ratio(turned) == pytest.approx(value, rel=0.02)
    assert image_blockiness(Image.fromarray(grey)) == pytest.approx(value, rel=1e-6)


def test_blockiness_measured_elsewhere_is_used_as_given(photo: Image.Image) -> None:
    out = quality_features([photo, photo], blockiness=[3.5, None])
    alone = quality_features([photo])[0]
    assert out[0, COL["blockiness"]] == 3.5
    np.testing.assert_array_equal(out[1], alone)  # None: measured on the pixels, as before
    rest = [i for i in range(len(FEATURE_NAMES)) if i != COL["blockiness"]]
    np.testing.assert_array_equal(out[0, rest], alone[rest])
    with pytest.raises(DataError, match="1 blockiness values for 2 images"):
        quality_features([photo, photo], blockiness=[1.0])


def test_each_feature_moves_the_right_way(photo: Image.Image) -> None:
    variants = {
        "orig": photo,
        "blur": photo.filter(ImageFilter.GaussianBlur(2.0)),
        "dark": ImageEnhance.Brightness(photo).enhance(0.25),
        "bright": ImageEnhance.Brightness(photo).enhance(2.2),
        "noise": _noisy(photo, sigma=15.0),
        "lowc": ImageEnhance.Contrast(photo).enhance(0.4),
        "grey": photo.convert("L").convert("RGB"),
        "jpeg5": _jpeg(photo, 5),
    }
    feats = quality_features(list(variants.values()))
    f = {
        k: dict(zip(FEATURE_NAMES, row, strict=True))
        for k, row in zip(variants, feats, strict=True)
    }
    o = f["orig"]
    assert f["blur"]["sharpness"] < o["sharpness"] - 1.0
    assert f["dark"]["brightness"] < 0.5 * o["brightness"]
    assert f["dark"]["clip_dark"] > o["clip_dark"]
    assert f["bright"]["brightness"] > o["brightness"]
    assert f["bright"]["clip_bright"] > o["clip_bright"] + 0.05
    assert f["noise"]["noise"] > 2 * o["noise"]
    assert f["lowc"]["contrast"] < 0.5 * o["contrast"]
    assert f["grey"]["colorfulness"] < 0.01 < o["colorfulness"]
    assert f["jpeg5"]["blockiness"] > 1.5 > o["blockiness"]
    for row in f.values():
        assert (row["width"], row["height"]) == (451.0, 300.0)


def test_batch_equals_per_image(photo: Image.Image) -> None:
    imgs = [
        photo,
        photo.filter(ImageFilter.GaussianBlur(1.5)),
        photo.resize((200, 120)),
        _noisy(photo, 5.0),
        photo.convert("L"),
    ]
    batch = quality_features(imgs)
    single = np.concatenate([quality_features([im]) for im in imgs])
    np.testing.assert_allclose(batch, single, rtol=1e-6, atol=1e-7)


def test_batch_larger_than_a_chunk_is_complete() -> None:
    # 70 > the internal chunk of 64: the tail chunk must be written too.
    imgs = [Image.new("RGB", (20, 20), (v, v, v)) for v in range(70)]
    out = quality_features(imgs, size=16)
    np.testing.assert_allclose(out[:, COL["brightness"]], np.arange(70) / 255, atol=1e-6)


def test_non_rgb_modes_are_converted(photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    palette = photo.convert("P")
    grey = photo.convert("L")
    out = quality_features([photo, rgba, palette, grey])
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6)  # opaque alpha is dropped losslessly
    assert out[2, COL["brightness"]] == pytest.approx(out[0, COL["brightness"]], abs=0.02)
    assert out[3, COL["colorfulness"]] == pytest.approx(0.0, abs=1e-6)


def test_rejects_non_images() -> None:
    with pytest.raises(DataError, match="item 1 is a ndarray") as exc:
        quality_features([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))])  # type: ignore[list-item]
    assert exc.value.rows == [1]
    with pytest.raises(DataError, match="size must be >= 8"):
        quality_features([Image.new("RGB", (8, 8))], size=4)


# ---------------------------------------------------------------- transparency


def _composited(img: Image.Image) -> Image.Image:
    """What keeper shows and embeds: alpha on white, as a plain RGB image (no alpha left)."""
    return to_rgb(img)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_cut_outs_exposure_is_its_subjects_not_its_backdrops(mode: str) -> None:
    cut, subject = cut_out(mode)
    got = quality_record(cut)
    alone = quality_record(subject)
    # Composited on white and measured whole, as before: 60 % of the frame reads as blown.
    before = quality_record(_composited(cut))
    assert before["clip_bright"] == pytest.approx(0.6, abs=0.01)
    assert before["brightness"] > 0.75
    # Measured where it is opaque: the subject's own exposure.
    assert got["clip_bright"] == 0.0
    assert got["clip_dark"] == 0.0
    assert got["brightness"] == pytest.approx(alone["brightness"], abs=0.005)
    assert (
        got["contrast"] < 0.04 < before["contrast"]
    )  # the subject's ~0.02, not the backdrop's step
    assert got["colorfulness"] == pytest.approx(alone["colorfulness"], abs=0.005)
    # Noise from the subject's interior: over a majority of flat backdrop the median reads 0.
    assert before["noise"] == 0.0
    assert got["noise"] == pytest.approx(alone["noise"], rel=0.1)
    # Sharpness and blockiness read the composited image, as before; so do the sizes.
    for name in ("sharpness", "blockiness", "width", "height"):
        assert got[name] == before[name], name


def test_half_transparent_hand_computed() -> None:
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[:, 32:] = (100, 100, 100, 255)  # the right half opaque grey 100, the left transparent
    rec = quality_record(Image.fromarray(arr, "RGBA"), size=64)  # same size: no resample
    assert rec["brightness"] == pytest.approx(100 / 255, abs=1e-6)
    assert rec["clip_bright"] == 0.0
    assert rec["clip_dark"] == 0.0
    assert rec["contrast"] == pytest.approx(0.0, abs=1e-6)
    assert rec["colorfulness"] == pytest.approx(0.0, abs=1e-6)
    assert rec["noise"] == pytest.approx(0.0, abs=1e-6)
    # The white-to-grey step is an edge of the image as shown: 2 columns of 62 (see above).
    assert rec["sharpness"] == pytest.approx(math.log1p(2 * 155.0**2 / 62), rel=1e-4)


def test_without_transparency_features_are_as_before_bit_for_bit(photo: Image.Image) -> None:
    """Only an image with a transparent pixel takes the masked path; every other one is
    measured by the unchanged whole-frame code, whatever its mode or how alpha is given."""
    keyed = photo.copy()
    keyed.info["transparency"] = (1, 2, 3)  # a transparency key no pixel of it has
    assert not (np.asarray(photo) == (1, 2, 3)).all(axis=-1).any()
    opaque = Image.new("L", photo.size, 255)
    same = [photo, photo.convert("RGBA"), keyed, photo]
    out = quality_features(same, alpha=[None, None, None, opaque])
    for row in out[1:]:
        np.testing.assert_array_equal(row, out[0])
    grey = photo.convert("L")
    np.testing.assert_array_equal(quality_features([grey.convert("LA")]), quality_features([grey]))
    # A cut-out in the batch leaves its neighbours' rows exactly as they are alone.
    cut, _ = cut_out()
    mixed = quality_features([photo, cut, grey])
    np.testing.assert_array_equal(mixed[0], quality_features([photo])[0])
    np.testing.assert_array_equal(mixed[1], quality_features([cut])[0])
    np.testing.assert_array_equal(mixed[2], quality_features([grey])[0])


@pytest.mark.parametrize("level", [0, 100, 200])
def test_alpha_opaque_nowhere_or_everywhere_is_measured_whole(level: int) -> None:
    """Fully transparent (0), or no pixel >= 128 (100): no subject, so the composited frame is
    measured (a blank reads white: brightness 1, clip_bright 1). Every pixel >= 128 (200): the
    whole frame is the subject. Either way: exactly the composited image's features."""
    arr = np.zeros((120, 160, 4), dtype=np.uint8)
    arr[..., :3] = (30, 60, 90)
    arr[..., 3] = level
    img = Image.fromarray(arr, "RGBA")
    got = quality_features([img])
    np.testing.assert_array_equal(got, quality_features([_composited(img)]))
    if level == 0:
        rec = dict(zip(FEATURE_NAMES, got[0], strict=True))
        assert (rec["brightness"], rec["clip_bright"]) == (1.0, 1.0)


def test_noise_without_an_opaque_neighbourhood_reads_the_whole_frame() -> None:
    """Opaque only on every other column: the levels come from those columns, but no pixel has
    an opaque 3x3 neighbourhood, so noise is the composited frame's (there is no interior)."""
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[..., :3] = 100
    arr[:, ::2, 3] = 255
    img = Image.fromarray(arr, "RGBA")
    rec = quality_record(img, size=64)
    whole = quality_record(_composited(img), size=64)
    assert rec["brightness"] == pytest.approx(100 / 255, abs=1e-6)
    assert whole["brightness"] == pytest.approx((100 / 255 + 1) / 2, abs=1e-6)
    assert rec["noise"] == whole["noise"]


def test_alpha_handed_beside_the_pixels_equals_the_images_own() -> None:
    cut, _ = cut_out()
    own = quality_features([cut])
    beside = quality_features([_composited(cut)], alpha=[cut.getchannel("A")])
    np.testing.assert_array_equal(beside, own)
    assert quality_record(_composited(cut), alpha=cut.getchannel("A"))["clip_bright"] == 0.0
    with pytest.raises(DataError, match="1 alphas for 2 images"):
        quality_features([cut, cut], alpha=[None])
    with pytest.raises(DataError, match=r"alpha 0 must be an L image of \(400, 300\)") as exc:
        quality_features([cut], alpha=[cut.getchannel("A").resize((40, 30))])
    assert exc.value.rows == [0]
    with pytest.raises(DataError, match="got mode RGBA"):
        quality_features([cut], alpha=[cut])
