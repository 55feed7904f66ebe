"""JPEG decode backends side by side: PIL, libjpeg-turbo, nvJPEG and nvImageCodec, same files.

    .venv/bin/python benchmarks/decode.py [--files 32] [--repeats 5] \
        [--out benchmarks/results/decode-cpu.json]

Files: ``--files`` JPEGs per size, 4000x3000 (12 MP), 1600x1200 and 512x384, made from the
colour photos of ``keeper_core.synthetic.DEFAULT_PHOTOS`` upscaled, mirrored for variety, with a
seeded grain (Gaussian, sigma 3 grey levels) so they have the detail and decode cost of camera
JPEGs; quality 90, 4:2:0, baseline. Made in memory: nothing is read from disk while timed.

Per backend (``keeper_core.decoders``), one process, one thread: a full decode, and a draft
decode to 256 x 256 (``ImagePreparation``'s draft: ``QUALITY_SIZE``), each through the backend's
whole contract (byte limit, header checks, EXIF orientation, RGB). CPU images/s are from the
process's CPU time (decode is single-threaded), so they hold on a shared machine; wall time is in
the JSON too. Each repeat runs every backend in turn, so a burst of foreign load lands on all of
them; the best repeat is kept. Ratios are against PIL's full decode of the same files.

GPU rows, one per engine (``gpu``: torchvision's nvJPEG; ``nvimgcodec``: NVIDIA nvImageCodec, which
can use the GPU's hardware JPEG decoder): ``GpuDecoder.decode_batch`` over all files of a size in
batches of ``--gpu-batch``, wall time with ``torch.cuda.synchronize()``, after a warm-up batch;
without CUDA (or without nvImageCodec installed) they are written as "not measured (...)".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's machine description.
from blockiness import GRAIN, jpeg, photos
from embed import machine_info, write_record
from PIL import Image

from keeper_core.decoders import ENGINES, Decoder, GpuDecoder, PilDecoder, TurboDecoder
from keeper_core.errors import ConfigError
from keeper_core.preparation import QUALITY_SIZE
from keeper_core.synthetic import DEFAULT_PHOTOS

SIZES = ((4000, 3000), (1600, 1200), (512, 384))
QUALITY = 90
DRAFT = (QUALITY_SIZE, QUALITY_SIZE)
NO_GPU = "not measured (no CUDA device)"


def make_jpegs(n: int, size: tuple[int, int]) -> list[bytes]:
    """``n`` JPEGs: blockiness.py's grained, upscaled photos, cycled, every other cycle mirrored."""
    bases = photos(len(DEFAULT_PHOTOS), size)
    out = []
    for i in range(n):
        im = bases[i % len(bases)]
        if (i // len(bases)) % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(jpeg(im, QUALITY))
    return out


def timed_pass(fn: Callable[[bytes], Any], blobs: list[bytes]) -> tuple[float, float]:
    """CPU and wall seconds per image over one pass."""
    c0, w0 = time.process_time(), time.perf_counter()
    for data in blobs:
        fn(data)
    return (time.process_time() - c0) / len(blobs), (time.perf_counter() - w0) / len(blobs)


def cpu_rows(blobs: list[bytes], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    backends: dict[str, Decoder] = {"pil": PilDecoder(), "turbo": TurboDecoder()}
    ways: dict[str, Callable[[Decoder], Callable[[bytes], Any]]] = {
        "full": lambda d: lambda b: d.decode(b),
        "draft": lambda d: lambda b: d.decode(b, draft_size=DRAFT),
    }
    best: dict[str, dict[str, dict[str, float]]] = {b: {} for b in backends}
    for _ in range(repeats):
        for bname, dec in backends.items():
            for wname, way in ways.items():
                fn = way(dec)
                fn(blobs[0])  # warm up
                cpu, wall = timed_pass(fn, blobs)
                cur = best[bname].get(wname)
                if cur is None or cpu < cur["cpu_s"]:
                    best[bname][wname] = {"cpu_s": cpu, "wall_s": wall, "img_per_s": 1.0 / cpu}
    turbo = backends["turbo"]
    assert isinstance(turbo, TurboDecoder)
    assert not turbo.delegated, turbo.delegated  # every file really took libjpeg-turbo
    return best


GPU_BACKENDS = tuple(ENGINES.values())  # "gpu", "nvimgcodec"


def gpu_row(blobs: list[bytes], batch: int, engine: str) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"full": NO_GPU, "draft": NO_GPU}
    try:
        gpu = GpuDecoder("cuda", engine=engine)
    except ConfigError as e:  # nvImageCodec not installed, or it cannot decode on this GPU
        why = f"not measured ({e})"
        return {"full": why, "draft": why}
    row: dict[str, Any] = {}
    for wname, draft in (("full", None), ("draft", DRAFT)):
        gpu.decode_batch([(b, None) for b in blobs[:batch]], draft_size=draft)  # warm up
        torch.cuda.synchronize()
        w0 = time.perf_counter()
        for i in range(0, len(blobs), batch):
            gpu.decode_batch([(b, None) for b in blobs[i : i + batch]], draft_size=draft)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - w0) / len(blobs)
        row[wname] = {"wall_s": wall, "img_per_s": 1.0 / wall}
    row["fallbacks"], row["delegated"] = dict(gpu.fallbacks), dict(gpu.delegated)
    return row


