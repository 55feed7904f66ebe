"""A CLIP's tokenizer is made on first use: image embeddings never need it (an air-gapped
cluster cannot fetch SigLIP's from the Hugging Face hub), and one that cannot be made is a
ModelLoadError naming the spec, not the library's own exception."""

from __future__ import annotations

import numpy as np
import pytest
from support import register_tiny_variant

from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ModelLoadError
from keeper_core.models import load_tokenizer

ARCH = "keeper-tiny-hftok-test"
HF = "keeper/no such tokenizer"  # an invalid hub id: refused locally, nothing is fetched


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory: pytest.TempPathFactory) -> None:
    register_tiny_variant(
        tmp_path_factory.mktemp("configs"), ARCH, text_cfg={"hf_tokenizer_name": HF}
    )


def test_images_embed_without_the_tokenizer_and_text_names_what_is_missing() -> None:
    embedder = ClipEmbedder(f"{ARCH}:random", device="cpu")
    plain = ClipEmbedder("keeper-tiny:random", device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    # the same tower as keeper-tiny (the same seeded init): the same image embeddings
    np.testing.assert_allclose(embedder.embed_pixels(pixels), plain.embed_pixels(pixels), atol=1e-6)

    with pytest.raises(ModelLoadError) as e:
        embedder.embed_texts(["a sharp photo"])
    assert e.value.spec == f"{ARCH}:random"
    assert "tokenizer" in str(e.value)
    assert HF in str(e.value)
    assert "image embeddings do not" in str(e.value)


def test_a_tokenizer_that_loads_is_made_once() -> None:
    embedder = ClipEmbedder("keeper-tiny:random", device="cpu")
    first = embedder.clip.tokenizer
    assert embedder.clip.tokenizer is first
    assert embedder.embed_texts(["a photo"]).shape == (1, 64)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(f"{ARCH}:random")
