"""keeper_core.metrics over seeded random series, against plain references.

Seeded cases (``KEEPER_HISTORIES=1000`` runs more), each 1-8 series of 1-12 images whose scores
come from a small grid with +-inf (ties everywhere), two values, one value (a constant scorer),
distinct values, Gaussians rounded to 1/8, or extremes (+-1e308, the smallest subnormal, -0.0),
as float64, float32, int arrays or lists; best indices as int, numpy int64 or int32.
``reference_rank`` is the module docstring written out: ``1 + #(other images scored at least as
high)``, every tie against the best image. For each case:

- ``best_ranks`` equals the reference; ``series_metrics`` equals top-k / mean rank / MRR of the
  reference ranks, and its random baselines equal the expectation of a uniformly random ranking
  (the rank of the best uniform on 1..n), in exact fractions;
- permuting the images of a series together with its best index, permuting the series, repeating
  every series, and a strictly increasing transform of the scores change nothing; a
  non-decreasing transform (one that merges scores into ties) never improves a rank;
- ``series_metrics_from_padded`` on the case padded with holes and junk (NaN, inf) in the padding
  equals the list form;
- a corrupted case (an empty or 2-D series, a NaN score, a best index out of range, non-integral
  or a bool, a length mismatch) is a DataError naming the first bad series in ``.rows``.

The exact intervals the promotion gate uses (``binomial_interval``, ``paired_top1_gain``,
``top1_gain_over_chance``): each Clopper-Pearson bound brackets the point where exactly
``(1 - confidence) / 2`` of binomial probability lies beyond the count (exact fractions), the
paired gain's lower bound is above 0 exactly when the one-sided exact sign test rejects, A vs B is
the negation of B vs A, intervals contain the estimate and widen with confidence, and the
degenerate cases (identical models, one series, a constant scorer) are never "surely better".
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from keeper_core.errors import DataError
from keeper_core.metrics import (
    SeriesMetrics,
    best_ranks,
    binomial_interval,
    paired_top1_gain,
    series_metrics,
    series_metrics_from_padded,
    top1_gain_over_chance,
)

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "150"))
INTERVAL_SEEDS = max(SEEDS // 4, 1)
INF = math.inf
GRID = [-INF, -2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0, INF]
EXTREMES = [-1e308, -5e-324, -0.0, 0.0, 5e-324, 1e308, -INF, INF]
# Strictly increasing on every value the non-extreme modes draw (|x| <= 8 in steps of 1/8, +-inf),
# and distinct values stay distinct in float64.
STRICT = {
    "affine": lambda x: 2.0 * x + 1.0,
    "cube": lambda x: x**3,
    "atan": math.atan,
    "exp": math.exp,
}
# Non-decreasing: merges scores into ties, never reorders them.
MERGING = {
    "floor": lambda x: float(np.floor(x)),
    "clip": lambda x: min(max(x, -1.0), 1.0),
    "sign": lambda x: float(np.sign(x)),
}
CONFIDENCES = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999]  # alpha never a dyadic a p-value could equal


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# random cases


@dataclass
class Case:
    seed: int
    values: list[list[float]]  # the scores as Python floats: what the reference reads
    scores: list[Any]  # the same as passed in (arrays of several dtypes, or lists)
    best: list[Any]
    modes: list[str]

    def __str__(self) -> str:
        return f"seed {self.seed}: modes {self.modes} values {self.values} best {self.best}"


def random_values(rng: np.random.Generator, n: int) -> tuple[str, list[float]]:
    mode = pick(rng, ["grid", "grid", "few", "const", "distinct", "normal", "extreme"])
    if mode == "grid":
        return mode, [pick(rng, GRID) for _ in range(n)]
    if mode == "few":
        a, b = pick(rng, GRID), pick(rng, GRID)
        return mode, [a if rng.random() < 0.5 else b for _ in range(n)]
    if mode == "const":
        return mode, [pick(rng, GRID)] * n
    if mode == "distinct":
        return mode, [float(v) / 8 for v in rng.permutation(n)]
    if mode == "normal":
        return mode, [float(v) for v in np.clip(np.round(rng.normal(0, 1.5, n) * 8) / 8, -8, 8)]
    return mode, [pick(rng, EXTREMES) for _ in range(n)]


def as_input(rng: np.random.Generator, values: list[float], mode: str) -> Any:
    kinds = ["f64", "f64", "list"]
    if mode != "extreme":  # float32 would turn 1e308 into inf and 5e-324 into 0
        kinds.append("f32")
    if all(math.isfinite(v) and v == int(v) and abs(v) < 2**53 for v in values):
        kinds.append("int")
    kind = pick(rng, kinds)
    if kind == "list":
        return list(values)
    dtype = {"f64": np.float64, "f32": np.float32, "int": np.int64}[kind]
    return np.array(values, dtype=dtype)


def as_index(rng: np.random.Generator, b: int) -> Any:
    return pick(rng, [int, np.int64, np.int32, np.intp])(b)


def random_case(seed: int, max_series: int = 8) -> Case:
    rng = np.random.default_rng(seed)
    values, scores, best, modes = [], [], [], []
    for _ in range(int(rng.integers(1, max_series + 1))):
        n = int(rng.integers(1, 13))
        mode, v = random_values(rng, n)
        values.append(v)
        modes.append(mode)
        scores.append(as_input(rng, v, mode))
        best.append(as_index(rng, int(rng.integers(n))))
    return Case(seed, values, scores, best, modes)


# ---------------------------------------------------------------------------------------------
# references


def reference_rank(values: list[float], b: int) -> int:
    """``1 + #(other images scored at least as high)``: every tie counts against the best."""
    return 1 + sum(1 for j, v in enumerate(values) if j != b and v >= values[b])


