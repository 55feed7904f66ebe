"""Series ranking metrics, always reported beside the random baseline.

The rank of a series' best image is ``1 + #(other images scored at least as high)``: every tie
counts against the best image, wherever it stands in the series, so the result is deterministic
and a scorer gets no credit for what it cannot tell apart. (Breaking ties by position instead
would hand a constant scorer, e.g. a head whose units all died, top-1 = 100 % on any manifest
that lists the keeper first, and early stopping and the promotion gate would prefer it.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keeper_core.errors import DataError


@dataclasses.dataclass(frozen=True)
class SeriesMetrics:
    """Ranking quality over a set of series, with the expected values of a random ranking.

    Attributes:
        top1, top2, top3: fraction of series whose best image ranks in the top k.
        mean_rank: mean rank of the best image (1 = first).
        mrr: mean reciprocal rank of the best image.
        random_top1: mean(1 / n) over series of n images.
        random_top2, random_top3: mean(min(k, n) / n).
        random_mean_rank: mean((n + 1) / 2).
        random_mrr: mean(H_n / n), H_n the n-th harmonic number.
        n_series: number of series.
    """

    top1: float
    top2: float
    top3: float
    mean_rank: float
    mrr: float
    random_top1: float
    random_top2: float
    random_top3: float
    random_mean_rank: float
    random_mrr: float
    n_series: int

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (e.g. for MLflow ``log_metrics``)."""
        return dataclasses.asdict(self)


def best_ranks(scores: Sequence[np.ndarray], best: Sequence[int]) -> np.ndarray:
    """1-based rank of the best image of each series (ties: see the module docstring).

    Args:
        scores: one 1-D array of scores per series.
        best: index of the best image in each series.

    Returns:
        int64 array of ranks, one per series.

    Raises:
        DataError: no series, lengths disagree, an empty or non-1-D series, NaN scores, or a
            best index out of range (``.rows`` names the series).
    """
    if len(scores) == 0:
        raise DataError("no series to evaluate")
    if len(scores) != len(best):
        raise DataError(f"{len(scores)} score arrays but {len(best)} best indices")
    ranks = np.empty(len(scores), dtype=np.int64)
    for i, (s, b) in enumerate(zip(scores, best, strict=True)):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 1 or len(s) == 0:
            raise DataError(f"series {i}: scores must be a non-empty 1-D array", rows=[i])
        if np.isnan(s).any():
            raise DataError(f"series {i}: NaN scores", rows=[i])
        if not _index_in(b, len(s)):
            raise DataError(f"series {i}: best index {b!r} not an int in [0, {len(s)})", rows=[i])
        b = int(b)
        ranks[i] = int((s >= s[b]).sum())  # itself included: 1 + the others at least as high
    return ranks


def _index_in(b: object, n: int) -> bool:
    """Whether ``b`` is a whole number in [0, n): an int, or an integral float (a pandas column
    with a gap is float); never a bool (a keeper mask passed by mistake), NaN, inf or None."""
    if isinstance(b, (bool, np.bool_)):
        return False
    try:
        return int(b) == b and 0 <= int(b) < n  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return False


def series_metrics(scores: Sequence[np.ndarray], best: Sequence[int]) -> SeriesMetrics:
    """Top-k accuracy, mean rank and MRR of the best image, with random baselines.

    Args:
        scores: one 1-D array of scores per series (higher = better).
        best: index of the best image in each series.

    Returns:
        The metrics.

    Raises:
        DataError: see ``best_ranks``.
    """
    ranks = best_ranks(scores, best)
    n = np.array([len(s) for s in scores], dtype=np.float64)
    harmonic = np.array([np.sum(1.0 / np.arange(1, k + 1)) for k in n.astype(np.int64)])
    return SeriesMetrics(
        top1=float(np.mean(ranks <= 1)),
        top2=float(np.mean(ranks <= 2)),
        top3=float(np.mean(ranks <= 3)),
        mean_rank=float(np.mean(ranks)),
        mrr=float(np.mean(1.0 / ranks)),
        random_top1=float(np.mean(1.0 / n)),
        random_top2=float(np.mean(np.minimum(2, n) / n)),
        random_top3=float(np.mean(np.minimum(3, n) / n)),
        random_mean_rank=float(np.mean((n + 1) / 2)),
        random_mrr=float(np.mean(harmonic / n)),
        n_series=len(ranks),
    )


