"""keeper_core.grouping on seeded random libraries, against plain references of its docstrings.

Seeded cases (``KEEPER_HISTORIES=3000`` runs more, ~2.5 min on four workers). A failure prints
its seed and input; ``KEEPER_HISTORIES=<more than the seed> pytest "<this file>::<test>[<seed>]"``
replays it. The references below are the documented contracts written out naively (Python
sorts, every pair listed, a dict union-find), never the library's vectorised code:

- ``group_shots``: bursts on several bodies (names that differ only in case, empty, non-ASCII),
  equal times, photos without a time, scene changes, every rule (gap, cosine, length, span) on
  and off with its threshold often met exactly. The labels equal the reference's, numbering
  included; every shot has one label in ``0..G-1``; a group holds one camera, no untimed shot
  beside another, no neighbour gap or cosine past its threshold, at most ``max_group_len`` shots
  and at most ``max_group_s`` of span; the same rows in another order get the same labels.
- ``copy_runs``: file-timed and EXIF-timed photos, copies milliseconds apart, batch exports,
  ties, spread-out screenshots; the runs equal the reference's and do not depend on row order.
- ``find_duplicates``: clusters of byte copies, re-encodes and re-shoots across and within
  groups, with and without dHashes, recorded moments (UTC instants and wall clocks), bodies,
  sub-seconds and frame numbers; the marks equal the reference's for every ``search`` mode and
  with the internal blocks, chunks and hash buckets shrunk to a few rows; ``pairs`` listing every
  pair is the full search and a random subset is the reference on those pairs only; row order
  does not matter.
- ``pairwise_scores``: any hashable labels (nulls one label) against an O(N^2) pair count;
  swapping the arguments swaps precision and recall; relabelling and reordering change nothing.
- Malformed input (a length off, a bad type, a repeated key, an infinite time, a bad embedding)
  is a DataError, never a grouping.

Exactness, so that ties are real ties: embeddings are sign vectors / 8 in 64 dimensions (unit
rows; every cosine a multiple of 1/32, exact in float32 whatever the summation order) and the
cosine thresholds are multiples of 1/32; times and time thresholds lie on a 1/64 s grid (epochs
up to 1.7e9 s: sums and differences exact in float64). One case in five (``float``) draws times
and thresholds anywhere instead.

Two places where the docstrings said less than the code does are read as the code does (the
docstrings now say it), pinned by a test each (``test_an_exposure_set_keeps_...``,
``test_a_file_time_that_is_no_...``). What the random tests found wrong is at the end, fixed
since, one test per bug: datetime64 times cast to float (NaT a time, nanoseconds for seconds),
and strings compared as numpy 'U' values, which drop trailing NULs.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import pytest

import keeper_core.grouping as grouping
from keeper_core.errors import DataError
from keeper_core.grouping import (
    GroupingConfig,
    copy_runs,
    find_duplicates,
    group_shots,
    pairwise_scores,
)

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "150"))
DUP_SEEDS = max(SEEDS // 2, 1)
DIM = 64  # sign vectors / 8: unit rows, cosines exact multiples of 1/32
GRID = 64  # times on a 1/64 s grid
EPOCHS = [0.0, 1_700_000_000.0, -86_400.0, 1_234_567.5]
CAMERAS = ["Canon EOS R5 012345", "canon eos r5 012345", "Sony ILCE-7M4", "", "unknown", "Ñikon Z9"]
COSINES = [-1.0, -1.0, -1.0, -0.5, 0.0, 0.5, 0.75, 7 / 8, 15 / 16, 31 / 32, 1.0]
# find_duplicates compares cosines with threshold - 1e-6 (float32 cosines of one vector can come
# out a few ulp below 1); its docstring says ">= near_duplicate_similarity". With cosines on a
# 1/32 grid the two agree.
SAME_INSTANT_S = 0.0005  # "the same instant to the millisecond" (grouping._SAME_INSTANT_S)


def pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def flipped(rng: np.random.Generator, signs: np.ndarray, k: int) -> np.ndarray:
    out = signs.copy()
    out[rng.choice(DIM, size=k, replace=False)] *= -1
    return out


def embeddings(signs: np.ndarray) -> np.ndarray:
    return (signs.reshape(-1, DIM) / 8.0).astype(np.float32)


def cosines(signs: np.ndarray) -> np.ndarray:
    """Exact cosines of sign vectors (float64 multiples of 1/32)."""
    s = signs.astype(np.int64).reshape(-1, DIM)
    return (s @ s.T) / DIM


def unique_keys(rng: np.random.Generator, n: int) -> list[str]:
    """Unique URIs whose sorted order is not the row order (and not always by number)."""
    prefix = [pick(rng, ["/lib/", "/Lib/", "s3://b/", "/lib/é/", ""]) for _ in range(n)]
    return [f"{p}{j}.jpg" for p, j in zip(prefix, rng.permutation(n).tolist(), strict=True)]


class UnionFind:
    def __init__(self, items: Sequence[int]) -> None:
        self.parent = {i: i for i in items}

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)

    def sets(self) -> list[list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for i in self.parent:
            out[self.find(i)].append(i)
        return list(out.values())


# ---------------------------------------------------------------------------------------------
# group_shots


@dataclass
class Shots:
    seed: int
    mode: str  # "grid" or "float"
    ts: np.ndarray
    cams: list[str]
    signs: np.ndarray  # (N, DIM) int8
    keys: list[str]
    cfg: GroupingConfig

    @property
    def n(self) -> int:
        return len(self.ts)

    def args(self) -> tuple[np.ndarray, list[str], np.ndarray, list[str], GroupingConfig]:
        return self.ts, self.cams, embeddings(self.signs), self.keys, self.cfg

    def permuted(self, perm: np.ndarray) -> Shots:
        p = perm.tolist()
        return replace(
            self,
            ts=self.ts[perm],
            cams=[self.cams[i] for i in p],
            signs=self.signs[perm],
            keys=[self.keys[i] for i in p],
        )

    def describe(self, got: np.ndarray | None = None, want: list[int] | None = None) -> str:
        cfg = self.cfg.model_dump(include=set(SHOT_FIELDS))
        lines = [f"seed {self.seed} ({self.mode}) N={self.n} {cfg}"]
        cos = cosines(self.signs)
        order = sorted(
            range(self.n), key=lambda i: (self.cams[i], _time_key(float(self.ts[i])), self.keys[i])
        )
        prev = None
        for i in order[:80]:
            c = (
                ""
                if prev is None or self.cams[prev] != self.cams[i]
                else f" cos_prev={cos[prev, i]}"
            )
            mark = "" if got is None else f" got={got[i]} want={None if want is None else want[i]}"
            lines.append(f"  row {i}: {self.cams[i]!r} t={self.ts[i]!r} {self.keys[i]!r}{c}{mark}")
            prev = i
        return "\n".join(lines)


SHOT_FIELDS = ("max_gap_s", "min_similarity", "max_group_len", "max_group_s")


def _time_key(t: float) -> tuple[bool, float]:
    return (math.isnan(t), 0.0 if math.isnan(t) else t)


def draw_shots(seed: int) -> Shots:
    rng = np.random.default_rng(seed)
    mode = "float" if seed % 5 == 4 else "grid"
    epoch = pick(rng, EPOCHS)
    bodies = list(rng.choice(CAMERAS, size=int(rng.integers(1, 4)), replace=False))
    steps = [0.0, 1 / 64, 1 / 16, 1 / 8, 0.5, 1.0, 1.5, 2.0, 2.0 + 1 / 64, 3.0, 31.0]
    ts: list[float] = []
    cams: list[str] = []
    signs: list[np.ndarray] = []
    clock: dict[str, float] = {}
    for _ in range(int(rng.integers(0, 9))):
        cam = pick(rng, bodies)
        if cam not in clock or rng.random() < 0.1:  # bodies interleave, now and then one too
            clock[cam] = epoch + int(rng.integers(0, 90 * GRID)) / GRID
        t = clock[cam] + pick(rng, steps[4:])  # the next scene, seconds after the last shot
        if mode == "float":
            t = clock[cam] + float(rng.uniform(0, 60))
        pace = pick(rng, steps[:7])  # a burst's frame interval; now and then a pause
        noise = pick(rng, [0, 1, 2, 4])  # sign flips of each shot from the scene's picture
        untimed_scene = rng.random() < 0.06
        base = rng.choice(np.array([-1, 1], dtype=np.int8), size=DIM)
        for k in range(int(rng.integers(1, 12))):
            if k and mode == "float":
                t += float(rng.uniform(0, pace * 1.2 if rng.random() < 0.8 else 3.5))
            elif k:
                t += pace if rng.random() < 0.8 else pick(rng, steps)
            if rng.random() < 0.05:  # the scene changes inside a quick sequence
                base = rng.choice(np.array([-1, 1], dtype=np.int8), size=DIM)
            clock[cam] = t
            ts.append(np.nan if untimed_scene or rng.random() < 0.03 else t)
            cams.append(cam)
            flips = pick(rng, [32, 64]) if rng.random() < 0.03 else int(rng.integers(noise + 1))
            signs.append(flipped(rng, base, flips))
    n = len(ts)
    if mode == "float":
        cfg = GroupingConfig(
            max_gap_s=float(rng.uniform(0.01, 4.0)),
            min_similarity=pick(rng, COSINES),
            max_group_len=pick(rng, [1, 2, 3, 5, 100]),
            max_group_s=float(pick(rng, [rng.uniform(0.01, 10.0), 1e9])),
        )
    else:
        cfg = GroupingConfig(
            max_gap_s=pick(rng, [1 / 64, 1 / 16, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 1e6, 1e6]),
            min_similarity=pick(rng, COSINES),
            max_group_len=pick(rng, [1, 2, 3, 5, 100, 100]),
            max_group_s=pick(rng, [1 / 64, 0.5, 1.0, 2.0, 5.0, 30.0, 1e9, 1e9]),
        )
    perm = rng.permutation(n)  # scenes were drawn in order; the rows come in any order
    sign_rows = np.stack(signs) if signs else np.zeros((0, DIM), dtype=np.int8)
    keys = unique_keys(rng, n)
    return Shots(seed, mode, np.asarray(ts, dtype=np.float64), cams, sign_rows, keys, cfg).permuted(
        perm
    )


def reference_groups(shots: Shots) -> list[int]:
    """group_shots' docstring: per camera, timed shots in (time, key) order; a shot starts a new
    group on a gap > max_gap_s, a cosine < min_similarity (-1: off), a group of max_group_len
    shots, or a span from the group's first shot > max_group_s; untimed shots alone. Groups
    numbered by first shot's (time, camera, key), untimed last."""
    ts, cams, keys, cfg = shots.ts.tolist(), shots.cams, shots.keys, shots.cfg
    cos = cosines(shots.signs)
    groups: list[list[int]] = []
    by_camera: dict[str, list[int]] = defaultdict(list)
    for i in range(shots.n):
        if math.isnan(ts[i]):
            groups.append([i])
        else:
            by_camera[cams[i]].append(i)
    for rows in by_camera.values():
        rows.sort(key=lambda i: (ts[i], keys[i]))
        current: list[int] = []
        for i in rows:
            if current:
                prev, first = current[-1], current[0]
                if (
                    ts[i] - ts[prev] > cfg.max_gap_s
                    or (cfg.min_similarity > -1 and cos[prev, i] < cfg.min_similarity)
                    or len(current) >= cfg.max_group_len
                    or ts[i] - ts[first] > cfg.max_group_s
                ):
                    groups.append(current)
                    current = []
            current.append(i)
        if current:
            groups.append(current)
    groups.sort(key=lambda g: (*_time_key(ts[g[0]]), cams[g[0]], keys[g[0]]))
    labels = [-1] * shots.n
    for number, g in enumerate(groups):
        for i in g:
            labels[i] = number
    return labels


