"""Unsupervised grouping of a photo library into bursts/scenes, and duplicate marking.

``group_shots`` chains each camera's shots in capture order: a shot joins the group of the shot
before it (same camera) unless the gap between them is longer than ``max_gap_s``, or their
embeddings differ (cosine below ``min_similarity``: the scene changed inside a quick sequence),
or the group is full (``max_group_len`` shots, or ``max_group_s`` seconds from its first shot).
Shots without a capture time are groups of one. Groups are numbered in time order, so the
numbering, like the grouping, does not depend on the order of the input rows.

``copy_runs`` finds the file times (a photo without an EXIF time is timed by its file's mtime)
that record a copy, not a capture: files written closer together, or more of them in a few
seconds, than anyone makes photos without a camera that writes EXIF time (``cp -r``, an unzip,
a sync, a batch export). Such a time is no evidence of a moment, so ``keeper pick`` groups those
photos as it does photos without a time: each alone.

``find_duplicates`` marks exact duplicates (the same ``image_id``: callers pass
``culling.copy_sets``, the same bytes or a JPEG's same bytes but for its metadata) and near
duplicates (embedding cosine >= ``near_duplicate_similarity`` between shots of different groups:
a re-encoded or resized copy, an export beside its original; or within one group, one exposure
twice: the same body and the same capture instant recorded to a fraction of a second, as a
resized export that kept its EXIF). ``pairwise_scores`` measures a grouping against true series
with pair counting.

The defaults of ``GroupingConfig`` were measured on ``keeper_core.synthetic_library`` (bursts at
5-15 frames/s, pauses inside a burst up to 1.5 s, scenes >= 2 s and ~90 s apart on average, two
cameras); the figures, and what they cannot say, are in the field descriptions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from keeper_core.errors import DataError
from keeper_core.scoring import check_embeddings

#: Cosines per block of the near-duplicate search: its scratch memory is O(_BLOCK_ELEMS) floats
#: (64 MB) whatever N is, so 50,000 x 512 fits on a laptop.
_BLOCK_ELEMS = 1 << 24
#: Neighbour pairs whose cosine is computed at once in ``group_shots`` (bounds the gathered rows).
_PAIR_CHUNK = 16_384
#: A hash bucket of more rows than this has its pairs compared by matrix products, not listed.
_HEAVY_BUCKET = 2048
#: Listing and testing one pair of a hash bucket, in cosines of a blocked scan: what decides
#: search="auto". benchmarks/pick_scale.py, 512-d, two cores: 32-67 ns a listed pair (bucketing
#: included), 7 ns a scanned cosine.
_PAIR_COST = 6.0
#: Edges gathered before they are merged into the components: bounds their memory when nearly
#: every pair passes (random-weight embeddings without hashes).
_EDGE_BATCH = 1 << 22
#: float32 cosine of two identical unit vectors can come out a few ulp below 1.0; without this
#: slack a threshold of 1.0 would miss byte-identical re-embeddings.
_COS_SLACK = 1e-6
#: Two recorded moments are one instant when they agree to the millisecond, the finest
#: resolution bodies write SubSecTimeOriginal in ("12" and "120" are one reading; an export copies
#: the tag). Burst frames at <= 15 frames/s are >= 66 ms apart.
_SAME_INSTANT_S = 0.0005

DUPLICATE_KINDS = ("exact", "near")


class GroupingConfig(BaseModel):
    """How ``group_shots`` cuts a camera's stream of shots into groups, and what is a duplicate.

    The figures in the field descriptions are pairwise F1 (``pairwise_scores``) of
    ``group_shots`` against the true series of two generated libraries,
    ``generate_library(n_bursts=160, seed=0)`` (743 camera shots) and ``n_bursts=1200`` (5,255),
    two cameras, 5% of scenes without EXIF time, scored on the camera shots (copies excluded).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_gap_s: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Consecutive shots of one camera further apart than this (seconds) never share a "
            "group. Time only, F1 (743 / 5,255 shots): 0.949 / 0.932 at 0.5 s and 0.970 / 0.964 "
            "at 1 s (pauses inside a burst split it), 1.000 / 1.000 at 2 s, 0.987 / 0.995 at 3 s, "
            "0.985 / 0.989 at 5 s, 0.970 / 0.971 at 10 s (quick scene changes merge). The "
            "generator pauses at most 1.5 s inside a burst and leaves at least 2 s between "
            "scenes, so 2 s being perfect there is by construction; it is the figure to measure "
            "again on a real library."
        ),
    )
    min_similarity: float = Field(
        default=0.5,
        ge=-1,
        le=1,
        description=(
            "Consecutive shots whose embedding cosine is below this never share a group: a scene "
            "change inside a quick sequence. -1 turns the check off (time only). With keeper's "
            "tiny random CLIP, neighbours within one burst had cosine 0.585-1.0 (1st percentile "
            "0.61) and neighbours from different scenes 0.87-0.89 at the median, up to 1.0: "
            "random weights cannot tell scenes apart and say little about a trained CLIP's "
            "cosines, so any threshold that bites only splits bursts (F1 at 2 s: 1.000 at 0.5, "
            "0.943 / 0.951 at 0.7, 0.895 / 0.896 at 0.8). Hence a conservative default that only "
            "splits neighbours that clearly differ: 0.5 changed nothing on either library (F1 "
            "1.000 at 2 s; 0.970 / 0.971 at 10 s, as time only). Not measured with trained "
            "weights (none offline)."
        ),
    )
    max_group_len: int = Field(
        default=100,
        ge=1,
        description=(
            "A group is split once it reaches this many shots: a long sports sequence at 20 "
            "frames/s gives 100 shots in 5 s; a longer group is for browsing, not for picking "
            "one keeper. A judgement: generated bursts (2-8 shots) never reach it."
        ),
    )
    max_group_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "... or once a shot would make the group span longer than this (seconds from its "
            "first shot): a 10-minute time-lapse at one frame every 2 s is a scene, not a burst, "
            "and is cut into 30 s pieces. A judgement: generated bursts last under 3 s."
        ),
    )
    copy_gap_s: float = Field(
        default=0.05,
        ge=0,
        description=(
            "A photo timed by its file's mtime (no EXIF time) whose file time is closer than "
            "this (seconds) to another file-timed photo's, of any camera, was written by a copy, "
            "not captured then (``copy_runs``): it is a group of its own, as a photo without a "
            "time. 50 ms is 20 files a second: ten times what a hand makes without a camera that "
            "writes EXIF time (screenshots, scans: a few a second at most), and faster than the "
            "5-15 frames/s bursts keeper_core.synthetic_library writes without EXIF time (60 ms "
            "apart at the closest in three libraries of 743-5,289 shots). A copy writes files "
            "milliseconds apart (``cp -r`` of 40 PNGs here: all within 3-16 ms), and files "
            "stamped with one time (a zip a web service built for a download) are 0 s apart. 0 "
            "turns this test off."
        ),
    )
    copy_files: int = Field(
        default=10,
        ge=2,
        description=(
            "... or when this many file-timed photos or more lie within ``copy_window_s``: a "
            "slower copy (a card reader, a network share, a sync at a few files a second) or a "
            "batch export (keeper_core.synthetic_library writes its exports 1 s apart). A "
            "judgement: ten files at one a second is a pace nobody keeps making screenshots or "
            "scans at, while the generator's bursts without EXIF time hold at most 8 shots and "
            "its scenes are >= 2 s and ~90 s apart. On those three libraries (5 % of scenes "
            "without EXIF time, 40 exports) the two tests set aside the 40 exports and no "
            "camera shot."
        ),
    )
    copy_window_s: float = Field(
        default=10.0,
        ge=0,
        description="The span ``copy_files`` must fall within (seconds); 0 turns this test off.",
    )
    near_duplicate_similarity: float = Field(
        default=0.98,
        gt=-1,
        le=1,
        description=(
            "Embedding cosine at or above which two shots in different groups are near "
            "duplicates (a re-encoded, resized or lightly edited copy); within a group, only "
            "two records of one exposure (same body, same sub-second instant). Copies "
            "re-encoded at 50-90% size and JPEG quality 60-85 had cosine >= 0.995 to their source under a "
            "16x12 pixel-correlation embedding, while later scenes re-shooting the same photo "
            "reached 0.9995: at 0.98 every copy was found, and 6 of 743 and 430 of 5,255 camera "
            "shots (each photo re-shot ~70 times) were marked too. The tiny random CLIP cannot "
            "measure this (shots of different scenes reach cosine 1.0; below 0.999 nearly every "
            "shot is marked). Not measured with trained weights; the pixel guard below keeps "
            "the mark honest whatever the embedding."
        ),
    )
    near_duplicate_max_hamming: int = Field(
        default=4,
        ge=0,
        le=64,
        description=(
            "A near duplicate must also look the same: the Hamming distance of the two shots' "
            "64-bit difference hashes (``dhash``: 9x8 grey, left-right gradient signs) at most "
            "this. A resize to half or a re-encode at quality 40 moved a photo's dHash by 0 "
            "bits, another crop of it by 18, a mirror image by 34; re-shoots of one textured "
            "photo (a page, a micrograph) in keeper_core.synthetic_library came within 5-11. It is what keeps random-weight embeddings (every "
            "cosine near 1) from marking everything, and a trained CLIP's 'same subject, "
            "another photo' from counting as a copy. 64 turns the guard off, and with it the "
            "hash-bucket search: every pair is then compared (~40 s at 100,000 photos, an hour at 1,000,000)."
        ),
    )


