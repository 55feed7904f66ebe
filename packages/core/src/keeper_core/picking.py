"""Keep, alternate or reject: the decision for every shot of a grouped, ranked photo library.

The pick frame (one row per image: the embedding table's columns plus grouping's) arrives
grouped into bursts/scenes (``group``), with duplicates marked (``duplicate_of``: the row position of the
copy it duplicates, or -1; ``duplicate_kind``: "exact" or "near") and quality features. A
registered ranker, or ``zero_shot_scores`` when there is none, scores it; ``rank_in_groups``
turns scores into a within-group softmax and ranks; ``decide`` says what to do with each shot
and why, in words and numbers a photographer reads::

    ranked = rank_in_groups(frame, zero_shot_scores(frame))   # label outputs ZERO_SHOT_RULE
    picks = decide(ranked, PickConfig())   # + decision, reasons, rating, label

Robust sigma. Quality evidence is stated relative to the group: a feature's deviation from the
median of the group's non-duplicate shots, in robust sigmas. A group of four or more uses its
own spread (1.4826 x MAD), floored by the corpus-wide spread: 1.4826 x the median absolute
deviation from their group's median over every non-duplicate shot of every group of two or
more (the pooled within-group MAD). Groups of two or three use that pooled spread alone:
their own MAD is not an estimate of anything (a pair's MAD is half its one difference, so
neither shot could ever be more than 0.67 sigma off). A fixed floor per feature
(``SIGMA_FLOOR``) keeps a library of identical frames from calling rounding noise "5 sigma".

Decisions (per group):

- Duplicates (``duplicate_of >= 0``) are rejected: "exact duplicate of IMG_0012.jpg", or
  "near duplicate of IMG_0012.jpg (cosine 0.97)" when the frame has a ``duplicate_cosine``
  column, naming the copy that stays in competition (a chain of duplicates is followed to it).
  File names are widened to "folder/name" where two images share a name.
- Exactly one keeper: the best-ranked non-duplicate. A group whose every shot is a duplicate
  keeps none: the kept copies compete in their own groups.
- A single shot (the group's only non-duplicate) is never rejected: it is "keep", or
  "alternate" when it fails an absolute check (highlights or shadows clipped at or above
  ``clip_*_reject``, blockiness at or above ``blockiness_reject``), the reasons saying why it
  was demoted. A keeper of a larger group that fails such a check stays the keeper (it is the
  best that moment has) and carries the failure among its reasons.
- Alternates: the next-ranked non-duplicates, best first and at most ``alternates`` of them,
  whose prob is at least ``alternate_min_prob_ratio`` x the keeper's and which have no flaw
  the keeper lacks (no sigma reason; no absolute failure the keeper does not share).
- Every other shot is rejected. Its reasons give the evidence against it (sharpness, noise or
  brightness at least ``reject_sigma`` robust sigmas worse than its group; clipping or JPEG
  blocking over the absolute thresholds) and always the ranking fact, e.g.
  "ranked 3 of 5 (p 0.08 vs keeper 0.61)".

``rating`` and ``label`` map each decision to ``xmp:Rating`` and ``xmp:Label`` (``PickConfig``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keeper_core.errors import DataError
from keeper_core.scoring import check_scores

#: What every output says when shots were ranked without a trained ranker.
ZERO_SHOT_RULE = (
    "zero-shot rule (quality features, no trained ranker): sharpness, minus noise, exposure, "
    "clipping and JPEG-blocking penalties"
)
Decision = Literal["keep", "alternate", "reject"]
DECISIONS: tuple[Decision, ...] = ("keep", "alternate", "reject")
#: Lightroom Classic's default colour label set: the values its xmp:Label colours.
LIGHTROOM_LABELS = ("Red", "Yellow", "Green", "Blue", "Purple")
#: Optional column: cosine similarity of a near duplicate to its kept copy (NaN when unknown).
SIMILARITY_COLUMN = "duplicate_cosine"
#: Quality features the zero-shot score reads.
SCORE_FEATURES = ("sharpness", "noise", "brightness", "clip_bright", "clip_dark", "blockiness")
#: Quality features the decision's reasons read.
REASON_FEATURES = ("sharpness", "brightness", "noise", "clip_bright", "clip_dark", "blockiness")
#: Smallest robust sigma per feature, in the feature's units: differences below these are
#: re-encode/resample jitter, not evidence. sharpness is log(1 + var(Laplacian)): 0.1 is a 10 %
#: change of the variance; brightness 0.01 is ~2.5 grey levels; noise 0.001 is ~0.25 grey
#: levels; blockiness 0.02 is well inside the 1.0-1.2 range of clean photos.
SIGMA_FLOOR = {"sharpness": 0.1, "brightness": 0.01, "noise": 0.001, "blockiness": 0.02}
#: Groups this large (non-duplicates) estimate their own spread; smaller ones use the pooled one.
OWN_SPREAD_MIN = 4
#: Zero-shot score weights (formula: ``zero_shot_scores``). Noise is penalised because added
#: noise raises the Laplacian variance (white noise of std s adds 20 * (255 s)^2), so
#: sharpness alone prefers the noisy frame; at weight 1 it also demotes clean shots in groups
#: of blurred ones (blur lowers the measured noise). Exposure is penalised because a gain g
#: multiplies the Laplacian variance by g^2: sharpness alone prefers the overexposed frame.
#: 0.2 of mean brightness, or 5 points of clipping, away from the group median cost as much as
#: one robust sigma of sharpness. Chosen on keeper_core.synthetic corpora, all 17 photos: top-1
#: (the clean shot ranked first) 0.87 on seed 0 (400 series, tuned on), 0.83 on seed 1 (300,
#: consulted while choosing) and 0.84 on seed 2 (300, held out); sharpness alone 0.48 / 0.49 /
#: 0.57; random 0.32.
NOISE_WEIGHT, BLOCK_WEIGHT, EXPOSURE_UNIT, CLIP_UNIT = 0.5, 0.5, 0.2, 0.05
_MAD_TO_STD = 1.4826  # median of |N(0, 1)| is 0.6745
_MAX_LISTED = 10

Rating = Annotated[int, Field(ge=-1, le=5)]
_DEFAULT_RATINGS: dict[Decision, int] = {"keep": 3, "alternate": 2, "reject": -1}
_DEFAULT_LABELS: dict[Decision, str | None] = {
    "keep": "Green",
    "alternate": "Yellow",
    "reject": "Red",
}


class PickConfig(BaseModel):
    """How ``decide`` turns ranks into keep / alternate / reject, and how they are written.

    Attributes:
        alternates: at most this many alternates per group: the next-ranked shots close to the
            keeper (0 = keepers and rejects only).
        alternate_min_prob_ratio: an alternate's prob must be at least this times the keeper's
            (0.5 with zero-shot scores: a score within ln 2 = 0.69 of the keeper's, the score's
            unit being one robust sigma of sharpness).
        reject_sigma: sharpness, noise or brightness this many robust sigmas worse than the
            median of its group is a reason (and bars the shot from being an alternate).
        clip_bright_reject: a fraction of blown highlights (luma >= 253/255) at or above this is
            a reason ("highlights clipped 14 %").
        clip_dark_reject: the same for crushed shadows (luma <= 2/255). Higher than the
            highlights' default: night and silhouette shots crush blacks on purpose, and 5 % of
            clean photos in the synthetic benchmark corpus have 8.6 % or more.
        blockiness_reject: blockiness at or above this is a reason ("JPEG blocking"). Clean
            photos measure 1.0-1.2; heavy compression 1.5 and more.
        ratings: decision -> ``xmp:Rating`` (-1 = rejected in Lightroom, 0 = unrated, 1-5
            stars). Decisions not given keep their default (keep 3, alternate 2, reject -1);
            they must not rate a reject above an alternate or an alternate above a keeper.
        labels: decision -> ``xmp:Label``: one of Lightroom's colour labels (``LIGHTROOM_LABELS``)
            or None for no label. Decisions not given keep their default (Green, Yellow, Red).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    alternates: int = Field(default=2, ge=0)
    alternate_min_prob_ratio: float = Field(default=0.5, gt=0, le=1)
    reject_sigma: float = Field(default=2.5, gt=0)
    clip_bright_reject: float = Field(default=0.10, gt=0, le=1)
    clip_dark_reject: float = Field(default=0.20, gt=0, le=1)
    blockiness_reject: float = Field(default=1.5, gt=1)
    ratings: dict[Decision, Rating] = Field(default_factory=lambda: dict(_DEFAULT_RATINGS))
    labels: dict[Decision, str | None] = Field(default_factory=lambda: dict(_DEFAULT_LABELS))

    @field_validator("ratings")
    @classmethod
    def _complete_ratings(cls, v: dict[Decision, int]) -> dict[Decision, int]:
        return {d: v.get(d, _DEFAULT_RATINGS[d]) for d in DECISIONS}

    @field_validator("labels")
    @classmethod
    def _complete_labels(cls, v: dict[Decision, str | None]) -> dict[Decision, str | None]:
        bad = {d: x for d, x in v.items() if x is not None and x not in LIGHTROOM_LABELS}
        if bad:
            raise ValueError(f"{bad} not among Lightroom's labels {list(LIGHTROOM_LABELS)} or None")
        return {d: v.get(d, _DEFAULT_LABELS[d]) for d in DECISIONS}

    @model_validator(mode="after")
    def _ordered_ratings(self) -> PickConfig:
        r = self.ratings
        if not r["keep"] >= r["alternate"] >= r["reject"]:
            raise ValueError(f"ratings must satisfy keep >= alternate >= reject, got {r}")
        return self


