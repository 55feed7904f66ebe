"""One job at a time per output: a lock file in the output folder, held while a job writes.

``keeper embed``, ``keeper pick`` and ``keeper unpick`` each read an output, decide, and write it
back (the embedding table's parts and stamps, the picks, the sidecars); ``select``, ``dedup``,
``index``, ``export-embeddings`` and ``feedback-export`` write folders of their own. Two runs
on one output at once (a cron job overlapping the next, a second terminal, a resubmitted Ray
job while the first still runs) would both embed the same photos into two rows each, write
sidecars from two sets of picks, or grow one index twice. So each holds ``OUTPUT/_LOCK.json``
while it works:

    with holding(cfg.output, job="keeper embed"):
        ...  # plan, embed, write

- **Taking it** is one atomic create (``storage.write_new``: a hard link locally, a PUT with
  ``If-None-Match: *`` on S3): of two runs starting together exactly one gets it. The other
  stops at once with a :class:`~keeper_core.errors.BusyError` naming the run that holds it (job,
  run id, host, process, start, last renewal): nothing is read or written.
- **While it works** a thread renews the lock every ``renew_every_s`` (60 s), so its age says
  the holder is alive. A renewal that finds the lock no longer its own (taken over as stale:
  the run was stopped for longer than ``stale_after_s``) says so in the log, and the run's end
  says it again.
- **A run that died** (killed, its machine lost) leaves its lock behind. The next run takes it
  over when the holder cannot be alive: it was on this host and its process is gone (a ``kill
  -9`` and a re-run on one machine, or a Ray job resubmitted on the head node, go on at once),
  or it has not been renewed for ``stale_after_s`` (10 minutes; another host's process cannot be
  asked). Taking over is atomic too (on S3 a PUT with ``If-Match`` of the stale version; locally
  a rename of the stale file, which one run alone can make), and logged with the old holder.
- **At the end**, success or error, the lock is removed if it is still this run's.

Locally a renewal compares the lock, writes and fsyncs its new version beside it, compares
again and renames (``storage.replace_if_unchanged``; a local file has no compare-and-swap): a
takeover landing in the microseconds between the second compare and the rename is written over
once, and the taker's own next renewal finds the lock not its own and says so. A takeover needs
a lock unrenewed for ``stale_after_s`` or a holder whose process is gone, so this takes a holder
paused inside that window and resumed at that moment.

A lock that cannot be read as keeper's (another tool's file by that name) is never taken over
by age alone: the error names it, to be removed by hand.

On S3 the lock needs conditional writes. A store that refuses ``If-None-Match`` or ``If-Match``
(501 NotImplemented), or ignores one (an older MinIO: the PUT overwrites), cannot keep a second
run out; each run there finds out (a second create of its own lock, and a replace of another
version, must fail: two requests) and stops before any work, naming the store.
``KEEPER_OUTPUT_LOCK=off`` in the job's environment runs without the lock, for such a store,
where the operator keeps one run per output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from keeper_core import storage
from keeper_core.errors import BusyError, StorageError
from keeper_core.progress import format_seconds

log = logging.getLogger("keeper.run_lock")

LOCK_NAME = "_LOCK.json"
#: ``KEEPER_OUTPUT_LOCK=off`` (or 0, false, no): no lock is taken (a store without conditional
#: writes); a warning says so each run.
LOCK_ENV = "KEEPER_OUTPUT_LOCK"
#: A lock not renewed for this long is a dead run's (10 renewals missed).
STALE_AFTER_S = 600.0
RENEW_EVERY_S = 60.0
_MAX_LOCK_BYTES = 64 * 1024
_TRIES = 5
#: A local lock younger than this that does not parse may still be being written (a file system
#: without hard links: ``storage.write_new``); it is read again before it is called foreign.
_WRITING_S = 5.0
#: The runs whose locks this process holds now: a lock naming this process and another run is
#: a leftover (a lock this process failed to remove), one naming a run here is held.
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file says."""

    job: str
    run: str
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    #: which process table ``pid`` is in: the boot id and pid namespace (Linux), so a container
    #: sharing the host's name (``--net=host``) is not taken for this one; "" where unknown
    pids: str = ""

    def describe(self) -> str:
        return (
            f"{self.job} (run {self.run}, host {self.host}, pid {self.pid}, started {self.started})"
        )


@dataclass
class Lease:
    """A lock this process holds: where, as whom, and the version it last wrote."""

    uri: str
    holder: Holder
    tag: str
    lost_to: str | None = None  # set when a renewal found the lock someone else's
    #: local folders the lock's file made (deepest first): removed again at the end where the
    #: run left them empty, so a run that fails before any work leaves no folder behind
    made: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def lock_uri(folder: str) -> str:
    return storage.join(folder.rstrip("/"), LOCK_NAME)


