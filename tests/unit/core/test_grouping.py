"""Burst/scene grouping, duplicate marking and pairwise scores (keeper_core.grouping)."""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper_core.errors import DataError
from keeper_core.grouping import (
    GroupingConfig,
    copy_runs,
    find_duplicates,
    group_shots,
    pairwise_scores,
)

TIME_ONLY = GroupingConfig(min_similarity=-1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _keys(n: int) -> list[str]:
    return [f"k{i:05d}" for i in range(n)]


def _same_emb(n: int, d: int = 8) -> np.ndarray:
    return _unit(np.ones((n, d)))


def _sizes(groups: np.ndarray) -> list[int]:
    return np.bincount(groups).tolist()


# ------------------------------------------------------------------------------ group_shots


def test_chain_rule_gap_similarity_and_camera() -> None:
    a, b = np.eye(8)[0], np.eye(8)[1]
    rows = [
        # camera, time, embedding
        ("A", 0.0, a),
        ("A", 0.1, a),
        ("A", 0.2, a),
        ("A", 0.3, b),  # scene change inside a quick sequence: similarity splits it
        ("A", 0.4, b),
        ("A", 2.5, b),  # a gap longer than max_gap_s
        ("B", 0.05, a),  # another camera at the same moment, same picture: its own group
        ("B", 0.15, a),
    ]
    cams = [r[0] for r in rows]
    ts = np.array([r[1] for r in rows])
    emb = _unit(np.stack([r[2] for r in rows]))
    cfg = GroupingConfig(max_gap_s=2.0, min_similarity=0.5)
    groups = group_shots(ts, cams, emb, _keys(8), cfg)
    # Numbered by first shot's time: A@0, B@0.05, A@0.3, A@2.5.
    assert groups.tolist() == [0, 0, 0, 2, 2, 3, 1, 1]
    # Time only: the scene change is not seen.
    assert group_shots(ts, cams, emb, _keys(8), TIME_ONLY).tolist() == [0, 0, 0, 0, 0, 2, 1, 1]
    # The gap is compared with <=: exactly max_gap_s apart still chains.
    assert group_shots(np.array([0.0, 2.0]), ["A", "A"], _same_emb(2), _keys(2), cfg).tolist() == [
        0,
        0,
    ]


def test_numbering_ties_and_untimed_singletons() -> None:
    ts = np.array([np.nan, 5.0, 5.0, np.nan, 1.0, 1.1, np.nan])
    cams = ["B", "B", "A", "A", "B", "B", "A"]
    keys = ["z", "b", "c", "y", "d", "e", "x"]
    groups = group_shots(ts, cams, _same_emb(7), keys, TIME_ONLY)
    # B@1.0 first; at 5.0 camera A before B; untimed last, each alone, by camera then key.
    assert groups.tolist() == [5, 2, 1, 4, 0, 0, 3]
    # All untimed: every shot is its own group even with identical embeddings and cameras.
    alone = group_shots(np.full(5, np.nan), ["A"] * 5, _same_emb(5), _keys(5), TIME_ONLY)
    assert sorted(alone.tolist()) == [0, 1, 2, 3, 4]


def test_row_order_does_not_matter() -> None:
    rng = np.random.default_rng(7)
    n = 600
    ts = np.round(np.cumsum(rng.exponential(0.3, n)), 1)  # rounding makes equal times
    ts[rng.random(n) < 0.05] = np.nan
    cams = rng.choice(["A", "B", "C"], n).tolist()
    scene = np.cumsum(rng.random(n) < 0.1) % 3  # the picture changes now and then
    emb = _unit(0.5 * rng.normal(size=(n, 16)) + 3 * np.eye(16)[scene])
    keys = [f"/lib/{i:04d}.jpg" for i in rng.permutation(n)]
    cfg = GroupingConfig(max_gap_s=1.0, min_similarity=0.6, max_group_len=5, max_group_s=2.0)
    groups = group_shots(ts, cams, emb, keys, cfg)
    # Every rule cuts somewhere: gaps, scene changes, length and span.
    for loose in (
        {"min_similarity": -1},
        {"max_group_len": 10**6},
        {"max_group_s": 1e9},
        {"max_gap_s": 1e9},
    ):
        looser = group_shots(ts, cams, emb, keys, cfg.model_copy(update=loose))
        assert looser.max() < groups.max(), loose
    assert sorted(set(groups.tolist())) == list(range(groups.max() + 1))
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        again = group_shots(
            ts[perm], [cams[i] for i in perm], emb[perm], [keys[i] for i in perm], cfg
        )
        np.testing.assert_array_equal(again, groups[perm])


def test_group_numbers_follow_time() -> None:
    rng = np.random.default_rng(3)
    ts = np.sort(rng.uniform(0, 100, 300))
    cams = rng.choice(["A", "B"], 300).tolist()
    groups = group_shots(ts, cams, _same_emb(300), _keys(300), TIME_ONLY)
    first = [ts[groups == g].min() for g in range(groups.max() + 1)]
    assert first == sorted(first)


def test_max_group_len_splits() -> None:
    ts = np.arange(25) * 0.1
    cfg = GroupingConfig(max_gap_s=1.0, min_similarity=-1, max_group_len=10)
    assert _sizes(group_shots(ts, ["A"] * 25, _same_emb(25), _keys(25), cfg)) == [10, 10, 5]


def test_max_group_s_splits_a_time_lapse() -> None:
    ts = np.arange(300) * 2.0  # 10 minutes, a frame every 2 s: never a gap > max_gap_s
    cfg = GroupingConfig(max_gap_s=2.5, min_similarity=-1, max_group_s=30.0)
    groups = group_shots(ts, ["A"] * 300, _same_emb(300), _keys(300), cfg)
    # A group keeps shots up to 30 s after its first one: 0, 2, ..., 30 s is 16 shots.
    assert _sizes(groups) == [16] * 18 + [12]
    spans = [np.ptp(ts[groups == g]) for g in range(groups.max() + 1)]
    assert max(spans) == 30.0
    both = cfg.model_copy(update={"max_group_len": 5})
    assert max(_sizes(group_shots(ts, ["A"] * 300, _same_emb(300), _keys(300), both))) == 5


def test_fast_on_50k_shots() -> None:
    rng = np.random.default_rng(0)
    n = 50_000
    ts = np.cumsum(rng.exponential(0.6, n))  # long time-runs, so the cosines are all computed
    emb = _unit(rng.normal(size=(n, 64)) + 4.0)
    cams = rng.choice(["A", "B"], n).tolist()
    keys = [f"/lib/{i:06d}.jpg" for i in range(n)]
    start = time.process_time()  # CPU time, all threads: the work, not the load
    groups = group_shots(ts, cams, emb, keys, GroupingConfig(max_gap_s=1.0))
    elapsed = time.process_time() - start
    assert groups.shape == (n,)
    assert elapsed < 5.0, f"{elapsed:.2f} s"  # ~0.2 s here; loose for slow CI machines


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capture_ts": np.array([0.0, np.inf])}, "infinite"),
        ({"capture_ts": np.zeros((2, 1))}, "capture_ts"),
        ({"camera": ["A"]}, "camera: length"),
        ({"camera": ["A", None]}, "not strings"),
        ({"order_key": ["k", "k"]}, "repeated"),
        ({"embeddings": np.ones((2, 4), dtype=np.float32)}, "unit"),
        ({"embeddings": _same_emb(3)}, "3 rows"),
    ],
)
def test_group_shots_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {
        "capture_ts": np.array([0.0, 1.0]),
        "camera": ["A", "A"],
        "embeddings": _same_emb(2),
        "order_key": ["a", "b"],
        **kwargs,
    }
    with pytest.raises(DataError, match=match):
        group_shots(config=GroupingConfig(), **args)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_gap_s"):
        GroupingConfig(max_gap_s=0)
    with pytest.raises(ValueError, match="extra"):
        GroupingConfig(max_gap=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="min_similarity"):
        GroupingConfig(min_similarity=1.5)
    assert group_shots(
        np.zeros(0), [], np.zeros((0, 4), np.float32), [], GroupingConfig()
    ).shape == (0,)