def dhash(image: Image.Image) -> int:
    """A 64-bit difference hash: signs of left-right gradients of a 9x8 grey thumbnail.

    Stable under resizing, re-encoding and small exposure changes; a different crop or framing
    changes a third or more of its bits. Returned as a signed int64 (Parquet has no uint64 that
    every reader takes); compare with ``np.bitwise_count(a ^ b)``.
    """
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).reshape(-1)
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def group_shots(
    capture_ts: np.ndarray,
    camera: Sequence[str],
    embeddings: np.ndarray,
    order_key: Sequence[str],
    config: GroupingConfig,
) -> np.ndarray:
    """Groups shots into bursts/scenes by capture time per camera and embedding similarity.

    Each camera's timed shots are sorted by ``(capture_ts, order_key)``; a shot starts a new group
    when the gap to the previous shot is longer than ``max_gap_s``, their cosine is below
    ``min_similarity``, the current group already has ``max_group_len`` shots, or the shot would
    make the group span longer than ``max_group_s``. A shot without a time (NaN) is a group of
    one. Groups are numbered ``0..G-1`` by their first shot's time, then camera, then order key
    (untimed groups last), so the result does not depend on the order of the rows.

    Costs O(N log N) for the sort and O(N * D) for the neighbour cosines: 50,000 shots group in
    a fraction of a second.

    Args:
        capture_ts: (N,) capture times in seconds (any epoch shared by a camera's shots); NaN
            when unknown. datetime64 times are read as seconds, NaT as unknown.
        camera: (N,) camera identifiers; shots of different cameras never share a group.
        embeddings: (N, D) unit-norm float32 embeddings.
        order_key: (N,) unique strings (e.g. ``image_uri``) that order shots with equal times.
        config: the grouping thresholds.

    Returns:
        (N,) int64 group numbers.

    Raises:
        DataError: lengths differ, a time is infinite, an order key repeats, a camera is not a
            string, or the embeddings are malformed.
    """
    ts = _times(capture_ts)
    n = ts.shape[0]
    cam = _codes(camera, n, "camera")
    key = _codes(order_key, n, "order_key", unique=True)
    emb = _embeddings(embeddings, n)
    if n == 0:
        return np.zeros(0, dtype=np.int64)

    timed = ~np.isnan(ts)
    order = np.lexsort((key, ts, cam))  # NaN times sort last within their camera
    s_ts, s_timed = ts[order], timed[order]
    link = (cam[order][1:] == cam[order][:-1]) & s_timed[1:] & s_timed[:-1]
    link &= np.diff(s_ts) <= config.max_gap_s
    if config.min_similarity > -1:
        pairs = np.flatnonzero(link)
        for c in range(0, len(pairs), _PAIR_CHUNK):  # gathers at most 2 x _PAIR_CHUNK rows
            p = pairs[c : c + _PAIR_CHUNK]
            cos = np.einsum("ij,ij->i", emb[order[p]], emb[order[p + 1]])
            link[p[cos < config.min_similarity]] = False

    start = np.ones(n, dtype=bool)
    start[1:] = ~link
    _split_long_runs(start, s_ts, config.max_group_len, config.max_group_s)

    # Number groups by (first shot's time, camera, order key); NaN sorts last.
    firsts = order[start]
    rank = np.empty(len(firsts), dtype=np.int64)
    rank[np.lexsort((key[firsts], cam[firsts], ts[firsts]))] = np.arange(len(firsts))
    groups = np.empty(n, dtype=np.int64)
    groups[order] = rank[np.cumsum(start) - 1]
    return groups


