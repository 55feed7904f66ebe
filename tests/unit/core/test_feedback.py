"""keeper_core.feedback: the buffered, durable feedback log and the standing decisions."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.feedback import (
    FeedbackBackpressure,
    FeedbackEvent,
    FeedbackLog,
    decisions,
    read_feedback,
)


def ev(image: str, action: str = "accepted", request: str = "r1", **kw: str) -> FeedbackEvent:
    return FeedbackEvent(request_id=request, image_id=image, action=action, **kw)  # type: ignore[arg-type]


def parts(root: Path) -> list[Path]:
    return sorted(root.glob("part-*.parquet"))


def test_sync_append_is_durable_and_reads_back(tmp_path: Path) -> None:
    log = FeedbackLog(str(tmp_path), writer="w1")
    r = log.append([ev("a", group_id="s1", client="ana"), ev("b", "picked-as-keeper")], sync=True)
    assert (r.accepted, r.durable, r.pending, r.last_error) == (2, True, 0, None)
    t = read_feedback(str(tmp_path))
    assert t.column("image_id").to_pylist() == ["a", "b"]
    assert t.column("action").to_pylist() == ["accepted", "picked-as-keeper"]
    assert t.column("group_id").to_pylist() == ["s1", None]
    assert t.column("client").to_pylist() == ["ana", None]
    assert t.column("writer").to_pylist() == ["w1", "w1"]
    assert len(set(t.column("event_id").to_pylist())) == 2
    assert len(parts(tmp_path)) == 1


def test_buffered_until_full_then_one_part(tmp_path: Path) -> None:
    log = FeedbackLog(str(tmp_path), max_rows=3, max_age_s=3600)
    r1 = log.append([ev("a"), ev("b")])
    assert (r1.durable, r1.pending) == (False, 2)
    assert parts(tmp_path) == []
    r2 = log.append([ev("c")])
    assert (r2.durable, r2.pending) == (True, 0)
    assert len(parts(tmp_path)) == 1
    assert read_feedback(str(tmp_path)).num_rows == 3
    assert log.stats()["written"] == 3


def test_old_rows_flush_on_the_timer(tmp_path: Path) -> None:
    log = FeedbackLog(str(tmp_path), max_rows=100, max_age_s=0.0)
    assert log.append([ev("a")]).durable  # age 0: every append is due
    log2 = FeedbackLog(str(tmp_path), max_rows=100, max_age_s=3600)
    log2.append([ev("b")])
    assert log2.flush_due() == 0  # neither full nor old
    assert log2.flush() == 1
    assert log2.pending == 0


def test_a_failing_store_keeps_rows_and_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log's folder should be")
    root = blocker / "log"
    log = FeedbackLog(str(root), max_rows=1, max_age_s=0.0, max_pending=3)
    r = log.append([ev("a")])
    assert (r.durable, r.pending) == (False, 1)
    assert r.last_error is not None
    assert "blocker" in r.last_error
    r = log.append([ev("b")], sync=True)  # sync: the receipt says it is not durable, and why
    assert (r.durable, r.pending) == (False, 2)
    assert r.last_error is not None
    assert log.pending == 2  # nothing dropped
    log.append([ev("c")])
    with pytest.raises(FeedbackBackpressure, match="not written yet"):
        log.append([ev("d")])
    blocker.unlink()  # storage recovers: the next flush writes everything held, in order
    assert log.flush() == 3
    t = read_feedback(str(root))
    assert t.column("image_id").to_pylist() == ["a", "b", "c"]
    assert log.stats()["last_error"] is None


def test_writers_share_a_log_and_counts_add_up(tmp_path: Path) -> None:
    logs = [FeedbackLog(str(tmp_path), writer=f"w{i}", max_rows=7) for i in range(2)]
    per_thread = 60

    def work(log: FeedbackLog, t: int) -> None:
        for i in range(per_thread):
            log.append([ev(f"{t}-{i}", request=f"r{t}")])

    threads = [threading.Thread(target=work, args=(logs[t % 2], t)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for log in logs:
        log.flush()
    t = read_feedback(str(tmp_path))
    assert t.num_rows == 4 * per_thread == sum(int(str(lg.stats()["written"])) for lg in logs)
    assert len(set(t.column("event_id").to_pylist())) == t.num_rows
    for w in ("w0", "w1"):  # each writer's sequence is whole and unrepeated
        seqs = sorted(
            s for s, x in zip(t["seq"].to_pylist(), t["writer"].to_pylist(), strict=True) if x == w
        )
        assert seqs == list(range(1, 2 * per_thread + 1))


@pytest.mark.parametrize(
    ("actions", "standing"),
    [
        (["accepted"], "accepted"),
        (["accepted", "rejected"], "rejected"),
        (["accepted", "undone"], None),
        (["accepted", "rejected", "undone"], "accepted"),
        (["accepted", "rejected", "undone", "undone"], None),
        (["undone", "picked-as-keeper"], "picked-as-keeper"),
    ],
)
def test_decisions_latest_wins_and_undo_takes_back(
    tmp_path: Path, actions: list[str], standing: str | None
) -> None:
    log = FeedbackLog(str(tmp_path))
    for a in actions:
        log.append([ev("a", a)])
    log.append([ev("b", "rejected")], sync=True)
    d = decisions(read_feedback(str(tmp_path))).to_pylist()
    by_image = {r["image_id"]: r["action"] for r in d}
    assert by_image.get("a") == standing
    assert by_image["b"] == "rejected"


def test_decisions_are_per_client(tmp_path: Path) -> None:
    log = FeedbackLog(str(tmp_path))
    log.append([ev("a", "accepted", client="ana"), ev("a", "rejected", client="bo")])
    log.append([ev("a", "undone", client="bo")], sync=True)
    d = decisions(read_feedback(str(tmp_path))).to_pylist()
    assert [(r["client"], r["action"]) for r in d] == [("ana", "accepted")]


def test_events_are_validated() -> None:
    with pytest.raises(ValidationError):
        FeedbackEvent(request_id="r", image_id="a", action="liked")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        FeedbackEvent.model_validate(
            {"request_id": "r", "image_id": "a", "action": "accepted", "x": 1}
        )
    with pytest.raises(ValidationError):
        FeedbackEvent(request_id="", image_id="a", action="accepted")


def test_read_feedback_refuses_other_tables(tmp_path: Path) -> None:
    storage.write_parquet(pa.table({"image_id": ["a"]}), str(tmp_path / "part-x.parquet"))
    with pytest.raises(DataError, match="not a feedback log"):
        read_feedback(str(tmp_path))
    with pytest.raises(StorageError):
        read_feedback(str(tmp_path / "nothing"))


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_rows"):
        FeedbackLog(str(tmp_path), max_rows=10, max_pending=5)


def test_a_resent_event_is_counted_once(tmp_path: Path) -> None:
    log = FeedbackLog(str(tmp_path))
    first = FeedbackEvent(event_id="e-1", request_id="r", image_id="a", action="accepted")
    log.append([first], sync=True)
    log.append([first, ev("b", "undone")], sync=True)  # the answer was lost: sent again
    t = read_feedback(str(tmp_path))
    assert t.column("event_id").to_pylist()[:1] == ["e-1"]
    assert t.column("image_id").to_pylist() == ["a", "b"]


def test_two_clients_numbering_their_events_alike_keep_both(tmp_path: Path) -> None:
    # An event id is its client's idempotency key: a web app's "1" and a mobile app's "1" are
    # two events (one was dropped).
    log = FeedbackLog(str(tmp_path))
    web = FeedbackEvent(event_id="1", request_id="r", image_id="a", action="accepted", client="web")
    app = FeedbackEvent(event_id="1", request_id="r", image_id="b", action="rejected", client="app")
    log.append([web, app, web], sync=True)
    t = read_feedback(str(tmp_path))
    assert t.column("image_id").to_pylist() == ["a", "b"]
