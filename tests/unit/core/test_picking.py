"""Picking: zero-shot scores, ranking within groups, keep / alternate / reject with reasons."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter
from pydantic import ValidationError

from keeper_core.errors import DataError
from keeper_core.picking import (
    SIMILARITY_COLUMN,
    ZERO_SHOT_RULE,
    PickConfig,
    decide,
    display_names,
    rank_in_groups,
    zero_shot_scores,
)
from keeper_core.quality import FEATURE_NAMES, quality_features

CLEAN: dict[str, Any] = {
    "sharpness": 7.0,
    "brightness": 0.45,
    "clip_dark": 0.0,
    "clip_bright": 0.0,
    "contrast": 0.15,
    "noise": 0.003,
    "colorfulness": 0.2,
    "blockiness": 1.05,
    "width": 4000,
    "height": 3000,
}


def shot(name: str, group: int, **over: Any) -> dict[str, Any]:
    """One row of a pick frame: a clean shot unless ``over`` says otherwise."""
    row = {"image_uri": f"/photos/{name}", "group": group, "duplicate_of": -1}
    row["duplicate_kind"] = None
    return {**row, **CLEAN, **over}


def frame(*rows: dict[str, Any]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows))
    df["group_size"] = df.groupby("group")["group"].transform("size")
    return df


def pick(df: pd.DataFrame, config: PickConfig | None = None) -> pd.DataFrame:
    """The zero-shot pipeline: score, rank, decide."""
    return decide(rank_in_groups(df, zero_shot_scores(df)), config or PickConfig())


def by_name(out: pd.DataFrame) -> dict[str, pd.Series]:
    return {
        u.rsplit("/", 1)[-1]: row
        for u, (_, row) in zip(out.image_uri, out.iterrows(), strict=False)
    }


def library(seed: int) -> pd.DataFrame:
    """A random library: groups of 1-6 shots, exact and near duplicates, one all-duplicate group."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for g in range(12):
        for k in range(int(rng.integers(1, 7))):
            rows.append(
                shot(
                    f"g{g:02d}_{k}.jpg",
                    g,
                    sharpness=float(rng.normal(6.5, 0.8)),
                    brightness=float(rng.uniform(0.3, 0.6)),
                    noise=float(rng.uniform(0.002, 0.01)),
                    clip_bright=float(rng.choice([0.0, 0.0, 0.02, 0.15])),
                    clip_dark=float(rng.choice([0.0, 0.0, 0.3])),
                    blockiness=float(rng.choice([1.05, 1.1, 1.9])),
                )
            )
    n = len(rows)
    # An exact duplicate of row 0 in its own group, a near duplicate of row 1 in another
    # group, and a group whose both shots duplicate shots elsewhere.
    rows.append({**rows[0], "image_uri": "/photos/copy_of_first.jpg", "duplicate_of": 0})
    rows[-1]["duplicate_kind"] = "exact"
    last = rows[n - 1]["group"]
    rows.append({**rows[1], "image_uri": "/photos/near_second.jpg", "group": last})
    rows[-1].update(duplicate_of=1, duplicate_kind="near", sharpness=rows[1]["sharpness"] + 0.3)
    for k, src in enumerate((2, 3)):
        rows.append({**rows[src], "image_uri": f"/other/dup{k}.jpg", "group": 99})
        rows[-1].update(duplicate_of=src, duplicate_kind="exact")
    return frame(*rows)


# --------------------------------------------------------------------------- zero-shot scores


def test_zero_shot_label_says_no_trained_ranker() -> None:
    assert "zero-shot" in ZERO_SHOT_RULE
    assert "no trained ranker" in ZERO_SHOT_RULE