@contextmanager
def holding(
    folder: str,
    *,
    job: str,
    stale_after_s: float = STALE_AFTER_S,
    renew_every_s: float = RENEW_EVERY_S,
) -> Iterator[Lease | None]:
    """Hold ``folder``'s lock for the block (see the module docstring); None where
    ``KEEPER_OUTPUT_LOCK=off`` turned it off.

    Raises:
        BusyError: another run holds it (or a file that is not keeper's lock is in its place).
        StorageError: the lock cannot be read or written, or the store cannot hold one.
    """
    if lock_off():
        log.warning(
            "%s: %s=%s: no lock taken; nothing keeps a second run off this output",
            folder,
            LOCK_ENV,
            os.environ[LOCK_ENV],
        )
        yield None
        return
    lease = acquire(folder, job=job, stale_after_s=stale_after_s)
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew_until, args=(lease, stop, renew_every_s), name="keeper-lock", daemon=True
    )
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join(timeout=30)
        release(lease)


def lock_off() -> bool:
    """Whether ``KEEPER_OUTPUT_LOCK`` turns the lock off."""
    return os.environ.get(LOCK_ENV, "").strip().lower() in {"off", "0", "false", "no"}


def acquire(folder: str, *, job: str, stale_after_s: float = STALE_AFTER_S) -> Lease:
    """Take ``folder``'s lock, or take over a dead run's; :func:`holding` without the renewals.

    Raises:
        BusyError: another run holds it.
    """
    uri = lock_uri(folder)
    me = Holder(
        job=job,
        run=uuid.uuid4().hex[:12],
        host=socket.gethostname(),
        pid=os.getpid(),
        started=_now(),
        pids=_process_table(),
    )
    body = _body(me, renewed=me.started)
    with _HELD_LOCK:  # before the write: another thread here may read the lock at once
        _HELD.add(me.run)
    made = () if storage.is_s3(uri) else _missing_folders(folder)
    try:
        lease = _take(uri, folder, me, body, stale_after_s)
    except BaseException:
        _remove_empty(made)
        with _HELD_LOCK:
            _HELD.discard(me.run)
        raise
    lease.made = made
    return lease


def _missing_folders(folder: str) -> tuple[str, ...]:
    """``folder`` and its parents that are not there yet, deepest first."""
    out: list[str] = []
    path = Path(folder.removeprefix("file://"))
    while not path.exists() and path.parent != path:
        out.append(str(path))
        path = path.parent
    return tuple(out)


