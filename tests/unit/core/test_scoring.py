"""Scoring on hand-built embeddings where the right answer is computable by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from keeper_core.errors import ConfigError, DataError
from keeper_core.scoring import (
    AestheticConfig,
    PromptEmbeddings,
    aesthetic_scores,
    clip_score,
    combined_score,
    prompt_softmax,
    relevance_score,
)

D = 8


def axis(i: int) -> np.ndarray:
    v = np.zeros(D, dtype=np.float32)
    v[i] = 1.0
    return v


def unit(*values: float) -> np.ndarray:
    v = np.zeros(D, dtype=np.float32)
    v[: len(values)] = values
    return (v / np.linalg.norm(v)).astype(np.float32)


def rows(*vectors: np.ndarray) -> np.ndarray:
    return np.stack(vectors).astype(np.float32)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def tiny_config(**overrides: object) -> AestheticConfig:
    data: dict[str, object] = {
        "pairs": [
            {"name": "sharpness", "positive": "sharp", "negative": "blurry"},
            {"name": "exposure", "positive": "bright", "negative": "dark"},
        ],
        "positive": ["pro", "award"],
        "negative": ["amateur"],
        "logit_scale": 2.0,
    }
    data.update(overrides)
    return AestheticConfig.model_validate(data)


# One axis per prompt, so a cosine is just the image's coordinate on that axis.
PROMPTS = {
    "sharp": axis(0),
    "blurry": axis(1),
    "bright": axis(2),
    "dark": axis(3),
    "pro": axis(4),
    "award": axis(5),
    "amateur": axis(6),
}


def test_pair_dimension_matches_hand_softmax() -> None:
    img = rows(unit(3, 1, 0, 2, 1, 0, 1))  # cos: sharp .75, blurry .25, bright 0, dark .5
    n = math.sqrt(9 + 1 + 4 + 1 + 1)
    got = aesthetic_scores(img, PROMPTS, tiny_config())
    # softmax(2 * [c_pos, c_neg])[0] written out as exponentials
    e_pos, e_neg = math.exp(2 * 3 / n), math.exp(2 * 1 / n)
    assert got.dimensions["sharpness"][0] == pytest.approx(e_pos / (e_pos + e_neg), abs=1e-6)
    e_pos, e_neg = math.exp(0.0), math.exp(2 * 2 / n)
    assert got.dimensions["exposure"][0] == pytest.approx(e_pos / (e_pos + e_neg), abs=1e-6)


def test_attribute_scores_centre_on_mean_attribute_cosine() -> None:
    img = rows(unit(0, 0, 0, 0, 2, 1, 3))
    n = math.sqrt(14)
    c_pro, c_award, c_amateur = 2 / n, 1 / n, 3 / n
    m = (c_pro + c_award + c_amateur) / 3
    got = aesthetic_scores(img, PROMPTS, tiny_config())
    pos = (sigmoid(2 * (c_pro - m)) + sigmoid(2 * (c_award - m))) / 2
    neg = 1 - sigmoid(2 * (c_amateur - m))
    assert got.dimensions["positive"][0] == pytest.approx(pos, abs=1e-6)
    assert got.dimensions["negative"][0] == pytest.approx(neg, abs=1e-6)
    pairs = (0.5 + 0.5) / 2  # image is orthogonal to every pair prompt: 0.5 each
    assert got.total[0] == pytest.approx(0.5 * pairs + 0.3 * pos + 0.2 * neg, abs=1e-6)
    assert set(got.dimensions) == {"sharpness", "exposure", "positive", "negative"}


def test_image_like_positive_prompt_beats_image_like_negative() -> None:
    config = tiny_config(logit_scale=100.0)
    good = unit(1, 0, 1, 0, 1, 1, 0)
    bad = unit(0, 1, 0, 1, 0, 0, 1)
    got = aesthetic_scores(rows(good, bad), PROMPTS, config)
    for name in ("sharpness", "exposure", "positive", "negative"):
        assert got.dimensions[name][0] > 0.9 > 0.1 > got.dimensions[name][1], name
    assert got.total[0] > 0.9 > 0.1 > got.total[1]
    assert got.total.dtype == np.float32
    assert got.total.shape == (2,)


def test_weights_change_total_as_expected() -> None:
    img = rows(unit(3, 1, 1, 2, 2, 1, 3), unit(1, 2, 3, 1, 1, 2, 1))
    only_pairs = aesthetic_scores(
        img, PROMPTS, tiny_config(weights={"pairs": 1, "positive": 0, "negative": 0})
    )
    pair_mean = (only_pairs.dimensions["sharpness"] + only_pairs.dimensions["exposure"]) / 2
    np.testing.assert_allclose(only_pairs.total, pair_mean, atol=1e-6)
    only_neg = aesthetic_scores(
        img, PROMPTS, tiny_config(weights={"pairs": 0, "positive": 0, "negative": 5})
    )
    np.testing.assert_allclose(only_neg.total, only_neg.dimensions["negative"], atol=1e-6)
    # Weights are normalised: (1, 1, 2) is the same as (0.25, 0.25, 0.5).
    mixed = aesthetic_scores(
        img, PROMPTS, tiny_config(weights={"pairs": 1, "positive": 1, "negative": 2})
    )
    d = mixed.dimensions
    np.testing.assert_allclose(
        mixed.total, 0.25 * pair_mean + 0.25 * d["positive"] + 0.5 * d["negative"], atol=1e-6
    )
    assert not np.allclose(mixed.total, only_pairs.total)


def test_prompt_embeddings_dataclass_equals_mapping() -> None:
    img = rows(unit(1, 2, 3, 4, 5, 6, 7), unit(7, 6, 5, 4, 3, 2, 1))
    texts = [*reversed(PROMPTS), "unused"]
    table = PromptEmbeddings(tuple(texts), rows(*[PROMPTS.get(t, axis(7)) for t in texts]))
    a = aesthetic_scores(img, PROMPTS, tiny_config())
    b = aesthetic_scores(img, table, tiny_config())
    np.testing.assert_array_equal(a.total, b.total)


def test_missing_prompt_embeddings_are_named() -> None:
    partial = {k: v for k, v in PROMPTS.items() if k not in ("dark", "award")}
    with pytest.raises(DataError, match=r"\['dark', 'award'\]"):
        aesthetic_scores(rows(axis(0)), partial, tiny_config())


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (rows(axis(0)).astype(np.float64), "image_emb: expected float32"),
        (axis(0), r"image_emb: expected shape \(N, D\)"),
        (rows(axis(0), 2 * axis(1)), "image_emb: 1 row"),
        (rows(axis(0), np.full(D, np.nan, np.float32)), "image_emb: 1 row"),
        (rows(axis(0))[:, :4], "prompt_emb: dimension 8 does not match image_emb 4"),
        ([[1.0] + [0.0] * 7], "image_emb: expected a numpy array"),
    ],
)
def test_bad_image_embeddings_raise_naming_argument(image: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        aesthetic_scores(image, PROMPTS, tiny_config())  # type: ignore[arg-type]


def test_bad_prompt_embedding_names_the_prompt() -> None:
    prompts = dict(PROMPTS, dark=np.zeros(D, np.float32))
    with pytest.raises(DataError, match="prompt_emb\\['dark'\\]") as e:
        aesthetic_scores(rows(axis(0)), prompts, tiny_config())
    assert e.value.rows == [0]


def test_large_logit_scale_is_stable() -> None:
    img = rows(axis(0), axis(1), unit(1, 1))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        got = aesthetic_scores(img, PROMPTS, tiny_config(logit_scale=1e6))
    assert got.dimensions["sharpness"].tolist() == [1.0, 0.0, 0.5]


# --------------------------------------------------------------------------- config


def test_default_config_has_required_pairs_and_weights() -> None:
    config = AestheticConfig.default()
    names = [p.name for p in config.pairs]
    assert {"sharpness", "composition", "framing", "exposure", "colour"} <= set(names)
    sharp = config.pairs[names.index("sharpness")]
    assert (sharp.positive, sharp.negative) == (
        "a sharp, well-focused photo",
        "a blurry, out-of-focus photo",
    )
    assert (config.weights.pairs, config.weights.positive, config.weights.negative) == (
        0.5,
        0.3,
        0.2,
    )
    assert config.logit_scale == 100.0
    texts = config.all_prompts()
    assert (
        len(texts)
        == len(set(texts))
        == 2 * len(config.pairs) + len(config.positive) + len(config.negative)
    )
    assert texts[:2] == [config.pairs[0].positive, config.pairs[0].negative]


def test_default_config_scores_random_embeddings_in_unit_interval() -> None:
    config = AestheticConfig.default()
    rng = np.random.default_rng(0)
    texts = config.all_prompts()
    emb = rng.normal(size=(len(texts) + 50, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = aesthetic_scores(
        emb[len(texts) :], PromptEmbeddings(tuple(texts), emb[: len(texts)]), config
    )
    assert set(got.dimensions) == {p.name for p in config.pairs} | {"positive", "negative"}
    for v in [got.total, *got.dimensions.values()]:
        assert v.shape == (50,)
        assert np.all((v >= 0) & (v <= 1))


def test_yaml_round_trip_text_and_file(tmp_path: Path) -> None:
    config = tiny_config(weights={"pairs": 0.2, "positive": 0.2, "negative": 0.6})
    assert AestheticConfig.from_yaml(config.to_yaml()) == config
    path = tmp_path / "prompts.yaml"
    path.write_text(config.to_yaml())
    assert AestheticConfig.from_yaml(path) == config
    assert AestheticConfig.from_yaml(str(path)) == config


def test_yaml_defaults_fill_weights_and_scale() -> None:
    text = "pairs: [{name: a, positive: x, negative: y}]\npositive: [p]\nnegative: [n]\n"
    config = AestheticConfig.from_yaml(text)
    assert config.weights.pairs == 0.5
    assert config.logit_scale == 100.0


BASE_YAML = """
pairs:
  - {name: sharpness, positive: sharp, negative: blurry}
