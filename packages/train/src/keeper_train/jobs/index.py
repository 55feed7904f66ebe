"""Build (or grow) the nearest-neighbour index of an embedding table, beside the table.

    keeper index --table s3://bucket/emb/vit-b-32 [--backend auto|exact|faiss|usearch]
    python -m keeper_train.jobs.index --config FILE table=... [key=value ...]   # the same job

The index (``keeper_core.vector_index``) is written under ``TABLE/index/`` (or ``output``): the
backend's native file, the row ids (keeper embed's ``image_uri``: unique in a table, where
``image_id`` repeats for byte-identical copies) and ``index.json`` with the model spec, row count,
build parameters, measured recall@10 and the table's fingerprint (its part names and row count).
``backend=auto`` takes what ``benchmarks/search.py`` measured best for the table's size
(``choose_backend``: exact float16 below 300k vectors, faiss HNSW float16 above).

Run again after ``keeper embed`` added images: rows the index lacks are added in place (an HNSW
graph grows; its search breadth is re-calibrated to the recall target). Rows whose vector the table
has replaced (``keeper embed`` embeds a photo saved over in place again) get the new vector in an
exact index (``replaced``), and rows the table no longer holds (``keeper embed prune=true``) are
taken out of it (``removed``); an HNSW graph cannot take a row out, so there both are counted
(``changed``, ``stale``), and ``rebuild=true`` builds anew; past ``rebuild_over`` of its rows
so outdated, the run builds it anew by itself. An index of another model spec, or of other
parameters, is never grown: rebuild it.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keeper_core import run_lock, storage
from keeper_core.corpus import EMBEDDINGS, embedding_matrix
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.vector_index import (
    CROSSOVER_N,
    IndexParams,
    VectorIndex,
    build,
    choose_backend,
)
from keeper_train.config import job_main
from keeper_train.table import list_parts

INDEX = "index"
log = logging.getLogger(__name__)


class IndexConfig(BaseModel):
    """Everything keeper index takes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="keeper embed's output folder or s3:// prefix")
    output: str | None = Field(None, description="where the index goes (default TABLE/index)")
    backend: Literal["auto", "exact", "faiss", "usearch"] = "auto"
    dtype: Literal["f32", "f16", "i8"] = Field("f16", description="how vectors are stored")
    m: int | None = Field(None, ge=4, le=128, description="HNSW neighbours per node")
    ef_construction: int | None = Field(None, ge=8, le=2048)
    target_recall: float = Field(0.95, gt=0, le=1, description="recall@10 vs exact search")
    rebuild: bool = Field(False, description="build anew instead of adding to the index there")
    rebuild_over: float = Field(
        0.1,
        ge=0,
        le=1,
        description="an HNSW index more than this share of whose rows are outdated (rows the "
        "table no longer holds, or holds with a new vector: a graph can neither drop nor move "
        "them) is built anew instead of grown; 1: never",
    )

    @model_validator(mode="after")
    def _params_fit(self) -> IndexConfig:
        # IndexParams' own rules (a dtype the backend stores), before the table is read: for
        # auto, with each backend choose_backend may take (exact below CROSSOVER_N, faiss above).
        for n in (0, CROSSOVER_N) if self.backend == "auto" else (0,):
            try:
                self._params(n)
            except ValidationError as e:
                why = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
                auto = (
                    f" (backend=auto takes {choose_backend(0).backend} below {CROSSOVER_N} "
                    f"vectors, {choose_backend(CROSSOVER_N).backend} from there)"
                    if self.backend == "auto"
                    else ""
                )
                raise ValueError(f"backend={self.backend} dtype={self.dtype}: {why}{auto}") from e
        return self

    def where(self) -> str:
        return self.output or storage.join(self.table, INDEX)

    def _params(self, n: int) -> IndexParams:
        base = choose_backend(n) if self.backend == "auto" else IndexParams(backend=self.backend)
        update: dict[str, object] = {"dtype": self.dtype, "target_recall": self.target_recall}
        update.update(
            {k: v for k, v in (("m", self.m), ("ef_construction", self.ef_construction)) if v}
        )
        return IndexParams(**{**base.model_dump(), **update})

    def params(self, n: int) -> IndexParams:
        try:
            return self._params(n)
        except ValueError as e:
            raise ConfigError(str(e)) from e


