"""keeper_core.vector_index against a plain reference (a dict and a matmul) over random histories.

Seeded histories (``KEEPER_HISTORIES=2000`` runs more; a failure names its seed, backend, mode
and last steps, and replays alone as ``KEEPER_HISTORIES=<more than the seed> pytest
'tests/unit/core/test_vector_index_random.py::test_vector_index_random_history[<seed>]'``),
each on one backend and dtype (exact f32 / f16, f16 also as ``choose_backend`` picks it; faiss
f32 / f16; usearch f32 / f16 / i8) at 1-64 dimensions (HNSW: 8-33) and up to a few hundred
rows. The reference holds each live id's vector as given, in the index's row order; what the
dtype stores of it is numpy's rounding; its search is brute force in float64 (usearch's metric
is the cosine: its rows and queries are normalised first). Steps, any of them refused:

- ``add`` (new ids, ids removed before, copies of live rows and of each other, nothing;
  refused: an id present or repeated within the call, a count mismatch, a wrong dimension, a
  non-unit, zero or non-finite row, a 1-D, 3-D or integer array), ``replace`` and ``remove``
  (an id named twice, everything, nothing; refused: an absent id, bad rows, and on an HNSW
  graph anything), ``search`` (Q of 1-12; one query as a 1-D array, in a list, float64,
  Fortran order; k from 1 to ``len``; refused: k of 0, -1 or past ``len``, any k on an empty
  index, another model spec, a wrong dimension, non-unit, non-finite or integer queries),
  ``vectors`` (repeats, nothing; an absent id: KeyError), a rebuild of the reference's rows
  (refused first: no rows, repeated ids, no model spec), ``save`` and ``load`` (one folder again
  or another, an empty index too; an earlier folder loads what was saved there; a save under a
  file and a load of an empty folder are StorageErrors). Some exact histories search their
  queries in passes of 1-4 and swap the float16 gemv / GEMM paths (``_GEMV_MAX_Q``).
- After every step: ``len``, ``ids`` (row order: kept rows in place, added rows after in the
  order given: an HNSW add under 200 rows holds none out to calibrate), ``vectors`` bit for bit
  as the dtype stores (faiss f16 rounds a tie away from zero; i8: within its rounding, as a
  direction), ``memory_bytes`` (exact: rows x dim x bytes; faiss: the same after a reload) and
  the metadata are the reference's. Arrays handed in or out are not the index's.
- A refused call raises exactly the type the reference predicts and changes nothing: ids,
  vectors, metadata (``updated_at`` too), ``memory_bytes`` and a probe search's answer are as
  before. A call with nothing to do (an empty add, replace or remove) changes nothing either.
- Exact search is brute force. Half the exact histories use "dyadic" rows (entries 0, +-1,
  +-1/2, +-1/4, +-1/8, unit norm exactly): every product is a multiple of 1/64, so scores are
  exact in float16 and float32 in any summation order and compared bit for bit, and ties (copies,
  opposites, 1-3 dimensions) are real: above the k-th score the ids are brute force's exactly,
  at it any of the tied ones (the order among equal scores is not documented). Gaussian rows
  are compared within the dtype's rounding.
- An HNSW search answers live ids, each once, best first, each score its id's cosine (within
  the dtype's rounding), and its recall@k against brute force (a tie with the k-th a hit)
  averages >= 0.9: these indexes stay under 200 rows, so uncalibrated and searched by a scan
  of their rows unless ``ef_search`` was given (then through the graph). Their copies are near
  copies (1e-3 apart) and m is 16 or 32: byte-identical rows in a graph of small m are not
  reachable through the graph (a test at the end: the scan reaches them).
- Asked twice, a search answers alike; a query searched alone answers as in its batch; a saved
  index loads back with the same metadata, rows and answers.

What the histories found is pinned at the end, fixed since: an exact search of no queries
crashed, replace kept one of two vectors given one id, faiss refused a numpy integer k, and a
small HNSW index was not searched exhaustively although its docstring said so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keeper_core import storage, vector_index
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.vector_index import (
    META_FILE,
    IndexParams,
    SearchResult,
    VectorIndex,
    build,
)

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "36"))
STEPS = 28
SPEC = "ViT-B-32:laion2b_s34b_b79k"
OTHER_SPEC = "ViT-L-14:openai"
KINDS = [
    ("exact", "f32"),
    ("exact", "f16"),
    ("exact", "f32"),
    ("exact", "auto"),  # params=None: choose_backend's exact f16
    ("faiss", "f32"),
    ("faiss", "f16"),
    ("usearch", "f32"),
    ("usearch", "f16"),
    ("usearch", "i8"),
]
STEP_KINDS = (
    ["add"] * 5
    + ["replace"] * 2
    + ["remove"] * 2
    + ["search"] * 5
    + ["vectors", "save", "save", "load_earlier", "rebuild"]
)
NORM_TOL = 1e-3  # vector_index._NORM_TOL: rows this far from unit norm are refused
BYTES = {"f32": 4, "f16": 2, "i8": 1}
#: |score - brute force| for Gaussian rows (dyadic rows on the exact backend: 0). float16: the
#: stored row and (below 9 queries) the query and the product are rounded to 11 bits.
SCORE_TOL = {"f32": 1e-5, "f16": 2e-3, "i8": 3e-2}
I8_TOL = 2e-2  # |stored - given| per component of an i8 row rescaled to unit norm
HNSW_MAX = 190  # rows: under 200 an HNSW index is not calibrated, and searched at ef 4096
MIN_RECALL = 0.9  # mean over a history's HNSW searches (measured: 0.99-1.0)


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def fewest(units: int) -> int:
    """Entries needed for ``units`` / 64 of squared norm with squares 1, 1/4, 1/16, 1/64."""
    n = 0
    for sq in (64, 16, 4, 1):
        n, units = n + units // sq, units % sq
    return n


def dyadic(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Unit rows of entries 0, +-1, +-1/2, +-1/4, +-1/8: products and their sums are exact."""
    out = np.zeros((n, dim), np.float32)
    for row in out:
        left, free = 64, rng.permutation(dim).tolist()
        while left:
            fits = [m for m in (8, 4, 2, 1) if m * m <= left and fewest(left - m * m) < len(free)]
            m = pick(rng, fits)
            row[free.pop()] = pick(rng, [-1, 1]) * m / 8
            left -= m * m
    return out


