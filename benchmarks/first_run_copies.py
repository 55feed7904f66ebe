"""What looking for copies among a run's own inputs (``embed.find_twins``) costs a first run.

    .venv/bin/python benchmarks/first_run_copies.py [--inputs 1000000] [--photos 200] \
        [--camera 6000x4000] [--library-photo 3000x2000] [--e2e-photos 100] \
        [--e2e-photo 1600x1200] [--e2e-model keeper-tiny:random] [--e2e-repeats 2] [--no-e2e] \
        [--repeats 3] [--work-dir DIR] [--out benchmarks/results/first-run-copies.json]

``plan`` now asks ``find_twins`` which inputs to embed hold what another one holds (a card
imported into two folders at once): of the inputs whose size 2..``TWIN_SIZE_INPUTS`` of them share
it reads the last ``COPY_TAIL_BYTES`` (``_ends``), reads whole those whose size and end match,
and keeps one of each content to embed; the others (twins) get its row (``copy_twins``). Side by
side in one process, each cell the best of ``--repeats``, the columns interleaved:

1. **at scale, no files**: ``find_twins`` over ``--inputs`` stamps (paths under a root that does
   not exist: an audit hook shows none opened; sizes from ``prune_scale.draw_sizes``, uniform and
   normal) with ``_ends`` a stand-in that counts the URIs asked for and finds no end, against the
   pass ``plan`` already makes (``storage.same_key`` of each input). The ends a real run reads:
   count, share, beside the share expected (an input's size is shared by X others, X Poisson: read
   when 1 <= X <= TWIN_SIZE_INPUTS - 1), their MB, and an *estimate* (not measured) of their
   seconds on S3: ``_END_THREADS`` ranged GETs at once, ``S3_REQUEST_S`` each.
2. **real files, plan only**: ``embed.plan`` of a first run (the output emptied before each) over
   ``--photos`` JPEGs (``change_detection.make_library``), with ``find_twins`` and with it
   replaced by ``{}`` (plan before it), for (a) the library alone, (b) it and a full copy in
   another folder, (c) it and as many look-alikes (a photo's size, another's bytes): whole reads
   of image files (``storage.read_bytes``) and the ends asked for counted. Beside it, the decode
   stage (``prepare_batch``) on 10 of them, ms a photo: what a twin no longer costs.
3. **end to end on Ray** (``--no-e2e``: skipped): ``embed.run`` into a new output over
   ``--e2e-photos`` JPEGs and a copy of each, with twins and with the stand-in alternated (an
   untimed run first), on one local Ray, for keeper-tiny:random and ``--e2e-model``.

Every count is checked as it is made (twins, inputs to embed, whole reads, ends asked for, what
the model saw, the table's rows and each copy's embedding); a wrong one exits non-zero before
anything is printed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # change_detection, prune_scale, embed

from change_detection import best, make_library, picture, size_arg
from embed import machine_info, write_record
from prune_scale import MTIME_0, SIZE_DISTS, Trials, draw_sizes, expected_share, size_counts, trial

from keeper_core import storage
from keeper_train.jobs import embed

SPEC = "keeper-tiny:random"
#: Where part 1's inputs would be. It must not exist: nothing there may be opened.
LIBRARY = "/keeper-first-run-copies-library/photos"
TOLERANCE = 0.03  # ends read against the share expected (relative)
S3_REQUEST_S = 0.030  # an estimate of one ranged GET's latency, not a measurement
_DEFAULTS = embed.EmbedConfig(input="-", output="-")
CAP = max(_DEFAULTS.max_bytes, _DEFAULTS.max_raw_bytes)  # plan's cap at the defaults


def fail(message: str) -> None:
    raise SystemExit(f"first_run_copies: {message}")


def _no_twins(*_: Any, **__: Any) -> dict[str, embed.Twin]:
    return {}


LIMIT = embed.TWIN_SIZE_INPUTS


def shared_2_to_limit(sizes: np.ndarray) -> np.ndarray:
    """Which of ``sizes`` 2..TWIN_SIZE_INPUTS of them share (counted apart from find_twins)."""
    c = size_counts(sizes, sizes)
    return (c >= 2) & (c <= embed.TWIN_SIZE_INPUTS)


def expected_read_share(n: int, dist: str) -> float:
    """The share of ``n`` inputs whose size 1..TWIN_SIZE_INPUTS - 1 of the others share:
    ``prune_scale.expected_share``'s question, the other n - 1 inputs as its rows."""
    return expected_share(n - 1, dist, k=embed.TWIN_SIZE_INPUTS - 1)