def copy_runs(capture_ts: np.ndarray, file_time: np.ndarray, config: GroupingConfig) -> np.ndarray:
    """Finds the file times that record a copy of many files, not the moments they were made.

    A photo without an EXIF time is timed by its file's mtime (``file_time``). Where a folder
    was copied, unzipped, synced or exported, every file got the time it was written, within
    seconds: chained by ``group_shots`` they would be one "burst" of unrelated pictures. Among
    the file-timed photos (all cameras together: a copy is the file system's doing), a time is
    a copy's when another file time lies less than ``copy_gap_s`` from it, or when it lies in a
    span shorter than ``copy_window_s`` that holds ``copy_files`` file times. File-timed photos
    spread out (a screenshot folder built up over days) keep their times.

    A run is a sequence of copy times, in time order, each within ``max(copy_gap_s,
    copy_window_s)`` of the one before with no other file time between them (a file time that
    is no copy's ends a run). Depends on the times only, not on the order of the
    rows; costs O(N log N).

    Args:
        capture_ts: (N,) capture times in seconds; NaN when unknown (datetime64: NaT).
        file_time: (N,) booleans: the time is the file's mtime (``time_source`` "mtime").
        config: ``copy_gap_s``, ``copy_files`` and ``copy_window_s`` are read.

    Returns:
        (N,) int64: the run of each photo whose time is a copy's (0..R-1, in time order), -1
        for every other photo.

    Raises:
        DataError: a length differs, a time is infinite, or ``file_time`` is not booleans.
    """
    ts = _times(capture_ts)
    n = ts.shape[0]
    runs = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(_mask(file_time, n, "file_time") & ~np.isnan(ts))
    rows = rows[np.argsort(ts[rows], kind="stable")]
    t = ts[rows]
    copied = _crowded(t, 2, config.copy_gap_s) | _crowded(
        t, config.copy_files, config.copy_window_s
    )
    rows, t = rows[copied], t[copied]
    if rows.size:
        # A file time that was not a copy's between two that were ends a run too.
        position = np.flatnonzero(copied)
        reach = max(config.copy_gap_s, config.copy_window_s)
        start = np.ones(rows.size, dtype=bool)
        start[1:] = (np.diff(t) > reach) | (np.diff(position) > 1)
        runs[rows] = np.cumsum(start) - 1
    return runs


def _crowded(t: np.ndarray, files: int, span_s: float) -> np.ndarray:
    """Of sorted times ``t``: which lie in a span shorter than ``span_s`` holding ``files`` times.

    Each time opens a window [t_i, t_i + span_s); every time in a window holding ``files`` or
    more is marked. Marks depend on the values only (tied times get the same mark).
    """
    m = t.shape[0]
    if m < files or span_s <= 0:
        return np.zeros(m, dtype=bool)
    end = np.searchsorted(t, t + span_s, side="left")  # one past each window's last time
    full = np.flatnonzero(end - np.arange(m) >= files)
    cover = np.bincount(full, minlength=m + 1) - np.bincount(end[full], minlength=m + 1)
    return np.cumsum(cover[:m]) > 0


def _split_long_runs(start: np.ndarray, s_ts: np.ndarray, max_len: int, max_s: float) -> None:
    """Adds group starts (in place) inside runs longer than ``max_len`` or ``max_s``.

    Greedy from each run's first shot, as the chain rule reads: a shot starts a new group when the
    group has ``max_len`` shots or the shot is more than ``max_s`` after the group's first shot.
    Only offending runs are walked, one ``searchsorted`` per group they are cut into.
    """
    bounds = np.append(np.flatnonzero(start), len(start))
    first, end = bounds[:-1], bounds[1:]
    span = s_ts[end - 1] - s_ts[first]  # NaN for an untimed shot, which is a run of one
    long_runs = np.flatnonzero((end - first > max_len) | (span > max_s))
    for r in long_runs.tolist():
        lo, hi = int(first[r]), int(end[r])
        run_ts = s_ts[lo:hi]
        i = 0
        while i < hi - lo:  # bounded: i grows by >= 1 each pass
            start[lo + i] = True
            over = int(np.searchsorted(run_ts, run_ts[i] + max_s, side="right"))
            i = min(i + max_len, max(over, i + 1))


