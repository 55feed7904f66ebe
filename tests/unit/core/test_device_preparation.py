"""keeper_core.device_preparation: the GPU node's preparation equals ImagePreparation's.

Everything runs on CPU tensors here; on a GPU the same torch ops run on the device. Images are
real photos (scikit-image's) or built in code: flat, noisy, blurred, clipped, tiny, large.

Tolerances. The resizes reproduce PIL's integer arithmetic, so from the same decoded pixels the
model input, the 256 x 256 quality resize and the dhash are bit-identical (asserted exactly),
and the features differ only by float32 summation order: ``SAME_PIXELS_TOL`` (measured max
over these cases: sharpness 4.8e-7 on the log scale, 1.2e-7 or less for the others).
With ``GpuDecoder(device="cpu")`` the decode itself differs (torchvision's libjpeg or
nvImageCodec's libjpeg-turbo, a box draft
instead of a DCT draft, the band's grey from RGB instead of libjpeg's Y), so its features are
held to ``DECODER_TOL`` (measured max: sharpness 0.0068, blockiness 0.024, clip_dark 0.0015,
colourfulness 0.0018, clip_bright 4e-4, brightness/contrast/noise 1.4e-4 or less; model input
0.07 levels mean, dhash identical).
"""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageFilter
from support_photos import make_dng
from test_preparation import cut_out, jpeg, photo_like, png, with_orientation

from keeper_core import device_preparation as dp
from keeper_core.decoders import GpuDecoder, PilDecoder
from keeper_core.device_preparation import (
    DevicePreparation,
    block_grid_ratio_tensor,
    dhash_tensor,
    grey_tensor,
    model_resize_tensor,
    quality_features_tensor,
)
from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import DataError, ImageDecodeError
from keeper_core.grouping import dhash
from keeper_core.images import to_rgb
from keeper_core.models import PreprocessConfig, resize_transform
from keeper_core.preparation import DecodedImage, ImagePreparation
from keeper_core.quality import FEATURE_NAMES, block_grid_ratio, opaque_mask, quality_features
from keeper_core.synthetic import load_photos

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = "keeper-tiny:random"
F = {name: i for i, name in enumerate(FEATURE_NAMES)}
SAME_PIXELS_TOL = dict.fromkeys(FEATURE_NAMES, 1e-5) | {"sharpness": 1e-4}
DECODER_TOL = {
    "sharpness": 0.1,  # log scale; a 1-level pixel change moves it ~0.01
    "brightness": 0.005,
    "clip_dark": 0.01,
    "clip_bright": 0.01,
    "contrast": 0.005,
    "noise": 0.002,  # absolute sigma in [0, 1] units (~0.5 level)
    "colorfulness": 0.01,
    "blockiness": 0.05,
    "width": 0.0,
    "height": 0.0,
}


def chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def assert_features_close(
    expected: np.ndarray, got: torch.Tensor, tol: dict[str, float]
) -> np.ndarray:
    """Per feature: |expected - got| within tol; returns the per-feature max difference."""
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    diff = np.abs(expected.astype(np.float64) - got.numpy().astype(np.float64)).max(axis=0)
    bad = {n: float(diff[i]) for n, i in F.items() if diff[i] > tol[n]}
    assert not bad, f"features beyond tolerance: {bad}"
    return diff


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return load_photos(["astronaut", "chelsea", "coffee", "rocket"])


@pytest.fixture(scope="module")
def corpus(photos: dict[str, Image.Image]) -> list[Image.Image]:
    """Textured photos, degraded ones and edge cases, at sizes taking every resize path."""
    rng = np.random.default_rng(0)
    astro = photos["astronaut"]
    noisy = np.asarray(astro, np.float32) + rng.normal(0, 25, (512, 512, 3))
    clipped = np.asarray(astro, np.float32) * 2.2  # overexposed: many pixels at 255
    return [
        *photos.values(),  # 512x512, 451x300, 400x600, 427x640: no reduce before the resize
        Image.new("RGB", (320, 240), (128, 128, 128)),  # flat
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
        astro.filter(ImageFilter.GaussianBlur(3)),
        Image.fromarray(np.clip(clipped, 0, 255).astype(np.uint8)),
        photo_like(1600, 1200, seed=1),  # reduce by 2 x 1 first (reducing_gap)
        astro.resize((300, 1000)),  # PIL >= 13 resizes this vertically first
        astro.resize((15, 40)),  # upscaled; blockiness 1.0 (too narrow for the crop)
    ]


