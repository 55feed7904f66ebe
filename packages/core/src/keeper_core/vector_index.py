"""Nearest-neighbour search over an embedding table: exact, or approximate (faiss / usearch HNSW).

One interface, :class:`VectorIndex`, three backends:

- ``exact``: the matrix itself (float32 or float16) and a blocked matmul + torch ``topk``. It is
  the reference every other backend is measured against, and below :data:`CROSSOVER_N` vectors
  the right answer (``benchmarks/search.py``; :func:`choose_backend` gives the figures).
- ``faiss``: an HNSW graph over flat (``f32``) or float16 scalar-quantised (``f16``) vectors,
  inner product. faiss is what clip-retrieval and autofaiss serve LAION-scale indices with.
- ``usearch``: an HNSW graph with ``f32``, ``f16`` or ``i8`` vectors, cosine.

Vectors are L2-normalised float32 (keeper embed's embeddings), so inner product = cosine and the
scores every backend returns are cosines. Results name rows by id (the order of rows inside an
index is its own); ids are unique: an ``add`` of an id already present is refused, never
silently replaced (HNSW graphs cannot delete, and a replace would leave the old vector findable).

An ANN backend's ``ef_search`` (its search breadth) is calibrated, unless given, to the smallest
value whose recall@10 against exact search reaches ``target_recall`` (its one-sided 95 % lower
bound does) on up to 500 of the rows being added, held out of the graph until the calibration
is done: real out-of-index queries from the data's own distribution, the way autofaiss tunes its
search parameters on the data. Each is held out with its byte-identical copies, never more than
half the rows in all: a table of few distinct vectors, each copied ~10+ times, keeps half its rows
in the graph, and is not calibrated when that leaves under 20 queries. ``add`` re-calibrates the
same way. The measured recall is kept in the metadata (:attr:`IndexMeta.recall_at_10`), so an
index that could not reach its target (usearch ``i8`` on random vectors: 0.83 at ef 4096) says so
instead of pretending. A query whose graph search finds fewer than k rows (rows the graph cannot
reach, as k nears the row count) is answered by an exact scan instead: a search always answers k.

On disk (a local folder or an ``s3://`` prefix, through :mod:`keeper_core.storage`):
``index.json`` (:class:`IndexMeta`) names the backend's native file and the ids file
(``ids-<sha>.parquet``, one string column), each named by a prefix of its sha256 and checked on
load. ``index.json`` is written last, so a crash mid-save leaves the previous index readable.
No pickle anywhere: faiss's own serialisation, usearch's own, ``.npy`` without objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError, StorageError

FORMAT_VERSION = 1
META_FILE = "index.json"
Backend = Literal["exact", "faiss", "usearch"]
BACKENDS: tuple[str, ...] = ("exact", "faiss", "usearch")
_DTYPES: dict[str, tuple[str, ...]] = {
    "exact": ("f32", "f16"),
    "faiss": ("f32", "f16"),
    "usearch": ("f32", "f16", "i8"),
}
_BYTES = {"f32": 4, "f16": 2, "i8": 1}
#: Below this many vectors ``choose_backend`` answers ``exact`` (see its docstring).
CROSSOVER_N = 300_000
_NORM_TOL = 1e-3  # float16 round trips keep norms within ~1e-3; un-normalised rows are far off
_CALIBRATION_QUERIES = 500  # held-out queries: the bound's margin is ~0.01 at 500
_MIN_CALIBRATION_QUERIES = 20  # fewer: an add keeps the ef_search it had
_EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_SCORE_BYTES = 256 << 20  # exact search's (queries x rows) float32 block: bounded per chunk
_ROW_BLOCK = 1 << 16  # rows per exact-search block (a float16 block's upcast is 128 MB at D=512)
_QUERY_BLOCK = 1024  # queries per exact-search pass: a million queries never make one matrix
_GEMV_MAX_Q = 8  # up to here one pass per query (gemv) beats an upcast + GEMM (measured)
#: A found row this close to the k-th exact score counts as a hit in the calibration's recall: a
#: byte-identical copy of a true neighbour (copies share an image_id) is an equally right answer,
#: and counting it a miss drove ef_search to its ceiling on tables of copies (measured).
_TIE_TOL = 1e-5
#: The roles of the files an index holds (``IndexMeta.files``), and the native file's extension
#: per backend. ``save`` names each ``<role>-<first 16 hex of its sha256>.<ext>``: the only names
#: ``index.json`` may give (see :data:`_FILE_NAME`), so a tampered one cannot point a ``load``
#: or the clean-up of a ``save`` outside its folder.
_ROLES: tuple[str, ...] = ("index", "ids")
_NATIVE_EXT = {"exact": "npy", "faiss": "faiss", "usearch": "usearch"}
_FILE_NAME = re.compile(r"(index|ids)-([0-9a-f]{16})\.(npy|faiss|usearch|parquet)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class IndexParams(BaseModel):
    """How an index is built and searched; validated at construction.

    Attributes:
        backend: ``exact``, ``faiss`` (HNSW) or ``usearch`` (HNSW).
        dtype: how vectors are stored: exact and faiss ``f32`` / ``f16``; usearch also ``i8``.
        m: HNSW neighbours per node (faiss ``M``, usearch ``connectivity``).
        ef_construction: HNSW search breadth while inserting.
        ef_search: HNSW search breadth per query; None calibrates it to ``target_recall``.
        target_recall: recall@10 against exact search the calibration aims for.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    backend: Backend = "exact"
    dtype: Literal["f32", "f16", "i8"] = "f16"
    m: int = Field(
        default=32,
        ge=4,
        le=128,
        description="32: random 512-d vectors need it to reach 0.95 recall (16 stalls ~0.92).",
    )
    ef_construction: int = Field(
        default=40,
        ge=8,
        le=2048,
        description="40 (faiss's default): 3x faster builds than 128; ef_search makes up recall.",
    )
    ef_search: int | None = Field(default=None, ge=1, le=1 << 16)
    target_recall: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="0.95: what keeper promises; met by the calibration's 95 % lower bound.",
    )

    @model_validator(mode="after")
    def _dtype_fits_backend(self) -> IndexParams:
        if self.dtype not in _DTYPES[self.backend]:
            raise ValueError(
                f"dtype {self.dtype!r} is not one {self.backend} stores; "
                f"choose one of {list(_DTYPES[self.backend])}"
            )
        return self