# ------------------------------------------------------------------------------ a generated library


def _read_capture(path: str) -> tuple[float, str]:
    """(capture_ts, camera) from EXIF as a reader would: naive times as UTC, else the mtime."""
    with Image.open(path) as img:
        exif = img.getexif()
    ifd = exif.get_ifd(0x8769)
    camera = f"{exif.get(0x010F)}|{exif.get(0x0110)}|{ifd.get(0xA431)}" if 0x010F in exif else "?"
    stamp = ifd.get(0x9003)
    if stamp is None:
        return os.stat(path).st_mtime_ns / 1e9, camera
    when = datetime.strptime(stamp, "%Y:%m:%d %H:%M:%S")
    offset = ifd.get(0x9011)
    when = datetime.fromisoformat(when.isoformat() + offset) if offset else when.replace(tzinfo=UTC)
    return when.timestamp() + float("0." + ifd.get(0x9291, "0")), camera


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    pytest.importorskip("skimage")
    from keeper_core.synthetic_library import generate_library

    manifest = generate_library(
        tmp_path_factory.mktemp("library"),
        n_bursts=60,
        seed=11,
        image_size=(96, 72),
        exact_duplicates=4,
        near_duplicates=4,
        mtime_only_fraction=0.1,
    )
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def test_generated_library_groups_with_f1_above_095(library: list[dict[str, str]]) -> None:
    from keeper_core.embedding import ClipEmbedder

    ts, cams = (
        np.array(v) for v in zip(*(_read_capture(r["image_uri"]) for r in library), strict=False)
    )
    images = []
    for r in library:
        with Image.open(r["image_uri"]) as img:
            images.append(img.convert("RGB"))
    # Honest embeddings: the tiny random CLIP of the images themselves, nothing from the labels.
    emb = ClipEmbedder("keeper-tiny:random").embed_images(images)
    keys = [r["image_uri"] for r in library]
    truth = np.array([r["series_id"] for r in library])
    originals = np.array([not r["duplicate_of"] for r in library])
    assert len(set(cams[originals].tolist())) == 2
    assert originals.sum() > 200
    for cfg in (GroupingConfig(), TIME_ONLY):
        groups = group_shots(ts, cams.tolist(), emb, keys, cfg)
        precision, recall, f1 = pairwise_scores(truth[originals], groups[originals])
        assert f1 >= 0.95, (cfg, precision, recall, f1)
    # Ignoring capture time entirely (one endless run) is far worse: the figure can fail.
    lumped = GroupingConfig(max_gap_s=1e6, max_group_s=1e6, max_group_len=10**6, min_similarity=-1)
    groups = group_shots(ts, cams.tolist(), emb, keys, lumped)
    assert pairwise_scores(truth[originals], groups[originals])[2] < 0.2


