"""People's decisions on keeper's answers: an append-only log of feedback events in Parquet.

``POST /v1/feedback`` (and the review page behind it) records what a person did with an image
keeper offered: ``accepted``, ``rejected``, ``picked-as-keeper``, or ``undone`` (takes back that
person's last decision on the image). Events are buffered in the server and written in batches,
one Parquet part per flush, under a folder or ``s3://`` prefix:

    log = FeedbackLog("s3://bucket/feedback", writer="ingress-3f2a")
    receipt = log.append([FeedbackEvent(request_id=..., image_id=..., action="accepted")])
    receipt.durable      # False until a flush wrote them; log.flush() (or sync) makes it True
    decisions(read_feedback("s3://bucket/feedback"))  # the latest decision per image and request

Durability is what a receipt says: an event is on storage once a flush that included it has
returned, and never before; a writer that cannot write keeps its rows (and says so) rather than
dropping them, and refuses new ones past ``max_pending`` rows instead of growing without bound.
Each part is written whole, atomically (``storage.write_parquet``), with a name no other writer
uses, so any number of replicas write into one log without coordination.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from keeper_core import storage
from keeper_core.errors import DataError, KeeperError, StorageError
from keeper_core.quality import FEATURE_NAMES

#: The columns a PartLog stamps on every row, first in its schema.
_STAMP = ("event_id", "received_at", "seq", "writer")

Action = Literal["accepted", "rejected", "picked-as-keeper", "undone"]
ACTIONS: tuple[str, ...] = ("accepted", "rejected", "picked-as-keeper", "undone")

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),  # unique per event, made by the writer
        ("received_at", pa.timestamp("us", tz="UTC")),
        ("seq", pa.int64()),  # the writer's order: ties in received_at are broken by it
        ("writer", pa.string()),
        ("request_id", pa.string()),  # the answer the decision is about (/v1/rank, pick, select)
        ("image_id", pa.string()),
        ("action", pa.string()),
        ("group_id", pa.string()),  # a series, burst, scene or query the image was offered in
        ("client", pa.string()),  # who decided (the review page's reviewer, an app's user key)
    ]
)


#: What a server offered, one row per image of an answer of /v1/rank, /v1/pick or /v1/select:
#: the other side of every decision (what was seen, by which model, in which rank), and with
#: the embedding and quality features, what ``keeper feedback-export`` trains the next
#: challenger on.
OFFERS_SCHEMA = pa.schema(
    [
        *[SCHEMA.field(n) for n in _STAMP],
        ("request_id", pa.string()),  # the answer's request_id (made by the server)
        ("route", pa.string()),  # rank | pick | select | review (a keeper pick run on /ui)
        ("client", pa.string()),  # the caller's key (X-Keeper-Client), when given
        ("arm", pa.string()),  # champion | challenger under an A/B split, else null
        ("model", pa.string()),  # what ranked: a registered version's URI, or the rule's name
        ("model_spec", pa.string()),  # the CLIP ModelSpec of the embedding
        ("group_id", pa.string()),  # series id, pick group, or the select query
        ("group_size", pa.int32()),
        ("image_id", pa.string()),  # sha256 of the image's bytes (or the corpus image_id)
        ("image_uri", pa.string()),  # an s3:// or corpus URI when the image came as one
        ("position", pa.int32()),  # its index in the request
        ("rank", pa.int32()),  # 0: the model's first choice in its group
        ("score", pa.float64()),
        ("offered", pa.string()),  # keeper | candidate (rank); keep | alternate | reject (pick);
        # pick | candidate (select)
        ("embedding", pa.list_(pa.float32())),  # unit norm; null when not logged
        ("quality", pa.list_(pa.float32())),  # keeper_core.quality.FEATURE_NAMES order
    ]
)
ROUTES: tuple[str, ...] = ("rank", "pick", "select", "review")
#: Offer rows of a ``keeper pick`` run shown to a person (the review page, a photo tool's
#: sidecars): a batch run's picks, no A/B arm.
REVIEW_ROUTE = "review"
_VERSION_URI = re.compile(r"\((models:/[^)\s]+)\)")


def run_request_id(summary: bytes) -> str:
    """The request id a pick run's decisions refer to: ``run-`` + 24 hex of the SHA-256 of its
    ``_SUMMARY.json``, so every reader names a run alike and a new run in a folder is new."""
    return "run-" + hashlib.sha256(summary).hexdigest()[:24]


def pick_run_complete(summary: Mapping[str, Any]) -> bool:
    """Whether a pick run's picks are whole, so a person's decisions on them can be read
    (``keeper feedback-from-xmp``, the review page): status ``ok``, or ``failed`` only because
    more files than its ``max_failure_fraction`` were unreadable (a card with a few corrupt
    files), every photo picked or listed as failed and none lost. A run that lost photos is not.
    """
    if summary.get("status") == "ok":
        return True
    counts, emb = summary.get("counts"), summary.get("embed")
    return (
        summary.get("status") == "failed"
        and isinstance(counts, dict)
        and isinstance(emb, dict)
        and counts.get("lost") == 0
        and emb.get("lost") == 0
        and counts.get("in") == counts.get("picked", -1) + counts.get("failed", -1)
    )


def ranker_model(label: str) -> str:
    """What ranked, as offer rows name it: ``models:/NAME/VERSION`` from a version's label
    (``'NAME vN (models:/NAME/N)'``), else the label itself (the zero-shot rule)."""
    m = _VERSION_URI.search(label)
    return m.group(1) if m else label


def pick_run_offers(
    rows: Mapping[str, Sequence[Any]],
    groups: Iterable[Collection[int]],
    *,
    request_id: str,
    summary: Mapping[str, Any],
    client: str | None,
    embeddings: Mapping[str, Iterable[float]] | None = None,
) -> list[dict[str, Any]]:
    """Offer rows (:data:`OFFERS_SCHEMA`, route ``review``) of a pick run's ``groups``.

    Args:
        rows: ``picks.parquet``'s columns by name (group_id, rank, decision, score, image_uri,
            image_id and the quality features), in file order.
        groups: each group's row indices; every image of a group is offered.
        request_id: :func:`run_request_id` of the run's summary.
        summary: the run's ``_SUMMARY.json`` (its ``ranker`` and ``clip_model``).
        client: who was shown the run, or None.
        embeddings: image_id -> its embedding (from the run's table); None: none logged.
    """
    model = ranker_model(str(summary.get("ranker", "")))
    spec = str(summary.get("clip_model", ""))
    out: list[dict[str, Any]] = []
    for idx in groups:
        for i in idx:
            image_id = str(rows["image_id"][i])
            quality = [float(rows[f][i]) for f in FEATURE_NAMES]
            vector = None if embeddings is None else embeddings.get(image_id)
            out.append(
                {
                    "request_id": request_id,
                    "route": REVIEW_ROUTE,
                    "client": client,
                    "arm": None,
                    "model": model,
                    "model_spec": spec,
                    "group_id": str(rows["group_id"][i]),
                    "group_size": len(idx),
                    "image_id": image_id,
                    "image_uri": str(rows["image_uri"][i]),
                    "position": int(i),
                    "rank": int(rows["rank"][i]) - 1,  # offers: 0 = the model's first choice
                    "score": float(rows["score"][i]),
                    "offered": str(rows["decision"][i]),
                    "embedding": None if vector is None else [float(x) for x in vector],
                    "quality": quality if all(math.isfinite(q) for q in quality) else None,
                }
            )
    return out


class FeedbackEvent(BaseModel):
    """One decision, as a client sends it."""

    model_config = ConfigDict(extra="forbid")

    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="the client's id of this event: a resent event is counted once",
    )
    request_id: str = Field(min_length=1, max_length=256)
    image_id: str = Field(min_length=1, max_length=256)
    action: Action
    # A /v1/select answer's group is its query: as long as a prompt may be (limits.max_text_chars).
    group_id: str | None = Field(None, max_length=2048)
    client: str | None = Field(None, max_length=256)


class FeedbackBackpressure(KeeperError):
    """The writer holds ``max_pending`` rows it has not written: storage is failing or slow."""


@dataclass(frozen=True)
class Receipt:
    """What an append promises: ``durable`` once every event of it is on storage."""

    accepted: int
    durable: bool
    pending: int  # rows this writer holds that are not on storage yet
    last_error: str | None  # the last failed flush's cause, None after a good one


class PartLog:
    """A thread-safe buffered writer of Parquet parts under ``root``, one part per flush.

    Each row gets ``event_id``, ``received_at``, ``seq`` and ``writer`` (the first four columns
    of ``schema``); the caller gives the rest. :class:`FeedbackLog` is one; a server's log of what
    it offered is another.

    Rows are held as Arrow tables from the moment they are appended (a row that does not fit the
    schema fails its own append, never a later flush of everyone's rows; an embedding costs its
    4 bytes a float, not a Python float each). ``received_at`` never goes back within a writer (a
    clock stepped back, or two appends racing for the lock): a writer's rows sort in ``seq``
    order by it, as :func:`decisions` needs.

    Args:
        root: folder or ``s3://`` prefix of the log.
        schema: the parts' schema, starting with the four columns above.
        writer: this writer's name in part names and rows (a replica id); unique per process.
        max_rows: flush when this many rows are buffered.
        max_age_s: flush when the oldest buffered row is this old (checked on append and by
            :meth:`flush_due`, which a server calls from a timer).
        max_pending: refuse appends past this many unwritten rows.
    """

    def __init__(
        self,
        root: str,
        schema: pa.Schema,
        *,
        writer: str | None = None,
        max_rows: int = 1000,
        max_age_s: float = 5.0,
        max_pending: int = 100_000,
    ) -> None:
        if max_rows < 1 or max_pending < max_rows or max_age_s < 0:
            raise ValueError("need max_rows >= 1, max_pending >= max_rows and max_age_s >= 0")
        if schema.names[:4] != list(_STAMP):
            raise ValueError(f"a part log's schema starts with {list(_STAMP)}")
        self.root, self.schema = root, schema
        self._payload = pa.schema(list(schema)[len(_STAMP) :])  # what the caller gives
        self.writer = writer or uuid.uuid4().hex[:12]
        self.max_rows, self.max_age_s, self.max_pending = max_rows, max_age_s, max_pending
        self._lock = threading.Lock()  # guards the buffer and counters
        self._flush_lock = threading.Lock()  # one flush at a time, in order
        self._batches: list[pa.Table] = []  # appended rows in seq order, each append one table
        self._buffered = 0  # rows in _batches
        self._oldest: float | None = None
        self._seq = 0  # last sequence number given
        self._last_at: datetime | None = None  # received_at of seq: the next is never before it
        self._durable_seq = 0  # every row up to this one is on storage
        self._failed_seq = 0  # the last row a failed write held: a sync append waits no more
        self._parts = 0
        self.written = 0  # rows on storage, from this writer
        self.last_error: str | None = None
        self._retry_at = 0.0  # after a failed flush, appends wait until then to try again

    def _table(self, rows: Sequence[dict[str, Any]]) -> tuple[pa.Table, list[str]]:
        """The caller's columns of ``rows`` as a table, and each row's event_id."""
        try:
            table = pa.Table.from_pylist(list(rows), schema=self._payload)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise DataError(f"rows that do not fit the log's schema: {e}", source=self.root) from e
        return table, [str(row.get("event_id") or uuid.uuid4().hex) for row in rows]

    def append_rows(self, rows: Sequence[dict[str, Any]], *, sync: bool = False) -> Receipt:
        """Buffer ``rows``; flush when the buffer is full or old, or at once when ``sync``.

        A failed flush does not fail the append, ``sync`` or not: the rows stay buffered (to be
        written by a later flush), and the receipt says they are not durable and names the cause.
        A row may carry its own ``event_id`` (a client's idempotency key); otherwise one is made.

        Without ``sync``, an append never waits for another thread's write: when one is under
        way the rows stay buffered for the next flush. With ``sync`` it waits for the writes
        before it, and writes only what they did not (a write that held its rows and failed
        while it waited is not tried again at once: the receipt says it failed).

        Raises:
            FeedbackBackpressure: accepting them would leave over ``max_pending`` rows unwritten.
            DataError: a row does not fit the log's schema (nothing of ``rows`` is buffered).
        """
        with self._lock:  # before converting rows it would refuse
            self._refuse_past_max_pending(len(rows))
        table, ids = self._table(rows)  # before the lock: converting is the slow part
        with self._lock:
            self._refuse_past_max_pending(len(rows))
            now = datetime.now(UTC)  # under the lock: seq and received_at rise together
            if self._last_at is not None and now < self._last_at:
                now = self._last_at
            if table.num_rows:
                first = self._seq + 1
                self._seq += table.num_rows
                self._last_at = now
                stamp = pa.table(
                    {
                        "event_id": pa.array(ids, pa.string()),
                        "received_at": pa.array(
                            [now] * table.num_rows, self.schema.field("received_at").type
                        ),
                        "seq": pa.array(range(first, self._seq + 1), pa.int64()),
                        "writer": pa.array([self.writer] * table.num_rows, pa.string()),
                    }
                )
                whole = pa.Table.from_arrays([*stamp.columns, *table.columns], schema=self.schema)
                self._batches.append(whole)
                self._buffered += table.num_rows
                if self._oldest is None:
                    self._oldest = time.monotonic()
            last = self._seq
        if sync:
            self._flush(upto=last, wait=True)
        elif self._due():
            self._flush(wait=False)
        with self._lock:
            return Receipt(len(rows), self._durable_seq >= last, self._buffered, self.last_error)

    def _refuse_past_max_pending(self, n: int) -> None:
        """Raise FeedbackBackpressure if ``n`` more rows would pass ``max_pending`` (the caller
        holds ``_lock``). A writer holding nothing takes any one batch: the bound is on what
        piles up while storage fails, and refusing a batch larger than ``max_pending`` itself
        would refuse it on every retry (a request's size has its own limits)."""
        if self._buffered and self._buffered + n > self.max_pending:
            raise FeedbackBackpressure(
                f"{self._buffered} rows of {self.root} are not written yet "
                f"(last error: {self.last_error}); retry later"
            )

    def _due(self) -> bool:
        with self._lock:
            if not self._buffered or time.monotonic() < self._retry_at:
                return False
            old = self._oldest is not None and time.monotonic() - self._oldest >= self.max_age_s
            return self._buffered >= self.max_rows or old

    def flush_due(self) -> int:
        """Flush when the buffer is full or old (a server's timer calls this). Rows written."""
        return self.flush() if self._due() else 0

    def flush(self, *, raise_errors: bool = False) -> int:
        """Write every buffered row as one part. Returns the rows written (0: nothing buffered,
        or the write failed and ``raise_errors`` is False; the rows stay buffered).

        Raises:
            StorageError: the write failed and ``raise_errors``.
        """
        return self._flush(raise_errors=raise_errors)

    def _flush(
        self, *, upto: int | None = None, wait: bool = True, raise_errors: bool = False
    ) -> int:
        """:meth:`flush`; with ``upto``, only while row ``upto`` is neither written nor held by
        a write that failed after it was appended; without ``wait``, only when no other flush is
        under way."""
        if not self._flush_lock.acquire(blocking=wait):
            return 0
        try:
            with self._lock:
                if upto is not None and max(self._durable_seq, self._failed_seq) >= upto:
                    return 0  # written meanwhile (group commit), or its write just failed
                batches = list(self._batches)
                last = self._seq
            if not batches:
                return 0
            table = pa.concat_tables(batches) if len(batches) > 1 else batches[0]
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            name = f"part-{stamp}-{self.writer}-{last:010d}.parquet"
            try:
                storage.write_parquet(table, storage.join(self.root, name))
            except StorageError as e:
                with self._lock:
                    self.last_error = str(e)
                    self._failed_seq = last
                    # appends do not retry before max_age_s: a failing store is not hammered
                    self._retry_at = time.monotonic() + self.max_age_s
                if raise_errors:
                    raise
                return 0
            with self._lock:
                del self._batches[: len(batches)]  # appends meanwhile stay, in order
                self._buffered -= table.num_rows
                self._oldest = time.monotonic() if self._batches else None
                self._durable_seq = last
                self._retry_at = 0.0
                self._parts += 1
                self.written += table.num_rows
                self.last_error = None
            return table.num_rows
        finally:
            self._flush_lock.release()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._buffered

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "writer": self.writer,
                "written": self.written,
                "parts": self._parts,
                "pending": self._buffered,
                "last_error": self.last_error,
            }


class FeedbackLog(PartLog):
    """The feedback log: :class:`PartLog` over :data:`SCHEMA`, appending FeedbackEvents."""

    def __init__(self, root: str, **kw: Any) -> None:
        super().__init__(root, SCHEMA, **kw)

    def append(self, events: Sequence[FeedbackEvent], *, sync: bool = False) -> Receipt:
        """Buffer ``events`` (see :meth:`PartLog.append_rows`)."""
        return self.append_rows([e.model_dump() for e in events], sync=sync)


class OfferLog(PartLog):
    """The log of what was offered: :class:`PartLog` over :data:`OFFERS_SCHEMA`."""

    def __init__(self, root: str, **kw: Any) -> None:
        super().__init__(root, OFFERS_SCHEMA, **kw)


def _read_log(root: str, schema: pa.Schema, what: str) -> pa.Table:
    """Every row of a PartLog's parts under ``root`` in ``schema``, oldest first."""
    t = storage.read_parquet(root)
    missing = [f.name for f in schema if f.name not in t.column_names]
    if missing:
        raise DataError(f"not {what}: columns {missing} missing", source=root)
    t = t.select(schema.names).cast(schema)
    return t.sort_by([("received_at", "ascending"), ("writer", "ascending"), ("seq", "ascending")])


def read_offers(root: str) -> pa.Table:
    """Every offer row under ``root`` (all writers), oldest first.

    Raises:
        StorageError: nothing readable at ``root``.
        DataError: a part that is not an offers part.
    """
    return _read_log(root, OFFERS_SCHEMA, "an offers log")


def read_feedback(root: str) -> pa.Table:
    """Every event under ``root`` (all writers), oldest first (received_at, writer, seq), each
    ``event_id`` once per client (an event id is the client's idempotency key: two apps that
    both number their events 1, 2, ... are two clients, and neither drops the other's).

    Raises:
        StorageError: nothing readable at ``root``.
        DataError: a part that is not a feedback part.
    """
    t = _read_log(root, SCHEMA, "a feedback log")
    bad = pc.invert(pc.is_in(t.column("action"), value_set=pa.array(ACTIONS)))
    if pc.any(bad).as_py():
        raise DataError("feedback rows with an unknown action", source=root)
    # A client that resent an event (its answer lost) gave it the same event_id: keep the first.
    ids = zip(t.column("client").to_pylist(), t.column("event_id").to_pylist(), strict=True)
    first_of: dict[tuple[str | None, str], int] = {}
    for i, key in enumerate(ids):
        first_of.setdefault(key, i)
    first = sorted(first_of.values())
    return t.take(first) if len(first) < t.num_rows else t


def read_feedback_so_far(root: str) -> pa.Table:
    """:func:`read_feedback`, or no events when none has been written under ``root`` yet: no
    folder, or one without a part (made ahead, or left by a first flush killed mid-write).

    Raises:
        StorageError: the log cannot be listed or a part read.
        DataError: a part that is not a feedback part.
    """
    if storage.exists(root) and storage.list_files(root, suffixes=[".parquet"]):
        return read_feedback(root)
    return SCHEMA.empty_table()


def decisions(events: pa.Table) -> pa.Table:
    """The standing decision per (request_id, image_id, client): the latest event wins, and an
    ``undone`` takes back the decision before it (so undo, undo takes back two).

    Returns:
        columns request_id, image_id, group_id, client, action, received_at; one row per image
        whose decisions were not all undone, in the order of their latest event.
    """
    cols = ["request_id", "image_id", "group_id", "client", "action", "received_at"]
    # Only the key and the action as Python lists, the rows taken from the table at the end
    # (months of events as a dict per row took ~6x the table's size, and twice the time).
    req, img, client, action = (
        events.column(c).to_pylist() for c in ("request_id", "image_id", "client", "action")
    )
    stacks: dict[tuple[str, str, str | None], list[int]] = {}
    order: dict[tuple[str, str, str | None], int] = {}
    for i in range(events.num_rows):
        key = (str(req[i]), str(img[i]), client[i])
        stack = stacks.setdefault(key, [])
        if action[i] == "undone":
            if stack:
                stack.pop()
        else:
            stack.append(i)
        order[key] = i
    out = [stacks[k][-1] for k in sorted(stacks, key=order.__getitem__) if stacks[k]]
    schema = pa.schema([SCHEMA.field(c) for c in cols])
    return events.select(cols).take(pa.array(out, pa.int64())).cast(schema)