# ---------------------------------------------------------------- resampling


@pytest.mark.parametrize(
    "size",
    [(640, 427), (1531, 1027), (2000, 700), (300, 1000), (700, 2600), (100, 90), (255, 257)],
)
def test_quality_resize_is_pils_bit_for_bit(size: tuple[int, int]) -> None:
    im = photo_like(*size, seed=3)
    expected = np.asarray(im.resize((256, 256), Image.Resampling.BILINEAR, reducing_gap=3.0))
    got = dp._resize_reducing_gap(chw(im)[None].to(torch.int32), 256, "bilinear", 3.0)
    np.testing.assert_array_equal(got[0].permute(1, 2, 0).numpy(), expected)


def test_grey_is_pils_l() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    np.testing.assert_array_equal(grey_tensor(tensor).numpy(), expected)
    np.testing.assert_array_equal(grey_tensor(tensor[None])[0].numpy(), expected)  # batched


# ---------------------------------------------------------------- quality features


def test_quality_features_equal_the_cpus_on_the_same_pixels(corpus: list[Image.Image]) -> None:
    expected = quality_features(corpus)
    got = quality_features_tensor([chw(im) for im in corpus])
    diff = assert_features_close(expected, got, SAME_PIXELS_TOL)
    assert diff[F["width"]] == diff[F["height"]] == 0
    assert got[-1, F["blockiness"]] == 1.0  # 15 wide: too narrow to hold a block boundary
    # The corpus spans the features: a test that cannot tell them apart would prove nothing.
    assert expected[:, F["clip_bright"]].max() > 0.1
    assert expected[:, F["noise"]].min() < 0.001 < 0.01 < expected[:, F["noise"]].max()


def cut_outs() -> list[Image.Image]:
    """Images with transparency: cut-outs (one large enough for the reduce before the resize),
    alpha opaque on every other column (no opaque 3x3 neighbourhood), and a blank."""
    cut, _ = cut_out("RGBA")
    stripes = np.zeros((64, 64, 4), np.uint8)
    stripes[..., :3] = 100
    stripes[:, ::2, 3] = 255
    return [
        cut,
        cut_out("RGBA", transparent=0.3)[0].resize((1600, 1200)),
        cut_out("LA")[0].convert("RGBA"),
        Image.fromarray(stripes, "RGBA"),
        Image.new("RGBA", (50, 40), (10, 20, 30, 0)),
    ]


def test_quality_features_with_alpha_equal_the_cpus() -> None:
    """Measured where opaque, as quality_features: the alpha resized bit for bit as PIL does."""
    images = cut_outs()
    alphas = [im.getchannel("A") for im in images]
    for size in (256, 64):
        for a in alphas:
            want = opaque_mask(a, size)
            got = dp._opaque_mask(torch.from_numpy(np.asarray(a).copy()), size)
            assert (want is None) == (got is None)
            if want is not None and got is not None:
                np.testing.assert_array_equal(got.numpy(), want)
    expected = quality_features(images)
    composited = [chw(to_rgb(im)) for im in images]  # what a decoder hands over
    got = quality_features_tensor(
        composited, alpha=[torch.from_numpy(np.asarray(a).copy()) for a in alphas]
    )
    assert_features_close(expected, got, SAME_PIXELS_TOL)
    assert expected[0, F["clip_bright"]] == 0.0
    # Without its alpha the same pixels read as before: the backdrop is blown.
    assert float(quality_features_tensor(composited[:1])[0, F["clip_bright"]]) > 0.5