positive: [pro]
negative: [amateur]
"""


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ("weights: {pairs: -0.5, positive: 0.3, negative: 0.2}", r"weights\.pairs"),
        ("weights: {pairs: 0, positive: 0, negative: 0}", "weights.*all be zero"),
        ("weights: {pairs: 1, vibes: 1}", r"weights\.vibes"),
        ("colour_boost: 2", "colour_boost"),
        ("logit_scale: 0", "logit_scale"),
    ],
)
def test_bad_config_names_the_field(extra: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AestheticConfig.from_yaml(BASE_YAML + extra + "\n")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "pairs: [{name: a, positive: '  ', negative: y}]\npositive: [p]\nnegative: [n]",
            r"pairs\.0\.positive",
        ),
        (
            "pairs: [{name: a, positive: x, negative: x}]\npositive: [p]\nnegative: [n]",
            "different texts",
        ),
        ("pairs: []\npositive: [p]\nnegative: [n]", "pairs"),
        (
            "pairs: [{name: a, positive: x, negative: y}]\npositive: ['']\nnegative: [n]",
            r"positive\.0",
        ),
        (
            "pairs: [{name: a, positive: x, negative: y}, {name: a, positive: u, negative: v}]\n"
            "positive: [p]\nnegative: [n]",
            "duplicate names",
        ),
        (
            "pairs: [{name: positive, positive: x, negative: y}]\npositive: [p]\nnegative: [n]",
            "reserved",
        ),
        (
            "pairs: [{name: a, positive: x, negative: y}]\npositive: [p]\nnegative: [p]",
            "share prompts",
        ),
        ("- just a list", "expected a mapping"),
        ("pairs: [unclosed", "invalid YAML"),
    ],
)
def test_bad_config_text_raises(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AestheticConfig.from_yaml(text)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        AestheticConfig.from_yaml(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- relevance & co


def test_relevance_score_hand_computed() -> None:
    img = rows(axis(0), unit(1, 1), axis(2))
    pos = rows(axis(0), axis(1))
    neg = rows(unit(1, 1), axis(3))
    r = math.sqrt(0.5)
    np.testing.assert_allclose(relevance_score(img, pos), [1.0, r, 0.0], atol=1e-6)
    np.testing.assert_allclose(relevance_score(img, pos, neg), [1 - r, r - 1, 0.0], atol=1e-6)
    np.testing.assert_allclose(
        relevance_score(img, pos, rows(axis(0))[:0]), [1.0, r, 0.0], atol=1e-6
    )


def test_relevance_score_rejects_bad_prompts() -> None:
    with pytest.raises(DataError, match="positive_emb: needs at least 1"):
        relevance_score(rows(axis(0)), rows(axis(0))[:0])
    with pytest.raises(DataError, match="negative_emb: dimension 4 does not match 8"):
        relevance_score(rows(axis(0)), rows(axis(0)), rows(axis(0))[:, :4])


def test_clip_score_hand_computed() -> None:
    img = rows(unit(3, 4), axis(2))
    txt = rows(axis(0), axis(1), -axis(0))
    np.testing.assert_allclose(clip_score(img, txt), [[60, 80, 0], [0, 0, 0]], atol=1e-4)


def test_prompt_softmax_hand_computed() -> None:
    img = rows(axis(0), unit(1, 1))
    txt = rows(axis(0), axis(1))
    p = prompt_softmax(img, txt, temperature=0.5)  # logits [2, 0] and [1.414, 1.414]
    e2 = math.exp(2)
    np.testing.assert_allclose(p, [[e2 / (e2 + 1), 1 / (e2 + 1)], [0.5, 0.5]], atol=1e-6)
    with np.errstate(over="raise", invalid="raise"):
        sharp = prompt_softmax(img, txt, temperature=1e-4)
    np.testing.assert_allclose(sharp.sum(axis=1), 1.0, atol=1e-6)
    assert sharp[0, 0] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="temperature"):
        prompt_softmax(img, txt, temperature=0.0)


def test_combined_score() -> None:
    clip, vlm, head = np.array([1.0, 2.0]), np.array([10.0, 20.0]), np.array([100.0, 0.0])
    np.testing.assert_allclose(combined_score(clip), [1.0, 2.0])
    np.testing.assert_allclose(combined_score(clip, vlm, alpha=0.5, beta=0.1), [1.5, 3.0])
    np.testing.assert_allclose(
        combined_score(clip, vlm, head, alpha=1, beta=1, gamma=0.01), [12.0, 22.0]
    )
    np.testing.assert_allclose(combined_score(clip, None, head, beta=0.0), [1.0, 2.0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": 0.5}, DataError, "beta=0.5 but s_vlm is missing"),
        ({"s_head": np.ones(2), "gamma": -1.0}, ConfigError, "gamma"),
        ({"s_vlm": np.ones(3), "beta": 1.0}, DataError, "s_vlm: length 3 does not match 2"),
        ({"s_vlm": np.array([1.0, np.nan]), "beta": 1.0}, DataError, "s_vlm: 1 non-finite"),
        ({"s_vlm": np.ones((2, 1)), "beta": 1.0}, DataError, r"s_vlm: expected shape \(N,\)"),
    ],
)
def test_combined_score_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        combined_score(np.ones(2), **kwargs)
