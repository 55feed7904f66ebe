"""keeper_core.vector_index over random histories of adds, replaces, removes, saves and loads.

Seeded histories (``KEEPER_HISTORIES=560`` runs more), each on one backend and dtype (exact
f32 / f16, faiss f32 / f16, usearch f32 / f16 / i8) at 8-32 dimensions and a few hundred rows,
as ``keeper index`` grows an index run after run (or builds it anew) and ``/v1/search`` serves
it. A model holds each live id's vector; after every step the index must agree with it:

- ``ids`` are the live ids (an exact index in row order: kept rows in place, added ones after;
  an HNSW add may order its new rows itself), ``len`` and ``vectors`` as the model's (rounded
  as the dtype stores them);
- a search answers only live ids, each once, best first, each score the query's cosine with that
  id's current vector; k past ``len`` is refused (``/v1/search`` clips it to ``len``); the exact
  backend's top-k is brute force's (ties aside); an HNSW index's recall@10 (a tie with the
  10th a hit) averages >= 0.8 over a history, and a live vector finds its own id first (or a
  tie); another model spec, a wrong dimension, a non-unit or non-finite query are refused;
- a refused step (a duplicate, unknown, non-finite, zero or wrong-dimension row, a replace or
  remove an HNSW graph cannot do) raises keeper's DataError and changes nothing;
- a save loads back equal; a save killed before its ``index.json`` leaves the previous index
  loading (killed after it, the new one), and a tampered or truncated file is refused at load,
  never loaded.
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
from keeper_core.vector_index import META_FILE, IndexParams, VectorIndex, build

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "28"))
STEPS = 40
STEP_KINDS = ["add"] * 4 + ["replace", "remove", "remove", "save", "save", "rebuild"]
SPEC = "ViT-B-32:laion2b_s34b_b79k"
KINDS = [
    ("exact", "f32"),
    ("exact", "f16"),
    ("faiss", "f32"),
    ("faiss", "f16"),
    ("usearch", "f32"),
    ("usearch", "f16"),
    ("usearch", "i8"),
]
#: |stored - given| per component (i8: of the row rescaled to unit norm), and |score - cosine|.
VEC_TOL = {"f32": 1e-6, "f16": 1e-3, "i8": 2e-2}
SCORE_TOL = {"f32": 1e-5, "f16": 3e-3, "i8": 3e-2}
CAP = {"exact": 300, "faiss": 450, "usearch": 450}  # rows at most: histories stay fast


class Killed(BaseException):
    """The process died here (a BaseException: nothing in keeper may catch it)."""


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class History:
    def __init__(self, seed: int, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seed, self.folder, self.mp = seed, str(folder), monkeypatch
        self.rng = np.random.default_rng(seed)
        self.backend, self.dtype = KINDS[seed % len(KINDS)]
        self.exact = self.backend == "exact"
        self.dim = int(self.rng.choice([8, 12, 16, 24, 32]))
        self.model: dict[str, np.ndarray] = {}  # live id -> vector, in the index's row order
        self.gone: list[str] = []  # ids removed, to add again
        self.saved: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None
        self.fresh = 0
        self.log: list[str] = []
        self.recalls: list[float] = []
        self.index: VectorIndex

    def msg(self, what: str) -> str:
        tail = "\n  ".join(self.log[-12:])
        return f"seed {self.seed} ({self.backend} {self.dtype} d={self.dim}): {what}\n  {tail}"

    def new_ids(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            self.fresh += 1
            out.append(
                f"s3://b/photos/é {self.fresh}.jpg" if self.rng.random() < 0.2 else f"p{self.fresh}"
            )
        return out

    def pick(self, n: int) -> list[str]:
        live = list(self.model)
        return [live[i] for i in self.rng.choice(len(live), size=min(n, len(live)), replace=False)]

    # -- checks ----------------------------------------------------------------------------

    def snap(self) -> tuple[list[str], dict[str, Any], np.ndarray]:
        ix = self.index
        return ix.ids, ix.meta.model_dump(), ix.vectors(ix.ids)

    def refused(self, what: str, fn: Callable[[], object], exc: type = DataError) -> None:
        """``fn`` raises ``exc`` and leaves the index as it was."""
        ids, meta, vecs = self.snap()
        self.log.append(f"refused? {what}")
        try:
            fn()
        except exc:
            pass
        else:
            pytest.fail(self.msg(f"{what}: not refused"))
        assert self.index.ids == ids, self.msg(f"{what}: refused, but ids changed")
        assert self.index.meta.model_dump() == meta, self.msg(f"{what}: refused, meta changed")
        now = self.index.vectors(ids)
        assert np.array_equal(now, vecs), self.msg(f"{what}: refused, but vectors changed")

    def stored(self, got: np.ndarray, want: np.ndarray, what: str) -> None:
        if self.dtype == "i8":  # usearch hands i8 rows back scaled
            got = got / np.linalg.norm(got, axis=1, keepdims=True)
        err = float(np.abs(got - want).max()) if len(want) else 0.0
        assert err <= VEC_TOL[self.dtype], self.msg(f"{what}: stored vectors off by {err:.2e}")

    def check(self, index: VectorIndex | None = None, model: dict | None = None) -> None:
        ix = self.index if index is None else index
        m = self.model if model is None else model
        live = list(m)
        assert len(ix) == ix.meta.count == len(m), self.msg(f"len {len(ix)}, model {len(m)}")
        assert ix.ids == live, self.msg(f"ids {ix.ids[:8]}..., model {live[:8]}...")
        if live:
            pick = [live[i] for i in self.rng.permutation(len(live))] + live[:1]
            self.stored(ix.vectors(pick), np.stack([m[i] for i in pick]), "vectors(ids)")
        with pytest.raises(KeyError):
            ix.vectors(["never-added"])
        q = unit(self.rng, int(self.rng.integers(1, 12)), self.dim)
        if not live:
            for k in (1, 3):
                with pytest.raises(ConfigError):
                    ix.search(q, k, model_spec=SPEC)
            return
        with pytest.raises(DataError, match="model spec"):
            ix.search(q, 1, model_spec="ViT-L-14:openai")
        for bad in (unit(self.rng, 1, self.dim + 1), 2 * q, q * np.nan):
            with pytest.raises(DataError):
                ix.search(bad, 1, model_spec=SPEC)
        mat = np.stack([m[i] for i in live]).astype(np.float64)
        row_of = {v: j for j, v in enumerate(live)}
        tol = SCORE_TOL[self.dtype]
        if self.rng.random() < 0.4:  # queries equal to live vectors (ties with their copies)
            q = np.concatenate([q, mat[self.rng.integers(0, len(live), 3)].astype(np.float32)])
        k = int(self.rng.integers(1, len(live) + 4))
        if k > len(live) or self.rng.random() < 0.1:
            bad = k if k > len(live) else 0
            with pytest.raises(ConfigError):
                ix.search(q, bad, model_spec=SPEC)
            k = min(k, len(live))  # what /v1/search asks for: min(k, len(index))
        one = len(q) == 1 and self.rng.random() < 0.5
        res = ix.search(q[0] if one else q, k, model_spec=SPEC)
        what = f"search Q={len(q)} k={k} of {len(live)}"
        assert len(res.ids) == len(q), self.msg(what)
        assert res.scores.shape == (len(q), k), self.msg(what)
        for qi, (row, sc) in enumerate(zip(res.ids, res.scores, strict=True)):
            assert len(row) == k == len(set(row)), self.msg(f"{what}: repeated ids {row}")
            assert set(row) <= set(m), self.msg(f"{what}: ids not live {set(row) - set(m)}")
            assert np.all(np.diff(sc) <= 1e-6), self.msg(f"{what}: not best first {sc}")
            true = mat @ q[qi].astype(np.float64)
            mine = true[[row_of[i] for i in row]]
            err = float(np.abs(sc - mine).max())
            assert err <= tol, self.msg(f"{what}: a score is not its id's cosine (off {err:.2e})")
            if self.exact:  # brute force, ties aside
                kth = np.sort(true)[::-1][k - 1]
                assert (mine >= kth - tol).all(), self.msg(f"{what}: a row below the k-th")
                must = {live[j] for j in np.flatnonzero(true > kth + tol)}
                assert must <= set(row), self.msg(f"{what}: missed {must - set(row)}")
        if not self.exact:
            self.recall(ix, mat, live)
        for i in self.rng.choice(len(live), size=min(3, len(live)), replace=False):
            v = mat[i].astype(np.float32)
            got = ix.search(v, min(3, len(live)), model_spec=SPEC)
            first = got.ids[0][0]
            cos = float(mat[row_of[first]] @ mat[i])
            assert first == live[i] or cos >= 1 - tol, self.msg(
                f"live vector of {live[i]!r} found {first!r} first (cosine {cos:.4f})"
            )

    def recall(self, ix: VectorIndex, mat: np.ndarray, live: list[str]) -> None:
        """recall@10 of out-of-index queries against brute force; a tie at the 10th is a hit."""
        k, q = min(10, len(live)), unit(self.rng, 24, self.dim)
        res = ix.search(q, k, model_spec=SPEC)
        true = q.astype(np.float64) @ mat.T
        kth = np.sort(true, axis=1)[:, ::-1][:, k - 1]
        row_of = {v: j for j, v in enumerate(live)}
        hits = [
            np.mean([true[qi, row_of[i]] >= kth[qi] - SCORE_TOL[self.dtype] for i in row])
            for qi, row in enumerate(res.ids)
        ]
        r = float(np.mean(hits))
        self.recalls.append(r)
        # m=8 on random 32-d rows grown 60 % past its calibration (adds of < 200 rows keep their
        # ef_search) measured 0.77 at worst over 24 queries: the mean is what must stay >= 0.8.
        ef = ix.meta.params.ef_search
        assert r >= 0.6, self.msg(f"recall@10 {r:.3f} (ef_search {ef})")

    # -- steps -----------------------------------------------------------------------------

    def params(self) -> IndexParams:
        if self.exact:
            return IndexParams(backend="exact", dtype=self.dtype)
        return IndexParams(
            backend=self.backend,
            dtype=self.dtype,
            m=int(self.rng.choice([8, 16, 32])),
            ef_construction=int(self.rng.choice([16, 40, 64])),
            ef_search=[None, None, 64, 128][int(self.rng.integers(4))],
            target_recall=float(self.rng.choice([0.9, 0.95])),
        )

    def batch(self, n: int) -> tuple[np.ndarray, list[str]]:
        x = unit(self.rng, n, self.dim)
        if self.model and n and self.rng.random() < 0.3:  # a byte-identical copy of a live row
            x[int(self.rng.integers(n))] = self.model[self.pick(1)[0]]
        if n >= 20 and self.rng.random() < 0.3:  # copies within the batch (calibration's groups)
            src = self.rng.integers(0, n, n // 5)
            x[self.rng.integers(0, n, n // 5)] = x[src]
        readd = self.exact and self.gone and self.rng.random() < 0.4
        ids = self.new_ids(n)
        if readd:
            again = [str(i) for i in self.rng.permutation(self.gone)[:n]]
            ids[: len(again)] = again
        return x, ids

    def start(self) -> None:
        if self.rng.random() < 0.3:  # small blocks: exact queries in passes, graph adds in parts
            self.mp.setattr(vector_index, "_QUERY_BLOCK", int(self.rng.integers(1, 5)))
            self.mp.setattr(vector_index, "_ROW_BLOCK", int(self.rng.integers(16, 64)))
            self.log.append("small blocks")
        n = int(
            self.rng.choice([1, 7, 40, 120, 220, 260] if self.exact else [1, 40, 220, 260, 300])
        )
        x, ids = self.batch(n)
        self.index = build(x, ids, model_spec=SPEC, params=self.params(), table_fingerprint="t")
        self.model = dict(zip(ids, x, strict=True))
        ef = self.index.ef_search
        assert self.exact or ef is not None, self.msg("a graph searched with no ef_search")
        self.log.append(f"build {n} rows {self.index.meta.params!r}")
        self.reorder(ids)

    def reorder(self, added: list[str]) -> None:
        """After an add: old rows keep their places, the new ones follow (an HNSW add holds its
        calibration rows out to the end, so only as a set there)."""
        got, n_old = self.index.ids, len(self.model) - len(added)
        old = list(self.model)[:n_old]
        assert got[:n_old] == old, self.msg("an add moved rows already there")
        if self.exact:
            assert got[n_old:] == added, self.msg("an exact add's rows are not in order given")
        assert sorted(got[n_old:]) == sorted(added), self.msg("added rows are not the ids given")
        self.model = {i: self.model[i] for i in got}

    def add(self) -> None:
        room = CAP[self.backend] - len(self.model)
        big = not self.exact and room >= 220 and self.rng.random() < 0.15  # re-calibrates
        n = 220 if big else int(self.rng.integers(1, 51))
        x, ids = self.batch(n)
        r = self.rng.random()
        if r < 0.3 or room < n:
            self.add_refused(x, ids)
        elif r < 0.36:
            self.log.append("add nothing")
            self.index.add(np.zeros((0, self.dim), np.float32), [])
        else:
            self.log.append(f"add {n}: {ids[:3]}...")
            given = x.copy()
            self.index.add(x, ids)
            x[:] = 0  # the caller's array is not the index's
            self.model.update(zip(ids, given, strict=True))
            self.gone = [i for i in self.gone if i not in self.model]
            self.reorder(ids)

    def add_refused(self, x: np.ndarray, ids: list[str]) -> None:
        n, j = len(ids), int(self.rng.integers(len(ids)))
        how = ["live id", "repeated id", "non-finite", "zero", "norm 2", "dim+1", "ids short"]
        how += ["not 2-D"]
        h = how[int(self.rng.integers(len(how)))]
        if h == "live id" and self.model:
            ids[j] = self.pick(1)[0]
        elif h == "repeated id" and n > 1:
            ids[j] = ids[(j + 1) % n]
        elif h == "non-finite":
            x[j, int(self.rng.integers(self.dim))] = [np.nan, np.inf, -np.inf][j % 3]
        elif h == "zero":
            x[j] = 0
        elif h == "norm 2":
            x[j] *= 2
        elif h == "dim+1":
            x = np.concatenate([x, x[:, :1]], axis=1) / np.sqrt(1 + x[:, :1] ** 2)
        elif h == "ids short":
            ids = ids[:-1]
        elif h == "not 2-D":
            x, ids = x[0], ids[:1]
        else:  # nothing wrong with the batch after all
            return
        self.refused(f"add {n} rows, {h}", lambda: self.index.add(x, ids))

    def replace(self) -> None:
        if not self.model:
            return
        ids = self.pick(int(self.rng.integers(1, 21)))
        x = unit(self.rng, len(ids), self.dim)
        if len(self.model) > len(ids) and self.rng.random() < 0.3:  # takes another row's vector
            other = next(i for i in self.model if i not in ids)
            x[0] = self.model[other]
        r = self.rng.random()
        if not self.exact:
            self.refused("replace on a graph", lambda: self.index.replace(x, ids))
        elif r < 0.15:
            self.refused("replace an unknown id", lambda: self.index.replace(x, [*ids[1:], "no"]))
        elif r < 0.25:
            self.refused("replace with NaN", lambda: self.index.replace(x * np.nan, ids))
        elif r < 0.3:
            self.refused("replace, ids short", lambda: self.index.replace(x, ids[1:] or ["x"]))
        elif r < 0.35:
            y = np.concatenate([x, 0 * x[:, :1]], axis=1)
            self.refused("replace, dim+1", lambda: self.index.replace(y, ids))
        else:
            self.log.append(f"replace {len(ids)}: {ids[:3]}...")
            self.index.replace(x, ids)
            for i, v in zip(ids, x, strict=True):
                self.model[i] = v.copy()

    def remove(self) -> None:
        live = list(self.model)
        r = self.rng.random()
        ids = live if r < 0.1 else self.pick(int(self.rng.integers(0, 16)))
        if ids and r > 0.75:
            ids = [*ids, ids[0]]  # named twice: taken out once
        if not self.exact:
            self.refused("remove on a graph", lambda: self.index.remove(ids or ["x"]))
        elif r > 0.85:
            unknown = [*ids, self.gone[0] if self.gone else "never-added"]
            self.refused("remove an unknown id", lambda: self.index.remove(unknown))
        else:
            self.log.append(f"remove {len(ids)} of {len(live)}: {ids[:3]}...")
            self.index.remove(ids)
            for i in dict.fromkeys(ids):
                del self.model[i]
            self.gone += list(dict.fromkeys(ids))

    def rebuild(self) -> None:
        """What ``keeper index`` does to a graph with rows outdated: a new index of the table
        (some rows gone, some embedded again), its own parameters, ef_search calibrated anew."""
        model = dict(self.model)
        for i in self.pick(int(self.rng.integers(0, 10))):
            del model[i]
        for i in self.pick(int(self.rng.integers(0, 10))):
            if i in model:
                model[i] = unit(self.rng, 1, self.dim)[0]
        if not model:
            return
        p = self.index.meta.params
        self.index = build(
            np.stack(list(model.values())),
            list(model),
            model_spec=SPEC,
            params=p if self.exact else p.model_copy(update={"ef_search": None}),
        )
        self.log.append(f"rebuild {len(model)} of {len(self.model)}")
        self.gone += [i for i in self.model if i not in model]
        self.model = model
        self.reorder(list(model))

    def save(self) -> None:
        r = self.rng.random()
        if r < 0.3:
            self.killed_save()
            return
        self.index.save(self.folder)
        self.saved = (dict(self.model), self.index.meta.model_dump())
        self.log.append("save")
        names = {f.rsplit("/", 1)[-1] for f in storage.list_files(self.folder)}
        want = {META_FILE, *self.index.meta.files.values()}
        assert names == want, self.msg(f"the folder holds {sorted(names)}, not {sorted(want)}")
        if r < 0.5:
            self.tamper()
        self.load()

    def killed_save(self) -> None:
        """A save killed at its n-th write (the last: index.json) or at its first delete."""
        at = int(self.rng.integers(4))
        calls = {"write": 0}
        write = storage.write_bytes

        def dying_write(uri: str, data: bytes, **kw: Any) -> None:
            if calls["write"] == at:
                raise Killed(uri)
            calls["write"] += 1
            write(uri, data, **kw)

        def dying_delete(uri: str) -> None:
            raise Killed(uri)

        with self.mp.context() as mp:
            mp.setattr(storage, "write_bytes", dying_write)
            mp.setattr(storage, "delete", dying_delete)
            try:
                self.index.save(self.folder)
                died = False
            except Killed:
                died = True
        self.log.append(f"save killed at {'write' if at < 3 else 'delete'} {at} (died {died})")
        if at == 3:  # index.json was written: the new index is the one there
            self.saved = (dict(self.model), self.index.meta.model_dump())
        if self.saved is None:
            with pytest.raises(StorageError):
                VectorIndex.load(self.folder)
            return
        self.load()

    def tamper(self) -> None:
        meta = self.index.meta
        how = ["flip index", "flip ids", "cut index", "cut ids", "cut index.json", "rm index"]
        h = how[int(self.rng.integers(len(how)))]
        name = {"index": meta.files["index"], "ids": meta.files["ids"], "json": META_FILE}[
            "json" if "json" in h else h.split()[1]
        ]
        path = Path(self.folder) / name
        data = path.read_bytes()
        if h.startswith("rm"):
            path.unlink()
        elif h.startswith("flip"):
            at = int(self.rng.integers(len(data)))
            path.write_bytes(
                data[:at] + bytes([data[at] ^ 1 << int(self.rng.integers(8))]) + data[at + 1 :]
            )
        else:
            path.write_bytes(data[: int(self.rng.integers(len(data)))])
        exc = StorageError if h.startswith("rm") else DataError
        self.log.append(f"tamper: {h}")
        try:
            VectorIndex.load(self.folder)
        except exc:
            pass
        else:
            pytest.fail(self.msg(f"{h}: loaded"))
        self.index.save(self.folder)  # the next save mends it
        self.saved = (dict(self.model), self.index.meta.model_dump())

    def load(self) -> None:
        """The folder's index is the last one saved; half the time the history goes on with it."""
        assert self.saved is not None
        model, meta = self.saved
        loaded = VectorIndex.load(self.folder)
        assert loaded.meta.model_dump() == meta, self.msg("loaded metadata differs from saved")
        self.check(loaded, model)
        same = list(model) == list(self.model) and all(
            np.array_equal(v, self.model[i]) for i, v in model.items()
        )
        if same and model:
            self.same_answers(loaded, len(model))
        if self.rng.random() < 0.5:
            self.log.append("go on with the loaded index")
            self.index, self.model = loaded, dict(model)
            self.gone = [i for i in self.gone if i not in self.model]

    def same_answers(self, loaded: VectorIndex, n: int) -> None:
        """The index saved and the one loaded answer alike (ties in either order)."""
        q = unit(self.rng, 5, self.dim)
        a, b = (ix.search(q, min(5, n), model_spec=SPEC) for ix in (self.index, loaded))
        if self.exact:  # one matrix now, not one per add: BLAS may round the last bit
            err = float(np.abs(a.scores - b.scores).max())
            assert err <= 1e-6, self.msg(f"the loaded index: scores off by {err:.1e}")
            return  # and its ids are brute force's (checked)
        assert np.array_equal(a.scores, b.scores), self.msg("the loaded index: other scores")
        for ra, rb, sc in zip(a.ids, b.ids, a.scores, strict=True):
            for s in set(sc.tolist()) - {float(sc[-1])}:
                pair = ({i for i, t in zip(r, sc, strict=True) if t == s} for r in (ra, rb))
                assert next(pair) == next(pair), self.msg(f"loaded: other ids {ra} {rb}")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("seed", range(SEEDS))
