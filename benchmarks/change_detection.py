"""What noticing photos saved over in place costs ``keeper embed``, against what it did before.

    .venv/bin/python benchmarks/change_detection.py [--files 20000] [--folders 100] \
        [--photos 300] [--camera 6000x4000] [--library-photo 3000x2000] [--repeats 3] \
        [--work-dir DIR] [--out benchmarks/results/change-detection.json]

A table row now keeps its file's stamp (size, mtime) and a content digest (sha256 of a JPEG
without its XMP/IPTC/comment segments); a re-run reads only files whose stamp changed. Side by
side in this one process, each cell the best of ``--repeats`` with a warm page cache:

- **listing**: ``storage.list_files`` (what ``keeper embed`` listed with) against
  ``storage.list_stamped`` (one ``stat`` a file) on ``--files`` two-byte files in ``--folders``
  folders (10 per parent); also with Python's cyclic GC off, to show what it adds (with torch
  imported, as in the job's driver, each full collection walks ~235k objects);
- **ids per image**: ``sha256`` of the bytes (what the decode stage computed) against
  ``embed.file_ids`` (that and ``content_digest``: a second pass over a JPEG), beside the decode
  stage's own ``ImagePreparation.decode`` of the same file (the job's arguments: draft on, the
  default limits and decoder) and its whole ``prepare_batch`` on it, for a ``--camera``-sized JPEG (gradients, blotches and sensor-like
  noise from a fixed seed, quality 92) and the same pixels as a PNG;
- **plan on a re-run**: ``embed.plan`` on ``--photos`` JPEGs (distinct ``--library-photo`` crops
  of that picture, quality 92) whose table was written as the job writes it
  (``embed.write_batch``: one part of ``rows_per_file`` rows, the real schema, a made-up embedding
  of the model's width; no capture columns; one part at the defaults), (a) unchanged, (b) after every JPEG had an XMP
  packet spliced in (its size and mtime change, not its pixels: every file is read, digested and
  its row restamped, the part rewritten), (c) the run after (b), (d) after every JPEG was moved
  into another folder (each read once and its row carried over, the old rows removed), (e) after
  those were copied into yet another folder (a card imported twice: each copy read once, its row
  copied), (f) with as many new JPEGs that are no copies, each the size of one the table holds
  (their ends compared before any is read whole), beside the same plan reading each whole (what
  it did before that check). Ray is never started. The script exits non-zero if a plan does not
  find what it should (nothing to embed; all restamped in (b), none in (a) and (c); all moved in
  (d), copied in (e); all to embed in (f)).
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # embed

from embed import machine_info, write_record

from keeper_core import storage
from keeper_core.embedded_xmp import JPEG_XMP_SIGNATURE
from keeper_core.models import embed_dim, weights_version
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs import embed

SPEC = "keeper-tiny:random"


def best(fn: Callable[[], Any], repeats: int, prepare: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def size_arg(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


# ------------------------------------------------------------------------------------------
# 1. Listing


def make_tree(root: Path, files: int, folders: int) -> None:
    """``files`` small files spread over ``folders`` leaf folders, 10 to a parent (a year of
    day folders)."""
    leaves = [root / f"{i // 10:03d}" / f"{i % 10:02d}" for i in range(folders)]
    for leaf in leaves:
        leaf.mkdir(parents=True)
    for i in range(files):
        (leaves[i % folders] / f"IMG_{i:06d}.JPG").write_bytes(b"\xff\xd8")


def measure_listing(work: Path, files: int, folders: int, repeats: int) -> dict[str, Any]:
    root = work / "tree"
    make_tree(root, files, folders)
    uri = str(root)
    assert len(storage.list_files(uri)) == len(storage.list_stamped(uri)) == files
    trials: dict[str, list[float]] = {
        k: [] for k in ("plain", "stamped", "plain_nogc", "stamped_nogc")
    }
    for _ in range(repeats):  # interleaved, so drift on the machine hits both columns alike
        trials["plain"].append(best(lambda: storage.list_files(uri), 1))
        trials["stamped"].append(best(lambda: storage.list_stamped(uri), 1))
        # Python's cyclic GC sweeps the whole heap every so many new tuples: with it off, what
        # the listing itself costs
        gc.disable()
        try:
            trials["plain_nogc"].append(best(lambda: storage.list_files(uri), 1))
            trials["stamped_nogc"].append(best(lambda: storage.list_stamped(uri), 1))
        finally:
            gc.enable()
    paths = storage.list_files(uri)
    # the system call alone (GC off), for scale: what the listing adds beyond it is Python's
    gc.disable()
    try:
        syscall = best(lambda: [os.stat(p) for p in paths], repeats)
    finally:
        gc.enable()
    shutil.rmtree(root)
    p, s = min(trials["plain"]), min(trials["stamped"])
    pn, sn = min(trials["plain_nogc"]), min(trials["stamped_nogc"])
    return {
        "files": files,
        "folders": folders,
        "list_files_s": p,
        "list_stamped_s": s,
        "stamped_over_plain": s / p,
        "list_files_us_per_file": p / files * 1e6,
        "list_stamped_us_per_file": s / files * 1e6,
        "added_us_per_file": (s - p) / files * 1e6,
        "os_stat_us_per_file": syscall / files * 1e6,
        "gc_off": {
            "list_files_s": pn,
            "list_stamped_s": sn,
            "stamped_over_plain": sn / pn,
            "added_us_per_file": (sn - pn) / files * 1e6,
        },
        "trials_s": trials,
        "gc_tracked_objects": len(gc.get_objects()),  # what a full collection walks
        # a linear extrapolation, not a measurement: a million files' listing in one folder tree
        "extrapolated_1m_list_files_s": p / files * 1e6,
        "extrapolated_1m_list_stamped_s": s / files * 1e6,
    }


# ------------------------------------------------------------------------------------------
# 2. Ids per image


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradients, blotches and sensor-like noise: about the bytes per pixel of a camera JPEG at
    quality 92 (a few MB at 24 MP)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    a, b, c = rng.uniform(0.5, 3, 3).astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 120 + 80 * np.sin(a * 6 * x + b * 3 * y)
    img[..., 1] = 110 + 70 * np.cos(b * 5 * y - c * 2 * x)
    img[..., 2] = 100 + 60 * np.sin(c * 4 * (x + y))
    coarse = rng.standard_normal((height // 48 + 1, width // 48 + 1, 3), dtype=np.float32)
    blotches = Image.fromarray(np.clip(coarse * 30 + 128, 0, 255).astype(np.uint8))
    img += np.asarray(blotches.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    img -= 128
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * 6
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def embed_preparation() -> Any:
    """The decode stage's ``ImagePreparation``, built from the job's own arguments."""
    cfg = embed.EmbedConfig(input="-", output="-", model=SPEC)
    a = embed.prepare_arguments(cfg, "-", "bench")
    limits = tuple(sorted(a["limits"].items()))
    return embed._preparation(a["spec"], a["draft"], limits, a["decode"], a["preprocess"])


def measure_ids(work: Path, img: Image.Image, repeats: int) -> list[dict[str, Any]]:
    import hashlib

    prep = embed_preparation()
    cfg = embed.EmbedConfig(input="-", output=str(work / "stage-out"), model=SPEC)
    stage_args = embed.prepare_arguments(cfg, cfg.output, "bench")
    rows = []
    for fmt in ("JPEG", "PNG"):
        data = encoded(img, fmt)
        path = work / f"IMG_0001.{fmt[:3]}"
        path.write_bytes(data)
        uri = str(path)
        old = best(lambda data=data: hashlib.sha256(data).hexdigest(), repeats * 3)
        new = best(lambda data=data, uri=uri: embed.file_ids(data, uri), repeats * 3)
        dec = best(lambda data=data, uri=uri: prep.decode(data, source=uri), repeats)
        batch = {"image_uri": np.array([uri], dtype=object)}
        if len(embed.prepare_batch(batch, **stage_args)["image_uri"]) != 1:  # untimed: warm-up
            raise SystemExit(f"the decode stage failed on {uri}")
        prep.decode(data, source=uri)
        # the decode task's whole work on this image: read, decode, resize, quality features,
        # ids, dHash, capture metadata
        stage = best(lambda batch=batch: embed.prepare_batch(batch, **stage_args), repeats)
        rows.append(
            {
                "format": fmt.lower(),
                "width": img.width,
                "height": img.height,
                "mb": len(data) / 1e6,
                "sha256_ms": old * 1e3,
                "file_ids_ms": new * 1e3,
                "file_ids_over_sha256": new / old,
                "decode_ms": dec * 1e3,
                "decode_stage_ms": stage * 1e3,
                "added_ms": (new - old) * 1e3,
                "added_share_of_decode": (new - old) / dec,
                "added_share_of_decode_stage": (new - old) / stage,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------
# 3. Plan on a re-run


def xmp_segment(n: int) -> bytes:
    """An APP1 XMP segment as a photo tool writes one (a rating, 2 KB of padding); ``n`` varies
    its length, so each splice changes the file's size as well as its mtime."""
    packet = (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        f'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="{n % 5 + 1}"/></rdf:RDF>'
        "</x:xmpmeta>" + " " * (2048 + n) + '<?xpacket end="w"?>'
    ).encode()
    body = JPEG_XMP_SIGNATURE + packet
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def splice_xmp(path: Path, n: int) -> None:
    """Save ``path`` with a new XMP packet after SOI (replacing the one an earlier call put
    there), as Lightroom or ``keeper pick --xmp embed`` saves a rating into the file."""
    data = path.read_bytes()
    if data[2:4] == b"\xff\xe1" and data[6 : 6 + len(JPEG_XMP_SIGNATURE)] == JPEG_XMP_SIGNATURE:
        data = data[:2] + data[4 + struct.unpack(">H", data[4:6])[0] :]
    path.write_bytes(data[:2] + xmp_segment(n) + data[2:])