class IndexMeta(BaseModel):
    """``index.json``: what an index holds and how it was built.

    Attributes:
        format_version: this module's on-disk format (a newer one is refused).
        params: build and search parameters, ``ef_search`` as calibrated (None: an HNSW index
            too small to calibrate yet, searched exhaustively: :attr:`VectorIndex.ef_search`).
        model_spec: the ModelSpec every vector was embedded with; queries must match it.
        dim: vector dimension.
        count: vectors in the index.
        built_at / updated_at: ISO 8601 UTC times of the build and of the last add.
        table_fingerprint: the caller's fingerprint of the table the vectors came from.
        recall_at_10: recall@10 against exact search measured at calibration (1.0 for exact;
            None when ``ef_search`` was given and nothing was measured).
        files: the native index file and the ids file, by role (``index``, ``ids``); only the
            names :meth:`VectorIndex.save` writes are accepted (``index-<sha16>.<npy | faiss |
            usearch>`` as the backend's, ``ids-<sha16>.parquet``, ``<sha16>`` the first 16 hex
            digits of its sha256), never a path.
        sha256: each file's sha256 (64 lowercase hex digits) by role, checked on load.
        versions: the library versions that wrote the native file.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    params: IndexParams
    model_spec: str
    dim: int
    count: int
    built_at: str
    updated_at: str
    table_fingerprint: str | None = None
    recall_at_10: float | None = None
    files: dict[str, str] = Field(default_factory=dict)
    sha256: dict[str, str] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)

    @field_validator("files", "sha256")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(_ROLES))
        if unknown:
            raise ValueError(f"unknown file role(s) {unknown}; an index has {list(_ROLES)}")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for role, sha in value.items():
            if not _SHA256.fullmatch(sha):
                raise ValueError(f"sha256[{role!r}] = {sha!r} is not a sha256 hex digest")
        return value

    @model_validator(mode="after")
    def _names_keeper_writes(self) -> IndexMeta:
        """Each file is named as ``save`` names it: ``<role>-<sha16>.<ext>``, no path."""
        for role, name in self.files.items():
            ext = _NATIVE_EXT[self.params.backend] if role == "index" else "parquet"
            m = _FILE_NAME.fullmatch(name)
            if m is None or m.group(1) != role or m.group(3) != ext:
                raise ValueError(
                    f"files[{role!r}] = {name!r} is not a name keeper writes "
                    f"({role}-<16 hex digits>.{ext})"
                )
            sha = self.sha256.get(role)
            if sha is not None and m.group(2) != sha[:16]:
                raise ValueError(f"files[{role!r}] = {name!r} does not match its sha256 {sha}")
        return self


@dataclass(frozen=True)
class SearchResult:
    """``ids[q][j]`` is query ``q``'s ``j``-th nearest row; ``scores[q, j]`` its cosine."""

    ids: list[list[str]]
    scores: np.ndarray  # (Q, k) float32, best first


# ---------------------------------------------------------------------------------------------
# Choosing


def choose_backend(n_vectors: int) -> IndexParams:
    """The backend ``benchmarks/search.py`` measured best for ``n_vectors`` 512-d vectors.

    Measured (benchmarks/results/search.json: 2 cores, 24 GiB, CLIP-shaped clustered vectors,
    one query at a time, k = 10): exact float16 costs ~0.03 ms per 1,000 vectors (p50 3.4 ms at
    100k, 31 ms at 1M; it reads every vector), recall 0.99-1.0, no build, 1,024 B per vector.
    faiss HNSW f16 (M 32, ef calibrated to recall >= 0.95) answers in 0.22 ms at 100k and 0.55 ms
    at 1M (recall 0.97 / 0.96) for 1,288 B per vector and a build of 11 s / 156 s. The
    crossover is ~300k (``CROSSOVER_N``): there exact search passes ~10 ms, the cost of encoding
    the query text on a CPU, so search stops being negligible; below it exact needs no build, no
    calibration and is right for any data. usearch (1.3 / 5.4 ms at the same recall, slower
    builds) and hnswlib (0.5 / 1.5 ms, float32 only) lost to faiss at every size. On vectors with
    no structure (random) no graph index reaches 0.95 cheaply (ef 3072 at 100k: 16 ms, 4x exact;
    recall 0.49 at 1M), so exact stays right there at any size that fits.

    Past one machine: HNSW f16 holds ~15M vectors in 24 GiB; beyond that shard rows across
    replicas and merge top-k, or compress (faiss IVF-PQ, 80 B per vector, measured recall@10 only
    0.58-0.65 without a re-rank over full vectors: autofaiss's trade).

    Args:
        n_vectors: how many vectors the index will hold.

    Returns:
        The parameters to build with (``exact`` f16, or ``faiss`` HNSW f16).
    """
    if n_vectors < 0:
        raise ConfigError(f"n_vectors must be >= 0, got {n_vectors}")
    if n_vectors < CROSSOVER_N:
        return IndexParams(backend="exact", dtype="f16")
    return IndexParams(backend="faiss", dtype="f16")