def test_quality_features_take_blockiness_and_sizes(corpus: list[Image.Image]) -> None:
    images = [chw(im) for im in corpus[:3]]
    got = quality_features_tensor(
        images,
        blockiness=[3.25, None, torch.tensor(1.5, dtype=torch.float64)],
        sizes=[(4000, 3000), (451, 300), (7, 9)],
    )
    assert got[:, F["blockiness"]].tolist() == [3.25, pytest.approx(float(got[1, 7])), 1.5]
    assert got[1, F["blockiness"]] == pytest.approx(quality_features([corpus[1]])[0, 7])
    assert got[:, F["width"]].tolist() == [4000, 451, 7]
    assert got[:, F["height"]].tolist() == [3000, 300, 9]
    # Chunks of 64 images: a batch across the boundary gives each image its own row.
    many = quality_features_tensor(images * 23)  # 69 images: rows 63..65 straddle a chunk
    torch.testing.assert_close(many[63:66], many[:3])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quality_features_tensor([torch.zeros(3, 8, 8)]), "uint8"),
        (lambda: quality_features_tensor([torch.zeros(4, 8, 8, dtype=torch.uint8)]), "shape"),
        (lambda: quality_features_tensor([torch.zeros(8, 8, dtype=torch.uint8)]), "uint8"),
        (lambda: quality_features_tensor([np.zeros((3, 8, 8), np.uint8)]), "ndarray"),  # type: ignore[list-item]
        (
            lambda: quality_features_tensor([torch.zeros(3, 8, 8, dtype=torch.uint8)], size=4),
            "size",
        ),
        (
            lambda: quality_features_tensor(
                [torch.zeros(3, 8, 8, dtype=torch.uint8)], blockiness=[1.0, 2.0]
            ),
            "2 blockiness",
        ),
        (
            lambda: quality_features_tensor([torch.zeros(3, 8, 8, dtype=torch.uint8)], sizes=[]),
            "0 sizes",
        ),
        (
            lambda: quality_features_tensor([torch.zeros(3, 8, 8, dtype=torch.uint8)], alpha=[]),
            "0 alphas",
        ),
        (
            lambda: quality_features_tensor(
                [torch.zeros(3, 8, 8, dtype=torch.uint8)],
                alpha=[torch.zeros(8, 9, dtype=torch.uint8)],
            ),
            r"alpha 0 must be a uint8 \(8, 8\)",
        ),
        (lambda: block_grid_ratio_tensor(torch.zeros(8, 40)), "16 x 16"),
        (lambda: dhash_tensor(torch.zeros(3, 8, 8, dtype=torch.int64)), "uint8"),
    ],
)
def test_bad_input_is_a_data_error(call: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        call()  # type: ignore[operator]


def test_empty_batches_keep_their_shapes() -> None:
    assert quality_features_tensor([]).shape == (0, len(FEATURE_NAMES))
    assert model_resize_tensor(SPEC, []).shape == (0, 3, 64, 64)
    out = DevicePreparation(SPEC).prepare([])
    assert out.pixels.shape == (0, 3, 64, 64)
    assert out.features.shape == (0, len(FEATURE_NAMES))
    assert (out.ok, out.errors, out.dhash) == ([], [], [])


def grey_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


@pytest.mark.parametrize(
    "make",
    [
        lambda: grey_of(jpeg(photo_like(512, 512), 10)),  # blocky: ~4
        lambda: grey_of(jpeg(photo_like(512, 384, seed=2), 95)),  # clean: ~1.1
        lambda: grey_of(jpeg(photo_like(2000, 64, seed=4), 10)),  # a band's shape
        lambda: np.random.default_rng(5).integers(0, 256, (61, 97)).astype(np.uint8),
        lambda: np.full((32, 32), 200, np.uint8),  # flat: 0/0 guarded, reads 1
    ],
)
def test_block_grid_ratio_equals_numpy(make: object) -> None:
    grey = make()  # type: ignore[operator]
    assert block_grid_ratio_tensor(torch.from_numpy(grey.copy())) == pytest.approx(
        block_grid_ratio(grey), abs=1e-6
    )


# ---------------------------------------------------------------- model input and dhash


def geometric(transform: object) -> object:
    steps = [
        t
        for t in transform.transforms  # type: ignore[attr-defined]
        if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")
    ]

    def apply(im: Image.Image) -> np.ndarray:
        for t in steps:
            im = t(im)
        return np.asarray(im, np.uint8).transpose(2, 0, 1)

    return apply


SHAPES = [(512, 512), (451, 300), (300, 451), (1000, 300), (60, 40), (225, 224)]


@pytest.mark.parametrize("spec", [SPEC, "ViT-B-32:random"])
def test_model_input_equals_resize_transform(spec: str, photos: dict[str, Image.Image]) -> None:
    images = [photos["chelsea"].resize(s, Image.Resampling.BILINEAR) for s in SHAPES]
    got = model_resize_tensor(spec, [chw(im) for im in images])
    reference = resize_transform(spec)
    for im, out in zip(images, got, strict=True):
        np.testing.assert_array_equal(out.numpy(), reference(im))


@pytest.mark.parametrize(
    ("mode", "interpolation"),
    [
        ("longest", "bicubic"),
        ("squash", "bicubic"),
        ("shortest", "bilinear"),
        ("longest", "bilinear"),
    ],
)
def test_model_input_other_open_clip_geometries(
    mode: str, interpolation: str, photos: dict[str, Image.Image]
) -> None:
    cfg = PreprocessConfig(
        image_size=96, mean=(0, 0, 0), std=(1, 1, 1), interpolation=interpolation, resize_mode=mode
    )
    reference = geometric(
        open_clip.image_transform(96, is_train=False, resize_mode=mode, interpolation=interpolation)
    )
    images = [photos["coffee"].resize(s, Image.Resampling.BILINEAR) for s in SHAPES]
    got = model_resize_tensor(cfg, [chw(im) for im in images])
    for im, out in zip(images, got, strict=True):
        np.testing.assert_array_equal(out.numpy(), reference(im))  # type: ignore[operator]


def test_model_input_embeds_as_the_cpus(corpus: list[Image.Image]) -> None:
    embedder = ClipEmbedder(SPEC, device="cpu")
    reference = np.stack([resize_transform(SPEC)(im) for im in corpus])
    got = model_resize_tensor(SPEC, [chw(im) for im in corpus])
    assert np.abs(got.numpy().astype(np.int16) - reference).mean() == 0.0
    cosine = (embedder.embed_pixels(got) * embedder.embed_pixels(reference)).sum(axis=1)
    assert cosine.min() >= 0.99


def test_dhash_is_bit_exact(corpus: list[Image.Image]) -> None:
    sizes = [(2000, 1500), (500, 375), (97, 61), (9, 8), (8, 20)]
    images = [*corpus, *(corpus[0].resize(s) for s in sizes)]
    for im in images:
        assert dhash_tensor(chw(im)) == dhash(im), im.size
    assert len({dhash(im) for im in corpus[:4]}) == 4  # four photos, four hashes


# ---------------------------------------------------------------- DevicePreparation


@pytest.fixture(scope="module")
def items(photos: dict[str, Image.Image]) -> list[tuple[bytes, str]]:
    """A batch as keeper embed sees one: good, drafted, delegated and broken images."""
    big = photo_like(2000, 1500)
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, "PNG")
    cmyk = io.BytesIO()
    photo_like(1200, 900, seed=5).convert("CMYK").save(cmyk, "JPEG", quality=20)
    return [
        (jpeg(photos["astronaut"], 90), "photo.jpg"),  # undrafted JPEG
        (png(photos["coffee"]), "coffee.png"),  # the device leaves PNG to the CPU
        (jpeg(big, 10), "crushed.jpg"),  # drafted 1/4: blockiness from the band
        (jpeg(big, 95), "clean.jpg"),
        (with_orientation(big, 10, 6), "rotated.jpg"),  # EXIF 6: displayed 1500 x 2000
        (cmyk.getvalue(), "cmyk.jpg"),  # drafted by the CPU backend: its band decoded there
        (make_dng(None, preview=photos["rocket"]), "raw.dng"),  # the embedded JPEG preview
        (jpeg(big, 10)[:30_000], "cut.jpg"),
        (b"not an image at all", "notes.txt"),
        (tiny.getvalue(), "tiny.png"),
        (png(cut_out("RGBA")[0]), "cut-out.png"),  # transparent: the CPU decodes, keeps alpha
    ]


