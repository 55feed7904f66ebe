"""keeper_core.feedback's PartLog: concurrency, backpressure, clocks, crashes, S3.

Several ingress replicas append to one log at once; a store that is slow or failing must not
make every request queue behind it; a writer's own order must survive its clock; a process
killed mid-write must leave nothing a reader trips on.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from keeper_core import feedback, storage
from keeper_core.errors import DataError, StorageError
from keeper_core.feedback import (
    FeedbackEvent,
    FeedbackLog,
    OfferLog,
    Receipt,
    decisions,
    read_feedback,
    read_offers,
)


def ev(image: str, action: str = "accepted", **kw: Any) -> FeedbackEvent:
    return FeedbackEvent(request_id="r", image_id=image, action=action, **kw)


class BlockingStore:
    """storage.write_parquet that holds each write until released, then fails or writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = storage.write_parquet
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.fail = True
        self.calls: list[int] = []
        monkeypatch.setattr(storage, "write_parquet", self.write)

    def write(self, table: pa.Table, uri: str) -> None:
        self.calls.append(table.num_rows)
        self.entered.release()
        assert self.release.wait(30)
        if self.fail:
            raise StorageError(uri, "connect timeout")
        self.real(table, uri)


def _wait_queued(threads: list[threading.Thread]) -> None:
    time.sleep(0.3)  # they have appended and wait for the flush lock (or returned)


@pytest.mark.parametrize("fails", [True, False])
def test_sync_appends_do_not_each_retry_a_failing_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    """Before: N sync requests that arrived during one write each wrote again, one after the
    other, so the last waited N write attempts (with S3's retries, ~25 s each when the endpoint
    is down). Now the waiting ones are written together by one write (group commit), and when
    that write fails they all answer at once, not durable."""
    store = BlockingStore(monkeypatch)
    store.fail = fails
    log = FeedbackLog(str(tmp_path), max_rows=100, max_age_s=60)
    receipts: list[Receipt] = []

    def send(i: int) -> None:
        receipts.append(log.append([ev(f"i{i}")], sync=True))

    first = threading.Thread(target=send, args=(0,))
    first.start()
    assert store.entered.acquire(timeout=10)  # the first write is under way
    rest = [threading.Thread(target=send, args=(i,)) for i in range(1, 7)]
    for t in rest:
        t.start()
    _wait_queued(rest)
    store.release.set()
    for t in [first, *rest]:
        t.join(timeout=30)
        assert not t.is_alive()
    # the first request's row, then everyone else's (and the first's again, if it failed) in one
    assert store.calls == [1, 7 if fails else 6]
    assert all(r.durable is not fails for r in receipts)
    if fails:
        assert all(r.last_error and "connect timeout" in r.last_error for r in receipts)
        assert log.pending == 7  # nothing dropped
    else:
        assert read_feedback(str(tmp_path)).num_rows == 7


def test_a_non_sync_append_does_not_wait_for_another_threads_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: an append that found the buffer due waited for the write under way (and then
    wrote again), so every /v1/rank answer (its offers are appended before it returns) stalled
    behind a slow store."""
    store = BlockingStore(monkeypatch)
    store.fail = False
    log = OfferLog(str(tmp_path), max_rows=1, max_age_s=60)
    row = {"request_id": "q", "route": "rank", "image_id": "a", "rank": 0}
    writer = threading.Thread(target=log.append_rows, args=([row],))
    writer.start()
    assert store.entered.acquire(timeout=10)
    got: list[Receipt] = []
    other = threading.Thread(target=lambda: got.append(log.append_rows([{**row, "image_id": "b"}])))
    other.start()
    other.join(timeout=5)
    try:
        assert not other.is_alive(), "the append waited for another thread's write"
        assert (got[0].durable, got[0].pending) == (False, 2)
    finally:
        store.release.set()
        writer.join(timeout=30)
        other.join(timeout=30)
    assert log.flush() == 1  # the second row was kept for the next flush
    assert sorted(read_offers(str(tmp_path)).column("image_id").to_pylist()) == ["a", "b"]


def test_received_at_never_goes_back_within_a_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the replica's clock stepped back (NTP) between two decisions of one person on
    one image, and read_feedback (ordered by received_at first) put the later one first, so
    `decisions` kept the earlier one."""

    class Clock(datetime):
        at = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)

        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return cls.at

    monkeypatch.setattr(feedback, "datetime", Clock)
    log = FeedbackLog(str(tmp_path), writer="w1")
    log.append([ev("a", client="ana")], sync=True)
    Clock.at -= timedelta(seconds=2)
    log.append([ev("a", "rejected", client="ana")], sync=True)
    t = read_feedback(str(tmp_path))
    assert t.column("seq").to_pylist() == [1, 2]
    assert decisions(t).column("action").to_pylist() == ["rejected"]


