"""What ``keeper pick --copy-keepers`` costs against a plain copy of the same files.

    .venv/bin/python benchmarks/export_keepers.py [--n 100] [--mib 8] [--repeats 3] \
        [--work-dir DIR] [--s3-threads 16] [--s3-rerun] [--s3-unpick] [--latency-ms 20] \
        [--out benchmarks/results/export-keepers.json]

``export_keepers(mode="copy")`` copies each keeper to a temporary file, fsyncs it and renames it
into place, and hashes what it writes (sha256) into the folder's ``.keeper-export.json``, so a
later run can replace its own copy of an original that changed since and never a file a person
changed. The baseline is the loop anyone would write: ``shutil.copy2`` per file, fsynced (the
same durability). Side by side in this one process, on the same ``--n`` files of ``--mib`` MiB
of random bytes (camera JPEGs do not compress), each cell the best of ``--repeats``:

- **first copy**: an empty destination;
- **re-run**: everything already there (keeper hashes both sides to see that; the baseline has
  no way to tell, so it copies again);
- **originals changed**: every original rewritten (as Lightroom saving metadata into a JPEG
  does); keeper replaces its own copies, the baseline copies again.

The page cache is warm (the files were just written): on real disks the copy's I/O dominates
both columns and the hashing (about 1.7 GB/s a core here, SHA extensions) hides behind it less
than it would with overlapped I/O.

With ``--s3-rerun``, a third table: the originals and the keepers folder both in a moto bucket
(``keeper pick --input s3://... --copy-keepers s3://...``), everything already copied, re-run
with keeper's former ``_export_s3`` (two HEADs after an existence check, then both objects
downloaded and compared; its text is kept below) and with today's (the copy told by its ETag),
side by side on the same objects: requests by operation, bytes downloaded, and the time with
``--latency-ms`` slept before each request (botocore's ``before-send``), on ``io_threads`` 16;
and each one's first export into an empty prefix (the former also asking for the bucket after
each new copy's 404, as keeper did before 2026-12-07).

With ``--s3-unpick``, a fourth: the same bucket's copies taken back as ``keeper unpick --keepers``
does (``remove_keepers_export``), each variant on a fresh export of the same objects: keeper
before 2026-12-07 (its record held no ETags, so each copy was downloaded and hashed, one at a
time: run here as a record without ETags and ``io_threads`` 1), the ETags alone (one thread),
and today's (ETags, ``io_threads`` 16); requests, bytes downloaded and time as above.

With ``--s3-threads N``, a second table: the originals on a ``moto_server`` on loopback (as
``keeper pick --input s3://... --copy-keepers DIR`` reads them), exported to a local folder with
``io_threads`` 1 and N, the first copy, each cell the best of ``--repeats``, also with
``--latency-ms`` of simulated latency before each storage call (a real bucket's tens of ms; the
sleep is simulated, moto's own CPU on this machine's cores is not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed

from embed import machine_info, write_record

from keeper_core.handback import export_keepers


def plain_copy(uris: list[str], root: Path, dest: Path) -> None:
    """The baseline: copy2 each file to its place under ``dest``, fsynced."""
    for uri in uris:
        target = dest / Path(uri).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(uri, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def keeper_copy(uris: list[str], root: Path, dest: Path) -> None:
    res = export_keepers(uris, input_root=str(root), dest=str(dest), mode="copy")
    if res.failed:
        raise SystemExit(f"export failed: {res.failed[:3]}")


def nothing() -> None:
    pass


def best(fn: Callable[[], None], prepare: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        prepare()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def upload(uris: list[str], root: Path, prefix: str) -> list[str]:
    """The files under ``prefix`` at their paths under ``root``; their URIs there."""
    from keeper_core import storage

    keys = [f"{prefix}/{Path(uri).relative_to(root).as_posix()}" for uri in uris]
    for uri, key in zip(uris, keys, strict=True):
        storage.write_bytes(key, Path(uri).read_bytes())
    return keys


def s3_rows(uris: list[str], root: Path, work: Path, args: Any) -> list[dict[str, Any]]:
    """The same files uploaded to a moto_server bucket, exported from there to a local folder on
    one thread and on ``--s3-threads``, with and without the simulated latency."""
    from sidecar_io import moto_bucket, simulated_latency  # moto and boto3 only for this table

    rows = []
    with moto_bucket(work) as bucket:
        s3_uris = upload(uris, root, f"{bucket}/photos")
        for latency_ms in (0.0, args.latency_ms):
            cells = {}
            for threads in (1, args.s3_threads):
                dest = work / f"from-s3-{threads}"

                def run(
                    threads: int = threads, dest: Path = dest, latency_ms: float = latency_ms
                ) -> None:
                    with simulated_latency(latency_ms / 1000):
                        res = export_keepers(
                            s3_uris,
                            input_root=f"{bucket}/photos",
                            dest=str(dest),
                            mode="copy",
                            io_threads=threads,
                        )
                    if res.failed or res.exported != len(s3_uris):
                        raise SystemExit(f"export from S3 failed: {res.failed[:3]}")

                def fresh(dest: Path = dest) -> None:
                    shutil.rmtree(dest, ignore_errors=True)

                cells[threads] = best(run, fresh, args.repeats)
            one, many = cells[1], cells[args.s3_threads]
            rows.append(
                {
                    "latency_ms": latency_ms,
                    "threads": args.s3_threads,
                    "one_s": one,
                    "threads_s": many,
                    "speedup": one / many,
                }
            )
    return rows


def former_export_s3(src: str, dst: str, recorded: str | None) -> Any:
    """``handback._export_s3`` as it was before 2026-12-07 (read both sides of a copy already
    there): the baseline of the ``--s3-rerun`` table."""
    import hashlib

    from keeper_core import handback, storage

    if storage.exists(dst):
        same_size = storage.object_info(dst).size == storage.object_info(src).size
        if not same_size and recorded is None:
            raise handback._different(dst, None)
        there = storage.read_bytes(dst)
        data = storage.read_bytes(src)
        if there == data:
            return handback._Exported("already", hashlib.sha256(there).hexdigest())
        if hashlib.sha256(there).hexdigest() != recorded:
            raise handback._different(dst, recorded)
        storage.write_bytes(dst, data)
        return handback._Exported("updated", hashlib.sha256(data).hexdigest())
    data = storage.read_bytes(src)
    storage.write_bytes(dst, data)
    return handback._Exported("exported", hashlib.sha256(data).hexdigest())


def s3_rerun_rows(uris: list[str], root: Path, work: Path, args: Any) -> list[dict[str, Any]]:
    """Originals and copies in one moto bucket, all copied; the re-run's requests, downloaded
    bytes and time (``--latency-ms`` before each request), the former export against today's;
    and each one's first export into an empty prefix (the former asked for the bucket after each
    new copy's 404: ``storage._BUCKET_SEEN_S`` 0 puts that back)."""
    from sidecar_io import moto_bucket

    from keeper_core import handback, storage

    rows = []
    with moto_bucket(work) as bucket:
        src = upload(uris, root, f"{bucket}/photos")
        dest = f"{bucket}/keepers"

        def export() -> Any:
            return export_keepers(
                src, input_root=f"{bucket}/photos", dest=dest, mode="copy", io_threads=16
            )

        if export().exported != len(src):
            raise SystemExit("the first export from S3 to S3 failed")
        real, seen_s = handback._export_s3, storage._BUCKET_SEEN_S
        try:
            for name, fn in (("former", former_export_s3), ("keeper", real)):
                handback._export_s3 = fn  # type: ignore[assignment]
                storage._BUCKET_SEEN_S = 0.0 if name == "former" else seen_s
                with measured_s3(args.latency_ms) as (first, _):
                    t0 = time.perf_counter()
                    res = export_keepers(
                        src,
                        input_root=f"{bucket}/photos",
                        dest=f"{bucket}/first-{name}",
                        mode="copy",
                        io_threads=16,
                    )
                    first_s = time.perf_counter() - t0
                if res.exported != len(src):
                    raise SystemExit(f"{name}: the first export failed: {res}")
                export()  # untimed: the record as this export leaves it (the former drops ETags)
                times = []
                for _ in range(args.repeats):
                    with measured_s3(args.latency_ms) as (calls, got):
                        t0 = time.perf_counter()
                        res = export()
                        times.append(time.perf_counter() - t0)
                    if res.already_there != len(src) or res.failed:
                        raise SystemExit(f"{name}: the re-run found changes: {res}")
                rows.append(
                    {
                        "export": name,
                        **measured_row(len(src), args.latency_ms, times, calls, got),
                        "first_seconds": first_s,
                        "first_requests": dict(sorted(first.items())),
                        "first_requests_total": sum(first.values()),
                    }
                )
        finally:
            handback._export_s3 = real  # type: ignore[assignment]
            storage._BUCKET_SEEN_S = seen_s
    return rows