def reference_metrics(ranks: list[int], sizes: list[int]) -> dict[str, Fraction]:
    """The metrics of these ranks, and the random baselines as the expectation of a uniformly
    random ranking (the best's rank uniform on 1..n), exactly."""
    m = len(ranks)

    def mean(xs: list[Fraction]) -> Fraction:
        return sum(xs, Fraction(0)) / m

    def expected(n: int, f: Any) -> Fraction:
        return sum((Fraction(f(r)) for r in range(1, n + 1)), Fraction(0)) / n

    out = {f"top{k}": mean([Fraction(int(r <= k)) for r in ranks]) for k in (1, 2, 3)} | {
        "mean_rank": mean([Fraction(r) for r in ranks]),
        "mrr": mean([Fraction(1, r) for r in ranks]),
        "random_mean_rank": mean([expected(n, lambda r: r) for n in sizes]),
        "random_mrr": mean([expected(n, lambda r: Fraction(1, r)) for n in sizes]),
    }
    for k in (1, 2, 3):
        out[f"random_top{k}"] = mean([expected(n, lambda r, k=k: int(r <= k)) for n in sizes])
    return out


def assert_metrics_match(got: SeriesMetrics, want: dict[str, Fraction], n: int, why: str) -> None:
    assert got.n_series == n, why
    for name, value in want.items():
        # Counts over n and integer sums over n are exact in float64; 1/r sums are not.
        exact = name in ("top1", "top2", "top3", "mean_rank")
        g = getattr(got, name)
        assert g == (float(value) if exact else pytest.approx(float(value), rel=1e-12)), (
            f"{why}: {name} {g} != {float(value)}"
        )


def assert_same_metrics(a: SeriesMetrics, b: SeriesMetrics, why: str) -> None:
    """Equal up to the order of float sums (top-k, mean rank and n_series exactly)."""
    for f in fields(SeriesMetrics):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("top1", "top2", "top3", "mean_rank", "n_series"):
            assert x == y, f"{why}: {f.name} {x} != {y}"
        else:
            assert x == pytest.approx(y, rel=1e-12), f"{why}: {f.name} {x} != {y}"


# ---------------------------------------------------------------------------------------------
# ranks and metrics against the reference