def gaussian(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Clustered unit rows; a few off unit norm by up to 5e-4 (accepted, stored as given)."""
    centres = rng.standard_normal((max(1, n // 4), dim))
    eps = np.array([pick(rng, [1e-3, 0.05, 0.3, 3.0]) for _ in range(n)])
    x = centres[rng.integers(0, len(centres), n)] + eps[:, None] * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    off = rng.random(n) < 0.2
    x[off] *= 1 + rng.uniform(-5e-4, 5e-4, (int(off.sum()), 1))
    return x.astype(np.float32)


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """What exact / faiss / usearch f32 and f16 hand back of ``x`` (i8: not modelled)."""
    return x.astype(np.float16).astype(np.float32) if dtype == "f16" else x.copy()


def bad_rows(x: Any, dim: int, *, queries: bool = False) -> bool:
    """``_check_vectors``'s refusal, as its docstring and errors describe it."""
    a = np.asarray(x)
    if a.ndim == 1 and queries:
        a = a[None, :]
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating) or a.shape[1] != dim:
        return True
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        return True
    return bool((np.abs(np.linalg.norm(a, axis=1) - 1) > NORM_TOL).any())


class History:
    def __init__(self, seed: int, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seed, self.tmp, self.mp = seed, tmp, monkeypatch
        self.rng = np.random.default_rng(seed)
        self.backend, dtype = KINDS[seed % len(KINDS)]
        self.auto = dtype == "auto"
        self.dtype = "f16" if self.auto else dtype
        self.exact = self.backend == "exact"
        self.mode = "dyadic" if self.rng.random() < (0.5 if self.exact else 0.3) else "gaussian"
        dims = [1, 2, 3, 8, 16, 33, 64] if self.exact else [8, 16, 33]
        self.dim = int(pick(self.rng, dims))
        # Dyadic scores are exact on the exact backend; usearch computes cosines with its own
        # normalisation, faiss sums in its own order, i8 rounds: tolerances there.
        self.tol = 0.0 if self.exact and self.mode == "dyadic" else SCORE_TOL[self.dtype]
        self.given: dict[str, np.ndarray] = {}  # live id -> vector as given, in row order
        self.gone: list[str] = []  # ids removed, to add again
        self.saved: dict[str, tuple[dict[str, np.ndarray], dict[str, Any], int]] = {}
        self.version = 0  # of the index in memory: what a save there holds
        self.fresh = 0
        self.hits: list[float] = []
        self.log: list[str] = []
        self.index: VectorIndex

    def msg(self, what: str) -> str:
        tail = "\n  ".join(self.log[-14:])
        head = f"seed {self.seed} ({self.backend} {self.dtype} {self.mode} d={self.dim})"
        return f"{head}: {what}\n  {tail}"

    # -- drawing -------------------------------------------------------------------------------

    def rows(self, n: int) -> np.ndarray:
        x = (dyadic if self.mode == "dyadic" else gaussian)(self.rng, n, self.dim)
        for i in range(n):
            r = self.rng.random()
            if r < 0.15 and self.given:  # a copy of a live row
                x[i] = self.given[pick(self.rng, list(self.given))]
            elif r < 0.25 and i:  # of a row earlier in the batch, or its opposite
                x[i] = pick(self.rng, [1, -1]) * x[int(self.rng.integers(i))]
            else:
                continue
            if not self.exact:  # byte-identical rows cut a graph of small m
                x[i] += self.rng.normal(0, 1e-3, self.dim).astype(np.float32)
                x[i] /= np.linalg.norm(x[i])
        return x

    def new_ids(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            self.fresh += 1
            r = self.rng.random()
            if r < 0.1 and self.gone and self.exact:
                out.append(self.gone.pop(int(self.rng.integers(len(self.gone)))))
            else:  # awkward but legal ids: Parquet and the row map take any string
                kind = pick(self.rng, ["p{}", "p{}", "s3://b/é {}.jpg", " {}", "a\x00{}", "日本{}"])
                out.append(kind.format(self.fresh))
        return list(dict.fromkeys(out))  # a removed id drawn twice: once

    def live(self, n: int) -> list[str]:
        ids = list(self.given)
        return [ids[i] for i in self.rng.permutation(len(ids))[:n]]

    def absent(self) -> str:
        return pick(self.rng, [*self.gone[:3], "never-added", "p0", ""])

    def params(self) -> IndexParams | None:
        if self.auto:
            return None
        if self.exact:
            return IndexParams(backend="exact", dtype=self.dtype)
        return IndexParams(
            backend=self.backend,
            dtype=self.dtype,
            # m 4-8 on copies is not searched exhaustively through the graph (ef_search given).
            m=int(pick(self.rng, [16, 32])),
            ef_construction=int(pick(self.rng, [8, 40, 64])),
            ef_search=pick(self.rng, [None, None, None, 64]),
        )

    # -- the reference -------------------------------------------------------------------------

    def want_vectors(self, ids: list[str]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), np.float32)
        return stored(np.stack([self.given[i] for i in ids]), self.dtype)

    def truth(self, q: np.ndarray) -> np.ndarray:
        """(Q, N) float64 scores of the queries against the stored rows, in row order: inner
        products (exact, faiss), cosines (usearch's metric: rows up to ``NORM_TOL`` off unit
        norm score up to that much apart)."""
        rows = self.want_vectors(list(self.given)).astype(np.float64)
        q = q.astype(np.float64)
        if self.backend == "usearch":
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return q @ rows.T

    def expect_add(self, x: Any, ids: list[str]) -> type[Exception] | None:
        if bad_rows(x, self.dim):
            return DataError
        new = [str(i) for i in ids]
        if len(new) != len(x) or len(set(new)) != len(new) or set(new) & set(self.given):
            return DataError
        return None

    def expect_replace(self, x: Any, ids: list[str]) -> type[Exception] | None:
        if not self.exact or bad_rows(x, self.dim) or len(ids) != len(x):
            return DataError
        if len(set(ids)) != len(ids):  # which vector would win is torch's choice: refused
            return DataError
        return DataError if set(ids) - set(self.given) else None

    def expect_remove(self, ids: list[str]) -> type[Exception] | None:
        return DataError if not self.exact or set(ids) - set(self.given) else None

    def expect_search(self, q: Any, k: int, spec: str) -> type[Exception] | None:
        if spec != SPEC or bad_rows(q, self.dim, queries=True):
            return DataError
        return ConfigError if not 1 <= k <= len(self.given) else None

    # -- checks --------------------------------------------------------------------------------

    def snapshot(self, ix: VectorIndex | None = None) -> tuple[Any, ...]:
        """Everything a refused call must leave as it was, as comparable values."""
        ix = self.index if ix is None else ix
        probe: tuple[Any, ...] = ()
        if len(ix):
            q = np.zeros((1, self.dim), np.float32)
            q[0, 0] = 1.0
            got = ix.search(q, min(3, len(ix)), model_spec=SPEC)
            probe = (got.ids, got.scores.tobytes())
        vecs = ix.vectors(ix.ids)
        return ix.ids, ix.meta.model_dump(), vecs.tobytes(), vecs.shape, ix.memory_bytes(), probe

    def refused(self, what: str, call: Callable[[], object], exc: type[Exception]) -> None:
        """``call`` raises exactly ``exc`` and leaves the index as it was."""
        self.log.append(f"refused? {what}")
        before = self.snapshot()
        try:
            call()
        except Exception as e:
            if type(e) is not exc:
                e.add_note(self.msg(f"{what}: raised {type(e).__name__}, want {exc.__name__}"))
                raise
        else:
            pytest.fail(self.msg(f"{what}: not refused (want {exc.__name__})"))
        assert self.snapshot() == before, self.msg(f"{what}: refused, but the index changed")

    def check(self, ix: VectorIndex | None = None, given: dict | None = None) -> None:
        """The index holds the reference's rows, in its order, as the dtype stores them."""
        ix = self.index if ix is None else ix
        given = self.given if given is None else given
        ids = list(given)
        assert len(ix) == ix.meta.count == len(ids), self.msg(f"len {len(ix)} != {len(ids)}")
        assert ix.ids == ids, self.msg(f"ids {ix.ids[:6]}... != {ids[:6]}...")
        assert ix.meta.dim == self.dim, self.msg(f"dim {ix.meta.dim}")
        assert ix.model_spec == SPEC, self.msg(f"model spec {ix.model_spec}")
        assert ix.meta.params.backend == self.backend, self.msg("backend")
        assert ix.meta.params.dtype == self.dtype, self.msg("dtype")
        order = [ids[i] for i in self.rng.permutation(len(ids))] + ids[:2]  # repeats too
        got = ix.vectors(order)
        assert got.dtype == np.float32, self.msg(f"vectors: {got.dtype}")
        assert got.shape == (len(order), self.dim), self.msg(f"vectors: {got.shape}")
        want = np.stack([given[i] for i in order]) if order else np.zeros((0, self.dim))
        if self.dtype == "i8":  # usearch hands i8 rows back scaled: compare directions
            norm = np.linalg.norm(got, axis=1, keepdims=True)
            err = float(np.abs(got / norm - want).max()) if order else 0.0
            assert err <= I8_TOL, self.msg(f"i8 vectors off by {err:.2e}")
        elif self.backend == "faiss" and self.dtype == "f16":
            # faiss rounds a tie between two float16 values away from zero, numpy to even.
            half_ulp = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32) / 2
            assert np.array_equal(got, stored(got, "f16")), self.msg("f16 vectors not f16")
            assert (np.abs(got - want) <= half_ulp).all(), self.msg("f16 vectors not rounded")
        else:
            assert np.array_equal(got, stored(want, self.dtype)), self.msg("vectors not as stored")
        got[...] = 7  # a copy: the index is not changed through it
        mem = ix.memory_bytes()
        if self.exact:
            assert mem == len(ids) * self.dim * BYTES[self.dtype], self.msg(f"memory_bytes {mem}")
        else:
            assert mem > 0, self.msg(f"memory_bytes {mem}")
        if self.exact:
            assert ix.meta.recall_at_10 == 1.0, self.msg(f"recall_at_10 {ix.meta.recall_at_10}")
            assert ix.ef_search is None, self.msg("an exact index with an ef_search")
        else:
            assert ix.ef_search == (ix.meta.params.ef_search or 4096), self.msg("ef_search")

    def compare(self, res: SearchResult, q: np.ndarray, k: int, what: str) -> None:
        """``res`` is brute force's answer to ``q`` (exact), or a right one of its k (HNSW)."""
        ids = list(self.given)
        row_of = {v: j for j, v in enumerate(ids)}
        truth = self.truth(q)
        assert len(res.ids) == len(q), self.msg(what)
        assert res.scores.shape == (len(q), k), self.msg(f"{what}: {res.scores.shape}")
        assert res.scores.dtype == np.float32, self.msg(f"{what}: {res.scores.dtype}")
        tol = self.tol
        for qi, (got, sc) in enumerate(zip(res.ids, res.scores, strict=True)):
            w = f"{what}, query {qi}: {got} {sc.tolist()}"
            assert len(got) == k == len(set(got)), self.msg(f"{w}: repeated ids")
            assert set(got) <= set(row_of), self.msg(f"{w}: not live {set(got) - set(row_of)}")
            mine = truth[qi, [row_of[i] for i in got]]
            err = float(np.abs(sc - mine).max())
            assert err <= tol, self.msg(f"{w}: a score is not its id's cosine (off {err:.1e})")
            assert np.all(np.diff(sc) <= tol), self.msg(f"{w}: not best first")
            best = np.sort(truth[qi])[::-1][:k]
            kth = best[k - 1]
            if self.exact:
                err = float(np.abs(sc - best).max())
                assert err <= tol, self.msg(f"{w}: scores are not brute force's {best.tolist()}")
                assert (mine >= kth - tol).all(), self.msg(f"{w}: a row below the k-th")
                must = {ids[j] for j in np.flatnonzero(truth[qi] > kth + tol)}
                assert must <= set(got), self.msg(f"{w}: missed {must - set(got)}")
            else:
                self.hits.append(float(np.mean(mine >= kth - tol)))

    def same_answers(self, a: SearchResult, b: SearchResult, what: str) -> None:
        """Two answers to one search, alike up to rounding and the order among equal scores: a
        row clear of the k-th score (by twice the tolerance) in one is in the other."""
        tol = self.tol
        assert len(a.ids) == len(b.ids), self.msg(what)
        err = float(np.abs(a.scores - b.scores).max()) if a.scores.size else 0.0
        assert err <= tol, self.msg(f"{what}: scores differ by {err:.1e}")
        for ra, rb, sa, sb in zip(a.ids, b.ids, a.scores, b.scores, strict=True):
            for r1, s1, r2 in ((ra, sa, rb), (rb, sb, ra)):
                clear = {i for i, s in zip(r1, s1, strict=True) if s > s1[-1] + 2 * tol}
                assert clear <= set(r2), self.msg(f"{what}: {ra} {sa} vs {rb} {sb}")

    # -- steps ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.exact and self.rng.random() < 0.3:  # queries in passes, gemv / GEMM paths swapped
            self.mp.setattr(vector_index, "_QUERY_BLOCK", int(self.rng.integers(1, 5)))
            self.mp.setattr(vector_index, "_GEMV_MAX_Q", int(pick(self.rng, [0, 2, 100])))
            self.log.append(f"blocks {vector_index._QUERY_BLOCK} gemv {vector_index._GEMV_MAX_Q}")
        n = int(pick(self.rng, [1, 1, 2, 5, 20, 60, 120, 180]))
        x, ids = self.rows(n), self.new_ids(n)
        x, ids = x[: len(ids)], ids
        self.index = build(x, ids, model_spec=SPEC, params=self.params(), table_fingerprint="t")
        self.given = dict(zip(ids, x.copy(), strict=True))
        self.log.append(f"build {len(ids)} rows: {self.index.meta.params!r}")

    def add(self) -> None:
        room = (400 if self.exact else HNSW_MAX) - len(self.given)
        n = int(pick(self.rng, [0, 1, 1, 2, 3, 7, 12, 40]))
        x, ids = self.rows(n), self.new_ids(n)
        x = x[: len(ids)]
        r = self.rng.random()
        if (r < 0.35 or room < len(ids)) and len(ids):
            self.add_refused(x, ids)
            return
        assert self.expect_add(x, ids) is None, self.msg("drew a bad add")
        given, before = x.copy(), self.snapshot()
        self.log.append(f"add {len(ids)}: {ids[:3]}")
        self.index.add(x if self.rng.random() < 0.8 else x.astype(np.float64), ids)
        x[...] = 0  # the caller's array is not the index's
        if not ids:
            assert self.snapshot() == before, self.msg("an empty add changed the index")
        self.given.update(zip(ids, given, strict=True))
        self.version += 1
        self.gone = [i for i in self.gone if i not in self.given]

    def add_refused(self, x: np.ndarray, ids: list[str]) -> None:
        n, j = len(ids), int(self.rng.integers(len(ids)))
        h = pick(
            self.rng,
            [
                *("live id", "repeated id", "ids short", "ids long", "dim+1", "dim-1"),
                *("norm 1.01", "zero row", "NaN", "inf", "1-D", "3-D", "integers"),
                "no rows, one id",
            ],
        )
        arr: Any = x
        if h == "live id" and self.given:
            ids[j] = self.live(1)[0]
        elif h == "repeated id" and n > 1:
            ids[j] = ids[(j + 1) % n]
        elif h == "ids short":
            ids = ids[:-1]
        elif h == "ids long":
            ids = [*ids, "extra"] if "extra" not in self.given else [*ids, ids[0]]
        elif h == "dim+1":
            arr = np.concatenate([x, np.zeros((n, 1), np.float32)], axis=1)
        elif h == "dim-1" and self.dim > 1:
            arr = x[:, :-1] / np.linalg.norm(x[:, :-1], axis=1, keepdims=True).clip(1e-9)
        elif h == "norm 1.01":
            arr = x.copy()
            arr[j] *= 1.01
        elif h == "zero row":
            arr = x.copy()
            arr[j] = 0
        elif h in ("NaN", "inf"):
            arr = x.copy()
            arr[j, int(self.rng.integers(self.dim))] = np.nan if h == "NaN" else -np.inf
        elif h == "1-D":
            arr, ids = x[0], ids[:1]
        elif h == "3-D":
            arr = x[None]
        elif h == "integers":
            arr = np.sign(x).astype(np.int64)
        elif h == "no rows, one id":
            arr, ids = x[:0], ids[:1]
        else:
            return  # the fault does not apply to this batch
        want = self.expect_add(arr, ids)
        assert want == DataError, self.msg(f"add, {h}: the reference accepts it")
        self.refused(f"add {n}, {h}", lambda: self.index.add(arr, ids), DataError)

    def replace(self) -> None:
        n = int(pick(self.rng, [0, 1, 1, 2, 5, 12]))
        ids = self.live(n)
        x = self.rows(len(ids))
        r = self.rng.random()
        if not self.exact:
            self.refused("replace on a graph", lambda: self.index.replace(x, ids), DataError)
            return
        fault: tuple[str, Any, list[str]] | None = None
        if r < 0.1:
            fault = ("an absent id", x[:1] if not ids else x, [*ids[1:], self.absent()])
        elif r < 0.17 and ids:
            y = x.copy()
            y[0] *= pick(self.rng, [0.0, 1.01, np.nan])
            fault = ("a bad row", y, ids)
        elif r < 0.22:
            fault = ("ids short", x, ids[:-1] if ids else ["x"])
        elif r < 0.27:
            fault = ("dim+1", np.concatenate([x, np.zeros((len(x), 1), np.float32)], 1), ids)
        elif r < 0.37 and ids:  # an id named twice, even with the same vector
            fault = ("an id twice", np.concatenate([x, x[:1]]), [*ids, ids[0]])
        if fault is not None:
            what, y, bad_ids = fault
            if self.expect_replace(y, bad_ids) is not None:
                self.refused(f"replace, {what}", lambda: self.index.replace(y, bad_ids), DataError)
                return
        assert self.expect_replace(x, ids) is None, self.msg("drew a bad replace")
        given, before = x.copy(), self.snapshot()
        self.log.append(f"replace {len(ids)}: {ids[:3]}")
        self.index.replace(x, ids)
        x[...] = 0
        if not ids:
            assert self.snapshot() == before, self.msg("an empty replace changed the index")
        for i, v in zip(ids, given, strict=True):
            self.given[i] = v
        self.version += 1

    def remove(self) -> None:
        r = self.rng.random()
        ids = list(self.given) if r < 0.08 else self.live(int(pick(self.rng, [0, 1, 2, 4, 9])))
        if ids and self.rng.random() < 0.3:
            ids = [*ids, ids[0]]  # named twice: taken out once
        if not self.exact:
            self.refused("remove on a graph", lambda: self.index.remove(ids), DataError)
            return
        if r > 0.85:
            bad = [*ids, self.absent()]
            self.refused("remove an absent id", lambda: self.index.remove(bad), DataError)
            return
        assert self.expect_remove(ids) is None, self.msg("drew a bad remove")
        before = self.snapshot()
        self.log.append(f"remove {len(set(ids))} of {len(self.given)}: {ids[:3]}")
        self.index.remove(ids)
        if not ids:
            assert self.snapshot() == before, self.msg("an empty remove changed the index")
        for i in dict.fromkeys(ids):
            del self.given[i]
            self.gone.append(i)
        self.version += 1

    def queries(self, n: int) -> np.ndarray:
        q = (dyadic if self.mode == "dyadic" else gaussian)(self.rng, n, self.dim)
        for i in range(n):  # a live row (ties with its copies), or its opposite
            if self.given and self.rng.random() < 0.4:
                v = self.given[pick(self.rng, list(self.given))]
                q[i] = v * pick(self.rng, [1, 1, -1])
        return q

    def search(self) -> None:
        n = len(self.given)
        q = self.queries(int(pick(self.rng, [1, 1, 2, 3, 8, 9, 12])))
        if not n:
            for k in (0, 1, 3):
                assert self.expect_search(q, k, SPEC) == ConfigError, self.msg("k on no rows")
                call = lambda k=k: self.index.search(q, k, model_spec=SPEC)  # noqa: E731
                self.refused(f"search k={k} of 0", call, ConfigError)
            return
        k = int(self.rng.integers(1, n + 1)) if self.rng.random() < 0.8 else n
        if self.rng.random() < 0.3:
            self.search_refused(q, k)
        arg: Any = q
        form = pick(self.rng, ["2-D", "2-D", "F-order", "float64", "list"])
        if len(q) == 1 and self.rng.random() < 0.5:
            arg, form = q[0], "1-D"
        elif form == "F-order":
            arg = np.asfortranarray(q)
        elif form == "float64":
            arg = q.astype(np.float64)
        elif form == "list":
            arg = q.tolist()
        assert self.expect_search(arg, k, SPEC) is None, self.msg("drew a bad search")
        what = f"search Q={len(q)} ({form}) k={k} of {n}"
        self.log.append(what)
        res = self.index.search(arg, k, model_spec=SPEC)
        self.compare(res, q, k, what)
        again = self.index.search(arg, k, model_spec=SPEC)
        assert again.ids == res.ids, self.msg(f"{what}: asked twice, answered otherwise")
        assert np.array_equal(again.scores, res.scores), self.msg(f"{what}: other scores")
        res.scores[...] = 0  # the answer is the caller's: the index keeps nothing of it
        res.ids[0].clear()
        # In another layout (a float16 index's one query as a (D,) or a (1, D) array may round
        # its last bit otherwise: alike within the tolerance, not bit for bit).
        again = self.index.search(q, k, model_spec=SPEC)
        self.same_answers(again, self.index.search(arg, k, model_spec=SPEC), f"{what}: 2-D")
        for qi in self.rng.permutation(len(q))[:2]:  # alone, as in the batch
            alone = self.index.search(q[qi], k, model_spec=SPEC)
            batch = SearchResult(ids=[again.ids[qi]], scores=again.scores[qi : qi + 1])
            self.same_answers(alone, batch, f"{what}: query {qi} alone")

    def search_refused(self, q: np.ndarray, k: int) -> None:
        n = len(self.given)
        h = pick(
            self.rng,
            ["k=0", "k=-1", "k>n", "spec", "dim+1", "dim-1 1-D", "norm 2", "NaN", "ints", "3-D"],
        )
        arg: Any = q
        spec = SPEC
        if h.startswith("k"):
            k = {"k=0": 0, "k=-1": -1, "k>n": n + int(self.rng.integers(1, 4))}[h]
        elif h == "spec":
            spec = pick(self.rng, [OTHER_SPEC, SPEC + " ", ""])
        elif h == "dim+1":
            arg = np.concatenate([q, np.zeros((len(q), 1), np.float32)], axis=1)
        elif h == "dim-1 1-D":
            arg = np.zeros(self.dim - 1, np.float32) if self.dim > 1 else np.zeros(0, np.float32)
            if len(arg):
                arg[0] = 1
        elif h == "norm 2":
            arg = 2 * q
        elif h == "NaN":
            arg = q.copy()
            arg[-1, 0] = np.nan
        elif h == "ints":
            arg = np.round(q).astype(np.int32)
        elif h == "3-D":
            arg = q[None]
        want = self.expect_search(arg, k, spec)
        assert want is not None, self.msg(f"search, {h}: the reference accepts it")
        call = lambda: self.index.search(arg, k, model_spec=spec)  # noqa: E731
        self.refused(f"search, {h} (Q={len(q)} k={k} of {n})", call, want)

    def vectors(self) -> None:
        ids = self.live(int(pick(self.rng, [0, 1, 3, 10])))
        ids = ids + ids[:1]
        self.log.append(f"vectors {ids[:3]}")
        got = self.index.vectors(ids)
        assert got.shape == (len(ids), self.dim), self.msg(f"vectors of {len(ids)}: {got.shape}")
        bad = [*ids, self.absent()]
        call = lambda: self.index.vectors(bad)  # noqa: E731
        self.refused(f"vectors of an absent id {bad[-1]!r}", call, KeyError)

    def rebuild(self) -> None:
        """A new index of the reference's rows as given (a table's), the same parameters."""
        ids = list(self.given)
        x = np.stack([self.given[i] for i in ids]) if ids else np.zeros((0, self.dim), np.float32)
        params = self.params()
        bad: list[tuple[str, Callable[[], object], type[Exception]]] = [
            ("no rows", lambda: build(x[:0], [], model_spec=SPEC, params=params), DataError),
            ("no spec", lambda: build(x, ids, model_spec="", params=params), ConfigError),
        ]
        if len(ids) > 1:
            dup = [*ids[:-1], ids[0]]
            bad.append(("repeated id", lambda: build(x, dup, model_spec=SPEC), DataError))
        what, call, exc = bad[int(self.rng.integers(len(bad)))]
        self.refused(f"build, {what}", call, exc)  # and the index there is untouched
        if not ids:
            return
        self.log.append(f"rebuild {len(ids)}")
        self.index = build(x, ids, model_spec=SPEC, params=params)
        self.version += 1

    def save(self) -> None:
        folders = sorted(self.saved) or ["a"]
        name = pick(self.rng, [*folders, f"f{len(self.saved)}"])
        folder = str(self.tmp / name)
        if self.rng.random() < 0.15:
            blocker = self.tmp / "file"
            blocker.write_bytes(b"in the way")
            where = str(blocker / "index")
            self.refused("save under a file", lambda: self.index.save(where), StorageError)
            return
        self.log.append(f"save to {name}")
        before = self.snapshot()
        assert self.index.save(folder) == storage.join(folder, META_FILE), self.msg("save's URI")
        after = self.snapshot()
        # Only the names of the files written may change in the metadata.
        meta = {k: v for k, v in after[1].items() if k not in ("files", "sha256", "versions")}
        same_meta = {k: v for k, v in before[1].items() if k not in ("files", "sha256", "versions")}
        assert (after[0], meta, *after[2:]) == (before[0], same_meta, *before[2:]), self.msg("save")
        names = {f.rsplit("/", 1)[-1] for f in storage.list_files(folder)}
        want = {META_FILE, *self.index.meta.files.values()}
        assert names == want, self.msg(f"{name} holds {sorted(names)}, not {sorted(want)}")
        self.saved[name] = (dict(self.given), self.index.meta.model_dump(), self.version)
        self.load(name)

    def load_earlier(self) -> None:
        if not self.saved or self.rng.random() < 0.2:
            empty = self.tmp / "empty"
            empty.mkdir(exist_ok=True)
            call = lambda: VectorIndex.load(str(empty))  # noqa: E731
            self.refused("load an empty folder", call, StorageError)
            return
        self.load(pick(self.rng, sorted(self.saved)))

    def load(self, name: str) -> None:
        """The folder holds what was last saved there; half the time the history goes on with
        the loaded index."""
        given, meta, version = self.saved[name]
        self.log.append(f"load {name} ({len(given)} rows)")
        loaded = VectorIndex.load(str(self.tmp / name))
        assert loaded.meta.model_dump() == meta, self.msg("loaded metadata is not what was saved")
        self.check(loaded, given)
        current, self.given = self.given, dict(given)
        if version == self.version and given:
            # The index in memory is the one saved: the loaded one answers as it does.
            ids = list(given)
            vecs = loaded.vectors(ids)
            assert np.array_equal(vecs, self.index.vectors(ids)), self.msg("loaded vectors")
            if self.backend != "usearch":  # usearch's arena is sized otherwise when restored
                assert loaded.memory_bytes() == self.index.memory_bytes(), self.msg("memory")
            q = self.queries(int(pick(self.rng, [1, 4, 9])))
            k = int(self.rng.integers(1, len(given) + 1))
            a = self.index.search(q, k, model_spec=SPEC)
            b = loaded.search(q, k, model_spec=SPEC)
            self.compare(b, q, k, f"loaded {name}: search")
            self.same_answers(a, b, f"loaded {name}: search")
        if self.rng.random() < 0.5:
            self.log.append(f"go on with the index loaded from {name}")
            self.index = loaded
            self.version += 1
            self.gone = [i for i in dict.fromkeys([*self.gone, *current]) if i not in given]
        else:
            self.given = current


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("seed", range(SEEDS))
def test_vector_index_random_history(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = History(seed, tmp_path, monkeypatch)
    try:
        h.start()
        h.check()
        for _ in range(STEPS):
            step = str(pick(h.rng, STEP_KINDS))
            getattr(h, step)()
            h.check()
        if h.hits:
            assert np.mean(h.hits) >= MIN_RECALL, h.msg(f"recall {np.mean(h.hits):.3f}")
    except BaseException as e:
        e.add_note(h.msg("history"))
        raise


# ---------------------------------------------------------------------------------------------
# Found by the histories, kept out of them (strict: a fix turns each into a failure to un-mark,
# and the histories may then draw the case).


def four(backend: str, dtype: str = "f32") -> tuple[VectorIndex, np.ndarray]:
    x = np.eye(4, dtype=np.float32)
    params = IndexParams(backend=backend, dtype=dtype)
    return build(x, ["a", "b", "c", "d"], model_spec=SPEC, params=params), x


@pytest.mark.parametrize(
    ("backend", "dtype"), [("exact", "f32"), ("exact", "f16"), ("faiss", "f32"), ("usearch", "f32")]
)
def test_a_search_of_no_queries_answers_nothing(backend: str, dtype: str) -> None:
    index, _ = four(backend, dtype)
    got = index.search(np.zeros((0, 4), np.float32), 2, model_spec=SPEC)
    assert got.ids == []
    assert got.scores.shape == (0, 2)


def test_replace_refuses_an_id_named_twice_with_two_vectors() -> None:
    """Once kept one of the two, as torch's index_put happened to order repeated indices
    (undefined, says torch); add refuses ids repeated among its rows, and replace now too."""
    index, x = four("exact")
    with pytest.raises(DataError):
        index.replace(x[[1, 2]], ["a", "a"])
    assert np.array_equal(index.vectors(["a"]), x[:1])


@pytest.mark.parametrize("backend", ["exact", "faiss", "usearch"])
def test_a_numpy_integer_k_is_a_k_on_every_backend(backend: str) -> None:
    """faiss's SWIG wrapper took a Python int only (a TypeError for np.int64)."""
    index, x = four(backend)
    got = index.search(x[:1], np.int64(2), model_spec=SPEC)
    assert got.ids[0][0] == "a"
    assert got.scores.shape == (1, 2)
    for k in (2.0, True, "2"):
        with pytest.raises(ConfigError, match="integer"):
            index.search(x[:1], k, model_spec=SPEC)  # type: ignore[arg-type]


@pytest.mark.usefixtures("one_torch_thread")  # faiss builds on one thread: the same graph
@pytest.mark.parametrize("backend", ["faiss", "usearch"])
def test_a_small_hnsw_index_of_copies_is_searched_exhaustively(backend: str) -> None:
    """An HNSW index not calibrated yet is searched by a scan of its rows: faiss's graph at m=4
    over byte-identical copies could not reach every row at any ef (k=len raised 'raise
    ef_search', and a row's own copies went missing)."""
    rng = np.random.default_rng(0)
    photos = rng.standard_normal((20, 8))
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    x = np.repeat(photos.astype(np.float32), 8, axis=0)  # 20 photos, 8 identical copies each
    ids = [f"p{i}" for i in range(160)]
    params = IndexParams(backend=backend, dtype="f32", m=4)
    index = build(x, ids, model_spec=SPEC, params=params)
    assert index.ef_search == 4096  # not calibrated: under 200 rows
    assert index.meta.recall_at_10 is None
    everything = index.search(x[:1], 160, model_spec=SPEC)
    assert sorted(everything.ids[0]) == sorted(ids)
    copies = index.search(x, 8, model_spec=SPEC)
    for i, row in enumerate(copies.ids):
        assert set(row) == {f"p{j}" for j in range(i // 8 * 8, i // 8 * 8 + 8)}, i