def series_metrics_from_padded(scores: Any, mask: Any, target: Any) -> SeriesMetrics:
    """``series_metrics`` on a padded batch (numpy arrays or torch tensors).

    Args:
        scores: (B, L) scores; padded positions are ignored.
        mask: (B, L) bool, True on real images.
        target: (B,) index of the best image in each row (into L, on a real position).

    Returns:
        The metrics.

    Raises:
        DataError: shapes disagree, or a target is out of range or on padding.
    """
    s, m, t = (_numpy(a) for a in (scores, mask, target))
    if s.ndim != 2 or m.shape != s.shape or t.shape != (s.shape[0],):
        raise DataError(
            f"expected scores (B, L), mask (B, L), target (B,); got {s.shape}, {m.shape}, {t.shape}"
        )
    m = m.astype(bool)
    per_series, best = [], []
    for i in range(len(s)):
        real = np.flatnonzero(m[i])
        pos = np.flatnonzero(real == t[i])
        if len(pos) == 0:
            raise DataError(f"row {i}: target {t[i]} is not a real image", rows=[i])
        per_series.append(s[i, real])
        best.append(int(pos[0]))
    return series_metrics(per_series, best)


def format_table(rows: Mapping[str, SeriesMetrics]) -> str:
    """A fixed-width table: one row per method, then the random baseline.

    Top-k are percentages; "vs random" is top-1 minus random top-1 in percentage points.
    Methods evaluated on the same series share one "random" row; otherwise each gets its own.

    Args:
        rows: method name -> its metrics.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    if not rows:
        raise DataError("format_table needs at least one row")
    header = ("method", "series", "top1", "top2", "top3", "mean_rank", "MRR", "vs random (pts)")
    lines = [
        (
            name,
            *_cells(m.n_series, m.top1, m.top2, m.top3, m.mean_rank, m.mrr),
            f"{100 * (m.top1 - m.random_top1):+.1f}",
        )
        for name, m in rows.items()
    ]
    first = next(iter(rows.values()))
    shared = all(_random(m) == _random(first) for m in rows.values())
    randoms = [("random", first)] if shared else [(f"random ({k})", m) for k, m in rows.items()]
    lines += [(name, *_cells(*_random(m)), "-") for name, m in randoms]
    widths = [max(len(r[c]) for r in [header, *lines]) for c in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            v.ljust(w) if c == 0 else v.rjust(w)
            for c, (v, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([fmt(header), "-" * len(fmt(header)), *(fmt(r) for r in lines)])


def _cells(n: int, top1: float, top2: float, top3: float, rank: float, mrr: float) -> list[str]:
    return [str(n), *(f"{100 * t:.1f}" for t in (top1, top2, top3)), f"{rank:.2f}", f"{mrr:.3f}"]


def _random(m: SeriesMetrics) -> tuple[int, float, float, float, float, float]:
    """The random baseline in ``_cells`` order."""
    return (
        m.n_series,
        m.random_top1,
        m.random_top2,
        m.random_top3,
        m.random_mean_rank,
        m.random_mrr,
    )


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, possibly on a GPU or in bf16
        a = a.detach().cpu()
        a = a.float() if a.is_floating_point() else a
        return np.asarray(a.numpy())
    return np.asarray(a)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A top-1 gain with its exact confidence interval.

    Attributes:
        estimate: the gain, e.g. challenger top-1 minus champion top-1.
        low, high: the interval's bounds.
        confidence: its coverage, e.g. 0.95.
        n: number of series.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n: int

    def pts(self) -> str:
        """``+8.3 pts (95% CI -4.2 to +20.8)``: the estimate and bounds in percentage points."""
        return (
            f"{100 * self.estimate:+.1f} pts ({100 * self.confidence:g}% CI "
            f"{100 * self.low:+.1f} to {100 * self.high:+.1f})"
        )


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Clopper-Pearson (exact) interval of a proportion ``k / n``.

    Each bound leaves at most ``(1 - confidence) / 2`` of binomial probability beyond it, so the
    lower bound exceeds ``p0`` exactly when a one-sided binomial test rejects ``p <= p0`` at that
    level.

    Raises:
        ValueError: not ``0 <= k <= n``, ``n < 1``, or confidence outside (0, 1).
    """
    if not 0 <= k <= n or n < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"need 0 <= k <= n, n >= 1, 0 < confidence < 1; got {k}, {n}, {confidence}"
        )
    alpha = (1.0 - confidence) / 2
    j = np.arange(n + 1)
    logfact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    logc = logfact[n] - logfact[j] - logfact[n - j]

    def tail(p: float, upper: bool) -> float:  # P(X >= k) if upper else P(X <= k), X ~ Bin(n, p)
        logp = logc + j * np.log(p) + (n - j) * np.log1p(-p)
        part = logp[k:] if upper else logp[: k + 1]
        m = part.max()
        return float(np.exp(m) * np.exp(part - m).sum())

    def solve(upper: bool) -> float:  # the p where the tail equals alpha (tails are monotone)
        lo, hi = 0.0, 1.0
        for _ in range(64):  # 2**-64: below any printed digit
            mid = (lo + hi) / 2
            # P(X >= k) grows with p; P(X <= k) falls.
            if (tail(mid, upper) < alpha) == upper:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    return (0.0 if k == 0 else solve(True)), (1.0 if k == n else solve(False))