def make_library(lib: Path, img: Image.Image, photos: int, size: tuple[int, int]) -> list[Path]:
    """``photos`` JPEGs, each a distinct ``size`` crop of ``img``, in day folders."""
    w, h = size
    rng = np.random.default_rng(1)
    xs = rng.integers(0, img.width - w + 1, photos)
    ys = rng.integers(0, img.height - h + 1, photos)
    paths = []
    for i in range(photos):
        path = lib / f"day{i % 5}" / f"IMG_{i:04d}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = int(xs[i]), int(ys[i])
        path.write_bytes(encoded(img.crop((x, y, x + w, y + h)), "JPEG"))
        paths.append(path)
    return paths


def write_table(dst: Path, files: list[Path], size: tuple[int, int]) -> None:
    """The rows keeper embed writes for ``files`` as they are now, through the job's own writer
    (parts of ``rows_per_file`` rows), and the table's record of its spec."""
    dim = embed_dim(SPEC)
    per_part = embed.EmbedConfig(input="-", output="-", model=SPEC).rows_per_file
    rng = np.random.default_rng(2)
    for start in range(0, len(files), per_part):
        chunk = files[start : start + per_part]
        ids = [embed.file_ids(f.read_bytes(), str(f)) for f in chunk]
        stats = [f.stat() for f in chunk]
        n = len(chunk)
        batch: dict[str, np.ndarray] = {
            "image_uri": np.array([str(f) for f in chunk], dtype=object),
            "image_id": np.array([i for i, _ in ids], dtype=object),
            embed.CONTENT_ID: np.array([c for _, c in ids], dtype=object),
            "file_size": np.array([s.st_size for s in stats], np.int64),
            "file_mtime_ns": np.array([s.st_mtime_ns for s in stats], np.int64),
            "embedding": rng.standard_normal((n, dim), dtype=np.float32),
            "dhash": rng.integers(-(2**62), 2**62, n),
            "t_decode": np.zeros(n),
            "t_embed": np.zeros(n),
        }
        for name in FEATURE_NAMES:
            batch[name] = rng.uniform(0, 1, n).astype(np.float32)
        batch["width"], batch["height"] = np.full(n, size[0]), np.full(n, size[1])
        embed.write_batch(batch, spec=SPEC, embeddings_dir=str(dst / embed.EMBEDDINGS))
    embed.check_table_meta(str(dst), SPEC, embed_dim=dim, weights=weights_version(SPEC))