@contextlib.contextmanager
def measured_s3(latency_ms: float) -> Iterator[tuple[Any, list[int]]]:
    """Inside the block, ``latency_ms`` slept before each S3 request keeper's client sends; yields
    the requests by operation and ``[bytes downloaded]``, filled in as the block runs."""
    from sidecar_s3_requests import counted_s3_calls

    from keeper_core import storage

    got = [0]

    def after(http_response: Any, model: Any, **_: Any) -> None:
        if model.name == "GetObject":
            got[0] += int(http_response.headers.get("content-length", 0))

    def wait(**_: Any) -> None:
        time.sleep(latency_ms / 1000)

    events = storage.s3_client().meta.events
    events.register("after-call.s3", after, unique_id="bench-bytes")
    events.register("before-send.s3", wait, unique_id="bench-wait")
    try:
        with counted_s3_calls() as calls:
            yield calls, got
    finally:
        events.unregister("after-call.s3", unique_id="bench-bytes")
        events.unregister("before-send.s3", unique_id="bench-wait")


def measured_row(
    files: int, latency_ms: float, times: list[float], calls: Any, got: list[int]
) -> dict[str, Any]:
    """The columns every S3 table row has: its best time, and the last repeat's requests and
    bytes downloaded (``measured_s3``'s)."""
    return {
        "files": files,
        "latency_ms": latency_ms,
        "seconds": min(times),
        "requests": dict(sorted(calls.items())),
        "requests_total": sum(calls.values()),
        "downloaded_bytes": got[0],
    }