# ------------------------------------------------------------------------------------------
# 1. At scale, no files


def measure_scale(n: int, dist: str, repeats: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    sizes = draw_sizes(rng, n, dist)
    mtimes = MTIME_0 + rng.integers(0, 5 * 365 * 86400 * 10**9, n, dtype=np.int64)
    todo = [f"{LIBRARY}/{i // 1000:04d}/{i:07d}.jpg" for i in range(n)]
    stamps = {
        u: storage.Stamp(s, m)
        for u, s, m in zip(todo, sizes.tolist(), mtimes.tolist(), strict=True)
    }
    asked: list[int] = []

    def no_ends(uris: Sequence[str], size: dict[str, int]) -> dict[str, bytes | None]:
        asked.append(len(uris))
        return dict.fromkeys(uris)

    base, twins = Trials([], []), Trials([], [])
    real = embed._ends
    embed._ends = no_ends
    try:
        for _ in range(repeats):
            trial(lambda: [storage.same_key(u) for u in todo], base)
            if trial(lambda: embed.find_twins(todo, stamps, cap=CAP), twins):
                fail(f"{dist}: find_twins found twins with no end read")
    finally:
        embed._ends = real
    want = int(shared_2_to_limit(sizes).sum())
    if asked != [want] * repeats:
        fail(f"{dist}: _ends was asked for {asked}; {want} inputs' sizes 2..{LIMIT} share")
    share, expected = want / n, expected_read_share(n, dist)
    # a count's noise is ~1/sqrt(count) of it: 4 of those at fewer inputs than the default's
    tolerance = max(TOLERANCE, 4 / math.sqrt(expected * n))
    if abs(share / expected - 1) > tolerance:
        fail(f"{dist}: ends of {share:.3%} of inputs read, {expected:.3%} +-{tolerance:.0%} wanted")
    b, t = base.best(), twins.best()
    return {
        "size_dist": dist,
        "inputs": n,
        "same_key_s": b,
        "find_twins_s": t,
        "find_twins_over_same_key": t / b,
        "find_twins_us_per_input": t / n * 1e6,
        "peak_mb": {"same_key": max(base.peak_mb), "find_twins": max(twins.peak_mb)},
        "ends_read": want,
        "ends_read_share": share,
        "ends_read_share_expected": expected,
        "tolerance": tolerance,
        "ends_read_mb": want * embed.COPY_TAIL_BYTES / 1e6,
        "s3_estimate_s": want / embed._END_THREADS * S3_REQUEST_S,
        "trials_s": {"same_key": base.times, "find_twins": twins.times},
    }


# ------------------------------------------------------------------------------------------
# 2. Real files, plan only


@contextmanager
def counted_reads(root: str) -> Iterator[dict[str, list[str]]]:
    """Count ``storage.read_bytes`` of files under ``root`` (whole reads) and the URIs
    ``embed._ends`` is asked for, while in the block (each list cleared by the caller)."""
    seen: dict[str, list[str]] = {"whole": [], "ends": []}
    read_bytes, ends = storage.read_bytes, embed._ends

    def whole(uri: str, **kwargs: Any) -> bytes:
        if uri.startswith(root):
            seen["whole"].append(uri)  # list.append: safe from _read_each's threads
        return read_bytes(uri, **kwargs)

    def ends_of(uris: Sequence[str], size: dict[str, int]) -> dict[str, bytes | None]:
        seen["ends"].extend(uris)
        return ends(uris, size)

    storage.read_bytes, embed._ends = whole, ends_of
    try:
        yield seen
    finally:
        storage.read_bytes, embed._ends = read_bytes, ends


def plan_case(
    cfg: embed.EmbedConfig, root: Path, repeats: int, twins: dict[str, str]
) -> dict[str, Any]:
    """A first run's plan over ``root`` as it is now, with find_twins (expecting ``twins``, each
    of them and its original read whole once) and with the stand-in (all to embed, none read)."""
    files = sorted(str(p) for p in root.rglob("*.JPG"))
    ends = int(shared_2_to_limit(np.array([os.stat(f).st_size for f in files])).sum())
    out, real = Path(cfg.output), embed.find_twins
    times: dict[str, list[float]] = {"on": [], "off": []}
    got: list[embed.Plan] = []
    with counted_reads(str(root)) as seen:

        def fresh() -> None:  # a first run: an empty output
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            got.clear()
            seen["whole"].clear()
            seen["ends"].clear()

        try:
            for _ in range(repeats):
                for mode in ("on", "off"):
                    embed.find_twins = real if mode == "on" else _no_twins
                    times[mode].append(best(lambda: got.append(embed.plan(cfg)), 1, fresh))
                    p = got[0]
                    found = {t: w.of for t, w in p.twins.items()}
                    have = (found, len(p.todo), sorted(seen["whole"]), len(seen["ends"]))
                    want = (
                        (twins, len(files) - len(twins), sorted({*twins, *twins.values()}), ends)
                        if mode == "on"
                        else ({}, len(files), [], 0)
                    )
                    if have != want:
                        fail(
                            f"plan of {root} ({mode}): {len(p.twins)} twins, {len(p.todo)} to "
                            f"embed, {len(have[2])} whole reads, {have[3]} ends; expected "
                            f"{len(want[0])}, {want[1]}, {len(want[2])}, {want[3]}"
                        )
        finally:
            embed.find_twins = real
    t_on, t_off = min(times["on"]), min(times["off"])
    return {
        "inputs": len(files),
        "twins": len(twins),
        "ends_read": ends,
        "whole_reads": 2 * len(twins),
        "with_s": t_on,
        "without_s": t_off,
        "with_over_without": t_on / t_off,
        "ms_per_twin": (t_on - t_off) / len(twins) * 1e3 if twins else None,
        "trials_s": times,
    }


def copies_of(card: Path, copy: Path) -> dict[str, str]:
    """Each file under ``copy`` -> the file under ``card`` it copies (which sorts first)."""
    return {str(f): str(card / f.relative_to(copy)) for f in sorted(copy.rglob("*.JPG"))}


def measure_plan(
    work: Path, img: Any, photos: int, size: tuple[int, int], repeats: int
) -> dict[str, Any]:
    root, out = work / "input", work / "out"
    card, copy, alike = root / "card", root / "import-again", root / "look-alikes"
    files = make_library(card, img, photos, size)
    cfg = embed.EmbedConfig(input=str(root), output=str(out), model=SPEC)
    embed.plan(cfg)  # once untimed: first-call costs (imports, the model's config)
    cases = {"(a) the library alone": plan_case(cfg, root, repeats, {})}
    alike.mkdir()  # as change_detection's look-alikes: another photo's bytes, this one's size
    for i, f in enumerate(files):
        other, n = files[(i + 1) % photos].read_bytes(), f.stat().st_size
        (alike / f"new-{i:04d}.JPG").write_bytes(other[:n].ljust(n, b"\0"))
    cases["(c) and as many look-alikes"] = plan_case(cfg, root, repeats, {})
    shutil.rmtree(alike)
    shutil.copytree(card, copy)
    twins = copies_of(card, copy)
    cases["(b) and a full copy of it"] = plan_case(cfg, root, repeats, twins)
    stage_args = embed.prepare_arguments(cfg, str(out), "bench")
    batch = {"image_uri": np.array([str(f) for f in files[:10]], dtype=object)}
    if len(embed.prepare_batch(batch, **stage_args)["image_uri"]) != 10:  # untimed: warm-up
        fail("the decode stage failed on the library's photos")
    stage = best(lambda: embed.prepare_batch(batch, **stage_args), repeats)
    data = files[0].read_bytes()
    ids = best(lambda: embed.file_ids(data, str(files[0])), repeats * 3)
    digest = best(lambda: embed.content_digest(data, str(files[0])), repeats * 3)
    mb = sum(f.stat().st_size for f in files) / 1e6
    return {
        "photos": photos,
        "width": size[0],
        "height": size[1],
        "library_mb": mb,
        "mean_file_mb": mb / photos,
        "cases": dict(sorted(cases.items())),
        "decode_stage_ms_per_photo": stage / len(files[:10]) * 1e3,
        # what find_twins computes of each file it reads whole: file_ids (content_id to match,
        # image_id for a twin's row); content_digest alone is the first
        "file_ids_ms": ids * 1e3,
        "content_digest_ms": digest * 1e3,
    }


# ------------------------------------------------------------------------------------------
# 3. End to end on Ray


def e2e_run(root: Path, out: Path, spec: str, on: bool, twins: dict[str, str]) -> dict[str, Any]:
    real = embed.find_twins
    embed.find_twins = real if on else _no_twins
    try:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        t0 = time.perf_counter()
        s = embed.run(embed.EmbedConfig(input=str(root), output=str(out), model=spec))
        wall = time.perf_counter() - t0
    finally:
        embed.find_twins = real
    inputs = {*twins, *twins.values()}
    seen = sum(s.nodes.get("embed", {}).values())
    table = storage.read_parquet(
        storage.join(str(out), embed.EMBEDDINGS), ["image_uri", "embedding"]
    )
    emb = dict(zip(table["image_uri"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    c = s.counts
    want = (len(twins) if on else 0, len(twins) if on else len(inputs))
    if (
        s.status != "ok"
        or (c.twins, seen) != want
        or (c.attempted, c.embedded) != (len(inputs),) * 2
        or set(emb) != inputs
        or table.num_rows != len(inputs)
        or (on and any(emb[t] != emb[o] for t, o in twins.items()))
    ):
        fail(
            f"run {spec} ({'on' if on else 'off'}): {s.status}, {c.twins} twins, model saw "
            f"{seen}, {c.attempted} attempted, {c.embedded} embedded, {len(emb)} rows; expected "
            f"{want[0]}, {want[1]}, {len(inputs)} rows (a copy's embedding its original's)"
        )
    shutil.rmtree(out)
    return {
        "wall_s": wall,
        "attempted": c.attempted,
        "twins": c.twins,
        "model_saw": seen,
        "seconds": s.seconds,
    }


def measure_e2e(
    work: Path, img: Any, photos: int, size: tuple[int, int], specs: list[str], repeats: int
) -> dict[str, Any]:
    import ray.data

    root = work / "e2e"
    make_library(root / "card", img, photos, size)
    shutil.copytree(root / "card", root / "import-again")
    twins = copies_of(root / "card", root / "import-again")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line a Dataset started and ended
    result: dict[str, Any] = {"photos": photos, "width": size[0], "height": size[1], "models": {}}
    try:
        result["cluster"] = f"{ray.cluster_resources()['CPU']:g} CPU"
        for spec in specs:
            warm = e2e_run(root, work / "e2e-out", spec, False, twins)  # untimed: Ray's start
            runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
            for _ in range(repeats):
                for mode in ("on", "off"):
                    runs[mode].append(e2e_run(root, work / "e2e-out", spec, mode == "on", twins))
            on, off = (min(runs[m], key=lambda r: r["wall_s"]) for m in ("on", "off"))
            result["models"][spec] = {
                "with": on,
                "without": off,
                "without_over_with": off["wall_s"] / on["wall_s"],
                "warm_up_wall_s": warm["wall_s"],
                "trials_s": {m: [r["wall_s"] for r in rs] for m, rs in runs.items()},
            }
    finally:
        ray.shutdown()
    return result


# ------------------------------------------------------------------------------------------


def print_tables(r: dict[str, Any]) -> None:
    hdr = f"{'attempted':>9} {'twins':>5} {'model saw':>9}"
    print(f"\n1. find_twins at scale: {r['scale'][0]['inputs']:,} inputs, no file read")
    print(
        f"{'sizes':<8} {'same_key s':>10} {'find_twins s':>12} {'ratio':>6} {'us/input':>8} "
        f"{'ends read':>18} {'expected':>8} {'MB':>6} {'S3 s (est.)':>11}"
    )
    for s in r["scale"]:
        print(
            f"{s['size_dist']:<8} {s['same_key_s']:>10.3f} {s['find_twins_s']:>12.3f} "
            f"{s['find_twins_over_same_key']:>6.2f} {s['find_twins_us_per_input']:>8.2f} "
            f"{s['ends_read']:>9,} ({s['ends_read_share']:>6.2%}) "
            f"{s['ends_read_share_expected']:>8.2%} {s['ends_read_mb']:>6.0f} "
            f"{s['s3_estimate_s']:>11.0f}"
        )
    p = r["plan"]
    print(
        f"\n2. plan of a first run: {p['photos']} JPEGs {p['width']}x{p['height']} "
        f"({p['mean_file_mb']:.2f} MB each)"
    )
    print(
        f"{'case':<30} {'inputs':>6} {'twins':>5} {'ends':>5} {'whole':>5} {'with s':>7} "
        f"{'without s':>9} {'ratio':>6} {'ms/twin':>7}"
    )
    for name, c in p["cases"].items():
        per = f"{c['ms_per_twin']:>7.2f}" if c["ms_per_twin"] is not None else f"{'':>7}"
        print(
            f"{name:<30} {c['inputs']:>6} {c['twins']:>5} {c['ends_read']:>5} "
            f"{c['whole_reads']:>5} {c['with_s']:>7.3f} {c['without_s']:>9.3f} "
            f"{c['with_over_without']:>6.2f} {per}"
        )
    print(
        f"decode stage (prepare_batch): {p['decode_stage_ms_per_photo']:.1f} ms a photo, what a "
        f"twin no longer costs before the model; file_ids {p['file_ids_ms']:.2f} ms, "
        f"content_digest alone {p['content_digest_ms']:.2f} ms"
    )
    if r["e2e"] is None:
        return
    e = r["e2e"]
    print(
        f"\n3. embed.run end to end: {e['photos']} JPEGs {e['width']}x{e['height']} and a copy "
        f"of each ({e['cluster']})"
    )
    print(f"{'model':<19} {'twins':<7} {'wall s':>6} {'plan s':>6} {'pipeline s':>10} " + hdr)
    for spec, m in e["models"].items():
        for name in ("with", "without"):
            x, t = m[name], m[name]["seconds"]
            print(
                f"{spec:<19} {name:<7} {x['wall_s']:>6.2f} {t['plan']:>6.2f} "
                f"{t['pipeline']:>10.2f} {x['attempted']:>9} {x['twins']:>5} {x['model_saw']:>9}"
            )
        print(f"{'':<19} without / with: {m['without_over_with']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="1: listed inputs (no files)")
    ap.add_argument("--photos", type=int, default=200, help="2: JPEGs in the library")
    ap.add_argument("--camera", type=size_arg, default=(6000, 4000), help="WxH of the picture")
    ap.add_argument("--library-photo", type=size_arg, default=(3000, 2000), help="2: WxH crops")
    ap.add_argument("--e2e-photos", type=int, default=100, help="3: JPEGs (and a copy of each)")
    ap.add_argument("--e2e-photo", type=size_arg, default=(1600, 1200), help="3: WxH crops")
    ap.add_argument("--e2e-model", default=SPEC, help="3: a model spec beside keeper-tiny:random")
    ap.add_argument("--e2e-repeats", type=int, default=2, help="3: runs with and without, each")
    ap.add_argument("--no-e2e", action="store_true", help="skip 3 (no Ray)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work-dir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/first-run-copies.json")
    args = ap.parse_args(argv)
    for w, h in (args.library_photo, args.e2e_photo):
        if w > args.camera[0] or h > args.camera[1]:
            ap.error("--library-photo and --e2e-photo must fit inside --camera")
    if min(args.inputs, args.photos, args.e2e_photos) < 2:
        ap.error("--inputs, --photos, --e2e-photos must be >= 2")
    if min(args.repeats, args.e2e_repeats) < 1:
        ap.error("--repeats, --e2e-repeats must be >= 1")
    if Path(LIBRARY).exists():
        ap.error(f"{LIBRARY} exists: part 1's inputs must not (nothing may open one)")
    opened = [0]

    def audit(event: str, a: tuple[Any, ...]) -> None:
        if event == "open" and a and str(a[0]).startswith(LIBRARY):
            opened[0] += 1

    sys.addaudithook(audit)
    load_before = list(os.getloadavg())
    scale = [measure_scale(args.inputs, d, args.repeats) for d in SIZE_DISTS]
    if opened[0]:
        fail(f"{opened[0]} files under {LIBRARY} were opened: part 1 reads nothing")
    work = Path(tempfile.mkdtemp(prefix="keeper-first-run-copies-", dir=args.work_dir)).resolve()
    try:
        img = picture(*args.camera)
        replan = measure_plan(work, img, args.photos, args.library_photo, args.repeats)
        specs = list(dict.fromkeys([SPEC, args.e2e_model]))
        e2e = (
            None
            if args.no_e2e
            else measure_e2e(work, img, args.e2e_photos, args.e2e_photo, specs, args.e2e_repeats)
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {
        "benchmark": "first_run_copies",
        "command": " ".join(["benchmarks/first_run_copies.py", *(argv or sys.argv[1:])]),
        "spec": SPEC,
        "repeats": args.repeats,
        "camera": list(args.camera),
        "twin_size_inputs": embed.TWIN_SIZE_INPUTS,
        "copy_tail_bytes": embed.COPY_TAIL_BYTES,
        "end_threads": embed._END_THREADS,
        "s3_request_s_assumed": S3_REQUEST_S,
        "work_dir": str(work.parent),
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
        "scale": scale,
        "plan": replan,
        "e2e": e2e,
        "image_opens_under_library": opened[0],
        # 1/5/15-minute load averages: anything else running shows here (2 cores)
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
    }
    print_tables(record)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
