"""Dedup's work is bounded by ``top_n`` with head scores too (as ``/v1/select`` always gives).

With a head and ``gamma = 0`` the head order is not the rerank order, and dedup used to walk every
survivor in head order, comparing each with every kept one: O(N^2 D), ~6.7 s at 32k candidates.
Now groups are found in the rerank order until ``top_n`` leaders exist, each keeps its best member
by the head, and the rest are left to stage 4. The bound is checked structurally: how many
candidates dedup keeps to compare against, never a timing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from keeper_core import cascade
from keeper_core.cascade import STAGES, CascadeConfig, run_cascade


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class DedupSpy:
    """``dedup_in_order`` as the cascade calls it, recording what each call kept and decided."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.real = cascade.dedup_in_order

    def __call__(self, order: np.ndarray, emb: np.ndarray, threshold: float, limit: Any) -> Any:
        kept, dup_of, done = self.real(order, emb, threshold, limit)
        self.calls.append({"n": len(order), "kept": len(kept), "done": done})
        return kept, dup_of, done


@pytest.mark.parametrize(("head", "gamma"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_dedup_compares_each_candidate_with_at_most_top_n_kept(
    monkeypatch: pytest.MonkeyPatch, head: bool, gamma: float
) -> None:
    rng = np.random.default_rng(0)
    n, top_n = 3000, 20
    emb = _unit(rng.normal(size=(n, 64)))  # no near duplicates: every candidate would be kept
    pos, neg = _unit(rng.normal(size=(1, 64))), _unit(rng.normal(size=(1, 64)))
    spy = DedupSpy()
    monkeypatch.setattr(cascade, "dedup_in_order", spy)
    cfg = CascadeConfig(top_n=top_n, top_k=5, gamma=gamma, beta=0.0)
    res = run_cascade(emb, pos, neg, config=cfg, head_scores=rng.random(n) if head else None)
    (call,) = spy.calls
    # each decided candidate was compared with the kept ones only: at most top_n of them
    assert call["kept"] <= top_n, call
    assert call["done"] * call["kept"] <= n * top_n
    dedup = res.stages[STAGES.index("dedup")]
    assert dedup.n_in == n
    assert dedup.n_in == dedup.n_kept + dedup.n_dropped
    assert res.stages[STAGES.index("rerank")].n_kept == top_n
    assert sum(r == "beyond_top_n" for r in res.candidates.reason) == n - top_n


def test_each_group_keeps_its_best_member_by_the_head_and_the_unreached_leave_at_rerank() -> None:
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=(6, 64)))
    copies = [0, 0, 0, 1, 1, 2, 3, 4, 5, 5]  # shot 0 three times, shot 1 and 5 twice
    emb = _unit(base[copies] + 0.002 * rng.normal(size=(len(copies), 64)))
    pos, neg = _unit(rng.normal(size=(1, 64))), _unit(rng.normal(size=(1, 64)))
    head = rng.random(len(copies))
    cfg = CascadeConfig(top_n=3, top_k=3, beta=0.0, dedup_threshold=0.99)
    res = run_cascade(emb, pos, neg, config=cfg, head_scores=head)
    c = res.candidates
    rerank_order = sorted(range(len(copies)), key=lambda i: (-c.clip[i], i))
    shots_in_walk: list[int] = []
    walked = []
    for i in rerank_order:
        if len(shots_in_walk) == 3:
            break
        walked.append(i)
        if copies[i] not in shots_in_walk:
            shots_in_walk.append(copies[i])
    for shot in shots_in_walk:
        members = [i for i in walked if copies[i] == shot]
        best = max(members, key=lambda i: (head[i], -i))
        assert c.dropped_at[best] != "dedup"
        for i in set(members) - {best}:
            assert (c.dropped_at[i], c.reason[i]) == ("dedup", f"near_duplicate_of:{best}")
    for i in set(range(len(copies))) - set(walked):
        assert (c.dropped_at[i], c.reason[i]) == ("rerank", "beyond_top_n")
    # the picks are one per shot: no two near duplicates
    assert len({copies[i] for i in res.picks}) == len(res.picks) == 3
    for before, stage in zip(res.stages, res.stages[1:], strict=False):
        assert stage.n_in == before.n_kept
        assert stage.n_in == stage.n_kept + stage.n_dropped
