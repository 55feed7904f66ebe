"""What ``keeper unpick`` costs against the ``keeper pick`` write it undoes, on the same files.

    .venv/bin/python benchmarks/unpick.py [--jpegs 40] [--megapixels 24] [--sidecars 2000] \
        [--merged-every 4] [--threads 1,16] [--repeats 2] [--work-dir DIR] \
        [--out benchmarks/results/unpick.json]

Two libraries, each written by pick's own ``write_sidecars`` and then undone by the job itself
(``keeper_train.jobs.unpick.run`` on a run folder holding the picks and summary pick would
leave), side by side in this one process, each repeat on a fresh copy:

- **embed**: ``--jpegs`` camera-sized JPEGs (``xmp_embed.camera_jpeg``: a real photo at
  ``--megapixels`` with sensor noise and camera EXIF) written with ``--xmp embed``; unpick
  removes each JPEG's XMP segment again (the whole file read, spliced, written to a temporary
  file, fsynced, read back, walked and parsed before the rename, as the write does);
- **beside**: ``--sidecars`` RAW names (never opened) with sidecars beside them, every
  ``--merged-every``-th one a Lightroom sidecar there before the run (keywords, develop settings),
  which pick merges into and unpick rewrites without keeper's fields (exiv2's parse and write);
  the others keeper's own, which unpick deletes.

Then unpick again, which finds nothing of keeper's (every file read, none written). Checked, or
the script exits 1: every JPEG is back to its bytes before the write, every merged sidecar holds
its fields as before, no keeper sidecar is left, and the counts add up. The ratio column is
unpick / the write, in the same row's threads. The page cache is warm.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed, sidecar_io, xmp_embed

from embed import machine_info, write_record
from sidecar_io import picks_frame, threads_as_given
from xmp_embed import camera_jpeg

from keeper_core.handback import parse_xmp_packet, read_sidecar
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs import pick
from keeper_train.jobs.unpick import UnpickConfig, UnpickSummary, run

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "tests")
)  # the tests' Lightroom packet
from support_jpeg import lightroom_packet


def run_folder(out: Path, photos: Path, picks: pd.DataFrame, mode: str) -> None:
    """What pick leaves in OUTPUT that unpick reads: picks.parquet and _SUMMARY.json."""
    out.mkdir(parents=True, exist_ok=True)
    frame = picks.assign(score=0.0, **dict.fromkeys(FEATURE_NAMES, 0.5))
    frame.to_parquet(out / "picks.parquet")
    summary = {"status": "ok", "input": str(photos), "output": str(out), "table": "", "xmp": mode}
    (out / "_SUMMARY.json").write_text(json.dumps({**summary, "xmp_naming": "basename"}))


def one(src: Path, names: list[str], work: Path, mode: str, threads: int) -> dict[str, Any]:
    """Write, unpick, unpick again on a fresh copy of ``src`` (photos ``names``); seconds and
    the checks."""
    photos = work / "photos"
    shutil.copytree(src, photos)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    picks = picks_frame([str(photos / n) for n in names])
    out = work / "out"
    cfg = pick.PickJobConfig(input=str(photos), output=str(out), xmp=mode, io_threads=threads)
    run_folder(out, photos, picks, mode)
    with threads_as_given():  # keeper itself gives a local disk without fsync one thread
        t0 = time.perf_counter()
        wrote = pick.write_sidecars(cfg, picks, str(photos))
        t1 = time.perf_counter()
        undone = run(UnpickConfig(run=str(out), io_threads=threads))
        t2 = time.perf_counter()
        again = run(UnpickConfig(run=str(out), io_threads=threads))
        t3 = time.perf_counter()
    problems = check(photos, before, wrote, undone, again)
    shutil.rmtree(work)
    return {
        "write_s": t1 - t0,
        "unpick_s": t2 - t1,
        "unpick_again_s": t3 - t2,
        "photos": len(picks),
        "files": undone.files,
        "cleaned": undone.cleaned,
        "deleted": undone.deleted,
        "problems": problems,
    }


def check(
    photos: Path,
    before: dict[str, bytes],
    wrote: pick.Sidecars,
    undone: UnpickSummary,
    again: UnpickSummary,
) -> list[str]:
    problems = []
    if wrote.failed or undone.failed or again.failed:
        problems.append("failures")
    for s in (undone, again):
        if s.files != s.cleaned + s.deleted + s.untouched + s.absent + len(s.failed):
            problems.append("counts do not add up")
    if again.cleaned or again.deleted:
        problems.append("the second unpick changed files")
    now = {p.name: p for p in photos.iterdir()}
    if set(now) != set(before):
        problems.append(f"files differ: {sorted(set(now) ^ set(before))[:5]}")
    for name, data in before.items():
        if name.endswith(".JPG") and now[name].read_bytes() != data:
            problems.append(f"{name} is not the file it was")
        elif name.endswith(".xmp") and read_sidecar(str(now[name])) != parse_xmp_packet(data, name):
            problems.append(f"{name} does not hold its fields as before")
    return problems[:10]


def library(work: Path, args: argparse.Namespace) -> dict[str, tuple[Path, list[str]]]:
    """Each mode's source folder and photo names: JPEGs (embed), and RAW names, never written,
    with some Lightroom sidecars (beside)."""
    jpegs = work / "jpegs" / "src"
    jpegs.mkdir(parents=True)
    jpeg_names = [f"IMG_{i:04d}.JPG" for i in range(args.jpegs)]
    for i, name in enumerate(jpeg_names):
        (jpegs / name).write_bytes(camera_jpeg(i, args.megapixels, args.quality))
    raws = work / "raws" / "src"
    raws.mkdir(parents=True)
    raw_names = [f"IMG_{i:06d}.CR2" for i in range(args.sidecars)]
    for i, name in enumerate(raw_names):
        if i % args.merged_every == 0:
            (raws / name.replace(".CR2", ".xmp")).write_bytes(lightroom_packet())
    return {"embed": (jpegs, jpeg_names), "beside": (raws, raw_names)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jpegs", type=int, default=40)
    ap.add_argument("--megapixels", type=float, default=24.0)
    ap.add_argument("--quality", type=int, default=92)
    ap.add_argument("--sidecars", type=int, default=2000)
    ap.add_argument("--merged-every", type=int, default=4)
    ap.add_argument("--threads", default="1,16", help="io_threads values, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/unpick.json")
    ap.add_argument("--work-dir", help="where the files go (default: the temporary folder)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    # The run folders here have no embedding table to restamp (a pick run has one): that
    # step's warning is not this benchmark's business.
    logging.getLogger("keeper.unpick").setLevel(logging.ERROR)

    rows, problems = [], []
    with tempfile.TemporaryDirectory(prefix="keeper-unpick-", dir=args.work_dir) as tmp:
        srcs = library(Path(tmp), args)
        for t in threads:
            for mode, (src, names) in srcs.items():
                runs = [
                    one(src, names, src.parent / f"run-{t}-{r}", mode, t)
                    for r in range(args.repeats)
                ]
                for r in runs:
                    problems += [f"{mode}, {t} threads: {p}" for p in r["problems"]]
                best = {
                    k: min(r[k] for r in runs) for k in ("write_s", "unpick_s", "unpick_again_s")
                }
                n = runs[0]["photos"]
                rows.append(
                    {
                        "mode": mode,
                        "threads": t,
                        "photos": n,
                        "files": runs[0]["files"],
                        "cleaned": runs[0]["cleaned"],
                        "deleted": runs[0]["deleted"],
                        **best,
                        "write_ms_per_photo": 1e3 * best["write_s"] / n,
                        "unpick_ms_per_photo": 1e3 * best["unpick_s"] / n,
                        "unpick_again_ms_per_photo": 1e3 * best["unpick_again_s"] / n,
                        "unpick_over_write": best["unpick_s"] / best["write_s"],
                    }
                )

    print(
        f"embed: {args.jpegs} JPEGs of {args.megapixels:g} MP; beside: {args.sidecars} sidecars, "
        f"every {args.merged_every}th merged into a Lightroom one; best of {args.repeats}"
    )
    print(
        f"{'mode':<7} {'threads':>7} {'photos':>6} {'write ms/photo':>15} "
        f"{'unpick ms/photo':>16} {'again ms/photo':>15} {'unpick / write':>15}"
    )
    for r in rows:
        print(
            f"{r['mode']:<7} {r['threads']:>7} {r['photos']:>6} {r['write_ms_per_photo']:>15.2f} "
            f"{r['unpick_ms_per_photo']:>16.2f} {r['unpick_again_ms_per_photo']:>15.2f} "
            f"{r['unpick_over_write']:>15.2f}"
        )
    for p in problems:
        print(f"MISMATCH {p}")
    record = {
        "benchmark": "unpick",
        "command": " ".join(["benchmarks/unpick.py", *(argv or sys.argv[1:])]),
        "args": vars(args),
        "rows": rows,
        "problems": problems,
        "machine": machine_info(),
    }
    write_record(args.out, record)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
