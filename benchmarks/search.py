"""Similarity search: exact matmul against ANN indices, side by side, at 100k and 1M vectors.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/search.py [--sizes 100000,1000000] \
        [--datasets random,clustered] [--threads 2] [--max-build-s 900] \
        [--out benchmarks/results/search.json]

Vectors (D = 512, float32, unit norm), generated in this process, seeded:

- *random*: Gaussian, normalised. No structure at all: every neighbour is barely nearer than
  any other row (top-1 cosine ~0.18 at 1M), the worst case for a graph index.
- *clustered*, shaped like CLIP image embeddings: a shared direction (CLIP's embeddings sit in a
  narrow cone: random pairs have cosine ~0.3-0.5), 2,000 cluster centres ("subjects") with
  power-law sizes, and per-image variation with a power-law spectrum (variance of the i-th of
  512 rotated axes ~ i^-1, so a few tens of directions carry most of it, as in CLIP's PCA);
  ``x = normalise(0.55 mu + 0.6 c_j + 0.55 e)`` with unit ``c_j`` and ``e``. The JSON records
  its mean random-pair cosine and the query's top-1 / top-10 cosines, for comparing with a real
  table.

Queries are 200 more vectors from the same generator (never in the index); single-query latency
is over them (p50 / p99, k = 10; a method stops after ``--max-query-s``), throughput over ten
batches of 64; recall@10 is against exact float32 search on the single queries.

Methods (one process, one at a time, each freed before the next):

- exact float32 / float16 with numpy (``x @ q``, argpartition; numpy has no float16 BLAS, so its
  float16 row upcasts 65k-row blocks) and with torch (keeper's ``exact`` backend);
- keeper's ``faiss`` backend: HNSW (M = 32, efConstruction = 40) over float16 / float32 vectors,
  ``ef_search`` calibrated by keeper (recall@10's 95 % lower bound >= 0.95 on held-out rows),
  plus the same index
  searched at a fixed ``ef_search = 64`` (the common default: what it costs in recall);
- keeper's ``usearch`` backend: HNSW (connectivity 32, expansion_add 40), f16 and i8, calibrated;
- hnswlib (the third HNSW library, float32, M = 32, ef_construction = 40, ef calibrated the same
  way on a separate query set);
- faiss IVF-PQ (``IVF{4 sqrt N},PQ64``: 64 bytes per vector, autofaiss's kind of index), k-means
  trained on 64 points per list, searched at nprobe 16 and 64.

Build seconds include keeper's calibration. Memory: the index's own size (``memory_bytes`` or the
library's) and this process's RSS growth over the build, per vector. A 1M build predicted (from
the same dataset's 100k build, x N log N) to take over ``--max-build-s`` is not run: its row says
"not measured" with the prediction. Each measurement records the CPU seconds other processes
took meanwhile (``embed.CpuMonitor``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before numpy/torch load their thread pools

import numpy as np
import torch

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's machine description.
from embed import CpuMonitor, machine_info

from keeper_core.vector_index import IndexParams, VectorIndex, build, choose_backend

D, K, BATCH = 512, 10, 64
N_QUERIES, N_BATCHES = 200, 10
N_CALIBRATION = 500  # hnswlib's calibration queries, as many as keeper holds out
SPEC = "bench:synthetic"
TARGET = 0.95  # keeper's default target_recall (keeper meets it with a lower bound)


# --------------------------------------------------------------------------------------------
# Data


def random_vectors(n: int, seed: int) -> np.ndarray:
    out = np.empty((n, D), np.float32)
    rng = np.random.default_rng(seed)
    for lo in range(0, n, 1 << 16):
        x = rng.standard_normal((min(1 << 16, n - lo), D), dtype=np.float32)
        out[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class Clustered:
    """The CLIP-shaped generator (see the module docstring); one instance per dataset."""

    def __init__(self, seed: int = 0, clusters: int = 2000) -> None:
        rng = np.random.default_rng(seed)
        self.rot = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32)
        self.scale = (np.arange(1, D + 1, dtype=np.float32) ** -0.5)[None, :]
        self.mu = self._spectral(rng, 1)[0]
        self.centres = self._spectral(rng, clusters)
        sizes = 1.0 / np.arange(1, clusters + 1) ** 0.8  # a few big subjects, a long tail
        self.p = sizes / sizes.sum()

    def _spectral(self, rng: np.random.Generator, n: int) -> np.ndarray:
        e = rng.standard_normal((n, D), dtype=np.float32) * self.scale
        e = e @ self.rot
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, D), np.float32)
        for lo in range(0, n, 1 << 16):
            m = min(1 << 16, n - lo)
            c = self.centres[rng.choice(len(self.centres), size=m, p=self.p)]
            x = 0.55 * self.mu + 0.6 * c + 0.55 * self._spectral(rng, m)
            out[lo : lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def dataset(name: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(corpus, test queries, calibration queries for the non-keeper ANN rows)."""
    if name == "random":
        return (
            random_vectors(n, 0),
            random_vectors(N_QUERIES, 1),
            random_vectors(N_CALIBRATION, 2),
        )
    g = Clustered()
    return g.sample(n, 0), g.sample(N_QUERIES, 1), g.sample(N_CALIBRATION, 2)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    s, i = torch.topk(qt @ xt.T, k, dim=1)
    return i.numpy(), s.numpy()