class IndexSummary(BaseModel):
    table: str
    index: str
    model_spec: str
    backend: str
    dtype: str
    rows: int
    added: int
    stale: int
    changed: int = Field(
        description="rows whose vector the table has replaced since (the photo was saved over) "
        "that an HNSW index holds with the old one until rebuilt"
    )
    replaced: int = Field(0, description="such rows an exact index took the new vector of")
    removed: int = Field(
        0,
        description="rows the table no longer holds (keeper embed prune=true) an exact index took "
        "out; an HNSW index keeps them (``stale``) until rebuilt",
    )
    rebuilt_for: int = Field(
        0,
        description="outdated rows (stale + changed) that made this run build an HNSW index "
        "anew (over rebuild_over): 0 when it was grown, or rebuilt as asked",
    )
    recall_at_10: float | None
    memory_bytes: int
    seconds: dict[str, float]


def run(cfg: IndexConfig) -> IndexSummary:
    """``keeper index``, holding the output's lock (``run_lock``: one run per output at a time;
    ``BusyError`` where another holds it)."""
    with run_lock.holding(cfg.where(), job="keeper index"):
        return _run(cfg)


def _run(cfg: IndexConfig) -> IndexSummary:
    t0 = time.perf_counter()
    folder = storage.join(cfg.table, EMBEDDINGS)
    parts = list_parts(folder)
    if not parts:
        raise DataError(f"no embedding table here (keeper embed writes {folder}/part-*.parquet)")
    t = storage.read_parquet(folder, columns=["image_uri", "embedding", "model_spec"])
    specs = set(t.column("model_spec").to_pylist())
    if len(specs) != 1:
        raise DataError(f"the table mixes model specs {sorted(map(str, specs))}", source=folder)
    spec = str(specs.pop())
    uris = [str(u) for u in t.column("image_uri").to_pylist()]
    emb = embedding_matrix(t, source=folder)
    fingerprint = hashlib.sha256(
        "\n".join([*(p.rpartition("/")[2] for p in parts), str(len(uris))]).encode()
    ).hexdigest()[:32]
    seconds = {"read": time.perf_counter() - t0}

    t0 = time.perf_counter()
    where = cfg.where()
    index = None if cfg.rebuild else _existing(where)
    params = cfg.params(len(uris))
    outdated = 0
    if index is not None:
        if index.model_spec != spec:
            raise DataError(
                f"the index there holds {index.model_spec} embeddings and the table "
                f"{spec}: run with rebuild=true (or another output)",
                source=where,
            )
        if cfg.backend != "auto" and index.meta.params.backend != params.backend:
            raise ConfigError(
                f"the index there is {index.meta.params.backend}, not {params.backend}: "
                "run with rebuild=true to change backend"
            )
        _refuse_other_params(cfg, index.meta.params)
        have = set(index.ids)
        new = [i for i, u in enumerate(uris) if u not in have]
        gone = sorted(have - set(uris))
        redone = _changed(index, emb, uris, have)
        replaced = removed = 0
        if index.meta.params.backend == "exact":
            if redone:
                index.replace(emb[redone], [uris[i] for i in redone])
                replaced = len(redone)
            if gone:
                index.remove(gone)
                removed = len(gone)
        stale = len(gone) - removed
        changed = len(redone) - replaced
        outdated = stale + changed
        if outdated and outdated > cfg.rebuild_over * len(index):
            log.info(
                "%d of the index's %d rows are outdated (over rebuild_over %.0f%%): building anew",
                outdated,
                len(index),
                100 * cfg.rebuild_over,
            )
            # its own parameters, the search breadth calibrated again
            params = index.meta.params.model_copy(update={"ef_search": None})
            index = None
    if index is not None:
        index.add(emb[new], [uris[i] for i in new])
        index.meta.table_fingerprint = fingerprint
        added = len(new)
        rebuilt = 0
    else:
        rebuilt = outdated
        index = build(emb, uris, model_spec=spec, params=params, table_fingerprint=fingerprint)
        added, stale, changed, replaced, removed = len(uris), 0, 0, 0, 0
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.save(where)
    seconds["save"] = time.perf_counter() - t0
    return IndexSummary(
        table=cfg.table,
        index=where,
        model_spec=spec,
        backend=index.meta.params.backend,
        dtype=index.meta.params.dtype,
        rows=len(index),
        added=added,
        stale=stale,
        changed=changed,
        replaced=replaced,
        removed=removed,
        rebuilt_for=rebuilt,
        recall_at_10=index.meta.recall_at_10,
        memory_bytes=index.memory_bytes(),
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )


