"""S3 requests and seconds of writing sidecars into an ``s3://`` mirror and reading them back:
one GET where a sidecar may be there (``storage.read_if_exists``) against ``exists`` then
``read_bytes``.

    .venv/bin/python benchmarks/sidecar_s3_requests.py [--n 1000] [--threads 16] [--rounds 2] \
        [--out benchmarks/results/sidecar-s3-requests.json]

``keeper pick --output s3://...`` writes one sidecar per photo into the mirror with
``handback.write_sidecar``, which reads a sidecar already there to merge into it. The "before"
side is the same function with ``storage.read_if_exists`` replaced, in this process, by what
``write_sidecar`` did until 2026-12-07 (``read_bytes(uri) if exists(uri) else None``: on a key
that is not there, ``exists`` asked HEAD object, HEAD bucket and a one-key listing; the HEAD of
a bucket seen in the last minute is skipped since, which this side undoes). Against a
``moto_server`` on loopback (this interpreter's, as tests/conftest.py starts it), ``--threads``
threads as ``keeper pick`` runs them, alternated rounds, each writing ``--n`` new sidecars into an
empty prefix and then the same choice again (a re-run), then reading them back as ``keeper
feedback-from-xmp`` does (``xmp_feedback.read_sidecars``, which read a sidecar the same two ways
before and after 2026-12-07). S3 calls are counted by botocore's ``before-call`` event; seconds
are wall time (moto shares this machine's cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed, sidecar_io

from embed import machine_info, write_record
from sidecar_io import moto_bucket

from keeper_core import storage
from keeper_core.handback import plan_sidecars, write_sidecar
from keeper_train.jobs import xmp_feedback

FIELDS = {"group": "g000123", "rank": "1", "decision": "keep", "reasons": "sharpest of 4"}


def exists_then_read(uri: str) -> bytes | None:
    """What write_sidecar read a sidecar with before read_if_exists."""
    return storage.read_bytes(uri) if storage.exists(uri) else None


@contextmanager
def counted_s3_calls() -> Iterator[Counter[str]]:
    """The S3 API calls keeper's client makes inside the block, by operation name (botocore's
    ``before-call`` event)."""
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    client = storage.s3_client()
    client.meta.events.register("before-call.s3", count)
    try:
        yield calls
    finally:
        client.meta.events.unregister("before-call.s3", count)


def _relative(i: int) -> str:
    return f"day{i // 250:02d}/IMG_{i:06d}"


def write_all(prefix: str, n: int, threads: int) -> tuple[float, Counter[str]]:
    uris = [f"{prefix}/{_relative(i)}.xmp" for i in range(n)]
    with counted_s3_calls() as calls:
        t0 = time.perf_counter()
        for _ in storage.map_in_threads(
            lambda u: write_sidecar(
                u, rating=5, label="Green", keeper_fields=FIELDS, durable=False
            ),
            uris,
            threads,
        ):
            pass
        return time.perf_counter() - t0, calls


def read_all(prefix: str, n: int, threads: int) -> tuple[float, Counter[str]]:
    """The sidecars ``write_all`` wrote, read back by feedback-from-xmp's own reader (its run
    built here from the plans ``xmp_feedback.plan`` makes for a mirror at ``prefix``)."""
    photos = [f"{prefix}-photos/{_relative(i)}.CR2" for i in range(n)]
    plans = plan_sidecars(photos, input_root=f"{prefix}-photos", mode="mirror", out_dir=prefix)
    row_of = {u: i for i, u in enumerate(photos)}
    run = xmp_feedback.PickRun("bench", {}, {}, row_of, plans, "mirror", "basename")
    with counted_s3_calls() as calls:
        t0 = time.perf_counter()
        got = xmp_feedback.read_sidecars(run, io_threads=threads)
        seconds = time.perf_counter() - t0
    if (got.read, got.missing, got.unreadable) != (n, 0, []):
        raise SystemExit(f"read back {got.read} of {n} sidecars")
    return seconds, calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/sidecar-s3-requests.json")
    args = ap.parse_args(argv)

    real: Callable[[str], bytes | None] = storage.read_if_exists
    seen_s = storage._BUCKET_SEEN_S
    sides = {"before: exists, then read": exists_then_read, "read_if_exists": real}
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="keeper-sidecar-s3-") as tmp,
        moto_bucket(Path(tmp)) as bucket,
    ):
        storage.exists(f"{bucket}/warm-up")  # the client and a connection, made untimed
        for r in range(args.rounds):
            for name, read in sides.items():
                storage.read_if_exists = read  # type: ignore[assignment]
                storage._BUCKET_SEEN_S = 0.0 if read is exists_then_read else seen_s
                try:
                    prefix = f"{bucket}/r{r}-{len(rows)}"
                    new_s, new_calls = write_all(prefix, args.n, args.threads)
                    rerun_s, rerun_calls = write_all(prefix, args.n, args.threads)
                    read_s, read_calls = read_all(prefix, args.n, args.threads)
                finally:
                    storage.read_if_exists = real  # type: ignore[assignment]
                    storage._BUCKET_SEEN_S = seen_s
                rows.append(
                    {
                        "round": r,
                        "side": name,
                        "new_s": new_s,
                        "new_calls": dict(new_calls),
                        "new_requests_per_sidecar": sum(new_calls.values()) / args.n,
                        "rerun_s": rerun_s,
                        "rerun_calls": dict(rerun_calls),
                        "rerun_requests_per_sidecar": sum(rerun_calls.values()) / args.n,
                        "read_s": read_s,
                        "read_calls": dict(read_calls),
                        "read_requests_per_sidecar": sum(read_calls.values()) / args.n,
                    }
                )
    print(f"{args.n} sidecars into an s3:// mirror on moto_server, {args.threads} threads")
    print(
        f"{'side':<28} {'new s':>7} {'req/new':>8} {'re-run s':>9} {'req/re-run':>11} "
        f"{'read s':>7} {'req/read':>9}"
    )
    for row in rows:
        print(
            f"{row['side']:<28} {row['new_s']:>7.2f} {row['new_requests_per_sidecar']:>8.2f} "
            f"{row['rerun_s']:>9.2f} {row['rerun_requests_per_sidecar']:>11.2f} "
            f"{row['read_s']:>7.2f} {row['read_requests_per_sidecar']:>9.2f}"
        )
    record = {
        "benchmark": "sidecar_s3_requests",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "n": args.n,
        "threads": args.threads,
        "rounds": args.rounds,
        "rows": rows,
        "machine": machine_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