def describe(x: np.ndarray, q: np.ndarray, truth_s: np.ndarray) -> dict[str, float]:
    rng = np.random.default_rng(3)
    a, b = rng.choice(len(x), 2000), rng.choice(len(x), 2000)
    return {
        "mean_pair_cosine": round(float((x[a] * x[b]).sum(1).mean()), 3),
        "query_top1_cosine": round(float(truth_s[:, 0].mean()), 3),
        "query_top10_cosine": round(float(truth_s[:, -1].mean()), 3),
    }


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    dataset: str
    n: int
    method: str
    params: str
    build_s: float | None = None
    index_bytes_per_vector: float | None = None
    rss_bytes_per_vector: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    single_queries: int = 0
    batch64_qps: float | None = None
    recall_at_10: float | None = None
    note: str = ""
    cpu: dict[str, Any] = field(default_factory=dict)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def release() -> None:
    gc.collect()
    # glibc keeps freed arenas: give them back, so the next RSS delta is the next index's.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


Search = Callable[[np.ndarray], np.ndarray]  # (Q, D) queries -> (Q, K) row numbers


def measure_queries(
    row: Row, search: Search, q: np.ndarray, truth: np.ndarray, max_s: float
) -> None:
    """Single-query latency, batch-64 throughput and recall@10 of ``search``."""
    search(q[:1])  # warm-up: first-touch of pages, lazy thread pools
    times, found = [], []
    t_end = time.perf_counter() + max_s
    for i in range(len(q)):
        t0 = time.perf_counter()
        found.append(search(q[i : i + 1])[0])
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and i >= 4:
            break
    row.single_queries = len(times)
    row.p50_ms = round(float(np.percentile(times, 50)) * 1e3, 3)
    row.p99_ms = round(float(np.percentile(times, 99)) * 1e3, 3)
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=False)]
    row.recall_at_10 = round(sum(hits) / (K * len(hits)), 4)
    batches = np.resize(q, (N_BATCHES * BATCH, D))  # the 200 queries, cycled
    t0, done = time.perf_counter(), 0
    for b in range(N_BATCHES):
        search(batches[b * BATCH : (b + 1) * BATCH])
        done += BATCH
        if time.perf_counter() > t_end + max_s:
            break
    row.batch64_qps = round(done / (time.perf_counter() - t0), 1)


def keeper_search(index: VectorIndex) -> Search:
    def search(q: np.ndarray) -> np.ndarray:
        found = index.search(q, K, model_spec=SPEC)  # ids are the rows' numbers, as strings
        return np.array([[int(v) for v in r] for r in found.ids])

    return search