#: A row whose stored vector has a cosine below this with the table's is another photo's. Storage
#: rounding stays far above it (f16: ~1e-7 off; i8: ~1e-4); an edit that moves an embedding less
#: leaves a vector that still finds the photo.
CHANGED_BELOW = 0.99
_BLOCK = 65_536  # rows compared at a time (a block of stored vectors: 128 MiB at 512 dims)


def _changed(index: VectorIndex, emb: np.ndarray, uris: list[str], have: set[str]) -> list[int]:
    """The table's rows the index holds with another vector (:data:`CHANGED_BELOW`)."""
    both = [i for i, u in enumerate(uris) if u in have]
    out: list[int] = []
    for lo in range(0, len(both), _BLOCK):
        rows = both[lo : lo + _BLOCK]
        stored = index.vectors([uris[i] for i in rows])
        norm = np.linalg.norm(stored, axis=1)  # i8 rows come back scaled
        cos = np.einsum("ij,ij->i", stored, emb[rows]) / np.maximum(norm, 1e-12)
        out.extend(np.asarray(rows)[cos < CHANGED_BELOW].tolist())
    return out


def _refuse_other_params(cfg: IndexConfig, have: IndexParams) -> None:
    """Refuse to grow an index built with other parameters than the ones this run was given.

    Only parameters set explicitly are compared (a plain ``keeper index --table T`` grows what
    is there); ``m`` and ``ef_construction`` only for the HNSW backends, where they mean
    something. Growing would keep the index's own parameters and report them, ignoring the
    ones asked for without a word.

    Raises:
        ConfigError: naming each parameter that differs.
    """
    asked = {
        "dtype": cfg.dtype,
        "m": cfg.m,
        "ef_construction": cfg.ef_construction,
        "target_recall": cfg.target_recall,
    }
    hnsw_only = ("m", "ef_construction")
    differ = [
        f"{k}={v} (the index has {getattr(have, k)})"
        for k, v in asked.items()
        if k in cfg.model_fields_set
        and v is not None
        and not (k in hnsw_only and have.backend == "exact")
        and v != getattr(have, k)
    ]
    if differ:
        raise ConfigError(
            f"the index there was built with other parameters: {', '.join(differ)}; an index "
            "is never grown with other parameters: run with rebuild=true (or another output)"
        )


def _existing(where: str) -> VectorIndex | None:
    try:
        return VectorIndex.load(where)
    except StorageError:
        return None  # none there yet


def describe(s: IndexSummary) -> str:
    recall = "n/a" if s.recall_at_10 is None else f"{s.recall_at_10:.3f}"
    line = (
        f"keeper index: {s.rows} rows of {s.model_spec} ({s.added} added) -> {s.index}\n"
        f"  {s.backend} {s.dtype}, recall@10 {recall}, {s.memory_bytes / 1e6:.1f} MB, "
        f"seconds {s.seconds}"
    )
    if s.rebuilt_for:
        line += (
            f"\n  built anew: {s.rebuilt_for} rows of the old index were outdated (photos "
            "pruned from the table or embedded again; over rebuild_over)"
        )
    if s.stale:
        line += f"\n  {s.stale} rows the table no longer holds stay in the index: rebuild=true"
    if s.removed:
        line += f"\n  {s.removed} rows the table no longer holds were taken out"
    if s.replaced:
        line += f"\n  {s.replaced} rows the table has embedded again took their new vectors"
    if s.changed:
        line += (
            f"\n  {s.changed} rows the table has embedded again (photos saved over) keep their "
            "old vectors in the index: rebuild=true"
        )
    return line


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        job="index",
        description="Build or grow the nearest-neighbour index of an embedding table",
        model=IndexConfig,
        run=run,
        describe=describe,
        exit_code=lambda _: 0,
        example="table=emb/ backend=faiss",
    )


if __name__ == "__main__":
    sys.exit(main())