def estimate_memory_bytes(params: IndexParams, n_vectors: int, dim: int) -> int:
    """Resident bytes of an index of ``n_vectors`` vectors (vectors + graph; ids not counted).

    HNSW keeps ``2 * m`` 4-byte neighbour slots per vector on its bottom layer and ~1/m of the
    vectors on each upper layer; usearch adds an 8-byte key and a small node header.
    """
    vec = n_vectors * dim * _BYTES[params.dtype]
    if params.backend == "exact":
        return vec
    links = n_vectors * params.m * 2 * 4 * (1 + 1 / params.m)
    per_node = 8 + 8 if params.backend == "usearch" else 8  # keys/levels/offsets
    return int(vec + links + n_vectors * per_node)


# ---------------------------------------------------------------------------------------------
# Checks and helpers


def _threads() -> int:
    """Threads for a search or a build: torch's setting, never more than the machine's cores."""
    import torch

    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _check_vectors(vectors: Any, dim: int | None, what: str) -> np.ndarray:
    """``vectors`` as a C-contiguous (N, D) float32 array of finite unit-norm rows."""
    arr = np.asarray(vectors)
    if arr.ndim == 1 and what == "queries":
        arr = arr[None, :]
    if arr.ndim != 2:
        raise DataError(f"{what} must be a 2-D (N, D) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what} must be floating point, got {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise DataError(f"{what} have dimension {arr.shape[1]}, the index holds {dim}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # Arrow and Ray hand out read-only views; torch wants writable
        arr = arr.copy()
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)[:10].tolist()
        raise DataError(f"{what}: {int((~finite).sum())} row(s) with NaN or inf", rows=rows)
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))  # linalg.norm squares a full copy
    off = np.abs(norms - 1.0) > _NORM_TOL
    if off.any():
        rows = np.flatnonzero(off)[:10].tolist()
        raise DataError(
            f"{what}: {int(off.sum())} row(s) not L2-normalised (norms e.g. "
            f"{norms[off][:3].round(4).tolist()}); keeper compares unit vectors by inner product",
            rows=rows,
        )
    return arr


def _check_ids(ids: Sequence[str], n: int, present: dict[str, int]) -> list[str]:
    out = [str(i) for i in ids]
    if len(out) != n:
        raise DataError(f"{n} vectors but {len(out)} ids")
    dup = [i for i, c in Counter(out).items() if c > 1]
    if dup:
        raise DataError(f"{len(dup)} id(s) repeated among the new rows, e.g. {dup[:5]}")
    clash = [i for i in out if i in present]
    if clash:
        raise DataError(
            f"{len(clash)} id(s) already in the index, e.g. {clash[:5]}: an index never replaces "
            "a row (its graph cannot delete one); build a new index from the updated table"
        )
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _import_backend(backend: str) -> Any:
    try:
        if backend == "faiss":
            import faiss

            return faiss
        import usearch.index

        return usearch.index
    except ImportError as e:
        dist = "faiss-cpu" if backend == "faiss" else "usearch"
        raise ConfigError(
            f"backend {backend!r} needs the {dist} package (pip install {dist}): {e}"
        ) from e


# ---------------------------------------------------------------------------------------------
# Backends: each holds the native index and answers add / search / to_bytes


