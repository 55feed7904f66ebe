"""keeper_core.feedback's log over random histories of replicas, a failing store and kills.

Seeded histories (``KEEPER_HISTORIES=200`` runs more; a failure names its seed and the last
steps, so it replays) on one log root, local or (a few) on moto S3. Replicas (separate
FeedbackLogs, as Serve's ingress replicas are) take events, sync and buffered: every action,
two clients and none, client event ids resent to the same or another replica, events pydantic
refuses and rows that do not fit. Meanwhile the clock moves (a timer flushes what is due; in some
histories the wall clock steps back, as NTP may), the store fails writes for a while, or once, or
writes the part and still reports a failure (an S3 put whose answer was lost); a replica shuts
down, or is killed idle or in the middle of writing a part (before it lands, leaving a torn
temporary file, or after); a write stalls while other requests reach its replica; readers read
throughout.

A stand-in for ``storage.write_parquet`` knows what is really on storage, and each event's
``group_id`` carries a tag naming its copy (``decisions`` keys on request, image and client, never
on the group), so every stored row traces to the append it came from. After every read and at
the end:

- every event acknowledged (a receipt said ``durable``, or its replica said ``pending`` 0) is
  read; nothing is read that was not appended, and no torn write breaks a read;
- each replica's rows keep its order: ``seq`` rises with the appends, ``received_at`` never goes
  back, and is the replica's clock when the event came (or the replica's last, if the clock went
  back); with clocks that never step back the log reads in the order the events came;
- ``read_feedback`` is every stored event, each ``event_id`` once (its first copy), in the
  documented order; ``decisions`` is the documented rule over it (latest wins, ``undone`` takes
  the one before back, per client);
- what the API reports adds up: receipts (accepted, durable, pending, last_error), ``pending``,
  ``written`` and ``parts`` agree with what the store holds, a flush writes every buffered row,
  a sync append or a due buffer is written at once, a log holding rows refuses exactly past
  ``max_pending`` (one holding none takes any batch), and a sync request that arrives during a write is written with the others in
  one write (one, not one per request, when the store fails).
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError
from support import offer_rows

from keeper_core import feedback, storage
from keeper_core.errors import DataError, StorageError
from keeper_core.feedback import (
    FeedbackBackpressure,
    FeedbackEvent,
    FeedbackLog,
    OfferLog,
    Receipt,
    decisions,
    read_feedback,
)

#: histories in the suite (~0.5 s each); KEEPER_HISTORIES=200 looks further
SEEDS = int(os.environ.get("KEEPER_HISTORIES", "16"))
S3_SEEDS = max(1, SEEDS // 6)
REQUESTS, IMAGES, CLIENTS = ("r0", "r1", "r2"), ("i0", "i1", "i2", "i3"), (None, "ana", "bo")
ACTIONS = ("accepted",) * 3 + ("rejected",) * 2 + ("picked-as-keeper", "undone", "undone")
START = datetime(2026, 11, 1, 12, tzinfo=UTC)
COLS = ["request_id", "image_id", "group_id", "client", "action", "received_at"]


def tag(group_id: str) -> str:
    return group_id.rsplit("#", 1)[1]


class Killed(BaseException):
    """The replica's process dies here (SIGKILL): nothing after this point runs."""