@pytest.mark.parametrize("seed", range(SEEDS))
def test_ranks_and_metrics_are_the_reference_on_random_series(seed: int) -> None:
    case = random_case(seed)
    why = str(case)
    want = [reference_rank(v, int(b)) for v, b in zip(case.values, case.best, strict=True)]
    got = best_ranks(case.scores, case.best)
    assert got.dtype == np.int64, why
    assert got.tolist() == want, why
    sizes = [len(v) for v in case.values]
    for r, n, v, b in zip(want, sizes, case.values, case.best, strict=True):
        assert 1 <= r <= n, why
        # Rank 1 only for a strict winner; a constant scorer ranks the best last.
        assert (r == 1) == all(x < v[b] for j, x in enumerate(v) if j != b), why
        if len(set(v)) == 1:
            assert r == n, why
    m = series_metrics(case.scores, case.best)
    assert_metrics_match(m, reference_metrics(want, sizes), len(sizes), why)
    assert m.top1 <= m.top2 <= m.top3 <= 1.0, why
    assert 0.0 < m.mrr <= 1.0 <= m.mean_rank, why
    assert m.mrr >= 1 / m.mean_rank - 1e-12, why  # Jensen: mean(1/r) >= 1 / mean(r)
    assert m.random_top1 <= m.random_top2 <= m.random_top3 <= 1.0, why
    assert set(m.as_dict()) == {f.name for f in fields(SeriesMetrics)}, why


@pytest.mark.parametrize("seed", range(SEEDS))
def test_permutations_repetition_and_monotone_transforms_change_nothing(seed: int) -> None:
    case = random_case(seed)
    why = str(case)
    rng = np.random.default_rng(10_000 + seed)
    base = series_metrics(case.scores, case.best)
    ranks = best_ranks(case.scores, case.best).tolist()

    # The images of each series shuffled, the best index following its image.
    shuffled, moved = [], []
    for v, b in zip(case.values, case.best, strict=True):
        p = rng.permutation(len(v))
        shuffled.append(np.array(v)[p])
        moved.append(int(np.flatnonzero(p == int(b))[0]))
    assert best_ranks(shuffled, moved).tolist() == ranks, why
    assert series_metrics(shuffled, moved) == base, why  # same series, same order: bit for bit

    # The series shuffled, and every series twice.
    order = rng.permutation(len(case.values))
    perm = series_metrics([case.scores[i] for i in order], [case.best[i] for i in order])
    assert_same_metrics(perm, base, f"{why} series order {order.tolist()}")
    twice = series_metrics(case.scores * 2, case.best * 2)
    assert twice.n_series == 2 * base.n_series, why
    assert_same_metrics(replace(twice, n_series=base.n_series), base, f"{why} twice")

    # A strictly increasing transform keeps every rank; a merging one never improves one.
    for name, f in STRICT.items():
        if "extreme" in case.modes:
            break  # 2 * 1e308 and 5e-324 ** 3 would merge distinct scores
        moved_scores = [np.array([f(x) for x in v]) for v in case.values]
        assert best_ranks(moved_scores, case.best).tolist() == ranks, f"{why} {name}"
    for name, f in MERGING.items():
        merged = best_ranks([np.array([f(x) for x in v]) for v in case.values], case.best)
        assert all(m >= r for m, r in zip(merged.tolist(), ranks, strict=True)), f"{why} {name}"

    # A shot scored strictly below the best leaves its rank; one at least as high costs one.
    i = int(rng.integers(len(case.values)))
    v, b = case.values[i], int(case.best[i])
    if v[b] > -INF:
        below = [*v, -INF]
        assert best_ranks([below], [b]).tolist() == [ranks[i]], why
    assert best_ranks([[*v, v[b]]], [b]).tolist() == [ranks[i] + 1], why
    assert best_ranks([[v[b], *v]], [b + 1]).tolist() == [ranks[i] + 1], why