@pytest.fixture(scope="module")
def reference(
    items: list[tuple[bytes, str]],
) -> tuple[ImagePreparation, list[DecodedImage | ImageDecodeError]]:
    prep = ImagePreparation(SPEC)
    out: list[DecodedImage | ImageDecodeError] = []
    for data, source in items:
        try:
            out.append(prep.decode(data, source=source))
        except ImageDecodeError as e:
            out.append(e)
    return prep, out


@pytest.mark.parametrize("backend", ["pil", "gpu-on-cpu", "nvimgcodec-on-cpu"])
def test_prepare_matches_image_preparation(
    backend: str,
    items: list[tuple[bytes, str]],
    reference: tuple[ImagePreparation, list[DecodedImage | ImageDecodeError]],
) -> None:
    prep, expected = reference
    engine = {"gpu-on-cpu": "torchvision", "nvimgcodec-on-cpu": "nvimgcodec"}.get(backend)
    decoder = PilDecoder() if engine is None else GpuDecoder(device="cpu", engine=engine)
    out = DevicePreparation(SPEC, device="cpu", decoder=decoder).prepare(items)

    good = [d for d in expected if isinstance(d, DecodedImage)]
    assert out.ok == [i for i, d in enumerate(expected) if isinstance(d, DecodedImage)]
    assert [(i, e.reason, e.source) for i, e in out.errors] == [
        (i, e.reason, e.source) for i, e in enumerate(expected) if isinstance(e, ImageDecodeError)
    ]
    assert [e.reason for _, e in out.errors] == ["truncated", "not_image", "too_small"]
    assert (out.width, out.height) == ([d.width for d in good], [d.height for d in good])
    assert out.pixels.shape == (len(good), 3, 64, 64)
    assert out.pixels.dtype == torch.uint8
    assert out.features.dtype == torch.float32
    drafted = [out.ok.index(i) for i in (2, 3, 4, 5)]
    assert all(good[r].blockiness is not None for r in drafted)  # they took the band path
    cut = out.ok.index(10)
    assert good[cut].alpha is not None
    assert float(out.features[cut, F["clip_bright"]]) == 0.0  # its backdrop is no highlight

    cpu_features = prep.quality(good)
    if backend == "pil":  # the same decoded pixels: everything after decode is exact
        assert_features_close(cpu_features, out.features, SAME_PIXELS_TOL)
        np.testing.assert_array_equal(out.pixels.numpy(), prep.pixels(good))
        assert out.dhash == [dhash(d.image) for d in good]
        return
    assert_features_close(cpu_features, out.features, DECODER_TOL)
    assert isinstance(decoder, GpuDecoder)
    assert decoder.decoded == 5  # the four JPEGs and the DNG's preview
    assert decoder.delegated["mode:CMYK"] == 1
    assert decoder.delegated["format:PNG"] == 3  # coffee, cut-out, and tiny (then too_small)
    # A different decode, the same images: model inputs within a level, dhash near identical.
    mean_abs = np.abs(out.pixels.numpy().astype(np.int16) - prep.pixels(good)).mean()
    assert mean_abs < 1.0
    hamming = [
        bin((a ^ dhash(d.image)) & (2**64 - 1)).count("1")
        for a, d in zip(out.dhash, good, strict=True)
    ]
    assert max(hamming) <= 2
    crushed, clean = (float(out.features[out.ok.index(i), F["blockiness"]]) for i in (2, 3))
    assert crushed > 2.0 > 1.2 > clean  # the band still tells a quality-10 JPEG from a 95


