"""Culling a photo library: group -> mark duplicates -> rank each group -> keep / alternate / reject.

One function for both sides: ``keeper pick`` (a Ray job over an embedding table) and ``POST
/v1/pick`` (a Serve request's images) call :func:`cull` with the same frame columns, so a burst
gets the same groups, picks and reasons whichever way it came in. The ranking itself is a
``Scorer``: a registered ranker (the MLflow pyfunc in the job, the ranker deployment in Serve)
or, when none is given, keeper_core.picking's zero-shot rule, whose label then travels with every
output.

    result = cull(frame, scorer=None, grouping=GroupingConfig(), picking=PickConfig())
    result.picks      # one row per image, in group (time) order; see PICK_COLUMNS
    result.ranker     # the ranker's label, or picking.ZERO_SHOT_RULE
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa

from keeper_core.errors import DataError
from keeper_core.formats import RAW_SUFFIXES
from keeper_core.grouping import GroupingConfig, copy_runs, find_duplicates, group_shots
from keeper_core.picking import (
    SIMILARITY_COLUMN,
    ZERO_SHOT_RULE,
    PickConfig,
    decide,
    duplicate_roots,
    rank_in_groups,
    zero_shot_scores,
)
from keeper_core.quality import FEATURE_NAMES

#: Scores one row per image. The frame it gets is sorted by ``series_id`` (each group's id,
#: zero-padded so string order is group order) with each group's rows together, in capture
#: order; it returns the scores in that row order.
Scorer = Callable[[pd.DataFrame], np.ndarray]

#: The columns :func:`cull` needs (``capture_ts`` may be NaN; ``camera`` "unknown"). A ``dhash``
#: column (grouping.dhash) guards near-duplicate marks with pixels; a row without one is never
#: marked near. Without the column the cosine alone decides.
REQUIRED = ("image_uri", "image_id", "embedding", "capture_ts", "camera", *FEATURE_NAMES)
#: Capture-time sources that name the moment a photo was taken (not a file's mtime).
RECORDED_TIMES = ("exif_offset", "exif", "given")
#: The capture-time source of a file's modification time: a capture's, or a copy's
#: (``grouping.copy_runs`` tells which).
FILE_TIME = "mtime"
#: ``camera`` of a photo whose metadata names no body (``keeper_core.capture.Capture.camera``).
UNKNOWN_CAMERA = "unknown"
#: The picks table, in order (``embedding`` is left out: it is in the embedding table).
PICK_COLUMNS = (
    "group_id",
    "group",
    "group_size",
    "rank",
    "decision",
    "rating",
    "label",
    "score",
    "prob",
    "reasons",
    "duplicate_kind",
    "duplicate_of",
    "duplicate_cosine",
    "image_uri",
    "file_name",
    "image_id",
    "capture_time",
    "capture_ts",
    "time_source",
    "camera",
    "burst_id",
    "sequence",
    *FEATURE_NAMES,
)


@dataclass
class CullResult:
    """What :func:`cull` decided, and how long each step took."""

    picks: pd.DataFrame
    ranker: str
    seconds: dict[str, float] = field(default_factory=dict)
    #: Photos whose only time, their file's mtime, records a copy (``grouping.copy_runs``): each
    #: is a group of its own, its reasons say why. Not in :meth:`counts`, which /v1/pick
    #: returns as documented (its times are EXIF or the client's, never a file's).
    copy_timed: int = 0

    def counts(self) -> dict[str, int]:
        """images, groups, keepers, alternates, rejects, duplicates (exact + near)."""
        d = self.picks["decision"]
        return {
            "images": len(self.picks),
            "groups": int(self.picks["group"].nunique()),
            "keepers": int((d == "keep").sum()),
            "alternates": int((d == "alternate").sum()),
            "rejects": int((d == "reject").sum()),
            "duplicates": int(self.picks["duplicate_kind"].notna().sum()),
            "exact_duplicates": int((self.picks["duplicate_kind"] == "exact").sum()),
            "near_duplicates": int((self.picks["duplicate_kind"] == "near").sum()),
        }


def group_ids(groups: np.ndarray) -> list[str]:
    """``g000042``-style ids, zero-padded so their string order is the group order."""
    width = max(6, len(str(int(groups.max()))) if len(groups) else 1)
    return [f"g{int(g):0{width}d}" for g in groups]


_ISO_OFFSET = re.compile(r"(?:([+-])(\d{2}):?(\d{2})|Z)$")
_ISO_FRACTION = re.compile(r"T\d{2}:\d{2}:\d{2}[.,](\d+)")


def utc_offsets(capture_time: pd.Series) -> np.ndarray:
    """Seconds east of UTC of each ISO ``capture_time`` ("...+02:00"); NaN without an offset."""
    out = np.full(len(capture_time), np.nan)
    for i, text in enumerate(capture_time.tolist()):
        m = _ISO_OFFSET.search(text) if isinstance(text, str) else None
        if m is None:
            continue
        if m.group(1) is None:  # "Z"
            out[i] = 0.0
        else:
            sign = -1.0 if m.group(1) == "-" else 1.0
            out[i] = sign * (3600 * int(m.group(2)) + 60 * int(m.group(3)))
    return out


def has_subseconds(capture_time: pd.Series) -> np.ndarray:
    """Whether each ISO ``capture_time`` holds a fraction of a second ("...10:00:00.12+02:00").

    An all-zero fraction ("...10:00:00.00") counts as none: bodies that record whole seconds
    write it for every frame, so it names no exposure.
    """
    out = np.zeros(len(capture_time), dtype=bool)
    for i, text in enumerate(capture_time.tolist()):
        m = _ISO_FRACTION.search(text) if isinstance(text, str) else None
        out[i] = m is not None and m.group(1).strip("0") != ""
    return out


#: The columns :func:`mark_duplicates` reads where a table has them: read them all, or a test
#: it makes is skipped (an export that dropped its UTC offset, a copy with a rating saved in).
DUPLICATE_EVIDENCE = (
    "image_uri",
    "image_id",
    "content_id",
    "dhash",
    "capture_ts",
    "time_source",
    "capture_time",
    "camera",
    "sequence",
)


def table_frame(table: pa.Table) -> pd.DataFrame:
    """An embedding table's rows as pandas, its ``dhash`` exact (pandas' nullable ``Int64``).

    Plain ``to_pandas`` turns an int64 column holding a null (a part written before the column
    existed, a file that could not be hashed) into float64, which keeps 53 of a hash's 64 bits:
    every hash of the table would be off in its low bits, and copies 9 bits apart would read as
    0 apart.
    """
    df = table.to_pandas()
    if "dhash" in table.column_names:
        df["dhash"] = table.column("dhash").to_pandas(
            types_mapper={pa.int64(): pd.Int64Dtype()}.get
        )
    return df


def copy_sets(df: pd.DataFrame) -> list[str]:
    """A key per row that rows which are copies of one file share: the same bytes (``image_id``),
    or the same but for a JPEG's metadata segments (``content_id``: a copy Lightroom or keeper
    saved a rating into). Taken together (an older row without ``content_id`` and a newer one of
    the same bytes with one are still one set); each set's key is one of its ``image_id``s.
    """
    ids = df["image_id"].astype(str)
    if "content_id" not in df.columns or df["content_id"].isna().all():
        return ids.tolist()
    by = [pd.factorize(ids)[0], pd.factorize(df["content_id"], use_na_sentinel=True)[0]]
    label = np.arange(len(df))
    changed = True
    while changed:  # each pass joins sets one link further; labels only fall, so it ends
        before = label.copy()
        for key in by:
            has = key >= 0
            label[has] = pd.Series(label[has]).groupby(key[has]).transform("min").to_numpy()
        changed = bool((label != before).any())
    names = ids.tolist()
    return [names[i] for i in label]


def mark_duplicates(
    df: pd.DataFrame,
    emb: np.ndarray,
    groups: np.ndarray,
    grouping: GroupingConfig,
    *,
    prefer: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """``find_duplicates`` over rows of an embedding table, with the evidence the table holds.

    ``df`` has ``image_id`` (with ``content_id`` where present: :func:`copy_sets` tells exact
    copies) and ``image_uri`` (the tie-break), and where present ``dhash`` (the
    pixel guard) and ``capture_ts`` + ``time_source`` (only times a camera or client recorded
    separate moments: a file's mtime says nothing), with ``capture_time``'s UTC offset telling
    a UTC instant from a camera's wall clock (an export that dropped OffsetTimeOriginal shows
    its original's wall clock, hours from the original's UTC instant). ``camera`` and the
    sub-seconds of ``capture_time`` (``has_subseconds``; a known body only, not "unknown"), with
    ``sequence`` where present, tell one exposure recorded twice within a group (a resized export
    that kept its EXIF). A row whose pixels could not be hashed (a file gone since it was
    embedded) has no pixel evidence: it is never a near duplicate, nor the row one is said to
    duplicate. ``keeper pick`` (within a library's groups) and ``keeper dedup`` (corpus-wide,
    ``pairs`` from an index, every row its own group) both mark duplicates here.
    """
    hashes, hashed = None, np.ones(len(df), dtype=bool)
    if "dhash" in df.columns:
        hashed = df["dhash"].notna().to_numpy()
        if df["dhash"].dtype.kind == "f" and hashed.any():
            raise DataError("dhash read as floating point has lost bits: read it with table_frame")
        hashes = df["dhash"].fillna(0).to_numpy(dtype=np.int64)
    moments = offsets = cameras = subsecond = sequences = None
    if "time_source" in df.columns and "capture_ts" in df.columns:
        ts = pd.to_numeric(df["capture_ts"], errors="coerce").to_numpy(dtype=np.float64)
        moments = np.where(df["time_source"].isin(RECORDED_TIMES).to_numpy(), ts, np.nan)
        if "capture_time" in df.columns:
            offsets = utc_offsets(df["capture_time"])
            if "camera" in df.columns:
                cameras = df["camera"].fillna(UNKNOWN_CAMERA).astype(str).tolist()
                known = np.array([c != UNKNOWN_CAMERA for c in cameras], dtype=bool)
                subsecond = has_subseconds(df["capture_time"]) & known
                if "sequence" in df.columns:
                    frames = pd.to_numeric(df["sequence"], errors="coerce")
                    sequences = frames.to_numpy(dtype=np.float64, na_value=np.nan)
    dup_of, kind = find_duplicates(
        copy_sets(df),
        emb,
        groups,
        df["image_uri"].astype(str).tolist(),
        grouping,
        prefer=prefer,
        hashes=hashes,
        moments=moments,
        offsets=offsets,
        pairs=pairs,
        cameras=cameras,
        subsecond=subsecond,
        sequences=sequences,
    )
    unproven = (dup_of >= 0) & (~hashed | ~hashed[np.maximum(dup_of, 0)])
    for i in np.flatnonzero(unproven & (np.array(kind, dtype=object) == "near")):
        dup_of[i], kind[i] = -1, None
    return dup_of, kind


def cull(
    frame: pd.DataFrame,
    *,
    scorer: Scorer | None,
    ranker: str | None = None,
    grouping: GroupingConfig | None = None,
    picking: PickConfig | None = None,
) -> CullResult:
    """Group, mark duplicates, rank and decide, for one library or one request.

    A photo timed only by its file's mtime whose time records a copy (``grouping.copy_runs``)
    is grouped as one without a time, alone, and its reasons say so.

    Args:
        frame: one row per image with the ``REQUIRED`` columns (an embedding table's rows with
            their capture columns); other columns are kept.
        scorer: the trained ranker's scores (see ``Scorer``), or None for the zero-shot rule.
        ranker: the scorer's label for outputs (required with a scorer).
        grouping: burst/scene grouping and duplicate thresholds.
        picking: decision rules, ratings and labels.

    Returns:
        The picks, one row per input image, ordered by group then capture time then URI.

    Raises:
        DataError: a required column is missing, or the scorer returns the wrong number of
            scores or non-finite ones.
    """
    grouping = grouping or GroupingConfig()
    picking = picking or PickConfig()
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"cull needs columns {missing}")
    if scorer is not None and not ranker:
        raise DataError("a scorer needs a label (the ranker's name) for the outputs")
    seconds: dict[str, float] = {}
    if frame.empty:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in PICK_COLUMNS})
        return CullResult(empty, ranker or ZERO_SHOT_RULE, seconds)

    t0 = time.perf_counter()
    # A fixed input order (by URI) first: the same library gives the same table however it was
    # listed or embedded.
    df = frame.sort_values("image_uri", kind="stable").reset_index(drop=True)
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in df["embedding"]])
    ts = pd.to_numeric(df["capture_ts"], errors="coerce").to_numpy(dtype=np.float64)
    uris = df["image_uri"].astype(str).tolist()
    file_time = (
        df["time_source"].isin([FILE_TIME]).to_numpy()
        if "time_source" in df.columns
        else np.zeros(len(df), dtype=bool)
    )
    copies = copy_runs(ts, file_time, grouping)
    # A copy's time is no moment of capture: such photos are grouped as photos without a time.
    groups = group_shots(
        np.where(copies >= 0, np.nan, ts), df["camera"].astype(str).tolist(), emb, uris, grouping
    )
    # Of two records of one photo keep the camera RAW (the original, whatever its preview's
    # size), then the larger picture.
    raw = np.array([u.lower().endswith(RAW_SUFFIXES) for u in uris], dtype=np.float64)
    prefer = df["width"].to_numpy(np.float64) * df["height"].to_numpy(np.float64) + raw * 1e15
    dup_of, kind = mark_duplicates(df, emb, groups, grouping, prefer=prefer)
    dup_of, kind = follow_marks(dup_of, kind)
    seconds["group"] = time.perf_counter() - t0

    # Group order, then capture time, then URI: each group's rows together, as scorers want.
    df = df.assign(group=groups, _ts=np.where(np.isnan(ts), np.inf, ts))
    order = np.lexsort((np.arange(len(df)), df["_ts"].to_numpy(), groups))
    position = np.empty(len(df), dtype=np.int64)
    position[order] = np.arange(len(df))
    # Row i (new order) is old row order[i]; its duplicate target moves to position[target].
    dup_new = np.where(dup_of >= 0, position[np.maximum(dup_of, 0)], -1)[order]
    df = df.iloc[order].drop(columns=["_ts"]).reset_index(drop=True)
    copies, ts = copies[order], ts[order]
    df["duplicate_of"] = dup_new
    df["duplicate_kind"] = [kind[i] for i in order]
    # The cosine behind a near-duplicate mark, for its reason ("near duplicate of X (cosine .97)").
    emb = emb[order]
    has = dup_new >= 0
    cos = np.full(len(df), np.nan)
    cos[has] = np.einsum("ij,ij->i", emb[has], emb[dup_new[has]])
    df[SIMILARITY_COLUMN] = np.where(df["duplicate_kind"].to_numpy() == "near", cos, np.nan)
    df["group_size"] = df.groupby("group")["group"].transform("size").astype(np.int64)
    df["group_id"] = group_ids(df["group"].to_numpy())

    t0 = time.perf_counter()
    if scorer is None:
        scores = zero_shot_scores(df)
        label = ZERO_SHOT_RULE
    else:
        scores = np.asarray(scorer(df.assign(series_id=df["group_id"])), dtype=np.float64)
        label = str(ranker)
    if scores.shape != (len(df),) or not np.isfinite(scores).all():
        raise DataError(
            f"the ranker returned {scores.shape} scores for {len(df)} images"
            if scores.shape != (len(df),)
            else "the ranker returned non-finite scores"
        )
    ranked = rank_in_groups(df, scores)
    df[["score", "prob", "rank"]] = ranked[["score", "prob", "rank"]].to_numpy()
    df["rank"] = df["rank"].astype(np.int64)
    seconds["rank"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    df = decide(df, picking)
    df["reasons"] = _with_copy_reasons(df["reasons"], copies, ts)
    seconds["decide"] = time.perf_counter() - t0
    df["file_name"] = [PurePosixPath(u).name for u in df["image_uri"].astype(str)]
    return CullResult(df, label, seconds, copy_timed=int((copies >= 0).sum()))


def follow_marks(dup_of: np.ndarray, kind: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
    """Marks that point at a row itself marked (an export near a byte copy of the photo; a byte
    copy of a row that is a near duplicate of a third) followed to the row at the chain's end,
    the one that stays in competition: what ``duplicate_of`` is documented to name, and what the
    reasons name. A chain with a near link is a near duplicate of that row, not a copy of it.
    ``keeper pick`` and ``keeper dedup`` both report marks so."""
    root = duplicate_roots(dup_of, "cull")
    kind = list(kind)
    for i in np.flatnonzero((root >= 0) & (root != dup_of)):
        j = int(dup_of[i])
        while j != root[i]:
            if kind[j] == "near":
                kind[i] = "near"
            j = int(dup_of[j])
    return root, kind


def _with_copy_reasons(reasons: pd.Series, copies: np.ndarray, ts: np.ndarray) -> pd.Series:
    """Each copy-timed photo's reasons, with why it was not grouped by its time: the copy's
    files and span, so the evidence is in numbers."""
    timed = copies >= 0
    if not timed.any():
        return reasons
    run = pd.Series(ts[timed]).groupby(copies[timed])
    files, span = run.size().to_dict(), (run.max() - run.min()).to_dict()
    out = reasons.tolist()
    for i in np.flatnonzero(timed).tolist():
        out[i] = [
            *out[i],
            "not grouped by time: no EXIF time, and its file time is a copy's, not a capture's "
            f"({files[copies[i]]} files {_spread(span[copies[i]])})",
        ]
    return pd.Series(out, index=reasons.index, dtype=object)


def _spread(seconds: float) -> str:
    if seconds == 0:
        return "at one instant"
    if seconds < 1:
        return f"within {1000 * seconds:.{1 if seconds < 0.1 else 0}f} ms"
    return f"within {seconds:.1f} s"


def picks_table(picks: pd.DataFrame) -> pa.Table:
    """The picks as Arrow for Parquet: ``reasons`` a list of strings, ``duplicate_of`` the URI."""
    df = _with_columns(picks)
    uris = df["image_uri"].astype(str).to_numpy()
    dup = df["duplicate_of"].to_numpy(dtype=np.int64)
    cols: dict[str, pa.Array] = {}
    for name in PICK_COLUMNS:
        if name == "duplicate_of":
            cols[name] = pa.array([uris[i] if i >= 0 else None for i in dup], pa.string())
        elif name == "reasons":
            cols[name] = pa.array([list(r) for r in df["reasons"]], pa.list_(pa.string()))
        else:
            cols[name] = pa.array(df[name].tolist(), from_pandas=True)
    return pa.table(cols)


def picks_csv(picks: pd.DataFrame) -> bytes:
    """The picks as CSV: the Parquet table's columns, ``reasons`` joined with "; "."""
    df = picks_table(picks).to_pandas()
    df["reasons"] = ["; ".join(r) for r in df["reasons"]]
    return df.to_csv(index=False).encode()


def _with_columns(picks: pd.DataFrame) -> pd.DataFrame:
    """Optional capture columns a frame may lack (a request without EXIF) as nulls."""
    df = picks.copy()
    for name in PICK_COLUMNS:
        if name not in df.columns:
            df[name] = None
    return df
