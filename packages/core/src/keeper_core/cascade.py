"""The selection cascade: cheap stages first, the expensive VLM judge only on the few left.

``run_cascade`` is the one implementation that ``POST /v1/select`` (Serve) and ``keeper select``
(Ray Data) call. Six stages, in order, each accounting for every candidate it receives::

    clip -> heuristics -> dedup -> rerank -> vlm -> top_k

1. ``clip``: calibrated CLIP relevance (below) for all N; drops ``below_relevance``
   (``S_clip < min_relevance``) and, of the rest, ``beyond_clip_keep``.
2. ``heuristics``: minimum side and aspect ratio (``too_small``, ``aspect_ratio``); skipped
   when none is configured.
3. ``dedup``: greedy near-duplicate grouping by embedding cosine, walking the candidates in the
   rerank order (stage 4's): each joins the group of the most similar earlier leader (cosine
   >= ``dedup_threshold``) or leads a new group, until ``top_n`` groups are found. Each group
   keeps its best member by the head score when given, else by ``S_clip``; the others leave as
   ``near_duplicate_of:<kept>``: near duplicates match a query almost equally, so quality, not
   relevance, should decide. The candidates after the ``top_n``-th leader rank below every group
   and are left to stage 4 (``beyond_top_n``), so dedup compares at most N x ``top_n`` pairs
   whatever N is. Skipped when ``dedup_threshold`` is None.
4. ``rerank``: the ``top_n`` best by ``alpha * S_clip + gamma * S_head`` (``beyond_top_n``).
5. ``vlm``: one call of the ``vlm`` callback with the top-N indices; ``S = alpha * S_clip +
   beta * S_vlm + gamma * S_head``; a candidate the judge could not judge (a batch job's
   unreadable image, or one the model gave no finite score) leaves with ``vlm_failed: <why>``
   and is not counted in ``vlm_calls``.
   Skipped (final = stage-4 score) when ``beta == 0`` or no callback is given.
6. ``top_k``: the ``top_k`` best by the final score (``beyond_top_k``).

Every ranking is by score descending, ties to the lower input index, so a result is a pure
function of its inputs. ``stages`` reports ``n_in == n_kept + n_dropped`` for each stage,
``n_in`` of each stage equals ``n_kept`` of the one before, and the first ``n_in`` is N.

Calibration of CLIP relevance. With ``c+`` the best cosine of an image to the query's positive
prompts and ``c-`` the best to its negative prompts (``scoring.relevance_score`` gives the raw
``c+ - c-``)::

    S_clip = sigmoid(logit_scale * (c+ - c-)) = softmax(logit_scale * [c+, c-])[0]

which is CLIP's own zero-shot classifier choosing between the best positive and the best
negative prompt: the probability its contrastive loss was trained to produce, at the model's
learned logit scale (100 for OpenAI and LAION ViT-B-32; read ``model.logit_scale.exp()`` for
others). It lies in [0, 1] and means the same thing in every request, so ``min_relevance`` is a
fixed cut (0.5 = "matches the query better than the negatives") and ``alpha`` weighs a
probability against the VLM's ``P(yes) / (P(yes) + P(no))``, another two-way choice. The
alternatives fail that: per-request min-max scaling gives the best image of any request 1.0,
however irrelevant, so scores and cuts are not comparable across requests; raw cosines are not
in [0, 1] and their spread is model-specific (~0.05-0.1 between a match and a miss on
ViT-B-32), so no fixed weight balances them against a probability. The negative side is
required: without it ``sigmoid(100 * c+)`` is ~1 for every image. A query without negatives
passes the embedding of a neutral anchor prompt (``NEUTRAL_PROMPT``, "a photo"); appending the
anchor to a query's own negatives too keeps an image that is neither wanted nor unwanted from
scoring 0.5.

SigLIP-style models (a learned ``logit_bias``) use the same formula at their own scale. SigLIP is
trained to give each image-text pair an independent probability ``sigmoid(l)``, with
``l = scale * cos + bias``. Given that an image matches exactly one of two prompts, the
probability that it is the first is ``sigmoid(l+)(1 - sigmoid(l-))`` over that plus
``sigmoid(l-)(1 - sigmoid(l+))``, which is ``sigmoid(l+ - l-) = sigmoid(scale * (c+ - c-))``:
the bias cancels, and ``S_clip`` is the model's own two-way probability for CLIP and SigLIP alike.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keeper_core.errors import DataError, KeeperError, brief
from keeper_core.scoring import check_scores, combined_score, relevance_score, sigmoid
from keeper_core.selection import SelectionConfig, dedup_in_order, select

#: Stage names, in the order they run (stable strings: they land in HTTP responses and tables).
STAGES = ("clip", "heuristics", "dedup", "rerank", "vlm", "top_k")

#: The anchor prompt whose embedding stands in for the negatives when a query has none.
NEUTRAL_PROMPT = "a photo"
#: The largest score weight (alpha, beta, gamma). Weights are relative; this bound keeps
#: ``alpha * S_clip + beta * S_vlm + gamma * S_head`` finite for any finite float32 score.
MAX_WEIGHT = 1e6

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VlmScores:
    """A judge's answer where some candidates could not be judged (a batch job's bad items).

    Attributes:
        scores: one per candidate asked about; a failed candidate's entry is not read.
        failed: candidate index -> why it could not be judged (e.g. its image is unreadable).
            Those leave at the ``vlm`` stage with reason ``vlm_failed: <why>``.
    """

    scores: npt.ArrayLike
    failed: Mapping[int, str]


#: The VLM judge: candidate indices (rank order) -> one score in [0, 1] per index, or VlmScores
#: when some candidates could not be judged. A server's judge fails whole (CascadeStageError).
VlmScorer = Callable[[np.ndarray], "npt.ArrayLike | VlmScores"]

# select() names stage-1 drops after its own knobs; the cascade names them after its own.
_CLIP_REASONS = {"below_threshold": "below_relevance", "beyond_top_k": "beyond_clip_keep"}


@dataclass(frozen=True)
class QueryRules:
    """What a VLM judge (``keeper_core.vlm.VlmJudge.query_rules``) accepts as the query of the
    ``vlm`` stage: the one place its refusals are decided. Here, not in ``keeper_core.vlm``, so a
    server's front end checks a request's query without importing torch.

    Attributes:
        max_chars: the longest query (``VlmConfig.max_query_chars``); longer is refused, never
            truncated.
        reserved: the tokenizer's special tokens and the processor's image token; a query
            holding one is refused.
    """

    max_chars: int
    reserved: tuple[str, ...]

    def problem(self, query: object) -> str | None:
        """Why a judge refuses ``query`` (``"empty"``, ``"600 characters, more than the limit
        of 512"``, ``"contains the special token(s) ['</s>']"``), or None when it accepts it."""
        if not isinstance(query, str):
            return f"expected a string, got {type(query).__name__}"
        if not query.strip():
            return "empty"
        if len(query) > self.max_chars:
            return f"{len(query)} characters, more than the limit of {self.max_chars}"
        found = [t for t in self.reserved if t in query]
        if found:
            return f"contains the special token(s) {found}"
        return None

    def as_dict(self) -> dict[str, Any]:
        """The keys ``VlmJudge.describe()`` carries them as."""
        return {"max_query_chars": self.max_chars, "reserved_tokens": list(self.reserved)}

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> QueryRules | None:
        """The rules from a ``describe()`` (or a Serve VlmJudge's ``info()``); None when it does
        not carry them."""
        limit, reserved = info.get("max_query_chars"), info.get("reserved_tokens")
        if not isinstance(limit, int) or not isinstance(reserved, list | tuple):
            return None
        return cls(limit, tuple(str(t) for t in reserved))


class CascadeStageError(KeeperError):
    """A stage could not produce valid scores; no ranking is returned.

    A server answers 503 naming ``stage``; a batch job records it and stops.

    Attributes:
        stage: the stage that failed, one of ``STAGES``.
        cause: what went wrong, in words.
    """

    def __init__(self, stage: str, cause: str) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"cascade stage {stage!r} failed: {cause}")


