"""JPEG blockiness of draft-decoded photos: what measuring it at full resolution costs and buys.

    .venv/bin/python benchmarks/blockiness.py [--photos 4] [--repeats 3] \
        [--out benchmarks/results/blockiness.json]

Photos: the first ``--photos`` colour photos of ``keeper_core.synthetic.DEFAULT_PHOTOS``,
upscaled to each size with a seeded grain (Gaussian, sigma 3 grey levels) so the files have the
detail, size and decode cost of camera JPEGs, saved at quality 90, baseline and progressive.

Throughput: ``ImagePreparation.decode`` per image, one thread, three ways side by side:

- *draft + full-res band* (keeper now): JPEG draft decode, plus the top rows of the original
  decoded at full resolution for blockiness (``keeper_core.images.decode_jpeg_band``);
- *draft, measured on draft pixels* (keeper before): the draft decode, and blockiness on the
  draft's pixels, where the 8x8 grid is gone;
- *full decode*: no draft, blockiness on the decoded pixels (``draft=False``).

Images/s are from the process's CPU time (decode is single-threaded), so they hold on a shared
machine; wall time is in the JSON too. The ratios are what matter.

Separation, on 12 MP photos at quality 10, at quality 95, and at quality 10 re-saved at 95
(the blocks baked into the pixels, fine tables): blockiness from the draft's pixels (before),
from the band (now), from a full decode's central 512 x 512 crop (the reference), and the JPEG
quality a header-only estimate reads from the luma quantisation table (the alternative not
chosen: it cannot see the re-saved photo's blocks).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's machine description.
from embed import machine_info, write_record
from PIL import Image, JpegImagePlugin

from keeper_core.images import decode_image, image_size
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import image_blockiness
from keeper_core.synthetic import DEFAULT_PHOTOS

SPEC = "keeper-tiny:random"  # the model only sets the draft size: max(model, 256) = 256
SIZES = ((4000, 3000), (1600, 1200))
QUALITY = 90
GRAIN = 3.0
# libjpeg's (IJG) standard luminance table, quality 50, in the natural order PIL reports it.
_IJG_LUMA_50 = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip


def photos(n: int, size: tuple[int, int]) -> list[Image.Image]:
    from skimage import data

    out = []
    for i, name in enumerate(DEFAULT_PHOTOS[:n]):
        up = Image.fromarray(getattr(data, name)()).convert("RGB")
        up = up.resize(size, Image.Resampling.BICUBIC)
        grain = np.random.default_rng(i).normal(0.0, GRAIN, (size[1], size[0], 1))
        arr = np.asarray(up, np.float32) + grain.astype(np.float32)
        out.append(Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)))
    return out


def jpeg(img: Image.Image, quality: int, *, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, progressive=progressive)
    return buf.getvalue()


def quant_quality(data: bytes) -> float:
    """The IJG quality whose scaled luma table is closest to this file's (header only)."""
    im = Image.open(io.BytesIO(data))
    assert isinstance(im, JpegImagePlugin.JpegImageFile)
    table = np.asarray(im.quantization[0], dtype=np.float64)
    kept = table < 255  # low qualities clip the table at 255
    scale = 100.0 * float(np.mean(table[kept] / _IJG_LUMA_50[kept]))
    return 5000.0 / scale if scale > 100.0 else (200.0 - scale) / 2.0


