"""keeper_core.series.read_series_manifest over seeded random manifests, against a plain reference.

Seeded cases (``KEEPER_HISTORIES=2000`` runs more; a failing case names its seed and how it was
written, so it replays) each write one manifest as users and tools write them:

- CSV: with or without a UTF-8 BOM, ``\\n`` / ``\\r\\n`` / ``\\r`` line ends, minimal or full
  quoting, blank lines, no final newline; named ``.csv``, ``.CSV``, ``.txt`` or nothing;
- Parquet: ``series_id`` as str, dictionary-encoded str, int64 or float64 (integral or not),
  ``is_best`` as bool, int8, int64, float32, float64 or str; named ``.parquet``, ``.PQ``,
  ``.pq``, or ``.csv`` / nothing (found by magic);
- values: series ids that look numeric (``007``, ``7``, ``7.0``, `` 7``, ``1e3``, ``1000``),
  hold commas, quotes, newlines, letters beyond ASCII, or 300 characters; image URIs relative
  (``./``, ``x/../``, ``//``), absolute, ``file://`` or ``s3://``, with spaces, commas, quotes,
  newlines and emoji, padded with blanks; ``is_best`` as 1/0, true/false in any case, padded;
- extra columns (``base_photo`` shared by series, a ``note`` of awkward text, a ``score``), in
  any column order, passed from a local path, a path relative to the working folder, or
  ``file://``;
- trouble: series of one image, with zero or two bests, one image in two series (spelled
  another way: ``./a``, ``x/../a``, ``file://``, ``//``), a duplicated row, ``is_best`` of
  yes/no/2/1.0, blank, NaN; a blank or all-empty row; a required column missing or spelled
  with another case or blanks around it; a row with a field too many or too few; an empty file;
  a header alone.

``reference`` is the contract written out by hand from the docstrings (module,
``read_series_manifest``, ``validate_series``, ``storage.resolve`` / ``same_key``) over the
stdlib ``csv`` reader (or the values given to Parquet): CSV or Parquet by suffix or magic; empty
bytes, rows whose field count is not the header's, missing columns (exact names), no data rows,
null or blank required values, ``is_best`` other than 0/1/true/false (structural, in that order)
are a DataError; then duplicate images (compared local paths normalised, others as written),
series without a best, with several, or of one image are one DataError naming every row and
series. A manifest that passes is the file's rows in order, ``series_id`` as written (str),
``image_uri`` stripped and resolved against the manifest's folder, ``is_best`` int64 0/1, extra
columns kept. For each case:

- the result equals the reference's, or the DataError names the reference's rows, series and
  the manifest (``source``); nothing else is ever raised;
- writing what was read (CSV and Parquet) and reading it again gives the same frame;
- ``series_groups`` gives each series' rows in order and its best;
- ``split_series`` by series and by ``base_photo`` keeps each key in one split, uses no split
  whose fraction is 0, is the same when called again, after shuffling the rows and after
  dropping other groups, leaves its input alone, and refuses a series spanning base photos,
  naming its rows.

A few seeds run the same on a moto S3 bucket, where relative ``.``, ``..`` and ``//`` resolve
inside the bucket. The tests at the end are what this found, each a minimal reproduction, fixed
since.
"""

from __future__ import annotations