def test_generated_library_bursts_timed_by_file_are_no_copy(
    library: list[dict[str, str]],
) -> None:
    # The generator's scenes without EXIF time are bursts at 5-15 frames/s timed by their files'
    # mtimes: captures, which copy_runs must leave grouped by time (its exports, 1 s apart and
    # four of them, are too few to count as a copy).
    def file_timed(path: str) -> bool:
        with Image.open(path) as img:
            return 0x9003 not in img.getexif().get_ifd(0x8769)

    ts = np.array([_read_capture(r["image_uri"])[0] for r in library])
    by_file = np.array([file_timed(r["image_uri"]) for r in library])
    shots = np.array([not r["duplicate_of"] for r in library])
    assert (by_file & shots).sum() >= 10
    assert (copy_runs(ts, by_file, GroupingConfig()) == -1).all()


def test_generated_library_exact_duplicates(library: list[dict[str, str]]) -> None:
    # Near duplicates need an embedding that tells a re-encode from a re-shoot, and none here
    # does: the tiny random CLIP puts shots of different scenes at cosine up to 0.999, and pixel
    # correlations fail on textures and noise. Near-duplicate marking is tested on constructed
    # embeddings below; here the threshold 1.0 leaves only the exact copies, which any
    # embedding finds.
    keys = [r["image_uri"] for r in library]
    position = {k: i for i, k in enumerate(keys)}
    ids, sizes, thumbs = [], [], []
    for k in keys:
        ids.append(hashlib.sha256(Path(k).read_bytes()).hexdigest())
        with Image.open(k) as img:
            sizes.append(img.width * img.height)
            thumbs.append(np.asarray(img.convert("L").resize((16, 12), Image.Resampling.BOX)))
    x = np.stack(thumbs).reshape(len(keys), -1).astype(np.float64)
    emb = _unit(x - x.mean(axis=1, keepdims=True))
    ts, cams = zip(*(_read_capture(k) for k in keys), strict=False)
    groups = group_shots(np.array(ts), list(cams), emb, keys, GroupingConfig())
    cfg = GroupingConfig(near_duplicate_similarity=1.0)
    dup, kind = find_duplicates(ids, emb, groups, keys, cfg, prefer=np.array(sizes, dtype=float))

    copies = {
        position[r["image_uri"]]: position[r["duplicate_of"]] for r in library if r["duplicate_of"]
    }
    exact = {i: s for i, s in copies.items() if ids[i] == ids[s]}
    assert len(exact) == 4
    assert len(copies) == 8
    # A byte copy shares its source's EXIF time, so it is grouped with it, and it points at the
    # camera file (equal size: the key decides, and "DCIM/..." sorts before "export/...").
    assert all(groups[i] == groups[s] for i, s in exact.items())
    assert {i: int(dup[i]) for i in np.flatnonzero(dup >= 0)} == exact
    assert {kind[i] for i in exact} == {"exact"}
    assert sum(k is not None for k in kind) == 4


