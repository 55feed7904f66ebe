"""keeper select with a SigLIP-style model (a learned logit bias), through the real loader.

SigLIP gives each image-text pair an independent probability ``sigmoid(scale * cos + bias)``; the
cascade's ``S_clip = sigmoid(scale * (c+ - c-))`` is the probability the image shows the positive
rather than the strongest negative, given it shows one of them (keeper_core.cascade). The test
computes that from the model's own forward pass, bias included, and compares.
"""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
from support import register_tiny_variant

from keeper_core.cascade import NEUTRAL_PROMPT, CascadeConfig, run_cascade
from keeper_core.embedding import ClipEmbedder
from keeper_train.jobs.select import Query, prompt_embeddings

ARCH = "keeper-tiny-bias-test"  # no "siglip" in it: open_clip would fetch SigLIP's tokenizer
BIAS = -10.0
SCALE = 10.0


@pytest.fixture(scope="module")
def siglip_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """keeper-tiny with SigLIP's initial logit scale and bias, registered with open_clip."""
    return register_tiny_variant(
        tmp_path_factory.mktemp("configs"),
        ARCH,
        init_logit_scale=math.log(SCALE),
        init_logit_bias=BIAS,
    )


def test_a_siglip_style_model_selects_with_its_own_two_way_probability(siglip_spec: str) -> None:
    query = Query(name="car", positive=["a red car", "a red truck"], negative=["a blue boat"])
    table, cascade, source = prompt_embeddings(siglip_spec, [query], CascadeConfig())
    assert source == "model"
    assert cascade.logit_scale == pytest.approx(SCALE, rel=1e-5)

    embedder = ClipEmbedder(siglip_spec, device="cpu")
    assert embedder.logit_bias == pytest.approx(BIAS)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    image_emb = embedder.embed_images(images)
    positives = np.stack([table[t] for t in query.positive])
    negatives = np.stack([table[t] for t in (*query.negative, NEUTRAL_PROMPT)])
    result = run_cascade(image_emb, positives, negatives, config=cascade)

    # The model's own logits (scale * cos + bias), from its forward pass.
    model = embedder.clip.model
    texts = [*query.positive, *query.negative, NEUTRAL_PROMPT]
    tokens = open_clip.get_tokenizer(ARCH)(texts)
    pixels = torch.from_numpy(np.stack([embedder.preprocess(im) for im in images]))
    with torch.no_grad():
        img, txt, scale, bias = model(pixels, tokens)
    logits = (scale * img @ txt.T + bias).detach().double().numpy()
    p_pos = 1 / (1 + np.exp(-logits[:, :2].max(axis=1)))
    p_neg = 1 / (1 + np.exp(-logits[:, 2:].max(axis=1)))
    expected = p_pos * (1 - p_neg) / (p_pos * (1 - p_neg) + p_neg * (1 - p_pos))
    np.testing.assert_allclose(result.candidates.clip, expected, rtol=1e-4)
    assert not np.allclose(expected, 0.5, atol=1e-3)  # the images differ in relevance