def check_group_invariants(shots: Shots, got: np.ndarray, what: str) -> None:
    """What holds of any labels the docstring allows, the reference aside."""
    cfg, ts = shots.cfg, shots.ts
    assert got.shape == (shots.n,), what
    assert got.dtype == np.int64, what
    assert sorted(set(got.tolist())) == list(range(len(set(got.tolist())))), what
    cos = cosines(shots.signs)
    firsts = []
    for g in range(int(got.max()) + 1 if shots.n else 0):
        rows = sorted(np.flatnonzero(got == g).tolist(), key=lambda i: (ts[i], shots.keys[i]))
        assert len({shots.cams[i] for i in rows}) == 1, (what, g, "two cameras in one group")
        assert len(rows) <= cfg.max_group_len, (what, g)
        if len(rows) > 1:
            assert not np.isnan(ts[rows]).any(), (what, g, "an untimed shot in a group")
            assert ts[rows[-1]] - ts[rows[0]] <= cfg.max_group_s, (what, g)
            for a, b in itertools.pairwise(rows):
                assert ts[b] - ts[a] <= cfg.max_gap_s, (what, g, a, b)
                assert cfg.min_similarity == -1 or cos[a, b] >= cfg.min_similarity, (what, a, b)
        firsts.append(_time_key(ts[rows[0]]))
    assert firsts == sorted(firsts), (what, "groups not numbered in time order")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_group_shots_is_the_chain_rule_whatever_the_row_order(seed: int) -> None:
    shots = draw_shots(seed)
    got = group_shots(*shots.args())
    want = reference_groups(shots)
    if got.tolist() != want:
        pytest.fail("group_shots differs from the reference:\n" + shots.describe(got, want))
    check_group_invariants(shots, got, f"seed {seed}")
    for k in range(2):
        perm = np.random.default_rng([seed, k]).permutation(shots.n)
        again = group_shots(*shots.permuted(perm).args())
        assert again.tolist() == got[perm].tolist(), f"row order matters: {shots.describe()}"


