"""What ``keeper pick --copy-keepers`` costs against a plain copy of the same files.

    .venv/bin/python benchmarks/export_keepers.py [--n 100] [--mib 8] [--repeats 3] \
        [--work-dir DIR] [--out benchmarks/results/export-keepers.json]

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
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--mib", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where the files go (default: a temp dir)")
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
        record = {
            "n": args.n,
            "mib": args.mib,
            "repeats": args.repeats,
            "work_dir": str(work.parent),
            "machine": machine_info(),
            "rows": rows,
        }
        write_record(args.out, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
