"""The selection cascade: accounting, stage order, calibration, the VLM budget and its failures."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from keeper_core.cascade import (
    NEUTRAL_PROMPT,
    STAGES,
    CascadeConfig,
    CascadeLimits,
    CascadeResult,
    CascadeStageError,
    VlmScores,
    check_limits,
    run_cascade,
)
from keeper_core.errors import DataError, KeeperError

STAGE_REASONS = {
    "clip": {"below_relevance", "beyond_clip_keep"},
    "heuristics": {"too_small", "aspect_ratio"},
    "rerank": {"beyond_top_n"},
    "top_k": {"beyond_top_k"},
}


def normed(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def corpus(
    n: int, seed: int, dim: int = 16, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n images in ~n/3 clusters (so dedup has work), 2 positive prompts and 1 negative."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 3, 1), dim))
    img = centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, dim))
    return normed(img), normed(rng.normal(size=(2, dim))), normed(rng.normal(size=(1, dim)))


def by_hand_clip(img: np.ndarray, pos: np.ndarray, neg: np.ndarray, scale: float) -> np.ndarray:
    """CLIP's two-way zero-shot softmax over the best positive and best negative prompt."""
    cp = (img.astype(np.float64) @ pos.T.astype(np.float64)).max(axis=1)
    cn = (img.astype(np.float64) @ neg.T.astype(np.float64)).max(axis=1)
    return np.array(
        [
            math.exp(scale * p) / (math.exp(scale * p) + math.exp(scale * q))
            for p, q in zip(cp, cn, strict=True)
        ]
    )


def ranked(idx: list[int], score: np.ndarray) -> list[int]:
    return sorted(idx, key=lambda i: (-score[i], i))


