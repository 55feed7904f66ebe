"""keeper_core.decoders: every backend keeps decode_image's contract (cases built in code).

Backends: "pil" (the reference), "turbo" (simplejpeg), "gpu-on-cpu": GpuDecoder's control
flow through ``decode_batch`` with torchvision decoding on the CPU (no CUDA needed), and
"nvimgcodec-on-cpu": the same with nvImageCodec's engine on its CPU (libjpeg-turbo) backend.

Pixel tolerance. PIL and simplejpeg both link libjpeg-turbo with its default islow IDCT and
fancy upsampling: they agree bit for bit (measured: 0 on every case here), and
``test_turbo_pixels_are_identical_to_pil`` holds turbo to that. Across backends the bound is
a mean absolute difference of 1 level (of 255) on full decodes, which a different IDCT or chroma
upsampling (nvJPEG) stays within on photos, and which a wrong orientation, channel order or
draft scale exceeds by tens. A GPU draft is an area downscale, not a DCT one: 0.3 levels on a
photo, more on white noise (not a photo), so draft pixels are compared on a photo.
"""

from __future__ import annotations

import ctypes
import functools
import io
import logging
import os
import struct
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from support import png_declaring
from support_photos import make_dng
from test_images import (
    BAD_INPUTS,
    MODE_CASES,
    ORIENTATIONS,
    close,
    corner,
    encode,
    jpeg_with_orientation,
    noise,
)

from keeper_core import decoders
from keeper_core.color import ADOBE_RGB, DISPLAY_P3, rgb_profile
from keeper_core.decoders import (
    DECODERS,
    Decoder,
    GpuDecoder,
    PilDecoder,
    TurboDecoder,
    _complete,
    resolve_decoder,
)
from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ConfigError, ImageDecodeError
from keeper_core.formats import RawPreview
from keeper_core.images import DecodeLimits, _jpeg_frame_offset, decode_image_alpha
from keeper_core.models import resize_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKENDS = ("pil", "turbo", "gpu-on-cpu", "nvimgcodec-on-cpu")
ON_DEVICE = ("gpu-on-cpu", "nvimgcodec-on-cpu")  # GpuDecoder, by engine
ENGINE = {"gpu-on-cpu": "torchvision", "nvimgcodec-on-cpu": "nvimgcodec"}
MEAN_TOL = 1.0  # levels of 255, full decodes (see the module docstring)
DRAFT_TOL = 1.0  # a drafted photo: GPU area downscale against PIL's DCT scaling (0.3 measured)
MODEL_INPUT_TOL = 0.5  # the model input made from a drafted photo


def make_decoder(backend: str) -> Decoder:
    if backend in ENGINE:
        return GpuDecoder(device="cpu", engine=ENGINE[backend])
    return {"pil": PilDecoder, "turbo": TurboDecoder}[backend]()