def numpy_exact(x: np.ndarray) -> Search:
    def search(q: np.ndarray) -> np.ndarray:
        if x.dtype == np.float16:  # no float16 BLAS: upcast a block at a time
            s = np.concatenate(
                [x[lo : lo + 65536].astype(np.float32) @ q.T for lo in range(0, len(x), 65536)]
            ).T
        else:
            s = q @ x.T
        part = np.argpartition(-s, K, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        return np.take_along_axis(part, order, 1)

    return search


def calibrated(search_at: Callable[[int], Search], q: np.ndarray, truth: np.ndarray) -> int:
    """Smallest ef on keeper's grid whose recall@10's 95 % lower bound on ``q`` >= TARGET."""
    grid = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    for ef in grid:
        f = search_at(ef)(q)
        per = np.array(
            [len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(f, truth, strict=True)]
        )
        if per.mean() - 1.645 * per.std() / np.sqrt(len(per)) >= TARGET:
            return ef
    return grid[-1]


# --------------------------------------------------------------------------------------------
# Methods: each builds, then yields (label, params, search) rows to measure


def m_numpy(x: np.ndarray, dtype: str) -> tuple[Any, list[tuple[str, str, Search]], int]:
    held = x.astype(np.float16) if dtype == "f16" else x.copy()
    return held, [(f"exact numpy {dtype}", "matmul + argpartition", numpy_exact(held))], held.nbytes


def m_keeper(x: np.ndarray, params: IndexParams) -> tuple[Any, list[tuple[str, str, Search]], int]:
    index = build(x, [str(i) for i in range(len(x))], model_spec=SPEC, params=params)
    p = index.meta.params
    if p.backend == "exact":
        label, desc = f"keeper exact torch {p.dtype}", "matmul + topk"
    else:
        label = f"keeper {p.backend} HNSW {p.dtype}"
        desc = f"M={p.m} efC={p.ef_construction} ef={p.ef_search} (calibrated)"
    rows = [(label, desc, keeper_search(index))]
    if p.backend == "faiss":
        fixed = VectorIndex(
            index.meta.model_copy(
                update={"params": p.model_copy(update={"ef_search": 64})}, deep=True
            ),
            index._impl,
            index.ids,
        )
        rows.append((label, f"M={p.m} efC={p.ef_construction} ef=64 (fixed)", keeper_search(fixed)))
    return index, rows, index.memory_bytes()


def m_hnswlib(
    x: np.ndarray, calib: tuple[np.ndarray, np.ndarray]
) -> tuple[Any, list[tuple[str, str, Search]], int]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=D)
    index.init_index(max_elements=len(x), ef_construction=40, M=32)
    index.set_num_threads(torch.get_num_threads())
    index.add_items(x, np.arange(len(x)))

    def at(ef: int) -> Search:
        def search(q: np.ndarray) -> np.ndarray:
            index.set_ef(ef)
            return index.knn_query(q, k=K)[0].astype(np.int64)

        return search

    ef = calibrated(at, *calib)
    size = len(x) * (D * 4 + 32 * 2 * 4 + 8 + 8)  # hnswlib's level-0 block per element
    return index, [("hnswlib HNSW f32", f"M=32 efC=40 ef={ef} (calibrated)", at(ef))], size


def m_ivfpq(x: np.ndarray) -> tuple[Any, list[tuple[str, str, Search]], int]:
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    nlist = int(4 * math.sqrt(len(x)))
    index = faiss.index_factory(D, f"IVF{nlist},PQ64", faiss.METRIC_INNER_PRODUCT)
    train = x[np.random.default_rng(4).choice(len(x), min(len(x), 64 * nlist), replace=False)]
    index.cp.niter = 10  # 10 k-means rounds: the lists barely move after that
    index.do_polysemous_training = False  # only for Hamming pre-filtering, which is not used
    index.train(train)
    index.add(x)
    rows = []
    for nprobe in (16, 64):

        def search(q: np.ndarray, nprobe: int = nprobe) -> np.ndarray:
            return index.search(q, K, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]

        rows.append(("faiss IVF-PQ", f"IVF{nlist},PQ64 nprobe={nprobe}", search))
    size = len(x) * (64 + 8) + nlist * D * 4  # codes + ids + centroids
    return index, rows, size


# --------------------------------------------------------------------------------------------
# Driver

METHODS: dict[str, Callable[..., tuple[Any, list[tuple[str, str, Search]], int]]] = {
    "numpy-f32": lambda x, c: m_numpy(x, "f32"),
    "numpy-f16": lambda x, c: m_numpy(x, "f16"),
    "exact-f32": lambda x, c: m_keeper(x, IndexParams(backend="exact", dtype="f32")),
    "exact-f16": lambda x, c: m_keeper(x, IndexParams(backend="exact", dtype="f16")),
    "faiss-f16": lambda x, c: m_keeper(x, IndexParams(backend="faiss", dtype="f16")),
    "faiss-f32": lambda x, c: m_keeper(x, IndexParams(backend="faiss", dtype="f32")),
    "usearch-f16": lambda x, c: m_keeper(x, IndexParams(backend="usearch", dtype="f16")),
    "usearch-i8": lambda x, c: m_keeper(x, IndexParams(backend="usearch", dtype="i8")),
    "hnswlib": m_hnswlib,
    "faiss-ivfpq": lambda x, c: m_ivfpq(x),
}
ANN = {"faiss-f16", "faiss-f32", "usearch-f16", "usearch-i8", "hnswlib", "faiss-ivfpq"}