class Recorder:
    """A VLM judge that records what it was asked and answers from a fixed table."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.calls: list[list[int]] = []

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        assert idx.dtype == np.int64
        self.calls.append(idx.tolist())
        return self.table[idx]


def assert_accounting(res: CascadeResult, n: int) -> None:
    st = res.stages
    assert [s.name for s in st] == list(STAGES)
    assert st[0].n_in == n
    for prev, s in zip([None, *st], st, strict=False):
        assert s.n_in == s.n_kept + s.n_dropped
        if prev is not None:
            assert s.n_in == prev.n_kept
        if s.skipped:
            assert s.n_dropped == 0
        assert sum(d == s.name for d in res.candidates.dropped_at) == s.n_dropped
    c = res.candidates
    picks = [i for i in range(n) if c.reason[i] is None]
    assert sorted(res.picks) == picks
    assert [i for i in range(n) if c.dropped_at[i] is None] == picks
    assert len(res.picks) == st[-1].n_kept
    assert res.picks == ranked(res.picks, c.final)
    for i in range(n):
        where, why = c.dropped_at[i], c.reason[i]
        if where in STAGE_REASONS:
            assert why in STAGE_REASONS[where]
        elif where == "dedup":
            assert why is not None
            assert why.startswith("near_duplicate_of:")
        # A score exists exactly for the stages a candidate reached.
        reached = STAGES.index(where) if where else len(STAGES)
        assert np.isnan(c.rerank[i]) == (reached < STAGES.index("rerank"))
        assert np.isnan(c.final[i]) == (reached < STAGES.index("top_k"))


def reference(
    res: CascadeResult,
    img: np.ndarray,
    cfg: CascadeConfig,
    w: np.ndarray,
    h: np.ndarray,
    head: np.ndarray | None,
    vlm: np.ndarray | None,
) -> list[int]:
    """The cascade written out plainly (full similarity matrix, Python sorts) for small N."""
    clip = res.candidates.clip  # checked against by_hand_clip separately
    n = len(clip)
    alive = [i for i in ranked(list(range(n)), clip) if clip[i] >= cfg.min_relevance]
    alive = alive[: cfg.clip_keep]
    if cfg.min_side or cfg.min_aspect or cfg.max_aspect:
        alive = [
            i
            for i in alive
            if min(w[i], h[i]) >= cfg.min_side
            and (cfg.min_aspect is None or w[i] / h[i] >= cfg.min_aspect)
            and (cfg.max_aspect is None or w[i] / h[i] <= cfg.max_aspect)
        ]
    hs = head if head is not None else np.zeros(n)
    rer = cfg.alpha * clip + cfg.gamma * hs
    if cfg.dedup_threshold is not None:
        # Groups found in the rerank order until top_n leaders; each keeps its best member by
        # the head (else S_clip); the candidates after the last leader are left to stage 4.
        sims = img @ img.T
        groups: dict[int, list[int]] = {}
        walked = 0
        for i in ranked(alive, rer):
            if len(groups) >= cfg.top_n:
                break
            walked += 1
            leaders = list(groups)
            if leaders and sims[i, leaders].max() >= cfg.dedup_threshold - 1e-6:
                groups[leaders[int(np.argmax(sims[i, leaders]))]].append(i)
            else:
                groups[i] = [i]
        key = head if head is not None else clip
        kept = [ranked(members, key)[0] for members in groups.values()]
        alive = kept + ranked(alive, rer)[walked:]
    top = ranked(alive, rer)[: cfg.top_n]
    final = rer if vlm is None or cfg.beta == 0 else rer + cfg.beta * vlm
    return ranked(top, final)[: cfg.top_k]


def random_case(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 50))
    img, pos, neg = corpus(n, seed)
    use_head = bool(rng.random() < 0.5)
    cfg = CascadeConfig(
        min_relevance=float(rng.choice([0.0, rng.uniform(0, 0.6)])),
        clip_keep=None if rng.random() < 0.5 else int(rng.integers(1, 40)),
        min_side=int(rng.choice([0, 200])),
        min_aspect=None if rng.random() < 0.6 else 0.6,
        max_aspect=None if rng.random() < 0.6 else 1.6,
        dedup_threshold=None if rng.random() < 0.3 else float(rng.uniform(0.9, 0.999)),
        top_n=int(rng.integers(1, 15)),
        top_k=int(rng.integers(1, 20)),
        alpha=float(rng.uniform(0.1, 1)),
        beta=float(rng.choice([0.0, rng.uniform(0, 1)])),
        gamma=float(rng.uniform(0, 1)) if use_head else 0.0,
        logit_scale=float(rng.uniform(5, 100)),
    )
    return {
        "img": img,
        "pos": pos,
        "neg": neg,
        "cfg": cfg,
        "w": rng.integers(100, 400, n).astype(float),
        "h": rng.integers(100, 400, n).astype(float),
        "head": rng.uniform(0, 1, n) if use_head else None,
        "vlm": None if rng.random() < 0.3 else rng.uniform(0, 1, n),
    }


@pytest.mark.parametrize("seed", range(40))
def test_every_stage_accounts_for_every_candidate_and_matches_the_plain_reference(
    seed: int,
) -> None:
    case = random_case(seed)
    img, cfg, vlm = case["img"], case["cfg"], case["vlm"]
    judge = None if vlm is None else Recorder(vlm)
    res = run_cascade(
        img,
        case["pos"],
        case["neg"],
        config=cfg,
        widths=case["w"],
        heights=case["h"],
        head_scores=case["head"],
        vlm=judge,
    )
    n = len(img)
    assert_accounting(res, n)
    np.testing.assert_allclose(
        res.candidates.clip, by_hand_clip(img, case["pos"], case["neg"], cfg.logit_scale), atol=1e-5
    )
    assert res.picks == reference(res, img, cfg, case["w"], case["h"], case["head"], vlm)
    vlm_stage = res.stages[STAGES.index("vlm")]
    if judge is None or cfg.beta == 0:
        assert vlm_stage.skipped
        assert res.vlm_calls == 0
        assert judge is None or judge.calls == []
    else:
        assert not vlm_stage.skipped
        assert res.vlm_calls == vlm_stage.n_in
        assert judge.calls == ([] if vlm_stage.n_in == 0 else [judge.calls[0]])
        judged = sorted(np.flatnonzero(~np.isnan(res.candidates.vlm)).tolist())
        assert sorted(i for call in judge.calls for i in call) == judged
    json.dumps(res.as_dict(), allow_nan=False)


def test_vlm_receives_exactly_the_top_n_by_the_rerank_score_in_one_call() -> None:
    img, pos, neg = corpus(40, seed=1, noise=1.0)
    rng = np.random.default_rng(1)
    head = rng.uniform(0, 1, 40)
    judge = Recorder(rng.uniform(0, 1, 40))
    cfg = CascadeConfig(top_n=6, top_k=3, alpha=0.7, gamma=0.3, dedup_threshold=None)
    res = run_cascade(img, pos, neg, config=cfg, head_scores=head, vlm=judge)
    rer = 0.7 * by_hand_clip(img, pos, neg, 100.0) + 0.3 * head
    expected = ranked(list(range(40)), rer)[:6]
    assert judge.calls == [expected]
    assert res.vlm_calls == 6
    assert sorted(i for i in range(40) if res.candidates.reason[i] == "beyond_top_n") == sorted(
        set(range(40)) - set(expected)
    )


def test_near_duplicates_collapse_to_the_member_best_by_the_head_score() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=(8, 64))
    base[[2, 5, 7]] = base[2] + 0.01 * rng.normal(size=(3, 64))  # one shot, three copies
    img = normed(base)
    pos, neg = normed(base[[2]] + rng.normal(size=(1, 64))), normed(rng.normal(size=(1, 64)))
    head = np.array([0.5, 0.5, 0.2, 0.5, 0.5, 0.9, 0.5, 0.4])
    cfg = CascadeConfig(dedup_threshold=0.99, top_n=8, top_k=8, beta=0.0)
    res = run_cascade(img, pos, neg, config=cfg, head_scores=head)
    assert 5 in res.picks
    assert 2 not in res.picks
    assert 7 not in res.picks
    assert res.candidates.reason[2] == res.candidates.reason[7] == "near_duplicate_of:5"
    assert res.stages[STAGES.index("dedup")].n_dropped == 2
    assert len(res.picks) == 6

    # Without a head, the calibrated CLIP score picks the member.
    res = run_cascade(img, pos, neg, config=cfg)
    clip = by_hand_clip(img, pos, neg, 100.0)
    best = max([2, 5, 7], key=lambda i: (clip[i], -i))
    assert best in res.picks
    assert {res.candidates.reason[i] for i in {2, 5, 7} - {best}} == {f"near_duplicate_of:{best}"}


@pytest.mark.parametrize("scale", [100.0, 30.0, 1e4])
def test_calibration_is_clips_two_way_softmax_and_monotone(scale: float) -> None:
    img, pos, neg = corpus(50, seed=3, noise=1.0)
    neg = np.concatenate([neg, normed(np.random.default_rng(3).normal(size=(2, 16)))])
    res = run_cascade(img, pos, neg, config=CascadeConfig(logit_scale=scale, top_n=50))
    clip, raw = res.candidates.clip, res.candidates.clip_raw
    if scale < 1e3:  # the hand formula overflows math.exp at 1e4
        np.testing.assert_allclose(clip, by_hand_clip(img, pos, neg, scale), atol=1e-5)
    assert np.all((clip >= 0) & (clip <= 1))
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(clip[order]) >= 0)
    assert np.all((clip > 0.5) == (raw > 0))  # 0.5 = "as close to the query as to the anchor"


def test_beta_zero_or_no_judge_skips_the_vlm_and_the_final_is_the_rerank_score() -> None:
    img, pos, neg = corpus(20, seed=4, noise=1.0)

    def never(idx: np.ndarray) -> np.ndarray:
        raise AssertionError("the VLM must not be called")

    for cfg, judge in [(CascadeConfig(beta=0.0, top_n=8), never), (CascadeConfig(top_n=8), None)]:
        res = run_cascade(img, pos, neg, config=cfg, vlm=judge)
        vlm_stage = res.stages[STAGES.index("vlm")]
        assert vlm_stage.skipped
        assert vlm_stage.n_in == vlm_stage.n_kept == 8
        assert res.vlm_calls == 0
        assert np.isnan(res.candidates.vlm).all()
        reached = ~np.isnan(res.candidates.final)
        assert reached.sum() == 8
        np.testing.assert_array_equal(res.candidates.final[reached], res.candidates.rerank[reached])
        rer = res.candidates.rerank
        assert (
            res.picks
            == ranked(np.flatnonzero(~np.isnan(rer)).tolist(), rer)[: min(cfg.top_k, cfg.top_n)]
        )


def test_the_vlm_can_lift_the_last_of_the_top_n_to_first() -> None:
    img, pos, neg = corpus(12, seed=5, noise=1.0)
    cfg = CascadeConfig(top_n=5, top_k=3, dedup_threshold=None, logit_scale=10.0)
    plain = run_cascade(img, pos, neg, config=cfg)
    top5 = ranked(list(range(12)), plain.candidates.rerank)[:5]
    last = top5[-1]
    assert plain.picks[0] != last
    table = np.zeros(12)
    table[last] = 1.0
    res = run_cascade(img, pos, neg, config=cfg, vlm=Recorder(table))
    assert res.picks[0] == last
    assert res.candidates.vlm[last] == 1.0
    assert res.candidates.final[last] == pytest.approx(0.5 * res.candidates.clip[last] + 0.5)


def test_candidates_the_judge_could_not_judge_leave_at_the_vlm_stage_with_the_reason() -> None:
    img, pos, neg = corpus(20, seed=8, noise=1.0)
    cfg = CascadeConfig(top_n=6, top_k=6, dedup_threshold=None, logit_scale=10.0)
    asked: list[int] = []

    def judge(idx: np.ndarray) -> VlmScores:
        asked.extend(idx.tolist())
        scores = np.linspace(1.0, 0.5, len(idx))
        scores[1] = np.nan  # a failed candidate's score is never read
        return VlmScores(scores, {int(idx[1]): "image unreadable: truncated"})

    res = run_cascade(img, pos, neg, config=cfg, vlm=judge)
    bad = asked[1]
    assert res.candidates.dropped_at[bad] == "vlm"
    assert res.candidates.reason[bad] == "vlm_failed: image unreadable: truncated"
    assert bad not in res.picks
    assert len(res.picks) == 5
    vlm = res.stages[STAGES.index("vlm")]
    assert (vlm.n_in, vlm.n_kept, vlm.n_dropped) == (6, 5, 1)
    assert res.stages[STAGES.index("top_k")].n_in == 5
    assert res.vlm_calls == 5  # the candidate it could not judge is not a call
    assert math.isnan(res.candidates.vlm[bad])
    assert math.isnan(res.candidates.final[bad])

    def stray(idx: np.ndarray) -> VlmScores:
        return VlmScores(np.ones(len(idx)), {999: "never asked"})

    with pytest.raises(CascadeStageError, match="not asked"):
        run_cascade(img, pos, neg, config=cfg, vlm=stray)


def test_stage_one_and_heuristics_name_their_reasons() -> None:
    img, pos, neg = corpus(30, seed=6, noise=1.0)
    clip = by_hand_clip(img, pos, neg, 10.0)
    cut = float(np.sort(clip)[10])  # 10 below, 20 at or above
    cfg = CascadeConfig(
        min_relevance=cut, clip_keep=15, logit_scale=10.0, min_side=150, max_aspect=2.0, top_n=30
    )
    w = np.full(30, 400.0)
    h = np.full(30, 300.0)
    survivors = ranked([i for i in range(30) if clip[i] >= cut], clip)[:15]
    w[survivors[0]], h[survivors[1]] = 100.0, 180.0  # too small; 400/180 too wide
    res = run_cascade(img, pos, neg, config=cfg, widths=w, heights=h)
    reasons = res.candidates.reason
    assert sum(r == "below_relevance" for r in reasons) == 10
    assert sum(r == "beyond_clip_keep" for r in reasons) == 5
    assert reasons[survivors[0]] == "too_small"
    assert reasons[survivors[1]] == "aspect_ratio"
    assert res.stages[1].n_in == 15
    assert res.stages[1].n_dropped == 2
    with pytest.raises(DataError, match="widths and heights are required"):
        run_cascade(img, pos, neg, config=cfg)


def test_ties_break_to_the_lower_index_and_runs_are_deterministic() -> None:
    same = normed(np.tile(np.random.default_rng(7).normal(size=(1, 16)), (6, 1)))
    pos, neg = normed(np.ones((1, 16))), normed(-np.ones((1, 16)))
    res = run_cascade(same, pos, neg, config=CascadeConfig(dedup_threshold=None, top_k=3))
    assert res.picks == [0, 1, 2]
    res = run_cascade(same, pos, neg, config=CascadeConfig(dedup_threshold=1.0))
    assert res.picks == [0]
    assert res.candidates.reason[1:] == ["near_duplicate_of:0"] * 5

    case = random_case(11)
    runs = [
        run_cascade(
            case["img"].copy(),
            case["pos"],
            case["neg"],
            config=case["cfg"],
            widths=case["w"],
            heights=case["h"],
            head_scores=case["head"],
            vlm=None if case["vlm"] is None else Recorder(case["vlm"]),
        )
        for _ in range(3)
    ]
    for r in runs[1:]:
        assert r.picks == runs[0].picks
        assert r.candidates.reason == runs[0].candidates.reason
        for col in ("clip_raw", "clip", "rerank", "vlm", "final"):
            np.testing.assert_array_equal(
                getattr(r.candidates, col), getattr(runs[0].candidates, col)
            )


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (RuntimeError("CUDA out of memory"), "raised RuntimeError: CUDA out of memory"),
        (lambda k: np.full(k - 1, 0.5), "shape"),
        (lambda k: np.full((k, 1), 0.5), "shape"),
        (lambda k: None, "shape"),
        (lambda k: ["yes"] * k, "non-numbers"),
        (lambda k: np.r_[np.full(k - 1, 0.5), np.nan], "not finite numbers in"),
        (lambda k: np.r_[1.5, np.full(k - 1, 0.5)], r"in \[0, 1\]"),
        (lambda k: np.r_[np.full(k - 1, 0.5), -0.1], r"in \[0, 1\]"),
    ],
)
def test_a_failing_vlm_is_a_stage_error_never_a_ranking(answer: Any, match: str) -> None:
    img, pos, neg = corpus(10, seed=8)

    def judge(idx: np.ndarray) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer(len(idx))

    with pytest.raises(CascadeStageError, match=match) as err:
        run_cascade(img, pos, neg, config=CascadeConfig(top_n=4), vlm=judge)
    assert err.value.stage == "vlm"
    assert isinstance(err.value, KeeperError)
    assert "vlm" in str(err.value)


@pytest.mark.parametrize(
    ("config", "n", "limits", "knob"),
    [
        ({}, 101, {"max_candidates": 100}, "candidates=101 .* max_candidates=100"),
        ({"top_n": 50}, 10, {"max_top_n": 32}, "top_n=50 .* max_top_n=32"),
        ({"top_k": 50}, 10, {"max_top_k": 20}, "top_k=50 .* max_top_k=20"),
        ({"clip_keep": 500}, 10, {"max_clip_keep": 100}, "clip_keep=500 .* max_clip_keep=100"),
        ({}, 1000, {"max_clip_keep": 100}, "clip_keep=None .* max_clip_keep=100"),
    ],
)
def test_limits_name_the_knob_and_the_limit(
    config: dict[str, Any], n: int, limits: dict[str, Any], knob: str
) -> None:
    with pytest.raises(DataError, match=knob):
        check_limits(CascadeConfig(**config), n, CascadeLimits(**limits))


def test_limits_pass_within_bounds_and_without_dedup() -> None:
    limits = CascadeLimits(max_candidates=1000, max_clip_keep=100, max_top_n=20, max_top_k=20)
    check_limits(CascadeConfig(clip_keep=100, top_n=20, top_k=20), 1000, limits)
    check_limits(CascadeConfig(dedup_threshold=None), 1000, limits)  # dedup is what it bounds
    unlimited = CascadeLimits(
        max_candidates=None, max_clip_keep=None, max_top_n=None, max_top_k=None
    )
    check_limits(CascadeConfig(top_n=10_000, top_k=10_000), 10**7, unlimited)


def test_bad_inputs_are_data_errors_that_say_what_is_wrong() -> None:
    img, pos, neg = corpus(10, seed=9)
    cfg = CascadeConfig()
    for negative in (None, neg[:0]):
        with pytest.raises(DataError, match=NEUTRAL_PROMPT):
            run_cascade(img, pos, negative, config=cfg)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"head_scores: 1 value\(s\) outside \[0, 1\]") as err:
        run_cascade(img, pos, neg, config=cfg, head_scores=np.r_[np.zeros(9), 1.2])
    assert err.value.rows == [9]
    with pytest.raises(DataError, match="head_scores: length 9"):
        run_cascade(img, pos, neg, config=cfg, head_scores=np.zeros(9))
    with pytest.raises(DataError, match=r"gamma=0\.2 weighs head_scores"):
        run_cascade(img, pos, neg, config=CascadeConfig(gamma=0.2))
    with pytest.raises(DataError, match="positive_emb: dimension 8"):
        run_cascade(img, normed(np.ones((1, 8))), neg, config=cfg)
    with pytest.raises(DataError, match="float32"):
        run_cascade(img.astype(np.float64), pos, neg, config=cfg)


def test_no_candidates_is_an_empty_result_and_no_vlm_call() -> None:
    _, pos, neg = corpus(3, seed=10)
    judge = Recorder(np.zeros(0))
    res = run_cascade(np.zeros((0, 16), np.float32), pos, neg, config=CascadeConfig(), vlm=judge)
    assert res.picks == []
    assert judge.calls == []
    assert res.vlm_calls == 0
    assert [(s.n_in, s.n_kept, s.n_dropped) for s in res.stages] == [(0, 0, 0)] * len(STAGES)
    assert res.as_dict()["candidates"] == []


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"top_n": 0}, "top_n"),
        ({"min_relevance": 1.5}, "min_relevance"),
        ({"alpha": float("nan")}, "alpha"),
        ({"beta": 1.7e308}, "beta"),  # a weighted sum that overflows: a final score of inf
        ({"gamma": 1e6 + 1}, "gamma"),
        ({"alpha": 0.0, "gamma": 0.0}, "alpha and gamma"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "min_aspect 2.0 > max_aspect 1.0"),
        ({"dedup_threshold": 1.5}, "dedup_threshold"),
        ({"topk": 3}, "topk"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CascadeConfig(**fields)


def test_as_dict_is_json_ready_with_none_for_scores_not_reached() -> None:
    img, pos, neg = corpus(15, seed=12, noise=1.0)
    judge = Recorder(np.linspace(0, 1, 15))
    cfg = CascadeConfig(top_n=4, top_k=2, dedup_threshold=None)
    res = run_cascade(img, pos, neg, config=cfg, vlm=judge)
    d = json.loads(json.dumps(res.as_dict(), allow_nan=False))
    assert d["picks"] == res.picks
    assert d["vlm_calls"] == 4
    assert [s["name"] for s in d["stages"]] == list(STAGES)
    rec = {c["index"]: c for c in d["candidates"]}
    assert len(rec) == 15
    first = rec[res.picks[0]]
    assert first["dropped_at"] is None
    assert first["reason"] is None
    assert first["final"] == pytest.approx(0.5 * first["clip"] + 0.5 * first["vlm"])
    assert first["head"] is None
    out = next(c for c in d["candidates"] if c["reason"] == "beyond_top_n")
    assert out["rerank"] is not None
    assert out["vlm"] is None
    assert out["final"] is None
    small = res.as_dict(dropped=False)
    assert [c["index"] for c in small["candidates"]] == res.picks