# ------------------------------------------------------------------------------ find_duplicates


def test_exact_duplicates_point_at_the_preferred_copy() -> None:
    ids = ["x", "y", "x", "x", "z"]
    keys = ["c", "a", "b", "d", "e"]
    emb = _unit(np.eye(5))
    groups = np.arange(5)
    dup, kind = find_duplicates(ids, emb, groups, keys, GroupingConfig())
    # Equal prefer: first by key ("b").
    assert dup.tolist() == [2, -1, -1, 2, -1]
    assert kind == ["exact", None, None, "exact", None]
    dup, kind = find_duplicates(
        ids, emb, groups, keys, GroupingConfig(), prefer=np.array([1, 1, 1, 9, 1.0])
    )
    assert dup.tolist() == [3, -1, 3, -1, -1]
    assert kind == ["exact", None, "exact", None, None]


def test_near_duplicates_across_groups_only() -> None:
    base = np.eye(6)[:4]
    emb = _unit(
        np.stack(
            [
                base[0],
                base[0] + 0.05 * base[1],  # near row 0, another group -> near duplicate
                base[0] + 0.04 * base[2],  # near row 0 but the same group: burst sibling
                base[1],  # unlike anything
                base[0] + 0.5 * base[3],  # cosine 0.89 to row 0: not near
            ]
        )
    )
    groups = np.array([0, 1, 0, 2, 3])
    keys = _keys(5)
    cfg = GroupingConfig(near_duplicate_similarity=0.98)
    dup, kind = find_duplicates(["a", "b", "c", "d", "e"], emb, groups, keys, cfg)
    assert dup.tolist() == [-1, 0, -1, -1, -1]
    assert kind == [None, "near", None, None, None]
    # prefer decides which one is kept: the larger picture. Then row 0 and its burst sibling
    # row 2 (cosine 0.998 to row 1) are both near duplicates of it.
    dup, kind = find_duplicates(
        ["a", "b", "c", "d", "e"], emb, groups, keys, cfg, prefer=np.array([1, 4, 1, 1, 1.0])
    )
    assert dup.tolist() == [1, -1, 1, -1, -1]
    assert kind == ["near", None, "near", None, None]
    # A lower threshold catches row 4 too.
    dup, _ = find_duplicates(
        ["a", "b", "c", "d", "e"], emb, groups, keys, GroupingConfig(near_duplicate_similarity=0.85)
    )
    assert dup.tolist() == [-1, 0, -1, -1, 0]