def timed(fn: Callable[[bytes], float], blobs: list[bytes], repeats: int) -> dict[str, float]:
    """Best of ``repeats`` passes over ``blobs``: CPU and wall seconds per image."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for data in blobs:
            fn(data)
        cpu.append((time.process_time() - c0) / len(blobs))
        wall.append((time.perf_counter() - w0) / len(blobs))
    return {"cpu_s": min(cpu), "wall_s": min(wall), "img_per_s": 1.0 / min(cpu)}


def throughput(n: int, repeats: int) -> list[dict[str, Any]]:
    now = ImagePreparation(SPEC)
    full = ImagePreparation(SPEC, draft=False)
    draft_size = now.draft_size

    def keeper_now(data: bytes) -> float:
        d = now.decode(data)
        return d.blockiness if d.blockiness is not None else image_blockiness(d.image)

    def keeper_before(data: bytes) -> float:  # ImagePreparation.decode + quality before
        img = decode_image(data, limits=now.limits, draft_size=draft_size)
        image_size(data)
        return image_blockiness(img)

    def full_decode(data: bytes) -> float:
        return image_blockiness(full.decode(data).image)

    ways = {
        "draft + full-res band": keeper_now,
        "draft, on draft pixels": keeper_before,
        "full decode": full_decode,
    }
    rows = []
    for size in SIZES:
        imgs = photos(n, size)
        for progressive in (False, True):
            blobs = [jpeg(im, QUALITY, progressive=progressive) for im in imgs]
            row: dict[str, Any] = {
                "size": f"{size[0]}x{size[1]}",
                "encoding": "progressive" if progressive else "baseline",
                "mean_bytes": int(np.mean([len(b) for b in blobs])),
            }
            for name, fn in ways.items():
                fn(blobs[0])  # warm up
                row[name] = timed(fn, blobs, repeats)
            before = row["draft, on draft pixels"]["img_per_s"]
            row["now_vs_before"] = row["draft + full-res band"]["img_per_s"] / before
            row["full_vs_before"] = row["full decode"]["img_per_s"] / before
            rows.append(row)
            print(f"  {row['size']} {row['encoding']}: done", file=sys.stderr)
    return rows


def separation(n: int) -> list[dict[str, Any]]:
    now = ImagePreparation(SPEC)
    rows = []
    for name, img in zip(DEFAULT_PHOTOS, photos(n, SIZES[0]), strict=False):
        crushed = jpeg(img, 10)
        variants = {
            "q10": crushed,
            "q95": jpeg(img, 95),
            "q10 re-saved q95": jpeg(Image.open(io.BytesIO(crushed)), 95),
        }
        for variant, data in variants.items():
            decoded = now.decode(data)
            assert decoded.blockiness is not None  # drafted
            rows.append(
                {
                    "photo": name,
                    "variant": variant,
                    "draft_pixels": image_blockiness(decoded.image),
                    "band": decoded.blockiness,
                    "full_decode_centre": image_blockiness(decode_image(data)),
                    "quant_table_quality": quant_quality(data),
                }
            )
    return rows


def print_tables(speed: list[dict[str, Any]], sep: list[dict[str, Any]]) -> None:
    print("\nImagePreparation.decode + blockiness, images/s per core (CPU time)")
    print(
        f"{'size':<10} {'encoding':<12} {'band (now)':>10} {'draft (before)':>14} "
        f"{'full decode':>11} {'now/before':>10} {'full/before':>11}"
    )
    for r in speed:
        print(
            f"{r['size']:<10} {r['encoding']:<12} "
            f"{r['draft + full-res band']['img_per_s']:>10.1f} "
            f"{r['draft, on draft pixels']['img_per_s']:>14.1f} "
            f"{r['full decode']['img_per_s']:>11.1f} "
            f"{r['now_vs_before']:>10.2f} {r['full_vs_before']:>11.2f}"
        )
    print("\nBlockiness of 4000x3000 JPEGs (draft on), and the quality the header claims")
    print(
        f"{'photo':<10} {'variant':<17} {'draft px':>8} {'band':>6} {'full centre':>11} "
        f"{'quant-table q':>13}"
    )
    for r in sep:
        print(
            f"{r['photo']:<10} {r['variant']:<17} {r['draft_pixels']:>8.2f} {r['band']:>6.2f} "
            f"{r['full_decode_centre']:>11.2f} {r['quant_table_quality']:>13.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=4, help="base photos per size (max 6)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per way; best is kept")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/blockiness.json"))
    args = parser.parse_args(argv)
    speed = throughput(args.photos, args.repeats)
    sep = separation(args.photos)
    print_tables(speed, sep)
    result = {
        "command": " ".join(["benchmarks/blockiness.py", *(argv or sys.argv[1:])]),
        "config": {
            "spec": SPEC,
            "photos": list(DEFAULT_PHOTOS[: args.photos]),
            "quality": QUALITY,
            "grain_sigma": GRAIN,
            "repeats": args.repeats,
        },
        "machine": machine_info(),
        "throughput": speed,
        "separation": sep,
    }
    write_record(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
