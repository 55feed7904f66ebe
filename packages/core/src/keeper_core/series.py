"""Series manifests: read, validate, convert pairwise votes, split.

A series is the images of one burst; exactly one of them is the best. A series manifest is a
CSV or Parquet table (local path or ``s3://``) with ``series_id, image_uri, is_best`` and any
extra columns, which are kept. A PhotoTriage-style pairwise manifest
(``series_id, image_a, image_b, prefer_a, prefer_b`` vote counts) converts to one with
``pairwise_to_series``.

Row numbers in errors are 0-based data rows (the header is not a row).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError

SERIES_COLUMNS = ("series_id", "image_uri", "is_best")
PAIRWISE_COLUMNS = ("series_id", "image_a", "image_b", "prefer_a", "prefer_b")
SPLITS = ("train", "val", "test")

_MAX_LISTED = 10  # long lists in messages are cut here; DataError.rows keeps them all
_TRUE, _BOOL_STRINGS = frozenset({"1", "true"}), frozenset({"0", "1", "false", "true"})
_FLOAT_01 = re.compile(r"[01]\.0+", re.ASCII)  # 1.0 / 0.0, as a float column writes them to CSV
# Bradley-Terry prior: every image also wins once and loses once against a virtual reference of
# strength 1. It keeps strengths finite when an image never wins (or never loses), which a
# plain maximum-likelihood fit cannot, and shrinks scores backed by few votes.
_BT_PRIOR = 1.0
_BT_TOL, _BT_MAX_ITER = 1e-12, 10_000
_TIE_TOL = 1e-9  # pref_scores this close count as a tie for the best


class SeriesGroup(NamedTuple):
    """One series of a manifest.

    Attributes:
        series_id: the series id.
        positions: 0-based row positions of its images in the DataFrame, in row order.
        best: index of the best image within ``positions`` (0 <= best < len(positions)).
    """

    series_id: str
    positions: np.ndarray
    best: int


def read_series_manifest(uri: str) -> pd.DataFrame:
    """Reads and validates a series manifest.

    Args:
        uri: local path or ``s3://bucket/key`` of a CSV or Parquet file (Parquet if the name
            ends in ``.parquet``/``.pq`` or the bytes start with the ``PAR1`` magic).

    Returns:
        The manifest with ``series_id`` as str and ``is_best`` as int 0/1, extra columns kept,
        rows in file order with a fresh RangeIndex; relative ``image_uri`` values are resolved
        against the manifest's folder (``resolve_image_uris``).

    Raises:
        DataError: the file cannot be parsed or fails ``validate_series``.
        StorageError: the file cannot be read.
    """
    df = _read_table(uri)
    return validate_series(resolve_image_uris(df, uri), source=uri)


def resolve_image_uris(df: pd.DataFrame, manifest_uri: str) -> pd.DataFrame:
    """A copy of ``df`` whose relative ``image_uri`` values resolve against the manifest's folder.

    The one resolution every job applies (``storage.resolve``): keeper embed records, and
    train-head, evaluate and promote join on, the same strings.
    """
    if "image_uri" not in df.columns:
        return df
    base = storage.parent(manifest_uri)
    out = df.copy()
    out["image_uri"] = [
        v if not isinstance(v, str) or not v.strip() else storage.resolve(v, base)
        for v in out["image_uri"].tolist()
    ]
    return out


def validate_series(df: pd.DataFrame, source: str | None = None) -> pd.DataFrame:
    """Checks a series manifest and returns a normalised copy.

    Refuses missing columns, an empty table, null or empty values, ``is_best`` values other than
    bools, 0/1, "true"/"false" (any case) or "1.0"/"0.0" (a float column written to CSV, as
    pandas writes one that held a NaN: the same value a Parquet float column gives as 1.0),
    duplicate ``image_uri``, series with zero or
    several best images, and series of one image. The structural problems (columns, empty,
    nulls, is_best values) are reported first; the per-series problems are reported together.

    Args:
        df: the manifest.
        source: where it came from, for error messages.

    Returns:
        A copy with ``series_id`` and ``image_uri`` as str, ``is_best`` as int64 0/1 and a
        RangeIndex (so positions and row numbers coincide).

    Raises:
        DataError: naming the offending rows (``.rows``) and series ids.
    """
    df = _check_columns(df, SERIES_COLUMNS, source)
    df["is_best"] = _parse_is_best(df["is_best"], source)
    df["series_id"] = _as_str(df["series_id"])
    df["image_uri"] = df["image_uri"].astype(str)

    problems: list[tuple[str, list[int]]] = []
    # One file named twice (a.jpg and /abs/a.jpg, or file:///abs/a.jpg) is a duplicate too.
    keys = df["image_uri"].map(storage.same_key)
    dup = np.flatnonzero(keys.duplicated(keep=False).to_numpy())
    if len(dup):
        problems.append((f"duplicate image_uri in rows {_fmt(dup.tolist())}", dup.tolist()))
    groups = df.groupby("series_id", sort=False)
    n_best = groups["is_best"].transform("sum").to_numpy()
    size = groups["is_best"].transform("size").to_numpy()
    for bad, what in (
        (n_best == 0, "without a best image (is_best=1)"),
        (n_best > 1, "with more than one best image"),
        (size == 1, "of a single image"),
    ):
        if bad.any():
            problems.append(_series_problem(df, np.flatnonzero(bad), what))
    if problems:
        rows = sorted({r for _, rs in problems for r in rs})
        raise DataError("; ".join(msg for msg, _ in problems), source=source, rows=rows)
    return df


def pairwise_to_series(df_or_uri: pd.DataFrame | str) -> pd.DataFrame:
    """Turns pairwise preference votes into series labels.

    Each series is scored with a Bradley-Terry model fitted by minorise-maximise iterations
    (Hunter 2004) on its vote counts, with a weak prior (one win and one loss per image against
    a virtual reference) so images that never win or never lose keep finite scores.
    ``pref_score`` is an image's share of its series' total strength: it sums to 1 per series
    and is the Bradley-Terry probability that the image is chosen over all the others, so it
    serves as a soft target for ``heads.series_softmax_loss``. The best image is the one with
    the highest ``pref_score``; scores within 1e-9 of the maximum tie and the tie goes to the
    image that appears first in the manifest.

    A pair with zero votes adds no evidence (its images still belong to the series); a series
    whose pairs have no votes at all is an error.

    Args:
        df_or_uri: a DataFrame, or a CSV/Parquet path or ``s3://`` URI, with columns
            ``series_id, image_a, image_b, prefer_a, prefer_b`` (vote counts >= 0).

    Returns:
        A validated series manifest with columns ``series_id, image_uri, is_best, pref_score``,
        series and images in order of first appearance.

    Raises:
        DataError: missing columns, empty input, null values, non-numeric or negative votes,
            ``image_a == image_b``, an image in two series, or a series without votes.
    """
    source = df_or_uri if isinstance(df_or_uri, str) else None
    raw = _read_table(df_or_uri) if isinstance(df_or_uri, str) else df_or_uri
    df = _check_columns(raw, PAIRWISE_COLUMNS, source)
    df["series_id"] = _as_str(df["series_id"])
    for col in ("image_a", "image_b"):
        df[col] = df[col].astype(str)
    for col in ("prefer_a", "prefer_b"):
        votes = pd.to_numeric(df[col], errors="coerce")
        bad = np.flatnonzero((votes.isna() | (votes < 0) | np.isinf(votes)).to_numpy())
        if len(bad):
            raise DataError(
                f"{col} must be a vote count >= 0; bad rows {_fmt(bad.tolist())}",
                source=source,
                rows=bad.tolist(),
            )
        df[col] = votes.astype(np.float64)
    same = np.flatnonzero((df["image_a"] == df["image_b"]).to_numpy())
    if len(same):
        raise DataError(
            f"image_a == image_b in rows {_fmt(same.tolist())}", source=source, rows=same.tolist()
        )
    long = pd.concat(
        [
            pd.DataFrame({"row": df.index, "series_id": df["series_id"], "image": df[c]})
            for c in ("image_a", "image_b")
        ]
    )
    n_series = long.groupby("image")["series_id"].transform("nunique").to_numpy()
    shared = sorted(set(long["row"].to_numpy()[n_series > 1].tolist()))
    if shared:
        raise DataError(
            f"images that appear in more than one series, rows {_fmt(shared)}",
            source=source,
            rows=shared,
        )
    votes = df["prefer_a"] + df["prefer_b"]
    total = votes.groupby(df["series_id"], sort=False).transform("sum")
    no_votes = np.flatnonzero((total == 0).to_numpy())
    if len(no_votes):
        msg, rows = _series_problem(df, no_votes, "without any votes")
        raise DataError(msg, source=source, rows=rows)

    out: list[pd.DataFrame] = []
    for sid, g in df.groupby("series_id", sort=False):
        images = pd.unique(np.stack([g["image_a"], g["image_b"]], axis=1).ravel())
        index = {img: i for i, img in enumerate(images)}
        wins = np.zeros((len(images), len(images)))
        a = g["image_a"].map(index).to_numpy()
        b = g["image_b"].map(index).to_numpy()
        np.add.at(wins, (a, b), g["prefer_a"].to_numpy())
        np.add.at(wins, (b, a), g["prefer_b"].to_numpy())
        score = _bradley_terry(wins)
        best = int(np.flatnonzero(score >= score.max() - _TIE_TOL)[0])
        out.append(
            pd.DataFrame(
                {
                    "series_id": sid,
                    "image_uri": images,
                    "is_best": (np.arange(len(images)) == best).astype(np.int64),
                    "pref_score": score,
                }
            )
        )
    return validate_series(pd.concat(out, ignore_index=True), source=source)


def check_split_key(df: pd.DataFrame, by: str) -> None:
    """Refuse a split column that would cut a series in two: ``by`` missing or null in some
    row, or a series whose rows carry several values of it.

    Raises:
        DataError: naming the column, or the rows and series.
    """
    if by not in df.columns:
        raise DataError(f"split column {by!r} not in columns {list(df.columns)}")
    null = np.flatnonzero(df[by].isna().to_numpy())
    if len(null):
        raise DataError(f"null {by} in rows {_fmt(null.tolist())}", rows=null.tolist())
    if by != "series_id" and "series_id" in df.columns:
        spans = df.groupby("series_id", sort=False)[by].transform("nunique").to_numpy() > 1
        if spans.any():
            what = f"spanning several {by} values"
            msg, rows = _series_problem(df.reset_index(drop=True), np.flatnonzero(spans), what)
            raise DataError(msg, rows=rows)


def split_series(
    df: pd.DataFrame,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    by: str = "series_id",
) -> pd.DataFrame:
    """Assigns each group of rows to train/val/test by a hash of (seed, group key).

    The split of a group depends only on the seed and its key (sha256), never on the other
    rows, so adding series to a manifest does not move existing ones. Fractions are met in
    expectation, not exactly.

    Args:
        df: a manifest.
        fractions: train, val and test fractions, each >= 0, summing to 1.
        seed: changes the assignment as a whole.
        by: the column whose value keeps rows together (e.g. ``base_photo`` so near-duplicate
            series of one scene never straddle train and test). When it is not ``series_id``,
            every series must have a single value of it.

    Returns:
        A copy of ``df`` with a ``split`` column in {"train", "val", "test"}.

    Raises:
        ConfigError: bad fractions.
        DataError: ``by`` missing or null, or a series spanning several ``by`` values.
    """
    if len(fractions) != 3 or any(not np.isfinite(f) or f < 0 for f in fractions):
        raise ConfigError(f"fractions must be three numbers >= 0, got {fractions!r}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)})")
    check_split_key(df, by)
    keys = df[by]
    edges = np.cumsum(fractions) / sum(fractions)
    split_of: dict[str, str] = {}
    for key in pd.unique(keys.astype(str)):
        digest = hashlib.sha256(f"{seed}\x1f{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        split_of[key] = SPLITS[min(int(np.searchsorted(edges, u, side="right")), 2)]
    out = df.copy()
    out["split"] = keys.astype(str).map(split_of).to_numpy()
    return out


def series_groups(df: pd.DataFrame) -> list[SeriesGroup]:
    """Groups a manifest into series, in order of first appearance.

    Args:
        df: a series manifest (validated here).

    Returns:
        One ``SeriesGroup(series_id, positions, best)`` per series, where ``positions`` are row
        positions in ``df`` and ``best`` indexes into ``positions``: ``scores[g.positions]`` and
        ``g.best`` feed ``metrics.series_metrics`` directly.

    Raises:
        DataError: the manifest fails ``validate_series``.
    """
    df = validate_series(df)
    codes, uniques = pd.factorize(df["series_id"], sort=False)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    is_best = df["is_best"].to_numpy()
    return [
        SeriesGroup(str(uniques[i]), pos, int(np.flatnonzero(is_best[pos])[0]))
        for i, pos in enumerate(np.split(order, bounds))
    ]


def _read_table(uri: str) -> pd.DataFrame:
    """Reads a CSV or Parquet table through storage. A CSV's columns stay the text written, and
    only an empty field is null: type guessing would read a base photo "001" as 1 until a row
    says "x9" (moving groups between splits), and pandas's NA words would read a series named
    "NA" or "None" as missing."""
    data = storage.read_bytes(uri)
    is_parquet = data[:4] == b"PAR1" or uri.lower().endswith((".parquet", ".pq"))
    if not data.strip():
        raise DataError("empty manifest (no bytes)", source=uri)
    try:
        if is_parquet:
            return pd.read_parquet(io.BytesIO(data))
        return read_csv_strict(data, source=uri, dtype=str, keep_default_na=False, na_values=[""])
    except DataError:
        raise
    except (ValueError, OSError, pa.ArrowException) as e:
        kind = "Parquet" if is_parquet else "CSV"
        raise DataError(f"cannot parse as {kind}: {e}", source=uri) from e


def _check_columns(df: pd.DataFrame, required: Sequence[str], source: str | None) -> pd.DataFrame:
    """Checks columns, emptiness and nulls; returns a copy with a RangeIndex."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"missing columns {missing} (has {list(df.columns)}; needs {list(required)})",
            source=source,
        )
    if len(df) == 0:
        raise DataError("empty manifest (no data rows)", source=source)
    df = df.reset_index(drop=True)
    null = pd.DataFrame({c: df[c].isna() | df[c].astype(str).str.strip().eq("") for c in required})
    bad = np.flatnonzero(null.any(axis=1).to_numpy())
    if len(bad):
        cols = [c for c in required if null[c].any()]
        raise DataError(
            f"null or empty values in columns {cols}, rows {_fmt(bad.tolist())}",
            source=source,
            rows=bad.tolist(),
        )
    return df