def measure(files: int, repeats: int, gpu_batch: int) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        blobs = make_jpegs(files, size)
        cpu = cpu_rows(blobs, repeats)
        base = cpu["pil"]["full"]["img_per_s"]
        row: dict[str, Any] = {
            "size": f"{size[0]}x{size[1]}",
            "files": len(blobs),
            "mean_bytes": int(np.mean([len(b) for b in blobs])),
            "pil": cpu["pil"],
            "turbo": cpu["turbo"],
            **{ENGINES[e]: gpu_row(blobs, gpu_batch, e) for e in ENGINES},
        }
        for name in ("pil", "turbo", *GPU_BACKENDS):
            for way in ("full", "draft"):
                m = row[name][way]
                if isinstance(m, dict):
                    m["vs_pil_full"] = m["img_per_s"] / base
        rows.append(row)
        print(f"  {row['size']}: done", file=sys.stderr)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\nImages/s, one process, one thread (CPU time; GPU: wall); draft = {DRAFT[0]} px")
    print(
        f"{'size':<10} {'backend':<10} {'full img/s':>10} {'draft img/s':>11} "
        f"{'full/PIL full':>13} {'draft/PIL full':>14} {'draft/PIL draft':>15}"
    )
    for r in rows:
        pil_draft = r["pil"]["draft"]["img_per_s"]
        for name in ("pil", "turbo", *GPU_BACKENDS):
            full, draft = r[name]["full"], r[name]["draft"]
            if isinstance(full, str):
                print(f"{r['size']:<10} {name:<10} {full}")
                continue
            print(
                f"{r['size']:<10} {name:<10} {full['img_per_s']:>10.1f} "
                f"{draft['img_per_s']:>11.1f} {full['vs_pil_full']:>13.2f} "
                f"{draft['vs_pil_full']:>14.2f} {draft['img_per_s'] / pil_draft:>15.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=32, help="JPEGs per size")
    parser.add_argument("--repeats", type=int, default=5, help="passes per backend; best kept")
    parser.add_argument("--gpu-batch", type=int, default=32, help="images per decode_batch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = measure(args.files, args.repeats, args.gpu_batch)
    print_table(rows)
    import simplejpeg

    machine = machine_info()
    machine["versions"]["simplejpeg"] = simplejpeg.__version__
    result = {
        "command": " ".join(["benchmarks/decode.py", *(argv or sys.argv[1:])]),
        "config": {
            "sizes": [f"{w}x{h}" for w, h in SIZES],
            "photos": list(DEFAULT_PHOTOS),
            "quality": QUALITY,
            "grain_sigma": GRAIN,
            "draft_size": list(DRAFT),
            "files": args.files,
            "repeats": args.repeats,
            "gpu_batch": args.gpu_batch,
        },
        "machine": machine,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "rows": rows,
    }
    write_record(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