def _remove_empty(folders: tuple[str, ...]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return  # not empty (the run wrote there), or gone


def _take(uri: str, folder: str, me: Holder, body: bytes, stale_after_s: float) -> Lease:
    for attempt in range(_TRIES):
        tag = _write_new(uri, folder, body)
        if tag is not None:
            if storage.is_s3(uri):
                try:
                    _check_exclusive(uri, folder, body)
                except BaseException:
                    with contextlib.suppress(StorageError):
                        storage.delete(uri)  # not left behind for the next run to wait on
                    raise
            return Lease(uri, me, tag)
        try:
            data = storage.read_bytes(uri, max_bytes=_MAX_LOCK_BYTES)
            info = storage.object_info(uri)
        except StorageError as e:
            if e.cause == "no such object" or isinstance(e.__cause__, FileNotFoundError):
                continue  # released in the meantime: try again
            raise
        other = _parse(data)
        age = _age(info)
        young = age < _WRITING_S and attempt < _TRIES - 1
        if other is None and young and not storage.is_s3(uri):
            time.sleep(0.2)  # a lock being written where there are no hard links: read again
            continue
        why = _dead(other, age, stale_after_s)
        if why is None:
            raise _busy(uri, folder, other, age, stale_after_s)
        assert other is not None
        log.warning("%s: taking over the lock of %s: %s", folder, other.describe(), why)
        if storage.is_s3(uri):
            tag = storage.replace_if_unchanged(uri, body, info.etag)
            if tag is not None:
                return Lease(uri, me, tag)
            continue
        _set_aside(uri, info.etag)
    raise BusyError(f"{folder}: could not take its lock ({uri}): other runs keep taking it")


def _age(info: storage.ObjectInfo) -> float:
    """A lock's age: by the store's clock where it says (S3's Date), else by this host's."""
    if info.age_s is not None:
        return info.age_s
    return time.time() - info.mtime if info.mtime is not None else 0.0


def _write_new(uri: str, folder: str, body: bytes) -> str | None:
    """:func:`storage.write_new`, a store that refuses the conditional write named as such."""
    try:
        return storage.write_new(uri, body)
    except StorageError as e:
        if storage.is_s3(uri) and storage.conditional_write_refused(e):
            raise _no_lock_here(uri, folder, f"refused a PUT with If-None-Match: {e}") from e
        raise


def _check_exclusive(uri: str, folder: str, body: bytes) -> None:
    """The lock just written must refuse a second create (``If-None-Match``) and a replace of
    another version (``If-Match``, what renewals and takeovers use): a store that ignores either
    lets another run in, or a takeover overwrite a live run's lock. Two requests a run."""
    try:
        if storage.write_new(uri, body) is not None:
            what = "ignored If-None-Match (a second create of the lock succeeded)"
        elif storage.replace_if_unchanged(uri, body, "0" * 32) is not None:
            what = "ignored If-Match (a replace of another version of the lock succeeded)"
        else:
            return
    except StorageError as e:
        if not storage.conditional_write_refused(e):
            raise
        what = f"refused a conditional PUT: {e}"
    raise _no_lock_here(uri, folder, what)


def _no_lock_here(uri: str, folder: str, what: str) -> StorageError:
    return StorageError(
        uri,
        f"this S3 store {what}, so it cannot hold keeper's lock and two runs could write "
        f"{folder} at once (AWS S3 and current MinIO honour conditional writes). To run "
        f"without the lock, set {LOCK_ENV}=off in the job's environment and run one job per "
        "output at a time yourself",
    )


def release(lease: Lease) -> None:
    """Remove the lock if it is still this run's; log where it is not."""
    try:
        _release(lease)
        _remove_empty(lease.made)
    finally:
        with _HELD_LOCK:
            _HELD.discard(lease.holder.run)


def _release(lease: Lease) -> None:
    with lease._lock:
        lost = lease.lost_to
    if lost is None:
        try:
            now = _parse(storage.read_bytes(lease.uri, max_bytes=_MAX_LOCK_BYTES))
        except StorageError as e:
            log.warning("%s: cannot read the lock to release it: %s", lease.uri, e)
            return
        if now is not None and now.run == lease.holder.run:
            storage.delete(lease.uri)
            return
        lost = now.describe() if now is not None else "a file that is not keeper's lock"
    log.warning(
        "%s: this run's lock was taken over while it ran, by %s: another run may have "
        "written the same output meanwhile",
        lease.uri,
        lost,
    )


def _renew_until(lease: Lease, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            tag = storage.replace_if_unchanged(
                lease.uri, _body(lease.holder, renewed=_now()), lease.tag
            )
        except StorageError as e:  # a store outage: the next renewal tries again
            log.warning("%s: lock not renewed: %s", lease.uri, e)
            continue
        if tag is None:
            try:
                now = _parse(storage.read_bytes(lease.uri, max_bytes=_MAX_LOCK_BYTES))
            except StorageError:
                now = None
            with lease._lock:
                lease.lost_to = now.describe() if now is not None else "(gone)"
            log.error(
                "%s: this run's lock was taken over by %s; another run may be writing the "
                "same output",
                lease.uri,
                lease.lost_to,
            )
            return
        with lease._lock:
            lease.tag = tag


def _dead(other: Holder | None, age: float, stale_after_s: float) -> str | None:
    """Why the lock's holder cannot be alive, or None where it may be."""
    if other is None:
        return None  # not keeper's file: never taken over
    here = (other.host, other.pids) == (socket.gethostname(), _process_table())
    if here and not _alive(other.pid, other.run):
        return f"its process {other.pid} on this host is gone"
    if age > stale_after_s:
        return (
            f"not renewed for {format_seconds(age)} (stale after {format_seconds(stale_after_s)})"
        )
    return None


def _process_table() -> str:
    """This process's boot id and pid namespace, where Linux says (else "")."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _alive(pid: int, run: str) -> bool:
    if pid == os.getpid():
        with _HELD_LOCK:
            return run in _HELD  # another run of this process holds it, or a leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True
    return True


def _set_aside(uri: str, etag: str) -> None:
    """Move a stale local lock out of the way: one rename, which one run alone can make (the
    others find no file and try again). A lock renewed since it was judged stale is put back."""
    path = uri.removeprefix("file://")
    aside = f"{path}.{uuid.uuid4().hex[:8]}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if storage.object_info(aside).etag != etag:
            # renewed after all: its holder keeps it (the same bytes, so its next renewal holds)
            storage.write_new(path, Path(aside).read_bytes())
    finally:
        os.unlink(aside)


def _busy(uri: str, folder: str, other: Holder | None, age: float, stale_s: float) -> BusyError:
    if other is None:
        return BusyError(
            f"{folder}: {uri} is there and is not keeper's lock; if no keeper run is writing "
            "this output, remove it"
        )
    return BusyError(
        f"{folder} is being written by another run: {other.describe()}, lock renewed "
        f"{format_seconds(age)} ago. Run one job per output at a time. If that run is gone, "
        f"its lock is taken over once it is {format_seconds(stale_s)} old (at once from this "
        f"host when its process has ended); to go on sooner, remove {uri}"
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _body(holder: Holder, *, renewed: str) -> bytes:
    return json.dumps({"keeper_lock": 1, **asdict(holder), "renewed": renewed}).encode()


def _parse(data: bytes) -> Holder | None:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("keeper_lock") != 1:
            return None
        return Holder(
            job=str(doc["job"]),
            run=str(doc["run"]),
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            started=str(doc["started"]),
            pids=str(doc.get("pids", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None