class CascadeConfig(BaseModel):
    """What each stage of the cascade keeps, and how scores combine.

    Picks are at most ``min(top_k, top_n)``: ``top_k`` chooses among the ``top_n`` candidates
    that reached the VLM stage, so ``top_k > top_n`` is allowed and keeps all of them.

    Attributes:
        min_relevance: stage 1 drops ``S_clip`` below this (0 = no cut; 0.5 = "matches the
            query better than its negatives / the anchor").
        clip_keep: stage 1 keeps at most this many (best ``S_clip`` first); None = all. Dedup's
            work is at most (survivors of stages 1-2) x ``top_n`` cosines.
        min_side: stage 2 drops images whose shorter side is below this many pixels.
        min_aspect: stage 2 drops width / height below this.
        max_aspect: stage 2 drops width / height above this.
        dedup_threshold: stage 3 treats cosine >= this as near duplicates; None disables.
        top_n: stage 4 keeps this many for the VLM (the VLM budget per request).
        top_k: stage 6 keeps this many picks.
        alpha: weight of ``S_clip`` in the rerank and final scores.
        beta: weight of ``S_vlm`` in the final score (0 skips the VLM).
        gamma: weight of the head score; > 0 requires ``head_scores``.
        logit_scale: the CLIP model's learned logit scale (``model.logit_scale.exp()``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    min_relevance: float = Field(default=0.0, ge=0, le=1)
    clip_keep: int | None = Field(default=None, ge=1)
    min_side: int = Field(default=0, ge=0)
    min_aspect: float | None = Field(default=None, gt=0)
    max_aspect: float | None = Field(default=None, gt=0)
    dedup_threshold: float | None = Field(
        default=0.95,
        gt=0,
        le=1,
        description=(
            "0.95: the usual cut for CLIP ViT-B-32 near duplicates (common tools use 0.90-0.96): "
            "re-encodes, resizes and burst siblings collapse to one pick, two photos of one "
            "subject stay apart. Not measured here (random weights cannot); set it per model."
        ),
    )
    top_n: int = Field(
        default=20,
        ge=1,
        description="20 candidates are ~0.4 s of one H200 running a 7B VLM (~52 img/s).",
    )
    top_k: int = Field(default=10, ge=1)
    alpha: float = Field(
        default=0.5,
        ge=0,
        le=MAX_WEIGHT,
        description="alpha = beta = 0.5: the final score is a probability in [0, 1].",
    )
    beta: float = Field(default=0.5, ge=0, le=MAX_WEIGHT)
    gamma: float = Field(default=0.0, ge=0, le=MAX_WEIGHT)
    logit_scale: float = Field(default=100.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> CascadeConfig:
        if self.alpha == 0 and self.gamma == 0:
            raise ValueError("alpha and gamma must not both be 0: stage 4 would rank by index")
        try:
            self.heuristics  # noqa: B018 - SelectionConfig checks min_aspect <= max_aspect
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    @property
    def heuristics(self) -> SelectionConfig:
        """Stage 2's filters as ``selection.select`` reads them."""
        return SelectionConfig(
            min_side=self.min_side, min_aspect=self.min_aspect, max_aspect=self.max_aspect
        )