def run_one(
    name: str,
    n: int,
    method: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
    truth: np.ndarray,
    calib_truth: np.ndarray,
    args: argparse.Namespace,
    monitor: CpuMonitor,
    prior: dict[tuple[str, str], float],
) -> list[Row]:
    x, q, cq = data
    if method in ANN and (name, method) in prior and n > prior_n(prior, name, method):
        small_n, small_s = prior_n(prior, name, method), prior[(name, method)]
        predicted = small_s * (n / small_n) * math.log(n) / math.log(small_n)
        if predicted > args.max_build_s:
            note = f"not measured: build predicted {predicted:.0f} s > --max-build-s"
            row = Row(name, n, method, "", note=note)
            print(fmt(row), flush=True)
            return [row]
    release()
    rss0 = rss()
    cpu: dict[str, Any] = {}
    with monitor.section(cpu):
        t0 = time.perf_counter()
        held, searches, size = METHODS[method](x, (cq, calib_truth))
        build_s = time.perf_counter() - t0
    release()
    grown = rss() - rss0
    if method in ANN:
        prior[(name, method)] = build_s
        prior[(name, method, "n")] = n  # type: ignore[index]
    rows = []
    for label, desc, search in searches:
        row = Row(
            name,
            n,
            label,
            desc,
            build_s=round(build_s, 2),
            index_bytes_per_vector=round(size / n, 1),
            rss_bytes_per_vector=round(grown / n, 1),
        )
        qcpu: dict[str, Any] = {}
        with monitor.section(qcpu):
            measure_queries(row, search, q, truth, args.max_query_s)
        row.cpu = {"build": cpu["cpu"], "queries": qcpu["cpu"]}
        print(fmt(row), flush=True)
        rows.append(row)
    del held, searches
    release()
    return rows


def prior_n(prior: dict, name: str, method: str) -> int:
    return int(prior.get((name, method, "n"), 0))


HEAD = (
    f"{'data':9} {'N':>8} {'method':26} {'params':38} {'build s':>8} {'B/vec':>7} "
    f"{'RSS B/v':>8} {'p50 ms':>8} {'p99 ms':>8} {'b64 q/s':>9} {'R@10':>6}"
)


def fmt(r: Row) -> str:
    def f(v: float | None, w: int, p: int = 1) -> str:
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"

    if r.note.startswith("not measured"):
        return f"{r.dataset:9} {r.n:>8} {r.method:26} {r.note}"
    return (
        f"{r.dataset:9} {r.n:>8} {r.method:26} {r.params[:38]:38} {f(r.build_s, 8)} "
        f"{f(r.index_bytes_per_vector, 7, 0)} {f(r.rss_bytes_per_vector, 8, 0)} "
        f"{f(r.p50_ms, 8, 2)} {f(r.p99_ms, 8, 2)} {f(r.batch64_qps, 9, 0)} "
        f"{f(r.recall_at_10, 6, 3)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--datasets", default="random,clustered")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-build-s", type=float, default=900.0)
    ap.add_argument("--max-query-s", type=float, default=30.0, help="per method, single queries")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/search.json"))
    ap.add_argument(
        "--update",
        action="store_true",
        help="replace only the rows measured now in --out (e.g. re-run --methods exact-f32)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    monitor = CpuMonitor()
    rows: list[Row] = []
    shapes: dict[str, Any] = {}
    prior: dict[tuple[str, str], float] = {}
    t_start = time.time()
    print(HEAD, flush=True)
    for n in sizes:
        for name in args.datasets.split(","):
            data = dataset(name, n)
            truth_i, truth_s = exact_topk(data[0], data[1])
            calib_truth = exact_topk(data[0], data[2])[0]
            shapes[f"{name}@{n}"] = describe(data[0], data[1], truth_s)
            for method in methods:
                rows.extend(
                    run_one(name, n, method, data, truth_i, calib_truth, args, monitor, prior)
                )
            del data
            release()
    monitor.stop()
    run = {
        "command": " ".join([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", *sys.argv]),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "wall_s": round(time.time() - t_start, 1),
    }
    runs = [run]
    if args.update and args.out.exists():  # re-measured rows replace their old selves
        old = json.loads(args.out.read_text())
        runs = [*old["runs"], run]
        again = {(r.dataset, r.n, r.method, r.params) for r in rows}
        kept = [
            Row(**r)
            for r in old["rows"]
            if (r["dataset"], r["n"], r["method"], r["params"]) not in again
        ]
        rows = kept + rows
        shapes = {**old["datasets"], **shapes}
    report = {
        "runs": runs,  # the first measured everything; later ones (--update) replaced some rows
        "machine": machine_info(),
        "threads": args.threads,
        "dim": D,
        "k": K,
        "target_recall": TARGET,
        "datasets": shapes,
        "keeper_choice": {str(n): choose_backend(n).model_dump() for n in sizes},
        "rows": [asdict(r) for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    if args.update:
        print("\n" + HEAD, *(fmt(r) for r in rows), sep="\n")
    print(f"\npeak RSS {run['peak_rss_gib']} GiB, {run['wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
