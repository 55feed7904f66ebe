"""keeper pick on a generated camera library: grouping, keeper top-1, and its cost over embedding.

    .venv/bin/python benchmarks/pick.py [--bursts 1200] [--large-bursts 300] \
        [--train-bursts 400] [--work /tmp/keeper-bench-pick] [--out benchmarks/results/pick.json]

Library: ``keeper_core.synthetic_library.generate_library`` (two cameras, bursts at 5-15 frames/s,
scenes minutes apart, 5 % of scenes without EXIF time, exact and near duplicates), generated once
under ``--work`` (``library.csv`` is written last, so its presence means the library is whole).
1,200 bursts give about 5,300 JPEGs at 320x240. keeper pick never sees the truth: it is given
the folder, whose listing skips ``library.csv`` (not a photo).

Cost, side by side in one local Ray (``keeper_train.cluster.init_ray``, started once before every
timed run, so Ray's start-up is in neither figure): ``keeper embed`` alone (no capture metadata,
no thumbnails) and ``keeper pick`` with the zero-shot rule on the same folder, each into an empty
output, in the order embed, pick, pick, embed (one short untimed embed first starts Ray's worker
processes). Overhead = pick wall / embed wall - 1, per pair and over both. Pick's own per-stage
seconds (its summary) and both embeds' summed worker seconds say where the difference goes; a
one-process profile of ``prepare_batch``'s steps on ``--profile-images`` files says what each
extra step costs per image. Each timed run first waits (up to ``--quiet-wait`` s) for other
processes to take at most ``--quiet`` of the CPUs, records what they took meanwhile, and is
run again (``--attempts``) when they took more; the least disturbed attempt is kept. The profile
also times a pick's XMP sidecar, and variants the job does not run (the thumbnail as it was
before commit 0a8307b: Lanczos, Huffman optimisation, fsync; a sidecar with fsync, as written
beside the originals): what a change saved. The cost runs and the profile are repeated on a
second library of camera-size JPEGs (``--large-bursts`` series at ``--large-size``, default 1600x1200), where
decoding costs more and the same extra work weighs less.

Quality, against the generator's truth (``library.csv``), on the zero-shot picks:

- grouping: pairwise precision / recall / F1 of pick's ``group`` against ``series_id`` over the
  camera shots (``keeper_core.grouping.pairwise_scores``; planted copies left out);
- duplicate marks: per kind, a mark is right when the marked file and the one it points at are a
  planted copy and its source (either way round); precision over marks, recall over plants;
  wrong marks are counted by what they link (the same photo in another scene, the same burst),
  with the dHash distance of every mark to the shot it points at;
- keeper top-1 per true burst of >= 2 camera shots: is the true best shot decided ``keep``?
  For pick's zero-shot rule; the sharpness rule (highest ``sharpness`` in the true burst, from
  the same table); random (1 / burst size, expected); and a trained head (``--train-bursts`` > 0):
  an MLP on embedding + quality features trained with ``keeper_train.jobs.train_head`` on another
  library (``--train-seed``) without the demo's four test photos, registered in a fresh MLflow
  sqlite store under ``--work``, promoted by ``keeper_train.jobs.promote`` on that library's test
  split, and used by ``keeper pick model=models:/NAME@champion`` on the benchmark library. Its
  pick reuses the second zero-shot pick's output (table and thumbnails there: nothing is embedded
  again), so its wall time is a re-cull of an embedded library. Top-1 is also given on the bursts
  of those four photos alone, which the head never saw, and on the bursts whose best shot is not
  marked a near duplicate (such a mark rejects a shot whatever the ranker says).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's CPU accounting and machine.
from embed import CpuMonitor, disturbance, machine_info

from keeper_core import storage
from keeper_core.grouping import pairwise_scores

RANKER = "keeper-bench-pick-ranker"
PICK_STAGES = (
    "plan", "embed", "load", "backfill", "cull_group", "cull_rank", "cull_decide",
    "write_tables", "write_sheet", "write_xmp", "total",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Libraries


def make_library(folder: Path, **kwargs: Any) -> Path:
    """``generate_library(folder, **kwargs)`` once: an existing ``library.csv`` is reused."""
    from keeper_core.synthetic_library import generate_library

    manifest = folder / "library.csv"
    if manifest.exists():
        print(f"library: reusing {folder}", flush=True)
        return manifest
    print(f"library: generating {kwargs} into {folder} ...", flush=True)
    t0 = time.perf_counter()
    out = generate_library(folder, **kwargs)
    print(f"library: generated in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def read_truth(manifest: Path) -> pd.DataFrame:
    truth = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    truth["is_best"] = truth["is_best"].astype(int)
    truth["_k"] = truth["image_uri"].map(storage.same_key)
    return truth


# --------------------------------------------------------------------------------------------
# Cost: embed alone against pick, fresh outputs, one Ray


def run_embed(library: Path, out: Path, model: str) -> dict[str, Any]:
    from keeper_train.jobs import embed

    cfg = embed.EmbedConfig(
        input=str(library), output=str(out), model=model, capture=False, thumbnails=None
    )
    t0 = time.perf_counter()
    s = embed.run(cfg)
    wall = time.perf_counter() - t0
    if s.status != "ok" or s.counts.lost:
        raise RuntimeError(f"keeper embed did not finish cleanly: {s.counts}")
    return {"wall_s": round(wall, 3), "images": s.counts.embedded, "embed": _embed_figures(s)}


def run_pick(library: Path, out: Path, model: str) -> tuple[dict[str, Any], str]:
    from keeper_train.jobs import embed, pick

    cfg = pick.PickJobConfig(input=str(library), output=str(out), clip_model=model, zero_shot=True)
    t0 = time.perf_counter()
    s = pick.run(cfg)
    wall = time.perf_counter() - t0
    if s.status != "ok":
        raise RuntimeError(f"keeper pick did not finish cleanly: {s.counts}")
    inner = embed.EmbedSummary.model_validate_json(
        storage.read_bytes(storage.join(s.table, embed.SUMMARY))
    )
    res = {
        "wall_s": round(wall, 3),
        "images": s.counts["picked"],
        "seconds": s.seconds,
        "counts": s.counts,
        "sidecars": s.sidecars,
        "embed": _embed_figures(inner),
    }
    return res, s.outputs["picks_parquet"]


def _embed_figures(s: Any) -> dict[str, Any]:
    """An embed summary's timings: its seconds and its workers' summed seconds per image."""
    n = max(s.counts.embedded, 1)
    return {
        "embedded": s.counts.embedded,
        "seconds": s.seconds,
        "images_per_s": s.images_per_s,
        "seconds_to_first_part": s.seconds_to_first_part,
        "worker_seconds": s.worker_seconds,
        "worker_ms_per_image": {k: round(1000 * v / n, 3) for k, v in s.worker_seconds.items()},
    }


def cost(
    library: Path, runs: Path, mon: CpuMonitor, args: argparse.Namespace
) -> tuple[dict[str, Any], str]:
    """embed, pick, pick, embed; returns the runs, the overheads and the last pick's picks."""
    from keeper_train.cluster import init_ray
    from keeper_train.jobs import embed

    t0 = time.perf_counter()
    cluster = init_ray(None)
    ray_init_s = time.perf_counter() - t0
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    t0 = time.perf_counter()
    warmup = embed.EmbedConfig(
        input=str(library), output=str(runs / "warm-up"), model=args.model, limit=128
    )
    warm = embed.run(warmup)
    warm_s = time.perf_counter() - t0
    print(f"ray up in {ray_init_s:.1f} s ({cluster}); warm-up embed of 128 in {warm_s:.1f} s")

    done: list[dict[str, Any]] = []
    picks_uri = ""
    for i, kind in enumerate(("embed", "pick", "pick", "embed"), start=1):
        best: dict[str, Any] | None = None
        best_uri = ""
        for attempt in range(1, args.attempts + 1):
            r, uri = timed_run(i, kind, attempt, library, runs, mon, args)
            share = disturbance(r["cpu"])
            # Contention only ever slows a run down: the least disturbed attempt is kept.
            if best is None or share < disturbance(best["cpu"]):
                best, best_uri = r, uri
            if share <= args.quiet:
                break
        assert best is not None
        best["attempts"] = attempt
        done.append(best)
        picks_uri = best_uri or picks_uri
    e1, p1, p2, e2 = done

    def over(key: str, picks: Sequence[dict[str, Any]], embeds: Sequence[dict[str, Any]]) -> float:
        return sum(key_of(p, key) for p in picks) / sum(key_of(e, key) for e in embeds) - 1

    def key_of(r: dict[str, Any], key: str) -> float:
        return float(r["wall_s"] if key == "wall" else r["cpu"]["own_cpu_s"])

    overhead = {
        f"{key}_{name}": over(key, p, e)
        for key in ("wall", "own_cpu")
        for name, p, e in (
            ("pair_a", [p1], [e1]),
            ("pair_b", [p2], [e2]),
            ("both", [p1, p2], [e1, e2]),
        )
    }
    return {
        "ray_init_s_outside_timings": round(ray_init_s, 2),
        "cluster": cluster,
        "warm_up": {"images": warm.counts.embedded, "wall_s": round(warm_s, 2)},
        "runs": done,
        "overhead": {k: round(v, 4) for k, v in overhead.items()},
        "goal": "overhead <= 0.15",
    }, picks_uri