def s3_unpick_rows(uris: list[str], root: Path, work: Path, args: Any) -> list[dict[str, Any]]:
    """Copies in a moto bucket taken back (``remove_keepers_export``), each variant on a fresh
    export: the former (no ETags in the record, one thread), ETags on one thread, today's."""
    from sidecar_io import moto_bucket

    from keeper_core import storage
    from keeper_core.handback import EXPORT_RECORD, remove_keepers_export

    rows = []
    with moto_bucket(work) as bucket:
        src = upload(uris, root, f"{bucket}/photos")
        dest = f"{bucket}/keepers"
        variants = (("former", False, 1), ("ETags, 1 thread", True, 1), ("keeper", True, 16))
        for name, etags, threads in variants:
            times = []
            for _ in range(args.repeats):
                res = export_keepers(
                    src, input_root=f"{bucket}/photos", dest=dest, mode="copy", io_threads=16
                )
                if res.exported != len(src):
                    raise SystemExit(f"{name}: the export before taking back failed: {res}")
                if not etags:  # the record keeper wrote before it kept ETags
                    uri = storage.join(dest, EXPORT_RECORD)
                    doc = json.loads(storage.read_bytes(uri))
                    del doc["etags"]
                    storage.write_bytes(uri, json.dumps(doc).encode())
                with measured_s3(args.latency_ms) as (calls, got):
                    t0 = time.perf_counter()
                    done = remove_keepers_export(
                        dest, src, input_root=f"{bucket}/photos", io_threads=threads
                    )
                    times.append(time.perf_counter() - t0)
                if done.removed != len(src) or done.left or storage.list_files(dest):
                    raise SystemExit(f"{name}: not every copy was taken back: {done}")
            rows.append(
                {
                    "unpick": name,
                    "io_threads": threads,
                    **measured_row(len(src), args.latency_ms, times, calls, got),
                }
            )
    return rows