def test_concurrent_appends_keep_seq_and_received_at_in_one_order(tmp_path: Path) -> None:
    """received_at is taken under the lock that gives seq: a writer's rows sort the same by
    either (before, two racing appends could stamp them in the opposite orders)."""
    log = FeedbackLog(str(tmp_path), max_rows=50, max_age_s=60)

    def work(t: int) -> None:
        for i in range(100):
            log.append([ev(f"{t}-{i}")])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    log.flush()
    t = read_feedback(str(tmp_path))
    assert t.column("seq").to_pylist() == list(range(1, 401))


def test_a_row_that_does_not_fit_fails_its_own_append_only(tmp_path: Path) -> None:
    """Before: the row was buffered, and every later flush (everyone's rows) failed on it with
    an ArrowInvalid that is not a StorageError: nothing of the log was written again, and each
    append that found the buffer due raised."""
    log = OfferLog(str(tmp_path), max_rows=2, max_age_s=60)
    good = {"request_id": "q", "route": "rank", "image_id": "a", "rank": 0}
    with pytest.raises(DataError, match="do not fit"):
        log.append_rows([{**good, "image_id": "bad"}, {**good, "rank": "first"}])
    assert log.pending == 0  # nothing of that call was buffered
    r = log.append_rows([good, {**good, "image_id": "b"}])
    assert (r.durable, r.pending) == (True, 0)
    assert read_offers(str(tmp_path)).column("image_id").to_pylist() == ["a", "b"]


def test_buffered_offer_rows_are_held_as_arrow_not_python_floats(tmp_path: Path) -> None:
    """Before: each buffered offer row kept its embedding as a list of Python floats (~32 bytes
    a float): 20,000 rows of 768-d took ~660 MiB, so the default max_pending (100,000 rows)
    meant ~3 GB per replica while storage was down, before any 503."""
    log = OfferLog(str(tmp_path / "never"), max_rows=10_000, max_age_s=3600, max_pending=10_000)
    emb = np.random.default_rng(0).random(512).astype(np.float32)
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(20):
            rows = [
                {"request_id": f"q{i}", "route": "rank", "image_id": f"{j}", "rank": j,
                 "embedding": emb.tolist()}
                for j in range(100)
            ]  # fmt: skip
            log.append_rows(rows)
            del rows
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert log.pending == 2000
    # 2,000 x 512 Python floats would be ~33 MB of Python objects; Arrow's buffers are not traced
    assert held < 4_000_000, held
    assert log.flush() == 2000
    got = read_offers(str(tmp_path / "never"))
    assert np.allclose(np.asarray(got.column("embedding")[0].as_py()), emb)


_KILLED_MID_WRITE = """
import os, sys, time
from keeper_core.feedback import FeedbackEvent, FeedbackLog
root = sys.argv[1]
log = FeedbackLog(root, writer="doomed")
ev = lambda i: FeedbackEvent(request_id="r", image_id=f"i{i}", action="accepted")
assert log.append([ev(0), ev(1)], sync=True).durable
real = os.replace
def stall(*a, **k):
    print("writing", flush=True)
    time.sleep(600)
os.replace = stall
log.append([ev(2)], sync=True)
"""