class CascadeLimits(BaseModel):
    """Server-set ceilings on what one request may ask for; None = no limit.

    Attributes:
        max_candidates: at most this many candidates (N) per request.
        max_clip_keep: with dedup on, at most this many may survive stage 1 (``clip_keep``, or
            N when it is None). Dedup compares each survivor with at most ``top_n`` kept ones, so
            this bounds memory and a linear cost; None where ``max_candidates`` bounds enough.
        max_top_n: at most this many VLM judgements per request.
        max_top_k: at most this many picks per request.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 100k x 512 float32 embeddings are 200 MB of a replica's memory per request.
    max_candidates: int | None = Field(default=100_000, ge=1)
    # 10k x 10k x 512 is ~5e10 flops of dedup: about a second of CPU.
    max_clip_keep: int | None = Field(default=10_000, ge=1)
    # ~2 s of one H200 with a 7B VLM at ~52 img/s (DESIGN.md).
    max_top_n: int | None = Field(default=100, ge=1)
    max_top_k: int | None = Field(default=100, ge=1)


def check_limits(config: CascadeConfig, n_candidates: int, limits: CascadeLimits) -> None:
    """Refuses a request that asks for more than the server allows.

    Args:
        config: the request's cascade config.
        n_candidates: N, the number of candidates in the request.
        limits: the server's ceilings.

    Raises:
        DataError: naming the knob, its value and the limit.
    """

    def over(knob: str, value: int, limit_name: str, limit: int | None) -> None:
        if limit is not None and value > limit:
            raise DataError(f"{knob}={value} is above this server's limit {limit_name}={limit}")

    over("candidates", n_candidates, "max_candidates", limits.max_candidates)
    over("top_n", config.top_n, "max_top_n", limits.max_top_n)
    over("top_k", config.top_k, "max_top_k", limits.max_top_k)
    if config.dedup_threshold is not None and limits.max_clip_keep is not None:
        if config.clip_keep is None and n_candidates > limits.max_clip_keep:
            raise DataError(
                f"clip_keep=None lets all {n_candidates} candidates reach dedup, above this "
                f"server's limit max_clip_keep={limits.max_clip_keep}: set clip_keep"
            )
        if config.clip_keep is not None:
            over("clip_keep", config.clip_keep, "max_clip_keep", limits.max_clip_keep)


@dataclass(frozen=True)
class StageReport:
    """What one stage did: ``n_in == n_kept + n_dropped``; a skipped stage keeps all."""

    name: str
    n_in: int
    n_kept: int
    n_dropped: int
    ms: float
    skipped: bool


@dataclass(frozen=True)
class CascadeCandidates:
    """Every candidate's scores and fate, as columns indexed by input index (length N).

    Columns suit a batch job writing a table; ``CascadeResult.as_dict`` gives per-candidate
    records. A score a candidate never got (it was dropped earlier) is NaN.

    Attributes:
        clip_raw: ``max cos(positives) - max cos(negatives)``.
        clip: calibrated ``S_clip`` in [0, 1].
        head: the given head scores, or None when none were given.
        rerank: stage 4's ``alpha * S_clip + gamma * S_head``.
        vlm: ``S_vlm`` of the candidates the VLM judged.
        final: the score stage 6 ranks by.
        dropped_at: the stage that dropped it, or None for a pick.
        reason: why, or None for a pick.
    """

    clip_raw: np.ndarray
    clip: np.ndarray
    head: np.ndarray | None
    rerank: np.ndarray
    vlm: np.ndarray
    final: np.ndarray
    dropped_at: list[str | None]
    reason: list[str | None]

    def record(self, i: int) -> dict[str, Any]:
        """Candidate ``i`` as a JSON-ready dict (NaN -> None)."""

        def num(a: np.ndarray | None) -> float | None:
            if a is None or math.isnan(a[i]):
                return None
            return float(a[i])

        return {
            "index": i,
            "clip_raw": num(self.clip_raw),
            "clip": num(self.clip),
            "head": num(self.head),
            "rerank": num(self.rerank),
            "vlm": num(self.vlm),
            "final": num(self.final),
            "dropped_at": self.dropped_at[i],
            "reason": self.reason[i],
        }


@dataclass(frozen=True)
class CascadeResult:
    """The outcome of ``run_cascade``.

    Attributes:
        picks: indices of the picks, best first.
        candidates: every candidate's scores, stage and reason.
        stages: one report per stage, in ``STAGES`` order.
        vlm_calls: candidates the VLM judged (its cost unit: one forward pass each). Those the
            judge reported as failed (``VlmScores.failed``: an unreadable image, never sent to
            the model, or one whose forward gave non-finite logits, which did cost a pass) are
            not counted; they are the ``vlm`` stage's ``n_dropped``.
    """

    picks: list[int]
    candidates: CascadeCandidates
    stages: list[StageReport]
    vlm_calls: int

    def as_dict(self, *, dropped: bool = True) -> dict[str, Any]:
        """A JSON-ready form for an HTTP response.

        Args:
            dropped: include the dropped candidates' records; False lists the picks' only,
                best first (a small response for a large N).
        """
        n = len(self.candidates.reason)
        which = range(n) if dropped else self.picks
        return {
            "picks": list(self.picks),
            "vlm_calls": self.vlm_calls,
            "stages": [vars(s).copy() for s in self.stages],
            "candidates": [self.candidates.record(i) for i in which],
        }


def _rank(idx: np.ndarray, score: np.ndarray) -> np.ndarray:
    """``idx`` ordered by ``score[idx]`` descending, ties to the lower index."""
    return idx[np.lexsort((idx, -score[idx]))]


def _best_of_groups(
    leaders: list[int], dup_of: Mapping[int, int], score: np.ndarray
) -> dict[int, str]:
    """``near_duplicate_of:<kept>`` for every member of a group but its best by ``score`` (ties
    to the lower index); a group is a leader and the duplicates ``dup_of`` maps to it."""
    members: dict[int, list[int]] = {j: [j] for j in leaders}
    for i, j in dup_of.items():
        members[j].append(i)
    drops: dict[int, str] = {}
    for group in members.values():
        if len(group) > 1:
            ranked = _rank(np.asarray(group, dtype=np.int64), score).tolist()
            drops.update(dict.fromkeys(ranked[1:], f"near_duplicate_of:{ranked[0]}"))
    return drops


def _split(
    alive: np.ndarray, reasons: Mapping[int, str], n: int
) -> tuple[np.ndarray, dict[int, str]]:
    """``alive`` without the indices in ``reasons``, and the reasons of those dropped from it."""
    out = np.zeros(n, dtype=bool)
    out[np.fromiter(reasons, dtype=np.int64, count=len(reasons))] = True
    gone = alive[out[alive]]
    return alive[~out[alive]], {i: reasons[i] for i in gone.tolist()}


def _call_vlm(vlm: VlmScorer, idx: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Calls the judge once and checks its answer: (scores, failed candidates -> why).

    Any failure of the judge itself is a CascadeStageError whose cause is one line (the error's
    type and first line, ``keeper_core.errors.brief``: it may reach an HTTP client); the full error, a
    remote traceback included, is logged at warning. Only candidates it names as failed
    (VlmScores) leave without a score.
    """
    try:
        out = vlm(idx.copy())  # a copy: the callback cannot edit the ranking
    except Exception as e:
        log.warning("cascade stage 'vlm': the VLM scorer raised", exc_info=True)
        raise CascadeStageError("vlm", f"the VLM scorer raised {brief(e)}") from e
    failed: dict[int, str] = {}
    if isinstance(out, VlmScores):
        asked = set(idx.tolist())
        keys = list(out.failed)
        if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in keys):
            raise CascadeStageError(
                "vlm", f"the VLM scorer named failed candidates by non-indices: {keys[:5]!r}"
            )
        failed = {int(i): str(why) for i, why in out.failed.items()}
        stray = sorted(set(failed) - asked)
        if stray:
            raise CascadeStageError(
                "vlm", f"the VLM scorer reported failures for candidates it was not asked: {stray}"
            )
        out = _judged_only(out.scores, idx, failed)
    try:
        s = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise CascadeStageError("vlm", f"the VLM scorer returned non-numbers ({e})") from None
    if s.shape != idx.shape:
        raise CascadeStageError(
            "vlm", f"the VLM scorer returned shape {s.shape} for {len(idx)} candidates"
        )
    judged = ~np.isin(idx, np.fromiter(failed, dtype=np.int64, count=len(failed)))
    bad = np.flatnonzero(~((s >= 0) & (s <= 1)) & judged)  # NaN fails both comparisons
    if bad.size:
        j = int(bad[0])
        raise CascadeStageError(
            "vlm",
            f"{bad.size} VLM score(s) are not finite numbers in [0, 1] "
            f"(candidate {int(idx[j])} got {s[j]!r})",
        )
    return np.where(judged, s, np.nan), failed