class _Exact:
    """The matrix, searched in chunks with torch (topk is ~6x numpy's argpartition here)."""

    def __init__(self, params: IndexParams, dim: int) -> None:
        import torch

        self.dtype = torch.float16 if params.dtype == "f16" else torch.float32
        self.chunks: list[Any] = []  # torch tensors, one per add: no copy of the whole matrix
        self.dim = dim

    def add(self, x: np.ndarray, start: int) -> None:
        import torch

        t = torch.from_numpy(x)
        # float32 -> float32 is no copy: clone, so the caller's array is not the index.
        self.chunks.append(t.clone() if self.dtype == torch.float32 else t.to(self.dtype))

    def search(self, q: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        if not len(q):  # as faiss and usearch answer: (0, k)
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        parts = [
            self._search_block(q[lo : lo + _QUERY_BLOCK], k)
            for lo in range(0, len(q), _QUERY_BLOCK)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_block(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        qt = torch.from_numpy(q)
        # Scores (queries x rows) and a float16 block's upcast copy both stay ~128-256 MB.
        rows_per_block = max(1024, min(_ROW_BLOCK, _SCORE_BYTES // (4 * max(1, len(q)))))
        best_s = torch.full((len(q), k), -torch.inf)
        best_i = torch.full((len(q), k), -1, dtype=torch.int64)
        offset = 0
        for m in self.chunks:
            for lo in range(0, len(m), rows_per_block):
                block = m[lo : lo + rows_per_block]
                if len(q) > _GEMV_MAX_Q:  # float16 GEMM is a slow path on CPUs: upcast
                    s = block.float() @ qt.T
                elif self.dtype == torch.float16:
                    s = (block @ qt.to(torch.float16).T).float()
                else:  # torch's float32 gemv is ~2.3x slower than numpy's BLAS here
                    s = torch.from_numpy(block.numpy() @ q.T)
                # topk along a transposed view takes a strided path ~3x slower: copy first.
                s = s.T.contiguous()
                ts, ti = torch.topk(s, min(k, s.shape[1]), dim=1)
                cat_s = torch.cat([best_s, ts], dim=1)
                cat_i = torch.cat([best_i, ti + offset + lo], dim=1)
                best_s, pos = torch.topk(cat_s, k, dim=1)
                best_i = torch.gather(cat_i, 1, pos)
            offset += len(m)
        return best_i.numpy(), best_s.numpy()

    def to_bytes(self) -> bytes:
        import torch

        buf = io.BytesIO()
        np.save(buf, torch.cat(self.chunks).numpy(), allow_pickle=False)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, params: IndexParams, dim: int) -> _Exact:
        import torch

        arr = np.load(io.BytesIO(data), allow_pickle=False)
        self = cls(params, dim)
        self.chunks = [torch.from_numpy(np.ascontiguousarray(arr))]
        return self

    def rows(self, rows: np.ndarray) -> np.ndarray:
        import torch

        idx = torch.from_numpy(rows.astype(np.int64))
        out, offset = [], 0
        for m in self.chunks:
            mine = idx[(idx >= offset) & (idx < offset + len(m))] - offset
            out.append(m[mine].float())
            offset += len(m)
        return torch.cat(out).numpy()

    def replace(self, rows: np.ndarray, x: np.ndarray) -> None:
        import torch

        offset = 0
        for m in self.chunks:
            mine = (rows >= offset) & (rows < offset + len(m))
            if mine.any():
                at = torch.from_numpy(rows[mine] - offset)
                m[at] = torch.from_numpy(np.ascontiguousarray(x[mine])).to(m.dtype)
            offset += len(m)

    def keep(self, keep: np.ndarray) -> None:
        """Only the rows where ``keep`` (bool, one per row) stay, in order: one copy of them."""
        import torch

        mask = torch.from_numpy(keep)
        offset, kept = 0, []
        for m in self.chunks:
            kept.append(m[mask[offset : offset + len(m)]])
            offset += len(m)
        self.chunks = [torch.cat(kept)] if kept else []

    def nbytes(self) -> int:
        return sum(int(m.numel() * m.element_size()) for m in self.chunks)


class _Faiss:
    def __init__(self, params: IndexParams, dim: int, native: Any = None) -> None:
        self.faiss = _import_backend("faiss")
        if native is None:
            f = self.faiss
            if params.dtype == "f16":
                native = f.IndexHNSWSQ(
                    dim, f.ScalarQuantizer.QT_fp16, params.m, f.METRIC_INNER_PRODUCT
                )
            else:
                native = f.IndexHNSWFlat(dim, params.m, f.METRIC_INNER_PRODUCT)
            native.hnsw.efConstruction = params.ef_construction
        self.index = native

    def add(self, x: np.ndarray, start: int) -> None:
        self.faiss.omp_set_num_threads(_threads())
        if not self.index.is_trained:  # the fp16 quantiser has nothing to learn, but asks
            self.index.train(x)
        self.index.add(x)

    def search(self, q: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        self.faiss.omp_set_num_threads(_threads())
        sp = self.faiss.SearchParametersHNSW(efSearch=max(ef or k, k))
        scores, labels = self.index.search(q, k, params=sp)
        return labels.astype(np.int64), scores.astype(np.float32)

    def to_bytes(self) -> bytes:
        return bytes(self.faiss.serialize_index(self.index))

    @classmethod
    def from_bytes(cls, data: bytes, params: IndexParams, dim: int) -> _Faiss:
        faiss = _import_backend("faiss")
        return cls(params, dim, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and np.all(np.diff(rows) == 1):
            got = self.index.reconstruct_n(int(rows[0]), len(rows))
        else:
            got = np.stack([self.index.reconstruct(int(r)) for r in rows])
        return np.ascontiguousarray(got, dtype=np.float32)

    def nbytes(self) -> int:
        """Codes plus the HNSW neighbour table: what the index holds in memory."""
        idx = self.index
        codes = int(idx.ntotal) * int(idx.storage.sa_code_size())
        return codes + int(idx.hnsw.neighbors.size()) * 4 + int(idx.hnsw.levels.size()) * 4


class _Usearch:
    def __init__(self, params: IndexParams, dim: int, native: Any = None) -> None:
        mod = _import_backend("usearch")
        if native is None:
            native = mod.Index(
                ndim=dim,
                metric="cos",  # = ip on unit vectors, and i8 distances come back as cosines
                dtype=params.dtype,
                connectivity=params.m,
                expansion_add=params.ef_construction,
                multi=False,
            )
        else:  # usearch does not save its build breadth: a restored index would grow at 128
            native.expansion_add = params.ef_construction
        self.index = native

    def add(self, x: np.ndarray, start: int) -> None:
        keys = np.arange(start, start + len(x), dtype=np.uint64)
        self.index.add(keys, x, threads=_threads())

    def search(self, q: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        self.index.expansion_search = max(ef or k, k)
        m = self.index.search(q, k, threads=_threads())
        keys = np.full((len(q), k), -1, dtype=np.int64)
        dist = np.full((len(q), k), np.inf, dtype=np.float32)
        if len(q) == 1:  # usearch answers one query with Matches (found rows only), not a batch
            got = len(m.keys)
            keys[0, :got], dist[0, :got] = m.keys, m.distances
        else:
            found = np.arange(k)[None, :] < np.asarray(m.counts)[:, None]
            keys[found] = np.asarray(m.keys, dtype=np.int64)[found]
            dist[found] = np.asarray(m.distances, dtype=np.float32)[found]
        return keys, (1.0 - dist).astype(np.float32)

    def to_bytes(self) -> bytes:
        return bytes(self.index.save())

    @classmethod
    def from_bytes(cls, data: bytes, params: IndexParams, dim: int) -> _Usearch:
        mod = _import_backend("usearch")
        native = mod.Index.restore(data)
        if native is None:
            raise DataError("usearch could not read the index file")
        return cls(params, dim, native)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        got = self.index.get(rows.astype(np.uint64), dtype=np.float32)
        return np.ascontiguousarray(got, dtype=np.float32)

    def nbytes(self) -> int:
        return int(self.index.memory_usage)


_BACKEND_CLASSES: dict[str, Any] = {"exact": _Exact, "faiss": _Faiss, "usearch": _Usearch}


# ---------------------------------------------------------------------------------------------
# The index


class VectorIndex:
    """Nearest neighbours by cosine over unit vectors of one model spec. Make with :func:`build`
    or :meth:`load`; grow with :meth:`add`; query with :meth:`search`."""

    def __init__(self, meta: IndexMeta, impl: Any, ids: list[str]) -> None:
        self.meta = meta
        self._impl = impl
        self._ids = ids
        self._row = {v: i for i, v in enumerate(ids)}

    def __len__(self) -> int:
        return self.meta.count

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def model_spec(self) -> str:
        return self.meta.model_spec

    def memory_bytes(self) -> int:
        """Resident bytes of the native index (vectors + graph), ids not counted."""
        return int(self._impl.nbytes())

    def vectors(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of ``ids`` as stored (float32; f16 and i8 storage rounded), in that order.

        Raises:
            KeyError: an id the index does not hold.
        """
        rows = np.fromiter((self._row[i] for i in ids), dtype=np.int64, count=len(ids))
        if not len(rows):
            return np.zeros((0, self.meta.dim), np.float32)
        order = np.argsort(rows, kind="stable")  # backends read ascending rows (a run at once)
        got = self._impl.rows(rows[order])
        out = np.empty_like(got)
        out[order] = got
        return out

    def replace(self, vectors: Any, ids: Sequence[str]) -> None:
        """Give rows already in the index new vectors (a photo embedded again after it was saved
        over). Only the exact backend can: an HNSW graph's edges were built from the old vector.

        Raises:
            DataError: another backend, an id not in the index or repeated among ``ids`` (which
                vector would win is torch's choice: refused, as ``add`` refuses it), wrong
                dimension, non-finite or non-unit rows, or len(ids) != len(vectors).
        """
        if self.meta.params.backend != "exact":
            raise DataError(
                f"a {self.meta.params.backend} index cannot replace a row's vector (its graph "
                "was built from the old one): rebuild it"
            )
        x = _check_vectors(vectors, self.meta.dim, "vectors")
        if len(ids) != len(x):
            raise DataError(f"{len(ids)} ids for {len(x)} vectors")
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}")
        repeated = [i for i, c in Counter(ids).items() if c > 1]
        if repeated:
            raise DataError(f"{len(repeated)} id(s) named twice, e.g. {repeated[:5]}")
        if len(x):
            self._impl.replace(np.array([self._row[i] for i in ids], dtype=np.int64), x)
            self.meta.updated_at = _now()

    def remove(self, ids: Sequence[str]) -> None:
        """Take rows out (photos no longer in the table). Only the exact backend can: an HNSW
        graph routes searches through its rows' edges.

        Raises:
            DataError: another backend, or an id not in the index.
        """
        if self.meta.params.backend != "exact":
            raise DataError(
                f"a {self.meta.params.backend} index cannot take a row out (searches route "
                "through its edges): rebuild it"
            )
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise DataError(f"{len(missing)} id(s) not in the index, e.g. {missing[:5]}")
        if not ids:
            return
        keep = np.ones(len(self._ids), dtype=bool)
        keep[[self._row[i] for i in ids]] = False
        self._impl.keep(keep)
        self._ids = [v for v, k in zip(self._ids, keep.tolist(), strict=True) if k]
        self._row = {v: i for i, v in enumerate(self._ids)}
        self.meta.count = len(self._ids)
        self.meta.updated_at = _now()

    def add(self, vectors: Any, ids: Sequence[str]) -> None:
        """Add rows; the index grows in place (no rebuild) and ``ef_search`` is re-calibrated.

        Raises:
            DataError: wrong dimension, non-finite or non-unit rows, an id already in the index
                or repeated among ``ids`` (refused, never replaced), or len(ids) != len(vectors).
        """
        x = _check_vectors(vectors, self.meta.dim, "vectors")
        new = _check_ids(ids, len(x), self._row)
        if not len(x):
            return
        self._insert(x, new)
        self.meta.updated_at = _now()

    def _insert(self, x: np.ndarray, new: list[str]) -> None:
        """Add rows, calibrating ef_search on some of them held out until the rest are in.

        Held-out rows are real out-of-index queries from the data's own distribution (a row
        already in an HNSW graph finds its neighbours through its own edges: measured, it
        overstates recall by ~0.015 on random vectors). The truth is exact search over the new
        rows as given (float32) and the old rows as stored. Held-out rows (queries and their
        byte-identical copies) are at most half the rows added; fewer than
        ``_MIN_CALIBRATION_QUERIES`` queries within that (a table of few distinct vectors, each
        copied many times) calibrate nothing, as too few rows do.
        """
        p = self.meta.params
        # Calibrated before, or never: not a breadth the caller gave. An index built under 200
        # rows by keeper before 2026-12 stored the grid's top as if given; it calibrates too.
        placeholder = p.ef_search == _EF_GRID[-1] and self.meta.recall_at_10 is None
        auto = p.backend != "exact" and (
            p.ef_search is None or self.meta.recall_at_10 is not None or placeholder
        )
        n_hold = min(_CALIBRATION_QUERIES, len(x) // 10) if auto else 0
        # The held-out queries are one row of each of n_hold groups of byte-identical rows, and
        # all the group's copies are held out with it: a twin left in the graph answers it as a
        # row in the index would (measured: calibrated 0.98 where novel queries got 0.92 on a
        # table holding every image twice).
        first, group = _copy_groups(x) if n_hold else (np.arange(0), np.arange(0))
        n_hold = min(n_hold, len(first))
        picked = np.arange(0)
        if n_hold >= _MIN_CALIBRATION_QUERIES:
            rng = np.random.default_rng(self.meta.count + len(x))  # a rebuild calibrates alike
            picked = rng.choice(len(first), size=n_hold, replace=False)
            # With ~10+ copies of every vector, n_hold groups could be every row: an empty graph
            # (nothing to calibrate) or a sliver of one. Picked groups are held out, in pick
            # order, while their rows stay within half of x; under ~5 copies per vector never
            # reaches that cap (n_hold <= len(x) // 10).
            sizes = np.bincount(group, minlength=len(first))[picked]
            picked = np.sort(picked[np.cumsum(sizes) <= len(x) // 2])
        if len(picked) < _MIN_CALIBRATION_QUERIES:
            order = np.arange(len(x))
            hold = queries = order[:0]
        else:
            queries = first[picked]
            hold = np.flatnonzero(np.isin(group, picked))
            order = np.concatenate([np.setdiff1d(np.arange(len(x)), hold), hold])
        rest = order[: len(x) - len(hold)]
        if not len(hold):
            self._append(x, new)  # in order: no (N, D) copy of the input (2 GB at 1M x 512)
        else:
            # A block at a time: x[rest] whole would copy all but the held-out rows.
            for lo in range(0, len(rest), _ROW_BLOCK):
                blk = rest[lo : lo + _ROW_BLOCK]
                self._append(x[blk], [new[i] for i in blk])
        if len(hold):
            self._calibrate(x[queries], x, rest)
            self._append(x[hold], [new[i] for i in hold])
        elif p.backend == "exact":
            self.meta.recall_at_10 = 1.0
        # Else too few rows (or distinct vectors) to measure: ef_search stays as it was (None:
        # searched as broadly as the grid goes, by a scan up to 4,096 rows) and the next add
        # large enough calibrates.

    def _append(self, x: np.ndarray, new: list[str]) -> None:
        if not len(x):
            return
        self._impl.add(x, self.meta.count)
        for i, v in enumerate(new, start=self.meta.count):
            self._row[v] = i
        self._ids.extend(new)
        self.meta.count += len(new)

    def search(self, queries: Any, k: int, *, model_spec: str) -> SearchResult:
        """The ``k`` nearest rows of each query, best first.

        Every query gets exactly ``k`` rows. An HNSW graph can leave rows unreachable (measured:
        faiss and usearch at m 4 on clustered rows miss 1-4 of 1,000-5,000 even at ef 65,536;
        usearch at m 32 on 5,000 missed some at k = 5,000, built on several threads), so a query
        whose graph search comes back with fewer than ``k`` rows is answered by an exact scan of
        the stored rows instead (:meth:`_scan`, scored as the backend scores). That happens only
        as ``k`` nears the rows the graph reaches (a filtered ``/v1/search`` fetches up to the
        row count), and costs what an exact search of the index costs, for that query alone.

        Args:
            queries: (Q, D) or (D,) unit vectors.
            k: neighbours per query, 1..len(self).
            model_spec: the ModelSpec the queries were embedded with; must be the index's.

        Raises:
            DataError: another model spec than the index's (names both), wrong dimension,
                non-finite or non-unit queries.
            ConfigError: k outside 1..len(self).
        """
        if model_spec != self.meta.model_spec:
            raise DataError(
                f"queries embedded with model spec {model_spec!r}, but the index holds "
                f"{self.meta.model_spec!r} embeddings: similarities across specs mean nothing "
                "(embed the queries with the index's spec, or index a table of the queries' spec)"
            )
        q = _check_vectors(queries, self.meta.dim, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ConfigError(f"k must be an integer, got {k!r}")
        k = int(k)  # numpy's too: faiss's binding takes Python ints only
        if not 1 <= k <= self.meta.count:
            raise ConfigError(f"k must be in 1..{self.meta.count} (the index's rows), got {k}")
        if self._scanned():
            labels, scores = self._scan(q, k)
        else:
            labels, scores = self._raw_search(q, k, self.ef_search)
            short = (labels < 0).any(axis=1)
            if short.any():  # rows the graph cannot reach: no ef finds them, a scan does
                labels[short], scores[short] = self._scan(q[short], k)
        return SearchResult(ids=[[self._ids[j] for j in row] for row in labels], scores=scores)

    def _scanned(self) -> bool:
        """An HNSW index not calibrated yet (too few rows added at once to measure) and no larger
        than the grid's top breadth is searched by a scan of its stored rows: a small graph of
        copies or clusters leaves rows unreachable at any ef (measured: faiss m=4 on 20 vectors
        x 8 copies), and a scan of at most 4,096 rows costs less than such a search."""
        p = self.meta.params
        return (
            p.backend != "exact"
            and p.ef_search is None
            and self.meta.recall_at_10 is None
            and self.meta.count <= _EF_GRID[-1]
        )

    def _scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the stored rows (as the backend holds them), scored as the backend
        scores (usearch: cosines); ties by row. Rows are read back a block at a time and queries
        scanned ``_QUERY_BLOCK`` at a time: a scan of a large index never holds all its rows as
        float32 (2 GB at 1M x 512), nor a (queries x rows) matrix past ~256 MB."""
        cosine = self.meta.params.backend == "usearch"
        if cosine:
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
        n = self.meta.count
        labels = np.empty((len(q), k), np.int64)
        scores = np.empty((len(q), k), np.float32)
        for qlo in range(0, len(q), _QUERY_BLOCK):
            qb = q[qlo : qlo + _QUERY_BLOCK]
            block = max(1024, min(_ROW_BLOCK, _SCORE_BYTES // (4 * len(qb))))
            best_i = np.empty((len(qb), 0), np.int64)
            best_s = np.empty((len(qb), 0), np.float32)
            for lo in range(0, n, block):
                rows = self._impl.rows(np.arange(lo, min(lo + block, n), dtype=np.int64))
                if cosine:
                    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
                s = (qb @ rows.T).astype(np.float32, copy=False)
                at = np.broadcast_to(np.arange(lo, lo + len(rows), dtype=np.int64), s.shape)
                # The best so far are lower rows than this block's: a stable sort keeps ties by row.
                cat_s, cat_i = np.hstack([best_s, s]), np.hstack([best_i, at])
                top = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
                best_i = np.take_along_axis(cat_i, top, axis=1)
                best_s = np.take_along_axis(cat_s, top, axis=1)
            labels[qlo : qlo + len(qb)], scores[qlo : qlo + len(qb)] = best_i, best_s
        return labels, scores

    @property
    def ef_search(self) -> int | None:
        """The HNSW search breadth searches use: as calibrated or given; the grid's top for an
        index not calibrated yet (searched then by a scan of its rows, up to 4,096). None for
        exact."""
        p = self.meta.params
        if p.backend == "exact":
            return None
        return p.ef_search if p.ef_search is not None else _EF_GRID[-1]

    def _raw_search(self, q: np.ndarray, k: int, ef: int | None) -> tuple[np.ndarray, np.ndarray]:
        labels, scores = self._impl.search(q, k, ef)
        return labels, scores

    # -- calibration ---------------------------------------------------------------------------

    def _calibrate(self, queries: np.ndarray, x: np.ndarray, rest: np.ndarray) -> None:
        """The smallest ef_search whose recall@10 on ``queries`` reaches target_recall.

        ``x[rest]`` are the rows last added, as given; older rows are read back as stored. A
        found row whose exact score ties the k-th true one (within ``_TIE_TOL``) is a hit.
        """
        p = self.meta.params
        k = min(10, self.meta.count)
        truth, truth_s = self._exact_truth(queries, k, x, rest)
        kth = truth_s[:, k - 1]
        grid = [ef for ef in _EF_GRID if ef >= k] or [_EF_GRID[-1]]
        measured: dict[int, float] = {}
        bounds: dict[int, float] = {}

        def good(i: int) -> bool:
            if grid[i] not in measured:
                labels = self._raw_search(queries, k, grid[i])[0]
                ties = self._exact_scores(queries, labels, x, rest) >= kth[:, None] - _TIE_TOL
                per_query = _recalls(labels, truth, ties)
                # One-sided 95 % lower bound: a few hundred queries' mean wanders by ~0.01-0.02
                # on clustered data (measured), so the mean alone would promise too much.
                se = float(per_query.std()) / np.sqrt(len(per_query))
                measured[grid[i]] = float(per_query.mean())
                bounds[grid[i]] = measured[grid[i]] - 1.645 * se
            return bounds[grid[i]] >= p.target_recall

        # Recall grows with ef: step up 4 grid places (x4 ef) at a time, then bisect the last
        # step: ~5 searches of the sample, and none far broader than the answer.
        lo, hi = 0, min(4, len(grid) - 1)
        while not good(hi) and hi < len(grid) - 1:
            lo, hi = hi + 1, min(hi + 4, len(grid) - 1)
        if not good(hi):
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if good(mid):
                hi = mid
            else:
                lo = mid + 1
        chosen = grid[hi]
        good(hi)
        recall = measured[chosen]
        self.meta.params = p.model_copy(update={"ef_search": chosen})
        self.meta.recall_at_10 = round(float(recall), 4)

    def _exact_scores(
        self, q: np.ndarray, labels: np.ndarray, x: np.ndarray, rest: np.ndarray
    ) -> np.ndarray:
        """Inner products of each query with its found rows, as :meth:`_exact_truth` sees them.

        Old rows as stored, rows added last (``x[rest]``) as given; -inf where nothing was found.
        """
        n_old = self.meta.count - len(rest)
        flat = labels.ravel()
        vecs = np.zeros((len(flat), self.meta.dim), dtype=np.float32)
        old = (flat >= 0) & (flat < n_old)
        if old.any():
            uniq, inv = np.unique(flat[old], return_inverse=True)
            vecs[old] = self._impl.rows(uniq)[inv]
        new = flat >= n_old
        vecs[new] = x[rest[flat[new] - n_old]]
        scores = np.einsum("qkd,qd->qk", vecs.reshape(*labels.shape, -1), q)
        scores[labels < 0] = -np.inf
        return scores

    def _exact_truth(
        self, q: np.ndarray, k: int, x: np.ndarray, rest: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k rows and scores for ``q``: old rows as stored, then ``x[rest]``, a block
        at a time."""
        n_old = self.meta.count - len(rest)
        exact = _Exact(IndexParams(backend="exact", dtype="f32"), self.meta.dim)
        best_i = np.empty((len(q), 0), dtype=np.int64)
        best_s = np.empty((len(q), 0), dtype=np.float32)
        block = 1 << 16
        for lo in range(0, self.meta.count, block):
            hi = min(lo + block, self.meta.count)
            parts = []
            if lo < n_old:
                parts.append(self._impl.rows(np.arange(lo, min(hi, n_old))))
            if hi > n_old:
                parts.append(x[rest[max(lo, n_old) - n_old : hi - n_old]])
            exact.chunks = []
            exact.add(np.concatenate(parts) if len(parts) > 1 else parts[0], 0)
            i, s = exact.search(q, min(k, hi - lo), None)
            cat_i, cat_s = np.hstack([best_i, i + lo]), np.hstack([best_s, s])
            top = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
            best_i = np.take_along_axis(cat_i, top, 1)
            best_s = np.take_along_axis(cat_s, top, 1)
        return best_i, best_s

    # -- persistence ---------------------------------------------------------------------------

    def save(self, uri: str) -> str:
        """Write the index under folder / ``s3://`` prefix ``uri``; returns ``index.json``'s URI.

        The native file and ``ids-<sha>.parquet`` go first, ``index.json`` last; files of the
        index saved there before are deleted after the new ``index.json`` is in place: only
        names of the roles and form this method writes (:class:`IndexMeta` validates them), and
        none when the previous ``index.json`` is unreadable or malformed. So are files of that
        form in the folder that no ``index.json`` names (a save killed before its
        ``index.json``): nothing would ever read or remove them.

        Raises:
            StorageError: a write failed.
        """
        backend = self.meta.params.backend
        native = self._impl.to_bytes()
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": pa.array(self._ids, pa.string())}), sink)
        id_bytes = sink.getvalue().to_pybytes()
        files, shas = {}, {}
        for role, data, ext in (
            ("index", native, _NATIVE_EXT[backend]),
            ("ids", id_bytes, "parquet"),
        ):
            sha = hashlib.sha256(data).hexdigest()
            name = f"{role}-{sha[:16]}.{ext}"  # by content: never overwrites what index.json names
            storage.write_bytes(storage.join(uri, name), data)
            files[role], shas[role] = name, sha
        try:
            old: IndexMeta | None = _read_meta(uri)
        except (StorageError, DataError):  # none there, or one this save replaces anyway
            old = None
        self.meta.files, self.meta.sha256 = files, shas
        self.meta.versions = {
            "faiss": _version("faiss-cpu"),
            "usearch": _version("usearch"),
            "numpy": np.__version__,
        }
        meta_uri = storage.join(uri, META_FILE)
        storage.write_bytes(meta_uri, self.meta.model_dump_json(indent=2).encode())
        if old is not None:
            # _read_meta validated old's names (``IndexMeta``); checked again here, as nothing
            # but a file this module named may ever be deleted.
            stale = {
                name
                for role, name in old.files.items()
                if role in _ROLES and _FILE_NAME.fullmatch(name) and name not in files.values()
            }
            for name in sorted(stale):
                storage.delete(storage.join(uri, name))
        prefix = uri.rstrip("/") + "/"
        for f in storage.list_files(uri):
            name = f.removeprefix(prefix)
            if _FILE_NAME.fullmatch(name) and name not in files.values():  # a killed save's
                storage.delete(f)
        return meta_uri

    @classmethod
    def load(cls, uri: str) -> VectorIndex:
        """Read an index :meth:`save` wrote under ``uri`` (local folder or ``s3://`` prefix).

        Raises:
            StorageError: no index there, or a file missing.
            DataError: a malformed ``index.json`` (a file name ``save`` does not write among
                them, named), a newer format, a file whose sha256 differs from the one
                recorded, or a row count that disagrees.
        """
        meta = _read_meta(uri)
        blobs = {}
        for role in _ROLES:
            if role not in meta.files:
                raise DataError(f"index.json names no {role} file", source=uri)
            where = storage.join(uri, meta.files[role])
            data = storage.read_bytes(where)
            if hashlib.sha256(data).hexdigest() != meta.sha256.get(role):
                raise DataError("content differs from the sha256 index.json records", source=where)
            blobs[role] = data
        ids = [
            str(v) for v in pq.read_table(pa.BufferReader(blobs["ids"])).column("id").to_pylist()
        ]
        impl = _BACKEND_CLASSES[meta.params.backend].from_bytes(
            blobs["index"], meta.params, meta.dim
        )
        if len(ids) != meta.count:
            raise DataError(f"{len(ids)} ids but index.json says {meta.count} rows", source=uri)
        return cls(meta, impl, ids)


def _copy_groups(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of byte-identical rows: each group's first row (ascending) and each row's group."""
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest()) for r in x),
        dtype=np.uint64,
        count=len(x),
    )
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return np.sort(first), rank[inv.ravel()]


def _recalls(labels: np.ndarray, truth: np.ndarray, ties: np.ndarray | None = None) -> np.ndarray:
    """|found & true| / k per query; with ``ties``, a found row tying the k-th true score is a
    hit too (at most k per query)."""
    k = truth.shape[1]
    hits = []
    for q, (g, t) in enumerate(zip(labels, truth, strict=True)):
        true = set(t.tolist())
        found = {
            j for c, j in enumerate(g.tolist()) if j in true or (ties is not None and ties[q, c])
        }
        hits.append(min(k, len(found)))
    return np.asarray(hits, dtype=np.float64) / k


def _read_meta(uri: str) -> IndexMeta:
    where = storage.join(uri, META_FILE)
    try:
        data = storage.read_bytes(where)
    except StorageError as e:
        raise StorageError(uri, f"no vector index here ({META_FILE}: {e.cause})") from e
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; UnicodeDecodeError: binary
        raise DataError(f"not JSON: {e}", source=where) from e
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(
            f"format_version {version!r}: this keeper reads versions <= {FORMAT_VERSION}",
            source=where,
        )
    try:
        return IndexMeta.model_validate(raw)
    except ValidationError as e:
        raise DataError(f"malformed index metadata: {e}", source=where) from e


def build(
    vectors: Any,
    ids: Sequence[str],
    *,
    model_spec: str,
    params: IndexParams | None = None,
    table_fingerprint: str | None = None,
) -> VectorIndex:
    """An index over ``vectors`` (row ``i`` named ``ids[i]``), calibrated if it is ANN.

    Args:
        vectors: (N, D) L2-normalised float32 embeddings, N >= 1.
        ids: N unique ids (keeper embed's ``image_id``).
        model_spec: the ModelSpec the vectors were embedded with.
        params: backend and its parameters; None = :func:`choose_backend` (N).
        table_fingerprint: the caller's fingerprint of the source table, kept in the metadata.

    Raises:
        DataError: no rows, non-finite or non-unit rows, ids repeated or of the wrong count.
        ConfigError: an empty model spec, or a backend whose package is not installed.
    """
    if not model_spec:
        raise ConfigError("model_spec must name the ModelSpec the vectors came from")
    x = _check_vectors(vectors, None, "vectors")
    if not len(x):
        raise DataError("no vectors: an index needs at least one row")
    params = params or choose_backend(len(x))
    row_ids = _check_ids(ids, len(x), {})
    impl = _BACKEND_CLASSES[params.backend](params, x.shape[1])
    now = _now()
    meta = IndexMeta(
        params=params,
        model_spec=model_spec,
        dim=int(x.shape[1]),
        count=0,
        built_at=now,
        updated_at=now,
        table_fingerprint=table_fingerprint,
    )
    index = VectorIndex(meta, impl, [])
    index._insert(x, row_ids)
    return index