def run(
    decoder: Decoder,
    data: bytes | RawPreview,
    *,
    source: str | None = None,
    limits: DecodeLimits | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """One image through the backend's real entry point (decode_batch for the GPU backend)."""
    if not isinstance(decoder, GpuDecoder):
        return decoder.decode(data, source=source, limits=limits, draft_size=draft_size)
    (out,) = decoder.decode_batch([(data, source)], limits=limits, draft_size=draft_size)
    if isinstance(out, ImageDecodeError):
        raise out
    assert (out.dtype, out.device.type, out.ndim, out.shape[0]) == (torch.uint8, "cpu", 3, 3)
    return Image.fromarray(out.permute(1, 2, 0).numpy())


def outcome(decoder: Decoder, data: bytes | RawPreview, **kw: object) -> Image.Image | str:
    try:
        return run(decoder, data, **kw)  # type: ignore[arg-type]
    except ImageDecodeError as e:
        return e.reason


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def photo(w: int, h: int) -> Image.Image:
    """A real photo (scikit-image's astronaut) upscaled: smooth regions, edges, skin, colour."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC)


def with_orientation(im: Image.Image, orientation: int, **kw: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), **kw)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header claims width x height (a decompression bomb)."""
    data = bytearray(encode(noise(32, 32), "JPEG"))
    at = _jpeg_frame_offset(bytes(data))
    assert at is not None
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def mpo() -> bytes:
    frames = [noise(64, 48, seed=1), noise(64, 48, seed=2)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    return data


def extraneous_bytes() -> bytes:
    """Two junk bytes before SOS: libjpeg warns (simplejpeg's strict mode stops), PIL decodes."""
    data = encode(noise(48, 32), "JPEG")
    at = data.index(b"\xff\xda")
    return data[:at] + b"\x00\x00" + data[at:]


def dng() -> bytes:
    # Stored landscape, the RAW says "rotate 90 CW" (6), the preview has no orientation.
    return make_dng(None, preview=jpeg_image(64, 48), orientation=6)


def jpeg_image(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (255, 255, 255))
    im.paste((255, 0, 0), (0, 0, 16, 16))
    return im


GOOD: dict[str, Callable[[], bytes | RawPreview]] = {
    **{
        f"orientation_{o}": functools.partial(jpeg_with_orientation, 64, 48, o)
        for o in ORIENTATIONS
    },
    "baseline_420": lambda: encode(noise(97, 65), "JPEG", quality=90),
    "progressive": lambda: encode(noise(97, 65), "JPEG", quality=90, progressive=True),
    "subsampling_444": lambda: encode(noise(97, 65), "JPEG", subsampling=0),
    "restart_markers": lambda: encode(noise(97, 65), "JPEG", restart_marker_rows=1),
    "grey": lambda: encode(noise(97, 65).convert("L"), "JPEG"),
    "grey_orientation_8": lambda: with_orientation(noise(64, 48).convert("L"), 8),
    "progressive_orientation_6": lambda: with_orientation(noise(64, 48), 6, progressive=True),
    "mpo_first_frame": mpo,
    "extraneous_bytes_before_sos": extraneous_bytes,
    "raw_preview_object": lambda: RawPreview(
        data=encode(jpeg_image(64, 48), "JPEG"), orientation=6, format="DNG"
    ),
    "dng_file": dng,
    **{f"mode_{name}": make for name, (make, *_) in MODE_CASES.items()},
    "png_rgb": lambda: encode(noise(40, 30), "PNG"),
    "gif": lambda: encode(noise(40, 30), "GIF"),
    "webp": lambda: encode(noise(40, 30), "WEBP", lossless=True),
    "tiff": lambda: encode(noise(40, 30), "TIFF"),
    "bmp": lambda: encode(noise(40, 30), "BMP"),
    "png_16bit": lambda: encode(Image.fromarray(np.full((20, 30), 40000, np.uint16)), "PNG"),
    # colour-managed (converted to sRGB) by the reference: every backend hands these to it
    "jpeg_display_p3": lambda: encode(noise(97, 65), "JPEG", icc_profile=rgb_profile(DISPLAY_P3)),
    "jpeg_adobe_rgb_orientation_6": lambda: with_orientation(
        noise(64, 48), 6, icc_profile=rgb_profile(ADOBE_RGB)
    ),
}

BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    **BAD_INPUTS,
    "jpeg_no_eoi": (lambda: encode(noise(96, 64), "JPEG")[:-2], "truncated"),
    "progressive_half": (
        lambda: (d := encode(noise(96, 64), "JPEG", progressive=True))[: len(d) // 2],
        "truncated",
    ),
    "png_bomb": (lambda: png_declaring(30_000, 30_000), "too_many_pixels"),
    "jpeg_bomb_pil_guard": (lambda: jpeg_declaring(30_000, 30_000), "too_many_pixels"),
    "jpeg_bomb_our_limit": (lambda: jpeg_declaring(9_000, 8_000), "too_many_pixels"),  # 72 MP
    "jpeg_too_small": (lambda: encode(noise(40, 10), "JPEG"), "too_small"),
}


# ---------------------------------------------------------------- same outcome as PIL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_inputs_decode_like_pil(backend: str, case: str) -> None:
    data = GOOD[case]()
    expected = PilDecoder().decode(data)
    out = run(make_decoder(backend), data)
    assert out.mode == "RGB"
    assert out.size == expected.size
    assert mean_diff(out, expected) < MEAN_TOL, mean_diff(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_give_pils_reason(backend: str, case: str) -> None:
    make, reason = BAD[case]
    with pytest.raises(ImageDecodeError) as expected:
        PilDecoder().decode(make())
    assert expected.value.reason == reason  # the corpus says what PIL says
    with pytest.raises(ImageDecodeError) as err:
        run(make_decoder(backend), make(), source=f"mem://{case}")
    assert (err.value.reason, err.value.source) == (reason, f"mem://{case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_orientation_corners(backend: str, orientation: int) -> None:
    swapped, red_at, blue_at = ORIENTATIONS[orientation]
    out = run(make_decoder(backend), jpeg_with_orientation(64, 48, orientation))
    assert out.size == ((48, 64) if swapped else (64, 48))
    assert close(corner(out, red_at), (255, 0, 0)), corner(out, red_at)
    assert close(corner(out, blue_at), (0, 0, 255)), corner(out, blue_at)


@pytest.mark.parametrize("backend", ["turbo", "nvimgcodec-on-cpu"])
@pytest.mark.parametrize("case", sorted(GOOD))
def test_libjpeg_turbo_pixels_are_identical_to_pil(backend: str, case: str) -> None:
    """simplejpeg and nvImageCodec's CPU backend link libjpeg-turbo as Pillow does: full
    decodes are bit-identical (a GPU draft is a box shrink, not a DCT scale: not compared)."""
    data = GOOD[case]()
    np.testing.assert_array_equal(
        np.asarray(run(make_decoder(backend), data)), np.asarray(PilDecoder().decode(data))
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_alpha_is_the_references(backend: str) -> None:
    """Every backend hands over the alpha ``decode_image_alpha`` keeps for the quality features:
    the reference decodes every format with alpha, in every backend; a JPEG has none."""
    decoder = make_decoder(backend)
    alpha = np.zeros((30, 40), np.uint8)
    alpha[5:25, 10:30] = 255
    rgba = Image.fromarray(np.dstack([np.asarray(noise(40, 30)), alpha]), "RGBA")
    for data in (encode(rgba, "PNG"), encode(rgba, "WEBP", lossless=True)):
        want_rgb, want_alpha = decode_image_alpha(data)
        got_rgb, got_alpha = decoder.decode_alpha(data)
        assert got_rgb.tobytes() == want_rgb.tobytes() == decoder.decode(data).tobytes()
        assert want_alpha is not None
        assert got_alpha is not None
        assert got_alpha.tobytes() == want_alpha.tobytes() == alpha.tobytes()
    jpeg = encode(noise(40, 30), "JPEG", quality=90)
    got_rgb, got_alpha = decoder.decode_alpha(jpeg)
    assert got_alpha is None
    assert mean_diff(got_rgb, decode_image_alpha(jpeg)[0]) <= MEAN_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_apply(backend: str) -> None:
    data = encode(noise(64, 48), "JPEG")
    decoder = make_decoder(backend)
    for limits, reason in [
        (DecodeLimits(max_bytes=len(data) - 1), "too_large"),
        (DecodeLimits(max_pixels=64 * 48 - 1), "too_many_pixels"),
        (DecodeLimits(min_side=49), "too_small"),
    ]:
        assert outcome(decoder, data, limits=limits) == reason
    assert run(decoder, data, limits=DecodeLimits(max_pixels=64 * 48, min_side=48)).size == (64, 48)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "data", [png_declaring(30_000, 30_000), jpeg_declaring(30_000, 30_000)], ids=["png", "jpeg"]
)
def test_pixel_bomb_refused_fast_before_decode(backend: str, data: bytes) -> None:
    decoder = make_decoder(backend)
    t = time.process_time()  # CPU time: the cost of the refusal, not the machine's load
    assert outcome(decoder, data) == "too_many_pixels"
    assert time.process_time() - t < 1.0
    assert getattr(decoder, "decoded", 0) == 0  # nothing reached libjpeg-turbo or the device
    if data.startswith(b"\xff\xd8"):  # refused at the header, not handed over to PIL
        assert not getattr(decoder, "delegated", None)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the metadata we break
@pytest.mark.parametrize("backend", ["turbo", *ON_DEVICE])
def test_corrupted_jpegs_get_pils_verdict(backend: str) -> None:
    """Flip bytes of real JPEGs: the same reason as PIL, or the same pixels."""
    rng = np.random.default_rng(7)
    decoder, pil = make_decoder(backend), PilDecoder()
    reasons: set[str] = set()
    for progressive in (False, True):
        base = encode(noise(40, 32), "JPEG", progressive=progressive)
        for _ in range(100):
            b = bytearray(base)
            for pos in rng.integers(0, len(b), size=3):
                b[pos] = int(rng.integers(0, 256))
            expected, got = outcome(pil, bytes(b)), outcome(decoder, bytes(b))
            if isinstance(expected, str):
                assert got == expected
                reasons.add(expected)
            else:
                assert isinstance(got, Image.Image), got
                np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert "truncated" in reasons


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_draft_size_is_config_error(backend: str) -> None:
    with pytest.raises(ConfigError, match="draft_size"):
        run(make_decoder(backend), encode(noise(32, 32), "JPEG"), draft_size=(0, 10))


# ---------------------------------------------------------------- draft


DRAFTS = [
    # (stored size, orientation, displayed draft_size)
    ((2000, 1500), 1, (256, 256)),  # 1/4 -> 500x375
    ((2000, 1500), 1, (224, 224)),  # 2000 // 224 = 8, 1500 // 224 = 6 -> 1/4
    ((2000, 1500), 6, (256, 256)),  # displayed 1500x2000
    ((2000, 1500), 6, (1000, 200)),  # swapped to stored (200, 1000): no draft
    ((2000, 1500), 6, (300, 900)),  # stored (900, 300): 1/2
    ((1001, 777), 1, (120, 120)),  # odd sides: ceil(1001 / 4) = 251, ceil(777 / 4) = 195
    ((4000, 3000), 3, (256, 256)),  # 1/8 -> 500x375
    ((300, 200), 1, (224, 224)),  # under twice the request: full size
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("size", "orientation", "draft"), DRAFTS)
def test_draft_size_equals_pils_and_never_below_request(
    backend: str, size: tuple[int, int], orientation: int, draft: tuple[int, int]
) -> None:
    data = with_orientation(photo(*size), orientation, quality=90)
    expected = PilDecoder().decode(data, draft_size=draft)
    out = run(make_decoder(backend), data, draft_size=draft)
    displayed = size[::-1] if orientation in (5, 6, 7, 8) else size
    assert out.size == expected.size
    assert out.size[0] >= min(draft[0], displayed[0])  # never below the request (or the image)
    assert out.size[1] >= min(draft[1], displayed[1])
    assert mean_diff(out, expected) < DRAFT_TOL, mean_diff(out, expected)


@pytest.mark.parametrize("backend", ["turbo", *ON_DEVICE])
def test_model_input_agrees_with_pil(backend: str) -> None:
    """The model input keeper makes from each backend's draft decode (QUALITY_SIZE)."""
    resize = resize_transform("keeper-tiny:random")  # a 64 px input; ViT-B-32's is 224
    draft = (256, 256)  # ImagePreparation's draft for any model up to 256 px: QUALITY_SIZE
    for orientation in (1, 6):
        data = with_orientation(photo(2000, 1500), orientation, quality=90)
        expected = resize(PilDecoder().decode(data, draft_size=draft))
        got = resize(run(make_decoder(backend), data, draft_size=draft))
        assert got.shape == expected.shape == (3, 64, 64)
        diff = float(np.abs(got.astype(np.int16) - expected.astype(np.int16)).mean())
        assert diff < MODEL_INPUT_TOL, diff


@pytest.fixture(scope="module")
def tiny_embedder() -> ClipEmbedder:
    return ClipEmbedder("keeper-tiny:random", device="cpu")


@pytest.mark.parametrize("backend", ["turbo", *ON_DEVICE])
def test_embeddings_agree_with_pils(backend: str, tiny_embedder: ClipEmbedder) -> None:
    """What a table holds: each backend's drafted decode, through the model, lands where PIL's
    does. Random weights map different photos close together too (cosine 0.95-0.99 here), so the
    bound is relative: a backend's distance to PIL's embedding (measured <= 4e-7) must be under a
    hundredth of the smallest distance between two different photos."""
    from skimage import data

    images = [
        photo(2000, 1500),
        Image.fromarray(data.chelsea()).resize((1600, 1200)),
        Image.fromarray(data.coffee()).resize((1200, 1600)),
    ]
    blobs = [with_orientation(im, o, quality=90) for im, o in zip(images, (1, 6, 3), strict=True)]
    draft = (256, 256)

    def embed(decoder: Decoder) -> np.ndarray:
        pixels = [tiny_embedder.preprocess_uint8(run(decoder, b, draft_size=draft)) for b in blobs]
        return tiny_embedder.embed_pixels(np.stack(pixels))

    ref = embed(PilDecoder())
    between = 1.0 - ref @ ref.T
    apart = between[~np.eye(len(blobs), dtype=bool)].min()
    assert apart > 1e-3  # the metric tells these photos apart at all
    distance = 1.0 - np.sum(embed(make_decoder(backend)) * ref, axis=1)
    assert distance.max() < apart / 100, (distance, apart)


# ---------------------------------------------------------------- dispatch counters


def test_turbo_counts_what_it_delegates() -> None:
    turbo = TurboDecoder()
    turbo.decode(encode(noise(40, 30), "PNG"))
    turbo.decode(GOOD["mode_cmyk_cyan"]())
    turbo.decode(extraneous_bytes())
    assert outcome(turbo, b"not an image at all") == "not_image"
    assert outcome(turbo, BAD_INPUTS["jpeg_half"][0]()) == "truncated"
    assert turbo.decoded == 0
    assert turbo.delegated == {
        "format:PNG": 1,
        "mode:CMYK": 1,
        "turbo_refused": 2,  # the extraneous bytes, and the truncated file (PIL: "truncated")
        "format:unknown": 1,
    }
    turbo.decode(encode(noise(40, 30), "JPEG"))
    turbo.decode(GOOD["dng_file"]())
    assert turbo.decoded == 2  # a RAW's JPEG preview is a JPEG too


def device_refuses(data: bytes, engine: str) -> bool:
    return isinstance(GpuDecoder(device="cpu", engine=engine)._device_decode([data])[0], Exception)


def complete_jpeg_the_device_refuses(engine: str) -> bytes:
    """A corrupt JPEG with its EOI intact (so it goes to the device), which the engine refuses.

    Found by a seeded search, so it holds whatever the encoder's exact bytes: more than half of
    the three-byte corruptions of a progressive file are one ("Bogus sampling factors",
    impossible progression parameters...). PIL refuses these too: in 4,000 seeded corruptions no
    complete JPEG that torchvision's CPU libjpeg refuses decoded in PIL (those that did had lost
    their EOI, and go to the CPU backend by rule), so the fallback's result here is the CPU
    backend's verdict, an error; nvJPEG on a GPU is where a fallback yields pixels.
    """
    rng = np.random.default_rng(7)
    base = encode(noise(40, 32), "JPEG", progressive=True)
    for _ in range(1000):
        b = bytearray(base)
        for pos in rng.integers(0, len(b) - 2, size=3):  # keep the EOI: sent to the device
            b[pos] = int(rng.integers(0, 256))
        data = bytes(b)
        if _complete(data) and device_refuses(data, engine):
            return data
    raise AssertionError(f"no complete JPEG that {engine} refuses: find another case")


@pytest.mark.parametrize("engine", ["torchvision", "nvimgcodec"])
def test_gpu_per_image_failure_falls_back_and_is_counted(engine: str) -> None:
    bad = complete_jpeg_the_device_refuses(engine)
    good = encode(noise(40, 30), "JPEG")
    gpu = GpuDecoder(device="cpu", cpu=PilDecoder(), engine=engine)
    out = gpu.decode_batch([(good, "a"), (bad, "b"), (good, "c")])
    assert gpu.fallbacks == {"RuntimeError": 1}
    assert gpu.decoded == 2  # the good ones, whether or not the engine retried one at a time
    assert not gpu.delegated
    assert isinstance(out[1], ImageDecodeError)
    assert (out[1].reason, out[1].source) == (outcome(PilDecoder(), bad), "b")
    for i in (0, 2):
        assert isinstance(out[i], torch.Tensor)
        assert out[i].shape == (3, 30, 40)


@pytest.mark.parametrize("engine", ["torchvision", "nvimgcodec"])
def test_gpu_batch_is_one_device_call_in_order(engine: str) -> None:
    blobs = [with_orientation(noise(40 + 8 * i, 32, seed=i), 1 + i) for i in range(5)]
    gpu = GpuDecoder(device="cpu", engine=engine)
    out = gpu.decode_batch([(b, None) for b in blobs], draft_size=(16, 16))
    assert gpu.decoded == 5
    assert not gpu.fallbacks
    assert not gpu.delegated
    for data, got in zip(blobs, out, strict=True):
        expected = np.asarray(PilDecoder().decode(data, draft_size=(16, 16)))
        assert isinstance(got, torch.Tensor)
        assert got.permute(1, 2, 0).shape == expected.shape


@pytest.mark.parametrize("engine", ["torchvision", "nvimgcodec"])
def test_gpu_delegates_by_rule_and_keeps_order(engine: str) -> None:
    gpu = GpuDecoder(device="cpu", engine=engine)
    items: list[tuple[bytes | RawPreview, str | None]] = [
        (encode(noise(40, 30), "PNG"), "png"),
        (b"", "empty"),
        (encode(noise(48, 32), "JPEG"), "jpeg"),
        (encode(noise(96, 64), "JPEG")[:-2], "no-eoi"),
        (GOOD["mode_cmyk_cyan"](), "cmyk"),
        (mpo(), "mpo"),
        (png_declaring(30_000, 30_000), "bomb"),
    ]
    out = gpu.decode_batch(items)
    shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else o.reason for o in out]
    assert shapes == [
        (3, 30, 40),
        "empty",
        (3, 32, 48),
        "truncated",
        (3, 32, 32),
        (3, 48, 64),
        "too_many_pixels",
    ]
    assert [o.source for o in out if isinstance(o, ImageDecodeError)] == ["empty", "no-eoi", "bomb"]
    assert gpu.decoded == 1
    assert gpu.delegated == {
        "format:PNG": 2,  # the PNG, and the bomb (refused by the CPU backend before decoding)
        "incomplete": 1,
        "mode:CMYK": 1,
        "format:MPO": 1,
    }
    assert not gpu.fallbacks
    assert gpu.decode_batch([]) == []


@pytest.mark.parametrize("engine", ["torchvision", "nvimgcodec"])
def test_gpu_decode_is_a_decoder_too(engine: str) -> None:
    gpu = GpuDecoder(device="cpu", engine=engine)
    data = jpeg_with_orientation(64, 48, 6)
    assert isinstance(gpu, Decoder)
    np.testing.assert_array_equal(np.asarray(gpu.decode(data)), np.asarray(decode_pil(data)))
    with pytest.raises(ImageDecodeError, match="not_image"):
        gpu.decode(b"plain text, no image")


def decode_pil(data: bytes) -> Image.Image:
    return PilDecoder().decode(data)


# ---------------------------------------------------------------- resolve_decoder


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(("name", "engine"), [("gpu", "torchvision"), ("nvimgcodec", "nvimgcodec")])
def test_gpu_without_cuda_is_config_error(name: str, engine: str) -> None:
    for make in (lambda: resolve_decoder(name), lambda: GpuDecoder("cuda:0", engine=engine)):
        with pytest.raises(ConfigError, match=f"--decode {name} needs a CUDA device; this process"):
            make()


@pytest.mark.usefixtures("no_cuda")
def test_auto_and_cpu_without_cuda_are_cpu_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DECODERS == ("auto", "cpu", "pil", "turbo", "gpu", "nvimgcodec")
    assert isinstance(resolve_decoder("pil"), PilDecoder)
    assert isinstance(resolve_decoder("turbo"), TurboDecoder)
    # Pillow's wheels decode JPEG with libjpeg-turbo: PIL is the fastest CPU backend then.
    monkeypatch.setattr(decoders, "_pillow_jpeg_is_turbo", lambda: True)
    for name, device in [("cpu", None), ("auto", None), ("auto", "cpu"), ("auto", "cuda")]:
        assert isinstance(resolve_decoder(name, device=device), PilDecoder)
    monkeypatch.setattr(decoders, "_pillow_jpeg_is_turbo", lambda: False)  # IJG libjpeg
    for name, device in [("cpu", None), ("auto", None), ("auto", "cpu"), ("auto", "cuda")]:
        assert isinstance(resolve_decoder(name, device=device), TurboDecoder)
    for name in ("auto", "cpu", "pil", "turbo"):
        assert isinstance(resolve_decoder(name), Decoder)


def test_auto_with_cuda_device_is_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # construction only
    decoder = resolve_decoder("auto", device="cuda:1")
    assert isinstance(decoder, GpuDecoder)
    assert decoder.device == torch.device("cuda:1")
    assert not isinstance(resolve_decoder("auto", device="cpu"), GpuDecoder)


def test_cpu_without_simplejpeg_is_pil(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoders, "simplejpeg", None)
    monkeypatch.setattr(decoders, "_pillow_jpeg_is_turbo", lambda: False)
    assert isinstance(resolve_decoder("cpu"), PilDecoder)
    with pytest.raises(ConfigError, match="simplejpeg"):
        resolve_decoder("turbo")


def test_bad_names_and_devices_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="choose one of auto, cpu, pil, turbo, gpu, nvimgcodec"):
        resolve_decoder("nvjpeg")
    for name in ("gpu", "nvimgcodec"):
        with pytest.raises(ConfigError, match=f"--decode {name} decodes on the model's CUDA"):
            resolve_decoder(name, device="cpu")
    with pytest.raises(ConfigError, match="unknown GPU decode engine 'dali'"):
        GpuDecoder("cpu", engine="dali")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_decoder("auto", device="tpu:x")
    with pytest.raises(ConfigError, match="not 'meta'"):
        GpuDecoder("meta")


# ---------------------------------------------------------------- nvImageCodec


def test_nvimgcodec_missing_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import fails as if absent
    with pytest.raises(ConfigError, match=r"pip install 'keeper-core\[nvimgcodec\]'"):
        GpuDecoder("cpu", engine="nvimgcodec")


def test_nvimgcodec_that_cannot_decode_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No silent slow path: a decoder whose JPEG codec did not load (on a GPU: nvJPEG's library
    missing) would send every image to the CPU; the self-test refuses it up front instead."""
    monkeypatch.setattr(decoders, "_probe_jpeg", lambda: b"\xff\xd8 not a JPEG after all")
    with pytest.raises(ConfigError, match="could not decode a test JPEG on its CPU backend"):
        GpuDecoder("cpu", engine="nvimgcodec")


def test_nvimgcodec_batch_failure_is_retried_one_at_a_time() -> None:
    """A batch call that raises (not a None per image) costs the batch nothing but a retry: the
    good images decode, the bad one falls back to the CPU and is counted."""
    gpu = GpuDecoder("cpu", cpu=PilDecoder(), engine="nvimgcodec")
    nv = gpu._nvimgcodec
    assert nv is not None
    real = nv.decoder
    bad = complete_jpeg_the_device_refuses("nvimgcodec")

    class Flaky:  # the real decoder, but a list with the bad JPEG in it raises
        def decode(self, src: object, **kw: object) -> object:
            if isinstance(src, list) and bad in src:
                raise RuntimeError("CUDA error in the batch")
            if src == bad:
                raise RuntimeError("CUDA error on this one")
            return real.decode(src, **kw)

    nv.decoder = Flaky()
    good = encode(noise(40, 30), "JPEG")
    out = gpu.decode_batch([(good, "a"), (bad, "b"), (good, "c")])
    assert gpu.fallbacks == {"RuntimeError": 1}
    assert gpu.decoded == 2
    assert [tuple(o.shape) if isinstance(o, torch.Tensor) else o.reason for o in out] == [
        (3, 30, 40),
        outcome(PilDecoder(), bad),
        (3, 30, 40),
    ]


def test_c_library_chatter_goes_to_the_log(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """What C code prints while nvImageCodec loads lands in keeper's log, not on the terminal:
    lines about codecs keeper does not use at debug level, anything else as a warning."""
    libc = ctypes.CDLL(None)
    with caplog.at_level(logging.DEBUG, logger="keeper_core.decoders"):
        with decoders._c_output_to_log():
            libc.printf(b"Failed to load nvtiff library! Please install nvTIFF\n")  # C stdio
            os.write(2, b"something unexpected\n")
        print("after", flush=True)
    out, err = capfd.readouterr()
    assert (out, err) == ("after\n", "")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "nvimgcodec: Failed to load nvtiff library! Please install nvTIFF"),
        (logging.WARNING, "nvimgcodec: something unexpected"),
    ]