class Clock:
    """The replicas' clocks: monotonic seconds, and a wall clock that ticks 1 µs a reading (so no
    two readings tie) and may be stepped back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.mono, self.wall = 1000.0, START
        clock = self

        class Now(datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
                with clock.lock:
                    clock.wall += timedelta(microseconds=1)
                    return clock.wall

        monkeypatch.setattr(feedback, "datetime", Now)
        monkeypatch.setattr(feedback, "time", SimpleNamespace(monotonic=lambda: self.mono))

    def peek(self) -> datetime:
        with self.lock:
            return self.wall

    def sleep(self, s: float) -> None:
        with self.lock:
            self.mono += s
            self.wall += timedelta(seconds=s)


@dataclass
class Write:
    uri: str
    writer: str
    uids: list[str]
    outcome: str  # ok | fail | ghost (landed, then failed) | kill-before | kill-after


class Store:
    """storage.write_parquet, failing, stalling or killing its caller when told to; every write
    is recorded with what became of it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, local: bool) -> None:
        self.real, self.local = storage.write_parquet, local
        self.down = False
        self.faults: list[str] = []  # one-shot outcomes of the next writes
        self.kill: dict[str, str] = {}  # writer -> how its next write dies
        self.stall: tuple[threading.Semaphore, threading.Event, str] | None = None
        self.writes: list[Write] = []
        self.lock = threading.Lock()
        monkeypatch.setattr(storage, "write_parquet", self.write)

    def write(self, table: pa.Table, uri: str) -> None:
        writer = table.column("writer")[0].as_py()
        uids = [tag(g) for g in table.column("group_id").to_pylist()]
        with self.lock:
            stall, self.stall = self.stall, None
            if stall is not None:
                outcome = stall[2]
            elif writer in self.kill:
                outcome = self.kill.pop(writer)
            elif self.faults:
                outcome = self.faults.pop(0)
            else:
                outcome = "fail" if self.down else "ok"
        if stall is not None:
            stall[0].release()
            assert stall[1].wait(30)
        with self.lock:
            self.writes.append(Write(uri, writer, uids, outcome))
        if outcome == "fail":
            raise StorageError(uri, "injected: connect timeout")
        if outcome == "kill-before":
            if self.local:  # the half-written temporary file a killed write leaves
                path = Path(uri)
                path.parent.mkdir(parents=True, exist_ok=True)
                (path.parent / f".{path.name}.{random.randbytes(4).hex()}.tmp").write_bytes(b"PAR1")
            raise Killed
        self.real(table, uri)
        if outcome == "ghost":
            raise StorageError(uri, "injected: read timeout after the put landed")
        if outcome == "kill-after":
            raise Killed


@dataclass
class Copy:
    """One event as appended to one replica (a resend is another copy)."""

    uid: str
    writer: str
    order: tuple[int, ...]  # (op, ...): the order the appends came in
    fields: dict[str, Any]
    before: datetime = START  # the wall clock before and after the append
    after: datetime = START


class Replica:
    def __init__(self, name: str, root: str, cfg: dict[str, Any]) -> None:
        self.log = FeedbackLog(root, writer=name, **cfg)
        self.name = name
        self.accepted: list[Copy] = []  # in seq order
        self.ok: set[str] = set()  # copies in writes that returned
        self.oldest: float | None = None
        self.retry_at = 0.0
        self.written = self.parts = 0
        self.failed = False  # its last write failed

    @property
    def buffered(self) -> list[Copy]:
        return [c for c in self.accepted if c.uid not in self.ok]


