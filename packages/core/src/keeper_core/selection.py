"""Choosing the keepers: filter, threshold, rank, drop near-duplicates, take the top k.

``select`` is pure numpy and accounts for every image: each index ends up either in
``Selection.kept`` (best first) or in ``Selection.dropped`` with the reason, one of
``too_small``, ``aspect_ratio``, ``below_threshold``, ``near_duplicate_of:<idx>``,
``beyond_top_k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_core.errors import DataError
from keeper_core.scoring import check_embeddings, check_scores

#: Candidates compared per dedup step, and kept embeddings per matmul: dedup's scratch memory
#: is O(CHUNK * (BLOCK + D)) floats (~50 MB at D=512) whatever N is.
DEDUP_BLOCK = 1024
DEDUP_CHUNK = 8192
#: float32 cosine of two identical unit vectors can come out a few ulp below 1.0; without this
#: slack, dedup_threshold=1.0 would miss exact duplicates.
_COS_SLACK = 1e-6


class SelectionConfig(BaseModel):
    """What ``select`` keeps.

    Attributes:
        threshold: drop images scoring below this (kept when score >= threshold).
        top_k: keep at most this many.
        dedup_threshold: two images whose embedding cosine is >= this are near-duplicates;
            only the better-scored one is kept. In (0, 1]; 1.0 removes exact duplicates only.
        min_side: drop images whose shorter side is below this many pixels.
        min_aspect: drop images with width / height below this.
        max_aspect: drop images with width / height above this.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    threshold: float | None = None
    top_k: int | None = Field(default=None, ge=1)
    dedup_threshold: float | None = Field(default=None, gt=0, le=1)
    min_side: int = Field(default=0, ge=0)
    min_aspect: float | None = Field(default=None, gt=0)
    max_aspect: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _aspect_range(self) -> SelectionConfig:
        lo, hi = self.min_aspect, self.max_aspect
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_aspect {self.min_aspect} > max_aspect {self.max_aspect}")
        return self

    @property
    def filters_metadata(self) -> bool:
        """True when widths and heights are needed."""
        return self.min_side > 0 or self.min_aspect is not None or self.max_aspect is not None


@dataclass
class Selection:
    """The outcome for every image.

    Attributes:
        kept: indices of kept images, best first.
        dropped: index -> reason for every other image.
    """

    kept: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)


def _check_sizes(x: Any, name: str, n: int) -> np.ndarray:
    arr = check_scores(x, name, n=n)
    bad = np.flatnonzero(arr <= 0)
    if bad.size:
        raise DataError(f"{name}: {bad.size} value(s) are not positive", rows=bad[:10].tolist())
    return arr


def select(
    scores: npt.ArrayLike,
    *,
    embeddings: np.ndarray | None = None,
    widths: npt.ArrayLike | None = None,
    heights: npt.ArrayLike | None = None,
    config: SelectionConfig,
) -> Selection:
    """Selects the keepers among N scored images.

    Steps, in order: metadata filters (``min_side``, then aspect ratio) -> ``threshold`` ->
    rank by score descending (ties: lower index first, so results are deterministic) ->
    greedy near-duplicate removal in rank order (an image too similar to an already kept one is
    dropped, so each group keeps its best-scored member) -> ``top_k``. Once ``top_k`` images
    are kept, the rest are ``beyond_top_k`` without a duplicate check: their fate is the same
    either way, and it bounds dedup work.

    Dedup costs O(M * K * D) time for M candidates and K kept images (K <= top_k when set) and
    O(DEDUP_CHUNK * (DEDUP_BLOCK + D)) extra memory: candidates are compared in blocks against
    the kept set in chunks, never as an N x N matrix.

    Args:
        scores: (N,) finite scores, higher is better.
        embeddings: (N, D) unit-norm float32; required when ``config.dedup_threshold`` is set.
        widths: (N,) pixel widths; required (and only read) with ``min_side``, ``min_aspect``
            or ``max_aspect``.
        heights: (N,) pixel heights; as ``widths``.
        config: what to keep.

    Returns:
        Selection with every index 0..N-1 exactly once, in ``kept`` or ``dropped``.

    Raises:
        DataError: a required input is missing, or lengths/values are malformed.
    """
    s = check_scores(scores, "scores")
    n = s.shape[0]
    dropped: dict[int, str] = {}
    alive = np.ones(n, dtype=bool)

    if config.filters_metadata:
        if widths is None or heights is None:
            raise DataError("widths and heights are required by min_side/min_aspect/max_aspect")
        w, h = _check_sizes(widths, "widths", n), _check_sizes(heights, "heights", n)
        too_small = np.minimum(w, h) < config.min_side
        aspect = w / h
        bad_aspect = np.zeros(n, dtype=bool)
        if config.min_aspect is not None:
            bad_aspect |= aspect < config.min_aspect
        if config.max_aspect is not None:
            bad_aspect |= aspect > config.max_aspect
        bad_aspect &= ~too_small  # one reason per image: the first filter that drops it
        dropped.update(dict.fromkeys(np.flatnonzero(too_small).tolist(), "too_small"))
        dropped.update(dict.fromkeys(np.flatnonzero(bad_aspect).tolist(), "aspect_ratio"))
        alive &= ~(too_small | bad_aspect)

    if config.threshold is not None:
        below = alive & (s < config.threshold)
        dropped.update(dict.fromkeys(np.flatnonzero(below).tolist(), "below_threshold"))
        alive &= ~below

    candidates = np.flatnonzero(alive)
    # Stable sort on -score: equal scores keep ascending index order.
    order = candidates[np.argsort(-s[candidates], kind="stable")]

    if embeddings is not None:
        check_embeddings(embeddings, "embeddings")
        if embeddings.shape[0] != n:
            raise DataError(f"embeddings: {embeddings.shape[0]} rows do not match {n} scores")
    if config.dedup_threshold is not None:
        if embeddings is None:
            raise DataError("embeddings are required when dedup_threshold is set")
        kept, dup_of, done = dedup_in_order(order, embeddings, config.dedup_threshold, config.top_k)
        dropped.update({i: f"near_duplicate_of:{j}" for i, j in dup_of.items()})
        rest = order[done:]
    else:
        k = len(order) if config.top_k is None else config.top_k
        kept, rest = order[:k].tolist(), order[k:]
    dropped.update(dict.fromkeys(rest.tolist(), "beyond_top_k"))
    return Selection(kept=kept, dropped=dropped)


