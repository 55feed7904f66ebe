"""keeper_core.cascade.run_cascade over seeded random requests, against a plain reference.

Seeded cases (``KEEPER_HISTORIES=1000`` runs more), each a request as ``POST /v1/select`` and
``keeper select`` make it: 0-60 candidates in clusters (exact and near duplicates), 1-3 positive
and negative prompts, optional head scores, image sizes, a random config (every knob on and off,
weights 0 to ``MAX_WEIGHT``, logit scales 1e-3 to 1e300) and a judge that is absent, answers,
fails some candidates (``VlmScores``), returns a non-finite or out-of-range score, or raises.
Scores are quantised on purpose so that ties are common. ``reference`` is the module docstring
written out naively (Python sorts, a full cosine matrix). For each case:

- the result equals the reference's: picks in order, every candidate's ``dropped_at`` and
  ``reason``, the ``rerank`` / ``vlm`` / ``final`` / ``clip`` columns bit for bit, the stage
  reports (n_in, n_kept, n_dropped, skipped), the judge's one call (int64, rank order, never
  empty) and ``vlm_calls``; a judge that raises or answers a judged candidate outside [0, 1]
  is a CascadeStageError of stage ``vlm``, never a ranking;
- every stage reports ``n_in == n_kept + n_dropped``, ``n_in`` of a stage is ``n_kept`` of the
  one before, the first ``n_in`` is N; picks are unique input indices; ``vlm_calls`` is the
  number of candidates with a VLM score; the inputs are not modified;
- a config outside the documented bounds is a pydantic ValidationError naming the field, a
  request over a ``CascadeLimits`` ceiling is refused by ``check_limits`` (DataError), and
  malformed inputs are a DataError raised before the judge is called;
- with distinct scores, permuting the candidates permutes the answer, reasons naming the
  permuted indices (``test_permuting_the_candidates_permutes_the_answer``).

Every relevance is exact in float32, so ties are real ties and the reference recomputes it:
most cases use entries +-1/8 in 64 dimensions (unit rows, every cosine a multiple of 1/32, so
dedup's cosines are exact too and tie often); the rest use Gaussian clusters rounded to multiples
of 2^-11 in 12 dimensions (rows within 8.5e-4 of unit norm, as check_embeddings allows; products
exact in float32 in any summation order). There dedup's float32 cosines (of rows rescaled to unit
norm) are not exact, so thresholds are drawn away from every pair's cosine; a duplicate within
rounding of two group leaders may join either group, and such a case checks accounting only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from keeper_core.cascade import (
    MAX_WEIGHT,
    STAGES,
    CascadeConfig,
    CascadeLimits,
    CascadeResult,
    CascadeStageError,
    VlmScores,
    check_limits,
    run_cascade,
)
from keeper_core.errors import DataError

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "300"))
PERM_SEEDS = max(SEEDS // 5, 1)
DYADIC_DIM = 64  # entries +-1/8: unit rows, exact float32 dot products
GRID_DIM, GRID_BITS = 12, 11  # products of multiples of 2^-11, 12 of them: exact in float32
SIZES = [40.0, 64.0, 100.0, 150.0, 200.0, 300.0, 400.0]  # ratios hit the aspect limits exactly
ASPECTS = [0.5, 0.75, 1.0, 4 / 3, 1.5, 2.0, 3.0]
WEIGHTS = [0.0, 0.0, 1e-3, 0.25, 0.5, 0.5, 1.0, 3.0, MAX_WEIGHT]
SCALES = [1e-3, 1.0, 10.0, 32.0, 100.0, 100.0, 1e4, 1e300]
# 31/32 and 15/16 are cosines that dyadic near duplicates have exactly (1 and 2 flipped signs).
THRESHOLDS = [1.0, 31 / 32, 31 / 32, 0.95, 15 / 16, 0.9, 0.8, 0.5]
# selection.dedup_in_order compares with threshold - 1e-6 (float32 cosines of identical rows
# can come out a few ulp below 1); the module docstring says "cosine >= threshold".
COS_SLACK = 1e-6


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# the judge


@dataclass
class Judge:
    """A VLM judge answering from a per-candidate table; records every call.

    kind: ``array`` (an ndarray), ``list`` (a Python list), ``scores`` (VlmScores naming the
    asked candidates in ``failed``, their entries junk), ``mutate`` (edits the indices it was
    given, which must not reach the ranking), ``raise``.
    """

    kind: str
    table: np.ndarray
    failed: frozenset[int] = frozenset()
    junk: float | str | None = math.nan
    calls: list[list[int]] = field(default_factory=list)

    def __call__(self, idx: np.ndarray) -> Any:
        assert idx.dtype == np.int64
        assert len(idx) > 0
        self.calls.append(idx.tolist())
        if self.kind == "raise":
            raise RuntimeError("the judge's replica is gone")
        s = self.table[idx].copy()
        if self.kind == "scores":
            why = {int(i): "image unreadable" for i in idx if int(i) in self.failed}
            gone = np.isin(idx, list(why))
            if self.junk is None or isinstance(self.junk, str):  # a batch job's placeholder
                mark = self.junk
                return VlmScores([mark if g else v for g, v in zip(gone, s, strict=True)], why)
            # A failed entry is not read (test_a_failed_candidates_non_numeric_placeholder_...).
            s[gone] = self.junk
            return VlmScores(s, why)
        if self.kind == "mutate":
            idx[:] = idx[::-1]
        return s.tolist() if self.kind == "list" else s

    def permuted(self, old_of_new: np.ndarray, new_of_old: np.ndarray) -> Judge:
        failed = frozenset(int(new_of_old[i]) for i in self.failed)
        return Judge(self.kind, self.table[old_of_new], failed, self.junk)


# ---------------------------------------------------------------------------------------------
# random requests


@dataclass
class Case:
    seed: int
    mode: str  # "dyadic" or "grid"
    img: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    cos: np.ndarray  # (N, N) true cosines (exact in dyadic mode)
    exact_raw: np.ndarray  # c+ - c-, exact
    head: np.ndarray | None
    widths: np.ndarray | None
    heights: np.ndarray | None
    fields: dict[str, Any]
    judge: Judge | None
    cos_tol: float  # two cosines closer than this may rank either way in float32

    @property
    def n(self) -> int:
        return len(self.img)

    def describe(self) -> str:
        judge = None if self.judge is None else (self.judge.kind, sorted(self.judge.failed))
        return f"seed {self.seed} {self.mode} N={self.n} {self.fields} judge={judge}"


def unit64(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def calibrated(scale: float, raw: np.ndarray) -> np.ndarray:
    """S_clip = sigmoid(scale * (c+ - c-)), in the form that cannot overflow exp."""
    x = scale * raw.astype(np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def dyadic_embeddings(
    rng: np.random.Generator, n: int, threshold: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Sign vectors / 8: images in clusters around random, positive and negative directions.

    Two rows ``h`` signs apart have cosine ``1 - h / 32``. Returns the images, prompts, their
    cosines, c+ - c-, and the rows of a star (its centre last) or [].
    """
    d = DYADIC_DIM
    pos_s = rng.choice([-1, 1], size=(int(rng.integers(1, 4)), d))
    neg_s = rng.choice([-1, 1], size=(int(rng.integers(1, 4)), d))
    if rng.random() < 0.15:
        neg_s[0] = pos_s[0]  # a negative equal to a positive: c+ - c- <= 0 near it
    bases = np.concatenate(
        [rng.choice([-1, 1], size=(max(n // 3, 1), d)), pos_s, neg_s, -neg_s], axis=0
    )
    signs = bases[rng.integers(0, len(bases), n)].copy()
    for row in signs:
        k = int(pick(rng, [0, 0, 1, 1, 1, 2, 3, 6, 16, 32]))  # 0: an exact copy of its base
        row[rng.choice(d, size=k, replace=False)] *= -1
    h = 0 if threshold is None else int(np.floor(32 * (1 - threshold) + 1e-9))
    rows = np.zeros(0, dtype=np.int64)
    if n >= 3 and h >= 1 and rng.random() < 0.7:
        # A star: points f signs from a centre and 2f from each other, f <= h < 2f, so the
        # centre is a duplicate of each point while the points are not of each other: when it
        # comes after them it is equally near several kept images. A negative prompt as the
        # centre ranks it below its points by S_clip; the lowest head score and the last index
        # do by the head score (draw_case).
        f = h // 2 + 1
        rows = np.sort(rng.choice(n, size=min(n, int(rng.integers(3, 6))), replace=False))
        centre = neg_s[0] if rng.random() < 0.5 else signs[rows[-1]].copy()
        signs[rows] = centre
        flips = rng.permutation(d)[: f * (len(rows) - 1)].reshape(len(rows) - 1, f)
        for r, fl in zip(rows[:-1], flips, strict=True):
            signs[r, fl] *= -1
    img = (signs / 8.0).astype(np.float32)
    raw = (signs @ pos_s.T).max(axis=1, initial=-d) - (signs @ neg_s.T).max(axis=1, initial=-d)
    cos = (signs @ signs.T) / d
    pos, neg = (pos_s / 8.0).astype(np.float32), (neg_s / 8.0).astype(np.float32)
    return img, pos, neg, cos, raw / d, rows.tolist()


def grid_embeddings(
    rng: np.random.Generator, n: int, *, exact_copies: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters rounded to multiples of 2^-11 (so within 8.5e-4 of unit norm)."""
    d = GRID_DIM
    q = float(2**GRID_BITS)

    def grid(x: np.ndarray) -> np.ndarray:
        return np.round(unit64(x.reshape(-1, d)) * q).astype(np.int64)

    pos = grid(rng.normal(size=(int(rng.integers(1, 4)), d)))
    neg = grid(rng.normal(size=(int(rng.integers(1, 4)), d)))
    centres = np.concatenate([rng.normal(size=(max(n // 3, 1), d)), pos / q, neg / q], axis=0)
    eps = np.array([pick(rng, [0.0, 0.0, 3e-3, 0.03, 0.1, 1.0]) for _ in range(n)])
    if not exact_copies:
        eps = np.maximum(eps, 3e-3)
    noise = eps[:, None] * rng.normal(size=(n, d))
    img = grid(unit64(centres)[rng.integers(0, len(centres), n)] + noise)
    raw = (img @ pos.T).max(axis=1, initial=-(2**30)) - (img @ neg.T).max(axis=1, initial=-(2**30))
    img64 = unit64(img.astype(np.float64))
    cos = img64 @ img64.T
    f32 = lambda a: (a / q).astype(np.float32)  # noqa: E731
    return f32(img), f32(pos), f32(neg), cos, raw / q**2


def clear_threshold(rng: np.random.Generator, img: np.ndarray, cos: np.ndarray, tol: float) -> Any:
    """A dedup threshold (or None) no pair's cosine is within ``tol`` of, identical rows aside."""
    same = (img[:, None, :] == img[None, :, :]).all(axis=-1)
    off = cos[~same]  # identical rows: duplicates at any threshold, with the slack
    for _ in range(6):
        thr = float(pick(rng, [*THRESHOLDS, rng.uniform(0.5, 1.0)]))
        if not np.any(np.abs(off - (thr - COS_SLACK)) < tol):
            return thr
    return None


def draw_case(seed: int, *, distinct: bool = False) -> Case:
    """A random request; ``distinct``: grid embeddings and continuous scores (few ties)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 61)) if rng.random() < 0.85 else int(rng.integers(0, 3))
    if distinct:
        n = max(n, 2)
    mode = "grid" if distinct or rng.random() < 0.3 else "dyadic"
    dedup: float | None = None if rng.random() < 0.25 else pick(rng, THRESHOLDS)
    if mode == "dyadic":  # exact cosines: any threshold is clear of them
        img, pos, neg, cos, exact_raw, star = dyadic_embeddings(rng, n, dedup)
        cos_tol = 0.0
    else:
        img, pos, neg, cos, exact_raw = grid_embeddings(rng, n, exact_copies=not distinct)
        star = []
        cos_tol = 5e-6

    if distinct:
        head = rng.uniform(0, 1, n) if rng.random() < 0.6 else None
    else:
        head_kind = pick(rng, [None, None, "quantised", "continuous"])
        head = {
            None: None,
            "quantised": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], n),
            "continuous": rng.uniform(0, 1, n),
        }[head_kind]
    if head is not None and star:
        head[star[-1]] = head[star[:-1]].min()
    widths = rng.choice(SIZES, n)
    heights = rng.choice(SIZES, n)

    lo = None if rng.random() < 0.6 else pick(rng, ASPECTS)
    hi = None if rng.random() < 0.6 else pick(rng, ASPECTS)
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    scale = pick(rng, [1.0, 5.0, 20.0]) if distinct else pick(rng, SCALES)
    min_relevance = pick(
        rng, [0.0, 0.0, 0.0, 0.5, 1.0, float(rng.uniform(0, 0.6)), "boundary", "boundary"]
    )
    if min_relevance == "boundary":  # exactly some candidate's S_clip: kept (>=)
        min_relevance = float(calibrated(scale, exact_raw)[rng.integers(n)]) if n else 0.5
    alpha, beta = pick(rng, WEIGHTS), pick(rng, WEIGHTS)
    gamma = pick(rng, WEIGHTS) if head is not None else 0.0
    if alpha == 0 and gamma == 0:
        alpha = pick(rng, WEIGHTS[2:])
    if mode == "grid" and dedup is not None:
        dedup = clear_threshold(rng, img, cos, cos_tol)
    fields = {
        "min_relevance": min_relevance,
        "clip_keep": None if rng.random() < 0.5 else int(rng.integers(1, n + 4)),
        "min_side": 0 if rng.random() < 0.6 else pick(rng, SIZES[:4]),
        "min_aspect": lo,
        "max_aspect": hi,
        "dedup_threshold": dedup,
        "top_n": int(pick(rng, [1, 2, rng.integers(1, n + 6), rng.integers(1, n + 6), 100])),
        "top_k": int(pick(rng, [1, 3, rng.integers(1, n + 6), rng.integers(1, n + 6), 100])),
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
        "logit_scale": scale,
    }
    if isinstance(fields["min_side"], float):
        fields["min_side"] = int(fields["min_side"])
    if star and rng.random() < 0.8:  # let the star reach dedup
        fields |= {"min_relevance": 0.0, "clip_keep": None, "top_n": 100}
        widths[star] = heights[star] = 150.0

    judge: Judge | None = None
    if rng.random() < 0.8:
        kinds = ["array", "scores", "scores"] if distinct else ["array", "list", "scores", "mutate"]
        kind = pick(rng, [*kinds, "raise"] if not distinct and rng.random() < 0.1 else kinds)
        if distinct:
            table = rng.uniform(0, 1, n)
        else:
            quantised = rng.random() < 0.6
            table = (
                rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], n) if quantised else rng.uniform(0, 1, n)
            )
            if n and rng.random() < 0.12:  # a score the judge should never return
                bad = rng.choice(n, size=min(n, int(rng.integers(1, 4))), replace=False)
                table[bad] = rng.choice([math.nan, math.inf, -math.inf, 1.5, -0.1], len(bad))
        failed: frozenset[int] = frozenset()
        if kind == "scores" and n:
            failed = frozenset(np.flatnonzero(rng.random(n) < rng.uniform(0, 0.5)).tolist())
        junk = pick(rng, [math.nan, math.inf, -1.0, 7.0, 0.5, None, "n/a"])
        judge = Judge(kind, table, failed, junk)

    return Case(
        seed, mode, img, pos, neg, cos, exact_raw, head, widths, heights, fields, judge, cos_tol
    )


# ---------------------------------------------------------------------------------------------
# the reference


@dataclass
class Expected:
    picks: list[int] = field(default_factory=list)
    dropped_at: list[str | None] = field(default_factory=list)
    reason: list[str | None] = field(default_factory=list)
    stages: list[tuple[str, int, int, int, bool]] = field(default_factory=list)
    clip: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rerank: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vlm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    final: np.ndarray = field(default_factory=lambda: np.zeros(0))
    asked: list[int] | None = None  # the judge's one call; None: not called
    vlm_calls: int = 0
    stage_error: bool = False
    # grid mode: a duplicate within rounding of two leaders may join either group, and which
    # member each group keeps (so the rest of the answer) may differ: only accounting is checked
    ambiguous: bool = False


def ranked(ids: list[int], score: np.ndarray) -> list[int]:
    """Score descending, ties to the lower input index."""
    return sorted(ids, key=lambda i: (-score[i], i))


def reference(case: Case, cfg: CascadeConfig, raw: np.ndarray) -> Expected:
    """The six stages of the module docstring, written out for a few dozen candidates."""
    n = len(raw)
    nan = np.full(n, np.nan)
    clip = calibrated(cfg.logit_scale, raw)
    head = case.head
    h = head if head is not None else np.zeros(n)
    s_rerank = cfg.alpha * clip + cfg.gamma * h
    exp = Expected(dropped_at=[None] * n, reason=[None] * n, clip=clip)
    exp.rerank, exp.vlm, exp.final = nan.copy(), nan.copy(), nan.copy()

    def drop(i: int, stage: str, why: str) -> None:
        assert exp.dropped_at[i] is None
        exp.dropped_at[i], exp.reason[i] = stage, why

    def report(stage: str, before: list[int], after: list[int], skipped: bool = False) -> None:
        exp.stages.append((stage, len(before), len(after), len(before) - len(after), skipped))

    # 1. clip: the relevance cut, then the clip_keep best by S_clip.
    relevant = []
    for i in range(n):
        if clip[i] < cfg.min_relevance:
            drop(i, "clip", "below_relevance")
        else:
            relevant.append(i)
    order = ranked(relevant, clip)
    keep = order if cfg.clip_keep is None else order[: cfg.clip_keep]
    for i in order[len(keep) :]:
        drop(i, "clip", "beyond_clip_keep")
    alive = sorted(keep)
    report("clip", list(range(n)), alive)

    # 2. heuristics: the first filter that fails names the reason.
    if cfg.min_side > 0 or cfg.min_aspect is not None or cfg.max_aspect is not None:
        assert case.widths is not None
        assert case.heights is not None
        nxt = []
        for i in alive:
            w, hh = float(case.widths[i]), float(case.heights[i])
            if min(w, hh) < cfg.min_side:
                drop(i, "heuristics", "too_small")
            elif (cfg.min_aspect is not None and w / hh < cfg.min_aspect) or (
                cfg.max_aspect is not None and w / hh > cfg.max_aspect
            ):
                drop(i, "heuristics", "aspect_ratio")
            else:
                nxt.append(i)
        report("heuristics", alive, nxt)
        alive = nxt
    else:
        report("heuristics", alive, alive, skipped=True)

    # 3. dedup: walk the rerank order; a candidate too close to a leader joins the group of the
    # most similar one (ties to the first leader), else it leads a new group, until top_n
    # leaders; the undecided rest leave at stage 4 as beyond_top_n, near duplicates or not. Each
    # group keeps its best member by the head score (else S_clip), ties to the lower index; the
    # others leave naming it.
    if cfg.dedup_threshold is not None:
        leaders: list[int] = []
        groups: dict[int, list[int]] = {}
        for i in ranked(alive, s_rerank):
            if len(leaders) >= cfg.top_n:
                break
            sims = [float(case.cos[i, k]) for k in leaders]
            if sims and max(sims) >= cfg.dedup_threshold - COS_SLACK:
                best = max(sims)
                groups[leaders[sims.index(best)]].append(i)
                near = [k for k, s in zip(leaders, sims, strict=True) if s >= best - case.cos_tol]
                exp.ambiguous |= len(near) > 1 and case.cos_tol > 0
            else:
                leaders.append(i)
                groups[i] = [i]
        for members in groups.values():
            kept, *rest = ranked(members, head if head is not None else clip)
            for i in rest:
                drop(i, "dedup", f"near_duplicate_of:{kept}")
        nxt = [i for i in alive if exp.dropped_at[i] is None]
        report("dedup", alive, nxt)
        alive = nxt
    else:
        report("dedup", alive, alive, skipped=True)

    # 4. rerank: the top_n best by alpha * S_clip + gamma * S_head.
    exp.rerank[alive] = s_rerank[alive]
    order = ranked(alive, s_rerank)
    top = order[: cfg.top_n]
    for i in order[cfg.top_n :]:
        drop(i, "rerank", "beyond_top_n")
    report("rerank", alive, top)

    # 5. vlm: one call with the top_n in rank order; failed candidates leave.
    judge = case.judge
    if cfg.beta == 0 or judge is None:
        exp.final[top] = s_rerank[top]
        report("vlm", top, top, skipped=True)
        judged = top
    else:
        failed: list[int] = []
        judged = top
        if top:
            exp.asked = list(top)
            if judge.kind == "raise":
                exp.stage_error = True
                return exp
            if judge.kind == "scores":
                failed = [i for i in top if i in judge.failed]
            judged = [i for i in top if i not in failed]
            if any(not 0 <= judge.table[i] <= 1 for i in judged):  # NaN fails too
                exp.stage_error = True
                return exp
            for i in judged:
                exp.vlm[i] = judge.table[i]
                exp.final[i] = cfg.alpha * clip[i] + cfg.beta * judge.table[i] + cfg.gamma * h[i]
            for i in failed:
                drop(i, "vlm", "vlm_failed: image unreadable")
        exp.vlm_calls = len(judged)
        report("vlm", top, judged)

    # 6. top_k by the final score.
    order = ranked(judged, exp.final)
    exp.picks = order[: cfg.top_k]
    for i in order[cfg.top_k :]:
        drop(i, "top_k", "beyond_top_k")
    report("top_k", judged, exp.picks)
    return exp


def config_is_valid(fields: dict[str, Any]) -> bool:
    """CascadeConfig's documented bounds, written out."""
    known = set(CascadeConfig.model_fields)
    if set(fields) - known:
        return False
    f = {name: info.default for name, info in CascadeConfig.model_fields.items()} | fields

    def real(x: Any, lo: float, hi: float = math.inf, *, open_lo: bool = False) -> bool:
        return (
            isinstance(x, int | float)
            and math.isfinite(x)
            and (x > lo if open_lo else x >= lo)
            and x <= hi
        )

    def integer(x: Any, lo: int) -> bool:
        return isinstance(x, int | float) and math.isfinite(x) and x == int(x) and x >= lo

    lo, hi = f["min_aspect"], f["max_aspect"]
    return (
        real(f["min_relevance"], 0, 1)
        and (f["clip_keep"] is None or integer(f["clip_keep"], 1))
        and integer(f["min_side"], 0)
        and (lo is None or real(lo, 0, open_lo=True))
        and (hi is None or real(hi, 0, open_lo=True))
        and (lo is None or hi is None or not real(lo, 0) or not real(hi, 0) or lo <= hi)
        and (f["dedup_threshold"] is None or real(f["dedup_threshold"], 0, 1, open_lo=True))
        and integer(f["top_n"], 1)
        and integer(f["top_k"], 1)
        and all(real(f[w], 0, MAX_WEIGHT) for w in ("alpha", "beta", "gamma"))
        and not (f["alpha"] == 0 and f["gamma"] == 0)
        and real(f["logit_scale"], 0, open_lo=True)
    )


BAD_FIELDS: list[dict[str, Any]] = [
    {"min_relevance": -0.01},
    {"min_relevance": 1.0001},
    {"min_relevance": math.nan},
    {"clip_keep": 0},
    {"min_side": -1},
    {"min_aspect": 0.0},
    {"max_aspect": -1.0},
    {"min_aspect": 1.5, "max_aspect": 4 / 3},
    {"dedup_threshold": 0.0},
    {"dedup_threshold": 1.01},
    {"top_n": 0},
    {"top_k": 0},
    {"top_n": 2.5},
    {"alpha": -0.5},
    {"beta": math.inf},
    {"gamma": MAX_WEIGHT * (1 + 1e-9)},
    {"alpha": 0.0, "gamma": 0.0},
    {"logit_scale": 0.0},
    {"logit_scale": -100.0},
    {"logit_scale": math.inf},
    {"top": 3},
]


FLOAT_POOL = [0.0, -0.0, 5e-324, 0.5, 1.0, 1.0 + 1e-12, 2.0, MAX_WEIGHT, MAX_WEIGHT + 1e-9, -1.0]
FLOAT_POOL += [math.nan, math.inf, -math.inf, None]
INT_POOL = [0, 1, 2, 2.0, 2.5, -1, 10**9, None]


def fuzzed(rng: np.random.Generator, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with one to three knobs set to values at or past their bounds."""
    out = dict(fields)
    for name in rng.choice(sorted(fields), size=int(rng.integers(1, 4)), replace=False):
        ints = ("clip_keep", "min_side", "top_n", "top_k")
        out[str(name)] = pick(rng, INT_POOL if name in ints else FLOAT_POOL)
    return out


def limits_refusal(cfg: CascadeConfig, n: int, limits: CascadeLimits) -> list[str]:
    """The knobs over a CascadeLimits ceiling, as its docstring describes them."""
    over = []
    if limits.max_candidates is not None and n > limits.max_candidates:
        over.append("max_candidates")
    if limits.max_top_n is not None and cfg.top_n > limits.max_top_n:
        over.append("max_top_n")
    if limits.max_top_k is not None and cfg.top_k > limits.max_top_k:
        over.append("max_top_k")
    if cfg.dedup_threshold is not None and limits.max_clip_keep is not None:
        survivors = n if cfg.clip_keep is None else cfg.clip_keep
        if survivors > limits.max_clip_keep:
            over.append("max_clip_keep")
    return over


# ---------------------------------------------------------------------------------------------
# checks


def run(case: Case, cfg: CascadeConfig, **overrides: Any) -> CascadeResult:
    args: dict[str, Any] = {
        "config": cfg,
        "widths": case.widths,
        "heights": case.heights,
        "head_scores": case.head,
        "vlm": case.judge,
    }
    args |= overrides
    return run_cascade(
        overrides.get("image_emb", case.img),
        case.pos,
        overrides.get("negative_emb", case.neg),
        **{k: v for k, v in args.items() if k not in ("image_emb", "negative_emb")},
    )


def assert_accounting(res: CascadeResult, n: int, what: str) -> None:
    st = res.stages
    assert [s.name for s in st] == list(STAGES), what
    assert st[0].n_in == n, what
    for prev, s in zip([None, *st], st, strict=False):
        assert s.n_in == s.n_kept + s.n_dropped, f"{what}: stage {s}"
        if prev is not None:
            assert s.n_in == prev.n_kept, f"{what}: stage {s} after {prev}"
        assert sum(d == s.name for d in res.candidates.dropped_at) == s.n_dropped, what
    assert len(res.picks) == len(set(res.picks)) == st[-1].n_kept, what
    assert all(isinstance(i, int) and 0 <= i < n for i in res.picks), what
    assert res.vlm_calls == int(np.sum(~np.isnan(res.candidates.vlm))), what


def assert_matches(res: CascadeResult, exp: Expected, case: Case) -> None:
    what = case.describe()
    c = res.candidates
    assert res.picks == exp.picks, what
    got_stages = [(s.name, s.n_in, s.n_kept, s.n_dropped, s.skipped) for s in res.stages]
    assert got_stages == exp.stages, what
    assert c.dropped_at == exp.dropped_at, what
    for i, (got, want) in enumerate(zip(c.reason, exp.reason, strict=True)):
        assert got == want, f"{what}: candidate {i}"
    np.testing.assert_array_equal(c.clip, exp.clip, err_msg=what)
    np.testing.assert_array_equal(c.rerank, exp.rerank, err_msg=what)
    np.testing.assert_array_equal(c.vlm, exp.vlm, err_msg=what)
    np.testing.assert_array_equal(c.final, exp.final, err_msg=what)
    if case.head is None:
        assert c.head is None
    else:
        np.testing.assert_array_equal(c.head, case.head, err_msg=what)
    assert res.vlm_calls == exp.vlm_calls, what


def bad_inputs(case: Case, cfg: CascadeConfig) -> list[tuple[str, dict[str, Any]]]:
    """Malformed variants of the request that run_cascade must refuse with a DataError."""
    n, out = case.n, list[tuple[str, dict[str, Any]]]()
    out.append(("no negatives", {"negative_emb": case.neg[:0]}))
    out.append(("float64 embeddings", {"image_emb": case.img.astype(np.float64)}))
    if n:
        out.append(("a non-unit row", {"image_emb": case.img * np.float32(1.01)}))
        nan_row = case.img.copy()
        nan_row[-1, 0] = np.nan
        out.append(("a NaN", {"image_emb": nan_row}))
        head = np.full(n, 0.5) if case.head is None else case.head.copy()
        head[-1] = pick(np.random.default_rng(case.seed), [1.01, -0.01, math.nan])
        out.append(("a head score outside [0, 1]", {"head_scores": head}))
    out.append(("head scores of the wrong length", {"head_scores": np.full(n + 1, 0.5)}))
    if cfg.gamma > 0:
        out.append(("gamma without head scores", {"head_scores": None}))
    if cfg.heuristics.filters_metadata:
        out.append(("filters without sizes", {"widths": None}))
        if n:
            w = case.widths.copy() if case.widths is not None else np.full(n, 100.0)
            w[0] = 0.0
            out.append(("a zero width", {"widths": w}))
    return out


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_cascade_is_the_plain_reference_on_random_requests(seed: int) -> None:
    case = draw_case(seed)
    rng = np.random.default_rng(seed + 10**6)
    what = case.describe()

    # A config outside its bounds is refused by the model, naming the field.
    worse = pick(rng, BAD_FIELDS)
    assert config_is_valid(case.fields), what
    assert not config_is_valid(case.fields | worse), worse
    with pytest.raises(ValidationError) as err:
        CascadeConfig(**(case.fields | worse))
    assert any(name in str(err.value) for name in worse), (worse, str(err.value))
    for _ in range(3):  # and accepted exactly when each value is within its documented bounds
        edge = fuzzed(rng, case.fields)
        if config_is_valid(edge):
            CascadeConfig(**edge)
        else:
            with pytest.raises(ValidationError):
                CascadeConfig(**edge)
    cfg = CascadeConfig(**case.fields)

    # A request over a ceiling is refused by check_limits, naming a knob that is over.
    def around(v: int) -> int | None:
        return None if rng.random() < 0.5 else max(1, v + int(rng.integers(-3, 4)))

    limits = CascadeLimits(
        max_candidates=around(case.n),
        max_clip_keep=around(case.n if cfg.clip_keep is None else cfg.clip_keep),
        max_top_n=around(cfg.top_n),
        max_top_k=around(cfg.top_k),
    )
    over = limits_refusal(cfg, case.n, limits)
    if over:
        with pytest.raises(DataError) as refused:
            check_limits(cfg, case.n, limits)
        assert any(name in str(refused.value) for name in over), (over, str(refused.value))
    else:
        check_limits(cfg, case.n, limits)

    # Malformed inputs: a DataError before the judge is asked anything.
    for label, change in bad_inputs(case, cfg):
        if case.judge is not None:
            case.judge.calls.clear()
        with pytest.raises(DataError):
            run(case, cfg, **change)
        assert case.judge is None or case.judge.calls == [], f"{what}: {label}"

    # The request itself, its arrays in any layout, its scores and sizes as arrays or lists.
    if case.judge is not None:
        case.judge.calls.clear()
    inputs: tuple[np.ndarray | None, ...] = (
        case.img,
        case.pos,
        case.neg,
        case.head,
        case.widths,
        case.heights,
    )
    before = [None if a is None else a.copy() for a in inputs]
    layout = pick(rng, ["C", "C", "F", "strided"])
    img = {"C": case.img, "F": np.asfortranarray(case.img)}.get(layout)
    if img is None:
        wide = np.zeros((case.n, 2 * case.img.shape[1]), np.float32)
        wide[:, 1::2] = case.img
        img = wide[:, 1::2]
    as_list = rng.random() < 0.3
    listed = {
        k: (v.tolist() if as_list and v is not None else v)
        for k, v in (("head_scores", case.head), ("widths", case.widths), ("heights", case.heights))
    }
    exp = reference(case, cfg, case.exact_raw)
    res: CascadeResult | None = None
    if exp.ambiguous:  # which candidates the judge is asked about depends on float32 rounding
        with contextlib.suppress(CascadeStageError):
            res = run(case, cfg, image_emb=img, **listed)
    elif exp.stage_error:  # never a ranking
        with pytest.raises(CascadeStageError) as failed:
            run(case, cfg, image_emb=img, **listed)
        assert failed.value.stage == "vlm", what
    else:
        res = run(case, cfg, image_emb=img, **listed)
    for a, b in zip(before, inputs, strict=True):
        assert (a is None and b is None) or (
            a is not None and b is not None and np.array_equal(a, b, equal_nan=True)
        ), what
    if res is not None:
        assert_accounting(res, case.n, what)
    if exp.ambiguous:
        return
    if case.judge is not None:
        assert case.judge.calls == ([] if exp.asked is None else [exp.asked]), what
    if res is None:
        return
    assert_matches(res, exp, case)
    out = json.loads(json.dumps(res.as_dict(), allow_nan=False))
    assert [r["reason"] for r in out["candidates"]] == exp.reason, what
    np.testing.assert_array_equal(res.candidates.clip_raw, case.exact_raw, err_msg=what)
    # The calibration is CLIP's two-way softmax over the best positive and best negative.
    for i in range(min(case.n, 8)):
        z = cfg.logit_scale * case.exact_raw[i]
        if abs(z) < 700:
            p = math.exp(z / 2) / (math.exp(z / 2) + math.exp(-z / 2))
            assert res.candidates.clip[i] == pytest.approx(p, rel=1e-12, abs=1e-300), what


def tie_free(case: Case, res: CascadeResult) -> bool:
    """No two candidates share a score, and dedup's choices are clear of float32 rounding."""
    c = res.candidates

    def distinct(col: np.ndarray | None) -> bool:
        if col is None:
            return True
        v = col[~np.isnan(col)]
        return len(np.unique(v)) == len(v)

    if not all(distinct(col) for col in (c.clip, c.head, c.rerank, c.final)):
        return False
    for i in range(case.n):  # the most similar kept image is clear of its runner-up
        row = np.sort(np.delete(case.cos[i], i))
        row = row[row > 0.49]
        if np.any(np.diff(row) < 1e-5):
            return False
    return True


@pytest.mark.parametrize("seed", range(PERM_SEEDS))
def test_permuting_the_candidates_permutes_the_answer(seed: int) -> None:
    for attempt in range(10):  # redraw until no ties: ties go to the lower index
        case = draw_case(10**7 + 100 * seed + attempt, distinct=True)
        cfg = CascadeConfig(**case.fields)
        res = run(case, cfg)
        if tie_free(case, res):
            break
    else:
        pytest.fail(f"no tie-free case in 10 draws from seed {seed}")
    what = case.describe()
    old_of_new = np.random.default_rng(seed).permutation(case.n)
    new_of_old = np.argsort(old_of_new)
    judge = None if case.judge is None else case.judge.permuted(old_of_new, new_of_old)
    assert case.widths is not None
    assert case.heights is not None
    perm = run(
        case,
        cfg,
        image_emb=case.img[old_of_new],
        head_scores=None if case.head is None else case.head[old_of_new],
        widths=case.widths[old_of_new],
        heights=case.heights[old_of_new],
        vlm=judge,
    )
    assert perm.picks == [int(new_of_old[i]) for i in res.picks], what
    counts = [(s.name, s.n_in, s.n_kept, s.n_dropped, s.skipped) for s in res.stages]
    assert [(s.name, s.n_in, s.n_kept, s.n_dropped, s.skipped) for s in perm.stages] == counts
    assert perm.vlm_calls == res.vlm_calls, what
    c, pc = res.candidates, perm.candidates
    for i in range(case.n):
        j = int(new_of_old[i])
        why = c.reason[i]
        if why is not None and why.startswith("near_duplicate_of:"):
            why = f"near_duplicate_of:{new_of_old[int(why.rpartition(':')[2])]}"
        assert (pc.dropped_at[j], pc.reason[j]) == (c.dropped_at[i], why), f"{what}: {i} -> {j}"
    for col in ("clip_raw", "clip", "rerank", "vlm", "final"):
        np.testing.assert_array_equal(getattr(pc, col)[new_of_old], getattr(c, col), err_msg=col)
    if judge is not None and case.judge is not None:
        assert [[int(old_of_new[k]) for k in call] for call in judge.calls] == case.judge.calls


# ---------------------------------------------------------------------------------------------
# found by the random test


def test_a_failed_candidates_non_numeric_placeholder_is_not_read() -> None:
    img = np.eye(4, dtype=np.float32)
    pos, neg = img[:1].copy(), img[3:].copy()
    cfg = CascadeConfig(top_n=3, top_k=3, dedup_threshold=None)

    def judge(idx: np.ndarray) -> VlmScores:
        return VlmScores(["n/a", *[0.5] * (len(idx) - 1)], {int(idx[0]): "image unreadable"})

    res = run_cascade(img, pos, neg, config=cfg, vlm=judge)
    assert res.candidates.reason[0] == "vlm_failed: image unreadable"
    assert res.vlm_calls == 2


def test_failed_candidates_are_named_by_their_indices() -> None:
    """A float key (3.7) named candidate 3 failed; a bool named candidate 1. Both are refused."""
    img = np.eye(4, dtype=np.float32)
    pos, neg = img[:1].copy(), img[3:].copy()
    cfg = CascadeConfig(top_n=3, top_k=3, dedup_threshold=None)
    for key in (0.0, True, "0"):

        def judge(idx: np.ndarray, key: object = key) -> VlmScores:
            return VlmScores([0.5] * len(idx), {key: "unreadable"})  # type: ignore[dict-item]

        with pytest.raises(CascadeStageError, match="non-indices"):
            run_cascade(img, pos, neg, config=cfg, vlm=judge)