def standing(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """docs/feedback.md's rule: per (request, image, client) the latest decision stands and
    ``undone`` takes back the one before it; in the order of each key's latest event."""
    stacks: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    last: dict[tuple[Any, ...], int] = {}
    for i, e in enumerate(events):
        key = (e["request_id"], e["image_id"], e["client"])
        stack = stacks.setdefault(key, [])
        if e["action"] == "undone":
            del stack[-1:]
        else:
            stack.append(e)
        last[key] = i
    keys = sorted((k for k in stacks if stacks[k]), key=last.__getitem__)
    return [{c: stacks[k][-1][c] for c in COLS} for k in keys]


class History:
    def __init__(self, seed: int, root: str, store: Store, clock: Clock) -> None:
        self.seed, self.root, self.store, self.clock = seed, root, store, clock
        self.rng = rng = random.Random(seed)
        max_rows = rng.randint(2, 6)
        self.cfg: dict[str, Any] = {
            "max_rows": max_rows,
            "max_age_s": rng.choice([0.0, 0.5, 1.0, 2.0]),
            "max_pending": max_rows + rng.randint(0, 3 * max_rows),
        }
        self.skew = rng.random() < 0.3  # the wall clock may step back
        self.replicas: list[Replica] = []
        self.by_name: dict[str, Replica] = {}
        self.lost_ok: set[str] = set()  # replicas killed, or shut down with rows unwritten
        self.copies: dict[str, Copy] = {}
        self.stored: set[str] = set()
        self.acked: set[str] = set()
        self.sent: list[dict[str, Any]] = []  # events that carried an event_id
        self.seen = self.n = self.op = 0
        self.steps: list[str] = [f"cfg {self.cfg} skew={self.skew}"]
        for _ in range(rng.randint(1, 3)):
            self.start()

    def where(self, what: str) -> str:
        return f"seed {self.seed}: {what}\n  " + "\n  ".join(self.steps[-30:])

    def start(self) -> Replica:
        rep = Replica(f"ingress-{len(self.by_name)}", self.root, self.cfg)
        self.replicas.append(rep)
        self.by_name[rep.name] = rep
        return rep

    def end(self, rep: Replica, lose: bool) -> None:
        self.replicas.remove(rep)
        if lose:
            self.lost_ok.add(rep.name)
        self.store.kill.pop(rep.name, None)
        self.start()  # Serve starts another (a new writer name)

    # ---------------------------------------------------------------- the model's bookkeeping

    def event(self, sent: bool = True) -> dict[str, Any]:
        self.n += 1
        rng = self.rng
        e = {
            "event_id": f"e{self.n}" if rng.random() < 0.6 else None,
            "request_id": rng.choice(REQUESTS),
            "image_id": rng.choice(IMAGES),
            "action": rng.choice(ACTIONS),
            "client": rng.choice(CLIENTS),
        }
        if e["event_id"] and sent:
            self.sent.append(e)
        return e

    def copy(self, rep: Replica, e: dict[str, Any], order: tuple[int, ...]) -> Copy:
        self.n += 1
        uid = f"c{self.n}"
        fields = {**e, "group_id": f"g{self.n % 3}#{uid}"}
        return Copy(uid, rep.name, order, fields)

    def accept(self, rep: Replica, copies: list[Copy], before: datetime) -> None:
        after = self.clock.peek()
        if copies and not rep.buffered:
            rep.oldest = self.clock.mono
        for c in copies:
            c.before, c.after = before, after
            rep.accepted.append(c)
            self.copies[c.uid] = c

    def due(self, rep: Replica) -> bool:
        buf, mono = rep.buffered, self.clock.mono
        if not buf or mono < rep.retry_at:
            return False
        assert rep.oldest is not None
        return len(buf) >= self.cfg["max_rows"] or mono - rep.oldest >= self.cfg["max_age_s"]

    def absorb(self, strict: bool = True) -> list[Write]:
        """What the store was asked to write since the last look."""
        new = self.store.writes[self.seen :]
        self.seen += len(new)
        for w in new:
            rep = self.by_name[w.writer]
            orders = [self.copies[u].order for u in w.uids]  # rows in the order they came
            assert orders == sorted(orders), self.where(f"{w.writer} wrote {w.uids} out of order")
            if strict:  # one write holds every buffered row
                want = {c.uid for c in rep.buffered}
                assert set(w.uids) == want, self.where(f"{w.writer} wrote {w.uids}, held {want}")
            if w.outcome in ("ok", "ghost", "kill-after"):
                self.stored.update(w.uids)
            if w.outcome == "ok":
                rep.ok.update(w.uids)
                rep.written += len(w.uids)
                rep.parts += 1
                rep.retry_at, rep.failed = 0.0, False
                rep.oldest = self.clock.mono if rep.buffered else None
            elif w.outcome in ("fail", "ghost"):
                rep.retry_at, rep.failed = self.clock.mono + self.cfg["max_age_s"], True
        return new

    def check_counts(self) -> None:
        for rep in self.replicas:
            s = rep.log.stats()
            want = {"pending": len(rep.buffered), "written": rep.written, "parts": rep.parts}
            got = {k: s[k] for k in want}
            assert got == want, self.where(f"{rep.name} reports {got}, the store says {want}")
            assert (s["last_error"] is not None) == rep.failed, self.where(f"{rep.name} {s}")
            if rep.log.pending == 0:  # the replica says all it took is on storage
                self.acked.update(c.uid for c in rep.accepted)

    def check_receipt(self, r: Receipt, rep: Replica, copies: list[Copy]) -> None:
        durable = all(c.uid in rep.ok for c in copies)
        got = (r.accepted, r.durable, r.pending, r.last_error is not None)
        want = (len(copies), durable, len(rep.buffered), rep.failed)
        assert got == want, self.where(f"receipt {r} of {rep.name}, want {want}")
        if r.durable:
            self.acked.update(c.uid for c in copies)

    # ---------------------------------------------------------------------------- operations

    def append(self, rep: Replica, events: list[dict[str, Any]], sync: bool) -> None:
        copies = [self.copy(rep, e, (self.op, i)) for i, e in enumerate(events)]
        refuse = bool(rep.buffered) and len(rep.buffered) + len(copies) > self.cfg["max_pending"]
        before = self.clock.peek()
        self.steps.append(
            f"{self.op} {rep.name} append sync={sync} "
            + ", ".join(f"{c.uid}:{c.fields['event_id']}" for c in copies)
        )
        try:
            r = rep.log.append([FeedbackEvent(**c.fields) for c in copies], sync=sync)
        except FeedbackBackpressure:
            assert refuse, self.where("refused below max_pending")
            assert not self.absorb(), self.where("a refused append wrote")
            self.steps[-1] += " -> 503"
            return
        except Killed:
            self.accept(rep, copies, before)
            self.absorb()
            self.steps[-1] += " -> killed mid-write"
            self.end(rep, lose=True)
            return
        assert not refuse, self.where(f"held {len(rep.buffered) + len(copies)} > max_pending")
        self.accept(rep, copies, before)
        due = self.due(rep)
        mine = [w for w in self.absorb() if w.writer == rep.name]
        self.steps[-1] += f" -> durable={r.durable}" + "".join(f" [{w.outcome}]" for w in mine)
        assert len(mine) == int(sync or due), self.where("wrote when not due, or not when due")
        self.check_receipt(r, rep, copies)

    def timer(self) -> None:
        for rep in list(self.replicas):
            due = self.due(rep)
            got = rep.log.flush_due()
            mine = self.absorb()
            self.steps.append(f"{self.op} {rep.name} timer -> {got}")
            assert len(mine) == int(due), self.where(f"timer on {rep.name}: due={due}")
            want = len(mine[0].uids) if mine and mine[0].outcome == "ok" else 0
            assert got == want, self.where(f"timer on {rep.name} wrote {got}, not {want}")

    def flush(self, rep: Replica, close: bool) -> None:
        n = len(rep.buffered)
        try:
            got = rep.log.flush()
        except Killed:
            self.absorb()
            self.steps.append(f"{self.op} {rep.name} killed mid-write of its flush")
            self.end(rep, lose=True)
            return
        mine = self.absorb()
        self.steps.append(f"{self.op} {rep.name} {'close' if close else 'flush'} -> {got}")
        assert len(mine) == int(n > 0), self.where("flush with rows buffered")
        assert got == (n if mine and mine[0].outcome == "ok" else 0), self.where("flush")
        if close:  # a graceful shutdown: what its final flush could not write is lost
            self.end(rep, lose=bool(rep.buffered))

    def invalid(self, rep: Replica) -> None:
        good = self.event(sent=False)
        bads: list[dict[str, Any]] = [
            {"action": "loved"}, {"image_id": ""}, {"x": 1}, {"event_id": "e" * 129}
        ]  # fmt: skip
        bad = self.rng.choice(bads)
        pending = rep.log.pending
        with pytest.raises(ValidationError):
            FeedbackEvent.model_validate({**good, **bad})
        rows = [{**good, "group_id": "g#never"}, {**good, "request_id": 5, "group_id": "g#never"}]
        full = pending > 0 and pending + len(rows) > self.cfg["max_pending"]  # before it is read
        with pytest.raises(FeedbackBackpressure if full else DataError):
            rep.log.append_rows(rows, sync=self.rng.random() < 0.5)
        assert rep.log.pending == pending, self.where("a bad row was held")
        assert not self.absorb(), self.where("a refused append wrote")
        self.steps.append(f"{self.op} {rep.name} invalid events refused")

    def kill(self, rep: Replica) -> None:
        how = self.rng.choice(["idle", "kill-before", "kill-after"])
        self.steps.append(f"{self.op} {rep.name} killed ({how})")
        if how == "idle":
            self.end(rep, lose=True)
            return
        self.store.kill[rep.name] = how
        if rep.buffered and self.rng.random() < 0.5:
            self.flush(rep, close=False)
        else:
            self.append(rep, [self.event()], sync=True)
        if rep in self.replicas:  # refused (503): it dies all the same
            self.end(rep, lose=True)

    def stall(self, rep: Replica) -> None:
        """A write under way for a while: a buffered append does not wait for it, sync ones
        wait and are written together after it, and a reader reads meanwhile."""
        cap = self.cfg["max_pending"] - len(rep.buffered)
        if self.store.down or self.store.faults or cap < 3:
            return
        outcome = self.rng.choice(["ok", "fail"])
        entered, release = threading.Semaphore(0), threading.Event()
        self.store.stall = (entered, release, outcome)
        before = self.clock.peek()
        first = [
            self.copy(rep, self.event(), (self.op, 0, i)) for i in range(self.rng.randint(0, 1))
        ]
        later = [self.copy(rep, self.event(), (self.op, 1))]
        waiting = [self.copy(rep, self.event(), (self.op, 2)) for _ in range(min(cap - 2, 3))]
        if not first and not rep.buffered:
            first = [self.copy(rep, self.event(), (self.op, 0, 0))]
        got: dict[str, Any] = {}

        def run(key: str, copies: list[Copy], sync: bool) -> None:
            evs = [FeedbackEvent(**c.fields) for c in copies]
            got[key] = rep.log.append(evs, sync=sync) if copies else rep.log.flush()

        threads = [threading.Thread(target=run, args=("first", first, True))]
        threads[0].start()
        assert entered.acquire(timeout=10), self.where("the stalled write never began")
        buffered = rep.log.pending
        t = threading.Thread(target=run, args=("later", later, False))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive(), self.where("a buffered append waited for another's write")
        for c in waiting:
            threads.append(threading.Thread(target=run, args=(c.uid, [c], True)))
            threads[-1].start()
        deadline = time.monotonic() + 10
        while rep.log.pending < buffered + 1 + len(waiting) and time.monotonic() < deadline:
            time.sleep(0.002)
        self.check_read("during a stalled write")
        if self.rng.random() < 0.5:  # and the store fails the next write too
            self.store.faults.append("fail")
        release.set()
        for th in threads:
            th.join(timeout=30)
            assert not th.is_alive(), self.where("a sync append never returned")
        self.accept(rep, [*first, *later, *waiting], before)
        mine = self.absorb(strict=False)
        self.steps.append(
            f"{self.op} {rep.name} stalled {outcome} write, {len(waiting)} sync waiting: "
            + " ".join(w.outcome for w in mine)
        )
        assert len(mine) == 1 + bool(waiting), self.where("not one write for the waiting syncs")
        for key, copies in [("first", first), ("later", later)] + [(c.uid, [c]) for c in waiting]:
            r = got[key]
            if isinstance(r, Receipt):
                assert r.accepted == len(copies)
                assert not r.durable or all(c.uid in rep.ok for c in copies), self.where(key)
                if r.durable:
                    self.acked.update(c.uid for c in copies)
        for c in waiting:  # answered durable exactly when the write after the stall was good
            assert got[c.uid].durable == (mine[-1].outcome == "ok"), self.where(c.uid)

    # ------------------------------------------------------------------------------- reading

    def check_read(self, what: str) -> None:
        msg = self.where
        if not self.stored:
            with pytest.raises(StorageError):
                read_feedback(self.root)
            return
        raw = storage.read_parquet(self.root).to_pylist()  # every part's rows, as stored
        rows: dict[str, dict[str, Any]] = {}
        for r in raw:
            uid = tag(r["group_id"])
            c = self.copies.get(uid)
            assert c is not None, msg(f"{what}: a row never appended {r}")
            assert uid in self.stored, msg(f"{what}: a row of a write that did not land {r}")
            want = {k: v for k, v in c.fields.items() if k != "event_id" or v is not None}
            assert {k: r[k] for k in want} | {"w": r["writer"]} == want | {"w": c.writer}, msg(uid)
            assert rows.setdefault(uid, r) == r, msg(f"{what}: two rows of {uid} differ")
        assert set(rows) == self.stored, msg(f"{what}: parts on storage not read")
        lost = sorted(self.acked - set(rows), key=lambda u: int(u[1:]))
        assert not lost, msg(f"{what}: acknowledged events lost: {lost}")
        by_writer: dict[str, list[dict[str, Any]]] = {}
        for r in rows.values():
            by_writer.setdefault(r["writer"], []).append(r)
        for name, its in by_writer.items():  # each replica's own order
            its.sort(key=lambda r: r["seq"])
            seqs = [r["seq"] for r in its]
            assert len(set(seqs)) == len(seqs), msg(f"{what}: {name} repeats a seq")
            orders = [self.copies[tag(r["group_id"])].order for r in its]
            assert orders == sorted(orders), msg(f"{what}: {name}'s seq is not its append order")
            prev: datetime | None = None
            for r in its:
                c, at = self.copies[tag(r["group_id"])], r["received_at"]
                came = c.before < at <= c.after or at == prev  # its clock, or the last one
                assert came, msg(f"{what}: {c.uid} received at {at}, not when it came")
                assert prev is None or at >= prev, msg(f"{what}: {name}'s clock went back")
                prev = at
        expect, ids = [], set()
        for r in sorted(rows.values(), key=lambda r: (r["received_at"], r["writer"], r["seq"])):
            if r["event_id"] not in ids:
                ids.add(r["event_id"])
                expect.append(r)
        table = read_feedback(self.root)
        got = table.to_pylist()
        assert [tag(r["group_id"]) for r in got] == [tag(r["group_id"]) for r in expect], msg(
            f"{what}: read_feedback's rows or order"
        )
        assert got == expect, msg(f"{what}: read_feedback's values")
        if not self.skew:  # clocks that never step back: the events read in the order they came
            came = [self.copies[tag(r["group_id"])].order[0] for r in got]
            assert came == sorted(came), msg(f"{what}: not in the order the events came")
        assert decisions(table).to_pylist() == standing(expect), msg(f"{what}: decisions")

    # ---------------------------------------------------------------------------------- run

    def step(self) -> None:
        rng, store = self.rng, self.store
        self.op += 1
        rep = rng.choice(self.replicas)
        ops = ["append"] * 12 + ["resend"] * 4 + ["wait"] * 5 + ["timer"] * 4 + ["read"] * 3
        ops += ["flush", "invalid", "toggle", "fault", "fault", "kill", "close"]
        ops += ["stall"] + ["back"] * (2 * self.skew)
        op = rng.choice(ops)
        if op == "append":
            events = [self.event() for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            self.append(rep, events, sync=rng.random() < 0.35)
        elif op == "resend" and self.sent:  # an answer lost: the same event again, anywhere
            events = [rng.choice(self.sent[-8:])]
            if rng.random() < 0.3:
                events.append(self.event())
            self.append(rep, events, sync=rng.random() < 0.5)
        elif op == "wait":
            self.clock.sleep(rng.uniform(0.05, 1.5) * max(self.cfg["max_age_s"], 0.5))
            self.steps.append(f"{self.op} wait: mono {self.clock.mono:.2f}")
        elif op == "timer":
            self.timer()
        elif op == "read":
            self.check_read(f"read at op {self.op}")
        elif op in ("flush", "close"):
            self.flush(rep, close=op == "close")
        elif op == "invalid":
            self.invalid(rep)
        elif op == "toggle":
            store.down = not store.down
            self.steps.append(f"{self.op} store {'down' if store.down else 'up'}")
        elif op == "fault":
            store.faults.append(rng.choice(["fail", "ghost"]))
            self.steps.append(f"{self.op} the next write: {store.faults[-1]}")
        elif op == "kill":
            self.kill(rep)
        elif op == "stall":
            self.stall(rep)
        elif op == "back":  # NTP steps the wall clock back
            self.clock.sleep(0)
            with self.clock.lock:
                self.clock.wall -= timedelta(seconds=rng.uniform(0.0005, 2.0))
            self.steps.append(f"{self.op} wall clock stepped back")
        self.check_counts()

    def finish(self) -> None:
        self.store.down, self.store.faults = False, []
        self.op += 1
        for rep in list(self.replicas):
            self.flush(rep, close=False)
        self.check_counts()
        self.check_read("at the end")
        unwritten = [
            c.uid for c in self.copies.values()
            if c.uid not in self.stored and c.writer not in self.lost_ok
        ]  # fmt: skip
        assert not unwritten, self.where(f"events of live replicas never written: {unwritten}")
        landed = {w.uri: w for w in self.store.writes if w.outcome in ("ok", "ghost", "kill-after")}
        if not landed:
            return
        parts = storage.list_files(self.root, suffixes=[".parquet"])
        assert sorted(storage.same_key(p) for p in parts) == sorted(
            storage.same_key(u) for u in landed
        ), self.where("the parts listed are the parts written")
        raw = storage.read_parquet(self.root).num_rows
        assert raw == sum(len(w.uids) for w in landed.values()), self.where("rows in the parts")
        written = sum(int(str(r.log.stats()["written"])) for r in self.by_name.values())
        assert written == sum(len(r.ok) for r in self.by_name.values()), self.where("written")


def run_history(seed: int, root: str, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    store = Store(monkeypatch, local=not root.startswith("s3://"))
    h = History(seed, root, store, Clock(monkeypatch))
    for _ in range(steps):
        h.step()
    h.finish()


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_feedback_history_local(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_history(seed, str(tmp_path / "feedback" / "events"), monkeypatch, steps=90)


@pytest.mark.parametrize("seed", range(1000, 1000 + S3_SEEDS))
def test_random_feedback_history_s3(
    seed: int, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_history(seed, f"s3://{s3_bucket}/feedback/events", monkeypatch, steps=40)


def test_a_request_within_max_events_is_taken_by_an_idle_replica(tmp_path: Path) -> None:
    """http-api.md: 503 feedback_backpressure means the replica holds max_pending unwritten rows
    (storage failing for a while), and Retry-After says to retry. With max_pending 10 and
    max_events 1000, 11 events were refused with nothing held, storage fine, on every retry;
    an offers log dropped every answer of more images than max_pending the same way."""
    from keeper_serve.config import FeedbackArgs

    args = FeedbackArgs(root=str(tmp_path), max_rows=10, max_pending=10, max_events=1000)
    kw = {k: getattr(args, k) for k in ("max_rows", "max_age_s", "max_pending")}
    log = FeedbackLog(str(tmp_path / "events"), writer="ingress-0", **kw)  # as ingress makes it
    events = [FeedbackEvent(request_id="r", image_id=f"i{k}", action="accepted") for k in range(11)]
    assert log.pending == 0
    assert log.append(events, sync=True).durable  # raised FeedbackBackpressure
    offers = OfferLog(str(tmp_path / "offers"), writer="ingress-0", **kw)
    offers.append_rows(
        offer_rows("r", None, "g", 11)
    )  # an answer of 11 images: logged, not dropped
    offers.flush()
    assert (offers.stats()["written"], offers.pending) == (11, 0)