def _judged_only(scores: npt.ArrayLike, idx: np.ndarray, failed: Mapping[int, str]) -> Any:
    """``scores`` with a failed candidate's entry, which is not read, as NaN: a placeholder of
    any kind ("n/a", None) stands. Scores that are not one per candidate go on unchanged, for
    the caller's shape check to refuse."""
    if not failed or isinstance(scores, str | bytes):
        return scores
    try:
        entries = list(scores)  # type: ignore[arg-type]
    except TypeError:
        return scores
    if len(entries) != len(idx):
        return scores
    return [np.nan if i in failed else v for i, v in zip(idx.tolist(), entries, strict=True)]


class _Ledger:
    """Records drops and stage reports as the cascade runs."""

    def __init__(self, n: int) -> None:
        self.dropped_at: list[str | None] = [None] * n
        self.reason: list[str | None] = [None] * n
        self.stages: list[StageReport] = []

    def stage(
        self,
        name: str,
        n_in: int,
        kept: np.ndarray,
        drops: Mapping[int, str],
        t0: float,
        *,
        skipped: bool = False,
    ) -> np.ndarray:
        for i, r in drops.items():
            self.dropped_at[i], self.reason[i] = name, r
        ms = (time.perf_counter() - t0) * 1e3
        self.stages.append(StageReport(name, n_in, len(kept), len(drops), ms, skipped))
        return kept