def timed_run(
    i: int,
    kind: str,
    attempt: int,
    library: Path,
    runs: Path,
    mon: CpuMonitor,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], str]:
    """One embed or pick into a fresh output, after waiting for a quiet machine."""
    out = runs / f"{i}-{kind}-attempt{attempt}"
    waited = mon.wait_quiet(args.quiet, max_wait=args.quiet_wait)
    into: dict[str, Any] = {}
    picks_uri = ""
    with mon.section(into):
        if kind == "embed":
            r = run_embed(library, out, args.model)
        else:
            r, picks_uri = run_pick(library, out, args.model)
    r = {"run": i, "kind": kind, "attempt": attempt, "output": str(out), **r, "cpu": into["cpu"]}
    r["cpu"]["waited_for_quiet_s"] = round(waited, 1)
    print(
        f"  run {i} {kind:5s} (attempt {attempt}): {r['wall_s']:7.1f} s wall, {r['images']} "
        f"images, own CPU {r['cpu']['own_cpu_s']:.0f} s, others took "
        f"{r['cpu']['foreign_share']:.0%} of the CPUs (after waiting {waited:.0f} s)",
        flush=True,
    )
    gc.collect()
    return r, picks_uri


def cost_large(args: argparse.Namespace, work: Path, mon: CpuMonitor) -> dict[str, Any]:
    """The same cost runs and profile on a library of camera-size JPEGs: decode costs more."""
    w, h = (int(v) for v in args.large_size.lower().split("x"))
    kwargs = {"n_bursts": args.large_bursts, "seed": args.seed, "image_size": (w, h)}
    manifest = make_library(
        work / f"library-seed{args.seed}-b{args.large_bursts}-{w}x{h}", **kwargs
    )
    images = len(pd.read_csv(manifest))
    runs, _ = cost(manifest.parent, work / "runs-large", mon, args)
    n = min(args.profile_images, images)
    profile = profile_prepare(manifest.parent, args.model, n, work / "profile-large")
    return {
        "library": {**kwargs, "image_size": [w, h]},
        "images": images,
        "cost": runs,
        "profile": profile,
    }


