"""keeper_core.run_lock: one run at a time per output, locally and on S3 (moto).

Taken atomically (of runs racing, one wins: threads here, processes too), refused with the
holder named, renewed while held, removed at the end (an error too), taken over from a run that
cannot be alive (its process gone on this host; not renewed for ``stale_after_s``), never from a
file that is not keeper's lock, and a renewal that finds the lock taken over says so.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from keeper_core import run_lock, storage
from keeper_core.errors import BusyError, StorageError
from keeper_core.run_lock import LOCK_NAME, acquire, holding, release


def _lock(folder: str) -> dict[str, object]:
    return json.loads(storage.read_bytes(storage.join(folder, LOCK_NAME)))


def _foreign(folder: str, *, host: str = "other-host", pid: int = 1, pids: str = "") -> None:
    """A lock another run wrote."""
    body = {
        "keeper_lock": 1,
        "job": "keeper embed",
        "run": "0123456789ab",
        "host": host,
        "pid": pid,
        "pids": pids,
        "started": "2026-12-07T09:00:00+00:00",
        "renewed": "2026-12-07T09:00:00+00:00",
    }
    storage.write_bytes(storage.join(folder, LOCK_NAME), json.dumps(body).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["local", "s3"])
def folder(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def test_held_refused_and_removed(folder: str) -> None:
    with holding(folder, job="keeper embed") as lease:
        held = _lock(folder)
        assert held["run"] == lease.holder.run
        assert (held["job"], held["host"], held["pid"]) == (
            "keeper embed",
            socket.gethostname(),
            os.getpid(),
        )
        with pytest.raises(BusyError) as e:
            acquire(folder, job="keeper pick")
        assert f"keeper embed (run {lease.holder.run}, host {socket.gethostname()}" in str(e.value)
        assert "Run one job per output at a time" in str(e.value)
    assert not storage.exists(storage.join(folder, LOCK_NAME))
    with pytest.raises(RuntimeError), holding(folder, job="keeper embed"):
        raise RuntimeError("the job failed")
    assert not storage.exists(storage.join(folder, LOCK_NAME))  # removed on an error too
    if not folder.startswith("s3://"):  # a folder the lock made, left empty: removed again
        assert not Path(folder).exists()


def test_a_dead_process_on_this_host_is_taken_over_at_once(
    folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = _dead_pid()
    # the same host name in another container (another pid namespace): its pid means nothing here
    _foreign(folder, host=socket.gethostname(), pid=dead, pids="another-boot/4026531999")
    with pytest.raises(BusyError):
        acquire(folder, job="keeper embed")
    _foreign(folder, host=socket.gethostname(), pid=dead, pids=run_lock._process_table())
    with caplog.at_level(logging.WARNING, "keeper.run_lock"):
        lease = acquire(folder, job="keeper embed")
    assert _lock(folder)["run"] == lease.holder.run
    assert "taking over the lock of keeper embed (run 0123456789ab" in caplog.text
    assert "on this host is gone" in caplog.text
    release(lease)
    assert not storage.exists(storage.join(folder, LOCK_NAME))


def test_another_hosts_run_is_busy_until_its_lock_is_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = str(tmp_path / "out")
    _foreign(folder)
    with pytest.raises(BusyError, match="host other-host, pid 1"):
        acquire(folder, job="keeper embed")
    old = time.time() - 11 * 60
    os.utime(Path(folder) / LOCK_NAME, (old, old))
    with caplog.at_level(logging.WARNING, "keeper.run_lock"):
        lease = acquire(folder, job="keeper embed")
    assert "not renewed for 11 min" in caplog.text
    assert _lock(folder)["run"] == lease.holder.run
    assert not list(Path(folder).glob("*.stale"))  # the stale lock set aside, then removed
    release(lease)


def test_a_lock_on_s3_is_aged_by_the_stores_clock_not_this_hosts(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock runs 30 minutes ahead (no NTP in a container, a VM resumed) must not
    read another host's fresh lock as 30 minutes stale and take it over: S3 says the age."""
    folder = f"s3://{s3_bucket}/out"
    _foreign(folder)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 30 * 60)
    with pytest.raises(BusyError, match=r"lock renewed \d+ s ago"):
        acquire(folder, job="keeper embed")
    assert _lock(folder)["host"] == "other-host"


