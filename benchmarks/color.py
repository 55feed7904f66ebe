"""What converting colour-managed photos to sRGB costs: tagged against untagged JPEGs, same pixels.

    .venv/bin/python benchmarks/color.py [--files 16] [--repeats 5] \
        [--out benchmarks/results/color-cpu.json]

Files: ``--files`` JPEGs per size (4000x3000, 1600x1200, 512x384; decode.py's grained photos,
quality 90), each written three ways from the same pixels: untagged, with an sRGB ICC profile
(left as decoded: ``keeper_core.color`` skips sRGB profiles) and with a Display P3 profile
(converted by littlecms). Each is decoded by ``decode_image`` (the reference every backend hands
tagged JPEGs to) in full and drafted to 256 x 256 (``ImagePreparation``'s draft), one process,
one thread; images/s from CPU time, each repeat runs every variant in turn, the best repeat is
kept. The ratio is against the untagged file of the same size and way.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# benchmarks/ is sys.path[0] when this runs as a script.
from blockiness import GRAIN, photos
from embed import machine_info, write_record
from PIL import Image, ImageCms

from keeper_core.color import DISPLAY_P3, rgb_profile
from keeper_core.images import decode_image
from keeper_core.preparation import QUALITY_SIZE
from keeper_core.synthetic import DEFAULT_PHOTOS

SIZES = ((4000, 3000), (1600, 1200), (512, 384))
QUALITY = 90
DRAFT = (QUALITY_SIZE, QUALITY_SIZE)
VARIANTS = ("untagged", "srgb_profile", "display_p3")


def encode(im: Image.Image, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY, **({"icc_profile": icc} if icc else {}))
    return buf.getvalue()


def make_files(n: int, size: tuple[int, int]) -> dict[str, list[bytes]]:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    icc = {"untagged": None, "srgb_profile": srgb, "display_p3": rgb_profile(DISPLAY_P3)}
    bases = photos(len(DEFAULT_PHOTOS), size)
    ims = [bases[i % len(bases)] for i in range(n)]
    return {v: [encode(im, icc[v]) for im in ims] for v in VARIANTS}


def cpu_per_image(blobs: list[bytes], draft: tuple[int, int] | None) -> float:
    decode_image(blobs[0], draft_size=draft)  # warm up (the P3 transform is built here)
    c0 = time.process_time()
    for data in blobs:
        decode_image(data, draft_size=draft)
    return (time.process_time() - c0) / len(blobs)


def measure(files: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        blobs = make_files(files, size)
        best: dict[str, dict[str, float]] = {}
        for _ in range(repeats):
            for way, draft in (("full", None), ("draft", DRAFT)):
                for v in VARIANTS:
                    cpu = cpu_per_image(blobs[v], draft)
                    key = f"{way}/{v}"
                    best[key] = {"cpu_s": min(cpu, best.get(key, {"cpu_s": cpu})["cpu_s"])}
        for key, m in best.items():
            way = key.split("/")[0]
            m["img_per_s"] = 1.0 / m["cpu_s"]
            m["vs_untagged"] = best[f"{way}/untagged"]["cpu_s"] / m["cpu_s"]
        rows.append({"size": f"{size[0]}x{size[1]}", "files": files, **best})
        print(f"  {size[0]}x{size[1]}: done", file=sys.stderr)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"\ndecode_image, one thread, images/s from CPU time (vs untagged); draft = {DRAFT[0]} px"
    )
    print(f"{'size':<10} {'way':<6}" + "".join(f" {v:>22}" for v in VARIANTS))
    for r in rows:
        for way in ("full", "draft"):
            cells = "".join(
                f" {r[f'{way}/{v}']['img_per_s']:>14.1f} ({r[f'{way}/{v}']['vs_untagged']:.2f}x)"
                for v in VARIANTS
            )
            print(f"{r['size']:<10} {way:<6}{cells}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16, help="JPEGs per size and variant")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the best is kept")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/color-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows = measure(args.files, args.repeats)
    print_table(rows)
    result = {
        "command": " ".join(["benchmarks/color.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {
            "sizes": [f"{w}x{h}" for w, h in SIZES],
            "quality": QUALITY,
            "grain_sigma": GRAIN,
            "draft_size": list(DRAFT),
            "files": args.files,
            "repeats": args.repeats,
        },
        "machine": machine_info(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "rows": rows,
    }
    write_record(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
