"""What ``keeper pick --xmp embed`` costs against sidecars beside the same photos.

    .venv/bin/python benchmarks/xmp_embed.py [--n 40] [--megapixels 24] [--quality 92] \
        [--threads 1,16] [--work-dir DIR] [--out benchmarks/results/xmp-embed.json]

``xmp=beside`` writes a small ``.xmp`` file next to each photo; ``xmp=embed`` rewrites each JPEG
original with keeper's packet inside it (``keeper_core.jpeg_xmp``: the whole file read, spliced,
written to a temporary file, fsynced, read back and walked, parsed by exiv2, renamed over the
original). Both run here through pick's own ``write_sidecars`` on the same generated JPEGs (a
real photo scaled to ``--megapixels`` with sensor-like noise, so the files are camera-sized, and
camera EXIF), each mode on its own copy of the folder, side by side in this one process:

- **first write**: every photo new to keeper (no sidecar, no keeper packet in the JPEG);
- **re-run**: the same picks again, where keeper finds its own values and writes nothing (a JPEG
  is still read whole and walked to see that).

Each cell is the best of ``--repeats`` (the folder restored between repeats). The ratio column is
embed / beside in the same row's threads. The page cache is warm (the files were just written):
on a cold disk reading the originals adds the disk's read time to embed's rows.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed, sidecar_io

from embed import machine_info, write_record
from sidecar_io import picks_frame, threads_as_given

from keeper_core.synthetic import load_photos
from keeper_train.jobs import pick


def camera_jpeg(seed: int, megapixels: float, quality: int) -> bytes:
    """A camera-sized JPEG: a real photo scaled to ``megapixels`` (3:2) with per-pixel noise,
    and the EXIF a camera writes (make, model, capture time)."""
    w = round((megapixels * 1e6 * 1.5) ** 0.5)
    h = round(w / 1.5)
    base = load_photos(["astronaut"])["astronaut"].convert("RGB").resize((w, h))
    rng = np.random.default_rng(seed)
    noisy = np.asarray(base, np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS R6"
    exif[0x0132] = f"2024:05:01 10:00:{seed % 60:02d}"
    buf = io.BytesIO()
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


def timed_write(folder: Path, mode: str, threads: int) -> tuple[float, pick.Sidecars]:
    uris = sorted(str(p) for p in folder.glob("*.JPG"))
    cfg = pick.PickJobConfig(
        input=str(folder), output=str(folder.parent / "out"), xmp=mode, io_threads=threads
    )
    picks = picks_frame(uris)
    with threads_as_given():  # keeper itself would give a local disk one thread
        t0 = time.perf_counter()
        done = pick.write_sidecars(cfg, picks, str(folder))
        return time.perf_counter() - t0, done


def measure(src: Path, work: Path, mode: str, threads: int, repeats: int) -> dict[str, Any]:
    """Best-of-``repeats`` seconds of the first write and of the re-run, each repeat on a fresh
    copy of ``src``."""
    first, again = [], []
    for r in range(repeats):
        folder = work / f"{mode}-{threads}-{r}" / "photos"
        shutil.copytree(src, folder)
        s1, d1 = timed_write(folder, mode, threads)
        s2, d2 = timed_write(folder, mode, threads)
        n = len(list(src.glob("*.JPG")))
        if d1.failed or d1.written != n or d2.written or d2.unchanged != n:
            raise SystemExit(f"{mode}: unexpected counts {d1.counts()} / {d2.counts()}")
        first.append(s1)
        again.append(s2)
        shutil.rmtree(folder.parent)
    return {"first write": min(first), "re-run": min(again)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40, help="JPEGs")
    ap.add_argument("--megapixels", type=float, default=24.0)
    ap.add_argument("--quality", type=int, default=92)
    ap.add_argument("--threads", default="1,16", help="io_threads values, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/xmp-embed.json")
    ap.add_argument(
        "--work-dir",
        help="where the JPEGs are written (default: the system's temporary folder); put it on "
        "the kind of disk the photos live on: embed's fsync and rename are that disk's cost",
    )
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]

    with tempfile.TemporaryDirectory(prefix="keeper-xmp-embed-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        sizes = []
        for i in range(args.n):
            data = camera_jpeg(i, args.megapixels, args.quality)
            (src / f"IMG_{i:04d}.JPG").write_bytes(data)
            sizes.append(len(data))
        mb = sum(sizes) / 1e6
        rows = []
        for t in threads:
            cells = {
                mode: measure(src, work, mode, t, args.repeats) for mode in ("beside", "embed")
            }
            for step in ("first write", "re-run"):
                beside, embed = cells["beside"][step], cells["embed"][step]
                rows.append(
                    {
                        "threads": t,
                        "step": step,
                        "beside_s": beside,
                        "embed_s": embed,
                        "beside_ms_per_photo": 1e3 * beside / args.n,
                        "embed_ms_per_photo": 1e3 * embed / args.n,
                        "embed_mb_per_s": mb / embed,
                        "embed_over_beside": embed / beside,
                    }
                )

    print(
        f"{args.n} JPEGs of {args.megapixels:g} MP (q{args.quality}, mean "
        f"{mb / args.n:.1f} MB), best of {args.repeats}"
    )
    head = f"{'threads':>7}  {'step':<12} {'beside ms/photo':>16} {'embed ms/photo':>15}"
    print(head + f" {'embed MB/s':>11} {'embed / beside':>15}")
    for r in rows:
        print(
            f"{r['threads']:>7}  {r['step']:<12} {r['beside_ms_per_photo']:>16.2f} "
            f"{r['embed_ms_per_photo']:>15.2f} {r['embed_mb_per_s']:>11.0f} "
            f"{r['embed_over_beside']:>15.1f}"
        )
    record = {
        "benchmark": "xmp_embed",
        "n": args.n,
        "megapixels": args.megapixels,
        "quality": args.quality,
        "mean_file_mb": mb / args.n,
        "repeats": args.repeats,
        "work_dir": str(Path(args.work_dir or tempfile.gettempdir()).resolve()),
        "rows": rows,
        "machine": machine_info(),
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