def test_near_components_and_exact_copies() -> None:
    # A chain a~b~c across three groups is one component, kept at a; b passes the tests against
    # a and is marked, c (cosine 0.94 to a) only reached a through b: not a duplicate of a.
    # An exact copy of b keeps pointing at b (its kept copy), not into the component.
    v = np.array([1.0, 0, 0])
    w = np.array([0.985, 0.17, 0])  # cos(v, w) ~ 0.985
    u = np.array([0.94, 0.34, 0])  # cos(w, u) ~ 0.985, cos(v, u) ~ 0.94
    emb = _unit(np.stack([v, w, u, w, np.array([0, 0, 1.0])]))
    ids = ["a", "b", "c", "b", "d"]
    groups = np.array([0, 1, 2, 1, 3])
    keys = ["k0", "k1", "k2", "k3", "k4"]
    dup, kind = find_duplicates(ids, emb, groups, keys, GroupingConfig())
    assert dup.tolist() == [-1, 0, -1, 1, -1]
    assert kind == [None, "near", None, "exact", None]


def test_copies_a_chain_left_unmarked_are_marked_among_themselves() -> None:
    # k (the sharpest) is 5 dHash bits from n, n 5 from m1 and m2, which are one another's copy
    # and 10 bits from k: one component by single linkage, k kept, n marked; m1 and m2 fail
    # against k, and were both kept, where a table without k marks m2 a copy of m1.
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    emb = np.stack([base + 0.003 * rng.normal(size=64) for _ in range(4)]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cfg = GroupingConfig(near_duplicate_max_hamming=8)
    hashes = np.array([0, 0b11111, 0b1111111111, 0b1111111111], dtype=np.int64)
    dup, kind = find_duplicates(
        ["k", "n", "m1", "m2"], emb, np.arange(4), ["k", "n", "m1", "m2"], cfg,
        prefer=np.array([4.0, 3.0, 2.0, 1.0]), hashes=hashes,
    )  # fmt: skip
    assert dup.tolist() == [-1, 0, -1, 2]
    assert kind == [None, "near", None, "near"]


def test_near_duplicate_search_is_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    import keeper_core.grouping as grouping

    rng = np.random.default_rng(5)
    n = 300
    emb = _unit(rng.normal(size=(n, 32)))
    copies = rng.choice(n, 40, replace=False)
    emb[copies[20:]] = _unit(emb[copies[:20]] + 0.01 * rng.normal(size=(20, 32)))
    groups = np.arange(n)
    keys = _keys(n)
    ids = [str(i) for i in range(n)]
    full = find_duplicates(ids, emb, groups, keys, GroupingConfig())
    monkeypatch.setattr(grouping, "_BLOCK_ELEMS", 7 * n)  # 7-row blocks
    blocked = find_duplicates(ids, emb, groups, keys, GroupingConfig())
    np.testing.assert_array_equal(blocked[0], full[0])
    assert blocked[1] == full[1]
    pairs = {frozenset((i, int(j))) for i, j in enumerate(full[0]) if j >= 0}
    assert pairs == {
        frozenset((int(a), int(b))) for a, b in zip(copies[:20], copies[20:], strict=False)
    }


def test_candidate_pairs_from_an_index_give_the_full_search() -> None:
    """``pairs`` (an ANN index's k nearest per row) mark what comparing every pair marks."""
    rng = np.random.default_rng(6)
    n = 300
    emb = _unit(rng.normal(size=(n, 32)))
    copies = rng.choice(n, 40, replace=False)
    emb[copies[20:]] = _unit(emb[copies[:20]] + 0.01 * rng.normal(size=(20, 32)))
    ids = [str(i) for i in range(n)]
    ids[int(copies[0])] = ids[
        int(copies[1])
    ]  # and one exact copy: its pairs count for its kept copy
    groups, keys = np.arange(n), _keys(n)
    full = find_duplicates(ids, emb, groups, keys, GroupingConfig())
    k = 4  # the k nearest of every row, itself included, as an index returns them
    nearest = np.argsort(-(emb @ emb.T), axis=1)[:, :k]
    pairs = (np.repeat(np.arange(n), k), nearest.reshape(-1))
    by_pairs = find_duplicates(ids, emb, groups, keys, GroupingConfig(), pairs=pairs)
    np.testing.assert_array_equal(by_pairs[0], full[0])
    assert by_pairs[1] == full[1]
    none = find_duplicates(ids, emb, groups, keys, GroupingConfig(), pairs=(pairs[0][:0],) * 2)
    assert none[1].count("near") == 0
    with pytest.raises(DataError, match="pairs"):
        find_duplicates(
            ids, emb, groups, keys, GroupingConfig(), pairs=(np.array([0]), np.array([n]))
        )


def test_find_duplicates_rejects_bad_input() -> None:
    emb = _same_emb(2)
    with pytest.raises(DataError, match="groups"):
        find_duplicates(["a", "b"], emb, np.array([0.0, 1.0]), ["a", "b"], GroupingConfig())
    with pytest.raises(DataError, match="prefer"):
        find_duplicates(
            ["a", "b"],
            emb,
            np.array([0, 1]),
            ["a", "b"],
            GroupingConfig(),
            prefer=np.array([1, np.nan]),
        )
    with pytest.raises(DataError, match="order_key"):
        find_duplicates(["a", "b"], emb, np.array([0, 1]), ["a", "a"], GroupingConfig())
    dup, kind = find_duplicates(
        [], np.zeros((0, 2), np.float32), np.zeros(0, int), [], GroupingConfig()
    )
    assert dup.shape == (0,)
    assert kind == []


# ------------------------------------------------------------------------------ pairwise_scores


def _brute(true: list, pred: list) -> tuple[float, float, float]:
    both = same_t = same_p = 0
    for i, j in itertools.combinations(range(len(true)), 2):
        t, p = true[i] == true[j], pred[i] == pred[j]
        both += t and p
        same_t += t
        same_p += p
    precision = both / same_p if same_p else 1.0
    recall = both / same_t if same_t else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def test_pairwise_scores_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 60))
        true = rng.integers(0, int(rng.integers(1, 12)), n).tolist()
        pred = [f"g{v}" for v in rng.integers(0, int(rng.integers(1, 12)), n)]
        assert pairwise_scores(true, pred) == pytest.approx(_brute(true, pred)), trial
    assert pairwise_scores([1, 1, 2, 2], ["a", "a", "b", "b"]) == (1.0, 1.0, 1.0)
    assert pairwise_scores([1, 1, 1, 1], ["a", "b", "c", "d"]) == (1.0, 0.0, 0.0)
    assert pairwise_scores([1, 2, 3, 4], ["a", "a", "a", "a"]) == (0.0, 1.0, 0.0)
    assert pairwise_scores([], []) == (1.0, 1.0, 1.0)
    with pytest.raises(DataError, match="labels"):
        pairwise_scores([1, 2], [1])