def _parse_is_best(values: pd.Series, source: str | None) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.int64)
    bad: list[int] = []
    for i, v in enumerate(values.tolist()):
        if isinstance(v, str) and v.strip().lower() in _BOOL_STRINGS:
            out[i] = v.strip().lower() in _TRUE
        elif isinstance(v, str) and _FLOAT_01.fullmatch(v.strip()):
            out[i] = v.strip().startswith("1")
        elif isinstance(v, int | float) and v in (0, 1):
            out[i] = int(v)  # bool is an int, so True/False land here too
        else:
            bad.append(i)
    if bad:
        shown = _fmt([f"{r} ({values.iloc[r]!r})" for r in bad])
        raise DataError(
            f"is_best must be 0/1, true/false; bad rows {shown}", source=source, rows=bad
        )
    return out


def _as_str(ids: pd.Series) -> pd.Series:
    """Ids as str, each on its own: Parquet may carry integer ids as floats, and 7.0 reads as
    "7" whatever other ids hold (2.5, 1e19: never cast through int64, which wraps; inf is
    "inf", not an error)."""
    if not pd.api.types.is_float_dtype(ids):
        return ids.astype(str)
    return pd.Series(
        [
            str(int(v)) if math.isfinite(v) and float(v).is_integer() else str(v)
            for v in ids.tolist()
        ],
        index=ids.index,
        dtype=object,
    ).astype(str)