# --------------------------------------------------------------------------- frame checks


def _require(frame: pd.DataFrame, columns: Sequence[str], who: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{who}: the frame lacks columns {missing}")


def _finite(frame: pd.DataFrame, column: str, who: str) -> np.ndarray:
    try:
        x = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as e:
        raise DataError(f"{who}: column {column!r} is not numeric ({e})") from None
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise DataError(
            f"{who}: {bad.size} non-finite {column!r} value(s), rows {bad[:_MAX_LISTED].tolist()}",
            rows=bad.tolist(),
        )
    return x


def _group_codes(frame: pd.DataFrame, who: str) -> np.ndarray:
    """Group ids -> 0..G-1 codes in sorted order of the ids (so row order never matters)."""
    codes, _ = pd.factorize(frame["group"], sort=True)
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        raise DataError(
            f"{who}: missing 'group' in rows {bad[:_MAX_LISTED].tolist()}", rows=bad.tolist()
        )
    return np.asarray(codes, dtype=np.int64)


def _duplicate_roots(frame: pd.DataFrame, who: str) -> np.ndarray:
    """``duplicate_of`` as positions, chains followed to the copy that is not a duplicate.

    -1 for non-duplicates. Raises DataError for a target out of range, a row naming itself, or
    a cycle.
    """
    n = len(frame)
    if "duplicate_of" not in frame.columns:
        return np.full(n, -1, dtype=np.int64)
    raw = frame["duplicate_of"]
    if raw.isna().any():
        raise DataError(f"{who}: 'duplicate_of' has missing values (use -1 for none)")
    try:
        values = raw.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{who}: 'duplicate_of' is not numeric ({e})") from None
    dup = values.astype(np.int64)
    bad = np.flatnonzero((dup != values) | (dup < -1) | (dup >= n) | (dup == np.arange(n)))
    if bad.size:
        raise DataError(
            f"{who}: 'duplicate_of' must be -1 or another row's position (0..{n - 1}); "
            f"rows {bad[:_MAX_LISTED].tolist()} are not",
            rows=bad.tolist(),
        )
    return duplicate_roots(dup, who)


def duplicate_roots(dup: np.ndarray, who: str = "duplicate_of") -> np.ndarray:
    """Marks (-1, or another row's position) followed to the row each chain ends at: the copy
    that stays in competition (an export marked near a byte copy, itself marked exact to the
    photo, reaches the photo).

    Raises:
        DataError: the marks form a cycle.
    """
    root = dup.copy()
    # Each pass moves every chain one link on; a chain longer than n rows is a cycle.
    for _ in range(len(dup) + 1):
        nxt = np.where(root >= 0, dup[np.maximum(root, 0)], -1)
        step = (root >= 0) & (nxt >= 0)
        if not step.any():
            return root
        root = np.where(step, nxt, root)
    cyc = np.flatnonzero(root >= 0)
    raise DataError(f"{who}: 'duplicate_of' has a cycle through rows {cyc[:_MAX_LISTED].tolist()}")


# --------------------------------------------------------------------------- robust spread


def _robust(
    x: np.ndarray, codes: np.ndarray, ref: np.ndarray, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the median of its group's reference rows, and the group's robust sigma.

    A group without reference rows (all duplicates) takes its median over all its rows.
    """
    by = pd.Series(codes)
    med = pd.Series(np.where(ref, x, np.nan)).groupby(by).transform("median").to_numpy()
    med_all = pd.Series(x).groupby(by).transform("median").to_numpy()
    med = np.where(np.isnan(med), med_all, med)
    dev = np.abs(x - med)
    n_ref = pd.Series(ref).groupby(by).transform("sum").to_numpy()
    own = pd.Series(np.where(ref, dev, np.nan)).groupby(by).transform("median").to_numpy()
    own = np.where(n_ref >= OWN_SPREAD_MIN, _MAD_TO_STD * np.nan_to_num(own), 0.0)
    pool = ref & (n_ref >= 2)
    pooled = _MAD_TO_STD * float(np.median(dev[pool])) if pool.any() else 0.0
    return med, np.maximum(np.maximum(own, pooled), floor)


def _deviations(
    frame: pd.DataFrame, features: Sequence[str], codes: np.ndarray, ref: np.ndarray, who: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per feature: each row's deviation from its group's median, and the group's robust sigma."""
    out = {}
    for f in features:
        x = _finite(frame, f, who)
        med, sigma = _robust(x, codes, ref, SIGMA_FLOOR.get(f, 0.0))
        out[f] = (x - med, sigma)
    return out


# --------------------------------------------------------------------------- scoring, ranking


def zero_shot_scores(frame: pd.DataFrame) -> np.ndarray:
    """Scores shots from their quality features alone, for groups with no trained ranker.

    ``score = z(sharpness) - 0.5 * max(z(noise), 0) - 0.5 * max(z(blockiness), 0)
    - |d(brightness)| / 0.2 - (max(d(clip_bright), 0) + max(d(clip_dark), 0)) / 0.05``,
    where ``z`` is the robust z-score within the group (module docstring) and ``d`` the plain
    deviation from the group's median. Brightness and clipping are not in sigmas: their spread
    within a burst is often near 0 (most groups clip nothing), so a slight difference would
    count as many sigma. Exposure is two-sided (the group's median exposure is taken as the
    intended one); the other penalties are one-sided: blur also lowers the measured noise, and
    underexposure the blown highlights, so a bonus for "less than the group" would reward
    those failures. Scores are comparable only within a group (in sigmas of sharpness), and do
    not change when a constant is added to a feature across a group. Duplicates
    (``duplicate_of >= 0``, if the column is present) are scored but left out of the medians.

    Outputs ranked this way must say so: ``ZERO_SHOT_RULE``.

    Args:
        frame: the pick frame: ``group`` and the ``SCORE_FEATURES`` columns.

    Returns:
        A float64 array, one score per row.

    Raises:
        DataError: a column is missing, a feature is not finite, a group id is missing, or
            ``duplicate_of`` is malformed.
    """
    who = "zero_shot_scores"
    _require(frame, ("group", *SCORE_FEATURES), who)
    if len(frame) == 0:
        return np.zeros(0)
    codes = _group_codes(frame, who)
    ref = _duplicate_roots(frame, who) < 0
    dev = _deviations(frame, SCORE_FEATURES, codes, ref, who)
    z = {f: dev[f][0] / dev[f][1] for f in ("sharpness", "noise", "blockiness")}
    clip = np.maximum(dev["clip_bright"][0], 0.0) + np.maximum(dev["clip_dark"][0], 0.0)
    return np.asarray(
        z["sharpness"]
        - NOISE_WEIGHT * np.maximum(z["noise"], 0.0)
        - BLOCK_WEIGHT * np.maximum(z["blockiness"], 0.0)
        - np.abs(dev["brightness"][0]) / EXPOSURE_UNIT
        - clip / CLIP_UNIT,
        dtype=np.float64,
    )


def rank_in_groups(frame: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """Ranks the shots of every group by score.

    ``prob`` is the softmax of the scores over a group's non-duplicate shots (it sums to 1 over
    them); duplicates (``duplicate_of >= 0``, if the column is present) get prob 0 and rank
    after every non-duplicate of their group. Equal scores rank by ``image_uri``, so the result
    does not depend on row order. A group of duplicates only has prob 0 everywhere.

    Args:
        frame: the pick frame: ``group``, ``image_uri`` and optionally ``duplicate_of``.
        scores: one finite score per row (a ranker's logits, or ``zero_shot_scores``).

    Returns:
        A copy of ``frame`` (same index and row order) with ``score`` (float64), ``prob``
        (float64) and ``rank`` (int64, 1 = best in its group) set.

    Raises:
        DataError: a column is missing, ``scores`` is not one finite number per row, or
            ``duplicate_of`` is malformed.
    """
    who = "rank_in_groups"
    _require(frame, ("group", "image_uri"), who)
    n = len(frame)
    s = check_scores(scores, "scores", n=n)
    out = frame.copy()
    if n == 0:
        out["score"], out["prob"], out["rank"] = s, s, np.zeros(0, dtype=np.int64)
        return out
    codes = _group_codes(frame, who)
    dup = _duplicate_roots(frame, who) >= 0
    by = pd.Series(codes)
    top = pd.Series(np.where(dup, -np.inf, s)).groupby(by).transform("max").to_numpy()
    # exp(s - max) <= 1: no overflow whatever the logit scale; all-duplicate groups give 0.
    e = np.where(dup, 0.0, np.exp(np.where(dup, 0.0, s - np.where(np.isinf(top), 0.0, top))))
    total = pd.Series(e).groupby(by).transform("sum").to_numpy()
    prob = np.divide(e, total, out=np.zeros(n), where=total > 0)

    uri_codes, _ = pd.factorize(frame["image_uri"].astype(str), sort=True)
    # lexsort: the last key is the primary one.
    order = np.lexsort((np.arange(n), uri_codes, -s, dup, codes))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = pd.Series(codes[order]).groupby(codes[order]).cumcount().to_numpy() + 1
    out["score"], out["prob"], out["rank"] = s, prob, rank
    return out


# --------------------------------------------------------------------------- decisions


def display_names(uris: Sequence[str]) -> list[str]:
    """Short names for reasons: the file name, or "folder/name" where file names collide."""
    parts = [str(u).rstrip("/").split("/") for u in uris]
    base = [p[-1] for p in parts]
    counts = Counter(base)  # a dict: a pandas lookup per row cost ~10 us (10 s at 1M photos)
    return [b if counts[b] == 1 else "/".join(p[-2:]) for b, p in zip(base, parts, strict=True)]


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def _absolute_flaws(i: int, x: dict[str, np.ndarray], config: PickConfig) -> list[tuple[str, str]]:
    """(check name, reason) for each absolute threshold row i fails."""
    flaws = []
    if x["clip_bright"][i] >= config.clip_bright_reject:
        flaws.append(("clip_bright", f"highlights clipped {_pct(x['clip_bright'][i])}"))
    if x["clip_dark"][i] >= config.clip_dark_reject:
        flaws.append(("clip_dark", f"shadows clipped {_pct(x['clip_dark'][i])}"))
    if x["blockiness"][i] >= config.blockiness_reject:
        flaws.append(("blockiness", f"JPEG blocking (blockiness {x['blockiness'][i]:.1f})"))
    return flaws


def _sigma_flaws(i: int, z: dict[str, np.ndarray], limit: float) -> list[str]:
    """Reasons for each feature of row i at least ``limit`` robust sigmas worse than its group."""
    flaws = []
    if z["sharpness"][i] <= -limit:
        flaws.append(f"sharpness {-z['sharpness'][i]:.1f} sigma below its group")
    if z["noise"][i] >= limit:
        flaws.append(f"noisier than its group (noise {z['noise'][i]:.1f} sigma above)")
    b = z["brightness"][i]
    if abs(b) >= limit:
        word = "darker" if b < 0 else "brighter"
        side = "below" if b < 0 else "above"
        flaws.append(f"{word} than its group (brightness {abs(b):.1f} sigma {side})")
    return flaws


def decide(frame: pd.DataFrame, config: PickConfig) -> pd.DataFrame:
    """Decides keep / alternate / reject for every shot, with reasons (rules: module docstring).

    Args:
        frame: a ranked pick frame: ``group``, ``duplicate_of``, ``prob``, ``rank``,
            ``image_uri``, the ``REASON_FEATURES``, and optionally ``duplicate_kind`` and
            ``duplicate_cosine``. ``duplicate_of`` holds row positions in this frame.
        config: the thresholds, ratings and labels.

    Returns:
        A copy of ``frame`` (same index and row order) with ``decision`` ("keep", "alternate"
        or "reject"), ``reasons`` (a non-empty list of str for every row), ``rating`` (int,
        from ``config.ratings``) and ``label`` (str or None, from ``config.labels``).

    Raises:
        DataError: a column is missing, a value is not finite, or ``duplicate_of`` is
            malformed.
    """
    who = "decide"
    _require(frame, ("group", "duplicate_of", "prob", "rank", "image_uri", *REASON_FEATURES), who)
    n = len(frame)
    codes = _group_codes(frame, who) if n else np.zeros(0, dtype=np.int64)
    root = _duplicate_roots(frame, who)
    ref = root < 0
    prob = _finite(frame, "prob", who)
    rank = _finite(frame, "rank", who)
    x = {f: _finite(frame, f, who) for f in REASON_FEATURES}
    dev = _deviations(frame, ("sharpness", "noise", "brightness"), codes, ref, who)
    z = {f: d / sigma for f, (d, sigma) in dev.items()}
    uris = frame["image_uri"].astype(str).tolist()
    names = display_names(uris)
    kinds = frame["duplicate_kind"].tolist() if "duplicate_kind" in frame.columns else [None] * n
    cosine = (
        frame[SIMILARITY_COLUMN].to_numpy(dtype=np.float64, na_value=np.nan)
        if SIMILARITY_COLUMN in frame.columns
        else np.full(n, np.nan)
    )

    decision: list[Decision] = ["reject"] * n
    reasons: list[list[str]] = [[] for _ in range(n)]
    uri_codes, _ = pd.factorize(pd.Series(uris), sort=True)
    order = np.lexsort((uri_codes, rank, ~ref, codes))
    starts = np.flatnonzero(np.r_[True, codes[order][1:] != codes[order][:-1]])
    for lo, hi in zip(starts, [*starts[1:], n], strict=True):
        members = order[lo:hi].tolist()
        for i in members:
            if not ref[i]:
                decision[i] = "reject"
                reasons[i] = [_duplicate_reason(kinds[i], names[root[i]], cosine[i])]
        cands = [i for i in members if ref[i]]  # non-duplicates, best first
        if cands:
            _decide_group(cands, prob, x, z, config, decision, reasons)

    out = frame.copy()
    out["decision"] = decision
    out["reasons"] = pd.Series(reasons, index=frame.index, dtype=object)
    out["rating"] = np.array([config.ratings[d] for d in decision], dtype=np.int64)
    out["label"] = pd.Series([config.labels[d] for d in decision], index=frame.index, dtype=object)
    return out


def _duplicate_reason(kind: object, name: str, cosine: float) -> str:
    if kind == "exact":
        return f"exact duplicate of {name}"
    if np.isfinite(cosine):
        return f"near duplicate of {name} (cosine {cosine:.2f})"
    return f"near duplicate of {name}"


def _decide_group(
    cands: list[int],
    prob: np.ndarray,
    x: dict[str, np.ndarray],
    z: dict[str, np.ndarray],
    config: PickConfig,
    decision: list[Decision],
    reasons: list[list[str]],
) -> None:
    """Decides the non-duplicates of one group, ``cands`` best first."""
    keeper = cands[0]
    keeper_flaws = _absolute_flaws(keeper, x, config)
    if len(cands) == 1:
        if keeper_flaws:
            decision[keeper] = "alternate"
            reasons[keeper] = [
                "single shot: demoted to alternate, never rejected as the only copy",
                *(r for _, r in keeper_flaws),
            ]
        else:
            decision[keeper] = "keep"
            reasons[keeper] = ["single shot"]
        return

    pk = prob[keeper]
    sharpest = x["sharpness"][keeper] >= max(x["sharpness"][i] for i in cands)
    best = f"best of {len(cands)}: " + ("sharpest of its group, " if sharpest else "")
    decision[keeper] = "keep"
    reasons[keeper] = [
        f"{best}p {pk:.2f}",
        *_sigma_flaws(keeper, z, config.reject_sigma),
        *(r for _, r in keeper_flaws),
    ]
    shared = {name for name, _ in keeper_flaws}
    n_alt = 0
    for r, i in enumerate(cands[1:], start=2):
        sigma = _sigma_flaws(i, z, config.reject_sigma)
        absolute = _absolute_flaws(i, x, config)
        fact = f"ranked {r} of {len(cands)} (p {prob[i]:.2f} vs keeper {pk:.2f})"
        close = prob[i] >= config.alternate_min_prob_ratio * pk
        clean = not sigma and all(name in shared for name, _ in absolute)
        if close and clean and n_alt < config.alternates:
            n_alt += 1
            decision[i] = "alternate"
            reasons[i] = [f"close to the keeper: {fact}", *(r for _, r in absolute)]
            continue
        decision[i] = "reject"
        reasons[i] = [*sigma, *(r for _, r in absolute), fact]
        if close and clean:
            reasons[i].append(f"as close as the alternates, but {config.alternates} are enough")
