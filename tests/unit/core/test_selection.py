"""Selection: filters, ranking, near-duplicate removal and top-k on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from keeper_core import selection
from keeper_core.errors import DataError
from keeper_core.selection import Selection, SelectionConfig, select


def normed(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_accounts_for_all(sel: Selection, n: int) -> None:
    assert len(sel.kept) == len(set(sel.kept))
    assert not set(sel.kept) & set(sel.dropped)
    assert sorted([*sel.kept, *sel.dropped]) == list(range(n))


def clustered(n: int, seed: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """n images in n // 4 tight clusters (members at cosine ~0.99), with distinct scores."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 4, 1), dim))
    emb = centres[rng.integers(0, len(centres), n)] + 0.02 * rng.normal(size=(n, dim))
    return rng.permutation(n).astype(np.float64) / n, normed(emb)


def reference_dedup(
    scores: np.ndarray, emb: np.ndarray, thr: float
) -> tuple[list[int], dict[int, str]]:
    """The greedy definition with the full similarity matrix: obviously right for small N."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    sims = emb.astype(np.float64) @ emb.T.astype(np.float64)
    kept: list[int] = []
    dropped: dict[int, str] = {}
    for i in order:
        if kept and sims[i, kept].max() >= thr:
            dropped[i] = f"near_duplicate_of:{kept[int(np.argmax(sims[i, kept]))]}"
        else:
            kept.append(i)
    return kept, dropped


def test_threshold_keeps_at_or_above_in_rank_order() -> None:
    sel = select(np.array([0.1, 0.5, 0.9, 0.5]), config=SelectionConfig(threshold=0.5))
    assert sel.kept == [2, 1, 3]
    assert sel.dropped == {0: "below_threshold"}


def test_ties_break_by_lower_index_deterministically() -> None:
    scores = np.array([0.3, 0.7, 0.3, 0.7, 0.7, 0.1])
    first = select(scores, config=SelectionConfig())
    assert first.kept == [1, 3, 4, 0, 2, 5]
    for _ in range(3):
        assert select(scores.copy(), config=SelectionConfig()) == first


def test_many_ties_keep_index_order() -> None:
    # Large enough that an unstable sort (introsort) would shuffle equal scores.
    scores = np.repeat([0.2, 0.9, 0.5], 100)[np.random.default_rng(7).permutation(300)]
    kept = select(scores, config=SelectionConfig()).kept
    assert kept == sorted(range(300), key=lambda i: (-scores[i], i))


def test_permuted_input_maps_consistently() -> None:
    scores, emb = clustered(60, seed=1)
    config = SelectionConfig(threshold=0.1, dedup_threshold=0.95, top_k=8)
    base = select(scores, embeddings=emb, config=config)
    perm = np.random.default_rng(2).permutation(60)  # new position j holds old image perm[j]
    moved = select(scores[perm], embeddings=emb[perm], config=config)
    assert [int(perm[j]) for j in moved.kept] == base.kept
    remap = {
        int(perm[j]): reason
        if ":" not in reason
        else f"near_duplicate_of:{perm[int(reason.split(':')[1])]}"
        for j, reason in moved.dropped.items()
    }
    assert remap == base.dropped
    assert any(r.startswith("near_duplicate_of") for r in base.dropped.values())


def test_min_side_filter() -> None:
    sel = select(
        np.array([0.9, 0.8, 0.7]),
        widths=np.array([100, 200, 40]),
        heights=np.array([50, 300, 400]),
        config=SelectionConfig(min_side=50),
    )
    assert sel.kept == [0, 1]  # 100x50 has exactly the minimum side
    assert sel.dropped == {2: "too_small"}


def test_aspect_ratio_filter_and_first_reason_wins() -> None:
    sel = select(
        np.array([0.1, 0.2, 0.3, 0.4, 0.5]),
        widths=[300, 100, 200, 100, 10],
        heights=[100, 300, 100, 200, 100],
        config=SelectionConfig(min_aspect=0.5, max_aspect=2.0, min_side=20),
    )
    assert sel.kept == [3, 2]  # aspects 0.5 and 2.0 are inside the closed range
    assert sel.dropped == {0: "aspect_ratio", 1: "aspect_ratio", 4: "too_small"}


def test_filters_run_before_threshold_and_top_k() -> None:
    sel = select(
        np.array([0.99, 0.2, 0.8, 0.7, 0.6]),
        widths=[10, 100, 100, 100, 100],
        heights=[10, 100, 100, 100, 100],
        config=SelectionConfig(min_side=32, threshold=0.5, top_k=2),
    )
    assert sel.kept == [2, 3]
    assert sel.dropped == {0: "too_small", 1: "below_threshold", 4: "beyond_top_k"}


def test_dedup_keeps_best_of_group_and_distinct_images() -> None:
    emb = normed(
        np.array(
            [
                [1.0, 0.0, 0.0, 0.0],
                [1.0, 0.02, 0.0, 0.0],  # ~identical to 0
                [1.0, 0.0, 0.03, 0.0],  # ~identical to 0
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
            ]
        )
    )
    scores = np.array([0.5, 0.9, 0.7, 0.3, 0.1])
    sel = select(scores, embeddings=emb, config=SelectionConfig(dedup_threshold=0.99))
    assert sel.kept == [1, 3, 4]
    assert sel.dropped == {2: "near_duplicate_of:1", 0: "near_duplicate_of:1"}
    # Above the group's cosines (~0.9998) nothing is a duplicate.
    strict = select(scores, embeddings=emb, config=SelectionConfig(dedup_threshold=0.99999))
    assert strict.kept == [1, 2, 0, 3, 4]


def test_dedup_threshold_one_removes_exact_duplicates() -> None:
    emb = normed(np.array([[0.3, 0.4, 0.5], [0.3, 0.4, 0.5], [0.5, 0.4, 0.3]]))
    sel = select(
        np.array([0.1, 0.2, 0.3]), embeddings=emb, config=SelectionConfig(dedup_threshold=1.0)
    )
    assert sel.kept == [2, 1]
    assert sel.dropped == {0: "near_duplicate_of:1"}
    # float32 self-similarity of a unit vector often lands a few ulp below 1: still a duplicate.
    x = normed(np.random.default_rng(8).normal(size=(50, 512)))
    twice = np.concatenate([x, x])
    sel = select(np.arange(100.0), embeddings=twice, config=SelectionConfig(dedup_threshold=1.0))
    assert sel.kept == list(range(99, 49, -1))
    assert sel.dropped == {i: f"near_duplicate_of:{i + 50}" for i in range(50)}


@pytest.mark.parametrize(("block", "chunk"), [(1024, 8192), (7, 5), (1, 1), (64, 3)])
def test_blocked_dedup_matches_full_matrix_greedy(
    monkeypatch: pytest.MonkeyPatch, block: int, chunk: int
) -> None:
    monkeypatch.setattr(selection, "DEDUP_BLOCK", block)
    monkeypatch.setattr(selection, "DEDUP_CHUNK", chunk)
    scores, emb = clustered(300, seed=3)
    kept, dropped = reference_dedup(scores, emb, 0.97)
    sel = select(scores, embeddings=emb, config=SelectionConfig(dedup_threshold=0.97))
    assert sel.kept == kept
    assert sel.dropped == dropped
    assert 60 < len(kept) < 250  # the data really has duplicates and distinct images


def test_top_k_after_dedup() -> None:
    scores, emb = clustered(200, seed=4)
    full_kept, full_dropped = reference_dedup(scores, emb, 0.97)
    sel = select(scores, embeddings=emb, config=SelectionConfig(dedup_threshold=0.97, top_k=10))
    assert sel.kept == full_kept[:10]
    # Duplicates ranked above the 10th keeper keep their reason; everything after it is beyond_top_k.
    order = sorted(range(200), key=lambda i: (-scores[i], i))
    last = order.index(full_kept[9])
    for pos, i in enumerate(order):
        if i in sel.kept:
            continue
        expected = full_dropped[i] if pos < last else "beyond_top_k"
        assert sel.dropped[i] == expected


def test_top_k_without_dedup() -> None:
    sel = select(np.array([0.2, 0.9, 0.5, 0.7]), config=SelectionConfig(top_k=2))
    assert sel.kept == [1, 3]
    assert sel.dropped == {2: "beyond_top_k", 0: "beyond_top_k"}
    assert select(np.array([0.2]), config=SelectionConfig(top_k=5)).kept == [0]


@pytest.mark.parametrize(
    "config",
    [
        SelectionConfig(),
        SelectionConfig(threshold=0.4, top_k=7),
        SelectionConfig(dedup_threshold=0.95),
        SelectionConfig(threshold=0.2, dedup_threshold=0.9, top_k=15, min_side=64, max_aspect=1.5),
    ],
)
def test_counts_add_up(config: SelectionConfig) -> None:
    scores, emb = clustered(120, seed=5)
    rng = np.random.default_rng(6)
    w, h = rng.integers(16, 400, 120), rng.integers(16, 400, 120)
    sel = select(scores, embeddings=emb, widths=w, heights=h, config=config)
    assert_accounts_for_all(sel, 120)
    assert all(isinstance(i, int) for i in [*sel.kept, *sel.dropped])
    kept_scores = scores[sel.kept]
    assert np.all(np.diff(kept_scores) <= 0)


def test_empty_input() -> None:
    sel = select(
        np.zeros(0),
        embeddings=np.zeros((0, 4), np.float32),
        config=SelectionConfig(dedup_threshold=0.9, top_k=3),
    )
    assert sel == Selection(kept=[], dropped={})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": SelectionConfig(dedup_threshold=0.9)}, "embeddings are required"),
        (
            {"config": SelectionConfig(min_side=10), "widths": [1, 2, 3]},
            "widths and heights are required",
        ),
        (
            {"config": SelectionConfig(min_side=10), "widths": [1, 2], "heights": [1, 2, 3]},
            "widths: length 2 does not match 3",
        ),
        (
            {"config": SelectionConfig(max_aspect=2), "widths": [1, 0, 3], "heights": [1, 2, 3]},
            "widths: 1 value",
        ),
        (
            {
                "config": SelectionConfig(dedup_threshold=0.9),
                "embeddings": np.eye(2, dtype=np.float32),
            },
            "embeddings: 2 rows do not match 3",
        ),
        (
            {
                "config": SelectionConfig(dedup_threshold=0.9),
                "embeddings": np.ones((3, 2), np.float32),
            },
            "embeddings: 3 row",
        ),
    ],
)
def test_input_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        select(np.array([0.1, 0.2, 0.3]), **kwargs)


def test_non_finite_scores_are_named() -> None:
    with pytest.raises(DataError, match="scores: 1 non-finite") as e:
        select(np.array([0.1, np.nan, 0.3]), config=SelectionConfig())
    assert e.value.rows == [1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 0}, "top_k"),
        ({"dedup_threshold": 0.0}, "dedup_threshold"),
        ({"dedup_threshold": 1.5}, "dedup_threshold"),
        ({"min_side": -1}, "min_side"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "min_aspect"),
        ({"treshold": 0.5}, "treshold"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        SelectionConfig(**kwargs)
