"""keeper pick's near-duplicate search at a million photos: every-pair scan against hash buckets.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pick_scale.py [--sizes 10000,100000,1000000] \
        [--scan-max 100000] [--hashes photos,uniform] [--out benchmarks/results/pick-scale.json]

``keeper_core.grouping.find_duplicates`` must test every pair of photos that could be copies of
one another. Two ways, side by side in this process on the same rows, with the same marks:

- **scan**: every pair's cosine by blocked matrix products (the only way before 2026-12-05):
  O(N^2 D).
- **hash**: a near duplicate must also be within ``near_duplicate_max_hamming`` (4) bits of dHash,
  so only pairs whose hashes agree on one of 5 bit ranges of 12-13 bits are candidates (multi-index
  hashing; pigeonhole makes it exact). Buckets of more than ``_HEAVY_BUCKET`` rows (blank frames
  share one hash) are scanned by matrix products among themselves.

Rows (seeded): bursts of 1-8 shots (mean ~3.5); a burst's embedding is one vector of
``search.Clustered`` (CLIP-shaped: a narrow cone, 2,000 subjects of power-law sizes) plus per-shot
noise (siblings at cosine ~0.97); a shot's dHash is its burst's with Poisson(2) bits flipped; 1 % of
the rows are copies of another burst's shot (a resized export: cosine ~0.999, 0-1 bits). The
burst hashes are either **uniform** random 64-bit values (the best case for buckets) or
**photos**: the dHash of a random crop (10-100 % of the area, mirrored half the time) of one of
the 17 real photos inside scikit-image, and 1 % of the bursts blank frames (hash 0: a lens cap, a
black frame), which makes one heavy bucket per bit range. Capture times: one per burst, copies
keep their original's. ``scan`` runs up to ``--scan-max`` rows (its cost is ~4 N^2 / 10^10 s
here: ~70 minutes at 1M) and where both run the script checks that the marks are identical.

The JSON records each run's seconds, the candidate pairs listed and rows scanned in heavy buckets,
the marks (exact / near), the search's peak of new memory (``tracemalloc``: numpy's arrays
included) and the CPU seconds other processes took meanwhile (``embed.CpuMonitor``).

``--cull N`` also times ``keeper_core.culling.cull`` (what ``keeper pick`` runs once the table
is read: grouping, duplicates, ranking by the zero-shot rule, decisions) on N rows of the uniform
library, stage by stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed import CpuMonitor, machine_info
from search import Clustered

from keeper_core.grouping import (
    _HEAVY_BUCKET,
    GroupingConfig,
    _HashBuckets,
    dhash,
    find_duplicates,
)

D = 512
COPY_SHARE = 0.01
BLANK_SHARE = 0.01


def photo_hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    """dHashes of random crops of scikit-image's real photos, 1 % blank frames (hash 0)."""
    from keeper_core.synthetic import PHOTOS, load_photos

    loaded = load_photos(PHOTOS)
    photos = [loaded[name].convert("L") for name in PHOTOS]  # in a fixed order: seeded draws
    photos = [im.reduce(max(1, min(im.size) // 160)) for im in photos]  # crops of ~160 px
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if rng.random() < BLANK_SHARE:
            continue
        im = photos[int(rng.integers(len(photos)))]
        w, h = im.size
        share = rng.uniform(0.1, 1.0) ** 0.5
        cw, ch = max(9, int(w * share)), max(8, int(h * share))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(0)  # FLIP_LEFT_RIGHT
        out[i] = dhash(crop)
    return out


def flip_bits(hashes: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each hash with ``counts[i]`` random bits flipped (a bit may be drawn twice: <= counts)."""
    out = hashes.view(np.uint64).copy()
    for k in range(1, int(counts.max(initial=0)) + 1):
        rows = np.flatnonzero(counts >= k)
        out[rows] ^= np.uint64(1) << rng.integers(0, 64, size=len(rows)).astype(np.uint64)
    return out.view(np.int64)


def library(n: int, hashes: str, seed: int = 0) -> dict[str, Any]:
    """``n`` rows of a burst library with 1 % copies: the arrays find_duplicates takes."""
    rng = np.random.default_rng(seed)
    n_copies = int(n * COPY_SHARE)
    n_shots = n - n_copies
    sizes = rng.integers(1, 9, size=n_shots)  # bursts of 1-8, then trimmed to n_shots rows
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_shots)) + 1]
    sizes[-1] -= int(sizes.sum()) - n_shots
    n_bursts = len(sizes)
    burst = np.repeat(np.arange(n_bursts), sizes)
    base = Clustered(seed=seed).sample(n_bursts, seed + 1)
    noise = rng.standard_normal((n_shots, D), dtype=np.float32)
    emb = base[burst] + 0.17 * noise / np.sqrt(D)
    burst_hash = (
        rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n_bursts, dtype=np.int64)
        if hashes == "uniform"
        else photo_hashes(n_bursts, rng)
    )
    hsh = flip_bits(burst_hash[burst], rng.poisson(2.0, size=n_shots), rng)
    src = rng.choice(n_shots, size=n_copies, replace=False)
    emb = np.concatenate(
        [emb, emb[src] + 0.03 * rng.standard_normal((n_copies, D), np.float32) / np.sqrt(D)]
    )
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hsh = np.concatenate([hsh, flip_bits(hsh[src], rng.integers(0, 2, size=n_copies), rng)])
    groups = np.concatenate([burst, n_bursts + np.arange(n_copies)])  # a copy is its own group
    t = np.cumsum(rng.exponential(90.0, size=n_bursts))
    moments = np.concatenate([t[burst], t[burst[src]]])
    return {
        "image_id": [f"{i:016x}" for i in range(n)],
        "embeddings": emb.astype(np.float32),
        "groups": groups,
        "order_key": [f"img/{i:08d}.jpg" for i in range(n)],
        "hashes": hsh,
        "moments": moments,
        "prefer": rng.integers(1, 4, size=n).astype(np.float64) * 1e6,
    }


def run(lib: dict[str, Any], search: str) -> dict[str, Any]:
    config = GroupingConfig()
    mon, cpu = CpuMonitor(), dict[str, Any]()
    tracemalloc.start()
    t0 = time.perf_counter()
    with mon.section(cpu):
        dup_of, kind = find_duplicates(
            lib["image_id"],
            lib["embeddings"],
            lib["groups"],
            lib["order_key"],
            config,
            prefer=lib["prefer"],
            hashes=lib["hashes"],
            moments=lib["moments"],
            search=search,  # type: ignore[arg-type]
        )
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    mon.stop()
    kinds = np.array(kind, dtype=object)
    return {
        "search": search,
        "seconds": round(seconds, 2),
        "near": int((kinds == "near").sum()),
        "exact": int((kinds == "exact").sum()),
        "others_cpu_s": cpu["cpu"]["foreign_cpu_s"],
        "search_peak_mb": round(peak / 2**20),
        "_dup_of": dup_of,
    }


def cull_stages(n: int) -> dict[str, Any]:
    """``cull``'s stage seconds on n rows of the uniform library (one camera, EXIF times)."""
    import pandas as pd

    from keeper_core.culling import cull
    from keeper_core.quality import FEATURE_NAMES

    lib = library(n, "uniform")
    rng = np.random.default_rng(1)
    wall = pd.to_datetime(lib["moments"] + 1.7e9, unit="s")
    frame = pd.DataFrame(
        {
            "image_uri": lib["order_key"],
            "image_id": lib["image_id"],
            "embedding": list(lib.pop("embeddings")),
            "capture_ts": lib["moments"],
            "capture_time": wall.strftime("%Y-%m-%dT%H:%M:%S.%f+02:00"),
            "time_source": "exif_offset",
            "camera": "Canon EOS R6 #1",
            "sequence": np.nan,
            "dhash": lib["hashes"],
            "width": 6000,
            "height": 4000,
            **{f: rng.random(n) for f in FEATURE_NAMES},
        }
    )
    t0 = time.perf_counter()
    result = cull(frame, scorer=None)
    return {
        "n": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "stages": {k: round(v, 1) for k, v in result.seconds.items()},
        "counts": result.counts(),
    }


def bucket_stats(lib: dict[str, Any]) -> dict[str, Any]:
    buckets = _HashBuckets(lib["hashes"], GroupingConfig().near_duplicate_max_hamming)
    listed = heavy_rows = largest = 0
    for _order, _starts, sizes in buckets.runs:
        s = sizes.astype(np.int64)
        light = s <= _HEAVY_BUCKET
        listed += int((s[light] * (s[light] - 1) // 2).sum())
        heavy_rows += int(s[~light].sum())
        largest = max(largest, int(s.max()))
    n = len(lib["hashes"])
    return {
        "candidate_pairs": listed,
        "heavy_bucket_rows": heavy_rows,
        "largest_bucket": largest,
        "all_pairs": n * (n - 1) // 2,
        "cost_vs_scan": round(buckets.cost / (n * (n - 1) / 2), 6),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--scan-max", type=int, default=100_000, help="largest N the scan runs at")
    p.add_argument("--hashes", default="photos,uniform")
    p.add_argument("--cull", type=int, default=0, help="also time the whole cull at N rows")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for kind in args.hashes.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            t0 = time.perf_counter()
            lib = library(n, kind)
            made = time.perf_counter() - t0
            stats = bucket_stats(lib)
            runs = [run(lib, "hash")]
            if n <= args.scan_max:
                runs.append(run(lib, "scan"))
                same = bool(np.array_equal(runs[0]["_dup_of"], runs[1]["_dup_of"]))
                if not same:
                    print(f"MISMATCH at {kind} {n}: hash and scan marks differ", file=sys.stderr)
            else:
                same = None
            for r in runs:
                r.pop("_dup_of")
                rows.append(
                    {
                        "hashes": kind,
                        "n": n,
                        "made_s": round(made, 1),
                        **stats,
                        **r,
                        "same_marks": same,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print()
    print("| hashes | N | search | seconds | near marks | candidate pairs | heavy rows | same |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['hashes']} | {r['n']:,} | {r['search']} | {r['seconds']} | {r['near']:,} | "
            f"{r['candidate_pairs']:,} | {r['heavy_bucket_rows']:,} | {r['same_marks']} |"
        )
    culled = cull_stages(args.cull) if args.cull else None
    if culled:
        print(json.dumps(culled))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"machine": machine_info(), "rows": rows, "cull": culled}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