def test_zero_shot_prefers_the_sharp_clean_shot() -> None:
    # Noise and overexposure both raise the Laplacian variance: each "looks sharper" than the
    # clean shot, and the penalties must undo that.
    df = frame(
        shot("clean.jpg", 0, sharpness=7.0),
        shot("blurred.jpg", 0, sharpness=5.2),
        shot("noisy.jpg", 0, sharpness=7.4, noise=0.02),
        shot("blown.jpg", 0, sharpness=7.3, clip_bright=0.25, brightness=0.7),
        shot("blocky.jpg", 0, sharpness=7.05, blockiness=2.5),
        shot("soft.jpg", 0, sharpness=6.8),
    )
    scores = zero_shot_scores(df)
    assert df.image_uri[int(np.argmax(scores))] == "/photos/clean.jpg"
    assert scores.dtype == np.float64
    assert scores.shape == (6,)


def scene(seed: int) -> np.ndarray:
    """A 320 x 240 RGB scene of overlapping shapes, slightly soft and noisy like a photo."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(60, 180, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y, w, h = (int(v) for v in rng.integers((0, 0, 10, 10), (320, 240, 90, 90)))
        fill = tuple(int(v) for v in rng.integers(20, 236, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float64)
    return arr + rng.normal(0, 1.5, arr.shape)


def u8(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_picks_the_original_among_real_degraded_images(seed: int) -> None:
    """End to end with quality_features on generated pixels, not hand-set numbers."""
    arr = scene(seed)
    noise = np.random.default_rng(seed + 100).normal(0, 12, arr.shape)
    buf = io.BytesIO()
    u8(arr).save(buf, "JPEG", quality=8)
    shots = {
        "original": u8(arr),
        "defocus": u8(arr).filter(ImageFilter.GaussianBlur(2.0)),
        "noisy": u8(arr + noise),
        "overexposed": u8(arr * 1.6),
        "underexposed": u8(arr * 0.5),
        "jpeg": Image.open(buf).convert("RGB"),
    }
    df = pd.DataFrame(quality_features(list(shots.values())), columns=list(FEATURE_NAMES))
    df["image_uri"], df["group"], df["duplicate_of"] = list(shots), 0, -1
    assert df.image_uri[int(np.argmax(zero_shot_scores(df)))] == "original"
    # Not a trivial win: sharpness alone prefers a degraded frame (noise or overexposure).
    assert df.image_uri[int(np.argmax(df["sharpness"]))] in {"noisy", "overexposed"}


@pytest.mark.parametrize(
    ("feature", "constant"),
    [("sharpness", 1.7), ("noise", 0.004), ("clip_bright", 0.05), ("blockiness", 0.3)],
)
def test_zero_shot_ignores_a_constant_added_to_a_whole_group(feature: str, constant: float) -> None:
    df = library(3)
    shifted = df.copy()
    in_group = shifted["group"] == 4
    assert in_group.sum() >= 2
    shifted.loc[in_group, feature] += constant
    # Every row, other groups included: the pooled spread must not move either.
    np.testing.assert_allclose(zero_shot_scores(shifted), zero_shot_scores(df), atol=1e-9)


def test_zero_shot_scores_change_when_one_shot_changes() -> None:
    # The counterpart of the invariance test: the scores are not constant in the features.
    df = frame(*(shot(f"{k}.jpg", 0, sharpness=7.0 + 0.1 * k) for k in range(4)))
    worse = df.copy()
    worse.loc[2, "sharpness"] = 3.0
    assert zero_shot_scores(worse)[2] < zero_shot_scores(df)[2] - 5


# --------------------------------------------------------------------------- ranking


def test_rank_in_groups_prob_sums_to_one_over_non_duplicates() -> None:
    df = library(1)
    ranked = rank_in_groups(df, zero_shot_scores(df))
    dup = ranked["duplicate_of"] >= 0
    sums = ranked[~dup].groupby("group")["prob"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=0, atol=1e-12)
    assert (ranked.loc[dup, "prob"] == 0).all()
    assert ranked.loc[ranked["group"] == 99, "prob"].sum() == 0  # all duplicates
    for _, g in ranked.groupby("group"):
        assert sorted(g["rank"]) == list(range(1, len(g) + 1))
        # Duplicates rank after every non-duplicate of their group.
        if (g["duplicate_of"] >= 0).any() and (g["duplicate_of"] < 0).any():
            assert (
                g.loc[g["duplicate_of"] >= 0, "rank"].min()
                > g.loc[g["duplicate_of"] < 0, "rank"].max()
            )
    assert ranked.index.equals(df.index)
    assert list(ranked.columns[: len(df.columns)]) == list(df.columns)


def test_rank_in_groups_orders_by_score_and_breaks_ties_by_uri() -> None:
    df = frame(shot("c.jpg", 0), shot("a.jpg", 0), shot("b.jpg", 0), shot("z.jpg", 1))
    ranked = rank_in_groups(df, np.array([1.0, 1.0, 2.0, -5.0]))
    assert ranked["rank"].tolist() == [3, 2, 1, 1]
    assert ranked["rank"].dtype == np.int64
    np.testing.assert_allclose(ranked["prob"].iloc[:3].sum(), 1.0)
    assert ranked["prob"].iloc[3] == 1.0
    e = np.exp([1.0, 1.0, 2.0])
    np.testing.assert_allclose(ranked["prob"].iloc[:3], e / e.sum())


def test_rank_in_groups_is_stable_for_huge_logits() -> None:
    df = frame(shot("a.jpg", 0), shot("b.jpg", 0))
    ranked = rank_in_groups(df, np.array([1e6, 1e6 - 1]))
    np.testing.assert_allclose(ranked["prob"], [1 / (1 + np.e**-1), 1 / (1 + np.e)])


@pytest.mark.parametrize(
    ("scores", "match"),
    [(np.array([1.0]), "length"), (np.array([1.0, np.nan]), "non-finite")],
)
def test_rank_in_groups_refuses_bad_scores(scores: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        rank_in_groups(frame(shot("a.jpg", 0), shot("b.jpg", 0)), scores)


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("seed", range(5))
def test_every_group_has_one_keeper_and_every_row_a_reason(seed: int) -> None:
    out = pick(library(seed))
    assert set(out["decision"]) <= {"keep", "alternate", "reject"}
    for gid, g in out.groupby("group"):
        n_keep = (g["decision"] == "keep").sum()
        non_dup = g[g["duplicate_of"] < 0]
        if non_dup.empty:  # the all-duplicate group keeps none
            assert gid == 99
            assert n_keep == 0
        elif len(non_dup) == 1:  # a single shot: kept, or demoted (never rejected)
            assert non_dup["decision"].iloc[0] in {"keep", "alternate"}
            assert n_keep <= 1
        else:
            assert n_keep == 1
            keeper = g[g["decision"] == "keep"]
            assert keeper["rank"].iloc[0] == non_dup["rank"].min()
    assert all(
        isinstance(r, list) and r and all(isinstance(s, str) for s in r) for r in out["reasons"]
    )
    ranked_rejects = out[(out["decision"] == "reject") & (out["duplicate_of"] < 0)]
    assert all(any(s.startswith("ranked ") for s in r) for r in ranked_rejects["reasons"])


@pytest.mark.parametrize(
    ("kind", "cosine", "reason"),
    [
        ("exact", None, "exact duplicate of first.jpg"),
        ("near", 0.9712, "near duplicate of first.jpg (cosine 0.97)"),
        ("near", None, "near duplicate of first.jpg"),
        ("near", float("nan"), "near duplicate of first.jpg"),
    ],
)
def test_duplicates_are_rejected_naming_the_kept_copy(
    kind: str, cosine: float | None, reason: str
) -> None:
    df = frame(shot("first.jpg", 0), shot("second.jpg", 0), shot("copy.jpg", 1, sharpness=9.0))
    df.loc[2, ["duplicate_of", "duplicate_kind"]] = [0, kind]
    if cosine is not None:
        df[SIMILARITY_COLUMN] = [np.nan, np.nan, cosine]
    out = by_name(pick(df))
    assert out["copy.jpg"]["decision"] == "reject"
    assert out["copy.jpg"]["reasons"] == [reason]
    assert out["copy.jpg"]["rating"] == -1
    assert out["copy.jpg"]["label"] == "Red"


def test_a_duplicate_chain_names_the_copy_in_competition_and_collisions_get_a_folder() -> None:
    df = frame(
        shot("card1/DSC_0001.JPG", 0),
        shot("card2/DSC_0001.JPG", 1, duplicate_of=0, duplicate_kind="exact"),
        shot("card3/x.JPG", 2, duplicate_of=1, duplicate_kind="exact"),
        shot("card3/other.JPG", 2),
    )
    out = pick(df)
    assert out["reasons"].iloc[1] == ["exact duplicate of card1/DSC_0001.JPG"]
    assert out["reasons"].iloc[2] == ["exact duplicate of card1/DSC_0001.JPG"]
    assert out["decision"].tolist() == ["keep", "reject", "reject", "keep"]
    assert out["reasons"].iloc[3] == ["single shot"]


def test_display_names() -> None:
    assert display_names(["s3://b/a/x.jpg", "/p/y.jpg", "/q/x.jpg", "z.jpg"]) == [
        "a/x.jpg",
        "y.jpg",
        "q/x.jpg",
        "z.jpg",
    ]


def test_an_all_duplicate_group_keeps_none() -> None:
    df = frame(
        shot("a.jpg", 0),
        shot("b.jpg", 0),
        shot("a2.jpg", 1, duplicate_of=0, duplicate_kind="exact"),
        shot("b2.jpg", 1, duplicate_of=1, duplicate_kind="near"),
    )
    out = pick(df)
    assert out["decision"].tolist()[2:] == ["reject", "reject"]
    assert out["reasons"].tolist()[2:] == [
        ["exact duplicate of a.jpg"],
        ["near duplicate of b.jpg"],
    ]


def test_a_blurred_shot_among_sharp_ones_is_rejected_for_sharpness() -> None:
    sharp = [7.0, 7.1, 7.2, 7.15, 7.05]
    df = frame(
        *(shot(f"s{k}.jpg", 0, sharpness=v) for k, v in enumerate(sharp)),
        shot("blur.jpg", 0, sharpness=4.0),
    )
    out = by_name(pick(df))
    # median 7.075, MAD 0.075 -> sigma 1.4826 * 0.075 = 0.1112 (above the 0.1 floor);
    # (7.075 - 4.0) / 0.1112 = 27.65.
    assert out["blur.jpg"]["decision"] == "reject"
    assert out["blur.jpg"]["reasons"][0] == "sharpness 27.7 sigma below its group"
    assert re.fullmatch(
        r"ranked 6 of 6 \(p 0\.00 vs keeper 0\.\d\d\)", out["blur.jpg"]["reasons"][-1]
    )
    assert out["s2.jpg"]["decision"] == "keep"
    assert out["s2.jpg"]["reasons"][0].startswith("best of 6: sharpest of its group, p ")


def test_small_groups_measure_sigma_against_the_corpus_wide_spread() -> None:
    pair = [shot("sharp.jpg", 0, sharpness=7.5), shot("blur.jpg", 0, sharpness=5.5)]
    # Alone, a pair's own spread is its one difference: never more than 0.67 sigma apart.
    alone = by_name(pick(frame(*pair)))
    assert not any("sigma" in r for r in alone["blur.jpg"]["reasons"])
    # Single shots say nothing about spread within a group: they must not shrink it to 0.
    singles = [shot(f"single{g}.jpg", g, sharpness=6.0) for g in range(1, 41)]
    with_singles = by_name(pick(frame(*pair, *singles)))
    assert not any("sigma" in r for r in with_singles["blur.jpg"]["reasons"])
    # Among many pairs that differ by 0.2, the same pair is 1 / (1.4826 * 0.1) = 6.7 sigma off.
    others = [
        shot(f"p{g}_{k}.jpg", g, sharpness=6.0 + 0.2 * k) for g in range(1, 30) for k in range(2)
    ]
    among = by_name(pick(frame(*pair, *others)))
    assert "sharpness 6.7 sigma below its group" in among["blur.jpg"]["reasons"]


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"clip_bright": 0.14}, "highlights clipped 14 %"),
        ({"clip_dark": 0.22}, "shadows clipped 22 %"),
        ({"blockiness": 1.8}, "JPEG blocking (blockiness 1.8)"),
        ({"noise": 0.012}, "noisier than its group (noise 5.4 sigma above)"),
        ({"brightness": 0.30}, "darker than its group (brightness 4.7 sigma below)"),
        ({"brightness": 0.60}, "brighter than its group (brightness 4.7 sigma above)"),
    ],
)
def test_quality_reasons_in_words_and_numbers(over: dict[str, float], reason: str) -> None:
    # Four clean shots whose features differ a little, and one flawed shot of the same sharpness.
    # The flawed shot counts in its group's median and MAD. noise: median 0.004, MAD 0.001 ->
    # sigma 0.00148 (above the 0.001 floor), 0.008 / 0.00148 = 5.40; brightness: median 0.44
    # (0.46 when brighter), MAD 0.02 -> sigma 0.0297, 0.14 / 0.0297 = 4.72.
    clean = [
        shot("a.jpg", 0, sharpness=7.3, noise=0.002, brightness=0.43),
        shot("b.jpg", 0, sharpness=7.2, noise=0.003, brightness=0.44),
        shot("c.jpg", 0, sharpness=7.1, noise=0.004, brightness=0.46),
        shot("d.jpg", 0, sharpness=7.0, noise=0.005, brightness=0.47),
    ]
    out = by_name(pick(frame(*clean, shot("flawed.jpg", 0, sharpness=7.0, **over))))
    assert out["flawed.jpg"]["decision"] == "reject"
    assert reason in out["flawed.jpg"]["reasons"]
    assert out["flawed.jpg"]["reasons"][-1].startswith("ranked ")


def test_clipping_below_the_configured_threshold_is_no_reason() -> None:
    df = frame(shot("a.jpg", 0, sharpness=8.0), shot("b.jpg", 0, clip_bright=0.099))
    assert not any("clipped" in r for r in by_name(pick(df))["b.jpg"]["reasons"])
    df.loc[1, "clip_bright"] = 0.14
    assert "highlights clipped 14 %" in by_name(pick(df))["b.jpg"]["reasons"]
    config = PickConfig(clip_bright_reject=0.15)
    assert not any("clipped" in r for r in by_name(pick(df, config))["b.jpg"]["reasons"])


def test_reject_sigma_sets_when_a_deviation_becomes_a_reason() -> None:
    df = frame(*(shot(f"{k}.jpg", 0, sharpness=7.0 + 0.05 * k) for k in range(5)))
    df.loc[0, "sharpness"] = 6.5  # median 7.1, MAD 0.05, sigma 0.1 (floor): 6.0 sigma below
    assert "sharpness 6.0 sigma below its group" in pick(df)["reasons"].iloc[0]
    assert not any("sigma" in r for r in pick(df, PickConfig(reject_sigma=6.5))["reasons"].iloc[0])


def test_alternates_are_bounded_ordered_and_close_to_the_keeper() -> None:
    # Six shots within 0.05 sigma-ish of each other, then one far behind.
    df = frame(
        *(shot(f"{k}.jpg", 0, sharpness=7.0 - 0.01 * k) for k in range(6)),
        shot("far.jpg", 0, sharpness=5.0),
    )
    out = pick(df, PickConfig(alternates=2))
    assert out["decision"].tolist() == ["keep", "alternate", "alternate", *["reject"] * 4]
    assert out["rank"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert out["reasons"].iloc[1][0].startswith("close to the keeper: ranked 2 of 7 (p ")
    assert "as close as the alternates, but 2 are enough" in out["reasons"].iloc[3]
    assert "as close as the alternates, but 2 are enough" not in out["reasons"].iloc[6]
    assert (pick(df, PickConfig(alternates=0))["decision"] == "alternate").sum() == 0
    assert (pick(df, PickConfig(alternates=10))["decision"] == "alternate").sum() == 5


def test_alternates_need_a_prob_close_to_the_keepers() -> None:
    df = frame(shot("a.jpg", 0), shot("b.jpg", 0))
    ranked = rank_in_groups(df, np.array([0.0, -np.log(2.5)]))  # prob ratio 0.4
    assert decide(ranked, PickConfig(alternate_min_prob_ratio=0.41))["decision"].tolist() == [
        "keep",
        "reject",
    ]
    assert decide(ranked, PickConfig(alternate_min_prob_ratio=0.39))["decision"].tolist() == [
        "keep",
        "alternate",
    ]


def test_a_flawed_close_shot_is_skipped_and_the_next_clean_one_is_the_alternate() -> None:
    df = frame(shot("a.jpg", 0), shot("b.jpg", 0), shot("c.jpg", 0))
    df.loc[1, "clip_bright"] = 0.3
    ranked = rank_in_groups(df, np.array([0.0, -0.1, -0.2]))  # b ranks 2nd, but is clipped
    out = decide(ranked, PickConfig(alternates=1))
    assert out["decision"].tolist() == ["keep", "reject", "alternate"]
    assert out["reasons"].iloc[1][0] == "highlights clipped 30 %"
    # A flaw the keeper shares does not bar an alternate.
    df.loc[0, "clip_bright"] = 0.3
    out = decide(rank_in_groups(df, np.array([0.0, -0.1, -0.2])), PickConfig(alternates=1))
    assert out["decision"].tolist() == ["keep", "alternate", "reject"]
    assert out["reasons"].iloc[0][1:] == ["highlights clipped 30 %"]


@pytest.mark.parametrize(
    ("over", "decision", "reasons"),
    [
        ({}, "keep", ["single shot"]),
        (
            {"clip_bright": 0.34},
            "alternate",
            [
                "single shot: demoted to alternate, never rejected as the only copy",
                "highlights clipped 34 %",
            ],
        ),
        (
            {"clip_dark": 0.5, "blockiness": 3.0},
            "alternate",
            [
                "single shot: demoted to alternate, never rejected as the only copy",
                "shadows clipped 50 %",
                "JPEG blocking (blockiness 3.0)",
            ],
        ),
    ],
)
def test_a_single_shot_is_never_rejected(
    over: dict[str, float], decision: str, reasons: list[str]
) -> None:
    out = pick(frame(shot("only.jpg", 0, **over), shot("x.jpg", 1), shot("y.jpg", 1)))
    assert out["decision"].iloc[0] == decision
    assert out["reasons"].iloc[0] == reasons


def test_ratings_and_labels_follow_the_config() -> None:
    df = frame(
        shot("a.jpg", 0, sharpness=8),
        shot("b.jpg", 0, sharpness=7.9),
        shot("c.jpg", 0, sharpness=2),
    )
    config = PickConfig(
        ratings={"keep": 5, "alternate": 1, "reject": 0},
        labels={"keep": "Purple", "alternate": None},
    )
    out = pick(df, config)
    assert out["decision"].tolist() == ["keep", "alternate", "reject"]
    assert out["rating"].tolist() == [5, 1, 0]
    assert out["label"].tolist() == ["Purple", None, "Red"]  # reject keeps its default
    default = pick(df)
    assert default["rating"].tolist() == [3, 2, -1]
    assert default["label"].tolist() == ["Green", "Yellow", "Red"]
    assert default["rating"].dtype == np.int64


def test_partial_ratings_keep_the_other_defaults() -> None:
    assert PickConfig(ratings={"keep": 4}).ratings == {"keep": 4, "alternate": 2, "reject": -1}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratings": {"keep": 6}}, r"ratings\.keep"),
        ({"ratings": {"reject": -2}}, r"ratings\.reject"),
        ({"ratings": {"maybe": 1}}, r"ratings\.maybe"),
        ({"ratings": {"keep": 1, "reject": 2, "alternate": 1}}, "keep >= alternate >= reject"),
        ({"labels": {"keep": "Gren"}}, "Lightroom"),
        ({"labels": {"maybe": "Red"}}, r"labels\.maybe"),
        ({"alternates": -1}, "alternates"),
        ({"alternate_min_prob_ratio": 0}, "alternate_min_prob_ratio"),
        ({"reject_sigma": float("nan")}, "reject_sigma"),
        ({"clip_bright_reject": 1.5}, "clip_bright_reject"),
        ({"blockiness_reject": 1.0}, "blockiness_reject"),
        ({"alternate": 2}, "alternate"),  # extra="forbid": a typo is an error
    ],
)
def test_config_refuses_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PickConfig(**kwargs)


def test_decide_is_independent_of_row_order() -> None:
    df = library(2)
    expected = pick(df).set_index("image_uri")
    rng = np.random.default_rng(7)
    for _ in range(3):
        perm = rng.permutation(len(df))
        new_pos = np.argsort(perm)  # old position -> new position
        shuffled = df.iloc[perm].reset_index(drop=True)
        old = shuffled["duplicate_of"].to_numpy()
        shuffled["duplicate_of"] = np.where(old >= 0, new_pos[np.maximum(old, 0)], -1)
        got = pick(shuffled).set_index("image_uri").loc[expected.index]
        for col in ("decision", "reasons", "rating", "label", "rank"):
            assert got[col].tolist() == expected[col].tolist(), col
        np.testing.assert_allclose(got["prob"], expected["prob"], atol=1e-12)


def test_decide_keeps_index_and_row_order() -> None:
    df = library(0)
    df.index = pd.RangeIndex(100, 100 + len(df))
    out = pick(df)
    assert out.index.equals(df.index)
    assert out["image_uri"].tolist() == df["image_uri"].tolist()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.drop(columns=["sharpness"]), r"lacks columns \['sharpness'\]"),
        (lambda d: d.assign(noise=[0.01, np.nan, 0.01]), "non-finite 'noise'"),
        (lambda d: d.assign(duplicate_of=[-1, 5, -1]), "duplicate_of"),
        (lambda d: d.assign(duplicate_of=[-1, 1, -1]), "duplicate_of"),
        (lambda d: d.assign(duplicate_of=[-1, 0.5, -1]), "duplicate_of"),
        (lambda d: d.assign(duplicate_of=[-1, "a", -1]), "duplicate_of"),
        (lambda d: d.assign(duplicate_of=[1, 2, 0]), "cycle"),
        (lambda d: d.assign(group=[0, None, 1]), "missing 'group'"),
    ],
)
def test_bad_frames_are_refused(change: Any, match: str) -> None:
    df = change(frame(shot("a.jpg", 0), shot("b.jpg", 0), shot("c.jpg", 1)))
    with pytest.raises(DataError, match=match):
        zero_shot_scores(df)


def test_decide_needs_a_ranked_frame() -> None:
    with pytest.raises(DataError, match=r"\['prob', 'rank'\]"):
        decide(frame(shot("a.jpg", 0)), PickConfig())


def test_empty_frame() -> None:
    df = frame(shot("a.jpg", 0)).iloc[:0]
    out = decide(rank_in_groups(df, zero_shot_scores(df)), PickConfig())
    assert len(out) == 0
    assert {"decision", "reasons", "rating", "label"} <= set(out.columns)