def test_group_shots_with_tiny_cosine_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The neighbour cosines in chunks of 3 pairs: the same labels."""
    monkeypatch.setattr(grouping, "_PAIR_CHUNK", 3)
    for seed in range(0, SEEDS, 7):
        shots = draw_shots(seed)
        assert group_shots(*shots.args()).tolist() == reference_groups(shots), shots.describe()


# ---------------------------------------------------------------------------------------------
# copy_runs


@dataclass
class FileTimes:
    seed: int
    mode: str
    ts: np.ndarray
    file_time: np.ndarray
    cfg: GroupingConfig

    def describe(self) -> str:
        cfg = self.cfg.model_dump(include={"copy_gap_s", "copy_files", "copy_window_s"})
        rows = sorted(range(len(self.ts)), key=lambda i: _time_key(float(self.ts[i])))
        body = [f"  row {i}: t={self.ts[i]!r} file_time={bool(self.file_time[i])}" for i in rows]
        return "\n".join([f"seed {self.seed} ({self.mode}) N={len(self.ts)} {cfg}", *body[:80]])


def draw_file_times(seed: int) -> FileTimes:
    rng = np.random.default_rng(seed)
    mode = "float" if seed % 5 == 4 else "grid"
    epoch = pick(rng, EPOCHS)
    ts: list[float] = []
    file_time: list[bool] = []
    for _ in range(int(rng.integers(0, 7))):
        t = epoch + int(rng.integers(0, 200 * GRID)) / GRID
        step_s = pick(rng, [0.0, 1 / 64, 3 / 64, 1 / 16, 0.25, 1.0, 1.0 + 1 / 64, 5.0, 600.0])
        file_timed = rng.random() < 0.8
        for k in range(int(rng.integers(1, 14))):
            if k:
                t += float(rng.uniform(0, 2 * step_s)) if mode == "float" else step_s
            ts.append(np.nan if rng.random() < 0.05 else t)
            file_time.append(file_timed if rng.random() < 0.9 else not file_timed)
    if mode == "float":
        cfg = GroupingConfig(
            copy_gap_s=pick(rng, [0.0, float(rng.uniform(0, 0.2))]),
            copy_files=pick(rng, [2, 3, 5, 10]),
            copy_window_s=pick(rng, [0.0, float(rng.uniform(0, 20))]),
        )
    else:
        cfg = GroupingConfig(
            copy_gap_s=pick(rng, [0.0, 1 / 64, 3 / 64, 1 / 16, 0.25]),
            copy_files=pick(rng, [2, 3, 5, 10]),
            copy_window_s=pick(rng, [0.0, 0.25, 1.0, 3.0, 10.0, 10.0 + 1 / 64]),
        )
    perm = rng.permutation(len(ts))
    return FileTimes(
        seed,
        mode,
        np.asarray(ts, dtype=np.float64)[perm],
        np.asarray(file_time, dtype=bool)[perm],
        cfg,
    )


def reference_copy_runs(case: FileTimes, *, split_at_non_copies: bool = True) -> list[int]:
    """copy_runs' docstring: among file-timed photos with a time, a time is a copy's when another
    file time lies less than copy_gap_s from it (0: off), or when it lies in a span shorter than
    copy_window_s (0: off) holding copy_files file times. Runs: copy times in time order, each
    within max(copy_gap_s, copy_window_s) of the one before; the code's comment adds "a file time
    that was not a copy's between two that were ends a run too" (``split_at_non_copies``)."""
    cfg = case.cfg
    rows = [i for i in range(len(case.ts)) if case.file_time[i] and not math.isnan(case.ts[i])]
    rows.sort(key=lambda i: case.ts[i])
    t = [float(case.ts[i]) for i in rows]
    m = len(t)
    copied = [False] * m
    for i in range(m):
        if cfg.copy_gap_s > 0 and any(
            j != i and abs(t[j] - t[i]) < cfg.copy_gap_s for j in range(m)
        ):
            copied[i] = True
    if cfg.copy_window_s > 0:
        for a in range(m):  # the span starting at the a-th time
            inside = [j for j in range(m) if t[j] >= t[a] and t[j] - t[a] < cfg.copy_window_s]
            if len(inside) >= cfg.copy_files:
                for j in inside:
                    copied[j] = True
    runs = [-1] * len(case.ts)
    reach = max(cfg.copy_gap_s, cfg.copy_window_s)
    run, last = -1, None
    for pos in range(m):
        if not copied[pos]:
            if split_at_non_copies:
                last = None
            continue
        if last is None or t[pos] - t[last] > reach:
            run += 1
        runs[rows[pos]] = run
        last = pos
    return runs


