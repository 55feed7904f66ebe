"""ClipEmbedder: the callable used by Ray Data, Serve and tests alike."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from keeper_core.embedding import ClipEmbedder, check_same_spec, l2_normalize
from keeper_core.errors import DataError


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    return ClipEmbedder("keeper-tiny:random", batch_size=3)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)) for _ in range(7)]


def test_call_adds_unit_norm_embeddings_and_spec(
    embedder: ClipEmbedder, images: list[Image.Image]
) -> None:
    out = embedder({"image": images, "image_uri": np.array([f"u{i}" for i in range(7)])})
    emb = out["embedding"]
    assert emb.shape == (7, 64)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert list(out["model_spec"]) == ["keeper-tiny:random"] * 7
    assert list(out["image_uri"]) == [f"u{i}" for i in range(7)]
    assert "image" not in out


def test_pixels_path_equals_image_path(embedder: ClipEmbedder, images: list[Image.Image]) -> None:
    pixels = np.stack([embedder.preprocess(im) for im in images])
    a = embedder({"pixel_values": pixels})["embedding"]
    b = embedder({"image": [np.asarray(im) for im in images]})["embedding"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_batching_does_not_change_results(images: list[Image.Image]) -> None:
    one = ClipEmbedder("keeper-tiny:random", batch_size=1).embed_images(images)
    many = ClipEmbedder("keeper-tiny:random", batch_size=64).embed_images(images)
    np.testing.assert_allclose(one, many, atol=1e-5)
    assert not np.allclose(one[0], one[1]), "different images must embed differently"


def test_text_embeddings_cached_and_consistent(embedder: ClipEmbedder) -> None:
    first = embedder.embed_texts(["a sharp photo", "a blurry photo"])
    again = embedder.embed_texts(["a blurry photo", "a sharp photo", "a sharp photo"])
    np.testing.assert_array_equal(again[0], first[1])
    np.testing.assert_array_equal(again[2], first[0])
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(first[0], first[1])
    prompts = embedder.prompt_embeddings(["a sharp photo"])
    np.testing.assert_array_equal(prompts["a sharp photo"], first[0])


def test_text_cache_is_bounded() -> None:
    e = ClipEmbedder("keeper-tiny:random", text_cache_size=2)
    e.embed_texts(["a", "b", "c"])
    assert len(e._text_cache) == 2


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda e: e({"uri": ["x"]}), "neither"),
        (lambda e: e.embed_texts("one string"), "sequence"),
        (lambda e: e.embed_texts(["ok", ""]), r"positions \[1\]"),
        (lambda e: e.embed_pixels(np.zeros((2, 64, 64))), "pixel_values"),
    ],
)
def test_bad_input(embedder: ClipEmbedder, call: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        call(embedder)  # type: ignore[operator]


def test_mixing_specs_is_an_error() -> None:
    assert check_same_spec("keeper-tiny", "keeper-tiny:random") == "keeper-tiny:random"
    with pytest.raises(DataError, match="cannot be mixed"):
        check_same_spec("keeper-tiny:random", "ViT-B-32:random")


def test_l2_normalize_handles_zero_rows() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_uint8_pixels_equal_full_transform(
    embedder: ClipEmbedder, images: list[Image.Image]
) -> None:
    pixels = np.stack([embedder.preprocess_uint8(im) for im in images])
    assert pixels.dtype == np.uint8
    assert pixels.shape == (7, 3, 64, 64)
    a = embedder({"pixel_values": pixels})["embedding"]
    b = embedder.embed_images(images)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_wrong_pixel_size_is_refused(embedder: ClipEmbedder) -> None:
    with pytest.raises(DataError, match=r"\(N, 3, 64, 64\)"):
        embedder.embed_pixels(np.zeros((1, 3, 32, 32), dtype=np.uint8))
