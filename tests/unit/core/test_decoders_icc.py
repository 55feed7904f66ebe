"""keeper_core.decoders and colour: the fast backends convert tagged JPEGs as the reference does.

turbo converts any tagged JPEG with the reference's littlecms transform; the device backends
(``GpuDecoder``, run here on the CPU: torchvision's libjpeg, nvImageCodec's libjpeg-turbo)
convert matrix/TRC profiles with ``MatrixProfile.to_srgb`` (the function a GPU runs, checked
against littlecms in test_color_matrix.py) and hand LUT-based profiles to the CPU backend
(``delegated["icc"]``). Pixels are compared with ``decode_image``'s: bit for bit where both
decoders are libjpeg-turbo (PIL, simplejpeg, nvImageCodec's CPU backend), within the decoders'
own difference for torchvision.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from test_color_matrix import exif, lut_profile
from test_images import encode, noise

from keeper_core import decoders
from keeper_core.color import ADOBE_RGB, DISPLAY_P3, PROPHOTO_RGB, MatrixProfile, rgb_profile
from keeper_core.decoders import GpuDecoder, PilDecoder, TurboDecoder, _plan
from keeper_core.errors import ImageDecodeError
from keeper_core.images import DecodeLimits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINES = ("torchvision", "nvimgcodec")
MEAN_TOL = 1.0  # torchvision's libjpeg against PIL's, full decodes (as in test_decoders.py)
DRAFT_TOL = 1.0  # a device draft is an area shrink, PIL's a DCT scale


def photo(w: int, h: int) -> Image.Image:
    """scikit-image's astronaut: saturated reds, blues and skin, where P3 and sRGB differ."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC)


def jpeg(im: Image.Image, orientation: int = 1, quality: int = 92, **kw: object) -> bytes:
    if orientation != 1:
        ex = Image.Exif()
        ex[0x0112] = orientation
        kw["exif"] = ex.tobytes()
    return encode(im, "JPEG", quality=quality, **kw)


# Colour-managed JPEGs (all 96x64 stored, noise: every colour's conversion is in play).
TAGGED: dict[str, Callable[[], bytes]] = {
    "display_p3": lambda: jpeg(noise(96, 64), icc_profile=rgb_profile(DISPLAY_P3)),
    "adobe_rgb": lambda: jpeg(noise(96, 64, seed=1), icc_profile=rgb_profile(ADOBE_RGB)),
    "prophoto_rgb": lambda: jpeg(noise(96, 64, seed=2), icc_profile=rgb_profile(PROPHOTO_RGB)),
    "p3_orientation_6": lambda: jpeg(noise(96, 64, seed=3), 6, icc_profile=rgb_profile(DISPLAY_P3)),
    "exif_adobe_rgb": lambda: jpeg(noise(96, 64, seed=4), exif=exif(0xFFFF, "R03")),
}
MATRIX_CASES = sorted(TAGGED)


def untagged(data: bytes) -> bytes:
    """The same JPEG without its colour metadata: what the pixels read as if not converted."""
    im = Image.open(io.BytesIO(data))
    orientation = im.getexif().get(0x0112, 1)
    return jpeg(Image.fromarray(np.asarray(im)), orientation, quality=100, subsampling=0)


def reference(data: bytes, **kw: object) -> np.ndarray:
    return np.asarray(PilDecoder().decode(data, **kw))  # type: ignore[arg-type]


def on_device(gpu: GpuDecoder, data: bytes, **kw: object) -> np.ndarray:
    (out,) = gpu.decode_batch([(data, None)], **kw)  # type: ignore[arg-type]
    assert isinstance(out, torch.Tensor)
    return out.permute(1, 2, 0).numpy()


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def lut_jpeg() -> bytes:
    return jpeg(noise(96, 64, seed=5), icc_profile=lut_profile())


# ---------------------------------------------------------------- planning


def test_plan_keeps_matrix_profiles_on_the_fast_path() -> None:
    limits = DecodeLimits()
    for case in MATRIX_CASES:
        plan = _plan(TAGGED[case](), limits, None)
        assert plan.delegate is None, case
        assert plan.transform is not None, case
        assert isinstance(plan.matrix, MatrixProfile), case
    lut = _plan(lut_jpeg(), limits, None)
    assert (lut.delegate, lut.matrix) == (None, None)  # turbo converts it with littlecms
    assert lut.transform is not None
    plain = _plan(jpeg(noise(96, 64)), limits, None)
    assert (plain.delegate, plain.transform, plain.matrix) == (None, None, None)


# ---------------------------------------------------------------- turbo: littlecms itself


@pytest.mark.parametrize("case", [*MATRIX_CASES, "lut"])
def test_turbo_converts_like_the_reference(case: str) -> None:
    data = lut_jpeg() if case == "lut" else TAGGED[case]()
    turbo = TurboDecoder()
    for draft in (None, (40, 40)):  # full, and a DCT draft at 1/2
        np.testing.assert_array_equal(
            np.asarray(turbo.decode(data, draft_size=draft)), reference(data, draft_size=draft)
        )
    assert (turbo.decoded, turbo.color_converted, dict(turbo.delegated)) == (2, 2, {})
    assert mean_diff(reference(data), reference(untagged(data))) > 2  # converted, visibly


def test_turbo_leaves_untagged_jpegs_alone() -> None:
    turbo = TurboDecoder()
    data = jpeg(noise(96, 64), exif=exif(1, "R98"))
    np.testing.assert_array_equal(np.asarray(turbo.decode(data)), reference(data))
    assert (turbo.decoded, turbo.color_converted) == (1, 0)


