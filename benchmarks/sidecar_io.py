"""XMP sidecars written and read back one at a time and on 16 threads: local disk and S3.

    .venv/bin/python benchmarks/sidecar_io.py [--n 2000] [--threads 16] [--latency-ms 20] \
        [--stores local,s3] [--rounds 1] [--out benchmarks/results/sidecar-io.json]

``keeper pick`` writes one sidecar per photo (``jobs.pick.write_sidecars``: an existence check, a
read of one already there, a write) and ``keeper feedback-from-xmp`` reads them back
(``jobs.xmp_feedback.read_sidecars``: an existence check and a read). Both are the real functions
here, with ``io_threads=1`` (one at a time) beside ``--threads``, in this one process (the
threads as given on every store: keeper itself gives a local disk one, ``storage.io_threads_for``):

- ``write_sidecars`` on a minimal picks frame (the columns it reads) into a mirror
  (``OUTPUT/xmp``), every sidecar new;
- ``read_sidecars`` on the run ``xmp_feedback.plan`` would make of it (its ``PickRun`` built here
  from the same plans: no ``picks.parquet`` or embedding table is needed to read sidecars).

The photos are ``IMG_NNNNNN.CR2`` (never opened: a RAW's rating is read from its sidecar alone);
every 50th (``--pair-every``) also has a ``.JPG`` sharing its sidecar (a RAW+JPEG pair: one
plan), and every 250th (``--bad-every``) sidecar is there before the write and is not XMP (a
failure, recorded, left alone). Four stores:

- **local**: a temporary folder;
- **local + simulated latency**: the same with ``--latency-ms`` of sleep added before each call
  of the storage functions the code calls (``exists``, ``read_bytes``, ``read_if_exists``, ``write_bytes``,
  ``read_head``, ``read_range``): a network file system's stand-in, and the threads' gain where
  the store is not the limit (moto_server below is: it takes a CPU of its own);
- **s3 (moto)**: a ``moto_server`` on loopback (this interpreter's ``python -m moto.server``,
  as tests/conftest.py starts it; stopped at the end): real HTTP requests, on moto's CPU;
- **s3 (moto) + simulated latency**: the same, with the same sleep: what a real bucket's tens of
  ms per request would cost. The sleep is simulated; S3's own throughput limits are not, and
  moto_server's (on the same cores) cap the threaded runs.

Each store's threaded run writes to a prefix of its own; the script checks that it wrote the same
files (byte for byte, by path under the prefix) and returned the same counts, failures (in order)
and ratings read as the run one at a time, records ``identical`` per row, and exits 1 (printing
MISMATCH) where not.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed.machine_info

from keeper_core import storage
from keeper_core.handback import plan_sidecars
from keeper_train.jobs import pick, xmp_feedback

NOT_XMP = b"\x00\x01 not an XMP sidecar"
PATCHED = (
    "exists",
    "object_info_if_exists",
    "read_bytes",
    "read_if_exists",
    "write_bytes",
    "read_head",
    "read_range",
)


def photos(n: int, input_root: str, pair_every: int) -> pd.DataFrame:
    """A picks frame of ``n`` RAWs (every ``pair_every``-th with its JPEG), the columns
    write_sidecars reads."""
    uris: list[str] = []
    for i in range(n):
        uris.append(storage.join(input_root, f"day{i // 500:02d}", f"IMG_{i:06d}.CR2"))
        if i % pair_every == 0:
            uris.append(uris[-1][: -len(".CR2")] + ".JPG")
    return picks_frame(uris)


def picks_frame(uris: list[str]) -> pd.DataFrame:
    """The columns ``write_sidecars`` reads for ``uris``: groups of four, a keeper, two
    alternates, a reject."""
    k = len(uris)
    return pd.DataFrame(
        {
            "image_uri": uris,
            "group_id": [f"g{i // 4:06d}" for i in range(k)],
            "rank": [i % 4 + 1 for i in range(k)],
            "decision": [("keep", "alternate", "alternate", "reject")[i % 4] for i in range(k)],
            "rating": [(5, 3, 3, 1)[i % 4] for i in range(k)],
            "label": [("Green", None, None, "Red")[i % 4] for i in range(k)],
            "reasons": [["sharpest of the burst", f"score {i / k:.3f}"] for i in range(k)],
            "image_id": [hashlib.sha256(u.rpartition("/")[2].encode()).hexdigest() for u in uris],
        }
    )


def one_run(n: int, base: str, threads: int, latency_s: float, args: Any) -> dict[str, Any]:
    """Write the sidecars of ``n`` photos under ``base`` and read them back; seconds and results
    (URIs relative to ``base``, so two runs compare). Only the two timed steps see the latency."""
    input_root, output = storage.join(base, "photos"), storage.join(base, "out")
    picks = photos(n, input_root, args.pair_every)
    uris = picks["image_uri"].astype(str).tolist()
    cfg = pick.PickJobConfig(input=input_root, output=output, xmp="mirror", io_threads=threads)
    plans = plan_sidecars(
        uris, input_root=input_root, mode="mirror", out_dir=storage.join(output, "xmp")
    )
    for i, p in enumerate(plans):
        if i % args.bad_every == args.bad_every - 1:
            storage.write_bytes(p.sidecar_uri, NOT_XMP, durable=False)
    row_of = {u: i for i, u in enumerate(uris)}
    run = xmp_feedback.PickRun("bench", {}, {}, row_of, plans, "mirror", "basename")
    with simulated_latency(latency_s), threads_as_given():
        t0 = time.perf_counter()
        done = pick.write_sidecars(cfg, picks, input_root)
        t1 = time.perf_counter()
        got = xmp_feedback.read_sidecars(run, io_threads=threads)
        t2 = time.perf_counter()

    def rel(text: str) -> str:
        return text.replace(base, "BASE")

    return {
        "seconds": {"write": t1 - t0, "read": t2 - t1},
        "write": {
            **done.counts(),
            "failed": [(rel(f.sidecar_uri), rel(f.reason)) for f in done.failed],
        },
        "read": {
            "read": got.read,
            "missing": got.missing,
            "ratings": [(s.row, s.rating, s.persons, s.value) for s in got.sidecars],
            "unreadable": [(rel(p.sidecar_uri), rel(p.reason)) for p in got.unreadable],
        },
        "files": {rel(p.sidecar_uri): storage.read_bytes(p.sidecar_uri).hex() for p in plans},
    }


@contextmanager
def simulated_latency(seconds: float) -> Iterator[None]:
    """Sleep ``seconds`` before each call of the storage functions sidecars use (the sleep lets
    go of the GIL, as a request's wait does)."""
    if not seconds:
        yield
        return
    originals = {name: getattr(storage, name) for name in PATCHED}

    def slow(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return fn(*args, **kwargs)

        return call

    for name, fn in originals.items():
        setattr(storage, name, slow(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(storage, name, fn)


@contextmanager
def threads_as_given() -> Iterator[None]:
    """``io_threads`` threads whatever the store: ``storage.io_threads_for`` gives a local folder
    one, and the rows here compare one thread with many on every store."""
    real = storage.io_threads_for
    storage.io_threads_for = lambda uris, threads, **_: threads  # type: ignore[assignment]
    try:
        yield
    finally:
        storage.io_threads_for = real  # type: ignore[assignment]


@contextmanager
def moto_bucket(log_dir: Path) -> Iterator[str]:
    """A moto_server on a free loopback port (this interpreter's), the AWS_* environment
    pointing at it, and a new bucket; yields ``s3://bucket``. The server is stopped after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = (log_dir / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        os.environ.pop("AWS_PROFILE", None)
        bucket = f"keeper-bench-{uuid.uuid4().hex[:8]}"
        storage.s3_client().create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


def compare(store: str, latency_ms: float, base: str, args: Any) -> list[dict[str, Any]]:
    """One store: the same photos one at a time and on ``--threads``; a row per step."""
    seq = one_run(args.n, storage.join(base, "seq"), 1, latency_ms / 1000, args)
    thr = one_run(args.n, storage.join(base, "threads"), args.threads, latency_ms / 1000, args)
    same_files = seq["files"] == thr["files"]
    rows = []
    for step in ("write", "read"):
        s, t = seq["seconds"][step], thr["seconds"][step]
        rows.append(
            {
                "store": store,
                "simulated_latency_ms": latency_ms,
                "step": step,
                "sidecars": len(seq["files"]),
                "sequential_s": round(s, 3),
                "threaded_s": round(t, 3),
                "speedup": round(s / t, 2),
                # the same counts, failures (in order) and ratings read, and the same files
                "identical": seq[step] == thr[step] and same_files,
                "results": seq["write"] if step == "write" else _short(seq["read"]),
            }
        )
    return rows


def _short(read: dict[str, Any]) -> dict[str, Any]:
    return {
        "read": read["read"],
        "missing": read["missing"],
        "ratings": len(read["ratings"]),
        "unreadable": len(read["unreadable"]),
    }


def machine() -> dict[str, Any]:
    """``embed.machine_info`` (as every benchmark here), with the versions this one depends on."""
    from embed import machine_info

    info = machine_info()
    info["versions"].update({p: version(p) for p in ("boto3", "moto", "pyexiv2")})
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="sidecars (RAWs; a few with a JPEG)")
    ap.add_argument("--threads", type=int, default=16, help="io_threads of the threaded runs")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="simulated per request")
    ap.add_argument("--pair-every", type=int, default=50, help="every Nth RAW has a JPEG too")
    ap.add_argument("--bad-every", type=int, default=250, help="every Nth sidecar is not XMP")
    ap.add_argument(
        "--stores", default="local,s3", help="comma-separated: local (a folder), s3 (moto_server)"
    )
    ap.add_argument("--rounds", type=int, default=1, help="each store's comparison, repeated")
    ap.add_argument("--out", default="benchmarks/results/sidecar-io.json")
    args = ap.parse_args(argv)
    stores = set(args.stores.split(","))
    if not stores or stores - {"local", "s3"}:
        ap.error(f"--stores: local and/or s3, got {args.stores!r}")
    logging.getLogger("keeper.pick").setLevel(logging.ERROR)  # the not-XMP sidecars, once each

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="keeper-sidecar-io-") as tmp:
        for r in range(args.rounds):
            if "local" in stores:
                rows += compare("local", 0.0, str(Path(tmp) / f"local{r}"), args)
                rows += compare(
                    "local + simulated latency",
                    args.latency_ms,
                    str(Path(tmp) / f"latency{r}"),
                    args,
                )
            if "s3" in stores:
                with moto_bucket(Path(tmp)) as bucket:
                    storage.exists(f"{bucket}/warm-up")  # the client and a connection, untimed
                    rows += compare("s3 (moto)", 0.0, f"{bucket}/plain", args)
                    rows += compare(
                        "s3 (moto) + simulated latency", args.latency_ms, f"{bucket}/latency", args
                    )

    print(f"{args.n} sidecars, io_threads 1 against {args.threads} (seconds)")
    print(f"{'store':<32} {'step':<6} {'1 thread':>9} {args.threads:>5} thr {'ratio':>6}  same")
    for r in rows:
        print(
            f"{r['store']:<32} {r['step']:<6} {r['sequential_s']:>9.2f} {r['threaded_s']:>9.2f} "
            f"{r['speedup']:>5.1f}x  {'yes' if r['identical'] else 'NO'}"
        )
    identical = all(r["identical"] for r in rows)
    record = {
        "benchmark": "sidecar_io",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        "n": args.n,
        "threads": args.threads,
        "latency_ms": args.latency_ms,
        "pair_every": args.pair_every,
        "bad_every": args.bad_every,
        "identical": identical,
        "rows": rows,
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from embed import write_record  # as machine() does, imported here

    write_record(args.out, record)
    if not identical:
        print("MISMATCH: threaded and one-at-a-time runs differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
