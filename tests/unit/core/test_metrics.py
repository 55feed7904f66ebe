"""Series metrics against hand-computed values, ties, random baselines, validation, table; the
exact intervals the promotion gate uses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from keeper_core.errors import DataError
from keeper_core.metrics import (
    Interval,
    SeriesMetrics,
    best_ranks,
    binomial_interval,
    format_table,
    paired_top1_gain,
    series_metrics,
    series_metrics_from_padded,
    top1_gain_over_chance,
)

# Lengths 2, 3, 4 with the best ranked 1st, 3rd and 2nd.
SCORES = [np.array([0.9, 0.1]), np.array([0.5, 0.2, 0.7]), np.array([0.1, 0.4, 0.3, 0.2])]
BEST = [0, 1, 2]


def test_metrics_by_hand() -> None:
    m = series_metrics(SCORES, BEST)
    assert best_ranks(SCORES, BEST).tolist() == [1, 3, 2]
    assert m.n_series == 3
    assert m.top1 == pytest.approx(1 / 3)
    assert m.top2 == pytest.approx(2 / 3)
    assert m.top3 == pytest.approx(1.0)
    assert m.mean_rank == pytest.approx(2.0)
    assert m.mrr == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_random_baselines_by_hand() -> None:
    m = series_metrics(SCORES, BEST)
    assert m.random_top1 == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert m.random_top2 == pytest.approx((1 + 2 / 3 + 2 / 4) / 3)
    assert m.random_top3 == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert m.random_mean_rank == pytest.approx((1.5 + 2 + 2.5) / 3)
    h2, h3, h4 = 1 + 1 / 2, 1 + 1 / 2 + 1 / 3, 1 + 1 / 2 + 1 / 3 + 1 / 4
    assert m.random_mrr == pytest.approx((h2 / 2 + h3 / 3 + h4 / 4) / 3)


def test_random_baseline_matches_random_scores() -> None:
    # Averaged over many random rankings, the metrics approach the random baselines.
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, size=20_000)
    m = series_metrics([rng.random(n) for n in lengths], [int(rng.integers(n)) for n in lengths])
    assert m.top1 == pytest.approx(m.random_top1, abs=0.01)
    assert m.mrr == pytest.approx(m.random_mrr, abs=0.01)
    assert m.mean_rank == pytest.approx(m.random_mean_rank, abs=0.03)


def test_every_tie_counts_against_the_best() -> None:
    scores = [np.array([1.0, 1.0, 1.0]), np.array([2.0, 1.0, 2.0, 2.0]), np.array([0.0, 5.0, 5.0])]
    # Series 0: best=1 ties with 0 and 2 -> rank 3. Series 1: best=2 ties with 0 (before) and 3
    # (after) -> rank 3. Series 2: best=1 ties with 2 (after) and beats 0 -> rank 2.
    assert best_ranks(scores, [1, 2, 1]).tolist() == [3, 3, 2]
    # A constant scorer ranks the best last wherever it stands: a manifest listing the keeper
    # first gives it no credit.
    assert best_ranks([np.zeros(4)] * 4, [0, 1, 2, 3]).tolist() == [4, 4, 4, 4]
    m = series_metrics([np.zeros(3)] * 5, [0] * 5)
    assert (m.top1, m.top3, m.mean_rank, m.mrr) == (0.0, 1.0, 3.0, pytest.approx(1 / 3))
    # Distinct scores: the position of the best makes no difference.
    assert best_ranks([np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])], [0, 2]).tolist() == [
        1,
        1,
    ]


def test_infinite_scores_are_ranked() -> None:
    assert best_ranks([np.array([-np.inf, 0.0, np.inf])], [1]).tolist() == [2]


@pytest.mark.parametrize(
    ("scores", "best", "match", "rows"),
    [
        ([], [], "no series", []),
        ([np.zeros(2)], [0, 1], "1 score arrays but 2 best", []),
        ([np.zeros(2), np.zeros(3)], [0, 3], r"series 1: best index 3 not an int in \[0, 3\)", [1]),
        ([np.zeros(2)], [-1], "series 0: best index -1", [0]),
        ([np.zeros(2)], [0.5], "series 0: best index 0.5", [0]),
        ([np.zeros(2), np.array([0.0, np.nan])], [0, 0], "series 1: NaN scores", [1]),
        ([np.zeros(0)], [0], "series 0: scores must be a non-empty 1-D", [0]),
        ([np.zeros((2, 2))], [0], "non-empty 1-D", [0]),
    ],
)
def test_validation(scores: list[np.ndarray], best: list[int], match: str, rows: list[int]) -> None:
    with pytest.raises(DataError, match=match) as e:
        series_metrics(scores, best)
    assert e.value.rows == rows


@pytest.mark.parametrize("as_torch", [False, True])
def test_padded_form_matches_the_list_form(as_torch: bool) -> None:
    scores = np.full((3, 4), -np.inf)
    mask = np.zeros((3, 4), dtype=bool)
    for i, s in enumerate(SCORES):
        scores[i, : len(s)] = s
        mask[i, : len(s)] = True
    scores[0, 3] = 99.0  # padding must be ignored whatever it holds
    target = np.array(BEST)
    if not as_torch:
        assert series_metrics_from_padded(scores, mask, target) == series_metrics(SCORES, BEST)
        return
    # bf16 scores that require grad (straight from a head) are accepted as they are.
    t_scores = torch.tensor(scores).to(torch.bfloat16).requires_grad_(True)
    rounded = [torch.tensor(s).to(torch.bfloat16).float().numpy() for s in SCORES]
    got = series_metrics_from_padded(t_scores, torch.tensor(mask), torch.tensor(target))
    assert got == series_metrics(rounded, BEST)


def test_padded_form_handles_holes_in_the_mask() -> None:
    scores = np.array([[0.2, 9.0, 0.5, 0.1]])
    mask = np.array([[True, False, True, True]])
    m = series_metrics_from_padded(scores, mask, np.array([2]))
    assert m.top1 == 1.0
    assert m.random_top1 == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="row 0: target 1 is not a real image"):
        series_metrics_from_padded(scores, mask, np.array([1]))
    with pytest.raises(DataError, match="expected scores"):
        series_metrics_from_padded(scores, mask[0], np.array([1]))


def test_as_dict() -> None:
    d = series_metrics(SCORES, BEST).as_dict()
    assert d["n_series"] == 3
    assert d["mean_rank"] == pytest.approx(2.0)
    assert set(d) >= {"top1", "top2", "top3", "mean_rank", "mrr", "random_top1", "random_mrr"}


def test_format_table() -> None:
    m = series_metrics(SCORES, BEST)
    perfect = series_metrics(SCORES, [int(np.argmax(s)) for s in SCORES])
    table = format_table({"clip+mlp": perfect, "linear": m})
    lines = table.splitlines()
    assert lines[0].split() == [
        "method", "series", "top1", "top2", "top3", "mean_rank", "MRR", "vs", "random", "(pts)",
    ]  # fmt: skip
    assert set(lines[1]) == {"-"}
    assert len(lines[1]) == len(lines[0])
    assert lines[2].split() == [
        "clip+mlp",
        "3",
        "100.0",
        "100.0",
        "100.0",
        "1.00",
        "1.000",
        "+63.9",
    ]
    assert lines[3].split() == ["linear", "3", "33.3", "66.7", "100.0", "2.00", "0.611", "-2.8"]
    assert lines[4].split() == ["random", "3", "36.1", "72.2", "91.7", "2.00", "0.627", "-"]
    assert len(lines) == 5
    assert len({len(line) for line in lines}) == 1  # fixed width


def test_format_table_with_different_series_gives_each_its_random_row() -> None:
    a = series_metrics(SCORES, BEST)
    b = series_metrics(SCORES[:2], BEST[:2])
    lines = format_table({"a": a, "b": b}).splitlines()
    assert [line.split()[:3] for line in lines[4:]] == [
        ["random", "(a)", "3"],
        ["random", "(b)", "2"],
    ]
    with pytest.raises(DataError, match="at least one row"):
        format_table({})


def test_metrics_are_frozen() -> None:
    m = series_metrics(SCORES, BEST)
    assert isinstance(m, SeriesMetrics)
    with pytest.raises(AttributeError):
        m.top1 = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- exact intervals


@pytest.mark.parametrize("n", [1, 2, 7, 24, 300])
def test_binomial_interval_closed_forms(n: int) -> None:
    alpha = 0.025
    # 0 of n: the upper bound solves (1 - p)^n = alpha; n of n: p^n = alpha.
    assert binomial_interval(0, n) == (0.0, pytest.approx(1 - alpha ** (1 / n), abs=1e-12))
    assert binomial_interval(n, n) == (pytest.approx(alpha ** (1 / n), abs=1e-12), 1.0)
    for k in range(0, n + 1, max(1, n // 5)):
        lo, hi = binomial_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
        mirror = binomial_interval(n - k, n)
        assert (lo, hi) == (pytest.approx(1 - mirror[1]), pytest.approx(1 - mirror[0]))


def test_binomial_interval_tails_are_exact() -> None:
    # 3 of 10: each bound leaves exactly 2.5 % of binomial probability beyond the count.
    lo, hi = binomial_interval(3, 10)
    pmf = [lambda p, j=j: math.comb(10, j) * p**j * (1 - p) ** (10 - j) for j in range(11)]
    assert sum(f(lo) for f in pmf[3:]) == pytest.approx(0.025, abs=1e-12)
    assert sum(f(hi) for f in pmf[:4]) == pytest.approx(0.025, abs=1e-12)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        binomial_interval(4, 3)


def test_paired_gain_lower_bound_is_the_exact_sign_test() -> None:
    # Lower bound > 0 exactly when P(Binomial(w + l, 1/2) >= w) < 2.5 %, for every split.
    n = 40
    for wins in range(0, 16):
        for losses in range(0, 16 - wins):
            gain = paired_top1_gain(wins, losses, n)
            d = wins + losses
            p = sum(math.comb(d, j) for j in range(wins, d + 1)) / 2**d if d else 1.0
            assert (gain.low > 1e-12) is (p < 0.025), (wins, losses, gain, p)
            assert gain.estimate == pytest.approx((wins - losses) / n)
            assert gain.low <= gain.estimate <= gain.high


def test_paired_gain_on_24_series_shows_one_series_is_4_points() -> None:
    one = paired_top1_gain(1, 0, 24)
    assert one.pts() == "+4.2 pts (95% CI -4.0 to +4.2)"
    assert paired_top1_gain(0, 0, 24) == Interval(0.0, 0.0, 0.0, 0.95, 24)
    assert top1_gain_over_chance(2, 2, 0.5).low < 0 < top1_gain_over_chance(12, 12, 0.5).low