def test_a_store_that_gives_no_date_is_aged_by_this_hosts_clock() -> None:
    then = time.time() - 700
    assert run_lock._age(storage.ObjectInfo(1, "e", mtime=then, age_s=None)) >= 700
    assert run_lock._age(storage.ObjectInfo(1, "e", mtime=then, age_s=12.0)) == 12.0
    assert run_lock._age(storage.ObjectInfo(1, "e")) == 0.0


@pytest.fixture(params=["IfNoneMatch", "IfMatch"])
def store_ignoring_a_condition(request: pytest.FixtureRequest, s3_bucket: str) -> Iterator[str]:
    """moto reached by a client that drops one condition from every PUT: what keeper sees of a
    store that ignores that header (an older MinIO): the PUT overwrites."""
    events = storage.s3_client().meta.events
    header = request.param

    def drop(params: dict[str, object], **_: object) -> None:
        params.pop(header, None)

    events.register("before-parameter-build.s3.PutObject", drop, unique_id="ignore-cond")
    try:
        yield s3_bucket
    finally:
        events.unregister("before-parameter-build.s3.PutObject", unique_id="ignore-cond")


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_work(
    store_ignoring_a_condition: str, request: pytest.FixtureRequest
) -> None:
    folder = f"s3://{store_ignoring_a_condition}/out"
    header = {"IfNoneMatch": "If-None-Match", "IfMatch": "If-Match"}[
        request.node.callspec.params["store_ignoring_a_condition"]
    ]
    refused = pytest.raises(StorageError, match=rf"ignored {header} .* KEEPER_OUTPUT_LOCK=off")
    with refused, holding(folder, job="keeper embed"):
        pytest.fail("the block ran without a lock that keeps a second run out")
    assert not storage.exists(storage.join(folder, LOCK_NAME))


def test_a_store_that_refuses_conditional_writes_is_named() -> None:
    def error(code: str, status: int) -> StorageError:
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        e = StorageError("s3://b/out/_LOCK.json", "S3 error")
        e.__cause__ = ClientError(response, "PutObject")  # type: ignore[arg-type]
        return e

    assert storage.conditional_write_refused(error("NotImplemented", 501))
    assert not storage.conditional_write_refused(error("PreconditionFailed", 412))
    assert not storage.conditional_write_refused(error("AccessDenied", 403))


def test_the_lock_can_be_turned_off_for_such_a_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = str(tmp_path / "out")
    monkeypatch.setenv("KEEPER_OUTPUT_LOCK", "off")
    logged = caplog.at_level(logging.WARNING, "keeper.run_lock")
    with logged, holding(folder, job="keeper embed") as lease, holding(folder, job="keeper pick"):
        assert lease is None
        assert not (tmp_path / "out").exists()
    assert "KEEPER_OUTPUT_LOCK=off: no lock taken" in caplog.text


def test_a_file_that_is_not_keepers_lock_is_never_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("something else's")
    old = time.time() - 86400
    os.utime(folder / LOCK_NAME, (old, old))
    with pytest.raises(BusyError, match="is not keeper's lock"):
        acquire(str(folder), job="keeper embed")
    assert (folder / LOCK_NAME).read_text() == "something else's"