def test_vector_index_history(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = History(seed, tmp_path / "index", monkeypatch)
    try:
        h.start()
        h.check()
        for _ in range(STEPS):
            step = h.rng.choice(STEP_KINDS)
            getattr(h, str(step))()
            h.check()
        if h.recalls:
            assert np.mean(h.recalls) >= 0.8, h.msg(f"mean recall@10 {np.mean(h.recalls):.3f}")
    except BaseException as e:
        e.add_note(h.msg("history"))
        raise


@pytest.mark.parametrize("backend", ["faiss", "usearch"])
def test_an_index_built_small_is_calibrated_when_it_grows(
    one_torch_thread: None, backend: str
) -> None:
    """docs/search.md: a re-run adds the rows in place "and the search breadth re-calibrated".
    An index built under 200 rows stored ef_search 4096, which its adds then took for a breadth
    the caller gave: it searched 25-70x slower than calibrated, for ever (found by the histories
    above). Indexes saved so by earlier versions calibrate on their next add too."""
    x = unit(np.random.default_rng(0), 550, 16)
    ids = [f"p{i}" for i in range(550)]
    index = build(x[:150], ids[:150], model_spec=SPEC, params=IndexParams(backend=backend))
    assert (index.meta.params.ef_search, index.meta.recall_at_10) == (None, None)
    assert index.ef_search == 4096  # not calibrated yet: exhaustive at this size
    old = build(x[:150], ids[:150], model_spec=SPEC, params=IndexParams(backend=backend))
    old.meta.params = old.meta.params.model_copy(update={"ef_search": 4096})  # as saved before
    for ix in (index, old):
        ix.add(x[150:], ids[150:])  # 400 rows: 40 held-out queries, enough to calibrate on
        assert ix.meta.recall_at_10 is not None
        assert ix.meta.params.ef_search is not None
        assert ix.meta.params.ef_search < 4096
        assert ix.ef_search == ix.meta.params.ef_search