@pytest.mark.parametrize("seed", range(SEEDS))
def test_copy_runs_are_the_documented_copy_times_whatever_the_row_order(seed: int) -> None:
    case = draw_file_times(seed)
    got = copy_runs(case.ts, case.file_time, case.cfg)
    want = reference_copy_runs(case)
    assert got.dtype == np.int64
    assert got.tolist() == want, f"{case.describe()}\ngot  {got.tolist()}\nwant {want}"
    perm = np.random.default_rng([seed, 1]).permutation(len(case.ts))
    again = copy_runs(case.ts[perm], case.file_time[perm], case.cfg)
    assert again.tolist() == got[perm].tolist(), f"row order matters:\n{case.describe()}"
    # Tied file times get the same mark; EXIF-timed and untimed photos are never a copy's.
    assert (got[~case.file_time | np.isnan(case.ts)] == -1).all()
    ft = case.file_time & ~np.isnan(case.ts)
    for t in set(case.ts[ft].tolist()):
        assert len(set((got[ft & (case.ts == t)] >= 0).tolist())) == 1, (case.describe(), t)


# ---------------------------------------------------------------------------------------------
# find_duplicates


@dataclass
class Dups:
    seed: int
    ids: list[str]
    signs: np.ndarray
    groups: np.ndarray
    keys: list[str]
    cfg: GroupingConfig
    prefer: np.ndarray | None = None
    hashes: np.ndarray | None = None
    moments: np.ndarray | None = None
    offsets: np.ndarray | None = None
    cameras: list[str] | None = None
    subsecond: np.ndarray | None = None
    sequences: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def kwargs(self) -> dict[str, Any]:
        return {
            "prefer": self.prefer,
            "hashes": self.hashes,
            "moments": self.moments,
            "offsets": self.offsets,
            "cameras": self.cameras,
            "subsecond": self.subsecond,
            "sequences": self.sequences,
        }

    def call(self, **extra: Any) -> tuple[np.ndarray, list[str | None]]:
        return find_duplicates(
            self.ids,
            embeddings(self.signs),
            self.groups,
            self.keys,
            self.cfg,
            **{**self.kwargs(), **extra},
        )

    def permuted(self, perm: np.ndarray) -> Dups:
        p = perm.tolist()

        def take(x: Any) -> Any:
            if x is None:
                return None
            return [x[i] for i in p] if isinstance(x, list) else x[perm]

        return Dups(
            self.seed,
            take(self.ids),
            self.signs[perm],
            self.groups[perm],
            take(self.keys),
            self.cfg,
            **{k: take(v) for k, v in self.kwargs().items()},
        )

    def describe(self) -> str:
        cfg = self.cfg.model_dump(
            include={"near_duplicate_similarity", "near_duplicate_max_hamming", "max_gap_s"}
        )
        given = [k for k, v in self.kwargs().items() if v is not None]
        lines = [f"seed {self.seed} N={self.n} {cfg} given={given}"]
        for i in range(self.n):
            extra = {
                k: (v[i] if k != "hashes" else hex(int(v[i]) & (2**64 - 1)))
                for k, v in self.kwargs().items()
                if v is not None
            }
            lines.append(
                f"  row {i}: id={self.ids[i]} group={self.groups[i]} key={self.keys[i]!r} {extra}"
            )
        cos = cosines(self.signs)
        close = [
            (i, j, cos[i, j])
            for i, j in itertools.combinations(range(self.n), 2)
            if cos[i, j] >= 0.5
        ]
        lines.append(f"  cosines >= 0.5: {close}")
        return "\n".join(lines)


def draw_dups(seed: int) -> Dups:
    """Clusters of records of one picture: shots of a burst, re-shoots minutes later, byte
    copies, and exports (a re-encode of a record, its moment kept, its offset sometimes
    dropped) in the same group or another; rows in any order."""
    rng = np.random.default_rng(seed)
    epoch = pick(rng, [1_700_000_000.0, 0.0])
    rows: list[dict[str, Any]] = []
    for c in range(int(rng.integers(0, 7))):
        cluster: list[dict[str, Any]] = []
        bits = int(rng.integers(0, 2**63)) | (int(rng.integers(2)) << 63)
        when = epoch + int(rng.integers(0, 600 * GRID)) / GRID
        group = int(pick(rng, [c, c, c, rng.integers(-2, 4), 2**40]))
        body = pick(rng, ["A", "B", "unknown"])
        offset = float(pick(rng, [np.nan, 0.0, 3600.0, -5 * 3600.0, 900.0]))
        shot = {
            "signs": rng.choice(np.array([-1, 1], dtype=np.int8), size=DIM),
            "hash": bits,
            "group": group,
            "moment": when,
            "offset": offset,
            "camera": body,
            "subsecond": bool(rng.random() < 0.8),
            "frame": float(pick(rng, [np.nan, 0.0])),
        }
        clock = when
        for _ in range(int(rng.integers(1, 10))):
            src = pick(rng, cluster) if cluster else shot
            how = pick(rng, ["sibling", "sibling", "reshoot", "copy", "export", "export"])
            row = dict(src)
            if how == "copy" and cluster:  # the same bytes, in its group or another
                row["group"] = pick(rng, [src["group"], group, int(rng.integers(-2, 4))])
                cluster.append(row)
                continue
            row["id"] = f"{len(rows) + len(cluster):02x}" + "0" * 62
            row["signs"] = flipped(rng, src["signs"], pick(rng, [0, 0, 1, 1, 2, 3, 5, 20]))
            for k in rng.choice(64, size=pick(rng, [0, 0, 1, 2, 3, 5, 12]), replace=False):
                row["hash"] ^= 1 << int(k)
            row["group"] = pick(rng, [src["group"], src["group"], group, rng.integers(-2, 4)])
            if how == "export":
                if rng.random() < 0.3 and not math.isnan(row["offset"]):
                    row["moment"] += row["offset"]  # the offset dropped: a wall clock
                    row["offset"] = np.nan
                if rng.random() < 0.15:
                    row["moment"] = np.nan  # the EXIF stripped
            else:
                step = 2.0**-12 if rng.random() < 0.1 else pick(rng, [2.0**-10, 1 / 16, 0.25])
                if how == "reshoot":
                    step = pick(rng, [1.0, 2.0, 2.0 + 1 / 64, 3.0, 300.0])
                clock += step
                row["moment"], row["offset"] = clock, offset
                row["frame"] = row["frame"] + 1 if rng.random() < 0.7 else np.nan
                row["subsecond"] = bool(rng.random() < 0.8)
                row["camera"] = pick(rng, [body, body, body, "B"])
            row["prefer"] = float(pick(rng, [0, 1, 1, 2, 1e15]))
            cluster.append(row)
        rows.extend(cluster)
    for r in rows:
        r["hash"] = r["hash"] - (1 << 64) if r["hash"] >= 1 << 63 else r["hash"]
        r.setdefault("id", "ff" + "0" * 62)
        r.setdefault("prefer", 0.0)
    rng.shuffle(rows)
    n = len(rows)

    def maybe(p: float, column: str, dtype: Any) -> Any:
        if rng.random() >= p:
            return None
        values = [r[column] for r in rows]
        return values if dtype is None else np.array(values, dtype=dtype)

    moments = maybe(0.85, "moment", np.float64)
    cfg = GroupingConfig(
        near_duplicate_similarity=pick(rng, [1.0, 31 / 32, 15 / 16, 15 / 16, 7 / 8, 0.5, -15 / 16]),
        near_duplicate_max_hamming=pick(rng, [0, 1, 2, 4, 4, 8, 64]),
        max_gap_s=pick(rng, [1 / 64, 1 / 16, 0.25, 1.0, 2.0, 3.0, 1e6]),
    )
    groups = np.array([r["group"] for r in rows], dtype=np.int64)
    if rng.random() < 0.3 and (np.abs(groups) < 2**31).all():
        groups = groups.astype(np.int32)
    return Dups(
        seed,
        ids=[r["id"] for r in rows],
        signs=np.stack([r["signs"] for r in rows]) if rows else np.zeros((0, DIM), np.int8),
        groups=groups,
        keys=unique_keys(rng, n),
        cfg=cfg,
        prefer=maybe(0.6, "prefer", np.float64),
        hashes=maybe(0.85, "hash", np.int64),
        moments=moments,
        offsets=None if moments is None else maybe(0.7, "offset", np.float64),
        cameras=maybe(0.85, "camera", None),
        subsecond=maybe(0.85, "subsecond", bool),
        sequences=maybe(0.6, "frame", np.float64),
    )