import csv
import io
import math
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keeper_core import storage
from keeper_core.errors import DataError
from keeper_core.series import (
    SERIES_COLUMNS,
    SPLITS,
    read_series_manifest,
    series_groups,
    split_series,
)

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "100"))
S3_SEEDS = max(SEEDS // 50, 3)

# "007", "7", "7.0", " 7", "7 " are five series; so are "1e3" and "1000".
ID_POOL = [
    "007", "7", "7.0", " 7", "7 ", "0", "-1", "1e3", "1000", "s1", "s 1", "Série ü", "系列",
    "a,b", 'q"t', "line\nbreak", "TRUE", "x" * 300,
]  # fmt: skip
INT_IDS = [0, 7, 42, -3, 10**12, 2**62, 123456789]
FLOAT_IDS = [7.0, 0.0, -3.0, 1e15, 2.5, 0.1]
GOOD = {
    1: ["1", "true", "True", "TRUE", " 1", "tRuE", "1.0", " 1.00"],
    0: ["0", "false", "False", "FALSE", "0 ", "0.0"],
}
BAD = ["yes", "no", "2", "-1", "1.5", "y", "t", "01", "on", "1.", "1e0", "\u0661"]
NULLS = ["", "  ", "NaN", "NA", "null"]  # what a CSV's is_best holds where it has no value
NAMES = [
    "IMG_{k:04d}.jpg", "ü {k}.JPG", "日本 {k}.jpeg", "with,comma {k}.jpg", 'quo"te {k}.png',
    "new\nline {k}.jpg", "emoji 😀 {k}.heic", "a b  c {k}.jpg",
]  # fmt: skip
# Spellings of one folder: a relative one, an absolute one, an S3 one (S3 keys are literal).
REL_DIRS = {"": ["", "./"], "img/": ["img/", "x/../img/", "img//", "./img/"]}
ABS_DIRS = {"/data/": ["/data/", "file:///data/", "/data//", "/data/./"]}
S3_DIRS = {"s3://bucket-1/a/": ["s3://bucket-1/a/"]}
NOTE_BITS = [",", '"', "\n", "\r\n", " ", "ü", "日本", "😀", "x", "'", ";", "\t"]
FOLDERS = ["m", "dir ü", "a,b", "deep/er/x y"]
REWRITES = {  # a required column spelled another way: missing, by the documented names
    "series_id": ["Series_ID", " series_id", "series_id ", "series id"],
    "image_uri": ["IMAGE_URI", "image_uri ", "uri"],
    "is_best": ["Is_Best", " is_best", "is best", "best"],
}


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# random manifests


@dataclass
class Case:
    seed: int
    fmt: str  # "csv" or "parquet"
    rel_path: str  # the manifest's path under the root
    uri_style: str  # "abs", "rel" (to the working folder) or "file"
    data: bytes
    # Parquet: the values given to pyarrow (None is null), by column, in column order.
    columns: dict[str, list[Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"seed {self.seed} {self.fmt} {self.rel_path!r} ({self.uri_style}) {self.notes}"


def draw_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    fmt = "parquet" if rng.random() < 0.3 else "csv"
    name = pick(
        rng,
        ["m.parquet", "m.PQ", "m.pq", "m.csv", "manifest"]
        if fmt == "parquet"
        else ["m.csv", "M.CSV", "manifest.txt", "manifest"],
    )
    case = Case(seed, fmt, f"{pick(rng, FOLDERS)}/{name}", pick(rng, ["abs", "rel", "file"]), b"")
    id_kind = "str" if fmt == "csv" else pick(rng, ["str", "dict", "int", "float"])
    best_kind = (
        "str" if fmt == "csv" else pick(rng, ["str", "bool", "int", "int8", "float", "float32"])
    )
    case.notes += [f"ids {id_kind}", f"is_best {best_kind}"]

    # Series, their images and their bests.
    n_series = pick(rng, [0] + [1, 2, 3, 3, 4, 5, 6] * 4)
    pools: dict[str, list[Any]] = {"int": INT_IDS, "float": FLOAT_IDS}
    pool = pools.get(id_kind, ID_POOL)
    ids = [pool[i] for i in rng.choice(len(pool), n_series, replace=False)]
    if n_series > 2 and rng.random() < 0.1:
        ids[-1] = ids[0]  # two blocks of one series id: one series
        case.notes.append("id reused")
    images: list[tuple[str, str, str]] = []  # (kind, canonical folder, name)
    rows: list[dict[str, Any]] = []
    photos = {sid: f"p{int(rng.integers(max(n_series - 1, 1)))} ü" for sid in ids}
    for s, sid in enumerate(ids):
        size = 1 if rng.random() < 0.03 else int(rng.integers(2, 5))
        n_best = 1 if rng.random() < 0.96 else pick(rng, [0, 2] if size > 1 else [0])
        bests = set(rng.choice(size, n_best, replace=False).tolist())
        for j in range(size):
            kind, dirs = pick(rng, [("rel", REL_DIRS)] * 4 + [("abs", ABS_DIRS), ("s3", S3_DIRS)])
            img = (kind, pick(rng, list(dirs)), pick(rng, NAMES).format(k=len(images)))
            images.append(img)
            rows.append({"sid": sid, "img": img, "best": int(j in bests), "photo": photos[sid]})
        if n_best != 1 or size == 1:
            case.notes.append(f"series {s}: {size} images, {n_best} best")
    if rows and rng.random() < 0.08:
        i, j = rng.integers(len(rows), size=2)
        rows[j] = {**rows[j], "img": rows[i]["img"]}
        case.notes.append(f"row {j} names row {i}'s image")
    if rows and rng.random() < 0.04:
        i = int(rng.integers(len(rows)))
        rows.insert(i + 1, dict(rows[i]))
        case.notes.append(f"row {i} twice")
    if rng.random() < 0.5:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    if rows and rng.random() < 0.05:
        i = int(rng.integers(len(rows)))
        rows[i] = {**rows[i], "photo": "another photo"}
        case.notes.append(f"row {i} on another base photo")

    # Values as written.
    def spell(img: tuple[str, str, str]) -> str:
        kind, folder, name = img
        dirs = {"rel": REL_DIRS, "abs": ABS_DIRS, "s3": S3_DIRS}[kind][folder]
        uri = pick(rng, dirs) + name
        return f"  {uri} " if rng.random() < 0.1 else uri

    def best_value(b: int) -> Any:
        if best_kind == "str":
            return pick(rng, GOOD[b])
        return bool(b) if best_kind == "bool" else float(b) if "float" in best_kind else b

    table: dict[str, list[Any]] = {
        "series_id": [r["sid"] for r in rows],
        "image_uri": [spell(r["img"]) for r in rows],
        "is_best": [best_value(r["best"]) for r in rows],
    }
    if rng.random() < 0.6:
        table["base_photo"] = [r["photo"] for r in rows]
    if rng.random() < 0.4:
        bits = [rng.choice(NOTE_BITS, int(rng.integers(0, 5))).tolist() for _ in rows]
        table["note"] = ["n" + "".join(b) for b in bits]  # "n" first: no NA, number or bool
    if rng.random() < 0.3:
        table["score"] = [float(rng.integers(-8, 8)) / 4 for _ in rows]

    # Bad values.
    if rows and rng.random() < 0.05 and best_kind != "bool":
        i = int(rng.integers(len(rows)))
        bad = pick(
            rng, BAD if best_kind == "str" else [2, -1, 0.5] if "float" in best_kind else [2, -1]
        )
        table["is_best"][i] = bad
        case.notes.append(f"row {i} is_best {table['is_best'][i]!r}")
    if rows and rng.random() < 0.05:
        i, col = int(rng.integers(len(rows))), pick(rng, list(SERIES_COLUMNS))
        if fmt == "parquet":
            kind = {"series_id": id_kind, "is_best": best_kind}.get(col)
            null: Any = math.nan if "float" in str(kind) and rng.random() < 0.5 else None
        else:
            null = pick(rng, NULLS if col == "is_best" else NULLS[:2])
        table[col][i] = null
        case.notes.append(f"row {i} {col} {null!r}")
    kinds = {
        "str": pa.string(), "dict": pa.dictionary(pa.int32(), pa.string()), "bool": pa.bool_(),
        "int": pa.int64(), "int8": pa.int8(), "float": pa.float64(), "float32": pa.float32(),
    }  # fmt: skip
    types = {c: pa.string() for c in table} | {"score": pa.float64()}
    types |= {"series_id": kinds[id_kind], "is_best": kinds[best_kind]}
    names = list(table)
    rng.shuffle(names)
    if rng.random() < 0.06:
        k = names.index(pick(rng, list(SERIES_COLUMNS)))
        if rng.random() < 0.5:
            case.notes.append(f"no column {names[k]}")
            del table[names.pop(k)]
        else:
            new = pick(rng, REWRITES[names[k]])
            case.notes.append(f"column {names[k]} as {new!r}")
            table[new], types[new] = table.pop(names[k]), types[names[k]]
            names[k] = new
    table = {c: table[c] for c in names}

    if fmt == "parquet":
        case.columns = table
        buf = io.BytesIO()
        pq.write_table(pa.table({c: pa.array(v, type=types[c]) for c, v in table.items()}), buf)
        case.data = buf.getvalue()
    else:
        case.data = _csv_bytes(rng, table, case.notes)
    return case


def _csv_bytes(rng: np.random.Generator, table: dict[str, list[Any]], notes: list[str]) -> bytes:
    lt = pick(rng, ["\n", "\r\n", "\r"])
    # csv's minimal quoting leaves a "\n" bare where lines end in "\r": a broken file.
    quoting: Any = csv.QUOTE_ALL if lt == "\r" or rng.random() < 0.3 else csv.QUOTE_MINIMAL
    bom = rng.random() < 0.3
    notes.append(f"lines {lt!r} quoting {quoting} bom {bom}")
    n = len(next(iter(table.values()), []))
    body = [[str(table[c][i]) for c in table] for i in range(n)]
    if rng.random() < 0.03:
        body.insert(int(rng.integers(n + 1)), [""] * len(table))
        notes.append("an all-empty row")
    if body and rng.random() < 0.03:
        i = int(rng.integers(len(body)))
        body[i] = body[i][:-1] if rng.random() < 0.5 else [*body[i], "extra"]
        notes.append(f"data row {i} has {len(body[i])} fields")
    buf = io.StringIO()
    w = csv.writer(buf, quoting=quoting, lineterminator=lt)
    w.writerow(table)
    for row in body:
        w.writerow(row)
        if rng.random() < 0.05:
            buf.write(lt)  # a blank line: no row
    text = buf.getvalue()
    if rng.random() < 0.2:
        text = text.removesuffix(lt)
    if rng.random() < 0.02:
        notes.append("empty file")
        return pick(rng, [b"", b" \r\n\n"])
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()


# ---------------------------------------------------------------------------------------------
# the reference


@dataclass
class Expected:
    error: list[str] | None = None  # phrases of the DataError's message, or None: no error
    rows: list[int] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    values: dict[str, list[Any]] = field(default_factory=dict)


def base_of(uri: str) -> str:
    """The manifest's folder, as written (module docstring: relative URIs resolve against it)."""
    head, sep, _ = uri.rpartition("/")
    return head if sep and not head.endswith(":/") else "."


def resolve(ref: str, base: str) -> str:
    """``storage.resolve``'s docstring: absolute URIs stand, relative ones join the folder; on
    S3, ``.``, ``..`` and empty segments are resolved."""
    ref = ref.strip()
    if ref.startswith(("/", "file://", "s3://")) or base == ".":
        return ref
    if base.startswith("s3://"):
        bucket, _, key = base[len("s3://") :].partition("/")
        return f"s3://{bucket}/" + posixpath.normpath(posixpath.join(key, ref)).lstrip("/")
    return f"{base}/{ref.removeprefix('./')}"


def same_key(uri: str) -> str:
    """``storage.same_key``'s docstring: local paths absolute and normalised, others as given."""
    if uri.startswith("s3://"):
        return uri
    return os.path.normpath(os.path.abspath(uri.removeprefix("file://")))


def is_null(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    # A CSV has no nulls but blanks: "NaN", "NA" and "null" are text (not 0/1 in is_best).
    return isinstance(value, str) and not value.strip()


def parse_best(value: Any) -> int | None:
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("1.0", "1.00", "0.0"):  # a float column written to CSV (pandas: 1.0)
            return int(v[0])
        return {"1": 1, "true": 1, "0": 0, "false": 0}.get(v)
    if isinstance(value, bool | int | float) and value in (0, 1):
        return int(value)
    return None


def reference(case: Case, uri: str) -> Expected:
    if not case.data.strip():
        return Expected(["empty manifest (no bytes)"])
    if case.fmt == "csv":
        records = list(csv.reader(io.StringIO(case.data.decode("utf-8-sig"), newline="")))
        header, body = records[0], [r for r in records[1:] if r]
        if any(len(r) != len(header) for r in body):
            return Expected(["field count other than the header's"])
        cols = {c: [r[i] for r in body] for i, c in enumerate(header)}
    else:
        cols = case.columns
    missing = [c for c in SERIES_COLUMNS if c not in cols]
    if missing:
        return Expected([f"missing columns {missing}"])
    n = len(cols["series_id"])
    if n == 0:
        return Expected(["empty manifest (no data rows)"])
    null = {c: [is_null(v) for v in cols[c]] for c in SERIES_COLUMNS}
    null_rows = [i for i in range(n) if any(null[c][i] for c in SERIES_COLUMNS)]
    if null_rows:
        named = [c for c in SERIES_COLUMNS if any(null[c])]
        return Expected([f"null or empty values in columns {named}"], null_rows)
    parsed = [parse_best(v) for v in cols["is_best"]]
    bad = [i for i, b in enumerate(parsed) if b is None]
    if bad:
        return Expected(["is_best must be 0/1, true/false"], bad)
    best = [b or 0 for b in parsed]

    # Each id on its own: an integral float reads as the integer ("7.0" reads as "7").
    ids = [
        str(int(v)) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else str(v)
        for v in cols["series_id"]
    ]
    uris = [resolve(v, base_of(uri)) for v in cols["image_uri"]]
    keys = [same_key(u) for u in uris]
    problems: list[str] = []
    rows: set[int] = set()
    dup = [i for i, k in enumerate(keys) if keys.count(k) > 1]
    if dup:
        problems.append(f"duplicate image_uri in rows {', '.join(map(str, dup[:10]))}")
        rows.update(dup)
    members: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        members.setdefault(sid, []).append(i)
    n_best = {sid: sum(best[i] for i in m) for sid, m in members.items()}
    for what, bad_series in (
        ("without a best image", {sid for sid, b in n_best.items() if b == 0}),
        ("with more than one best image", {sid for sid, b in n_best.items() if b > 1}),
        ("of a single image", {sid for sid, m in members.items() if len(m) == 1}),
    ):
        hit = {sid: m for sid, m in members.items() if sid in bad_series}
        if hit:
            problems.append(f"{len(hit)} series {what}")
            problems += [f"{sid!r} (rows {', '.join(map(str, m))})" for sid, m in hit.items()]
            rows.update(i for m in hit.values() for i in m)
    if problems:
        return Expected(problems, sorted(rows))
    values: dict[str, list[Any]] = {"series_id": ids, "image_uri": uris, "is_best": best}
    for c in cols:
        if c not in values:
            # A CSV's columns are the text written; Parquet's keep their type.
            parquet_score = c == "score" and case.fmt == "parquet"
            values[c] = [float(v) for v in cols[c]] if parquet_score else list(cols[c])
    return Expected(None, columns=list(cols), values=values)


# ---------------------------------------------------------------------------------------------
# checks


def place(case: Case, root: str) -> str:
    """Writes the case's manifest under root (a local folder or s3:// prefix); returns its URI."""
    path = f"{root}/{case.rel_path}"
    storage.write_bytes(path, case.data, durable=False)
    if root.startswith("s3://") or case.uri_style == "abs":
        return path
    if case.uri_style == "file":
        return "file://" + path
    return os.path.relpath(path)


def check_case(case: Case, uri: str) -> pd.DataFrame | None:
    what = case.describe()
    want = reference(case, uri)
    err: Exception | None = None
    try:
        got = read_series_manifest(uri)
    except Exception as e:  # anything but the DataError the reference names is the finding
        err = e
    if err is not None:
        if not isinstance(err, DataError):
            pytest.fail(f"{what}: {type(err).__name__} instead of a DataError: {err}")
        assert want.error is not None, f"{what}: refused a manifest the reference reads: {err}"
        for phrase in want.error:
            assert phrase in str(err), f"{what}: {phrase!r} not in {str(err)!r}"
        assert err.rows == want.rows, f"{what}: rows {err.rows}, want {want.rows}: {err}"
        assert err.source == uri, what
        return None
    assert want.error is None, f"{what}: read a manifest the reference refuses: {want.error}"
    assert list(got.columns) == want.columns, what
    assert isinstance(got.index, pd.RangeIndex), what
    assert got.index.tolist() == list(range(len(got))), what
    assert got["is_best"].dtype == np.int64, what
    for col in ("series_id", "image_uri"):
        assert pd.api.types.is_string_dtype(got[col]), f"{what}: {col} {got[col].dtype}"
    for col, values in want.values.items():
        assert got[col].tolist() == values, f"{what}: column {col}"

    # What was read, written and read again, is what was read: a CSV's columns as the text
    # written (a Parquet float column comes back as its text).
    # (Into the working folder where the URIs read are relative to it: else they would move.)
    folder = "." if case.uri_style == "rel" else base_of(uri)
    as_text = got.copy()
    for col in as_text.columns:
        if col != "is_best" and not pd.api.types.is_string_dtype(as_text[col]):
            as_text[col] = as_text[col].astype(str)
    for name, write, want_back in (
        ("rt.csv", _to_csv, as_text),
        ("rt.parquet", _to_parquet, got),
    ):
        again = f"{folder}/{name}"
        storage.write_bytes(again, write(got), durable=False)
        back = read_series_manifest(again)
        # (str columns may come back as object or StringDtype: the values are what counts)
        pd.testing.assert_frame_equal(back, want_back, obj=f"{what} {name}", check_dtype=False)

    # series_groups: each series' rows in order of first appearance, and its best.
    groups = series_groups(got)
    order: dict[str, list[int]] = {}
    for i, sid in enumerate(want.values["series_id"]):
        order.setdefault(sid, []).append(i)
    assert [g.series_id for g in groups] == list(order), what
    for g in groups:
        assert g.positions.tolist() == order[g.series_id], what
        assert want.values["is_best"][g.positions[g.best]] == 1, what
    return got


def _to_csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def _to_parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


FRACTIONS = [(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.7, 0.15, 0.15)]


def check_splits(df: pd.DataFrame, seed: int, what: str) -> None:
    rng = np.random.default_rng([seed, 1])
    for by in ("series_id", "base_photo"):
        if by not in df.columns:
            continue
        fractions, split_seed = pick(rng, FRACTIONS), int(rng.integers(-5, 2**40))
        before = df.copy()
        spans = df.groupby("series_id")[by].transform("nunique").to_numpy() > 1
        if spans.any():
            with pytest.raises(DataError, match=f"spanning several {by} values") as e:
                split_series(df, fractions=fractions, seed=split_seed, by=by)
            assert e.value.rows == np.flatnonzero(spans).tolist(), what
            continue
        out = split_series(df, fractions=fractions, seed=split_seed, by=by)
        pd.testing.assert_frame_equal(df, before, obj=what)  # input untouched
        pd.testing.assert_frame_equal(out.drop(columns="split"), df, obj=what)
        of = out.groupby(by, sort=False)["split"].agg(set)
        assert (of.map(len) == 1).all(), f"{what}: a {by} in two splits"
        used = {s for ss in of for s in ss}
        assert used <= {s for s, f in zip(SPLITS, fractions, strict=True) if f > 0}, what
        key_split = {k: next(iter(s)) for k, s in of.items()}
        again = split_series(df, fractions=fractions, seed=split_seed, by=by)
        pd.testing.assert_frame_equal(again, out, obj=what)
        # A group's split depends on the seed and its key alone: not on row order or other rows.
        keep = rng.permutation(len(of))[: max(1, len(of) // 2)]
        kept_keys = {of.index[i] for i in keep}
        sub = df[df[by].isin(kept_keys)]
        sub = sub.iloc[rng.permutation(len(sub))]
        moved = split_series(sub, fractions=fractions, seed=split_seed, by=by)
        for k, s in zip(moved[by], moved["split"], strict=True):
            assert key_split[k] == s, f"{what}: {by} {k!r} moved when other groups went"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_read_series_manifest_is_the_reference_on_random_manifests(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # "rel" manifests are named relative to the working folder
    case = draw_case(seed)
    uri = place(case, str(tmp_path))
    got = check_case(case, uri)
    if got is not None:
        check_splits(got, seed, case.describe())


@pytest.mark.parametrize("seed", range(S3_SEEDS))
def test_random_manifests_on_s3(seed: int, s3_bucket: str) -> None:
    # Seeds whose manifest reads, so that the S3 resolution of every URI spelling is compared.
    for s in range(10_000 + 100 * seed, 10_100 + 100 * seed):
        case = draw_case(s)
        if reference(case, "s3://b/x.csv").error is None:
            break
    case.uri_style = "abs"
    got = check_case(case, place(case, f"s3://{s3_bucket}/pre fix"))
    assert got is not None


# ---------------------------------------------------------------------------------------------
# fixed cases


def test_a_kitchen_sink_csv(tmp_path: Path) -> None:
    text = (
        '\ufeff"is_best","Extra, col","image_uri","series_id"\r\n'
        'TRUE,"a ""b""\r\nc", ./img/ü 1.jpg ,007\r\n'
        '0,x,"s3://b/k with, comma.jpg",007\r\n'
        "\r\n"
        " false ,y,img//2.jpg,7\r\n"
        "1,z,/abs/3.jpg,7\r\n"
    )
    (tmp_path / "m.csv").write_bytes(text.encode())
    df = read_series_manifest(str(tmp_path / "m.csv"))
    assert df.columns.tolist() == ["is_best", "Extra, col", "image_uri", "series_id"]
    assert df["series_id"].tolist() == ["007", "007", "7", "7"]
    assert df["is_best"].tolist() == [1, 0, 0, 1]
    assert df["image_uri"].tolist() == [
        f"{tmp_path}/img/ü 1.jpg",
        "s3://b/k with, comma.jpg",
        f"{tmp_path}/img//2.jpg",
        "/abs/3.jpg",
    ]
    assert df["Extra, col"].tolist() == ['a "b"\r\nc', "x", "y", "z"]


def test_series_007_and_7_stay_apart_in_parquet(tmp_path: Path) -> None:
    pd.DataFrame(
        {"series_id": ["007", "7", "007", "7"], "image_uri": list("abcd"), "is_best": [1, 1, 0, 0]}
    ).to_parquet(tmp_path / "m")
    df = read_series_manifest(str(tmp_path / "m"))
    assert [g.series_id for g in series_groups(df)] == ["007", "7"]


# ---------------------------------------------------------------------------------------------
# what this found, each fixed since


# Found by the random cases (fixed since): pandas' default NA strings: a series named
# NA/None/null/nan reads as a null value
@pytest.mark.parametrize("sid", ["NA", "None"])
def test_a_series_named_like_a_null_is_read_as_written(tmp_path: Path, sid: str) -> None:
    (tmp_path / "m.csv").write_text(f"series_id,image_uri,is_best\n{sid},a.jpg,1\n{sid},b.jpg,0\n")
    df = read_series_manifest(str(tmp_path / "m.csv"))  # DataError: null or empty values
    assert df["series_id"].tolist() == [sid, sid]


# Found by the random cases (fixed since): CSV extra columns are type-inferred: base_photo 001
# hashes as '1' until the column holds a non-number, then as '001': adding a series moves existing
# ones between splits
def test_adding_a_series_does_not_move_base_photos_read_from_csv(tmp_path: Path) -> None:
    head = "series_id,image_uri,is_best,base_photo\n"
    old = "".join(f"s{i},a{i}.jpg,1,{i:03d}\ns{i},b{i}.jpg,0,{i:03d}\n" for i in range(1, 4))
    (tmp_path / "old.csv").write_text(head + old)
    (tmp_path / "new.csv").write_text(head + old + "t,c.jpg,1,x9\nt,d.jpg,0,x9\n")
    before = split_series(read_series_manifest(str(tmp_path / "old.csv")), by="base_photo")
    after = split_series(read_series_manifest(str(tmp_path / "new.csv")), by="base_photo")
    assert after["split"].tolist()[:6] == before["split"].tolist()  # 002 and 003 move
    assert before["base_photo"].tolist() == ["001", "001", "002", "002", "003", "003"]


# Found by the random cases (fixed since): _as_str casts float ids to int64: 1e19 and 2e19 both
# become INT64_MIN
def test_float_series_ids_beyond_int64_stay_apart(tmp_path: Path) -> None:
    pd.DataFrame(
        {"series_id": [1e19, 1e19, 2e19, 2e19], "image_uri": list("abcd"), "is_best": [1, 0, 0, 0]}
    ).to_parquet(tmp_path / "m.parquet")
    with pytest.raises(DataError, match="1 series without a best image"):
        read_series_manifest(str(tmp_path / "m.parquet"))  # reads one series of 4 images


# Found by the random cases (fixed since): _as_str casts an infinite float id to int64:
# IntCastingNaNError escapes
def test_an_infinite_float_series_id_is_a_data_error_or_a_series(tmp_path: Path) -> None:
    pd.DataFrame(
        {"series_id": [math.inf, math.inf, 1.0, 1.0], "image_uri": list("abcd"),
         "is_best": [1, 0, 0, 1]}
    ).to_parquet(tmp_path / "m.parquet")  # fmt: skip
    try:
        df = read_series_manifest(str(tmp_path / "m.parquet"))
    except DataError:
        return
    assert df["series_id"].tolist() == ["inf", "inf", "1", "1"]


# Found by the random cases (fixed since): _as_str casts float ids to int only when all are
# integral: adding series 2.5 turns series 7 into '7.0', which hashes to another split
def test_adding_a_fractional_float_id_does_not_rename_the_others(tmp_path: Path) -> None:
    ids = [7.0, 7.0, 8.0, 8.0]
    frame = {"series_id": ids, "image_uri": list("abcd"), "is_best": [1, 0, 1, 0]}
    pd.DataFrame(frame).to_parquet(tmp_path / "old.parquet")
    more = {"series_id": [*ids, 2.5, 2.5], "image_uri": list("abcdef"), "is_best": [1, 0] * 3}
    pd.DataFrame(more).to_parquet(tmp_path / "new.parquet")
    assert read_series_manifest(str(tmp_path / "old.parquet"))["series_id"].tolist()[:4] == [
        "7", "7", "8", "8"
    ]  # fmt: skip
    new = read_series_manifest(str(tmp_path / "new.parquet"))
    assert new["series_id"].tolist() == ["7", "7", "8", "8", "2.5", "2.5"]  # read: 7.0, 8.0


# Found by the random cases (fixed since): read_csv_strict's csv.reader stops at a field over
# 131,072 characters: _csv.Error escapes instead of a DataError (pandas reads the file)
def test_a_field_over_128_kib_is_read(tmp_path: Path) -> None:
    note = "x" * 140_000  # e.g. a JSON blob or an embedded thumbnail in an extra column
    text = f"series_id,image_uri,is_best,note\ns,a.jpg,1,{note}\ns,b.jpg,0,y\n"
    (tmp_path / "m.csv").write_text(text)
    df = read_series_manifest(str(tmp_path / "m.csv"))  # _csv.Error: field larger than ...
    assert df["note"].tolist() == [note, "y"]


# Found by the random cases (fixed since): read_csv_strict takes a blank first line for a header of
# 0 fields and refuses every row; pandas (and the check's own rule for blank lines) skips it
def test_a_blank_line_before_the_header_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("\nseries_id,image_uri,is_best\ns,a.jpg,1\ns,b.jpg,0\n")
    df = read_series_manifest(str(tmp_path / "m.csv"))  # DataError: "... the header's 0"
    assert df["is_best"].tolist() == [1, 0]


# Found by the random cases (fixed since): a header naming is_best twice is read silently: pandas
# renames the second is_best.1 and the first wins, whatever the second says
def test_a_header_naming_a_required_column_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "series_id,image_uri,is_best,is_best\ns,a.jpg,1,0\ns,b.jpg,0,1\n"
    )
    with pytest.raises(DataError, match="is_best"):
        read_series_manifest(str(tmp_path / "m.csv"))  # reads a as best, keeps "is_best.1"