def paired_top1_gain(wins: int, losses: int, n: int, confidence: float = 0.95) -> Interval:
    """Top-1 of A minus top-1 of B on the same ``n`` series, with an exact interval.

    Only the series where the two disagree carry evidence: ``wins`` (A finds the keeper, B does
    not) and ``losses`` (the reverse). Given ``d = wins + losses``, the gain is ``d / n * (2q - 1)``
    with ``q`` the share of wins among them; the interval maps ``q``'s Clopper-Pearson interval,
    so its lower bound is above 0 exactly when an exact one-sided sign test on wins vs losses
    rejects "A is no better" at ``(1 - confidence) / 2``. On 24 series one series is 4.2 points:
    one win and no loss gives -4.0 to +4.2, not a gain.

    Raises:
        ValueError: negative counts, more disagreements than series, or n < 1.
    """
    if wins < 0 or losses < 0 or wins + losses > n or n < 1:
        raise ValueError(
            f"need wins, losses >= 0 and wins + losses <= n; got {wins}, {losses}, {n}"
        )
    d = wins + losses
    if d == 0:  # the same keepers found on every series: no evidence either way
        return Interval(0.0, 0.0, 0.0, confidence, n)
    q_lo, q_hi = binomial_interval(wins, d, confidence)
    return Interval(
        (wins - losses) / n, d / n * (2 * q_lo - 1), d / n * (2 * q_hi - 1), confidence, n
    )


def top1_gain_over_chance(hits: int, n: int, chance: float, confidence: float = 0.95) -> Interval:
    """Top-1 (``hits / n``) minus a random ranking's expected top-1 (``chance``), exact interval.

    ``chance`` is a known number (mean of 1 / series length), so the interval is the
    Clopper-Pearson interval of top-1, shifted.
    """
    lo, hi = binomial_interval(hits, n, confidence)
    return Interval(hits / n - chance, lo - chance, hi - chance, confidence, n)