def reference_duplicates(
    d: Dups, pairs: Sequence[tuple[int, int]] | None = None
) -> tuple[list[int], list[str | None]]:
    """find_duplicates' docstring, pair by pair."""
    n, cfg = d.n, d.cfg
    cos = cosines(d.signs)
    grp = d.groups.tolist()
    pref = [0.0] * n if d.prefer is None else d.prefer.tolist()

    def rank(i: int) -> tuple[float, str]:  # the kept row is the smallest
        return (-pref[i], d.keys[i])

    def hamming(a: int, b: int) -> int:
        assert d.hashes is not None
        return bin((int(d.hashes[a]) ^ int(d.hashes[b])) & (2**64 - 1)).count("1")

    def alike(a: int, b: int) -> bool:
        if cos[a, b] < cfg.near_duplicate_similarity:
            return False
        return (
            d.hashes is None
            or cfg.near_duplicate_max_hamming >= 64
            or (hamming(a, b) <= cfg.near_duplicate_max_hamming)
        )

    def apart(a: int, b: int, gap: float) -> bool:
        """Recorded more than ``gap`` apart: instants as instants, else wall clocks; unknown
        moments are never apart."""
        if d.moments is None:
            return False
        ta, tb = float(d.moments[a]), float(d.moments[b])
        if math.isnan(ta) or math.isnan(tb):
            return False
        oa = math.nan if d.offsets is None else float(d.offsets[a])
        ob = math.nan if d.offsets is None else float(d.offsets[b])
        if math.isnan(oa) or math.isnan(ob):
            ta += 0.0 if math.isnan(oa) else oa
            tb += 0.0 if math.isnan(ob) else ob
        return abs(ta - tb) > gap

    exposures = (
        d.cameras is not None
        and d.subsecond is not None
        and d.moments is not None
        and d.hashes is not None
    )

    def one_exposure(a: int, b: int) -> bool:
        assert d.cameras is not None
        assert d.subsecond is not None
        assert d.moments is not None
        fa = math.nan if d.sequences is None else float(d.sequences[a])
        fb = math.nan if d.sequences is None else float(d.sequences[b])
        return (
            d.cameras[a] == d.cameras[b]
            and bool(d.subsecond[a] and d.subsecond[b])
            and not math.isnan(d.moments[a])
            and not math.isnan(d.moments[b])
            and not apart(a, b, SAME_INSTANT_S)
            and not (fa != fb and not math.isnan(fa) and not math.isnan(fb))
        )

    dup, kind = [-1] * n, [None] * n  # type: list[int], list[str | None]
    by_id: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        by_id[d.ids[i]].append(i)
    kept_copy = list(range(n))
    for rows in by_id.values():
        kept = min(rows, key=rank)
        for i in rows:
            kept_copy[i] = kept
            if i != kept:
                dup[i], kind[i] = kept, "exact"
    reps = [i for i in range(n) if kept_copy[i] == i]
    if pairs is None:
        candidates = set(itertools.combinations(reps, 2))
    else:  # "a pair through an exact copy counts for its kept copy"
        candidates = {(kept_copy[a], kept_copy[b]) for a, b in pairs}
        candidates = {(min(p), max(p)) for p in candidates if p[0] != p[1]}

    # "Their own components are found among them alone ... until a round marks nothing": the
    # rows a component left unmarked (they fail against its kept row) are linked again among
    # themselves only.
    pending = reps
    while len(pending) > 1:
        near = UnionFind(pending)
        inside = set(pending)
        for a, b in candidates:
            linked = grp[a] != grp[b] and alike(a, b) and not apart(a, b, cfg.max_gap_s)
            if a in inside and b in inside and linked:
                near.join(a, b)
        left = []
        for members in near.sets():
            kept = min(members, key=rank)
            for i in members:
                if i == kept or grp[i] == grp[kept]:
                    continue
                if alike(i, kept) and not apart(i, kept, cfg.max_gap_s):
                    dup[i], kind[i] = kept, "near"
                else:
                    left.append(i)
        pending = left
    if exposures:
        # "Each such set keeps its preferred row and every other member that passes these tests
        # against it points at it"; "the marks above are the same with or without it". The
        # docstring's "two rows of one group, neither marked above" is read as the code does
        # (and its commit meant): a row marked above keeps its mark, but it still belongs to
        # its exposure's set, and may be the one kept (test_an_exposure_set_kept_row_...).
        one = UnionFind(reps)
        for a, b in candidates:
            if grp[a] == grp[b] and one_exposure(a, b) and alike(a, b):
                one.join(a, b)
        for members in one.sets():
            kept = min(members, key=rank)
            for i in members:
                if i != kept and dup[i] < 0 and one_exposure(i, kept) and alike(i, kept):
                    dup[i], kind[i] = kept, "near"
    return dup, kind