def test_decode_batch_with_bands_is_the_full_decodes_top_rows() -> None:
    big = photo_like(2000, 1500, seed=7)
    items = [(jpeg(big, 30), "big.jpg"), (jpeg(big.resize((400, 300)), 30), "small.jpg")]
    items.append((png(big.resize((1200, 900))), "big.png"))
    cut = cut_out("RGBA")[0]
    items.append((png(cut), "cut-out.png"))
    decoder = GpuDecoder(device="cpu")
    draft = (256, 256)
    banded = decoder.decode_batch_with_bands(items, draft_size=draft, band_pixels=65_536)
    plain = decoder.decode_batch(items, draft_size=draft)
    full = decoder.decode_batch(items[:1])
    assert not any(isinstance(r, ImageDecodeError) for r in [*banded, *plain, *full])
    (pixels, band, alpha), (small, no_band, _), (_, png_band, png_alpha), (_, _, cut_alpha) = banded  # type: ignore[misc]
    assert alpha is None  # a JPEG
    assert png_alpha is None  # an opaque PNG
    assert cut_alpha is not None
    np.testing.assert_array_equal(cut_alpha.numpy(), np.asarray(cut.getchannel("A")))
    assert pixels.shape == (3, 375, 500)  # drafted 1/4
    torch.testing.assert_close(pixels, plain[0])
    torch.testing.assert_close(small, plain[1])
    assert no_band is None
    assert png_band is None
    assert band is not None
    assert band.shape == (64, 2000)
    torch.testing.assert_close(band, grey_tensor(full[0][:, :64]))  # type: ignore[index]