def test_a_process_killed_mid_write_leaves_what_it_acknowledged_and_nothing_torn(
    tmp_path: Path,
) -> None:
    """A replica SIGKILLed while its part is being written: the rows it answered durable are
    there, the half-written temporary file is not read, and later writers and readers go on."""
    root = tmp_path / "events"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_MID_WRITE, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "writing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert any(p.name.endswith(".tmp") for p in root.iterdir())  # the torn write is there
    assert read_feedback(str(root)).column("image_id").to_pylist() == ["i0", "i1"]
    FeedbackLog(str(root), writer="next").append([ev("i3")], sync=True)
    assert read_feedback(str(root)).column("image_id").to_pylist() == ["i0", "i1", "i3"]


def test_replicas_appending_to_one_s3_prefix_lose_nothing_while_read(s3_bucket: str) -> None:
    """Four writers (replicas) flushing small parts into one prefix at once, a reader reading
    the log throughout: no part name collides, no row is lost or doubled, every read parses."""
    root = f"s3://{s3_bucket}/feedback/events"
    logs = [FeedbackLog(root, writer=f"ingress-{i}", max_rows=5, max_age_s=60) for i in range(4)]
    per = 40
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def write(log: FeedbackLog) -> None:
        try:
            for i in range(per):
                log.append([ev(f"{log.writer}-{i}", client=log.writer)])
            log.flush(raise_errors=True)
        except BaseException as e:
            errors.append(e)

    def read() -> None:
        while not stop.is_set():
            try:
                reads.append(read_feedback(root).num_rows)
            except StorageError:
                pass  # nothing written yet
            except BaseException as e:
                errors.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(lg,)) for lg in logs]
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    stop.set()
    reader.join(timeout=60)
    assert not errors, errors
    assert reads == sorted(reads)  # a reader sees whole parts, never fewer rows later
    t = read_feedback(root)
    assert t.num_rows == 4 * per
    assert len(set(t.column("event_id").to_pylist())) == 4 * per
    assert len(storage.list_files(root)) == sum(lg.stats()["parts"] for lg in logs)  # type: ignore[misc]


def _decisions_by_rows(events: pa.Table) -> list[dict[str, Any]]:
    """The rule as written (a dict per row): what decisions must still return."""
    stacks: dict[tuple[str, str, str | None], list[dict[str, Any]]] = {}
    order: dict[tuple[str, str, str | None], int] = {}
    for i, row in enumerate(events.to_pylist()):
        key = (row["request_id"], row["image_id"], row["client"])
        stack = stacks.setdefault(key, [])
        if row["action"] == "undone":
            if stack:
                stack.pop()
        else:
            stack.append(row)
        order[key] = i
    cols = ["request_id", "image_id", "group_id", "client", "action", "received_at"]
    return [
        {c: stacks[k][-1][c] for c in cols}
        for k in sorted(stacks, key=order.__getitem__)
        if stacks[k]
    ]


def test_decisions_from_columns_match_the_rule_row_by_row(tmp_path: Path) -> None:
    """decisions reads only the key and action columns into Python (200,000 events: 0.7 s and
    ~70 MiB instead of 6.4 s and ~250 MiB) and returns the same rows in the same order."""
    rng = np.random.default_rng(7)
    log = FeedbackLog(str(tmp_path), max_rows=1000, max_age_s=3600)
    actions = ["accepted", "rejected", "picked-as-keeper", "undone"]
    for i in range(3000):
        log.append(
            [
                FeedbackEvent(
                    request_id=f"r{rng.integers(20)}",
                    image_id=f"i{rng.integers(10)}",
                    action=actions[rng.integers(4)],  # type: ignore[arg-type]
                    group_id=None if i % 7 == 0 else f"g{i % 3}",
                    client=None if i % 5 == 0 else f"c{rng.integers(3)}",
                )
            ]
        )
    log.flush()
    events = read_feedback(str(tmp_path))
    got = decisions(events)
    assert got.schema.names == ["request_id", "image_id", "group_id", "client", "action",
                                "received_at"]  # fmt: skip
    assert got.to_pylist() == _decisions_by_rows(events)
    assert decisions(events.slice(0, 0)).num_rows == 0