def measure_plan(
    work: Path, img: Image.Image, photos: int, size: tuple[int, int], repeats: int
) -> dict[str, Any]:
    lib, dst = work / "library", work / "out"
    files = make_library(lib, img, photos, size)
    write_table(dst, files, size)
    cfg = embed.EmbedConfig(input=str(lib), output=str(dst), model=SPEC)

    def planned(restamped: int) -> Callable[[], None]:
        def run() -> None:
            p = embed.plan(cfg)
            c = p.changes
            if p.todo or c.changed or (c.restamped, c.stamped) != (restamped, 0):
                raise SystemExit(
                    f"unexpected plan: {len(p.todo)} to embed, {len(c.changed)} changed, "
                    f"{c.restamped} restamped, {c.stamped} stamped (expected {restamped})"
                )

        return run

    splices = iter(range(1, 1 + repeats))

    def splice_all() -> None:
        n = next(splices)
        for f in files:
            splice_xmp(f, n)

    planned(0)()  # once untimed: first-call costs (imports, the model's config)
    unchanged = best(planned(0), repeats)
    # Each repeat saves a new packet into every file first: each run finds every stamp changed.
    saved_over = best(planned(photos), repeats, prepare=splice_all)
    after = best(planned(0), repeats)
    mb = sum(f.stat().st_size for f in files) / 1e6
    # (d) The library reorganised: every photo moved into another folder. Once (each run copies
    # the rows, so a second would find them embedded), beside the decode stage's own time on
    # the same photos (what embedding them again would cost before the model).
    for f in files:
        dest = lib / "2026" / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        f.rename(dest)
    t0 = time.perf_counter()
    p = embed.plan(cfg)
    moved_s = time.perf_counter() - t0
    if p.todo or p.moved != photos:
        raise SystemExit(f"unexpected plan: {len(p.todo)} to embed, {p.moved} moved of {photos}")
    # (e) The same photos imported again into another folder (copies of files still listed):
    # once, as (d).
    shutil.copytree(lib / "2026", lib / "2026-again")
    t0 = time.perf_counter()
    p = embed.plan(cfg)
    copied_s = time.perf_counter() - t0
    if p.todo or p.copied != photos:
        raise SystemExit(f"unexpected plan: {len(p.todo)} to embed, {p.copied} copied of {photos}")
    # (f) New photos that are no copies, each the size of a photo the table holds (another
    # photo's bytes cut or padded to it): what 1 in 6 new photos is at a million camera JPEGs.
    # Their ends are compared before anything is read whole; beside it, in the same process, the
    # plan that read each whole instead (``_ends_match`` passing every input).
    kept = sorted((lib / "2026").rglob("*.JPG"))
    alike = lib / "look-alikes"
    alike.mkdir()
    for i, f in enumerate(kept):
        other = kept[(i + 1) % len(kept)].read_bytes()
        n = f.stat().st_size
        (alike / f"new-{i:04d}.JPG").write_bytes(other[:n].ljust(n, b"\0"))

    def look_alikes() -> None:
        p = embed.plan(cfg)
        if len(p.todo) != photos or p.copied or p.moved:
            raise SystemExit(f"unexpected plan: {len(p.todo)} to embed, {p.copied} copied")

    ends_s = best(look_alikes, repeats)
    real_ends = embed._ends_match
    embed._ends_match = lambda inputs, *_: set(inputs)  # type: ignore[assignment]
    try:
        whole_s = best(look_alikes, repeats)
    finally:
        embed._ends_match = real_ends  # type: ignore[assignment]
    stage_args = embed.prepare_arguments(cfg, str(dst), "bench")
    sample = kept[:10]
    batch = {"image_uri": np.array([str(f) for f in sample], dtype=object)}
    t0 = time.perf_counter()
    embed.prepare_batch(batch, **stage_args)
    stage_ms = (time.perf_counter() - t0) / len(sample) * 1e3
    return {
        "photos": photos,
        "width": size[0],
        "height": size[1],
        "library_mb": mb,
        "mean_file_mb": mb / photos,
        "rows": [
            {"run": "unchanged", "s": unchanged, "over_unchanged": 1.0},
            {
                "run": "every JPEG saved with new XMP",
                "s": saved_over,
                "over_unchanged": saved_over / unchanged,
                "read_mb_per_s": mb / saved_over,
                "added_ms_per_file": (saved_over - unchanged) / photos * 1e3,
            },
            {"run": "the run after", "s": after, "over_unchanged": after / unchanged},
            {
                "run": "every JPEG moved to another folder",
                "s": moved_s,
                "over_unchanged": moved_s / unchanged,
                "read_mb_per_s": mb / moved_s,
                "ms_per_photo": moved_s / photos * 1e3,
                "decode_stage_ms_per_photo": stage_ms,
            },
            {
                "run": "new JPEGs of sizes the table holds: ends compared",
                "s": ends_s,
                "over_unchanged": ends_s / unchanged,
                "ms_per_photo": ends_s / photos * 1e3,
            },
            {
                "run": "the same, each read whole (before the check)",
                "s": whole_s,
                "over_unchanged": whole_s / unchanged,
                "ms_per_photo": whole_s / photos * 1e3,
                "over_ends_compared": whole_s / ends_s,
            },
            {
                "run": "every JPEG copied to another folder",
                "s": copied_s,
                "over_unchanged": copied_s / unchanged,
                "read_mb_per_s": mb / copied_s,
                "ms_per_photo": copied_s / photos * 1e3,
                "decode_stage_ms_per_photo": stage_ms,
            },
        ],
    }


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000, help="files in the listing tree")
    ap.add_argument("--folders", type=int, default=100, help="leaf folders they are spread over")
    ap.add_argument("--photos", type=int, default=300, help="JPEGs in the re-run library")
    ap.add_argument("--camera", type=size_arg, default=(6000, 4000), help="WxH of the picture")
    ap.add_argument(
        "--library-photo", type=size_arg, default=(3000, 2000), help="WxH of the library's crops"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/change-detection.json")
    args = ap.parse_args(argv)
    if args.library_photo[0] > args.camera[0] or args.library_photo[1] > args.camera[1]:
        ap.error("--library-photo must fit inside --camera")

    load_before = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="keeper-change-detection-", dir=args.work_dir)).resolve()
    try:
        listing = measure_listing(work, args.files, args.folders, args.repeats)
        img = picture(*args.camera)
        ids = measure_ids(work, img, args.repeats)
        replan = measure_plan(work, img, args.photos, args.library_photo, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nlisting {listing['files']:,} files in {listing['folders']} folders")
    print(
        f"{'':<7} {'list_files s':>13} {'list_stamped s':>15} {'stamped / plain':>16} "
        f"{'added us/file':>14}"
    )
    for name, r in (("GC on", listing), ("GC off", listing["gc_off"])):
        print(
            f"{name:<7} {r['list_files_s']:>13.3f} {r['list_stamped_s']:>15.3f} "
            f"{r['stamped_over_plain']:>16.2f} {r['added_us_per_file']:>14.2f}"
        )
    print(f"(os.stat alone: {listing['os_stat_us_per_file']:.2f} us a file)")
    print(f"\nids per image ({args.camera[0]}x{args.camera[1]})")
    print(
        f"{'format':<6} {'MB':>6} {'sha256 ms':>10} {'file_ids ms':>12} {'new / old':>10} "
        f"{'decode ms':>10} {'added / decode':>15} {'stage ms':>9} {'added / stage':>14}"
    )
    for r in ids:
        print(
            f"{r['format']:<6} {r['mb']:>6.2f} {r['sha256_ms']:>10.2f} {r['file_ids_ms']:>12.2f} "
            f"{r['file_ids_over_sha256']:>10.2f} {r['decode_ms']:>10.1f} "
            f"{r['added_share_of_decode']:>14.1%} {r['decode_stage_ms']:>9.1f} "
            f"{r['added_share_of_decode_stage']:>13.1%}"
        )
    print(
        f"\nplan on a re-run: {replan['photos']} JPEGs, {replan['library_mb']:.0f} MB "
        f"({replan['mean_file_mb']:.2f} MB each)"
    )
    print(f"{'run':<50} {'plan s':>8} {'/ unchanged':>12} {'MB/s read':>10}")
    for r in replan["rows"]:
        mbs = f"{r['read_mb_per_s']:>10.0f}" if "read_mb_per_s" in r else f"{'':>10}"
        print(f"{r['run']:<50} {r['s']:>8.3f} {r['over_unchanged']:>12.2f} {mbs}")
    for r in (replan["rows"][3], replan["rows"][-1]):
        print(
            f"{r['run'].split()[2]}: {r['ms_per_photo']:.2f} ms a photo to find and copy its row, "
            f"against {r['decode_stage_ms_per_photo']:.1f} ms to decode it again (before the model)"
        )

    record = {
        "benchmark": "change_detection",
        "command": " ".join(["benchmarks/change_detection.py", *(argv or sys.argv[1:])]),
        "spec": SPEC,
        "repeats": args.repeats,
        "camera": list(args.camera),
        "work_dir": str(work.parent),
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
        "listing": listing,
        "ids": ids,
        "plan": replan,
        # 1/5/15-minute load averages: anything else running shows here (2 cores)
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
    }
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
