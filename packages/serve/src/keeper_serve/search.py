"""``SearchIndex``: ``/v1/search``'s deployment. Loads ``keeper index``'s output once, follows it.

A replica loads the vector index (``keeper_core.vector_index``) and the rows of its table that
results and filters need (``image_id``, sizes, quality features and the embeddings, keyed by
``image_uri``, the index's ids) into one :class:`Snapshot`. A thread re-reads ``index.json``
every ``poll_s`` seconds; when its bytes changed, it loads the new index and table into a new
snapshot and swaps one reference. A request takes the reference once, so requests in flight
finish on the snapshot they started with, and none fails over a swap. An index that cannot be
loaded (a save in progress, another model spec) leaves the current snapshot serving; the error
is logged and :meth:`SearchIndex.info` reports it. At start-up the same failures fail the
replica, loudly.

An ``image_id`` query searches with that image's stored embedding: the table's embeddings are
held in this replica as float16 (half the bytes of float32, as the exact index stores its own),
so a lookup is a dict access, not a read of the table per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray import serve

from keeper_core import storage
from keeper_core.corpus import EMBEDDINGS, embedding_matrix
from keeper_core.errors import ConfigError, DataError, ModelLoadError, StorageError
from keeper_core.models import check_table
from keeper_core.vector_index import META_FILE, VectorIndex
from keeper_serve.api import SEARCH_FEATURES, SearchFilters, short_id
from keeper_serve.config import SearchArgs

log = logging.getLogger("keeper.serve")

_OVERFETCH = 4  # filters run after the search: fetch k * 4 rows, then x4 while too few survive


class UnknownImageId(DataError):
    """An ``image_id`` query naming no row of the table."""


@dataclass(frozen=True)
class Hits:
    """One search's answer: table rows best first, and what answered it."""

    image_id: list[str]
    image_uri: list[str]
    score: list[float]
    width: list[int]
    height: list[int]
    truncated_by_filters: bool
    count: int  # the index's vectors
    updated_at: str


class Snapshot:
    """One version of the index with its table's rows: never changed once built."""

    def __init__(self, index: VectorIndex, table: pa.Table, version: str) -> None:
        self.index = index
        self.version = version  # sha256 of the index.json it was loaded from
        uris = [str(u) for u in table.column("image_uri").to_pylist()]
        self.image_id = [str(x) for x in table.column("image_id").to_pylist()]
        self.image_uri = uris
        self.row = {u: i for i, u in enumerate(uris)}
        # The first row of an image_id (byte-identical copies share one) answers its query.
        self.by_image_id: dict[str, int] = {}
        for i, k in enumerate(self.image_id):
            self.by_image_id.setdefault(k, i)
        self.features = {
            f: table.column(f).to_numpy(zero_copy_only=False).astype(np.float64)
            for f in SEARCH_FEATURES
        }
        emb = embedding_matrix(table)
        dim = index.meta.dim
        if emb.shape[1] != dim:
            raise DataError(f"the table's embeddings are not {dim}-d as the index's are")
        self.embeddings = emb.astype(np.float16)
        self.missing = sum(1 for u in index.ids if u not in self.row)

    def vector(self, image_id: str) -> np.ndarray:
        """The stored embedding of ``image_id``'s row, unit norm, float32.

        Raises:
            UnknownImageId: no row has it.
        """
        row = self.by_image_id.get(image_id)
        if row is None:
            raise UnknownImageId(f"image_id {short_id(image_id)} is not in the indexed table")
        v = self.embeddings[row].astype(np.float32)
        return v / np.linalg.norm(v)

    def search(
        self, query: np.ndarray, k: int, filters: SearchFilters | None, model_spec: str, cap: int
    ) -> Hits:
        """The ``k`` best rows that pass ``filters``; over-fetches up to ``cap`` rows."""
        n = len(self.index)
        bounds = filters.bounds() if filters is not None else {}
        wide = bool(bounds) or self.missing > 0
        fetch = min(n, max(k, min(cap, k * _OVERFETCH)) if wide else k)
        while True:
            got = self.index.search(query, fetch, model_spec=model_spec)
            uris, scores = got.ids[0], got.scores[0]
            rows = np.array([self.row.get(u, -1) for u in uris], np.int64)
            keep = rows >= 0  # an index row the table no longer holds has nothing to show
            for f, (lo, hi) in bounds.items():
                v = self.features[f][np.maximum(rows, 0)]
                keep &= (v >= lo) & (v <= hi)
            if int(keep.sum()) >= k or fetch >= min(n, cap):
                break
            fetch = min(n, cap, fetch * _OVERFETCH)
        chosen = np.flatnonzero(keep)[:k]
        r = rows[chosen]
        return Hits(
            image_id=[self.image_id[i] for i in r],
            image_uri=[self.image_uri[i] for i in r],
            score=[float(s) for s in scores[chosen]],
            width=[int(w) for w in self.features["width"][r]],
            height=[int(h) for h in self.features["height"][r]],
            truncated_by_filters=bool(bounds) and len(chosen) < min(k, n),
            count=n,
            updated_at=self.index.meta.updated_at,
        )