def test_renewed_while_held_and_a_takeover_is_noticed(
    folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    uri = storage.join(folder, LOCK_NAME)
    with caplog.at_level(logging.WARNING, "keeper.run_lock"):
        with holding(folder, job="keeper embed", renew_every_s=0.05) as lease:
            first = storage.read_bytes(uri)
            deadline = time.monotonic() + 30
            while storage.read_bytes(uri) == first and time.monotonic() < deadline:
                time.sleep(0.05)  # renewal rewrites "renewed" (whole seconds)
            assert storage.read_bytes(uri) != first
            # Someone took it over (as stale). Written again until noticed: a renewal that
            # compared its own lock just before may write over it once (run_lock's docstring).
            deadline = time.monotonic() + 30
            while lease.lost_to is None and time.monotonic() < deadline:
                _foreign(folder)
                time.sleep(0.05)
            assert lease.lost_to is not None
            assert "other-host" in lease.lost_to
        assert "taken over by keeper embed (run 0123456789ab" in caplog.text
    assert _lock(folder)["run"] == "0123456789ab"  # the other run's lock is left in place


def _race(folder: str, n: int) -> tuple[list[run_lock.Lease], list[BusyError]]:
    """``n`` threads taking the lock at once: the leases won, the refusals."""
    won: list[run_lock.Lease] = []
    busy: list[BusyError] = []
    start = threading.Barrier(n)

    def take() -> None:
        start.wait()
        try:
            won.append(acquire(folder, job="keeper embed"))
        except BusyError as e:
            busy.append(e)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, busy


def test_of_runs_racing_one_takes_it(folder: str) -> None:
    for _ in range(5):
        won, busy = _race(folder, 6)
        assert (len(won), len(busy)) == (1, 5)
        release(won[0])


@pytest.fixture
def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without hard links (an exFAT or FAT drive, many SMB shares): ``link(2)``
    fails with EPERM, as Linux's exfat and vfat answer."""

    def refuse(src: object, dst: object, **_: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

    monkeypatch.setattr(os, "link", refuse)


@pytest.mark.usefixtures("no_hard_links")
def test_without_hard_links_the_lock_still_lets_one_run_in(tmp_path: Path) -> None:
    uri = str(tmp_path / "new.json")
    assert storage.write_new(uri, b"first") is not None
    assert storage.write_new(uri, b"second") is None
    assert Path(uri).read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["new.json"]  # no temporary file left

    folder = str(tmp_path / "out")
    for _ in range(5):
        won, busy = _race(folder, 6)
        assert (len(won), len(busy)) == (1, 5)
        assert all("is being written by another run" in str(e) for e in busy)
        release(won[0])
    with holding(folder, job="keeper pick"), pytest.raises(BusyError, match="keeper pick"):
        acquire(folder, job="keeper embed")


@pytest.mark.usefixtures("no_hard_links")
def test_without_hard_links_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    folder = str(tmp_path / "out")
    _foreign(folder)
    old = time.time() - 11 * 60
    os.utime(Path(folder) / LOCK_NAME, (old, old))
    lease = acquire(folder, job="keeper embed")
    assert _lock(folder)["run"] == lease.holder.run
    release(lease)
    assert not (Path(folder) / LOCK_NAME).exists()


def test_of_processes_racing_one_takes_it(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from keeper_core.run_lock import acquire\n"
        "from keeper_core.errors import BusyError\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)\n"
        "try:\n"
        f"    acquire({str(folder)!r}, job='keeper embed'); print('won'); time.sleep(1)\n"
        "except BusyError: print('busy')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    time.sleep(1.5)  # every interpreter started and waiting
    go.touch()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["busy", "busy", "busy", "won"]


def test_the_message_docs_operations_shows_is_the_one_raised() -> None:
    docs = (Path(__file__).resolve().parents[3] / "docs" / "operations.md").read_text()
    shown = next(line for line in docs.splitlines() if line.startswith("keeper embed: error: "))
    holder = run_lock.Holder(
        "keeper embed", "3f9c01d2a7b4", "ray-head-0", 812, "2026-12-07T03:00:12+00:00"
    )
    folder = "s3://culls/trip/table"
    busy = run_lock._busy(run_lock.lock_uri(folder), folder, holder, 41.0, run_lock.STALE_AFTER_S)
    assert shown == f"keeper embed: error: {busy}"
