"""The cascade's math at its edges: dedup compares true cosines, and every stage accounts for
every candidate over many random configurations."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from keeper_core.cascade import STAGES, CascadeConfig, VlmScores, run_cascade
from keeper_core.selection import SelectionConfig, select


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_dedup_at_one_removes_exact_duplicates_whose_norm_is_within_the_tolerance() -> None:
    # check_embeddings accepts norms within 1e-3 of 1; such a row's dot product with itself is
    # 0.999, which dedup_threshold=1.0 used to read as "not a duplicate".
    e = (unit(np.random.default_rng(0).normal(size=(4, 16))) * np.float32(0.9995)).astype(
        np.float32
    )
    e[1] = e[0]
    s = select([0.9, 0.8, 0.7, 0.6], embeddings=e, config=SelectionConfig(dedup_threshold=1.0))
    assert s.kept == [0, 2, 3]
    assert s.dropped == {1: "near_duplicate_of:0"}
    r = run_cascade(
        e, unit(e[2:3]), unit(e[3:4]), config=CascadeConfig(dedup_threshold=1.0, top_n=4, top_k=4)
    )
    assert r.candidates.reason[1] == "near_duplicate_of:0"
    assert 1 not in r.picks


def test_dedup_does_not_merge_distinct_rows_scaled_below_unit_norm() -> None:
    # Rescaling only fixes the norm: two different images stay apart at a high threshold.
    e = unit(np.random.default_rng(1).normal(size=(3, 16))) * np.float32(0.9992)
    s = select(
        [0.3, 0.2, 0.1],
        embeddings=e.astype(np.float32),
        config=SelectionConfig(dedup_threshold=0.99),
    )
    assert s.kept == [0, 1, 2]


@pytest.mark.parametrize("seed", range(200))
def test_every_stage_accounts_for_every_candidate_under_random_knobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(0, 30)), 8
    centres = rng.normal(size=(max(n // 3, 1), d))
    noise = float(rng.choice([0.0, 0.01, 0.2]))
    img = unit(centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, d)))
    img = img.reshape(n, d)
    pos = unit(rng.normal(size=(2, d)))
    neg = pos[:1].copy() if rng.random() < 0.2 else unit(rng.normal(size=(1, d)))
    head = rng.choice([0.0, 0.5, 1.0], n) if rng.random() < 0.5 else None
    gamma = 0.3 if head is not None and rng.random() < 0.5 else 0.0
    cfg = CascadeConfig(
        min_relevance=float(rng.choice([0.0, 0.3, 0.5])),
        clip_keep=rng.choice([None, 1, 5]),
        min_side=int(rng.choice([0, 20])),
        dedup_threshold=rng.choice([None, 1.0, 0.9]),
        top_n=int(rng.choice([1, 3, 100])),
        top_k=int(rng.choice([1, 5, 100])),
        beta=float(rng.choice([0.0, 0.5])),
        gamma=gamma,
        logit_scale=float(rng.choice([1.0, 100.0, 1000.0])),
    )
    fails = {int(i) for i in rng.choice(n, min(n, 2), replace=False)} if n else set()

    def vlm(idx: np.ndarray) -> VlmScores:
        s = rng.choice([0.0, 0.5, 1.0], len(idx))
        return VlmScores(s, {int(i): "unreadable" for i in idx if int(i) in fails})

    w, h = rng.integers(10, 40, n), rng.integers(10, 40, n)
    r = run_cascade(img, pos, neg, config=cfg, widths=w, heights=h, head_scores=head, vlm=vlm)
    assert [s.name for s in r.stages] == list(STAGES)
    assert r.stages[0].n_in == n
    for a, b in zip(r.stages, r.stages[1:], strict=False):
        assert b.n_in == a.n_kept
    fate = collections.Counter(r.candidates.dropped_at)
    for s in r.stages:
        assert s.n_in == s.n_kept + s.n_dropped
        assert fate.get(s.name, 0) == s.n_dropped
    assert fate.get(None, 0) == len(r.picks) == r.stages[-1].n_kept
    assert len(set(r.picks)) == len(r.picks)
    assert not np.isnan(r.candidates.final[r.picks]).any()