def _bradley_terry(wins: np.ndarray) -> np.ndarray:
    """Strengths (summing to 1) from wins[i, j] = votes for i over j, with the prior above."""
    games = wins + wins.T
    won = wins.sum(axis=1) + _BT_PRIOR
    p = np.ones(len(wins))
    for _ in range(_BT_MAX_ITER):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1) + 2 * _BT_PRIOR / (p + 1.0)
        new = won / denom
        done = np.max(np.abs(new - p)) <= _BT_TOL * np.max(new)
        p = new
        if done:
            break
    return p / p.sum()


def _series_problem(df: pd.DataFrame, bad_rows: np.ndarray, what: str) -> tuple[str, list[int]]:
    """A message naming the series of bad_rows and their rows."""
    ids = df["series_id"].to_numpy()[bad_rows]
    per_series: dict[object, list[int]] = {}
    for row, sid in zip(bad_rows.tolist(), ids.tolist(), strict=True):
        per_series.setdefault(sid, []).append(row)
    listed = [f"{sid!r} (rows {_fmt(rows)})" for sid, rows in per_series.items()]
    return f"{len(per_series)} series {what}: {_fmt(listed)}", bad_rows.tolist()


def _fmt(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def read_csv_strict(data: bytes, *, source: str | None = None, **read_csv: Any) -> pd.DataFrame:
    """``pd.read_csv`` of a manifest, refusing rows whose field count is not the header's.

    pandas reads a header of N names over rows of N + 1 fields by taking the first field as the
    row index, and shifts every column: an unquoted comma in every path (``Smith, John/a.jpg``)
    would silently name other files. Here any such row is an error naming its line.

    Raises:
        DataError: a row with more or fewer fields than the header (the first few lines named),
            a header naming a column twice, or text the csv module cannot parse.
        Whatever ``pd.read_csv`` raises otherwise (callers turn it into their DataError).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None  # pandas's own decode error names the byte; let it speak
    if text is not None:
        # A field may be as long as the file (the csv module stops at 128 KiB by default).
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        rows = csv.reader(io.StringIO(text, newline=""))
        bad: list[tuple[int, int]] = []
        try:
            header = next((r for r in rows if r), None)  # blank lines before it: skipped
            width = len(header or ())
            for row in rows:
                if row and len(row) != width:  # a blank line is skipped, as pandas does
                    bad.append((rows.line_num, len(row)))
        except csv.Error as e:
            raise DataError(f"cannot parse as CSV: line {rows.line_num}: {e}", source=source) from e
        repeated = sorted({c for c in header or () if (header or []).count(c) > 1})
        if repeated:  # pandas would rename the second "is_best.1" and drop its labels silently
            raise DataError(f"CSV header names {repeated} more than once", source=source)
        if bad:
            where = ", ".join(f"line {line} has {n}" for line, n in bad[:5])
            more = f" (and {len(bad) - 5} more rows)" if len(bad) > 5 else ""
            raise DataError(
                f"CSV rows with a field count other than the header's {width}: {where}{more}; "
                'a value holding a comma must be quoted ("Smith, John/IMG_1.jpg")',
                source=source,
            )
    return pd.read_csv(io.BytesIO(data), **read_csv)