def print_requests(rows: list[dict[str, Any]], name: str, prefix: str = "") -> None:
    """A table of S3 rows: ``name`` (the row's label), requests, MB downloaded, seconds, and the
    requests by operation; ``prefix`` picks other columns of the same rows (``first_``)."""
    width = max(8, *(len(r[name]) for r in rows))
    print(f"{name:<{width}} {'requests':>9} {'downloaded MB':>14} {'seconds':>8}  by operation")
    for r in rows:
        got = r.get(f"{prefix}downloaded_bytes")
        mb = "" if got is None else f"{got / 1e6:.1f}"
        print(
            f"{r[name]:<{width}} {r[prefix + 'requests_total']:>9} {mb:>14} "
            f"{r[prefix + 'seconds']:>8.2f}  {r[prefix + 'requests']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--mib", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--s3-threads", type=int, default=0, help="also S3 -> local, 1 against N")
    ap.add_argument("--s3-rerun", action="store_true", help="also an S3 -> S3 re-run, A/B")
    ap.add_argument("--s3-unpick", action="store_true", help="also taking S3 copies back, A/B")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="simulated, the S3 tables")
    ap.add_argument("--out", default="benchmarks/results/export-keepers.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="keeper-export-keepers-", dir=args.work_dir)).resolve()
    try:
        root = work / "photos"
        root.mkdir()
        size = int(args.mib * (1 << 20))
        uris = []
        for i in range(args.n):
            path = root / f"day{i % 3}" / f"IMG_{i:04d}.JPG"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(os.urandom(size))
            uris.append(str(path))

        def fresh(dest: Path) -> Callable[[], None]:
            return lambda: shutil.rmtree(dest, ignore_errors=True)

        def change_originals() -> None:
            for u in uris:
                with open(u, "r+b") as f:  # a new XMP packet: some bytes near the start
                    f.seek(1024)
                    f.write(os.urandom(512))

        rows: list[dict[str, Any]] = []
        for step in ("first copy", "re-run", "originals changed"):
            cells = {}
            for name, fn in (("plain", plain_copy), ("keeper", keeper_copy)):
                dest = work / name

                def run(fn: Callable[..., None] = fn, dest: Path = dest) -> None:
                    fn(uris, root, dest)

                if step == "first copy":
                    prepare = fresh(dest)
                elif step == "re-run":
                    prepare = nothing  # the first copy's last repeat left everything there
                else:
                    prepare = change_originals
                cells[name] = best(run, prepare, args.repeats)
            rows.append(
                {
                    "step": step,
                    "plain_s": cells["plain"],
                    "keeper_s": cells["keeper"],
                    "keeper_over_plain": cells["keeper"] / cells["plain"],
                }
            )

        print(f"{'step':<18} {'plain copy2 s':>14} {'keeper s':>10} {'keeper / plain':>15}")
        for r in rows:
            print(
                f"{r['step']:<18} {r['plain_s']:>14.3f} {r['keeper_s']:>10.3f} "
                f"{r['keeper_over_plain']:>15.2f}"
            )
        record: dict[str, Any] = {
            "n": args.n,
            "mib": args.mib,
            "repeats": args.repeats,
            "work_dir": str(work.parent),
            "machine": machine_info(),
            "rows": rows,
        }
        if args.s3_threads > 1:
            record["s3_threads"] = s3_rows(uris, root, work, args)
            print(
                f"\nfrom S3 (moto_server) to a local folder, io_threads 1 against {args.s3_threads}"
            )
            print(
                f"{'simulated latency':<18} {'1 thread s':>11} {'N threads s':>12} {'speed-up':>9}"
            )
            for r in record["s3_threads"]:
                print(
                    f"{r['latency_ms']:>15.0f} ms {r['one_s']:>11.3f} {r['threads_s']:>12.3f} "
                    f"{r['speedup']:>8.1f}x"
                )
        if args.s3_rerun:
            record["s3_rerun"] = s3_rerun_rows(uris, root, work, args)
            print(f"\nre-run from S3 to S3 (moto_server), {args.latency_ms:.0f} ms a request")
            print_requests(record["s3_rerun"], "export")
            print("the first export into an empty prefix")
            print_requests(record["s3_rerun"], "export", prefix="first_")
        if args.s3_unpick:
            record["s3_unpick"] = s3_unpick_rows(uris, root, work, args)
            print(f"\ntaking S3 copies back (moto_server), {args.latency_ms:.0f} ms a request")
            print_requests(record["s3_unpick"], "unpick")
        write_record(args.out, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