def read_version(index_uri: str) -> str:
    """sha256 of the index's ``index.json`` as it is now (what a poll compares)."""
    return hashlib.sha256(storage.read_bytes(storage.join(index_uri, META_FILE))).hexdigest()


def load_snapshot(args: SearchArgs, clip_model: str) -> Snapshot:
    """The index under ``args.index`` and its table's rows.

    Raises:
        StorageError: no index there, or a file of it missing (a save in progress).
        DataError: an index of another model spec than ``clip_model``, a corrupt file, or a
            table without the columns results need.
        ConfigError: ``args.index`` has no parent folder and ``args.table`` is not set.
    """
    version = read_version(args.index)  # before the load: a save meanwhile is found next poll
    index = VectorIndex.load(args.index)
    if index.model_spec != clip_model:
        raise DataError(
            f"the index holds {index.model_spec} embeddings and the app serves {clip_model}: "
            "similarities across specs mean nothing (index a table of the served model)",
            source=args.index,
        )
    table_uri = args.table_uri()
    # The same spec string with a checkpoint replaced at its path, or images prepared otherwise:
    # the table's vectors are another model's (``keeper embed`` records both).
    check_table(clip_model, table_uri)
    folder = storage.join(table_uri, EMBEDDINGS)
    columns = ["image_id", "image_uri", "embedding", "model_spec", *SEARCH_FEATURES]
    try:
        table = storage.read_parquet(folder, columns=list(dict.fromkeys(columns)))
    except StorageError as e:  # a save in progress, a timeout: tried again at the next poll
        raise StorageError(
            table_uri, f"no embedding table here: {e.cause}", retryable=e.retryable
        ) from e
    specs = set(pc.unique(table.column("model_spec")).to_pylist()) - {clip_model}
    if specs:
        raise DataError(
            f"the table holds {sorted(map(str, specs))} embeddings beside {clip_model}",
            source=table_uri,
        )
    snap = Snapshot(index, table, version)
    if snap.missing:
        log.warning(
            "search index %s: %d of its rows are not in the table %s (never returned)",
            args.index,
            snap.missing,
            table_uri,
        )
    return snap


@serve.deployment
class SearchIndex:
    """Nearest-neighbour search over ``keeper index``'s index, following newer saves."""

    def __init__(self, args: SearchArgs, clip_model: str) -> None:
        self.args, self.clip_model = args, clip_model
        self._snap = load_snapshot(args, clip_model)  # a bad index fails the replica, loudly
        self._loaded_at = time.time()
        self._last_error: str | None = None
        self._swaps = 0
        self._refused: str | None = None  # index.json version refused: not loaded again
        self._stop = threading.Event()
        log.info(
            "search index %s: %d vectors (%s), updated %s",
            args.index,
            len(self._snap.index),
            self._snap.index.meta.params.backend,
            self._snap.index.meta.updated_at,
        )
        if args.poll_s > 0:
            threading.Thread(target=self._follow, name="keeper-search-poll", daemon=True).start()

    def _follow(self) -> None:
        while not self._stop.wait(self.args.poll_s):
            try:
                self.refresh()
            except Exception as e:  # a bug, or memory: the poller must outlive it, and say so
                self._last_error = f"{type(e).__name__}: {e}"
                log.exception("search index %s: poll failed", self.args.index)

    def refresh(self) -> bool:
        """Load the index again when its ``index.json`` changed; True when it was swapped in."""
        version = None
        try:
            version = read_version(self.args.index)
            if version in (self._snap.version, self._refused):
                return False
            new = load_snapshot(self.args, self.clip_model)
        except (StorageError, ModelLoadError, DataError, ConfigError) as e:
            # Serving the older index beats serving none. A file missing is a save in progress,
            # a checkpoint that cannot be reached now a passing fault (both tried again next
            # poll); a version refused for its content is not loaded again.
            if not isinstance(e, StorageError | ModelLoadError):
                self._refused = version
            self._last_error = f"{type(e).__name__}: {e}"
            log.error("search index %s: keeping the loaded one: %s", self.args.index, e)
            return False
        self._snap, self._loaded_at, self._last_error = new, time.time(), None
        self._swaps += 1
        log.info(
            "search index %s: swapped in %d vectors (updated %s)",
            self.args.index,
            len(new.index),
            new.index.meta.updated_at,
        )
        return True

    async def search(self, query: np.ndarray | str, k: int, filters: SearchFilters | None) -> Hits:
        """The top ``k`` for a (D,) unit vector, or for an ``image_id``'s stored embedding.

        Raises:
            UnknownImageId: an ``image_id`` the table does not hold.
            DataError: a vector of another dimension, or not unit norm.
        """
        snap = self._snap  # one reference for the whole request: a swap meanwhile is harmless
        vec = snap.vector(query) if isinstance(query, str) else query
        return await asyncio.to_thread(
            snap.search, vec, k, filters, self.clip_model, self.args.max_fetch
        )

    def info(self) -> dict[str, Any]:
        meta = self._snap.index.meta
        return {
            "index": self.args.index,
            "count": meta.count,
            "updated_at": meta.updated_at,
            "backend": meta.params.backend,
            "loaded_at": self._loaded_at,
            "swaps": self._swaps,
            "last_error": self._last_error,
        }
