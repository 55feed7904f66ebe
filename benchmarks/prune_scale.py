"""What finding and pruning gone files costs ``keeper embed``'s plan, at table scale.

    .venv/bin/python benchmarks/prune_scale.py [--rows 1000000] [--gone 0.01] [--repeats 3] \
        [--layout scattered] [--dim 0] [--size-dist uniform] [--new 10000] [--copies 100] \
        [--work-dir DIR] [--out benchmarks/results/prune-scale.json]

Every plan of a listed folder now walks the whole output table once more: ``find_gone`` (a dict
lookup a row in the listing's stamps, which ``plan`` already holds; ``same_key`` only for rows not
listed as written), given ``set(keys)``, the one set ``plan`` builds for it. With ``prune``,
``EmbeddedParts.remove`` rewrites the parts holding gone rows; ``check_prune`` returns at once
under ``max_prune_fraction`` and, only over it, asks ``held_elsewhere`` (every row's stamp; then
the ids of the parts holding gone rows or rows of their sizes) which of them another row holds
before it refuses. Each is measured here against the pass every plan already made over the same
table, ``check_changes`` with every row listed and unchanged (it reads no file then), side by side
in this one process: seconds, microseconds per table row, and the ratio over ``check_changes``.

The table (under a temporary folder in ``--work-dir``, removed at the end) is ``--rows`` rows in
parts of 1,024 (``EmbedConfig.rows_per_file``'s default) named as the job names them, written with
``storage.write_parquet``: ``image_uri`` (absolute paths under a library root that does not exist:
no image is ever opened, and the script counts ``open`` audit events under it to show so),
``image_id`` and ``content_id`` (random 64-hex), ``file_size`` (1-12 MB: ``--size-dist uniform``,
or ``normal``, bunched as a camera's JPEGs are: mean 8 MB, sd 1.5 MB, clipped to 1-12 MB, which
puts ~0.4% of the rows at exactly 12 MB) and ``file_mtime_ns``; with ``--dim`` D, an
``embedding`` column of D float32 as well (what makes a real part large; the default, 0, leaves
it out). ``--gone`` of the rows are of files not listed,
spread over the table (``--layout scattered``: photos culled here and there) or one run of rows
(``clustered``: a folder deleted); half of them were moved: the table also holds, from the start
and in parts at its end (where ``reuse_moved`` writes them), a row under the new name with the same
``file_size``, ``image_id`` and ``content_id``, listed. The errors table is an empty folder.

Measured, each the best of ``--repeats`` (interleaved, so drift hits every row alike; a full
``gc.collect`` before each trial, untimed), with the peak RSS each adds (VmHWM reset before it):

(a) ``check_changes``, every row listed with its stamp: the baseline;
(b) ``find_gone``, every row listed (nothing gone; ``listed`` the dict of stamps, as ``plan``
    passes it): what every plan now adds, with ``set(keys)`` as ``plan`` builds it at the call;
    beside it, not added: ``held_elsewhere(embedded, set())``, which returns at once;
(c) ``find_gone`` with ``--gone`` of the rows not listed;
(d) ``held_elsewhere`` on those rows (checked: it returns exactly the moved half): only a prune
    over ``max_prune_fraction`` asks it;
(f) ``check_prune`` end to end over its limit: ``max_prune_fraction`` set between the share of
    rows gone and the share of those not moved (3/4 of the gone share), so it goes over, asks
    ``held_elsewhere``, and lets the rest through (checked: it does not raise, asks
    ``held_elsewhere`` once; untimed, with the fraction halved below the rest's share it raises);
(e) once: ``EmbeddedParts.remove`` of the gone rows, on a copy of the table (seconds, parts
    rewritten), at ``REWRITE_THREADS`` parts at once and, on another copy, one at a time (as
    before);
(g) ``_copy_candidates(embedded, todo, stamps)``, what ``reuse_moved`` now asks for the inputs
    to embed: ``todo`` is ``--new`` new inputs (not in the table; sizes drawn from
    ``--size-dist``, as the table's) and ``--copies`` copies of random rows (their size), and
    ``stamps`` the listing (the table's rows and those). No file exists or is read: only the
    sizes matter. Checked once against the table's sizes counted apart (numpy): the map holds
    exactly the rows of each input size that 1 to ``COPY_SIZE_ROWS`` rows share, and every copy's
    size is in it, with its row, unless more than ``COPY_SIZE_ROWS`` rows share it (counted).
    Reported: how many of the new inputs (not copies) have a size in the map (``reuse_moved``
    reads the last ``COPY_TAIL_BYTES`` of each, and of its rows' files, in the driver: a whole
    read only where those match; before that check it read each whole, in vain, and its decode
    read it again), the MB such whole reads would have been, and
    the rows the map holds. Beside it, with no table (numpy, the same rule over ``--rows`` sizes
    drawn in memory), that share for both size distributions, and what it is expected to be
    (the rows of a size being Poisson).

Every count is checked as it is made; a wrong one exits non-zero before anything is printed.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))  # procmem; embed (at the end)

from procmem import memory_mb, reset_peak

from keeper_core import storage
from keeper_core.errors import DataError
from keeper_train import table as table_module
from keeper_train.jobs import embed
from keeper_train.table import EmbeddedParts, ErrorRows

SPEC = "keeper-tiny:random"
ROWS_PER_PART = 1024  # EmbedConfig.rows_per_file's default
#: Where the rows' files would be. It must not exist: nothing measured may open an image.
LIBRARY = "/keeper-prune-scale-library/photos"
SIZE_RANGE = (1_000_000, 12_000_000)  # file_size, bytes: a camera JPEG's spread
SIZE_NORMAL = (8_000_000, 1_500_000)  # --size-dist normal: mean, sd (clipped to SIZE_RANGE)
SIZE_DISTS = ("uniform", "normal")
MTIME_0 = 1_600_000_000 * 10**9  # file_mtime_ns: 2020-09, plus up to ~5 years


def photo(i: int) -> str:
    return f"{LIBRARY}/{i // 1000:04d}/{i:07d}.jpg"


def moved_photo(i: int) -> str:
    return f"{LIBRARY}/moved/{i // 1000:04d}/{i:07d}.jpg"


def fail(message: str) -> None:
    raise SystemExit(f"prune_scale: {message}")


def draw_sizes(rng: np.random.Generator, n: int, dist: str) -> np.ndarray:
    """``n`` file sizes (int64 bytes) from ``dist``: uniform over SIZE_RANGE, or normal
    (SIZE_NORMAL), rounded and clipped to SIZE_RANGE."""
    lo, hi = SIZE_RANGE
    if dist == "uniform":
        return rng.integers(lo, hi + 1, n, dtype=np.int64)
    mean, sd = SIZE_NORMAL
    return np.clip(np.rint(rng.normal(mean, sd, n)), lo, hi).astype(np.int64)


def hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    h = rng.bytes(32 * n).hex()
    return [h[i * 64 : (i + 1) * 64] for i in range(n)]


# ------------------------------------------------------------------------------------------
# The table


@dataclass
class Table:
    """What was written: every row's URI (the listing, in table order) and stamp, and which rows
    are of files gone (not listed) and which of those have a moved row."""

    uris: list[str]
    stamps: dict[str, storage.Stamp]
    gone: set[str]
    moved: set[str]  # the gone rows whose content a moved row holds
    sizes: np.ndarray  # every row's file_size, in the order of ``uris``
    parts: int
    mb: float


def build(
    out: Path, rows: int, gone: int, layout: str, dim: int, size_dist: str, seed: int = 0
) -> Table:
    """``rows`` rows under ``out/embeddings``: ``rows - gone // 2`` photos, then a moved row for
    every other gone one (in parts of their own, at the end, as ``reuse_moved`` writes them)."""
    rng = np.random.default_rng(seed)
    n_moved = gone // 2
    n_orig = rows - n_moved
    if layout == "scattered":
        gone_idx = np.sort(rng.choice(n_orig, gone, replace=False))
    else:
        start = int(rng.integers(0, n_orig - gone + 1))
        gone_idx = np.arange(start, start + gone)
    moved_idx = gone_idx[1::2]  # half of them (gone // 2)
    uris = [photo(i) for i in range(n_orig)] + [moved_photo(int(i)) for i in moved_idx]
    sizes = draw_sizes(rng, rows, size_dist)
    mtimes = MTIME_0 + rng.integers(0, 5 * 365 * 86400 * 10**9, rows, dtype=np.int64)
    image_ids, content_ids = hex_ids(rng, rows), hex_ids(rng, rows)
    for k, i in enumerate(moved_idx, start=n_orig):  # the same file under its new name
        sizes[k] = sizes[i]
        image_ids[k], content_ids[k] = image_ids[i], content_ids[i]
    folder = out / embed.EMBEDDINGS
    folder.mkdir(parents=True)
    parts = 0
    # originals and moved rows in parts of their own: a moved row is copied into a new part
    for lo_all, hi_all in ((0, n_orig), (n_orig, rows)):
        for lo in range(lo_all, hi_all, ROWS_PER_PART):
            hi = min(lo + ROWS_PER_PART, hi_all)
            cols: dict[str, pa.Array] = {
                "image_id": pa.array(image_ids[lo:hi], pa.string()),
                "image_uri": pa.array(uris[lo:hi], pa.string()),
                embed.CONTENT_ID: pa.array(content_ids[lo:hi], pa.string()),
                "file_size": pa.array(sizes[lo:hi], pa.int64()),
                "file_mtime_ns": pa.array(mtimes[lo:hi], pa.int64()),
            }
            if dim:
                emb = rng.standard_normal((hi - lo, dim), dtype=np.float32)
                cols["embedding"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.reshape(-1)), dim
                )
            name = embed._part_name(uris[lo:hi])
            storage.write_parquet(pa.table(cols), str(folder / name))
            parts += 1
    stamps = {
        u: storage.Stamp(s, m)
        for u, s, m in zip(uris, sizes.tolist(), mtimes.tolist(), strict=True)
    }
    gone_uris = {uris[i] for i in gone_idx.tolist()}
    moved_uris = {uris[i] for i in moved_idx.tolist()}
    mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    if len(gone_uris) != gone or len(moved_uris) != n_moved or len(set(uris)) != rows:
        fail(f"built {len(gone_uris)} gone, {len(moved_uris)} moved, {len(set(uris))} rows")
    return Table(uris, stamps, gone_uris, moved_uris, sizes, parts, mb)


# ------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Trials:
    times: list[float]
    peak_mb: list[float]

    def best(self) -> float:
        return min(self.times)


def trial(fn: Callable[[], Any], trials: Trials) -> Any:
    """Time ``fn()`` once (a full collection first, untimed) and note the peak RSS it added."""
    gc.collect()
    rss, _ = memory_mb()
    reset_peak()
    t0 = time.perf_counter()
    result = fn()
    trials.times.append(time.perf_counter() - t0)
    trials.peak_mb.append(memory_mb()[1] - rss)
    return result


@contextmanager
def counting(name: str, module: Any = table_module) -> Iterator[list[int]]:
    """Count calls of ``module``'s function ``name`` (looked up by name there; by default
    ``keeper_train.table``)."""
    real = getattr(module, name)
    calls = [0]
    lock = threading.Lock()  # EmbeddedParts.update calls _rewrite_without on threads

    def counted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            calls[0] += 1
        return real(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, real)


def measure(
    work: Path, t: Table, repeats: int, new: int, copies: int, size_dist: str
) -> dict[str, Any]:
    out = work / "out"
    dst = str(out)
    src = LIBRARY
    exclude = [dst]  # as plan passes them: [dst, *cfg.exclude]
    cfg = embed.EmbedConfig(input=src, output=dst, model=SPEC)
    cap = max(cfg.max_bytes, cfg.max_raw_bytes)
    rows = len(t.uris)

    # Every plan's first read: its parts _IO_THREADS at once, beside one at a time (as before),
    # interleaved; the table was just written (in the page cache) for both.
    folder, threads = storage.join(dst, embed.EMBEDDINGS), table_module._IO_THREADS
    read_times: dict[str, list[float]] = {"threads": [], "one": []}
    for _ in range(repeats):
        for mode in ("threads", "one"):
            table_module._IO_THREADS = threads if mode == "threads" else 1
            try:
                t0 = time.perf_counter()
                embedded = EmbeddedParts.read(folder)
                read_times[mode].append(time.perf_counter() - t0)
            finally:
                table_module._IO_THREADS = threads
    read_s, read_one_s = min(read_times["threads"]), min(read_times["one"])
    (out / embed.ERRORS).mkdir()
    t0 = time.perf_counter()
    errors = ErrorRows.read(storage.join(dst, embed.ERRORS))
    errors_s = time.perf_counter() - t0
    # plan's first walk (and the first hash of every table URI, cached on the str after it)
    t0 = time.perf_counter()
    duplicates = embedded.dedupe()
    dedupe_s = time.perf_counter() - t0
    held = sum(len(u) for u in embedded.by_part.values())
    if held != rows or len(embedded.by_part) != t.parts or duplicates or errors.by_part:
        fail(f"read {held} rows in {len(embedded.by_part)} parts, {duplicates} duplicates")

    # The listing, as plan holds it: every file (or all but the gone ones) with its stamp.
    inputs = t.uris
    keys = [storage.same_key(u) for u in inputs]
    listed = dict(t.stamps)
    by_key = {k: t.stamps[u] for u, k in zip(inputs, keys, strict=True)}
    all_keys = set(keys)
    some_listed = {u: st for u, st in t.stamps.items() if u not in t.gone}
    some_keys = {storage.same_key(u) for u in some_listed}
    # check_prune over its limit, the rest (gone, not moved) within it: 3/4 of the gone share
    lost, kept = len(t.gone), len(t.gone) - len(t.moved)
    over = embed.EmbedConfig(
        input=src, output=dst, model=SPEC, prune=True, max_prune_fraction=0.75 * lost / rows
    )
    if not kept <= over.max_prune_fraction * rows < lost:
        fail(f"max_prune_fraction {over.max_prune_fraction}: not between {kept} and {lost} rows")
    # (g): the inputs to embed, new ones and copies of rows, in a listing that holds the table's
    inputs_g = todo_inputs(t, new, copies, size_dist)
    listing = {**listed, **inputs_g.stamps}
    todo = inputs_g.todo
    copy_map: list[dict[int, list[str]]] = []

    def check_changes() -> None:
        c = embed.check_changes(embedded, listed, by_key, cap=cap)
        if c.changed or c.restamped or c.stamped or c.unlisted:
            fail(
                f"check_changes found {len(c.changed)} changed, {c.restamped} restamped, "
                f"{c.stamped} stamped, {len(c.unlisted)} unlisted sizes: expected none"
            )

    def find_gone_none() -> None:
        g = embed.find_gone(embedded, errors, src, listed, all_keys, exclude)
        if g.embedded or g.failed or g.under != rows:
            fail(f"find_gone, all listed: {len(g.embedded)} gone, {g.under} under of {rows}")

    def gone_sets() -> None:
        b = set(keys)  # what plan builds for the call
        if len(b) != rows:
            fail(f"set(keys): {len(b)} of {rows}")

    def held_elsewhere_none() -> None:
        with counting("_read_columns") as read:
            got = embed.held_elsewhere(embedded, set())
        if got or read[0]:
            fail(f"held_elsewhere of no rows returned {len(got)}, read {read[0]} parts")

    def find_gone_some() -> None:
        g = embed.find_gone(embedded, errors, src, some_listed, some_keys, exclude)
        if g.embedded != t.gone or g.failed or g.under != rows:
            fail(f"find_gone: {len(g.embedded)} gone of {len(t.gone)}, {g.under} under of {rows}")

    def held_elsewhere_some() -> None:
        got = embed.held_elsewhere(embedded, t.gone)
        if got != t.moved:
            fail(f"held_elsewhere: {len(got)} rows ({len(got & t.moved)} moved) of {len(t.moved)}")

    def held_elsewhere_some_one() -> None:  # as before _IO_THREADS: a part's ids at a time
        table_module._IO_THREADS = 1
        try:
            held_elsewhere_some()
        finally:
            table_module._IO_THREADS = threads

    def check_prune_over() -> None:
        with counting("held_elsewhere", embed) as asked:
            try:
                embed.check_prune(t.gone, rows, over, embedded)
            except DataError as e:
                fail(f"check_prune refused {lost} rows, {kept} not moved: {e}")
        if asked[0] != 1:
            fail(f"check_prune over its limit asked held_elsewhere {asked[0]} times, not once")

    def copy_candidates() -> None:
        got = embed._copy_candidates(embedded, todo, listing)
        if len(got) != inputs_g.want_sizes:
            fail(f"_copy_candidates: {len(got)} sizes, expected {inputs_g.want_sizes}")
        copy_map[:] = [got]

    steps: dict[str, tuple[str, Callable[[], None]]] = {
        "check_changes": ("(a) check_changes, every row listed, unchanged", check_changes),
        "find_gone_none": ("(b) find_gone, every row listed", find_gone_none),
        "gone_sets": ("(b) set(keys) for its call", gone_sets),
        "held_elsewhere_none": (
            "    held_elsewhere of no rows (at once; not in b)",
            held_elsewhere_none,
        ),
        "find_gone_some": ("(c) find_gone, gone rows not listed", find_gone_some),
        "held_elsewhere_some": (
            "(d) held_elsewhere (only a prune over max_prune_fraction)",
            held_elsewhere_some,
        ),
        "held_elsewhere_some_one": (
            "    the same, one part at a time (before)",
            held_elsewhere_some_one,
        ),
        "check_prune_over": (
            "(f) check_prune over its limit, half held elsewhere",
            check_prune_over,
        ),
        "copy_candidates": (
            f"(g) _copy_candidates, {new:,} new + {copies:,} copies to embed",
            copy_candidates,
        ),
    }
    trials = {k: Trials([], []) for k in steps}
    for _ in range(repeats):  # interleaved: drift on the machine hits every row alike
        for k, (_, fn) in steps.items():
            trial(fn, trials[k])

    # Parts held_elsewhere reads the ids of (untimed: a count, once)
    with counting("_read_columns") as read:
        embed.held_elsewhere(embedded, t.gone)
    ids_parts_read = read[0]
    # Untimed, once: under its limit check_prune asks nothing; below the rest's share it refuses.
    under = embed.EmbedConfig(
        input=src, output=dst, model=SPEC, prune=True, max_prune_fraction=lost / rows
    )
    with counting("held_elsewhere", embed) as asked:
        embed.check_prune(t.gone, rows, under, embedded)
    if asked[0]:
        fail("check_prune within its limit asked held_elsewhere")
    refused_at = 0.5 * kept / rows
    try:
        embed.check_prune(
            t.gone, rows, over.model_copy(update={"max_prune_fraction": refused_at}), embedded
        )
    except DataError as e:
        if f"{kept} of the table's {rows} rows" not in str(e):
            fail(f"check_prune refused, but not the {kept} rows not moved: {e}")
    else:
        fail(f"check_prune let {kept} rows of {rows} through at max_prune_fraction {refused_at}")
    # at least these: the parts holding gone rows
    want = sum(1 for uris in embedded.by_part.values() if not t.gone.isdisjoint(uris))

    copied = check_copy_map(t, inputs_g, copy_map[0])
    removed = measure_remove(work, out, t)
    base = trials["check_changes"].best()
    result_steps: dict[str, dict[str, Any]] = {
        k: {
            "step": label,
            "s": trials[k].best(),
            "trials_s": trials[k].times,
            "us_per_row": trials[k].best() / rows * 1e6,
            "over_check_changes": trials[k].best() / base,
            "peak_rss_growth_mb": max(trials[k].peak_mb),
        }
        for k, (label, _) in steps.items()
    }
    removed["over_check_changes"] = removed["s"] / base
    removed["us_per_row"] = removed["s"] / rows * 1e6
    every_plan = sum(result_steps[k]["s"] for k in ("find_gone_none", "gone_sets"))
    with_gone = sum(result_steps[k]["s"] for k in ("find_gone_some", "gone_sets"))
    over_limit = with_gone + result_steps["check_prune_over"]["s"] + removed["s"]
    return {
        "load": {
            "embedded_parts_read_s": read_s,
            "embedded_parts_read_threads": threads,
            "embedded_parts_read_one_at_a_time_s": read_one_s,
            "dedupe_s": dedupe_s,
            "error_rows_read_s": errors_s,
        },
        "steps": result_steps,
        "remove": removed,
        "held_elsewhere_parts_read": ids_parts_read,
        "parts_holding_gone_rows": want,
        "copies": copied,
        "check_prune": {
            "lost_rows": lost,
            "held_elsewhere_rows": len(t.moved),
            "under": rows,
            "max_prune_fraction": over.max_prune_fraction,
            "refused_at_max_prune_fraction": refused_at,
        },
        "totals": {
            "every_plan_adds_s": every_plan,
            "every_plan_adds_over_check_changes": every_plan / base,
            "with_gone_adds_s": with_gone,
            "with_gone_adds_over_check_changes": with_gone / base,
            "with_prune_adds_s": with_gone + removed["s"],
            "with_prune_adds_over_check_changes": (with_gone + removed["s"]) / base,
            "with_prune_over_limit_adds_s": over_limit,
            "with_prune_over_limit_adds_over_check_changes": over_limit / base,
        },
    }


@dataclass
class TodoInputs:
    """(g)'s inputs to embed: ``new`` (not in the table) then ``copies`` (each of ``sources``' row,
    its size), their stamps, and how many sizes ``_copy_candidates`` must return."""

    todo: list[str]
    stamps: dict[str, storage.Stamp]
    new_sizes: np.ndarray
    sources: np.ndarray  # the row (index into Table.uris) each copy copies
    want_sizes: int


def size_counts(sizes: np.ndarray, of: np.ndarray) -> np.ndarray:
    """How many of ``sizes`` equal each of ``of``."""
    values, counts = np.unique(sizes, return_counts=True)
    at = np.minimum(np.searchsorted(values, of), len(values) - 1)
    return np.where(values[at] == of, counts[at], 0)


def todo_inputs(t: Table, new: int, copies: int, size_dist: str, seed: int = 1) -> TodoInputs:
    rng = np.random.default_rng(seed)
    new_sizes = draw_sizes(rng, new, size_dist)
    sources = rng.choice(len(t.uris), copies, replace=False)
    copy_sizes = t.sizes[sources]
    mtimes = MTIME_0 + rng.integers(0, 5 * 365 * 86400 * 10**9, new + copies, dtype=np.int64)
    todo = [f"{LIBRARY}/new/{i // 1000:04d}/{i:07d}.jpg" for i in range(new)]
    todo += [f"{LIBRARY}/copies/{i:07d}.jpg" for i in range(copies)]
    sizes = np.concatenate([new_sizes, copy_sizes])
    stamps = {
        u: storage.Stamp(s, m)
        for u, s, m in zip(todo, sizes.tolist(), mtimes.tolist(), strict=True)
    }
    if len(stamps) != new + copies or not t.stamps.keys().isdisjoint(stamps):
        fail(f"(g): {len(stamps)} inputs to embed of {new + copies}, or some in the table")
    distinct = np.unique(sizes)
    c = size_counts(t.sizes, distinct)
    want = int(np.count_nonzero((c >= 1) & (c <= embed.COPY_SIZE_ROWS)))
    return TodoInputs(todo, stamps, new_sizes, sources, want)


def check_copy_map(t: Table, g: TodoInputs, got: dict[int, list[str]]) -> dict[str, Any]:
    """Check what ``_copy_candidates`` returned against the table's sizes counted here, and
    count what ``reuse_moved`` would read of it."""
    limit = embed.COPY_SIZE_ROWS
    copy_sizes = t.sizes[g.sources]
    distinct = np.unique(np.concatenate([g.new_sizes, copy_sizes]))
    c = size_counts(t.sizes, distinct)
    want_sizes = distinct[(c >= 1) & (c <= limit)]
    rows_of: dict[int, set[str]] = {}
    for i in np.flatnonzero(np.isin(t.sizes, want_sizes)).tolist():
        rows_of.setdefault(int(t.sizes[i]), set()).add(t.uris[i])
    if set(got) != set(rows_of):
        fail(
            f"_copy_candidates returned {len(got)} sizes, {len(set(got) - set(rows_of))} not "
            f"expected; {len(rows_of)} expected"
        )
    for size, names in got.items():
        if len(names) != len(rows_of[size]) or set(names) != rows_of[size]:
            fail(
                f"_copy_candidates: size {size}: {len(names)} rows, "
                f"{len(set(names) - rows_of[size])} not of it; {len(rows_of[size])} expected"
            )
    # every copy: its size in the map, with the row it copies, unless > limit rows share it
    over = 0
    cc = size_counts(t.sizes, copy_sizes)
    for i, size, n in zip(g.sources.tolist(), copy_sizes.tolist(), cc.tolist(), strict=True):
        if n > limit:
            over += 1
            if size in got:
                fail(f"a copy's size {size}, shared by more than {limit} rows, is in the map")
        elif size not in got or t.uris[i] not in got[size]:
            fail(f"a copy of {t.uris[i]} (size {size}) is not in the map with its row")
    n_new = len(g.new_sizes)
    nc = size_counts(t.sizes, g.new_sizes)
    in_map = np.isin(g.new_sizes, np.fromiter(got, dtype=np.int64, count=len(got)))
    if not np.array_equal(in_map, (nc >= 1) & (nc <= limit)):
        fail("_copy_candidates: the new inputs of a size in the map are not those expected")
    return {
        "new": n_new,
        "copies": len(g.sources),
        "copy_size_rows": limit,
        "map_sizes": len(got),
        "map_rows": sum(len(v) for v in got.values()),
        "new_in_map": int(in_map.sum()),
        "new_in_map_share": float(in_map.sum()) / n_new,
        "new_in_map_mb": float(g.new_sizes[in_map].sum()) / 1e6,
        "new_size_of_no_row": int(np.count_nonzero(nc == 0)),
        "new_size_over_limit": int(np.count_nonzero(nc > limit)),
        "copies_in_map": len(g.sources) - over,
        "copies_over_limit": over,
    }


def poisson_1_to(lam: np.ndarray | float, k: int) -> np.ndarray:
    """P(1 <= X <= k), X Poisson of mean ``lam``."""
    lam = np.asarray(lam, dtype=np.float64)
    term, total = np.exp(-lam), np.zeros_like(lam)
    for j in range(1, k + 1):
        term = term * lam / j
        total = total + term
    return total


def expected_share(rows: int, dist: str, k: int = embed.COPY_SIZE_ROWS) -> float:
    """The share of new inputs expected to have a size that 1 to ``k`` of ``rows`` rows share,
    their sizes and the rows' drawn from ``dist`` (a size's rows: Poisson, of mean ``rows``
    times its probability)."""
    lo, hi = SIZE_RANGE
    if dist == "uniform":
        p = 1 / (hi - lo + 1)
        return float(poisson_1_to(rows * p, k))
    mean, sd = SIZE_NORMAL

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-(x - mean) / (sd * math.sqrt(2)))

    # the ends: every draw below lo (above hi) is lo (hi); inside, a byte's probability is the
    # density there (bins of ~1,000 bytes: it hardly changes over one)
    ends = np.array([cdf(lo + 0.5), 1 - cdf(hi - 0.5)])
    edges = np.linspace(lo + 0.5, hi - 0.5, 11_001)
    mid, width = (edges[1:] + edges[:-1]) / 2, np.diff(edges)
    density = np.exp(-0.5 * ((mid - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    inside = np.sum(width * density * poisson_1_to(rows * density, k))
    return float(inside + np.sum(ends * poisson_1_to(rows * ends, k)))


def share_in_memory(rows: int, new: int, dist: str, seed: int = 2) -> dict[str, Any]:
    """(g)'s share with no table: ``rows`` sizes and ``new`` inputs' drawn from ``dist`` in
    memory, counted by the rule of ``_copy_candidates``."""
    rng = np.random.default_rng(seed)
    table, inputs = draw_sizes(rng, rows, dist), draw_sizes(rng, new, dist)
    c = size_counts(table, inputs)
    hit = (c >= 1) & (c <= embed.COPY_SIZE_ROWS)
    return {
        "rows": rows,
        "new": new,
        "new_in_map": int(hit.sum()),
        "new_in_map_share": float(hit.sum()) / new,
        "new_size_over_limit": int(np.count_nonzero(c > embed.COPY_SIZE_ROWS)),
        "expected_share": expected_share(rows, dist),
    }


def measure_remove(work: Path, out: Path, t: Table) -> dict[str, Any]:
    """``EmbeddedParts.remove`` of the gone rows, once on a copy of the table with one part
    rewritten at a time (as it was before ``REWRITE_THREADS``), then once on a fresh copy at
    the default: the same rows, the same parts, each copy just written (in the page cache)."""
    threads = table_module.REWRITE_THREADS
    try:
        table_module.REWRITE_THREADS = 1
        one = _remove_once(work, out, t)
    finally:
        table_module.REWRITE_THREADS = threads
    at_default = _remove_once(work, out, t)
    return {
        **at_default,
        "rewrite_threads": threads,
        "one_thread_s": one["s"],
        "one_thread_peak_rss_growth_mb": one["peak_rss_growth_mb"],
        "one_thread_over_threads": one["s"] / at_default["s"],
    }


def _remove_once(work: Path, out: Path, t: Table) -> dict[str, Any]:
    copy = work / "copy"
    shutil.copytree(out / embed.EMBEDDINGS, copy / embed.EMBEDDINGS)
    folder = storage.join(str(copy), embed.EMBEDDINGS)
    parts = EmbeddedParts.read(folder)
    parts.uris()  # hashed, as in plan (dedupe and errors.remove have walked them)
    before = len(parts.by_part)
    holding = sum(1 for uris in parts.by_part.values() if not t.gone.isdisjoint(uris))
    emptied = sum(1 for uris in parts.by_part.values() if t.gone.issuperset(uris))
    gc.collect()
    rss, _ = memory_mb()
    reset_peak()
    with counting("_rewrite_without") as rewrites:
        t0 = time.perf_counter()
        n = parts.remove(t.gone)
        s = time.perf_counter() - t0
    peak = memory_mb()[1] - rss
    after = EmbeddedParts.read(folder)
    left = after.uris()
    rows_left = sum(len(u) for u in after.by_part.values())
    if n != len(t.gone) or rewrites[0] != holding or rows_left != len(t.uris) - len(t.gone):
        fail(
            f"remove: {n} removed of {len(t.gone)}, {rewrites[0]} parts rewritten of {holding}, "
            f"{rows_left} rows left"
        )
    if not left.isdisjoint(t.gone) or len(after.by_part) != before - emptied:
        fail("remove: gone rows left in the table, or parts not deleted")
    shutil.rmtree(copy)
    return {
        "s": s,
        "rows_removed": n,
        "parts": before,
        "parts_rewritten": rewrites[0],
        "parts_deleted": emptied,
        "ms_per_part_rewritten": s / max(rewrites[0], 1) * 1e3,
        "peak_rss_growth_mb": peak,
    }


# ------------------------------------------------------------------------------------------


def print_table(record: dict[str, Any]) -> None:
    c, r = record["config"], record["result"]
    print(
        f"\nprune at table scale: {c['rows']:,} rows in {c['parts']:,} parts of {c['rows_per_part']:,}"
        f" ({record['table_mb']:.0f} MB), {c['gone_rows']:,} gone ({c['gone_fraction']:.1%}, "
        f"{c['layout']}), {c['moved_rows']:,} of them moved; embedding dim {c['dim']}"
    )
    ld = r["load"]
    print(
        f"context: EmbeddedParts.read {ld['embedded_parts_read_s']:.2f} s "
        f"({ld['embedded_parts_read_threads']} parts at once; one at a time "
        f"{ld['embedded_parts_read_one_at_a_time_s']:.2f} s), dedupe "
        f"{ld['dedupe_s']:.2f} s, ErrorRows.read (empty) {ld['error_rows_read_s'] * 1e3:.1f} ms"
    )
    w = 58
    print(f"\n{'step':<{w}} {'s':>8} {'us/row':>8} {'/ (a)':>7} {'peak MB':>8}")

    def row(label: str, s: float, us: float, ratio: float, peak: float) -> None:
        print(f"{label:<{w}} {s:>8.3f} {us:>8.2f} {ratio:>7.2f} {peak:>8.0f}")

    steps = r["steps"]
    for k, st in steps.items():
        if k not in ("check_prune_over", "copy_candidates"):
            row(st["step"], st["s"], st["us_per_row"], st["over_check_changes"],
                st["peak_rss_growth_mb"])  # fmt: skip
    rm = r["remove"]
    label = f"(e) remove, once ({rm['parts_rewritten']} of {rm['parts']} parts rewritten)"
    row(label, rm["s"], rm["us_per_row"], rm["over_check_changes"], rm["peak_rss_growth_mb"])
    label = "    the same, one part at a time (before)"
    row(label, rm["one_thread_s"], rm["one_thread_s"] / c["rows"] * 1e6,
        rm["one_thread_s"] / steps["check_changes"]["s"], rm["one_thread_peak_rss_growth_mb"])  # fmt: skip
    for k in ("check_prune_over", "copy_candidates"):
        st = steps[k]
        row(st["step"], st["s"], st["us_per_row"], st["over_check_changes"],
            st["peak_rss_growth_mb"])  # fmt: skip
    tot, cp = r["totals"], r["check_prune"]
    print(
        f"\nheld_elsewhere read the ids of {r['held_elsewhere_parts_read']} parts "
        f"({r['parts_holding_gone_rows']} hold gone rows)"
    )
    print(
        f"(f): {cp['lost_rows']:,} gone of {cp['under']:,} rows, max_prune_fraction "
        f"{cp['max_prune_fraction']:.4%}: over it, {cp['held_elsewhere_rows']:,} held elsewhere, "
        f"the rest within it (refused at {cp['refused_at_max_prune_fraction']:.4%})"
    )
    print(
        f"every plan of a listed folder now adds (b): {tot['every_plan_adds_s']:.3f} s, "
        f"{tot['every_plan_adds_over_check_changes']:.2f} x (a)"
    )
    print(
        f"with {c['gone_fraction']:.1%} gone, no prune (c + set): {tot['with_gone_adds_s']:.3f} s, "
        f"{tot['with_gone_adds_over_check_changes']:.2f} x (a); with prune (+ e): "
        f"{tot['with_prune_adds_s']:.3f} s, {tot['with_prune_adds_over_check_changes']:.2f} x (a)"
    )
    print(
        f"a prune over max_prune_fraction, half held elsewhere (c + set + f + e): "
        f"{tot['with_prune_over_limit_adds_s']:.3f} s, "
        f"{tot['with_prune_over_limit_adds_over_check_changes']:.2f} x (a)"
    )
    g, lim = r["copies"], r["copies"]["copy_size_rows"]
    print(
        f"\n(g) sizes {c['size_dist']}: the map holds {g['map_rows']:,} rows of {g['map_sizes']:,} "
        f"sizes; {g['new_in_map']:,} of the {g['new']:,} new inputs ({g['new_in_map_share']:.2%}, "
        f"{g['new_in_map_mb']:,.0f} MB) have a size in it: their ends compared (16 KB), not copies"
    )
    print(
        f"    new inputs of a size no row has {g['new_size_of_no_row']:,}, that > {lim} rows share "
        f"{g['new_size_over_limit']:,}; copies in the map {g['copies_in_map']:,} of "
        f"{g['copies']:,}, of a size > {lim} rows share {g['copies_over_limit']:,}"
    )
    print("(g) with no table (numpy, sizes drawn in memory): new inputs of a size in the map")
    for d, m in r["copies_in_memory"].items():
        print(
            f"    {d:<8} {m['new_in_map']:>6,} of {m['new']:,} ({m['new_in_map_share']:.2%}; "
            f"expected {m['expected_share']:.2%}) against {m['rows']:,} rows; "
            f"of a size > {lim} rows share {m['new_size_over_limit']:,}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in the embeddings table")
    ap.add_argument("--gone", type=float, default=0.01, help="fraction of rows not listed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--layout",
        choices=["scattered", "clustered"],
        default="scattered",
        help="gone rows spread over the table, or one run of rows (a folder)",
    )
    ap.add_argument("--dim", type=int, default=0, help="an embedding column this wide (0: none)")
    ap.add_argument(
        "--size-dist",
        choices=SIZE_DISTS,
        default="uniform",
        help="the rows' and new inputs' file sizes: uniform 1-12 MB, or normal (8 +- 1.5 MB)",
    )
    ap.add_argument("--new", type=int, default=10_000, help="(g): new inputs to embed")
    ap.add_argument("--copies", type=int, default=100, help="(g): inputs that copy a row")
    ap.add_argument("--work-dir", default=None, help="where the table goes (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/prune-scale.json")
    args = ap.parse_args(argv)
    gone = round(args.rows * args.gone)
    if gone < 2 or gone > args.rows // 2:
        ap.error("--gone must leave at least 2 gone rows, and no more than half the table")
    if args.repeats < 1 or args.dim < 0:
        ap.error("--repeats must be >= 1, --dim >= 0")
    if args.new < 1 or not 0 <= args.copies <= args.rows:
        ap.error("--new must be >= 1, --copies between 0 and --rows")
    if Path(LIBRARY).exists():
        ap.error(f"{LIBRARY} exists: the rows' files must not (nothing measured may open one)")

    opened = [0]

    def audit(event: str, a: tuple[Any, ...]) -> None:
        if event == "open" and a and str(a[0]).startswith(LIBRARY):
            opened[0] += 1

    sys.addaudithook(audit)
    load_before = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="keeper-prune-scale-", dir=args.work_dir)).resolve()
    try:
        t0 = time.perf_counter()
        t = build(work / "out", args.rows, gone, args.layout, args.dim, args.size_dist)
        build_s = time.perf_counter() - t0
        print(f"built {t.parts} parts in {build_s:.0f} s", file=sys.stderr)
        result = measure(work, t, args.repeats, args.new, args.copies, args.size_dist)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # (g)'s share for either size distribution, with no table (numpy): not measured, counted
    result["copies_in_memory"] = {d: share_in_memory(args.rows, args.new, d) for d in SIZE_DISTS}
    if opened[0]:
        fail(f"{opened[0]} files under {LIBRARY} were opened: nothing measured may read an image")

    # embed.py's description of the machine; imported only now: the torch it imports would be
    # in the heap every collection above walked, and plan's driver does not import it.
    from embed import machine_info, write_record

    record = {
        "benchmark": "prune_scale",
        "command": " ".join(["benchmarks/prune_scale.py", *(argv or sys.argv[1:])]),
        "config": {
            "rows": args.rows,
            "gone_fraction": args.gone,
            "gone_rows": gone,
            "moved_rows": gone // 2,
            "layout": args.layout,
            "dim": args.dim,
            "size_dist": args.size_dist,
            "new": args.new,
            "copies": args.copies,
            "rows_per_part": ROWS_PER_PART,
            "parts": t.parts,
            "repeats": args.repeats,
            "library": LIBRARY,
        },
        "table_mb": t.mb,
        "build_s": build_s,
        "result": result,
        "image_opens": opened[0],
        "work_dir": str(work.parent),
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
        # 1/5/15-minute load averages: anything else running shows here
        "load_avg_before": load_before,
        "load_avg_after": list(os.getloadavg()),
    }
    print_table(record)
    write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