# ---------------------------------------------------------------- the device backends


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", MATRIX_CASES)
def test_device_converts_matrix_profiles_like_the_reference(engine: str, case: str) -> None:
    data = TAGGED[case]()
    gpu = GpuDecoder(device="cpu", cpu=PilDecoder(), engine=engine)
    got, want = on_device(gpu, data), reference(data)
    assert got.shape == want.shape
    if engine == "nvimgcodec":  # libjpeg-turbo as PIL: the conversion is littlecms's, exactly
        np.testing.assert_array_equal(got, want)
    assert mean_diff(got, want) < MEAN_TOL
    assert mean_diff(want, reference(untagged(data))) > 2  # far from the unconverted pixels
    assert (gpu.decoded, gpu.color_converted, dict(gpu.delegated)) == (1, 1, {})


@pytest.mark.parametrize("engine", ENGINES)
def test_device_hands_lut_profiles_to_the_cpu(engine: str) -> None:
    data = lut_jpeg()
    gpu = GpuDecoder(device="cpu", cpu=PilDecoder(), engine=engine)
    np.testing.assert_array_equal(on_device(gpu, data), reference(data))
    assert dict(gpu.delegated) == {"icc": 1}
    assert (gpu.decoded, gpu.color_converted) == (0, 0)


def batch() -> list[tuple[bytes, str]]:
    p3 = rgb_profile(DISPLAY_P3)
    return [
        (TAGGED["display_p3"](), "p3"),
        (jpeg(noise(80, 64, seed=7)), "untagged"),
        (TAGGED["adobe_rgb"](), "adobe"),
        (lut_jpeg(), "lut"),
        (TAGGED["p3_orientation_6"](), "p3 rotated"),
        (encode(noise(40, 30), "PNG", icc_profile=p3), "png"),
        (TAGGED["exif_adobe_rgb"](), "adobe by exif"),  # the same profile as "adobe"
        (jpeg(noise(64, 48, seed=8), icc_profile=p3), "p3 small"),
    ]


@pytest.mark.parametrize("limit", [None, 1], ids=["joined", "one_at_a_time"])
def test_device_batch_converts_per_profile_in_order(
    monkeypatch: pytest.MonkeyPatch, limit: int | None
) -> None:
    if limit is not None:
        monkeypatch.setattr(decoders, "_CONVERT_PIXELS", limit)
    calls: list[int] = []
    to_srgb = MatrixProfile.to_srgb

    def counted(self: MatrixProfile, pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels[0].numel())
        return to_srgb(self, pixels)

    monkeypatch.setattr(MatrixProfile, "to_srgb", counted)
    items = batch()
    gpu = GpuDecoder(device="cpu", cpu=PilDecoder(), engine="nvimgcodec")
    out = gpu.decode_batch(items)
    for (data, name), got in zip(items, out, strict=True):
        assert isinstance(got, torch.Tensor), name
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), reference(data), name)
    assert (gpu.decoded, gpu.color_converted) == (6, 5)
    assert dict(gpu.delegated) == {"icc": 1, "format:PNG": 1}
    p3_pixels = [96 * 64, 96 * 64, 64 * 48]
    adobe_pixels = [96 * 64, 96 * 64]
    if limit is None:  # one call per profile: P3 (three images), Adobe RGB (ICC and EXIF)
        assert sorted(calls) == sorted([sum(p3_pixels), sum(adobe_pixels)])
    else:
        assert sorted(calls) == sorted(p3_pixels + adobe_pixels)


@pytest.mark.parametrize("engine", ENGINES)
def test_device_draft_is_converted_like_the_reference(engine: str) -> None:
    draft = (256, 256)
    for orientation in (1, 6):
        data = jpeg(photo(2000, 1500), orientation, icc_profile=rgb_profile(DISPLAY_P3))
        gpu = GpuDecoder(device="cpu", cpu=PilDecoder(), engine=engine)
        got, want = on_device(gpu, data, draft_size=draft), reference(data, draft_size=draft)
        assert got.shape == want.shape == ((500, 375, 3) if orientation == 6 else (375, 500, 3))
        assert mean_diff(got, want) < DRAFT_TOL, mean_diff(got, want)
        plain = reference(untagged(data), draft_size=draft)
        assert mean_diff(got, plain) > 3 * DRAFT_TOL  # converted: far from the untagged pixels
        assert gpu.color_converted == 1


def test_device_band_is_the_stored_unconverted_luma() -> None:
    """A drafted JPEG's blockiness band is luma of the stored pixels, as decode_jpeg_band's is:
    the colour conversion does not reach it."""
    im = photo(1600, 1200)
    tagged = jpeg(im, icc_profile=rgb_profile(DISPLAY_P3))
    plain = jpeg(im)
    gpu = GpuDecoder(device="cpu", cpu=PilDecoder(), engine="nvimgcodec")
    (t, t_band, _), (p, p_band, _) = (
        r
        for r in gpu.decode_batch_with_bands(
            [(tagged, None), (plain, None)], draft_size=(256, 256), band_pixels=40_000
        )
        if not isinstance(r, ImageDecodeError)
    )
    assert t_band is not None
    assert p_band is not None
    assert torch.equal(t_band, p_band)
    assert mean_diff(t.numpy(), p.numpy()) > 2  # while the pixels were converted
    assert gpu.color_converted == 1


def test_device_failure_falls_back_to_the_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    data = TAGGED["display_p3"]()
    gpu = GpuDecoder(device="cpu", cpu=PilDecoder())
    monkeypatch.setattr(gpu, "_device_decode", lambda jpegs: [RuntimeError("nvjpeg")] * len(jpegs))
    np.testing.assert_array_equal(on_device(gpu, data), reference(data))  # the CPU converted it
    assert dict(gpu.fallbacks) == {"RuntimeError": 1}
    assert (gpu.decoded, gpu.color_converted) == (0, 0)