def find_duplicates(
    image_id: Sequence[str],
    embeddings: np.ndarray,
    groups: np.ndarray,
    order_key: Sequence[str],
    config: GroupingConfig,
    *,
    prefer: np.ndarray | None = None,
    hashes: np.ndarray | None = None,
    moments: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    cameras: Sequence[str] | None = None,
    subsecond: np.ndarray | None = None,
    sequences: np.ndarray | None = None,
    search: Literal["auto", "scan", "hash"] = "auto",
) -> tuple[np.ndarray, list[str | None]]:
    """Marks exact duplicates (same bytes) and near duplicates (copies in other groups, or one
    exposure recorded twice within a group).

    Exact: rows with the same ``image_id`` are copies of one file; every copy but the kept one
    points at it (kind ``"exact"``). The kept one is the row with the largest ``prefer`` (e.g.
    ``width * height``), then the first by ``order_key``.

    Near: among the rows that are not exact copies, two rows of different groups whose cosine is
    >= ``near_duplicate_similarity`` are linked, and each connected component keeps its preferred
    row (same rule). Every other member whose group differs from the kept row's, and which
    passes the tests against the kept row itself (not only through a chain of links), points at
    the kept row (kind ``"near"``); members of the kept row's own group are its burst siblings,
    left to ranking. The members that fail against the kept row may still be copies of one
    another (two exports of a photo, each too far from the sharper shot a chain joined them
    to): their own components are found among them alone, by their own links, and marked the
    same way, round after round until a round marks nothing. An exact copy points at its kept copy even when that one is itself a near
    duplicate of a third row: follow ``duplicate_of`` once more to reach a row that is kept.

    Same exposure: within one group, pixels and cosine alone cannot tell a copy from a burst
    sibling (a sharp and a blurred frame have nearly the same dHash), but a camera names each
    exposure by its body and its capture instant. Two rows of one group are one exposure when
    ``cameras`` are equal, both moments were recorded to a fraction of a second (``subsecond``)
    and are the same instant to the millisecond (compared as ``moments`` are), their
    ``sequences`` do not differ, their dHashes are within ``near_duplicate_max_hamming`` bits
    and their cosine is >= ``near_duplicate_similarity``: a resized or re-encoded export that
    kept its original's EXIF, or a RAW+JPEG pair. Each such set keeps its preferred row and
    every other member not marked above that passes these tests against it points at it (kind
    ``"near"``), whatever it measures. The kept row may itself be marked above (a near duplicate
    of another group's row): follow ``duplicate_of`` on. This needs ``hashes``, ``moments``,
    ``cameras`` and ``subsecond``; the marks above are the same with or without it.

    The search is exact: every pair that could pass is tested. With ``hashes`` and
    ``near_duplicate_max_hamming`` < 64 only the pairs whose hashes agree on one of
    ``max_hamming + 1`` bit ranges are candidates (multi-index hashing: two hashes within
    ``max_hamming`` bits agree on one range whole), about (h + 1) N^2 / 2^(64 / (h + 1))
    pairs for well-spread hashes: 12-40 s for 1,000,000 rows at the default 4 bits on two
    cores (benchmarks/pick_scale.py). Otherwise every pair is compared (upper triangle, blocked
    matrix products): O(N^2 * D) time, about 10 s for 50,000 x 512 and ~70 minutes for
    1,000,000. ``search`` forces one way ("scan" or "hash"); "auto" takes the cheaper by the
    bucket counts; the marks are the same. Both use O(N) memory beyond the embeddings. An
    index's candidates can be passed as ``pairs`` instead (``keeper dedup``: each row's k
    nearest, for a wide Hamming bound); they are held to the same tests.

    Args:
        image_id: (N,) content hashes (sha256 of the file bytes).
        embeddings: (N, D) unit-norm float32 embeddings.
        groups: (N,) group numbers from ``group_shots``.
        order_key: (N,) unique strings (e.g. ``image_uri``) that break ties.
        config: ``near_duplicate_similarity`` is read.
        prefer: (N,) finite numbers, larger is kept (e.g. pixel count); default all equal.
        hashes: (N,) 64-bit ``dhash`` values; with them a near pair must also be within
            ``near_duplicate_max_hamming`` bits. Without them the cosine alone decides.
        moments: (N,) capture times the camera recorded (EXIF or a client's; NaN where the
            time is a file's mtime or unknown). Two shots whose recorded times are more than
            ``max_gap_s`` apart are different moments, never copies of one another, however
            alike: a scene re-shot minutes later is not a duplicate. A copy keeps its
            original's EXIF time or has none (an export that stripped it).
        offsets: (N,) the UTC offset (seconds east) of each moment where it is known, which
            makes that moment a UTC instant; NaN where the moment is a camera's local wall
            clock (EXIF without OffsetTimeOriginal). Two instants compare as instants; where
            either offset is unknown the two wall clocks compare (a known instant + its
            offset), so an export that kept DateTimeOriginal but dropped the offset is the
            same moment as its original. Without ``offsets`` the moments compare as given.
        pairs: ``(a, b)`` row positions of candidate near pairs (any order, repeats allowed);
            None compares every pair. A pair through an exact copy counts for its kept copy.
        cameras: (N,) camera body keys (make, model, serial), for the same-exposure test.
        subsecond: (N,) booleans: the row's moment was recorded to a fraction of a second (EXIF
            SubSecTimeOriginal) by a known body. False where the camera writes whole seconds,
            when many frames of a burst share one reading.
        sequences: (N,) frame numbers within a drive sequence, NaN where unknown: two known
            numbers that differ are two exposures, whatever their times say.
        search: "auto", "scan" (every pair) or "hash" (needs ``hashes`` and a Hamming bound
            below 64); ignored with ``pairs``.

    Returns:
        ``(duplicate_of, kind)``: (N,) int64 row positions of the row each duplicate points at
        (-1 for a row that is not a duplicate) and, per row, ``"exact"``, ``"near"`` or None.

    Raises:
        DataError: lengths differ, an order key repeats, ``prefer`` is not finite, a camera is not
            a string, or the embeddings are malformed.
    """
    ids = _codes(image_id, None, "image_id")
    n = ids.shape[0]
    key = _codes(order_key, n, "order_key", unique=True)
    emb = _embeddings(embeddings, n)
    grp = np.asarray(groups)
    if grp.shape != (n,) or (n and not np.issubdtype(grp.dtype, np.integer)):
        raise DataError(f"groups: expected ({n},) integers, got {grp.shape} {grp.dtype}")
    pref = np.zeros(n) if prefer is None else np.asarray(prefer, dtype=np.float64)
    if pref.shape != (n,) or not np.isfinite(pref).all():
        raise DataError(f"prefer: expected ({n},) finite numbers, got shape {pref.shape}")

    # Preference rank: 0 is the row every tie-break keeps (largest prefer, then first key).
    by_pref = np.lexsort((key, -pref))
    rank = np.empty(n, dtype=np.int64)
    rank[by_pref] = np.arange(n)

    duplicate_of = np.full(n, -1, dtype=np.int64)
    kind: list[str | None] = [None] * n
    if n == 0:
        return duplicate_of, kind
    best = np.full(ids.max() + 1, n, dtype=np.int64)
    np.minimum.at(best, ids, rank)
    kept_copy = by_pref[best[ids]]
    exact = np.flatnonzero(kept_copy != np.arange(n))
    duplicate_of[exact] = kept_copy[exact]

    reps = np.flatnonzero(kept_copy == np.arange(n))
    hsh = hsh_all = None
    if hashes is not None:
        hsh_all = np.asarray(hashes).astype(np.int64).view(np.uint64)
        if hsh_all.shape != (n,):
            raise DataError(f"hashes: expected ({n},) integers, got shape {hsh_all.shape}")
        hsh = hsh_all[reps]
    when = None
    if moments is not None:
        at = np.asarray(moments, dtype=np.float64)
        if at.shape != (n,):
            raise DataError(f"moments: expected ({n},) numbers, got shape {at.shape}")
        off = np.full(n, np.nan) if offsets is None else np.asarray(offsets, dtype=np.float64)
        if off.shape != (n,):
            raise DataError(f"offsets: expected ({n},) numbers, got shape {off.shape}")
        when = _Moments(at, off)
    exposures = None
    if cameras is not None and subsecond is not None and when is not None and hashes is not None:
        exposures = _Exposures(
            _codes(cameras, n, "cameras"),
            _mask(subsecond, n, "subsecond"),
            when,
            _frame_numbers(sequences, n),
        )
    rep_pairs = None
    if pairs is not None:
        a, b = (np.asarray(x, dtype=np.int64) for x in pairs)
        if (
            a.shape != b.shape
            or a.ndim != 1
            or (a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n))
        ):
            raise DataError(f"pairs: expected two equal (M,) arrays of row positions < {n}")
        pos = np.full(n, -1, dtype=np.int64)
        pos[reps] = np.arange(len(reps))
        rep_pairs = (pos[kept_copy[a]], pos[kept_copy[b]])
    comp, one_exposure = _near_components(
        emb if len(reps) == n else emb[reps],  # no copy of a million rows without exact copies
        grp[reps],
        config.near_duplicate_similarity,
        hsh,
        config.near_duplicate_max_hamming,
        None if when is None else when.take(reps),
        config.max_gap_s,
        rep_pairs,
        None if exposures is None else exposures.take(reps),
        search=search,
    )
    best_in = np.full(len(reps), n, dtype=np.int64)
    np.minimum.at(best_in, comp, rank[reps])
    kept_near = by_pref[best_in[comp]]
    marked = (kept_near != reps) & (grp[kept_near] != grp[reps])

    def looks_alike(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        same = np.einsum("ij,ij->i", emb[a], emb[b]) >= np.float32(
            config.near_duplicate_similarity - _COS_SLACK
        )
        if hashes is not None and config.near_duplicate_max_hamming < 64:
            bits = np.asarray(hashes).astype(np.int64).view(np.uint64)
            same &= np.bitwise_count(bits[a] ^ bits[b]) <= config.near_duplicate_max_hamming
        return same

    # A component is single-linkage: A~B~C joins A and C though they may fail every test
    # (benchmarks/pick.py: 50 of 122 marks on 5,335 photos came in that way). A shot is marked
    # only when it passes the tests against the very shot it is said to duplicate.
    def mark_direct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Marks each ``a`` a near duplicate of its ``b`` where the two pass the tests; returns
        the rows that did not."""
        direct = looks_alike(a, b)
        if when is not None:
            direct &= ~when.apart(a, b, config.max_gap_s)
        duplicate_of[a[direct]] = b[direct]
        return a[~direct]

    left = mark_direct(reps[marked], kept_near[marked])
    # The rows left may be copies of one another all the same: two exports of one photo, each too
    # far from the sharper shot a chain of links joined them to, were both kept. Their own
    # components are found among them alone, each keeps its preferred row and marks the rows
    # that pass against it, and so on until a round marks nothing (each round keeps a row of
    # every component it finds, so the rows left only dwindle).
    while left.size > 1:
        sub_pairs = None
        if rep_pairs is not None:
            at = np.full(len(reps), -1, dtype=np.int64)
            at[np.searchsorted(reps, left)] = np.arange(len(left))
            pa_, pb_ = at[rep_pairs[0]], at[rep_pairs[1]]
            both = (pa_ >= 0) & (pb_ >= 0)
            sub_pairs = (pa_[both], pb_[both])
        comp, _ = _near_components(
            emb[left],
            grp[left],
            config.near_duplicate_similarity,
            None if hsh_all is None else hsh_all[left],
            config.near_duplicate_max_hamming,
            None if when is None else when.take(left),
            config.max_gap_s,
            sub_pairs,
            None,
            search=search,
        )
        best_in = np.full(len(left), n, dtype=np.int64)
        np.minimum.at(best_in, comp, rank[left])
        kept_sub = by_pref[best_in[comp]]
        marked = (kept_sub != left) & (grp[kept_sub] != grp[left])
        left = mark_direct(left[marked], kept_sub[marked])
    near = reps[duplicate_of[reps] >= 0]
    if exposures is not None:
        # One exposure recorded twice in a group: each set keeps its preferred row, as above.
        # Rows marked above keep their marks, so the marks across groups are the same as without.
        best_one = np.full(len(reps), n, dtype=np.int64)
        np.minimum.at(best_one, one_exposure, rank[reps])
        kept_one = by_pref[best_one[one_exposure]]
        marked = (kept_one != reps) & (duplicate_of[reps] < 0)
        a, b = reps[marked], kept_one[marked]
        direct = (grp[a] == grp[b]) & exposures.same(a, b) & looks_alike(a, b)
        duplicate_of[a[direct]] = b[direct]
        near = np.concatenate([near, a[direct]])

    for i in exact.tolist():
        kind[i] = "exact"
    for i in near.tolist():
        kind[i] = "near"
    return duplicate_of, kind


def _near_components(
    emb: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    hashes: np.ndarray | None = None,
    max_hamming: int = 64,
    moments: _Moments | None = None,
    max_gap_s: float = np.inf,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    exposures: _Exposures | None = None,
    *,
    search: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of "cosine >= threshold, hashes within max_hamming bits, and
    different group", and of "cosine >= threshold, hashes within max_hamming bits, same group
    and same exposure" (each row alone without ``exposures``); labels 0..M-1 roots. ``pairs``:
    only these candidates are tested.

    Without ``pairs`` every pair that can pass is tested, in one of two ways with the same
    components: a blocked scan of all M^2 / 2 cosines (``search="scan"``), or, where hashes
    bound the Hamming distance, only the pairs of rows whose hashes agree on one of
    ``max_hamming + 1`` bit ranges (``search="hash"``: multi-index hashing; two hashes within
    ``max_hamming`` bits agree on at least one range whole, by pigeonhole). ``"auto"`` takes
    whichever costs less by the bucket counts (``_HashBuckets.cost``).
    """
    m = emb.shape[0]
    labels, one = _Edges(m), _Edges(m)
    if m < 2:
        return labels.roots(), one.roots()
    thr = np.float32(threshold - _COS_SLACK)
    bits = hashes if hashes is not None and max_hamming < 64 else None

    def link(a: np.ndarray, b: np.ndarray) -> None:
        """Of pairs (a[k], b[k]), keeps those passing every test but the cosine's."""
        across = groups[a] != groups[b]
        alike = np.ones(len(a), dtype=bool)
        if bits is not None:
            alike = np.bitwise_count(bits[a] ^ bits[b]) <= max_hamming
        keep = across & alike
        if moments is not None:
            keep &= ~moments.apart(a, b, max_gap_s)
        labels.add(a[keep], b[keep])
        if exposures is not None:
            within = ~across & alike
            within[within] = exposures.same(a[within], b[within])
            one.add(a[within], b[within])

    def test(a: np.ndarray, b: np.ndarray) -> None:
        """Candidate pairs: ``link``'s tests on the cosine's passing pairs. The cheap tests run
        first, so a burst's siblings (same group, alike hashes) cost no cosine."""
        across = groups[a] != groups[b]
        if moments is not None:
            across &= ~moments.apart(a, b, max_gap_s)
        if exposures is not None:
            across |= exposures.same(a, b)
        a, b = a[across], b[across]
        for s in range(0, len(a), _PAIR_CHUNK):
            x, y = a[s : s + _PAIR_CHUNK], b[s : s + _PAIR_CHUNK]
            close = np.einsum("ij,ij->i", emb[x], emb[y]) >= thr
            link(x[close], y[close])

    def scan(rows: np.ndarray | None) -> None:
        """Every pair of ``rows`` (all rows when None), by blocked matrix products."""
        sub = emb if rows is None else emb[rows]
        n = sub.shape[0]
        step = max(1, _BLOCK_ELEMS // n)
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            # Upper triangle only: row i against columns j >= i0 (j > i is kept below).
            sims = sub[i0:i1] @ sub[i0:].T
            sims[np.arange(i1 - i0), np.arange(i1 - i0)] = -2.0  # not its own duplicate
            # Hits are rare: find the rows that have one before listing them (np.nonzero over
            # the whole block costs more than the matrix product).
            cand = np.flatnonzero((sims >= thr).any(axis=1))
            if not cand.size:
                continue
            a, b = np.nonzero(sims[cand] >= thr)
            a = cand[a] + i0
            b += i0
            upper = b > a
            a, b = a[upper], b[upper]
            if rows is not None:
                a, b = rows[a], rows[b]
            link(a, b)

    if pairs is not None:
        a, b = pairs
        a, b = np.minimum(a, b), np.maximum(a, b)
        distinct = a != b
        test(a[distinct], b[distinct])
        return labels.roots(), one.roots()
    if search not in ("auto", "scan", "hash"):
        raise ValueError(f"search: expected auto, scan or hash, got {search!r}")
    if search == "hash" and bits is None:
        raise ValueError("search='hash' needs hashes and max_hamming < 64")
    buckets = None if bits is None or search == "scan" else _HashBuckets(bits, max_hamming)
    if buckets is not None and (search == "hash" or buckets.cost < m * (m - 1) / 2):
        for a, b in buckets.close_pairs():
            test(a, b)
        for rows in buckets.heavy():
            scan(rows)
    else:
        scan(None)
    return labels.roots(), one.roots()


class _Edges:
    """A union-find fed edges in batches: ``_union`` costs O(M) a call whatever the batch, so
    the edges of many blocks or buckets are merged together."""

    def __init__(self, m: int) -> None:
        self.labels = np.arange(m)
        self.held: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            self.held.append((a, b))
            self.count += a.size
            if self.count >= _EDGE_BATCH:
                self.roots()

    def roots(self) -> np.ndarray:
        """Merges the held edges; every row's label is its component's root (smallest row)."""
        if self.held:
            a = np.concatenate([e[0] for e in self.held])
            b = np.concatenate([e[1] for e in self.held])
            self.held, self.count = [], 0
            self.labels = _union(self.labels, a, b)
        return self.labels


class _HashBuckets:
    """Rows bucketed by each of ``max_hamming + 1`` bit ranges of their 64-bit hashes.

    Two hashes within ``max_hamming`` bits share a bucket in at least one range, so the pairs
    within buckets are all the pairs that can pass the Hamming test. A bucket of more than
    ``_HEAVY_BUCKET`` rows (a run of blank frames: one dHash) is scanned by matrix products
    instead of being listed pair by pair.
    """

    def __init__(self, hashes: np.ndarray, max_hamming: int) -> None:
        hashes = np.asarray(hashes).astype(np.int64).view(np.uint64)
        self.hashes, self.max_hamming = hashes, max_hamming
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        listed = scanned = 0.0
        k = max_hamming + 1
        shift = 0
        for i in range(k):
            width = 64 // k + (1 if i < 64 % k else 0)
            key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            shift += width
            order = np.argsort(key, kind="stable")
            sk = key[order]
            starts = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
            sizes = np.diff(np.append(starts, len(sk)))
            self.runs.append((order, starts, sizes))
            s = sizes.astype(np.float64)
            light = s <= _HEAVY_BUCKET
            listed += float((s[light] * (s[light] - 1) / 2).sum())
            scanned += float((s[~light] * (s[~light] - 1) / 2).sum())
        #: What the search costs, in cosines of a blocked scan (listing a pair: _PAIR_COST).
        self.cost = listed * _PAIR_COST + scanned

    def close_pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pairs of rows in one light bucket whose hashes are within ``max_hamming`` bits (a
        pair sharing several buckets comes once per bucket)."""
        for order, starts, sizes in self.runs:
            size = np.repeat(sizes, sizes)  # each sorted position's bucket size and end
            end = np.repeat(starts + sizes, sizes)
            at = np.flatnonzero((size > 1) & (size <= _HEAVY_BUCKET))
            for d in range(1, _HEAVY_BUCKET):  # bounded: d < the largest light bucket
                at = at[at + d < end[at]]
                if not at.size:
                    break
                a, b = order[at], order[at + d]
                close = np.bitwise_count(self.hashes[a] ^ self.hashes[b]) <= self.max_hamming
                if close.any():
                    yield a[close], b[close]

    def heavy(self) -> Iterator[np.ndarray]:
        """The rows of each heavy bucket."""
        for order, starts, sizes in self.runs:
            big = sizes > _HEAVY_BUCKET
            for start, size in zip(starts[big].tolist(), sizes[big].tolist(), strict=True):
                yield order[start : start + size]


class _Moments:
    """Recorded capture moments: UTC instants where the offset is known, else wall clocks."""

    def __init__(self, at: np.ndarray, offsets: np.ndarray) -> None:
        self.at = at  # the timestamp: UTC where the offset is known, else the wall clock
        self.known = ~np.isnan(offsets)
        self.wall = at + np.where(self.known, offsets, 0.0)

    def take(self, rows: np.ndarray) -> _Moments:
        out = _Moments.__new__(_Moments)
        out.at, out.known, out.wall = self.at[rows], self.known[rows], self.wall[rows]
        return out

    def apart(self, a: np.ndarray, b: np.ndarray, gap: float) -> np.ndarray:
        """Whether rows a and b are recorded more than ``gap`` s apart (False if unknown).

        Instants compare as instants; a wall clock only with a wall clock (a known instant plus
        its offset). NaN - x is NaN, and NaN > gap is False: an unknown moment is never apart.
        """
        both = self.known[a] & self.known[b]
        diff = np.where(both, self.at[a] - self.at[b], self.wall[a] - self.wall[b])
        return np.abs(diff) > gap


class _Exposures:
    """What names one exposure: the body, a moment recorded to a fraction of a second, and the
    frame number of a drive sequence where the maker writes one."""

    def __init__(
        self, body: np.ndarray, precise: np.ndarray, moments: _Moments, frame: np.ndarray
    ) -> None:
        self.body, self.frame, self.moments = body, frame, moments
        self.precise = precise & ~np.isnan(moments.at)

    def take(self, rows: np.ndarray) -> _Exposures:
        return _Exposures(
            self.body[rows], self.precise[rows], self.moments.take(rows), self.frame[rows]
        )

    def same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Whether rows a and b are one exposure: same body, same sub-second instant, and no
        two different frame numbers."""
        fa, fb = self.frame[a], self.frame[b]
        return (
            (self.body[a] == self.body[b])
            & self.precise[a]
            & self.precise[b]
            & ~self.moments.apart(a, b, _SAME_INSTANT_S)
            & ~((fa != fb) & ~np.isnan(fa) & ~np.isnan(fb))
        )


def _union(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merges the components of each edge (a[k], b[k]); every label stays its component's root.

    Vectorised union-find: hook each larger root onto the smaller one, then compress by pointer
    jumping, until every edge's ends share a root. Roots only ever point to smaller indices, so
    no cycle can form and each pass merges at least one pair of components.
    """
    for _ in range(len(labels)):  # bounded: each pass merges >= 1 pair of components
        la, lb = labels[a], labels[b]
        differ = la != lb
        if not differ.any():
            return labels
        a, b, la, lb = a[differ], b[differ], la[differ], lb[differ]
        np.minimum.at(labels, np.maximum(la, lb), np.minimum(la, lb))
        for _ in range(64):  # pointer jumping halves path lengths: 64 passes cover 2^64 rows
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    raise AssertionError("union-find did not converge")  # unreachable: see the loop bound


def pairwise_scores(true: Sequence[Any], pred: Sequence[Any]) -> tuple[float, float, float]:
    """Pairwise precision, recall and F1 of a grouping against the true one.

    A pair of items is positive when both are in one group. Precision is the fraction of
    predicted same-group pairs that are truly same-group, recall the fraction of true same-group
    pairs that were predicted; counted from the contingency table in O(N log N), never by
    listing pairs. With no predicted (true) pairs, precision (recall) is 1.0: nothing was claimed
    (missed). F1 is 0.0 when both are 0.

    Args:
        true: (N,) true group labels (any hashable values; null values are a label too).
        pred: (N,) predicted group labels.

    Returns:
        ``(precision, recall, f1)``.

    Raises:
        DataError: the lengths differ.
    """
    t = _factorize(true)
    p = _factorize(pred)
    if t.shape != p.shape:
        raise DataError(f"true has {t.shape[0]} labels but pred has {p.shape[0]}")
    if t.size == 0:
        return 1.0, 1.0, 1.0
    _, joint = np.unique(t * (int(p.max()) + 1) + p, return_counts=True)
    both = _pairs(joint)
    true_pairs = _pairs(np.bincount(t))
    pred_pairs = _pairs(np.bincount(p))
    precision = both / pred_pairs if pred_pairs else 1.0
    recall = both / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(precision), float(recall), float(f1)


def _pairs(counts: np.ndarray) -> int:
    c = counts.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def _factorize(labels: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(labels), dtype=object)
    arr[:] = list(labels)
    codes, _ = pd.factorize(arr, use_na_sentinel=False)
    return codes.astype(np.int64)


def _times(capture_ts: Any) -> np.ndarray:
    raw = np.asarray(capture_ts)
    if raw.dtype.kind == "M":  # datetime64 (a parquet timestamp column): seconds, NaT as NaN
        ns = raw.astype("datetime64[ns]")
        ts = ns.astype(np.int64) / 1e9
        ts[np.isnat(ns)] = np.nan
        raw = ts
    elif raw.dtype.kind == "m":
        raise DataError(
            "capture_ts: durations (timedelta64), not times; pass seconds or datetime64"
        )
    try:
        ts = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"capture_ts: not a numeric array ({e})") from None
    if ts.ndim != 1:
        raise DataError(f"capture_ts: expected shape (N,), got {ts.shape}")
    bad = np.flatnonzero(np.isinf(ts))
    if bad.size:
        raise DataError(
            f"capture_ts: {bad.size} infinite value(s); use NaN for an unknown time",
            rows=bad[:10].tolist(),
        )
    return ts


def _codes(values: Sequence[str], n: int | None, name: str, *, unique: bool = False) -> np.ndarray:
    """String labels -> int codes in sorted-string order (so codes never depend on row order)."""
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{name}: length {arr.shape[0]} does not match {n}")
    bad = [i for i, v in enumerate(arr) if not isinstance(v, str)]
    if bad:
        raise DataError(f"{name}: {len(bad)} value(s) are not strings", rows=bad[:10])
    # The object array itself: numpy's 'U' strings (astype(str)) drop trailing NULs, so "A" and
    # "A\x00" would be one camera. Python's str order sorts it the same otherwise.
    uniq, codes = np.unique(arr, return_inverse=True)
    if unique and len(uniq) < len(arr):
        counts = np.bincount(codes)
        repeated = np.flatnonzero(counts[codes] > 1)
        raise DataError(
            f"{name}: {len(arr) - len(uniq)} repeated value(s), e.g. {arr[repeated[0]]!r}; "
            "every row needs its own key (the image URI) for a deterministic result",
            rows=repeated[:10].tolist(),
        )
    return codes.astype(np.int64)


def _mask(values: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (n,) or (n and arr.dtype != np.bool_):
        raise DataError(f"{name}: expected ({n},) booleans, got {arr.shape} {arr.dtype}")
    return arr


def _frame_numbers(sequences: Any, n: int) -> np.ndarray:
    if sequences is None:
        return np.full(n, np.nan)
    try:
        arr = np.asarray(sequences, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"sequences: not a numeric array ({e})") from None
    if arr.shape != (n,):
        raise DataError(f"sequences: expected ({n},) numbers, got shape {arr.shape}")
    return arr


def _embeddings(embeddings: Any, n: int) -> np.ndarray:
    emb = check_embeddings(embeddings, "embeddings")
    if emb.shape[0] != n:
        raise DataError(f"embeddings: {emb.shape[0]} rows do not match {n} shots")
    return emb