def check_duplicate_invariants(d: Dups, dup: np.ndarray, kind: list[str | None], what: str) -> None:
    assert dup.shape == (d.n,), what
    assert dup.dtype == np.int64, what
    assert len(kind) == d.n, what
    for i in range(d.n):
        j = int(dup[i])
        assert (j < 0) == (kind[i] is None), (what, i)
        if j < 0:
            continue
        assert j != i, (what, i)
        assert 0 <= j < d.n, (what, i)
        if kind[i] == "exact":
            assert d.ids[i] == d.ids[j], (what, i, "an exact mark between different bytes")
        else:
            assert kind[i] == "near", (what, i)
            assert d.ids[i] != d.ids[j], (what, i)
            assert dup[j] < 0 or kind[j] == "near", (what, i, "a near mark at an exact copy")


@pytest.fixture(params=["as built", "tiny blocks"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The internal blocks, chunks, edge batches and heavy buckets shrunk to a few rows: every
    code path of the search, on inputs small enough for the reference."""
    if request.param == "tiny blocks":
        monkeypatch.setattr(grouping, "_BLOCK_ELEMS", 3 * DIM)
        monkeypatch.setattr(grouping, "_PAIR_CHUNK", 2)
        monkeypatch.setattr(grouping, "_HEAVY_BUCKET", 2)
        monkeypatch.setattr(grouping, "_EDGE_BATCH", 3)
    return str(request.param)


@pytest.mark.parametrize("seed", range(DUP_SEEDS))
def test_find_duplicates_is_the_documented_marking(seed: int, blocks: str) -> None:
    d = draw_dups(seed)
    want = reference_duplicates(d)
    modes = ["auto", "scan"]
    if d.hashes is not None and d.cfg.near_duplicate_max_hamming < 64:
        modes.append("hash")
    for search in modes:
        dup, kind = d.call(search=search)
        what = f"search={search} {blocks}\n{d.describe()}"
        check_duplicate_invariants(d, dup, kind, what)
        assert (dup.tolist(), kind) == want, (
            f"got {dup.tolist()} {kind}\nwant {want[0]} {want[1]}\n{what}"
        )


@pytest.mark.parametrize("seed", range(DUP_SEEDS))
def test_find_duplicates_pairs_and_row_order(seed: int) -> None:
    d = draw_dups(seed)
    rng = np.random.default_rng([seed, 2])
    want = reference_duplicates(d)
    everything = list(itertools.permutations(range(d.n), 2))  # both ways, as an index lists them
    a, b = (np.array([p[k] for p in everything], dtype=np.int64) for k in (0, 1))
    dup, kind = d.call(pairs=(a, b))
    assert (dup.tolist(), kind) == want, f"pairs = every pair:\n{d.describe()}"
    # A random subset, with repeats and self-pairs: only those pairs link.
    m = int(rng.integers(0, 2 * d.n + 1))
    a, b = rng.integers(0, max(d.n, 1), size=(2, m)) if d.n else np.zeros((2, 0), np.int64)
    some = list(zip(a.tolist(), b.tolist(), strict=True))
    dup, kind = d.call(pairs=(a, b))
    assert (dup.tolist(), kind) == reference_duplicates(d, some), f"pairs {some}:\n{d.describe()}"

    perm = rng.permutation(d.n)
    inverse = np.argsort(perm)
    pdup, pkind = d.permuted(perm).call()
    moved = [-1 if j < 0 else int(inverse[j]) for j in want[0]]
    assert pdup.tolist() == [moved[i] for i in perm.tolist()], f"row order matters:\n{d.describe()}"
    assert pkind == [want[1][i] for i in perm.tolist()], d.describe()


# ---------------------------------------------------------------------------------------------
# pairwise_scores


def _label_id(value: Any, ids: dict[Any, int]) -> int:
    """Python equality and hash (1 == 1.0 == True), every null one label."""
    null = value is None or value is pd.NA or value is pd.NaT
    null = null or (isinstance(value, float) and math.isnan(value))
    return ids.setdefault("<null>" if null else ("v", value), len(ids))


def reference_pairwise(true: Sequence[Any], pred: Sequence[Any]) -> tuple[float, float, float]:
    ids: dict[Any, int] = {}
    t = [_label_id(v, ids) for v in true]
    p = [_label_id(v, ids) for v in pred]
    both = same_t = same_p = 0
    for i, j in itertools.combinations(range(len(t)), 2):
        both += t[i] == t[j] and p[i] == p[j]
        same_t += t[i] == t[j]
        same_p += p[i] == p[j]
    precision = both / same_p if same_p else 1.0
    recall = both / same_t if same_t else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def draw_labels(rng: np.random.Generator, n: int) -> list[Any]:
    kind = pick(rng, ["int", "str", "mixed", "one", "distinct"])
    k = int(rng.integers(1, 8))
    if kind == "one":
        return [pick(rng, [0, "x", None])] * n
    if kind == "distinct":
        return [f"s{i}" for i in range(n)]
    if kind == "int":
        return rng.integers(-3, k, n).tolist()
    if kind == "str":
        return [f"g{v}" for v in rng.integers(0, k, n).tolist()]
    pool: list[Any] = [
        *(1, 1.0, np.int64(1), True, "1", ("cam", 1), ("cam", 2), 2**70, "é", frozenset({1})),
        *(0, -0.0, False, None, math.nan, np.float64("nan"), pd.NA, pd.NaT),
    ]
    chosen = rng.choice(len(pool), size=min(len(pool), k + 3))
    return [pool[int(i)] for i in chosen[rng.integers(0, len(chosen), n)]]


def as_container(rng: np.random.Generator, labels: list[Any]) -> Any:
    how = pick(rng, ["list", "tuple", "array", "series"])
    if how == "tuple":
        return tuple(labels)
    if how == "array":
        arr = np.empty(len(labels), dtype=object)
        arr[:] = labels
        return arr
    if how == "series":
        return pd.Series(labels, index=rng.permutation(len(labels)) + 7, dtype=object)
    return labels


@pytest.mark.parametrize("seed", range(SEEDS))
def test_pairwise_scores_count_every_pair(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(pick(rng, [0, 1, 2, 3, int(rng.integers(4, 60))]))
    true, pred = draw_labels(rng, n), draw_labels(rng, n)
    what = f"seed {seed}: true={true!r} pred={pred!r}"
    got = pairwise_scores(as_container(rng, true), as_container(rng, pred))
    want = reference_pairwise(true, pred)
    assert got == pytest.approx(want, abs=1e-12), what
    assert all(isinstance(x, float) and 0.0 <= x <= 1.0 for x in got), what
    p, r, f = got
    assert pairwise_scores(pred, true) == pytest.approx((r, p, f), abs=1e-12), what
    assert pairwise_scores(true, true) == (1.0, 1.0, 1.0), what
    perm = rng.permutation(n).tolist()
    moved = pairwise_scores([true[i] for i in perm], [pred[i] for i in perm])
    assert moved == pytest.approx(got, abs=1e-12), what
    codes: dict[Any, int] = {}
    renamed = [f"new{_label_id(v, codes)}" for v in pred]
    assert pairwise_scores(true, renamed) == pytest.approx(got, abs=1e-12), what
    with pytest.raises(DataError):
        pairwise_scores(true, [*pred, "extra"])


# ---------------------------------------------------------------------------------------------
# malformed input

Corruption = Callable[[dict[str, Any], np.random.Generator], None]


def _row(args: dict[str, Any], rng: np.random.Generator) -> int:
    return int(rng.integers(len(args["camera"])))


def _set(name: str, make: Callable[[dict[str, Any], np.random.Generator], Any]) -> Corruption:
    def corrupt(args: dict[str, Any], rng: np.random.Generator) -> None:
        args[name] = make(args, rng)

    corrupt.__name__ = name
    return corrupt


def _at(name: str, value: Any) -> Corruption:
    """One entry of a list or array set to ``value``."""

    def corrupt(args: dict[str, Any], rng: np.random.Generator) -> None:
        x = args[name]
        i = _row(args, rng)
        if isinstance(x, list):
            args[name] = [value if k == i else v for k, v in enumerate(x)]
        else:
            x = x.astype(np.result_type(x.dtype, np.asarray(value).dtype), copy=True)
            x[i] = value
            args[name] = x

    corrupt.__name__ = f"{name}[i]={value!r}"
    return corrupt


SHOT_CORRUPTIONS: list[Corruption] = [
    _at("capture_ts", np.inf),
    _at("capture_ts", -np.inf),
    _set("capture_ts", lambda a, r: a["capture_ts"][:-1]),
    _set("capture_ts", lambda a, r: np.append(a["capture_ts"], 1.0)),
    _set("capture_ts", lambda a, r: a["capture_ts"].reshape(-1, 1)),
    _set("capture_ts", lambda a, r: ["noon"] * len(a["camera"])),
    _at("camera", None),
    _at("camera", 7),
    _at("camera", b"Canon"),
    _at("camera", math.nan),
    _set("camera", lambda a, r: a["camera"][1:]),
    _set("order_key", lambda a, r: [*a["order_key"][:-1], a["order_key"][0]]),
    _at("order_key", None),
    _set("order_key", lambda a, r: a["order_key"][:-1]),
    _set("embeddings", lambda a, r: a["embeddings"].astype(np.float64)),
    _set("embeddings", lambda a, r: a["embeddings"][:-1]),
    _set("embeddings", lambda a, r: a["embeddings"].tolist()),
    _set("embeddings", lambda a, r: a["embeddings"].reshape(-1)),
    _set("embeddings", lambda a, r: a["embeddings"] * np.float32(1.1)),
    _set("embeddings", lambda a, r: a["embeddings"][:, :0]),
    _at("embeddings", np.nan),
]


@pytest.mark.parametrize("seed", range(max(SEEDS // 4, len(SHOT_CORRUPTIONS))))
def test_malformed_shots_are_a_data_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shots = draw_shots(seed)
    while shots.n < 2:
        shots = draw_shots(int(rng.integers(10**6)))
    ts, cams, emb, keys, cfg = shots.args()
    args = {"capture_ts": ts, "camera": cams, "embeddings": emb, "order_key": keys}
    corrupt = SHOT_CORRUPTIONS[seed % len(SHOT_CORRUPTIONS)]
    corrupt(args, rng)
    try:
        group_shots(config=cfg, **args)
    except DataError:
        return
    pytest.fail(f"{corrupt.__name__} was grouped: {shots.describe()}")


DUP_CORRUPTIONS: list[Corruption] = [
    _at("image_id", None),
    _set("image_id", lambda a, r: a["image_id"][:-1]),
    _set("order_key", lambda a, r: [*a["order_key"][:-1], a["order_key"][0]]),
    _set("groups", lambda a, r: a["groups"].astype(np.float64)),
    _set("groups", lambda a, r: a["groups"][:-1]),
    _set("groups", lambda a, r: a["groups"].astype(bool)),
    _set("embeddings", lambda a, r: a["embeddings"].astype(np.float64)),
    _set("embeddings", lambda a, r: a["embeddings"][:-1]),
    _set("prefer", lambda a, r: np.ones(len(a["camera"]) - 1)),
    _at("prefer", np.nan),
    _at("prefer", np.inf),
    _set("hashes", lambda a, r: a["hashes"][:-1]),
    _set("moments", lambda a, r: a["moments"][:-1]),
    _set("offsets", lambda a, r: a["offsets"][:-1]),
    _at("cameras", None),
    _set("cameras", lambda a, r: a["cameras"][:-1]),
    _set("subsecond", lambda a, r: a["subsecond"].astype(np.int64)),
    _set("subsecond", lambda a, r: a["subsecond"][:-1]),
    _set("sequences", lambda a, r: a["sequences"][:-1]),
    _set("sequences", lambda a, r: ["third"] * len(a["camera"])),
    _set("pairs", lambda a, r: (np.array([0]), np.array([len(a["camera"])]))),
    _set("pairs", lambda a, r: (np.array([-1]), np.array([0]))),
    _set("pairs", lambda a, r: (np.array([0, 1]), np.array([1]))),
]


@pytest.mark.parametrize("seed", range(max(SEEDS // 4, len(DUP_CORRUPTIONS))))
def test_malformed_duplicate_input_is_a_data_error(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = draw_dups(seed)
    while d.n < 2:
        d = draw_dups(int(rng.integers(10**6)))
    n = d.n
    args: dict[str, Any] = {
        "image_id": d.ids,
        "embeddings": embeddings(d.signs),
        "groups": d.groups,
        "order_key": d.keys,
        "prefer": np.ones(n),
        "hashes": np.arange(n, dtype=np.int64),
        "moments": np.zeros(n),
        "offsets": np.zeros(n),
        "cameras": ["A"] * n,
        "camera": ["A"] * n,  # the row count, for the corruptions
        "subsecond": np.ones(n, dtype=bool),
        "sequences": np.zeros(n),
        "pairs": None,
    }
    corrupt = DUP_CORRUPTIONS[seed % len(DUP_CORRUPTIONS)]
    corrupt(args, rng)
    del args["camera"]
    try:
        find_duplicates(config=d.cfg, **args)
    except DataError:
        return
    pytest.fail(f"{corrupt.__name__} was marked: {d.describe()}")


@pytest.mark.parametrize(
    ("capture_ts", "file_time"),
    [
        (np.array([0.0, np.inf]), np.array([True, True])),
        (np.array([0.0, 1.0]), np.array([1, 1])),
        (np.array([0.0, 1.0]), np.array([True])),
        (np.array([0.0, 1.0]), [[True, True]]),
        (np.zeros((2, 1)), np.array([True, True])),
    ],
)
def test_malformed_copy_runs_input_is_a_data_error(capture_ts: Any, file_time: Any) -> None:
    with pytest.raises(DataError):
        copy_runs(capture_ts, file_time, GroupingConfig())


# ---------------------------------------------------------------------------------------------
# readings of the docstrings the references rely on, pinned


def test_an_exposure_set_keeps_its_preferred_row_even_when_that_row_is_marked_above() -> None:
    """x (group 0) and y1 (group 1, cosine 31/32) are near duplicates: y1 -> x. y2 is y1's
    exposure recorded twice in group 1 (same body and instant), cosine 31/32 to y1 but 15/16 to
    x. y2 points at y1, which points at x (``culling.follow_marks`` follows the chain): the
    docstring's "two rows of one group, neither marked above" read literally would leave y2
    unmarked, the keeper of group 1 beside its own copy x."""
    rng = np.random.default_rng(0)
    x = rng.choice(np.array([-1, 1], dtype=np.int8), size=DIM)
    y1, y2 = x.copy(), x.copy()
    y1[0] *= -1
    y2[:2] *= -1
    dup, kind = find_duplicates(
        ["x", "y1", "y2"],
        embeddings(np.stack([x, y1, y2])),
        np.array([0, 1, 1]),
        ["a", "b", "c"],
        GroupingConfig(near_duplicate_similarity=31 / 32),
        hashes=np.array([5, 5, 5]),
        moments=np.array([100.0, 100.0, 100.0]),
        cameras=["A", "A", "A"],
        subsecond=np.array([True, True, True]),
    )
    assert dup.tolist() == [-1, 0, 1]
    assert kind == [None, "near", "near"]


def test_a_file_time_that_is_no_copy_ends_a_run() -> None:
    """Two copied pairs 9 s apart, within copy_window_s, with a lone file time between them:
    two runs (the code's comment), where the docstring's "each within max(copy_gap_s,
    copy_window_s) of the one before" alone would make one."""
    ts = np.array([0.0, 0.01, 5.0, 9.0, 9.01])
    runs = copy_runs(ts, np.ones(5, dtype=bool), GroupingConfig())
    assert runs.tolist() == [0, 0, -1, 1, 1]


# ---------------------------------------------------------------------------------------------
# bugs found by the random tests, each its smallest input


def test_datetime64_capture_times_are_read_as_seconds_and_nat_as_unknown() -> None:
    """Once cast to float64 as they were: NaT became -9.2e18 s, a time, so shots without one
    chained into one group, and real times counted in ns (shots 1 s apart split)."""
    ts = np.array(
        ["NaT", "NaT", "2024-06-01T12:00:00", "2024-06-01T12:00:00.02"], dtype="datetime64[ns]"
    )
    seconds = np.array([np.nan, np.nan, 1717243200.0, 1717243200.02])
    emb, keys = embeddings(np.ones((4, DIM))), ["a", "b", "c", "d"]
    groups = group_shots(ts, ["A"] * 4, emb, keys, GroupingConfig())
    assert groups.tolist() == group_shots(seconds, ["A"] * 4, emb, keys, GroupingConfig()).tolist()
    assert groups[0] != groups[1]
    assert groups[2] == groups[3]
    assert (copy_runs(ts, np.ones(4, dtype=bool), GroupingConfig()) == [-1, -1, 0, 0]).all()
    with pytest.raises(DataError, match="timedelta64"):
        group_shots(ts - ts[2], ["A"] * 4, emb, keys, GroupingConfig())


@pytest.mark.parametrize("argument", ["camera", "order_key", "image_id"])
def test_strings_that_differ_by_a_trailing_nul_stay_different(argument: str) -> None:
    emb = embeddings(np.ones((2, DIM)))
    if argument == "camera":  # two bodies: never one group
        groups = group_shots(
            np.array([0.0, 0.1]), ["A", "A\x00"], emb, ["a", "b"], GroupingConfig()
        )
        assert groups[0] != groups[1]
    elif argument == "order_key":  # two unique keys: no "repeated value" error
        group_shots(np.array([0.0, 0.1]), ["A", "A"], emb, ["a", "a\x00"], GroupingConfig())
    else:  # two files: not exact copies
        _, kind = find_duplicates(
            ["x", "x\x00"], emb, np.array([0, 1]), ["a", "b"], GroupingConfig()
        )
        assert "exact" not in kind  # (same embeddings: near duplicates, not one file)