def run_cascade(
    image_emb: np.ndarray,
    positive_emb: np.ndarray,
    negative_emb: np.ndarray,
    *,
    config: CascadeConfig,
    widths: npt.ArrayLike | None = None,
    heights: npt.ArrayLike | None = None,
    head_scores: npt.ArrayLike | None = None,
    vlm: VlmScorer | None = None,
) -> CascadeResult:
    """Runs the selection cascade over N candidates (see the module docstring).

    N = 0 is not an error: it returns no picks, every stage reporting 0 (a filter upstream may
    leave nothing; a server that wants to refuse empty requests does so in its schema).

    Args:
        image_emb: (N, D) unit-norm float32 candidate embeddings.
        positive_emb: (P, D) embeddings of the query's prompts, P >= 1.
        negative_emb: (Q, D) embeddings of its negative prompts, Q >= 1: with none, the
            embedding of ``NEUTRAL_PROMPT`` (module docstring).
        config: the cascade's knobs (server limits: ``check_limits``, applied by the caller).
        widths: (N,) pixel widths; required (and only read) when stage 2 filters.
        heights: (N,) pixel heights; as ``widths``.
        head_scores: (N,) learned head scores in [0, 1] (e.g. a ranker's probability), or None.
            They choose the kept member of a near-duplicate group and count with ``gamma``.
        vlm: the judge, called at most once with the top-N indices (int64, rank order; never
            empty); it returns their ``S_vlm`` in [0, 1], e.g. VQAScore's
            ``P(yes) / (P(yes) + P(no))``, or ``VlmScores`` naming candidates it could not
            judge (they leave at this stage, ``vlm_failed: <why>``). Batching is the callback's business (a Serve
            replica's batcher, a Ray Data map): the cascade hands it the whole budget
            at once so it can fill its batches.

    Returns:
        CascadeResult: picks best first, every candidate's scores and fate, stage reports.

    Raises:
        DataError: malformed embeddings, sizes or head scores; ``gamma > 0`` without head
            scores; stage-2 filters without widths/heights.
        CascadeStageError: the VLM scorer raised, or returned the wrong number of scores or
            scores that are not finite numbers in [0, 1].
    """
    t0 = time.perf_counter()
    if negative_emb is None or (
        isinstance(negative_emb, np.ndarray) and negative_emb.ndim == 2 and not len(negative_emb)
    ):
        raise DataError(
            "negative_emb: at least one negative prompt embedding is required for a calibrated "
            f"relevance; with no negatives pass the embedding of {NEUTRAL_PROMPT!r}"
        )
    raw = relevance_score(image_emb, positive_emb, negative_emb)  # validates all three
    n = raw.shape[0]
    head: np.ndarray | None = None
    if head_scores is not None:
        head = check_scores(head_scores, "head_scores", n=n)
        bad = np.flatnonzero((head < 0) | (head > 1))
        if bad.size:
            raise DataError(
                f"head_scores: {bad.size} value(s) outside [0, 1]", rows=bad[:10].tolist()
            )
    elif config.gamma > 0:
        raise DataError(f"gamma={config.gamma} weighs head_scores, but none were given")

    nan = np.full(n, np.nan)
    clip = sigmoid(config.logit_scale * raw.astype(np.float64))
    rerank_all = combined_score(clip, None, head, alpha=config.alpha, gamma=config.gamma)
    rerank, s_vlm, final = nan.copy(), nan.copy(), nan.copy()
    book = _Ledger(n)

    # 1. clip: select() applies the relevance cut and clip_keep, ranked by S_clip.
    sel = select(
        clip, config=SelectionConfig(threshold=config.min_relevance, top_k=config.clip_keep)
    )
    drops = {i: _CLIP_REASONS[r] for i, r in sel.dropped.items()}
    alive = book.stage("clip", n, np.sort(np.asarray(sel.kept, dtype=np.int64)), drops, t0)

    # 2. heuristics: select() over all N checks widths/heights with true row numbers.
    t0 = time.perf_counter()
    hconf = config.heuristics
    if hconf.filters_metadata:
        meta = select(clip, widths=widths, heights=heights, config=hconf).dropped
        alive = book.stage("heuristics", len(alive), *_split(alive, meta, n), t0)
    else:
        alive = book.stage("heuristics", len(alive), alive, {}, t0, skipped=True)

    # 3. dedup: groups found in the rerank order, stopping at top_n leaders (the work is at most
    # N x top_n cosines, with or without a head); each group keeps its best member by the head
    # (else S_clip). Every kept member is one the walk reached, so each ranks above every
    # candidate it did not reach: stage 4's top_n are exactly the kept ones, and the undecided
    # rest leave there.
    t0 = time.perf_counter()
    if config.dedup_threshold is not None:
        order = _rank(alive, rerank_all)
        leaders, dup_of, _ = dedup_in_order(order, image_emb, config.dedup_threshold, config.top_n)
        drops = _best_of_groups(leaders, dup_of, head if head is not None else clip)
        alive = book.stage("dedup", len(alive), *_split(alive, drops, n), t0)
    else:
        alive = book.stage("dedup", len(alive), alive, {}, t0, skipped=True)

    # 4. rerank: the VLM budget goes to the best by alpha * S_clip + gamma * S_head.
    t0 = time.perf_counter()
    rerank[alive] = rerank_all[alive]
    order = _rank(alive, rerank_all)
    top = order[: config.top_n]
    drops = dict.fromkeys(order[config.top_n :].tolist(), "beyond_top_n")
    book.stage("rerank", len(alive), top, drops, t0)

    # 5. vlm: one call with the whole budget; skipped without a judge or its weight.
    t0 = time.perf_counter()
    vlm_calls = 0
    if config.beta == 0 or vlm is None:
        final[top] = rerank_all[top]
        book.stage("vlm", len(top), top, {}, t0, skipped=True)
    else:
        n_top, failed = len(top), dict[int, str]()
        if n_top:
            s_vlm[top], failed = _call_vlm(vlm, top)
            vlm_calls = n_top - len(failed)  # a failed candidate was not judged: no VLM call
            top = top[~np.isin(top, np.fromiter(failed, dtype=np.int64, count=len(failed)))]
            final[top] = combined_score(
                clip[top],
                s_vlm[top],
                None if head is None else head[top],
                alpha=config.alpha,
                beta=config.beta,
                gamma=config.gamma,
            )
        drops = {i: f"vlm_failed: {why}" for i, why in failed.items()}
        book.stage("vlm", n_top, top, drops, t0)

    # 6. top_k by the final score.
    t0 = time.perf_counter()
    order = _rank(top, final)
    picks = order[: config.top_k]
    drops = dict.fromkeys(order[config.top_k :].tolist(), "beyond_top_k")
    book.stage("top_k", len(top), picks, drops, t0)

    candidates = CascadeCandidates(
        clip_raw=raw.astype(np.float64),
        clip=clip,
        head=head,
        rerank=rerank,
        vlm=s_vlm,
        final=final,
        dropped_at=book.dropped_at,
        reason=book.reason,
    )
    return CascadeResult(
        picks=picks.tolist(), candidates=candidates, stages=book.stages, vlm_calls=vlm_calls
    )