def dedup_in_order(
    order: np.ndarray, emb: np.ndarray, threshold: float, limit: int | None
) -> tuple[list[int], dict[int, int], int]:
    """Greedy dedup of ``order`` (rank order).

    Returns the kept indices, duplicate -> the most similar kept index, and how many entries of
    ``order`` were decided (fewer than all once ``limit`` images are kept).
    """
    thr = threshold - _COS_SLACK
    kept: list[int] = []
    kept_inv: list[np.float32] = []  # 1 / norm of each kept row
    dup_of: dict[int, int] = {}
    done = 0
    while done < len(order) and (limit is None or len(kept) < limit):
        idx = order[done : done + DEDUP_BLOCK]
        # Rows are unit vectors only within check_embeddings' tolerance (1e-3): a row of norm
        # 0.9995 has x @ x = 0.999, so dot products are not cosines and dedup_threshold=1.0
        # would miss exact duplicates. Compare true cosines: rescale each row to unit norm.
        x = emb[idx]
        inv = (1.0 / np.sqrt(np.einsum("ij,ij->i", x, x))).astype(x.dtype)
        x = x * inv[:, None]
        # Most similar image kept in earlier blocks, per candidate.
        best = np.full(len(idx), -np.inf, dtype=np.float32)
        arg = np.full(len(idx), -1, dtype=np.int64)
        kept_arr = np.asarray(kept, dtype=np.int64)
        kept_inv_arr = np.asarray(kept_inv, dtype=x.dtype)
        for c in range(0, len(kept_arr), DEDUP_CHUNK):
            ks = kept_arr[c : c + DEDUP_CHUNK]
            sims = x @ (emb[ks] * kept_inv_arr[c : c + DEDUP_CHUNK, None]).T
            j = sims.argmax(axis=1)
            m = sims[np.arange(len(idx)), j]
            better = m > best
            best[better], arg[better] = m[better], ks[j[better]]
        # Within the block, only candidates similar to an earlier one need the sequential check.
        within = x @ x.T
        conflict = np.tril(within >= thr, k=-1).any(axis=1)
        kept_here: list[int] = []  # positions in this block
        for i in range(len(idx)):
            if limit is not None and len(kept) >= limit:
                break
            done += 1
            if conflict[i] and kept_here:
                sims_here = within[i, kept_here]
                j = int(sims_here.argmax())
                if sims_here[j] > best[i]:
                    best[i], arg[i] = sims_here[j], idx[kept_here[j]]
            if best[i] >= thr:
                dup_of[int(idx[i])] = int(arg[i])
            else:
                kept.append(int(idx[i]))
                kept_inv.append(inv[i])
                kept_here.append(i)
    return kept, dup_of, done