def profile_prepare(library: Path, spec: str, n: int, scratch: Path) -> dict[str, Any]:
    """Milliseconds per image of each step of ``prepare_batch`` and of an XMP sidecar's write,
    one process, one torch thread; beside them, variants the job does not run (what a change
    saved)."""
    import hashlib

    import torch

    from keeper_core.capture import capture_row, read_capture
    from keeper_core.contact_sheet import thumbnail_jpeg, thumbnail_name
    from keeper_core.grouping import dhash
    from keeper_core.handback import write_sidecar
    from keeper_core.preparation import ImagePreparation
    from keeper_train.jobs import embed

    uris = embed.list_inputs(str(library))[0][:n]
    prep = ImagePreparation(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray decode task (1 CPU)
    ms: dict[str, float] = defaultdict(float)
    decoded = []

    def timed(step: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        ms[step] += 1000 * (time.perf_counter() - t0) / len(uris)
        return out

    try:
        for k, uri in enumerate(uris):
            data = timed("read", storage.read_bytes, uri)
            img = timed("decode", prep.decode, data, source=uri)
            timed("resize", prep.resize, img)
            image_id = timed("sha256", lambda d: hashlib.sha256(d).hexdigest(), data)
            timed("dhash", dhash, img.image)
            timed(
                "capture",
                lambda d, u: capture_row(read_capture(d, mtime=embed.file_mtime(u), source=u)),
                data,
                uri,
            )
            thumb = timed("thumbnail_encode", thumbnail_jpeg, img.image)
            dest = storage.join(str(scratch), thumbnail_name(image_id))
            timed("thumbnail_write", storage.write_bytes, dest, thumb, durable=False)  # as the job
            decoded.append(img)
            # Not the job's: the thumbnail as it was before commit 0a8307b (Lanczos, Huffman
            # optimisation; written with an fsync).
            timed("(thumbnail_encode, Lanczos + optimize)", _lanczos_thumbnail, img.image)
            timed("(thumbnail_write, with fsync)", storage.write_bytes, dest + ".fsync", thumb)
            # keeper pick's sidecar of a new photo, mirrored under OUTPUT (as the job writes it:
            # one exiv2 pass since 2026-12-07, two before, then a write without fsync); then the
            # parts and a variant.
            xmp = str(scratch / "xmp" / f"{k:05d}.xmp")
            fields = {"group": "g000001", "rank": "1", "decision": "keep", "reasons": "sharpest"}
            sidecar = {"rating": 5, "label": "Green", "keeper_fields": fields}
            timed("xmp_sidecar", write_sidecar, xmp, **sidecar, durable=False)
            packet = Path(xmp).read_bytes()
            timed("(xmp: its write alone)", storage.write_bytes, xmp + ".w", packet, durable=False)
            timed(
                "(xmp_sidecar with fsync: --xmp beside)",
                write_sidecar,
                xmp[:-4] + "b.xmp",
                **sidecar,
            )
        for i in range(0, len(decoded), 16):  # the job's decode batch: features are vectorised
            timed("quality_features", prep.quality, decoded[i : i + 16])
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(scratch, ignore_errors=True)
    both = ("read", "decode", "resize", "sha256", "quality_features", "dhash")
    extra = ("capture", "thumbnail_encode", "thumbnail_write")
    return {
        "images": len(uris),
        "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
        "embed_steps_ms": round(sum(ms[k] for k in both), 3),
        "pick_extra_ms": round(sum(ms[k] for k in extra), 3),
        "pick_extra_share": round(sum(ms[k] for k in extra) / sum(ms[k] for k in both), 4),
        "note": "embed_steps: what prepare_batch does for keeper embed (dhash included: it is "
        "computed without capture too); pick_extra: what keeper pick's embed adds per image "
        "(capture, thumbnail); xmp_sidecar is pick's write stage, per photo; names in "
        "parentheses are variants the job does not run, for comparison",
    }


def _lanczos_thumbnail(image: Any) -> bytes:
    """contact_sheet.thumbnail_jpeg as it was before commit 0a8307b (RGB input)."""
    import io

    from PIL import Image

    from keeper_core.contact_sheet import THUMB_SIZE

    w, h = image.size
    scale = min(1.0, THUMB_SIZE / max(w, h))
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    filt = Image.Resampling.LANCZOS
    thumb = image if target == image.size else image.resize(target, filt, reducing_gap=3.0)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80, optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Quality against the truth


def read_picks(uri: str) -> pd.DataFrame:
    """A pick run's picks, with each photo's dHash from the run's embedding table."""
    from keeper_train.jobs import embed

    picks = storage.read_parquet(uri).to_pandas()
    table = storage.join(storage.parent(uri), "table", embed.EMBEDDINGS)
    hashes = storage.read_parquet(table).to_pandas()[["image_uri", "dhash"]]
    picks = picks.merge(hashes, on="image_uri", how="left")
    picks["_k"] = picks["image_uri"].astype(str).map(storage.same_key)
    return picks


def grouping_scores(picks: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    shots = truth[truth["duplicate_of"] == ""]
    both = shots.merge(picks[["_k", "group"]], on="_k", how="inner")
    precision, recall, f1 = pairwise_scores(both["series_id"].tolist(), both["group"].tolist())
    keepers = picks.assign(k=picks["decision"] == "keep").groupby("group")["k"].sum()
    return {
        "camera_shots": len(shots),
        "scored": len(both),
        "true_series": int(both["series_id"].nunique()),
        "groups": int(both["group"].nunique()),
        "groups_all_files": int(picks["group"].nunique()),
        "groups_without_a_keeper": int((keepers == 0).sum()),
        "pair_precision": round(precision, 4),
        "pair_recall": round(recall, 4),
        "pair_f1": round(f1, 4),
    }


def duplicate_scores(picks: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Marks against plants, per kind: a mark is right when it links a planted copy and its
    source (either way round: the kept one of two exact copies is the first by URI). Wrong
    marks are told apart by what they link, and every mark's dHash distance is counted."""
    from keeper_core.culling import RECORDED_TIMES
    from keeper_core.grouping import GroupingConfig

    series, photo, copy_of, best, camera = (
        dict(zip(truth["_k"], truth[c], strict=True))
        for c in ("series_id", "base_photo", "duplicate_of", "is_best", "camera")
    )
    hashes = dict(zip(picks["_k"], picks["dhash"], strict=True))
    copies = truth[truth["duplicate_of"] != ""]
    planted: dict[str, set[frozenset[str]]] = {"exact": set(), "near": set()}
    for uri, src, deg in zip(
        copies["_k"], copies["duplicate_of"], copies["degradation"], strict=True
    ):
        kind = "near" if "reencode:" in deg else "exact"
        planted[kind].add(frozenset((uri, storage.same_key(src))))
    max_bits, max_gap = GroupingConfig().near_duplicate_max_hamming, GroupingConfig().max_gap_s
    recorded = set(picks["_k"][picks["time_source"].isin(RECORDED_TIMES)])
    ts = dict(zip(picks["_k"], picks["capture_ts"], strict=True))
    out: dict[str, Any] = {"near_duplicate_max_hamming": max_bits}
    for kind, plants in planted.items():
        marked = picks[picks["duplicate_kind"] == kind]
        sources = marked["duplicate_of"].astype(str).map(storage.same_key)
        links = list(zip(marked["_k"], sources, strict=True))
        right = [(a, b) for a, b in links if frozenset((a, b)) in plants]
        wrong = [(a, b) for a, b in links if frozenset((a, b)) not in plants]
        shots = [(a, b) for a, b in wrong if not copy_of[a] and not copy_of[b]]
        same_burst = [(a, b) for a, b in shots if series[a] == series[b]]
        reshoot = [(a, b) for a, b in shots if series[a] != series[b] and photo[a] == photo[b]]
        bits = [bin((int(hashes[a]) ^ int(hashes[b])) & (2**64 - 1)).count("1") for a, b in links]
        out[kind] = {
            "planted": len(plants),
            "marked": len(links),
            "right": len(right),
            "precision": round(len(right) / len(links), 4) if links else 1.0,
            "recall": round(len({frozenset(p) for p in right}) / len(plants), 4) if plants else 1.0,
            "wrong_between_camera_shots": len(shots),
            "wrong_same_true_burst": len(same_burst),
            "wrong_same_photo_other_scene": len(reshoot),
            "wrong_same_photo_other_scene_other_camera": sum(
                camera[a] != camera[b] for a, b in reshoot
            ),
            # find_duplicates never links two recorded moments more than max_gap_s apart: such
            # a mark comes through a chain of links (a component), e.g. via a file-time shot.
            "wrong_one_end_file_time_only": sum(
                a not in recorded or b not in recorded for a, b in shots
            ),
            "wrong_both_recorded_apart": sum(
                a in recorded and b in recorded and abs(ts[a] - ts[b]) > max_gap for a, b in shots
            ),
            "dhash_bits_to_marked_source": np.bincount(bits).tolist() if bits else [],
            "marks_beyond_max_hamming": sum(b > max_bits for b in bits),
            "best_shots_marked": sum(best[a] == 1 and not copy_of[a] for a, _ in links),
        }
    return out


def top1(
    truth: pd.DataFrame, zero_shot: pd.DataFrame, head: pd.DataFrame | None, unseen: Sequence[str]
) -> dict[str, Any]:
    """Keeper top-1 per true burst of >= 2 camera shots, all bursts and the unseen photos'.

    Also on the bursts whose best shot is not marked a near duplicate (of a shot elsewhere):
    such a mark rejects the shot whatever the ranker says.
    """
    shots = truth[truth["duplicate_of"] == ""]
    cols = ["_k", "decision", "sharpness", "duplicate_kind"]
    df = shots.merge(zero_shot[cols], on="_k", how="inner")
    if head is not None:
        df = df.merge(head[["_k", "decision"]].rename(columns={"decision": "head"}), on="_k")
    size = df.groupby("series_id")["series_id"].transform("size")
    df = df[size >= 2].reset_index(drop=True)
    by = df.assign(_keep=(df["decision"] == "keep").astype(int)).groupby("series_id")
    per = by.agg(
        n=("is_best", "size"), base_photo=("base_photo", "first"), keepers=("_keep", "sum")
    )
    best = df[df["is_best"] == 1].set_index("series_id")
    if len(best) != len(per):
        raise RuntimeError(f"{len(per)} true bursts but {len(best)} best shots among the picks")
    per["best_near_marked"] = best["duplicate_kind"] == "near"
    per["zero_shot"] = (best["decision"] == "keep").astype(float)
    sharpest = df.loc[by["sharpness"].idxmax()].set_index("series_id")  # first of a tie
    per["sharpness"] = sharpest["is_best"].astype(float)
    per["random"] = 1.0 / per["n"]
    methods = ["zero_shot", "sharpness", "random"]
    if head is not None:
        per["head"] = (best["head"] == "keep").astype(float)
        methods.append("head")
    out: dict[str, Any] = {}
    for name, sub in (("all", per), ("unseen_photos", per[per["base_photo"].isin(list(unseen))])):
        clean = sub[~sub["best_near_marked"]]
        out[name] = {
            "bursts": len(sub),
            "mean_shots": round(float(sub["n"].mean()), 3),
            **{m: round(float(sub[m].mean()), 4) for m in methods},
            "bursts_with_one_zero_shot_keeper": int((sub["keepers"] == 1).sum()),
            "best_marked_near_duplicate": int(sub["best_near_marked"].sum()),
            "best_not_near_marked": {
                "bursts": len(clean),
                **{m: round(float(clean[m].mean()), 4) for m in methods},
            },
        }
    return out


# --------------------------------------------------------------------------------------------
# A trained head, on another library


def train_ranker(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train (Ray Train) -> register @challenger -> promote on that library's test split."""
    import mlflow

    from keeper_core.synthetic import PHOTOS
    from keeper_train import tracking
    from keeper_train.jobs import embed, promote, train_head
    from keeper_train.jobs.demo import DEMO_TEST_PHOTOS, quiet_libraries

    photos = [p for p in PHOTOS if p not in DEMO_TEST_PHOTOS]
    t0 = time.perf_counter()
    folder = work / f"train-library-seed{args.train_seed}-b{args.train_bursts}"
    manifest = make_library(
        folder, n_bursts=args.train_bursts, seed=args.train_seed, singles_fraction=0.0,
        photos=photos, mtime_only_fraction=0.0,
    )  # fmt: skip
    seconds = {"library": time.perf_counter() - t0}
    t0 = time.perf_counter()
    slug = args.model.replace(":", "_").replace("/", "_")
    table = str(work / f"train-table-seed{args.train_seed}-b{args.train_bursts}-{slug}")
    emb = embed.run(
        embed.EmbedConfig(input=str(manifest), output=table, model=args.model, capture=False)
    )
    seconds["embed"] = time.perf_counter() - t0
    store = work / "mlflow"
    shutil.rmtree(store, ignore_errors=True)  # a fresh registry: this run's head is version 1
    store.mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with quiet_libraries():
        t0 = time.perf_counter()
        trained = train_head.run(
            train_head.TrainHeadConfig.model_validate(
                {
                    "embeddings": table,
                    "series": str(manifest),
                    "head": "mlp",
                    "features": "embedding+quality",
                    "epochs": args.epochs,
                    "storage": str(store / "checkpoints"),
                    "tracking_uri": uri,
                    "data_dir": str(store),
                    "register": RANKER,
                }
            )
        )
        seconds["train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        split = tracking.training_split(mlflow.MlflowClient(uri), trained["run_id"])
        if split is None:
            raise RuntimeError(f"training run {trained['run_id']} recorded no split")
        test_uris = set(split.loc[split["split"] == "test", "image_uri"].astype(str))
        lib = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        test_manifest = store / "test-manifest.csv"
        lib[lib["image_uri"].isin(test_uris)].to_csv(test_manifest, index=False)
        promoted = promote.run(
            promote.PromoteConfig(
                name=RANKER,
                embeddings=table,
                series=str(test_manifest),
                tracking_uri=uri,
                data_dir=str(store),
            )
        )
        seconds["promote"] = time.perf_counter() - t0
    return {
        "library": str(folder),
        "bursts": args.train_bursts,
        "seed": args.train_seed,
        "photos": photos,
        "images_embedded_this_run": emb.counts.embedded,
        "images": emb.counts.in_,
        "series": trained["series"],
        "epochs_run": trained["epochs_run"],
        "test_on_own_library": trained["test"],
        "promotion": {k: v for k, v in promoted.items() if k != "table"},
        "tracking_uri": uri,
        "store": str(store),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def pick_with_head(library: Path, out: str, ranker: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """keeper pick with models:/RANKER@champion, into an output already holding table + thumbs."""
    from keeper_train.jobs import pick

    cfg = pick.PickJobConfig(
        input=str(library),
        output=out,
        model=f"models:/{RANKER}@champion",
        tracking_uri=ranker["tracking_uri"],
        data_dir=ranker["store"],
    )
    t0 = time.perf_counter()
    s = pick.run(cfg)
    wall = time.perf_counter() - t0
    if s.status != "ok":
        raise RuntimeError(f"keeper pick with the head did not finish cleanly: {s.counts}")
    res = {"wall_s": round(wall, 3), "ranker": s.ranker, "seconds": s.seconds, "counts": s.counts}
    return res, s.outputs["picks_parquet"]


# --------------------------------------------------------------------------------------------
# Report


def print_cost(c: dict[str, Any], title: str) -> None:
    print(f"\nCost: keeper embed alone vs keeper pick (zero-shot), {title}\n")
    print(
        "| run | wall s | img/s | own CPU s | others | embed s | decode ms/img | cull s | write s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in c["runs"]:
        e, sec = x["embed"], x.get("seconds", {})
        is_pick = x["kind"] == "pick"
        cull = sum(sec.get(k, 0.0) for k in ("cull_group", "cull_rank", "cull_decide"))
        write = sum(sec.get(k, 0.0) for k in ("write_tables", "write_sheet", "write_xmp"))
        print(
            f"| {x['run']}. {x['kind']} | {x['wall_s']:.1f} | {x['images'] / x['wall_s']:.1f} | "
            f"{x['cpu']['own_cpu_s']:.0f} | {x['cpu']['foreign_share']:.0%} | "
            f"{sec['embed'] if is_pick else x['wall_s']:.1f} | "
            f"{e['worker_ms_per_image']['read_decode_features']:.2f} | "
            + (f"{cull:.2f} | {write:.2f} |" if is_pick else "| |")
        )
    print()
    for name, v in c["overhead"].items():
        print(f"- overhead {name}: {v:+.1%}" + (" (goal <= +15 %)" if "wall" in name else ""))
    picks = [x for x in c["runs"] if x["kind"] == "pick"]
    print("\nkeeper pick's stages (s)\n")
    print("| stage | " + " | ".join(f"run {x['run']}" for x in picks) + " |")
    print("| --- |" + " ---: |" * len(picks))
    for k in PICK_STAGES:
        print(
            f"| {k} | "
            + " | ".join(f"{x['seconds'].get(k, float('nan')):.2f}" for x in picks)
            + " |"
        )


def print_profile(p: dict[str, Any], title: str) -> None:
    print(f"\nper image, one process ({p['images']} images, {title}), ms\n")
    print("| step | ms |\n| --- | ---: |")
    for k, v in p["ms_per_image"].items():
        print(f"| {k} | {v:.3f} |")
    print(
        f"\nembed's steps {p['embed_steps_ms']:.2f} ms; pick's extra (capture + thumbnail) "
        f"{p['pick_extra_ms']:.2f} ms = {p['pick_extra_share']:+.1%}"
    )


def print_tables(r: dict[str, Any]) -> None:
    """The results as Markdown tables (docs/benchmarks.md takes them as they are)."""
    size = "x".join(str(v) for v in r["config"]["library"]["image_size"])
    print_cost(r["cost"], f"{r['config']['images']} JPEGs at {size}")
    print_profile(r["profile"], size)
    if "large" in r:
        big = r["large"]
        size = "x".join(str(v) for v in big["library"]["image_size"])
        print_cost(big["cost"], f"{big['images']} JPEGs at {size}")
        print_profile(big["profile"], size)
    g = r["grouping"]
    print(
        f"\nGrouping: {g['scored']} camera shots, {g['true_series']} true bursts, {g['groups']} "
        f"groups: pairwise precision {g['pair_precision']:.4f}, recall {g['pair_recall']:.4f}, "
        f"F1 {g['pair_f1']:.4f}; {g['groups_without_a_keeper']} of {g['groups_all_files']} "
        "groups (all files) without a keeper\n"
    )
    print(
        "| marks | planted | marked | right | precision | recall | wrong: same photo, other "
        "scene (other camera) | wrong: one end has a file time only | wrong: both recorded, "
        "> max_gap_s apart | wrong: same burst | beyond the dHash bound | best shots marked |"
    )
    print("| --- |" + " ---: |" * 11)
    for kind in ("exact", "near"):
        d = r["duplicates"][kind]
        print(
            f"| {kind} | {d['planted']} | {d['marked']} | {d['right']} | {d['precision']:.3f} | "
            f"{d['recall']:.3f} | {d['wrong_same_photo_other_scene']} "
            f"({d['wrong_same_photo_other_scene_other_camera']}) | "
            f"{d['wrong_one_end_file_time_only']} | {d['wrong_both_recorded_apart']} | "
            f"{d['wrong_same_true_burst']} | {d['marks_beyond_max_hamming']} | "
            f"{d['best_shots_marked']} |"
        )
    t = r["top1"]
    names = {
        "zero_shot": "keeper pick, zero-shot rule",
        "head": "keeper pick, trained head (@champion)",
        "sharpness": "sharpness rule (argmax in the true burst)",
        "random": "random (expected)",
    }
    cols = [
        (t["all"], "all"),
        (t["all"]["best_not_near_marked"], "all, best not near-marked"),
        (t["unseen_photos"], "unseen photos"),
        (t["unseen_photos"]["best_not_near_marked"], "unseen, best not near-marked"),
    ]
    print("\nKeeper top-1 per true burst of >= 2 shots\n")
    print("| method | " + " | ".join(f"{n} ({d['bursts']})" for d, n in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for m, label in names.items():
        if m in t["all"]:
            print(f"| {label} | " + " | ".join(f"{d[m]:.1%}" for d, _ in cols) + " |")


def code_version() -> dict[str, Any]:
    """The commit measured, its packages/ tree, and any uncommitted change under packages/."""
    import subprocess

    def git(*a: str) -> str:
        out = subprocess.run(["git", *a], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "subject": git("log", "-1", "--format=%s")[:120],
        "packages_tree": git("rev-parse", "HEAD:packages"),  # changes only with the code
        "uncommitted_in_packages": git("status", "--porcelain", "--", "packages").splitlines(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bursts", type=int, default=1200, help="series of the benchmark library")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="320x240", help="WIDTHxHEIGHT of every shot")
    p.add_argument("--exact-duplicates", type=int, default=40)
    p.add_argument("--near-duplicates", type=int, default=40)
    p.add_argument("--mtime-only", type=float, default=0.05, help="scenes without EXIF time")
    p.add_argument("--model", default="keeper-tiny:random", help="ModelSpec to embed with")
    p.add_argument("--train-bursts", type=int, default=400, help="0: no trained head")
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=40, help="of the trained head")
    p.add_argument(
        "--large-bursts",
        type=int,
        default=300,
        help="series of a second, camera-size library for the cost alone (0: none)",
    )
    p.add_argument("--large-size", default="1600x1200", help="its WIDTHxHEIGHT")
    p.add_argument("--profile-images", type=int, default=256)
    p.add_argument("--quiet", type=float, default=0.1, help="others' CPU share to wait for")
    p.add_argument("--quiet-wait", type=float, default=300.0, help="most seconds to wait")
    p.add_argument("--attempts", type=int, default=2, help="tries of a disturbed run")
    p.add_argument("--work", type=Path, default=Path("/tmp/keeper-bench-pick"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pick.json"))
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))

    # Progress bars only garble the log of a background run; they change no measured work.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    t_start = time.perf_counter()
    work = args.work.resolve()
    lib_kwargs = {
        "n_bursts": args.bursts,
        "seed": args.seed,
        "image_size": (w, h),
        "exact_duplicates": args.exact_duplicates,
        "near_duplicates": args.near_duplicates,
        "mtime_only_fraction": args.mtime_only,
    }
    name = (
        f"library-seed{args.seed}-b{args.bursts}-{w}x{h}-e{args.exact_duplicates}"
        f"-n{args.near_duplicates}-m{args.mtime_only:g}"
    )
    manifest = make_library(work / name, **lib_kwargs)
    library = manifest.parent
    truth = read_truth(manifest)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {
            "library": {**lib_kwargs, "image_size": [w, h], "folder": str(library)},
            "images": len(truth),
            "camera_shots": int((truth["duplicate_of"] == "").sum()),
            "model": args.model,
            "embed_config": "EmbedConfig defaults (batch 64, decode batch 16, 1 CPU per actor) "
            "for both; pick's embed adds capture=True, thumbnails=OUTPUT",
            "work": str(work),
            "notes": "random CLIP weights: grouping similarity and near-duplicate cosines rest on "
            "embeddings without meaning (the dHash guard decides near duplicates)",
        },
        "machine": machine_info(),
        "code": code_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": os.getloadavg(),
    }
    import ray

    mon = CpuMonitor()
    try:
        report["cost"], picks_uri = cost(library, work / "runs", mon, args)
        report["profile"] = profile_prepare(
            library, args.model, args.profile_images, work / "profile"
        )
        if args.large_bursts > 0:
            report["large"] = cost_large(args, work, mon)
        zero_shot = read_picks(picks_uri)
        report["grouping"] = grouping_scores(zero_shot, truth)
        report["duplicates"] = duplicate_scores(zero_shot, truth)
        head = None
        if args.train_bursts > 0:
            ranker = train_ranker(args, work)
            report["trained_head"] = ranker
            if ranker["promotion"]["decision"] == "promoted":
                out = str(Path(picks_uri).parent)  # the last zero-shot pick's output, re-culled
                res, head_uri = pick_with_head(library, out, ranker)
                report["trained_head"]["pick"] = res
                head = read_picks(head_uri)
        from keeper_train.jobs.demo import DEMO_TEST_PHOTOS

        report["top1"] = top1(truth, zero_shot, head, DEMO_TEST_PHOTOS)
        report["unseen_photos"] = list(DEMO_TEST_PHOTOS)
    finally:
        ray.shutdown()
        mon.stop()
    report["loadavg_end"] = os.getloadavg()
    code = {k: v for k, v in code_version().items() if k not in ("commit", "subject")}
    if code != {k: v for k, v in report["code"].items() if k not in ("commit", "subject")}:
        # Others commit while this runs: a run that straddles a change measures neither version.
        report["code_changed_during_run"] = code_version()
        print("WARNING: the code changed during the run: see code_changed_during_run")
    report["runtime_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print_tables(report)
    print(f"\nbenchmark runtime {report['runtime_s']:.0f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