@pytest.mark.parametrize("seed", range(SEEDS // 2))
def test_the_padded_form_is_the_list_form(seed: int) -> None:
    case = random_case(seed)
    why = str(case)
    rng = np.random.default_rng(20_000 + seed)
    b_rows = len(case.values)
    width = max(len(v) for v in case.values) + int(rng.integers(0, 3))
    junk = [np.nan, np.inf, -np.inf, 1e300, 7.0]
    scores = np.array([[pick(rng, junk) for _ in range(width)] for _ in range(b_rows)])
    mask = np.zeros((b_rows, width), dtype=bool)
    target = np.empty(b_rows, dtype=pick(rng, [np.int64, np.int32]))
    for i, (v, b) in enumerate(zip(case.values, case.best, strict=True)):
        where = np.sort(rng.choice(width, size=len(v), replace=False))  # holes in the mask
        scores[i, where] = v
        mask[i, where] = True
        target[i] = where[int(b)]
    m = mask if rng.random() < 0.5 else mask.astype(pick(rng, [np.int64, np.float32]))
    assert series_metrics_from_padded(scores, m, target) == series_metrics(case.values, case.best)

    # A target on padding: a DataError naming the first such row.
    holes = [i for i in range(b_rows) if not mask[i].all()]
    if holes:
        bad = sorted(rng.choice(holes, size=int(rng.integers(1, len(holes) + 1)), replace=False))
        t = target.copy()
        for i in bad:
            t[i] = int(rng.choice(np.flatnonzero(~mask[i])))
        with pytest.raises(DataError, match=f"row {bad[0]}: target") as e:
            series_metrics_from_padded(scores, mask, t)
        assert e.value.rows == [int(bad[0])], why


# ---------------------------------------------------------------------------------------------
# the random baseline is the expectation of a uniformly random ranking


@pytest.mark.parametrize("n", range(1, 7))
def test_the_random_baseline_is_the_mean_over_every_ranking(n: int) -> None:
    # Every ordering of n distinct scores, the best at each position: the metrics averaged over
    # all of them are the random baseline.
    perms = [np.array(p, dtype=np.float64) for p in itertools.permutations(range(n))]
    for b in range(n):
        m = series_metrics(perms, [b] * len(perms))
        for name in ("top1", "top2", "top3", "mean_rank", "mrr"):
            assert getattr(m, name) == pytest.approx(getattr(m, f"random_{name}"), rel=1e-12), (
                n,
                b,
                name,
            )


# ---------------------------------------------------------------------------------------------
# bad input


CORRUPTIONS = ["empty", "2d", "nan", "best=n", "best=-1", "best>n", "best=0.5", "best=True"]


@pytest.mark.parametrize("seed", range(SEEDS // 2))
def test_corrupted_cases_name_the_first_bad_series(seed: int) -> None:
    case = random_case(seed)
    rng = np.random.default_rng(30_000 + seed)
    scores, best = list(case.scores), list(case.best)
    bad = sorted(
        int(i)
        for i in rng.choice(
            len(scores), size=int(rng.integers(1, min(3, len(scores)) + 1)), replace=False
        )
    )
    done = []
    for i in bad:
        how = pick(rng, CORRUPTIONS)
        done.append((i, how))
        s = np.array(case.values[i])
        n = len(s)
        if how == "empty":
            scores[i] = np.zeros(0)
        elif how == "2d":
            scores[i] = s.reshape(1, n)
        elif how == "nan":
            s[int(rng.integers(n))] = np.nan
            scores[i] = s
        elif how == "best=n":
            best[i] = n
        elif how == "best=-1":
            best[i] = -1
        elif how == "best>n":
            best[i] = n + int(rng.integers(1, 1000))
        elif how == "best=0.5":
            best[i] = int(rng.integers(n)) + 0.5
        else:
            best[i] = bool(rng.random() < 0.5)  # False is 0, in range: still not an index
    why = f"{case} corrupted {done}"
    for fn in (best_ranks, series_metrics):
        with pytest.raises(DataError, match=f"series {bad[0]}: ") as e:
            fn(scores, best)
        assert e.value.rows == [bad[0]], why
    # A length mismatch is named before any series is read.
    extra = best[:-1] if rng.random() < 0.5 else [*best, 0]
    with pytest.raises(DataError, match=f"{len(scores)} score arrays but {len(extra)} best") as e:
        series_metrics(scores, extra)
    assert e.value.rows == [], why
    with pytest.raises(DataError, match="no series"):
        series_metrics([], extra)


# Found by the histories, fixed since: a NaN, infinite or None best index escaped best_ranks as
# ValueError / OverflowError / TypeError from int(b), not the DataError naming the series.
@pytest.mark.parametrize("b", [math.nan, math.inf, None])
def test_a_best_index_int_cannot_read_is_a_data_error(b: Any) -> None:
    # e.g. a float best-index column with a missing value (pandas reads it as NaN)
    with pytest.raises(DataError, match="series 1: best index") as e:
        best_ranks([np.zeros(2), np.zeros(2)], [0, b])
    assert e.value.rows == [1]


# Found by the histories, fixed since: best_ranks refused a Python bool as a best index but took
# numpy's np.bool_ as 0/1.
def test_a_numpy_bool_best_index_is_refused_like_a_python_bool() -> None:
    # A keeper mask (one bool per series, e.g. df["is_keeper"].to_numpy()) passed as `best`.
    scores = [np.array([3.0, 1.0]), np.array([1.0, 3.0])]
    with pytest.raises(DataError, match="series 0: best index"):
        best_ranks(scores, [True, False])  # refused today
    with pytest.raises(DataError, match="series 0: best index"):
        best_ranks(scores, np.array([True, False]))  # taken as indices 1 and 0


# ---------------------------------------------------------------------------------------------
# the exact intervals of the promotion gate


def binomial_tail(k: int, n: int, p: Fraction, upper: bool) -> Fraction:
    """P(X >= k) if upper else P(X <= k), X ~ Binomial(n, p), exactly."""
    js = range(k, n + 1) if upper else range(0, k + 1)
    return sum((math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in js), Fraction(0))


@pytest.mark.parametrize("seed", range(INTERVAL_SEEDS))
def test_clopper_pearson_bounds_leave_alpha_beyond_the_count(seed: int) -> None:
    rng = np.random.default_rng(40_000 + seed)
    n = int(pick(rng, [1, 2, 3, 5, 24, int(rng.integers(1, 80))]))
    k = int(pick(rng, [0, n, int(rng.integers(0, n + 1))]))
    conf = pick(rng, CONFIDENCES)
    why = f"seed {seed}: k={k} n={n} confidence={conf}"
    lo, hi = binomial_interval(k, n, conf)
    assert 0.0 <= lo <= k / n <= hi <= 1.0, why
    assert (lo == 0.0) == (k == 0), why
    assert (hi == 1.0) == (k == n), why
    alpha = Fraction((1.0 - conf) / 2)
    # P(X >= k) grows with p: just below lo it is under alpha, just above it over.
    for bound, upper in ((lo, True), (hi, False)):
        if bound in (0.0, 1.0):
            continue
        below, above = Fraction(bound * (1 - 1e-9)), Fraction(min(bound * (1 + 1e-9), 1.0))
        tails = binomial_tail(k, n, below, upper), binomial_tail(k, n, above, upper)
        if upper:
            assert tails[0] < alpha < tails[1], why
        else:
            assert tails[0] > alpha > tails[1], why
    # Mirror symmetry, and wider at a higher confidence.
    mlo, mhi = binomial_interval(n - k, n, conf)
    assert (lo, hi) == (pytest.approx(1 - mhi, abs=1e-12), pytest.approx(1 - mlo, abs=1e-12)), why
    wider = binomial_interval(k, n, min(0.9999, conf + 0.04))
    assert wider[0] <= lo + 1e-15, why
    assert hi - 1e-15 <= wider[1], why
    if k < n:  # one more success moves both bounds up
        up = binomial_interval(k + 1, n, conf)
        assert up[0] > lo, why
        assert up[1] > hi, why


@pytest.mark.parametrize("seed", range(INTERVAL_SEEDS))
def test_the_paired_gain_is_the_sign_test_and_antisymmetric(seed: int) -> None:
    rng = np.random.default_rng(50_000 + seed)
    n = int(pick(rng, [1, 2, 24, int(rng.integers(1, 60))]))
    d = int(rng.integers(0, n + 1))
    wins = int(rng.integers(0, d + 1))
    losses = d - wins
    conf = pick(rng, CONFIDENCES)
    why = f"seed {seed}: wins={wins} losses={losses} n={n} confidence={conf}"
    g = paired_top1_gain(wins, losses, n, conf)
    assert (g.n, g.confidence) == (n, conf), why
    assert g.estimate == (wins - losses) / n, why
    assert -d / n - 1e-12 <= g.low <= g.estimate <= g.high <= d / n + 1e-12, why
    # B vs A is the negation of A vs B.
    r = paired_top1_gain(losses, wins, n, conf)
    assert r.estimate == -g.estimate, why
    assert (r.low, r.high) == (pytest.approx(-g.high, abs=1e-12), pytest.approx(-g.low, abs=1e-12))
    # The lower bound is above 0 exactly when the one-sided exact sign test on the
    # disagreements rejects "A is no better" at (1 - confidence) / 2.
    alpha = Fraction((1.0 - conf) / 2)
    p = binomial_tail(wins, d, Fraction(1, 2), True) if d else Fraction(1)
    if abs(p - alpha) > Fraction(1, 10**6) * alpha:  # not within the bisection's reach of 0
        assert (g.low > 1e-12) is (p < alpha), f"{why}: sign test p={float(p)}"
    # A loss turned into a win never lowers the interval; a higher confidence widens it.
    if losses:
        better = paired_top1_gain(wins + 1, losses - 1, n, conf)
        assert better.low >= g.low - 1e-12, why
        assert better.high >= g.high - 1e-12, why
    wide = paired_top1_gain(wins, losses, n, min(0.9999, conf + 0.04))
    assert wide.low <= g.low + 1e-12, why
    assert g.high - 1e-12 <= wide.high, why


@pytest.mark.parametrize("seed", range(INTERVAL_SEEDS))
def test_the_gain_over_chance_is_the_shifted_binomial_interval(seed: int) -> None:
    rng = np.random.default_rng(60_000 + seed)
    sizes = rng.integers(1, 13, size=int(rng.integers(1, 40)))
    chance = float(np.mean(1.0 / sizes))
    hits = int(rng.integers(0, len(sizes) + 1))
    conf = pick(rng, CONFIDENCES)
    g = top1_gain_over_chance(hits, len(sizes), chance, conf)
    lo, hi = binomial_interval(hits, len(sizes), conf)
    assert (g.estimate, g.low, g.high) == (hits / len(sizes) - chance, lo - chance, hi - chance)
    assert g.low <= g.estimate <= g.high
    assert (g.n, g.confidence) == (len(sizes), conf)


@pytest.mark.parametrize("seed", range(INTERVAL_SEEDS))
def test_degenerate_comparisons_are_never_surely_better(seed: int) -> None:
    # The gate promotes only on a lower bound above 0 (keeper_train.jobs.promote.decide).
    case = random_case(seed)
    ranks = best_ranks(case.scores, case.best)
    n = len(ranks)
    conf = pick(np.random.default_rng(seed), CONFIDENCES)
    # Identical models: no series where they disagree (0 wins, 0 losses), no evidence either way.
    same = paired_top1_gain(0, 0, n, conf)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0), case
    # One series: even a win is within chance at any confidence here.
    assert paired_top1_gain(1, 0, 1, conf).low < 0
    # A constant scorer finds the keeper only in one-image series, which chance finds too.
    sizes = np.array([len(v) for v in case.values])
    const = best_ranks([np.zeros(k) for k in sizes], case.best)
    assert ((const == 1) == (sizes == 1)).all(), case
    m = series_metrics([np.zeros(k) for k in sizes], case.best)
    assert m.top1 <= m.random_top1 + 1e-12, case
    g = top1_gain_over_chance(int((const == 1).sum()), n, m.random_top1, conf)
    assert g.estimate <= 1e-12, case
    assert g.low < 0, case
