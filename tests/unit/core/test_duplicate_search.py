"""The near-duplicate search by hash buckets finds exactly what the every-pair scan finds.

``find_duplicates(search="hash")`` tests only the pairs whose 64-bit dHashes agree on one of
``max_hamming + 1`` bit ranges (multi-index hashing); ``search="scan"`` every pair's cosine. Both
must give the same marks, on libraries built to stress the bucket path: hashes drawn from small
pools (big buckets), pairs exactly ``max_hamming`` bits apart with one flipped bit in each range
but one, heavy buckets scanned by matrix products, exact copies, capture times and one exposure
recorded twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from keeper_core import grouping
from keeper_core.grouping import GroupingConfig, find_duplicates


def _ranges(max_hamming: int) -> list[tuple[int, int]]:
    """(shift, width) of the bit ranges, as the search cuts them."""
    k, out, shift = max_hamming + 1, [], 0
    for i in range(k):
        width = 64 // k + (1 if i < 64 % k else 0)
        out.append((shift, width))
        shift += width
    return out


def _library(seed: int, n: int, max_hamming: int) -> dict[str, Any]:
    """Bursts, cross-group copies at the Hamming bound, exact copies, times and exposures."""
    rng = np.random.default_rng(seed)
    d = 16
    n_bursts = n // 3
    burst = np.sort(rng.integers(0, n_bursts, size=n))
    base = rng.normal(size=(n_bursts, d))
    emb = base[burst] + rng.normal(scale=rng.choice([0.02, 0.3]), size=(n, d))
    # Few distinct hashes: many rows share buckets, and some buckets are heavy.
    pool = rng.integers(-(2**63), 2**63 - 1, size=max(2, n // 40), dtype=np.int64)
    hashes = pool[rng.integers(0, len(pool), size=n)].view(np.uint64)
    flips = rng.integers(0, max_hamming + 3, size=n)
    for k in range(int(flips.max())):
        rows = np.flatnonzero(flips > k)
        hashes[rows] ^= np.uint64(1) << rng.integers(0, 64, size=len(rows)).astype(np.uint64)
    groups = burst.copy()
    # Copies in their own groups, exactly max_hamming bits from their source, one bit in each
    # range but one (the range they agree on is drawn): the pigeonhole's edge.
    ranges = _ranges(max_hamming)
    src = rng.choice(n, size=n // 10, replace=False)
    cp_hash = hashes[src].copy()
    for j in range(len(src)):
        spared = int(rng.integers(len(ranges)))
        for r, (shift, width) in enumerate(ranges):
            if r != spared and width:
                cp_hash[j] ^= np.uint64(1) << np.uint64(shift + int(rng.integers(width)))
    cp_emb = emb[src] + rng.normal(scale=0.001, size=(len(src), d))
    emb = np.concatenate([emb, cp_emb])
    hashes = np.concatenate([hashes, cp_hash])
    groups = np.concatenate([groups, n_bursts + np.arange(len(src))])
    ids = [f"id{i}" for i in range(len(groups))]
    for i in rng.choice(len(ids), size=len(ids) // 20, replace=False):  # exact copies
        ids[i] = ids[int(rng.integers(len(ids)))]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    m = len(groups)
    t = np.cumsum(rng.exponential(5.0, size=n_bursts + len(src)))
    moments = t[groups] + rng.choice([0.0, 0.0, 100.0], size=m)
    moments[rng.random(m) < 0.2] = np.nan
    cameras = [str(c) for c in rng.integers(0, 2, size=m)]
    return {
        "image_id": ids,
        "embeddings": emb.astype(np.float32),
        "groups": groups,
        "order_key": [f"u/{i:05d}.jpg" for i in range(m)],
        "prefer": rng.integers(0, 3, size=m).astype(float),
        "hashes": hashes.view(np.int64),
        "moments": moments,
        "offsets": np.where(rng.random(m) < 0.5, 7200.0, np.nan),
        "cameras": cameras,
        "subsecond": rng.random(m) < 0.8,
        "sequences": np.where(rng.random(m) < 0.3, rng.integers(0, 3, size=m), np.nan),
    }


def _marks(lib: dict[str, Any], config: GroupingConfig, search: str) -> tuple[Any, Any]:
    args = dict(lib)
    dup, kind = find_duplicates(
        args.pop("image_id"),
        args.pop("embeddings"),
        args.pop("groups"),
        args.pop("order_key"),
        config,
        search=search,  # type: ignore[arg-type]
        **args,
    )
    return dup, kind


@pytest.mark.parametrize("seed", range(12))
def test_hash_buckets_mark_what_the_scan_marks(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    max_hamming = [0, 1, 4, 4, 7, 12][seed % 6]
    config = GroupingConfig(
        near_duplicate_max_hamming=max_hamming,
        near_duplicate_similarity=[0.9, 0.98, 0.999][seed % 3],
        max_gap_s=[2.0, 30.0][seed % 2],
    )
    # Small heavy buckets, so the matrix-product path inside the bucket search runs too.
    monkeypatch.setattr(grouping, "_HEAVY_BUCKET", [4, 16, 2048][seed % 3])
    monkeypatch.setattr(grouping, "_EDGE_BATCH", [3, 1 << 22][seed % 2])
    lib = _library(seed, 600, max_hamming)
    dup_hash, kind_hash = _marks(lib, config, "hash")
    dup_scan, kind_scan = _marks(lib, config, "scan")
    assert kind_hash.count("near") > 0  # the copies at the bound were found: not a vacuous match
    np.testing.assert_array_equal(dup_hash, dup_scan)
    assert kind_hash == kind_scan
    np.testing.assert_array_equal(_marks(lib, config, "auto")[0], dup_scan)


def test_a_copy_at_the_hamming_bound_is_found_in_its_one_agreeing_range() -> None:
    """Two shots max_hamming bits apart, one bit in every range but the last: only that range
    puts them in one bucket, and the copy is still marked (and one bit more is not)."""
    rng = np.random.default_rng(3)
    v = rng.normal(size=8)
    emb = np.stack([v, v + 1e-4, v + 2e-4])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    h0 = np.uint64(0x1234_5678_9ABC_DEF0)
    h1 = h0
    for shift, _width in _ranges(4)[:-1]:
        h1 ^= np.uint64(1) << np.uint64(shift)
    h2 = h1 ^ (np.uint64(1) << np.uint64(63))  # one more bit, in the last range
    hashes = np.array([h0, h1, h2], dtype=np.uint64).view(np.int64)
    dup, kind = find_duplicates(
        ["a", "b", "c"],
        emb.astype(np.float32),
        np.array([0, 1, 2]),
        ["a.jpg", "b.jpg", "c.jpg"],
        GroupingConfig(near_duplicate_max_hamming=4),
        prefer=np.array([2.0, 1.0, 0.0]),
        hashes=hashes,
        search="hash",
    )
    assert dup.tolist() == [-1, 0, -1]
    assert kind == [None, "near", None]


def test_hash_search_needs_hashes_and_a_bound() -> None:
    emb = np.eye(3, dtype=np.float32)
    args: dict[str, Any] = {
        "image_id": ["a", "b", "c"],
        "embeddings": emb,
        "groups": np.arange(3),
        "order_key": ["a", "b", "c"],
    }
    with pytest.raises(ValueError, match="hash"):
        find_duplicates(**args, config=GroupingConfig(), search="hash")
    with pytest.raises(ValueError, match="hash"):
        find_duplicates(
            **args,
            config=GroupingConfig(near_duplicate_max_hamming=64),
            hashes=np.zeros(3, dtype=np.int64),
            search="hash",
        )
    with pytest.raises(ValueError, match="search"):
        find_duplicates(**args, config=GroupingConfig(), search="fast")  # type: ignore[arg-type]


def test_auto_takes_the_buckets_when_they_cost_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spread hashes: auto lists bucket pairs and never scans all rows; one shared hash (every
    pair a candidate): auto scans every pair instead."""
    calls: list[int] = []
    real = grouping._HashBuckets.close_pairs

    def close_pairs(self: Any) -> Any:
        calls.append(len(self.hashes))
        yield from real(self)

    monkeypatch.setattr(grouping._HashBuckets, "close_pairs", close_pairs)
    rng = np.random.default_rng(0)
    n = 400
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    base: dict[str, Any] = {
        "image_id": [str(i) for i in range(n)],
        "embeddings": emb,
        "groups": np.arange(n),
        "order_key": [str(i) for i in range(n)],
        "config": GroupingConfig(),
    }
    find_duplicates(**base, hashes=rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64))
    assert calls == [n]
    find_duplicates(**base, hashes=np.zeros(n, dtype=np.int64))
    assert calls == [n]  # every row in one bucket of every range: the scan is cheaper
