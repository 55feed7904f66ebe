"""The review page's data: ``keeper pick`` runs, paged by group, with their thumbnails.

A run is a ``keeper pick`` output folder (``picks.parquet``, ``thumbs/``, ``_SUMMARY.json``),
named in ``args.review.runs``. :class:`ReviewRuns` reads a run when it is first asked for and
again when its ``_SUMMARY.json`` changed (a pick run written again into the same folder), looking
at most every ``check_s`` seconds; a run that cannot be read is listed with its error, and the
others keep serving.

Every decision made on the page refers to the run's ``request_id``: ``run-`` and 24 hex digits
of the SHA-256 of its ``_SUMMARY.json``, so every replica names a run alike and a new run in the
same folder is a new request. What the page showed is logged as offer rows (route ``review``,
no arm; the embeddings from the embed table the run was picked from) so that ``keeper feedback-export`` and the online figures join decisions to them as they
do for ``/v1/pick``'s answers.

This module holds no Ray: the ingress calls it on worker threads (it reads storage).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from keeper_core import storage
from keeper_core.contact_sheet import thumbnail_name
from keeper_core.corpus import read_corpus
from keeper_core.errors import DataError, KeeperError, StorageError
from keeper_core.feedback import REVIEW_ROUTE as REVIEW_ROUTE  # re-exported: moved to core
from keeper_core.feedback import pick_run_complete, pick_run_offers, run_request_id
from keeper_core.feedback import ranker_model as ranker_model
from keeper_core.quality import FEATURE_NAMES
from keeper_serve.config import ReviewArgs

SUMMARY = "_SUMMARY.json"
PICKS = "picks.parquet"
_COLUMNS = (
    "group_id",
    "rank",
    "decision",
    "rating",
    "label",
    "score",
    "reasons",
    "image_uri",
    "file_name",
    "image_id",
    "capture_time",
    "duplicate_of",
    *FEATURE_NAMES,
)
_HEX_ID = re.compile(r"[0-9a-f]{64}")
#: The most bytes a served thumbnail may have (keeper's are 256 px JPEGs of a few tens of KB).
MAX_THUMB_BYTES = 1 << 20


class UnknownRun(DataError):
    """A run name ``args.review.runs`` does not hold."""


class RunUnusable(DataError):
    """A configured run whose files cannot be read (the message says why)."""


class UnknownImage(DataError):
    """An image id the run does not hold, or one without a thumbnail."""


@dataclass(frozen=True)
class ReviewRun:
    """One read of a pick run: never changed once built."""

    name: str
    folder: str
    request_id: str
    summary: dict[str, Any]
    rows: dict[str, list[Any]]  # picks.parquet's columns (_COLUMNS), in file order
    groups: list[np.ndarray]  # row indices of each group, groups in time order
    thumbs: frozenset[str]  # image ids with a thumbnail
    row_of: dict[str, int] = field(repr=False)  # image_id -> its first row
    _vectors: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _vectors_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def embeddings(self) -> dict[str, np.ndarray]:
        """image_id -> its embedding, from the embed table the run was picked from (the
        summary's ``table``), read once; what offers carry so feedback-export can train on
        the run's decisions.

        Raises:
            DataError: the summary names no table, or it cannot be read.
        """
        with self._vectors_lock:
            if "by_id" not in self._vectors:
                table = self.summary.get("table")
                if not table:
                    raise DataError(f"{SUMMARY} names no embedding table", source=self.folder)
                corpus = read_corpus(str(table))
                self._vectors["by_id"] = {
                    k: corpus.embeddings[i] for i, k in enumerate(corpus.image_id)
                }
            return cast("dict[str, np.ndarray]", self._vectors["by_id"])

    @property
    def images(self) -> int:
        return len(self.row_of)

    def info(self) -> dict[str, Any]:
        s = self.summary
        return {
            "name": self.name,
            "request_id": self.request_id,
            "groups": len(self.groups),
            "images": len(self.rows["image_id"]),
            "ranker": str(s.get("ranker", "")),
            "clip_model": str(s.get("clip_model", "")),
            "random_weights": bool(s.get("random_weights", False)),
            "finished": s.get("finished"),
            "error": None,
        }

    def page(self, offset: int, limit: int) -> dict[str, Any]:
        """Groups ``[offset, offset + limit)`` with their images, as the page shows them."""
        r = self.rows
        groups = []
        for idx in self.groups[offset : offset + limit]:
            images = []
            keeper = None
            for i in idx:
                image_id = str(r["image_id"][i])
                if keeper is None and r["decision"][i] == "keep":
                    keeper = image_id
                images.append(
                    {
                        "image_id": image_id,
                        "file_name": str(r["file_name"][i]),
                        "rank": int(r["rank"][i]),
                        "decision": str(r["decision"][i]),
                        "rating": int(r["rating"][i]),
                        "label": r["label"][i],
                        "score": float(r["score"][i]),
                        "reasons": list(r["reasons"][i] or []),
                        "capture_time": r["capture_time"][i],
                        "duplicate_of": r["duplicate_of"][i],
                        "thumb": (
                            f"/v1/review/runs/{self.name}/thumbs/{image_id}"
                            if image_id in self.thumbs
                            else None
                        ),
                    }
                )
            groups.append(
                {
                    "group_id": str(r["group_id"][idx[0]]),
                    "size": len(idx),
                    "keeper": keeper,
                    "images": images,
                }
            )
        return {
            "run": self.name,
            "request_id": self.request_id,
            "total": len(self.groups),
            "offset": offset,
            "limit": limit,
            "groups": groups,
        }

    def thumbnail_uri(self, image_id: str) -> str:
        """Where ``image_id``'s thumbnail is.

        Raises:
            UnknownImage: not a 64-hex id of this run, or the run has no thumbnail of it.
        """
        if not _HEX_ID.fullmatch(image_id) or image_id not in self.row_of:
            raise UnknownImage(f"run {self.name!r} has no image {image_id[:80]!r}")
        if image_id not in self.thumbs:
            raise UnknownImage(f"run {self.name!r} has no thumbnail of {image_id}")
        uri = storage.join(self.folder, thumbnail_name(image_id))
        # A run folder on a shared disk may hold a link where a thumbnail goes: served, it would
        # hand any file this process can read (a key, a credential) to whoever holds a token.
        if not storage.is_s3(uri) and Path(uri.removeprefix("file://")).is_symlink():
            raise UnknownImage(f"run {self.name!r}: the thumbnail of {image_id} is a link")
        return uri

    def offer_rows(
        self,
        groups: Iterable[int],
        client: str | None,
        embeddings: dict[str, np.ndarray] | None = None,
    ) -> list[dict[str, Any]]:
        """Offer rows (keeper_core.feedback.OFFERS_SCHEMA) of the images of ``groups``, with
        each image's embedding from ``embeddings`` (:meth:`embeddings`; None: none)."""
        return pick_run_offers(
            self.rows,
            [self.groups[g] for g in groups],
            request_id=self.request_id,
            summary=self.summary,
            client=client,
            embeddings=embeddings,
        )


def read_run(name: str, folder: str) -> ReviewRun:
    """Read one ``keeper pick`` output folder.

    Raises:
        RunUnusable: no summary or picks table, a failed run, or a table missing columns.
    """
    try:
        raw = storage.read_bytes(storage.join(folder, SUMMARY))
    except StorageError as e:
        raise RunUnusable(f"no {SUMMARY}: not a finished keeper pick run ({e})") from e
    try:
        summary = json.loads(raw)
    except ValueError as e:
        raise RunUnusable(f"{SUMMARY} is not JSON: {e}") from e
    if not isinstance(summary, dict) or not pick_run_complete(summary):
        raise RunUnusable(
            f"{SUMMARY} says the run did not finish (status {summary.get('status')!r})"
        )
    try:
        data = storage.read_bytes(storage.join(folder, PICKS))
    except StorageError as e:
        raise RunUnusable(f"{PICKS} unreadable: {e}") from e
    recorded = summary.get("picks_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        # A re-run writes picks.parquet first and its summary last: until then these rows are
        # not the run the summary names (its request id, its ranker).
        raise RunUnusable(f"{PICKS} is not the one {SUMMARY} describes: keeper pick is writing it")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise RunUnusable(f"{PICKS} unreadable: {e}") from e
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise RunUnusable(f"{PICKS} lacks columns {missing}: not a keeper pick table")
    rows = {c: table.column(c).to_pylist() for c in _COLUMNS}
    return ReviewRun(
        name=name,
        folder=folder,
        request_id=run_request_id(raw),
        summary=summary,
        rows=rows,
        groups=_groups(table.column("group_id")),
        thumbs=_thumbnails(folder),
        row_of=_first_rows(rows["image_id"]),
    )


def _groups(group_id: pa.ChunkedArray) -> list[np.ndarray]:
    """Row indices per group, groups in order of first appearance (the table's time order)."""
    ids = np.asarray(group_id.to_pylist(), dtype=object)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique ids sorted by first appearance
    rows = np.argsort(inverse, kind="stable")  # rows grouped by id, file order kept inside
    bounds = np.cumsum(np.bincount(inverse, minlength=len(first)))[:-1]
    per_id = np.split(rows, bounds)
    return [per_id[k] for k in order]


def _first_rows(image_ids: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, k in enumerate(image_ids):
        out.setdefault(str(k), i)
    return out


def _thumbnails(folder: str) -> frozenset[str]:
    """Image ids with a thumbnail under ``folder``/thumbs (none: an empty set)."""
    try:
        files = storage.list_files(storage.join(folder, "thumbs"))
    except StorageError:
        return frozenset()
    return frozenset(
        stem for f in files if _HEX_ID.fullmatch(stem := f.rsplit("/", 1)[-1].removesuffix(".jpg"))
    )


class ReviewRuns:
    """The configured runs, each read on first use and again when its summary changed."""

    def __init__(self, args: ReviewArgs | None) -> None:
        self.args = args
        self._lock = threading.Lock()
        self._runs: dict[str, ReviewRun] = {}
        self._errors: dict[str, str] = {}
        self._checked: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return list(self.args.runs) if self.args is not None else []

    def get(self, name: str) -> ReviewRun:
        """The run named ``name``, read or re-read as needed.

        Raises:
            UnknownRun: no such name in ``args.review.runs``.
            RunUnusable: its files cannot be read (the last good read keeps serving if any).
        """
        if self.args is None or name not in self.args.runs:
            raise UnknownRun(f"no review run named {name[:80]!r}; configured: {self.names}")
        folder = self.args.runs[name]
        now = time.monotonic()
        with self._lock:
            run = self._runs.get(name)
            fresh = now - self._checked.get(name, -1e18) < self.args.check_s
            if fresh and (run is not None or name in self._errors):
                if run is None:
                    raise RunUnusable(self._errors[name])
                return run
            self._checked[name] = now
        try:
            if run is not None:
                raw = storage.read_bytes(storage.join(folder, SUMMARY))
                if run_request_id(raw) == run.request_id:
                    return run
            new = read_run(name, folder)
        except KeeperError as e:
            with self._lock:
                self._errors[name] = str(e)
            if run is not None:  # a rewrite in progress: the last good read serves
                return run
            if isinstance(e, RunUnusable):
                raise
            raise RunUnusable(str(e)) from e
        with self._lock:
            self._runs[name] = new
            self._errors.pop(name, None)
        return new

    def listing(self) -> list[dict[str, Any]]:
        """Every configured run's info; one that cannot be read, with its error."""
        out = []
        for name in self.names:
            try:
                out.append(self.get(name).info())
            except RunUnusable as e:
                out.append(
                    {
                        "name": name,
                        "request_id": None,
                        "groups": 0,
                        "images": 0,
                        "ranker": "",
                        "clip_model": "",
                        "random_weights": False,
                        "finished": None,
                        "error": str(e),
                    }
                )
        return out
